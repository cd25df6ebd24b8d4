//! The Step3 language model: embeddings → decoder layers (MFA, then dense or MoE FFN) → final
//! RMSNorm → untied `lm_head`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use step3_dist::{Communicator, RankComms};
use step3_mfa::{
    KvCache, MfaAttention, MfaConfig, PagedKvCache, PagedSequence, PagedStep, RotaryEmbedding, SequenceTable,
};
use step3_moe::{ExpertSlice, MoeBlock, MoeConfig, MoeShard, Routing, SwiGluMlp};
use step3_nn::{Linear, RmsNorm, WeightFormat};

use crate::shard::{ExpertPlacement, RankPlan};
use crate::{Error, Result};
use step3_config::TextConfig;

/// The sum of every rank's partial `t` over `group` (nothing to do for a group of one).
fn reduce(group: &dyn Communicator, t: Tensor) -> candle_core::Result<Tensor> {
    if group.world_size() == 1 {
        Ok(t)
    } else {
        group.all_reduce_sum(&t)
    }
}

/// The feed-forward half of a decoder layer.
#[derive(Debug, Clone)]
enum FeedForward {
    /// Dense SwiGLU (`mlp.*`): layers 0–3 and 60 of Step3.
    Dense(Box<SwiGluMlp>),
    /// Routed experts plus the shared expert (`moe.*`, `share_expert.*`).
    Moe(Box<MoeBlock>),
}

/// One pre-norm decoder layer: `h = x + Attn(norm(x))`, `out = h + FFN(norm(h))`.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: MfaAttention,
    post_attention_layernorm: RmsNorm,
    ffn: FeedForward,
}

impl DecoderLayer {
    /// Layer `layer` as rank `plan` holds it: `vb` hands out the rank's slices on its device,
    /// `experts_vb` the slices of its routed experts (on the host or the same device).
    fn new(
        cfg: &TextConfig,
        layer: usize,
        format: WeightFormat,
        plan: &RankPlan,
        vb: VarBuilder,
        experts_vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let eps = cfg.rms_norm_eps;
        let tp = plan.tp;
        let ffn = if cfg.is_moe_layer(layer) {
            let per_rank = cfg.moe_num_experts / plan.ep;
            let shard = MoeShard {
                experts: ExpertSlice {
                    first_expert: plan.ep_rank * per_rank,
                    num_experts: per_rank,
                    intermediate_size: cfg.moe_intermediate_size / tp,
                },
                shared_expert_dim: plan.holds_shared_expert().then_some(cfg.share_expert_dim / tp),
            };
            FeedForward::Moe(Box::new(MoeBlock::new_shard(
                &moe_config(cfg, format),
                &shard,
                vb.clone(),
                experts_vb.pp("moe"),
            )?))
        } else {
            FeedForward::Dense(Box::new(SwiGluMlp::new(
                cfg.hidden_size,
                cfg.intermediate_size / tp,
                format,
                vb.pp("mlp"),
            )?))
        };
        let attn = MfaConfig { num_heads: cfg.num_attention_heads / tp, ..mfa_config(cfg, format) };
        Ok(Self {
            input_layernorm: RmsNorm::new(cfg.hidden_size, eps, vb.pp("input_layernorm"))?,
            self_attn: MfaAttention::new(&attn, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(cfg.hidden_size, eps, vb.pp("post_attention_layernorm"))?,
            ffn,
        })
    }

    fn storage_bytes(&self) -> usize {
        let ffn = match &self.ffn {
            FeedForward::Dense(mlp) => mlp.storage_bytes(),
            FeedForward::Moe(moe) => moe.storage_bytes(),
        };
        self.input_layernorm.storage_bytes()
            + self.self_attn.storage_bytes()
            + self.post_attention_layernorm.storage_bytes()
            + ffn
    }

    /// `xs: [B, T, H]` over a contiguous cache. Returns the layer's output and, for an MoE layer,
    /// the normalised hidden states its router and experts read together with the routing chosen.
    /// On a sharded model the attention's and the FFN's partial outputs are summed over `comms`.
    fn forward(
        &self,
        xs: &Tensor,
        rope: &RotaryEmbedding,
        step: &step3_mfa::AttentionStep,
        cache: &mut KvCache,
        comms: &RankComms,
    ) -> candle_core::Result<(Tensor, Option<(Tensor, Routing)>)> {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(xs)?, rope, step, cache)?;
        let h = (xs + reduce(comms.tp.as_ref(), attn)?)?;
        self.feed_forward(&h, comms)
    }

