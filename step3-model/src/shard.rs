//! How a Step3 model is split across ranks: which slice of each checkpoint tensor a rank reads,
//! where its routed experts live, and the checks that reject a layout before anything is loaded.
//!
//! The split (the structure of vLLM's Step3 model, written from the architecture):
//! - attention: `wq` by query heads (rows), `o_proj` by the matching input columns, then one
//!   all-reduce over the TP group; `q_proj`, `inter_norm`, the single K/V head (`k_proj`,
//!   `v_proj`) and its cache are replicated;
//! - dense FFN (`mlp`) and shared expert (`share_expert`): `gate_proj`/`up_proj` by rows (output
//!   columns), `down_proj` by input columns, one all-reduce;
//! - routed experts: by expert over the EP index (rank holds `E / ep` consecutive experts) and by
//!   intermediate columns over the TP index, exactly like the shared expert; the router is
//!   replicated. The shared expert is held and computed by EP index 0 only; its partial output
//!   joins the routed experts' in one all-reduce over the whole world. Two all-reduces per layer;
//! - norms replicated; embedding, final norm and `lm_head` on the first rank's device only (the
//!   hidden state after the last all-reduce is the same on every rank).
//!
//! World = `tp × ep` ranks; rank `r` has EP index `r / tp` and TP index `r % tp`. With `ep > 1`
//! each EP index runs its own copy of the attention (TP-split within it), so `ep` multiplies the
//! memory of the non-expert weights but divides the experts'.

use step3_config::TextConfig;
pub use step3_dist::{Layout, LayoutError};

/// Where the routed experts of the MoE layers live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertPlacement {
    /// With the rest of the rank, on its device.
    #[default]
    Device,
    /// Every MoE layer's routed experts in host memory, computed on the CPU (`--moe-device cpu`).
    Host,
    /// The routed experts of the first `k` MoE layers in host memory (`--n-cpu-moe k`).
    HostFirst(usize),
}

impl ExpertPlacement {
    /// Whether the routed experts of the `index`-th MoE layer (counting MoE layers only, from 0)
    /// live in host memory.
    pub fn on_host(&self, index: usize) -> bool {
        match *self {
            Self::Device => false,
            Self::Host => true,
            Self::HostFirst(k) => index < k,
        }
    }
}

/// One rank's coordinates in a [`Layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankPlan {
    pub tp: usize,
    pub tp_rank: usize,
    pub ep: usize,
    pub ep_rank: usize,
}

impl RankPlan {
    pub fn new(layout: &Layout, rank: usize) -> Self {
        let (ep_rank, tp_rank) = layout.coords(rank);
        Self { tp: layout.tp, tp_rank, ep: layout.ep, ep_rank }
    }

    /// The whole model on one rank.
    pub fn single() -> Self {
        Self { tp: 1, tp_rank: 0, ep: 1, ep_rank: 0 }
    }

    /// Whether this rank holds and computes the shared experts.
    pub fn holds_shared_expert(&self) -> bool {
        self.ep_rank == 0
    }

    /// The splits `(dimension, index, parts)` of weight `name` for this rank; empty when the
    /// rank holds the whole tensor.
    pub fn splits(&self, name: &str) -> Vec<(usize, usize, usize)> {
        let Some(rest) = name.strip_prefix("model.layers.") else { return Vec::new() };
        let Some((_, param)) = rest.split_once('.') else { return Vec::new() };
        let tp = |dim| (dim, self.tp_rank, self.tp);
        let ep = (0, self.ep_rank, self.ep);
        let splits = match param {
            "self_attn.wq.weight" => vec![tp(0)],
            "self_attn.o_proj.weight" => vec![tp(1)],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![tp(0)],
            "share_expert.gate_proj.weight" | "share_expert.up_proj.weight" => vec![tp(0)],
            "mlp.down_proj.weight" | "share_expert.down_proj.weight" => vec![tp(1)],
            "moe.gate_proj.weight" | "moe.up_proj.weight" => vec![ep, tp(1)],
            "moe.down_proj.weight" => vec![ep, tp(2)],
            _ => Vec::new(),
        };
        splits.into_iter().filter(|&(_, _, parts)| parts > 1).collect()
    }

