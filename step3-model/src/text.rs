//! The Step3 language model: embeddings → decoder layers (MFA, then dense or MoE FFN) → final
//! RMSNorm → untied `lm_head`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use step3_mfa::{
    KvCache, MfaAttention, MfaConfig, PagedKvCache, PagedSequence, PagedStep, RotaryEmbedding, SequenceTable,
};
use step3_moe::{MoeBlock, MoeConfig, Routing, SwiGluMlp};
use step3_nn::{Linear, RmsNorm, WeightFormat};

use crate::{Error, Result};
use step3_config::TextConfig;

/// The feed-forward half of a decoder layer.
#[derive(Debug, Clone)]
enum FeedForward {
    /// Dense SwiGLU (`mlp.*`): layers 0–3 and 60 of Step3.
    Dense(SwiGluMlp),
    /// Routed experts plus the shared expert (`moe.*`, `share_expert.*`).
    Moe(MoeBlock),
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
    fn new(cfg: &TextConfig, layer: usize, format: WeightFormat, vb: VarBuilder) -> candle_core::Result<Self> {
        let eps = cfg.rms_norm_eps;
        let ffn = if cfg.is_moe_layer(layer) {
            FeedForward::Moe(MoeBlock::new(&moe_config(cfg, format), vb.clone())?)
        } else {
            FeedForward::Dense(SwiGluMlp::new(cfg.hidden_size, cfg.intermediate_size, format, vb.pp("mlp"))?)
        };
        Ok(Self {
            input_layernorm: RmsNorm::new(cfg.hidden_size, eps, vb.pp("input_layernorm"))?,
            self_attn: MfaAttention::new(&mfa_config(cfg, format), vb.pp("self_attn"))?,
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
    fn forward(
        &self,
        xs: &Tensor,
        rope: &RotaryEmbedding,
        step: &step3_mfa::AttentionStep,
        cache: &mut KvCache,
    ) -> candle_core::Result<(Tensor, Option<(Tensor, Routing)>)> {
        let h = (xs + self.self_attn.forward(&self.input_layernorm.forward(xs)?, rope, step, cache)?)?;
        self.feed_forward(&h)
    }

    /// [`Self::forward`] for `xs: [N, H]` (the step's tokens, flattened) over a paged cache.
    fn forward_paged(
        &self,
        xs: &Tensor,
        rope: &RotaryEmbedding,
        step: &PagedStep,
        cache: &PagedKvCache,
    ) -> candle_core::Result<(Tensor, Option<(Tensor, Routing)>)> {
        let h = (xs + self.self_attn.forward_paged(&self.input_layernorm.forward(xs)?, rope, step, cache)?)?;
        self.feed_forward(&h)
    }

    /// The second half of the layer: `h + FFN(norm(h))`, for `h` of any rank with the hidden size
    /// last; for an MoE layer also its input `[N, H]` and routing.
    fn feed_forward(&self, h: &Tensor) -> candle_core::Result<(Tensor, Option<(Tensor, Routing)>)> {
        let z = self.post_attention_layernorm.forward(h)?;
        let (ffn, moe) = match &self.ffn {
            FeedForward::Dense(mlp) => (mlp.forward(&z)?, None),
            FeedForward::Moe(moe) => {
                let hidden = z.dim(candle_core::D::Minus1)?;
                let flat = z.reshape(((), hidden))?;
                let (out, routing) = moe.forward(&flat)?;
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
    layers: Vec<KvCache>,
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

    /// Bytes of K/V storage allocated so far, over all layers.
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(KvCache::allocated_bytes).sum()
    }

    /// Forgets every sequence (keeps the allocation).
    pub fn reset(&mut self) {
        self.table.reset();
        self.layers.iter_mut().for_each(KvCache::reset);
    }
}

/// Every layer's paged K/V pool (see [`step3_mfa::PagedKvCache`]); which sequence owns which block
/// is the caller's (the engine's) bookkeeping.
#[derive(Debug, Clone)]
pub struct Step3PagedCache {
    layers: Vec<PagedKvCache>,
}

impl Step3PagedCache {
    pub fn num_blocks(&self) -> usize {
        self.layers.first().map_or(0, PagedKvCache::num_blocks)
    }

    pub fn block_size(&self) -> usize {
        self.layers.first().map_or(0, PagedKvCache::block_size)
    }

    /// Bytes of K/V storage over all layers.
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(PagedKvCache::allocated_bytes).sum()
    }

    /// One layer's pool.
    pub fn layer(&self, i: usize) -> Option<&PagedKvCache> {
        self.layers.get(i)
    }
}

/// The Step3 language model. Weight names are the checkpoint's: `model.embed_tokens`,
/// `model.layers.{i}.*`, `model.norm`, `lm_head`.
#[derive(Debug, Clone)]
pub struct Step3TextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
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
        let m = vb.pp("model");
        let embed = m.pp("embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::new(cfg, l, format, m.pp(format!("layers.{l}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: Embedding::new(embed, cfg.hidden_size),
            layers,
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

    /// Bytes of all weights held in memory (FP8 weights count their compact size).
    pub fn storage_bytes(&self) -> usize {
        step3_nn::tensor_bytes(self.embed_tokens.embeddings())
            + self.layers.iter().map(DecoderLayer::storage_bytes).sum::<usize>()
            + self.norm.storage_bytes()
            + self.lm_head.storage_bytes()
    }

    /// A cache for `batch` sequences of up to `capacity` tokens each (at most
    /// `max_position_embedding`). K/V storage is allocated on the first forward pass.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<Step3Cache> {
        let table = SequenceTable::new(batch, capacity, self.config.max_position_embedding())?;
        let layers = (0..self.layers.len()).map(|_| KvCache::new(capacity)).collect();
        Ok(Step3Cache { table, layers })
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
        let step = cache.table.step(lens, t, &self.rope, self.dtype, &self.device)?;
        let mut run = |cache: &mut Step3Cache| -> Result<Tensor> {
            let mut xs = xs.to_dtype(self.dtype)?;
            for (l, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
                let (out, moe) = layer.forward(&xs, &self.rope, &step, kv)?;
                xs = out;
                if let Some((z, routing)) = moe {
                    observe(l, &z, &routing)?;
                }
            }
            Ok(self.norm.forward(&xs)?)
        };
        match run(cache) {
            Ok(hidden) => {
                cache.table.advance(lens, t);
                Ok(hidden)
            }
            Err(e) => {
                // Leave the cache as it was before the step, so the caller may retry or go on.
                let slots = cache.table.slots();
                cache.layers.iter_mut().for_each(|kv| kv.truncate(slots));
                Err(e)
            }
        }
    }

    /// Bytes one paged block of `block_size` slots takes over all layers (K and V).
    pub fn paged_block_bytes(&self, block_size: usize) -> usize {
        self.layers.len() * PagedKvCache::block_bytes(block_size, self.config.head_dim, self.dtype)
    }

    /// A paged cache of `num_blocks` blocks of `block_size` token slots in every layer (allocated
    /// now, zeroed).
    pub fn new_paged_cache(&self, num_blocks: usize, block_size: usize) -> Result<Step3PagedCache> {
        let layers = (0..self.layers.len())
            .map(|_| PagedKvCache::new(num_blocks, block_size, self.config.head_dim, self.dtype, &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Step3PagedCache { layers })
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
        if xs.dims2()? != (step.num_tokens, self.config.hidden_size) {
            return Err(Error::Input(format!(
                "paged step of {} tokens got embeddings {:?}",
                step.num_tokens,
                xs.dims()
            )));
        }
        let mut xs = xs.to_dtype(self.dtype)?;
        for (l, (layer, kv)) in self.layers.iter().zip(&cache.layers).enumerate() {
            let (out, moe) = layer.forward_paged(&xs, &self.rope, step, kv)?;
            xs = out;
            if let (Some(trace), Some((_, routing))) = (trace.as_deref_mut(), moe) {
                trace.push(LayerRouting { layer: l, routing });
            }
        }
        Ok(self.norm.forward(&xs)?)
    }

    /// The MoE block of decoder layer `layer` (None for dense layers and out-of-range indices).
    pub fn moe_block(&self, layer: usize) -> Option<&MoeBlock> {
        match &self.layers.get(layer)?.ffn {
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