    /// [`Self::forward`] for `xs: [N, H]` (the step's tokens, flattened) over a paged cache.
    fn forward_paged(
        &self,
        xs: &Tensor,
        rope: &RotaryEmbedding,
        step: &PagedStep,
        cache: &PagedKvCache,
        comms: &RankComms,
    ) -> candle_core::Result<(Tensor, Option<(Tensor, Routing)>)> {
        let attn = self.self_attn.forward_paged(&self.input_layernorm.forward(xs)?, rope, step, cache)?;
        let h = (xs + reduce(comms.tp.as_ref(), attn)?)?;
        self.feed_forward(&h, comms)
    }

    /// The second half of the layer: `h + FFN(norm(h))`, for `h` of any rank with the hidden size
    /// last; for an MoE layer also its input `[N, H]` and routing. A dense FFN's partial output is
    /// summed over the TP group; an MoE block's (routed experts of this rank plus, on EP index 0,
    /// the shared expert's columns) over the whole world.
    fn feed_forward(&self, h: &Tensor, comms: &RankComms) -> candle_core::Result<(Tensor, Option<(Tensor, Routing)>)> {
        let z = self.post_attention_layernorm.forward(h)?;
        let (ffn, moe) = match &self.ffn {
            FeedForward::Dense(mlp) => (reduce(comms.tp.as_ref(), mlp.forward(&z)?)?, None),
            FeedForward::Moe(moe) => {
                let hidden = z.dim(candle_core::D::Minus1)?;
                let flat = z.reshape(((), hidden))?;
                let (out, routing) = moe.forward(&flat)?;
                let out = reduce(comms.world.as_ref(), out)?;
                (out.reshape(z.shape())?, Some((flat, routing)))
            }
        };
        Ok(((h + ffn)?, moe))
    }
}

/// The attention sizes of a text config.
pub fn mfa_config(cfg: &TextConfig, weight_format: WeightFormat) -> MfaConfig {
    MfaConfig {
        hidden_size: cfg.hidden_size,
        share_q_dim: cfg.share_q_dim,
        num_heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim,
        rms_norm_eps: cfg.rms_norm_eps,
        weight_format,
    }
}

/// The MoE sizes of a text config.
pub fn moe_config(cfg: &TextConfig, weight_format: WeightFormat) -> MoeConfig {
    MoeConfig {
        weight_format,
        hidden_size: cfg.hidden_size,
        num_experts: cfg.moe_num_experts,
        top_k: cfg.moe_top_k,
        moe_intermediate_size: cfg.moe_intermediate_size,
        share_expert_dim: cfg.share_expert_dim,
        norm_expert_weight: cfg.norm_expert_weight,
    }
}

/// The routing decision of one MoE layer during a forward pass.
#[derive(Debug, Clone)]
pub struct LayerRouting {
    pub layer: usize,
    /// Ids and weights `[B·T, k]`, rows in (sequence, column) order.
    pub routing: Routing,
}

/// The KV caches of every layer plus the shared bookkeeping of positions and padding.
#[derive(Debug, Clone)]
pub struct Step3Cache {
    table: SequenceTable,
    /// Every rank's caches (each rank keeps its own copy of the single K/V head).
    ranks: Vec<Vec<KvCache>>,
}

impl Step3Cache {
    /// Tokens of each sequence seen so far.
    pub fn lengths(&self) -> Vec<usize> {
        self.table.lengths()
    }

    pub fn batch_size(&self) -> usize {
        self.table.batch_size()
    }

    /// Token slots per sequence this cache was created with.
    pub fn capacity(&self) -> usize {
        self.table.capacity()
    }

    /// Bytes of K/V storage allocated so far, over all layers (of one rank: every rank of a
    /// sharded model holds the same amount).
    pub fn allocated_bytes(&self) -> usize {
        self.ranks.first().map_or(0, |layers| layers.iter().map(KvCache::allocated_bytes).sum())
    }

    /// Forgets every sequence (keeps the allocation).
    pub fn reset(&mut self) {
        self.table.reset();
        self.ranks.iter_mut().flatten().for_each(KvCache::reset);
    }
}

/// Every layer's paged K/V pool (see [`step3_mfa::PagedKvCache`]); which sequence owns which block
/// is the caller's (the engine's) bookkeeping.
#[derive(Debug, Clone)]
pub struct Step3PagedCache {
    /// Every rank's pools, on its device; all ranks use the same block tables.
    ranks: Vec<Vec<PagedKvCache>>,
}