    /// The region `(start, len)` per dimension of tensor `name` (shape `shape`) this rank reads,
    /// or `None` for the whole tensor. A block-FP8 scale (`<weight>_scale_inv` / `_scale`,
    /// `weight_shape` the weight's) follows its weight's split in units of `block`; a split that
    /// would cut a block is an error naming the tensor.
    pub fn region(
        &self,
        name: &str,
        shape: &[usize],
        scale_of: Option<(&[usize], [usize; 2])>,
    ) -> Result<Option<Vec<(usize, usize)>>, LayoutError> {
        let weight = name.strip_suffix("_scale_inv").or_else(|| name.strip_suffix("_scale")).unwrap_or(name);
        let splits = self.splits(weight);
        if splits.is_empty() {
            return Ok(None);
        }
        let mut region: Vec<(usize, usize)> = shape.iter().map(|&d| (0, d)).collect();
        for (dim, index, parts) in splits {
            let Some(&size) = shape.get(dim) else {
                // A shape mismatch the loader reports with the expected shape.
                return Ok(None);
            };
            match (weight != name, scale_of) {
                (true, Some((wshape, block))) if dim + 2 >= wshape.len() => {
                    let b = block[dim + 2 - wshape.len()];
                    let full = wshape[dim];
                    let piece = full / parts;
                    if full % parts != 0 || piece % b != 0 {
                        return Err(LayoutError::CutsFp8Blocks {
                            tensor: weight.to_string(),
                            what: format!("dimension {dim} of"),
                            size: full,
                            parts,
                            piece,
                            block: b,
                        });
                    }
                    region[dim] = (index * piece / b, piece / b);
                }
                _ => {
                    if size % parts != 0 {
                        return Err(LayoutError::NotDivisible {
                            what: format!("dimension {dim} of {name}"),
                            size,
                            flag: if (dim, parts) == (0, self.ep) && weight.contains(".moe.") { "ep" } else { "tp" },
                            parts,
                        });
                    }
                    region[dim] = (index * size / parts, size / parts);
                }
            }
        }
        Ok(Some(region))
    }
}

/// Checks that `layout` can split a model of `cfg` (block-FP8 with `fp8_block`, if given) before
/// anything is loaded: TP divides the heads and every split width, EP divides the experts, and
/// no FP8 slice cuts a scale block.
pub fn check_layout(cfg: &TextConfig, layout: &Layout, fp8_block: Option<[usize; 2]>) -> Result<(), LayoutError> {
    let (tp, ep) = (layout.tp, layout.ep);
    let layers = 0..cfg.num_hidden_layers;
    let dense = layers.clone().find(|&l| !cfg.is_moe_layer(l));
    let moe = layers.clone().find(|&l| cfg.is_moe_layer(l));
    Layout::check_divides("num_attention_heads", cfg.num_attention_heads, "tp", tp)?;
    // (tensor, split dimension, its size, parts) for the first layer of each kind.
    let heads = cfg.num_attention_heads * cfg.head_dim;
    let mut splits = Vec::new();
    if let Some(l) = layers.clone().next() {
        splits.push((format!("model.layers.{l}.self_attn.wq.weight"), 0, 2, heads, tp));
        splits.push((format!("model.layers.{l}.self_attn.o_proj.weight"), 1, 2, heads, tp));
    }
    if let Some(l) = dense {
        Layout::check_divides("intermediate_size", cfg.intermediate_size, "tp", tp)?;
        splits.push((format!("model.layers.{l}.mlp.gate_proj.weight"), 0, 2, cfg.intermediate_size, tp));
        splits.push((format!("model.layers.{l}.mlp.down_proj.weight"), 1, 2, cfg.intermediate_size, tp));
    }
    if let Some(l) = moe {
        Layout::check_divides("share_expert_dim", cfg.share_expert_dim, "tp", tp)?;
        Layout::check_divides("moe_intermediate_size", cfg.moe_intermediate_size, "tp", tp)?;
        Layout::check_divides("moe_num_experts", cfg.moe_num_experts, "ep", ep)?;
        splits.push((format!("model.layers.{l}.share_expert.gate_proj.weight"), 0, 2, cfg.share_expert_dim, tp));
        splits.push((format!("model.layers.{l}.share_expert.down_proj.weight"), 1, 2, cfg.share_expert_dim, tp));
        splits.push((format!("model.layers.{l}.moe.gate_proj.weight"), 1, 3, cfg.moe_intermediate_size, tp));
        splits.push((format!("model.layers.{l}.moe.down_proj.weight"), 2, 3, cfg.moe_intermediate_size, tp));
    }
    if let Some(block) = fp8_block {
        for (tensor, dim, rank, size, parts) in splits {
            if parts == 1 {
                continue;
            }
            let b = block[dim + 2 - rank];
            let piece = size / parts;
            if piece % b != 0 {
                return Err(LayoutError::CutsFp8Blocks {
                    tensor,
                    what: format!("dimension {dim} of"),
                    size,
                    parts,
                    piece,
                    block: b,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_follow_the_table() {
        let p = RankPlan { tp: 2, tp_rank: 1, ep: 4, ep_rank: 3 };
        assert_eq!(p.splits("model.layers.7.self_attn.wq.weight"), vec![(0, 1, 2)]);
        assert_eq!(p.splits("model.layers.7.self_attn.o_proj.weight"), vec![(1, 1, 2)]);
        assert_eq!(p.splits("model.layers.7.self_attn.k_proj.weight"), vec![]);
        assert_eq!(p.splits("model.layers.7.moe.gate.weight"), vec![]);
        assert_eq!(p.splits("model.layers.7.moe.down_proj.weight"), vec![(0, 3, 4), (2, 1, 2)]);
        assert_eq!(p.splits("model.embed_tokens.weight"), vec![]);
        assert_eq!(
            p.region("model.layers.7.moe.up_proj.weight", &[8, 6, 5], None).unwrap(),
            Some(vec![(6, 2), (3, 3), (0, 5)])
        );
        // Scales follow their weight in block units; the expert dimension in experts.
        let scale = p
            .region("model.layers.7.moe.up_proj.weight_scale_inv", &[8, 2, 1], Some((&[8, 256, 100], [128, 128])))
            .unwrap();
        assert_eq!(scale, Some(vec![(6, 2), (1, 1), (0, 1)]));
        let err = p
            .region("model.layers.7.moe.up_proj.weight_scale_inv", &[8, 2, 1], Some((&[8, 192, 100], [128, 128])))
            .unwrap_err();
        assert!(err.to_string().contains("model.layers.7.moe.up_proj.weight"), "{err}");
        assert!(err.to_string().contains("128"), "{err}");
    }
}

/// What one rank of a layout holds, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct RankMemory {
    /// Weights on the rank's device.
    pub device_weights: u64,
    /// Routed experts the rank keeps in host memory.
    pub host_weights: u64,
    /// K and V of one token over all layers (each rank keeps its own copy of the single K/V head).
    pub kv_bytes_per_token: u64,
}

/// The language-model memory of every rank of `layout` with `placement`, from the config alone:
/// each tensor's slice (as the loader would read it) at `dtype_bytes` per value, or for linear
/// weights stored block-FP8 (`fp8_block` given) one byte per value plus an f32 scale per block.
/// The embedding, final norm and `lm_head` count on rank 0. Call [`check_layout`] first.
pub fn memory_plan(
    cfg: &TextConfig,
    layout: &Layout,
    placement: ExpertPlacement,
    dtype_bytes: usize,
    fp8_block: Option<[usize; 2]>,
) -> Vec<RankMemory> {
    let moe_index = |layer: usize| (0..layer).filter(|&l| cfg.is_moe_layer(l)).count();
    let kv = crate::kv_bytes_per_token(cfg, dtype_bytes) as u64;
    (0..layout.world())
        .map(|rank| {
            let plan = RankPlan::new(layout, rank);
            let mut m = RankMemory { kv_bytes_per_token: kv, ..Default::default() };
            for t in crate::inventory::text_tensors(cfg) {
                let layer =
                    t.name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()?.parse::<usize>().ok());
                if layer.is_none() && rank != 0 {
                    continue;
                }
                if t.name.contains(".share_expert.") && !plan.holds_shared_expert() {
                    continue;
                }
                let dims: Vec<usize> = match plan.region(&t.name, &t.shape, None) {
                    Ok(Some(region)) => region.iter().map(|r| r.1).collect(),
                    _ => t.shape.clone(),
                };
                let numel: usize = dims.iter().product();
                let bytes = match fp8_block {
                    Some([b0, b1]) if t.quantizable => {
                        let n = dims.len();
                        let lead: usize = dims[..n - 2].iter().product();
                        numel + 4 * lead * dims[n - 2].div_ceil(b0) * dims[n - 1].div_ceil(b1)
                    }
                    _ => numel * dtype_bytes,
                } as u64;
                let routed = [".moe.gate_proj.", ".moe.up_proj.", ".moe.down_proj."].iter().any(|k| t.name.contains(k));
                match layer {
                    Some(l) if routed && placement.on_host(moe_index(l)) => m.host_weights += bytes,
                    _ => m.device_weights += bytes,
                }
            }
            m
        })
        .collect()
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    fn real() -> TextConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/step3/config.json");
        step3_config::Step3Config::from_file(path).unwrap().text
    }

    #[test]
    fn the_real_checkpoint_splits_as_deployed() {
        let cfg = real();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        // Whole model: about 642 GB in bf16 and 326 GB in FP8 (language model; the vision tower
        // adds a few GB).
        let one = Layout::single();
        let bf16 = memory_plan(&cfg, &one, ExpertPlacement::Device, 2, None)[0].device_weights as f64;
        let fp8 = memory_plan(&cfg, &one, ExpertPlacement::Device, 2, Some([128, 128]))[0].device_weights as f64;
        assert!((620e9..650e9).contains(&bf16), "{bf16}");
        assert!((310e9..330e9).contains(&fp8), "{fp8}");
        // FP8 on 8 GPUs with TP 8: every split keeps whole 128×128 blocks, ~40 GiB per rank.
        let tp8 = Layout::new(8, 1, None).unwrap();
        check_layout(&cfg, &tp8, Some([128, 128])).unwrap();
        let plan = memory_plan(&cfg, &tp8, ExpertPlacement::Device, 2, Some([128, 128]));
        let total: u64 = plan.iter().map(|m| m.device_weights).sum();
        assert!(plan.iter().all(|m| gib(m.device_weights) < 45.0), "{plan:?}");
        assert!((total as f64) < fp8 * 1.01 + 8.0 * 2.0 * 128815.0 * 7168.0, "{total}");
        // bf16 on 16 GPUs (TP 8 × EP 2); FP8 with TP 16 would cut the shared expert's blocks.
        let l16 = Layout::new(8, 2, None).unwrap();
        check_layout(&cfg, &l16, None).unwrap();
        let plan = memory_plan(&cfg, &l16, ExpertPlacement::Device, 2, None);
        assert!(plan.iter().all(|m| gib(m.device_weights) < 45.0), "{plan:?}");
        let err = check_layout(&cfg, &Layout::new(16, 1, None).unwrap(), Some([128, 128])).unwrap_err();
        assert!(err.to_string().contains("share_expert"), "{err}");
        // One GPU, routed experts in host memory: the GPU keeps attention, dense and shared parts.
        let host = memory_plan(&cfg, &one, ExpertPlacement::Host, 2, Some([128, 128]))[0];
        assert!(gib(host.device_weights) < 25.0 && gib(host.host_weights) > 250.0, "{host:?}");
        assert_eq!(host.device_weights + host.host_weights, fp8 as u64);
    }
}