impl Step3PagedCache {
    fn layers(&self) -> &[PagedKvCache] {
        self.ranks.first().map_or(&[], Vec::as_slice)
    }

    pub fn num_blocks(&self) -> usize {
        self.layers().first().map_or(0, PagedKvCache::num_blocks)
    }

    pub fn block_size(&self) -> usize {
        self.layers().first().map_or(0, PagedKvCache::block_size)
    }

    /// Bytes of K/V storage over all layers (of one rank: every rank of a sharded model holds
    /// the same pools on its own device).
    pub fn allocated_bytes(&self) -> usize {
        self.layers().iter().map(PagedKvCache::allocated_bytes).sum()
    }

    /// One layer's pool (of the first rank).
    pub fn layer(&self, i: usize) -> Option<&PagedKvCache> {
        self.layers().get(i)
    }
}

/// One rank's decoder: its slices of every layer, on its device, with its communicators.
#[derive(Debug, Clone)]
struct RankDecoder {
    layers: Vec<DecoderLayer>,
    rope: RotaryEmbedding,
    device: Device,
    comms: RankComms,
}

/// What one rank of a model is built from (see [`Step3TextModel::new_ranks`]).
pub(crate) struct RankBuilder<'a> {
    pub plan: RankPlan,
    pub comms: RankComms,
    /// Hands out the rank's slices on its device.
    pub vb: VarBuilder<'a>,
    /// Hands out the rank's slices in host memory (for routed experts placed there).
    pub host_vb: VarBuilder<'a>,
    pub placement: ExpertPlacement,
}

/// Called by the first rank with every MoE layer's index, input and routing.
type Observer<'o> = &'o mut dyn FnMut(usize, &Tensor, &Routing) -> Result<()>;

/// The Step3 language model. Weight names are the checkpoint's: `model.embed_tokens`,
/// `model.layers.{i}.*`, `model.norm`, `lm_head`.
#[derive(Debug, Clone)]
pub struct Step3TextModel {
    embed_tokens: Embedding,
    /// One decoder per rank (one for an unsharded model); the first on `device`.
    ranks: Vec<RankDecoder>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    config: TextConfig,
    dtype: DType,
    device: Device,
}

impl Step3TextModel {
    /// Builds the model from `vb` positioned at the checkpoint root; weights are loaded in
    /// `vb.dtype()` on `vb.device()`, linear weights stored as `format` says.
    pub fn new(cfg: &TextConfig, format: WeightFormat, vb: VarBuilder) -> candle_core::Result<Self> {
        let rank = RankBuilder {
            plan: RankPlan::single(),
            comms: RankComms::single(),
            vb: vb.clone(),
            host_vb: vb.clone(),
            placement: ExpertPlacement::Device,
        };
        Self::new_ranks(cfg, format, vb, vec![rank])
    }

    /// Builds a model whose decoder is split over `ranks` (rank 0 first): the embedding, final
    /// norm and `lm_head` from `vb` (the first rank's device), each rank's layers from its builders.
    pub(crate) fn new_ranks(
        cfg: &TextConfig,
        format: WeightFormat,
        vb: VarBuilder,
        ranks: Vec<RankBuilder>,
    ) -> candle_core::Result<Self> {
        let m = vb.pp("model");
        let embed = m.pp("embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let ranks = ranks
            .into_iter()
            .map(|r| {
                let mut moe_index = 0;
                let layers = (0..cfg.num_hidden_layers)
                    .map(|l| {
                        let path = format!("model.layers.{l}");
                        let on_host = cfg.is_moe_layer(l) && r.placement.on_host(moe_index);
                        moe_index += usize::from(cfg.is_moe_layer(l));
                        let experts = if on_host { r.host_vb.pp(&path) } else { r.vb.pp(&path) };
                        DecoderLayer::new(cfg, l, format, &r.plan, r.vb.pp(&path), experts)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(RankDecoder {
                    layers,
                    rope: RotaryEmbedding::new(cfg.rope_theta, cfg.head_dim, r.vb.device())?,
                    device: r.vb.device().clone(),
                    comms: r.comms,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: Embedding::new(embed, cfg.hidden_size),
            ranks,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?,
            lm_head: Linear::new(cfg.hidden_size, cfg.vocab_size, false, WeightFormat::Dense, vb.pp("lm_head"))?,
            rope: RotaryEmbedding::new(cfg.rope_theta, cfg.head_dim, vb.device())?,
            config: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of all weights held in memory over every rank (FP8 weights count their compact size).
    pub fn storage_bytes(&self) -> usize {
        self.rank_storage_bytes().iter().sum()
    }

    /// Bytes of weights each rank holds (the first rank's include the embedding, final norm and
    /// `lm_head`; routed experts placed in host memory count with their rank).
    pub fn rank_storage_bytes(&self) -> Vec<usize> {
        let shared = step3_nn::tensor_bytes(self.embed_tokens.embeddings())
            + self.norm.storage_bytes()
            + self.lm_head.storage_bytes();
        self.ranks
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.layers.iter().map(DecoderLayer::storage_bytes).sum::<usize>() + if i == 0 { shared } else { 0 }
            })
            .collect()
    }

    /// Ranks the decoder runs on (1 unless the model was loaded with a [`crate::Layout`]).
    pub fn num_ranks(&self) -> usize {
        self.ranks.len()
    }

    /// A cache for `batch` sequences of up to `capacity` tokens each (at most
    /// `max_position_embedding`). K/V storage is allocated on the first forward pass.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<Step3Cache> {
        let table = SequenceTable::new(batch, capacity, self.config.max_position_embedding())?;
        let n = self.config.num_hidden_layers;
        let ranks = self.ranks.iter().map(|_| (0..n).map(|_| KvCache::new(capacity)).collect()).collect();
        Ok(Step3Cache { table, ranks })
    }

    /// Runs `run` on every rank at once (rank 0 on this thread with `observe`, the others on
    /// scoped threads) and returns rank 0's result. A rank that fails aborts its groups so the
    /// others stop waiting; the groups are then recovered and the first failure returned.
    fn on_ranks<S: Send, T: Send>(
        &self,
        states: Vec<S>,
        observe: Observer<'_>,
        run: impl Fn(&RankDecoder, S, Option<Observer<'_>>) -> Result<T> + Sync,
    ) -> Result<T> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let mut states = states.into_iter();
        let first_state = states.next().ok_or_else(|| Error::Input("a model with no ranks".into()))?;
        if self.ranks.len() == 1 {
            return run(&self.ranks[0], first_state, Some(observe));
        }
        let first_failure = AtomicUsize::new(usize::MAX);
        let guarded = |i: usize, f: &mut dyn FnMut() -> Result<T>| -> Result<T> {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err(Error::Input(format!("rank {i} panicked"))));
            if out.is_err() {
                let _ = first_failure.compare_exchange(usize::MAX, i, Ordering::SeqCst, Ordering::SeqCst);
                self.ranks[i].comms.abort();
            }
            out
        };
        let mut results: Vec<Result<T>> = std::thread::scope(|scope| {
            let (run, guarded) = (&run, &guarded);
            let handles: Vec<_> = self.ranks[1..]
                .iter()
                .zip(states)
                .enumerate()
                .map(|(i, (rank, state))| {
                    scope.spawn(move || {
                        let mut state = Some(state);
                        guarded(i + 1, &mut || match state.take() {
                            Some(s) => run(rank, s, None),
                            None => Err(Error::Input("rank state used twice".into())),
                        })
                    })
                })
                .collect();
            let mut state = Some(first_state);
            let mut observe = Some(observe);
            let first = guarded(0, &mut || match (state.take(), observe.take()) {
                (Some(s), Some(o)) => run(&self.ranks[0], s, Some(o)),
                _ => Err(Error::Input("rank state used twice".into())),
            });
            let mut all = vec![first];
            all.extend(
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(Error::Input("a rank thread panicked".into())))),
            );
            all
        });
        let failed = first_failure.load(Ordering::SeqCst);
        if failed == usize::MAX {
            return results.swap_remove(0);
        }
        for rank in &self.ranks {
            if !rank.comms.recover() {
                return Err(Error::Input(format!(
                    "rank {failed} failed and the communicators cannot recover: reload the model ({})",
                    results[failed].as_ref().err().map(|e| e.to_string()).unwrap_or_default()
                )));
            }
        }
        match results.swap_remove(failed) {
            Err(e) => Err(e),
            Ok(_) => Err(Error::Input(format!("rank {failed} failed"))),
        }
    }

    /// Token embeddings: `ids [B, T]` (u32) → `[B, T, H]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.forward(ids)?)
    }

    /// Runs the decoder on embeddings `xs [B, T, H]` and returns the hidden states after the
    /// final norm, `[B, T, H]`.
    ///
    /// Row `i` of the step holds `lens[i] <= T` real tokens followed by padding; pass `T` for every
    /// row when nothing is padded. The step is appended to `cache` (create one with
    /// [`Self::new_cache`]). When `trace` is given, every MoE layer's routing is pushed to it.
    pub fn forward_embeds(
        &self,
        xs: &Tensor,
        lens: &[usize],
        cache: &mut Step3Cache,
        trace: Option<&mut Vec<LayerRouting>>,
    ) -> Result<Tensor> {
        if self.on_cpu_pool() {
            return rayon::join(|| self.forward_embeds(xs, lens, cache, trace), || ()).0;
        }
        match trace {
            Some(trace) => self.forward_observed(xs, lens, cache, &mut |layer, _, routing| {
                trace.push(LayerRouting { layer, routing: routing.clone() });
                Ok(())
            }),
            None => self.forward_observed(xs, lens, cache, &mut |_, _, _| Ok(())),
        }
    }

    /// [`Self::forward_embeds`] that shows every MoE layer to `observe` as it runs: the layer
    /// index, the normalised hidden states `[B·T, H]` its router and experts read (rows in
    /// (sequence, column) order, padding included), and the routing chosen. Nothing is kept
    /// beyond the call, so diagnostics can probe the experts on the layer's real inputs without
    /// holding every layer's activations.
    pub fn forward_observed(
        &self,
        xs: &Tensor,
        lens: &[usize],
        cache: &mut Step3Cache,
        observe: &mut dyn FnMut(usize, &Tensor, &Routing) -> Result<()>,
    ) -> Result<Tensor> {
        let (_, t, _) = xs.dims3()?;
        cache.table.check(lens, t)?;
        let xs = xs.to_dtype(self.dtype)?;
        let table = &cache.table;
        let states: Vec<&mut Vec<KvCache>> = cache.ranks.iter_mut().collect();
        let out = self.on_ranks(states, observe, |rank, kv, mut observe| {
            let step = table.step(lens, t, &rank.rope, self.dtype, &rank.device)?;
            let mut xs = xs.to_device(&rank.device)?;
            for (l, (layer, kv)) in rank.layers.iter().zip(kv.iter_mut()).enumerate() {
                let (out, moe) = layer.forward(&xs, &rank.rope, &step, kv, &rank.comms)?;
                xs = out;
                if let (Some(observe), Some((z, routing))) = (observe.as_mut(), moe) {
                    observe(l, &z, &routing)?;
                }
            }
            Ok(xs)
        });
        match out.and_then(|xs| Ok(self.norm.forward(&xs.to_device(&self.device)?)?)) {
            Ok(hidden) => {
                cache.table.advance(lens, t);
                Ok(hidden)
            }
            Err(e) => {
                // Leave the cache as it was before the step, so the caller may retry or go on.
                let slots = cache.table.slots();
                cache.ranks.iter_mut().flatten().for_each(|kv| kv.truncate(slots));
                Err(e)
            }
        }
    }

    /// Bytes one paged block of `block_size` slots takes over all layers (K and V).
    /// (On each rank: every rank keeps its own copy of the single K/V head.)
    pub fn paged_block_bytes(&self, block_size: usize) -> usize {
        self.config.num_hidden_layers * PagedKvCache::block_bytes(block_size, self.config.head_dim, self.dtype)
    }

    /// A paged cache of `num_blocks` blocks of `block_size` token slots in every layer (allocated
    /// now, zeroed), on every rank's device.
    pub fn new_paged_cache(&self, num_blocks: usize, block_size: usize) -> Result<Step3PagedCache> {
        let ranks = self
            .ranks
            .iter()
            .map(|r| {
                (0..self.config.num_hidden_layers)
                    .map(|_| PagedKvCache::new(num_blocks, block_size, self.config.head_dim, self.dtype, &r.device))
                    .collect::<candle_core::Result<Vec<_>>>()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Step3PagedCache { ranks })
    }

    /// The positions, slots and masks of a paged step over `cache` (checked against its pool and
    /// the model's context).
    pub fn paged_step(&self, seqs: &[PagedSequence<'_>], cache: &Step3PagedCache) -> Result<PagedStep> {
        Ok(PagedStep::new(
            seqs,
            cache.block_size(),
            cache.num_blocks(),
            self.config.max_position_embedding(),
            &self.rope,
            self.dtype,
            &self.device,
        )?)
    }

    /// Runs the decoder on the new tokens of a paged step, flattened: embeddings `xs [N, H]` →
    /// hidden states after the final norm, `[N, H]`. Their K/V are written into `cache`. When
    /// `trace` is given, every MoE layer's routing is pushed to it.
    pub fn forward_paged(
        &self,
        xs: &Tensor,
        step: &PagedStep,
        cache: &mut Step3PagedCache,
        mut trace: Option<&mut Vec<LayerRouting>>,
    ) -> Result<Tensor> {
        if self.on_cpu_pool() {
            return rayon::join(|| self.forward_paged(xs, step, cache, trace), || ()).0;
        }
        if xs.dims2()? != (step.num_tokens, self.config.hidden_size) {
            return Err(Error::Input(format!(
                "paged step of {} tokens got embeddings {:?}",
                step.num_tokens,
                xs.dims()
            )));
        }
        let xs = xs.to_dtype(self.dtype)?;
        let mut observe = |layer: usize, _: &Tensor, routing: &Routing| -> Result<()> {
            if let Some(trace) = trace.as_deref_mut() {
                trace.push(LayerRouting { layer, routing: routing.clone() });
            }
            Ok(())
        };
        let states: Vec<&Vec<PagedKvCache>> = cache.ranks.iter().collect();
        let xs = self.on_ranks(states, &mut observe, |rank, kv, mut observe| {
            let step = step.to_device(&rank.device)?;
            let mut xs = xs.to_device(&rank.device)?;
            for (l, (layer, kv)) in rank.layers.iter().zip(kv).enumerate() {
                let (out, moe) = layer.forward_paged(&xs, &rank.rope, &step, kv, &rank.comms)?;
                xs = out;
                if let (Some(observe), Some((z, routing))) = (observe.as_mut(), moe) {
                    observe(l, &z, &routing)?;
                }
            }
            Ok(xs)
        })?;
        Ok(self.norm.forward(&xs.to_device(&self.device)?)?)
    }

    /// The MoE block of decoder layer `layer` (None for dense layers and out-of-range indices); on
    /// a sharded model, the first rank's part of it.
    pub fn moe_block(&self, layer: usize) -> Option<&MoeBlock> {
        match &self.ranks.first()?.layers.get(layer)?.ffn {
            FeedForward::Moe(moe) => Some(moe),
            FeedForward::Dense(_) => None,
        }
    }

    /// [`Self::forward_embeds`] on token ids `[B, T]` (u32).
    pub fn forward(
        &self,
        ids: &Tensor,
        lens: &[usize],
        cache: &mut Step3Cache,
        trace: Option<&mut Vec<LayerRouting>>,
    ) -> Result<Tensor> {
        self.forward_embeds(&self.embed(ids)?, lens, cache, trace)
    }

    /// Whether a forward step should move onto a worker of rayon's global pool first: an unsharded
    /// CPU model called from outside the pool. The step's parallel products then run on that
    /// worker and the others, and its serial ops on that worker, instead of on a third thread
    /// that the idle workers, spinning before they sleep, take turns with on every core. (Not
    /// with several ranks: a rank waiting for the others must not hold a worker their products
    /// need.)
    fn on_cpu_pool(&self) -> bool {
        rayon::current_thread_index().is_none() && self.ranks.len() == 1 && self.ranks[0].device.is_cpu()
    }

    /// Logits `[..., vocab]` in f32 from final hidden states `[..., H]` (any rank ≥ 1).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = match hidden.rank() {
            1 => self.lm_head.forward(&hidden.unsqueeze(0)?)?.squeeze(0)?,
            _ => self.lm_head.forward(hidden)?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Checks host-side token ids against the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.config.vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => Err(Error::Input(format!("token id {id} is outside the vocabulary (ids 0..{vocab})"))),
            None => Ok(()),
        }
    }

    /// Right-pads token sequences into a `[B, T]` u32 tensor (after checking every id) and
    /// returns it with the sequence lengths, ready for [`Self::forward`].
    pub fn batch_ids(&self, seqs: &[&[u32]]) -> Result<(Tensor, Vec<usize>)> {
        if seqs.is_empty() || seqs.iter().any(|s| s.is_empty()) {
            return Err(Error::Input("every sequence of a batch needs at least one token".into()));
        }
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(seqs.len() * t);
        for s in seqs {
            self.check_ids(s)?;
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat_n(0u32, t - s.len()));
        }
        let lens = seqs.iter().map(|s| s.len()).collect();
        Ok((Tensor::from_vec(flat, (seqs.len(), t), &self.device)?, lens))
    }
}
