//! Step3's feed-forward blocks.
//!
//! This crate owns the dense SwiGLU MLP ([`SwiGluMlp`], layers 0–3 and 60 of Step3 and the shared
//! expert), the softmax router with top-k selection and optional renormalisation ([`Router`]), the
//! routed experts stored stacked as `[E, out, in]` tensors exactly as in the checkpoint
//! ([`StackedExperts`]), and the MoE block that adds the always-on shared expert ([`MoeBlock`]).
//! It does not own attention, configuration files or checkpoint discovery: the model crate hands
//! it a [`MoeConfig`] and a [`candle_nn::VarBuilder`] positioned at `model.layers.{i}`.
//!
//! Routed experts are computed by grouping the tokens routed to each expert: one matmul per
//! active expert and projection, never a loop over tokens. The routing decision of every
//! forward pass is returned as a [`Routing`] so tests and diagnostics can inspect it.

mod experts;
mod mlp;
mod router;

pub use experts::{ExpertSlice, StackedExperts};
pub use mlp::SwiGluMlp;
pub use router::{Router, Routing};

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use step3_nn::WeightFormat;

/// Sizes of one MoE block (a slice of the model's text config).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub hidden_size: usize,
    /// Routed experts (`moe_num_experts`, 48 for Step3).
    pub num_experts: usize,
    /// Experts per token (`moe_top_k`, 3).
    pub top_k: usize,
    /// Width of each routed expert (`moe_intermediate_size`, 5120).
    pub moe_intermediate_size: usize,
    /// Width of the shared expert (`share_expert_dim`, 5120).
    pub share_expert_dim: usize,
    /// Divide the selected probabilities by their sum (`norm_expert_weight`; false for Step3).
    pub norm_expert_weight: bool,
    /// How expert and shared-expert weights are stored (dense or block-FP8). The router is
    /// always dense.
    pub weight_format: WeightFormat,
}

/// A Step3 MoE feed-forward block: `Σ_top-k w_e · Expert_e(x) + SharedExpert(x)`.
///
/// Checkpoint names under `model.layers.{i}`: `moe.gate.weight [E, H]` (router),
/// `moe.{gate,up}_proj.weight [E, I, H]`, `moe.down_proj.weight [E, H, I]`,
/// `share_expert.{gate,up,down}_proj.weight`.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    router: Router,
    experts: StackedExperts,
    shared_expert: Option<SwiGluMlp>,
}

/// The part of an MoE block one rank of a sharded model holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShard {
    /// The routed experts held.
    pub experts: ExpertSlice,
    /// Columns of the shared expert held (`share_expert_dim / tp`), or `None` when another
    /// rank computes the shared expert.
    pub shared_expert_dim: Option<usize>,
}

impl MoeShard {
    /// The whole block.
    pub fn whole(cfg: &MoeConfig) -> Self {
        Self {
            experts: ExpertSlice {
                first_expert: 0,
                num_experts: cfg.num_experts,
                intermediate_size: cfg.moe_intermediate_size,
            },
            shared_expert_dim: Some(cfg.share_expert_dim),
        }
    }
}

impl MoeBlock {
    pub fn new(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_shard(cfg, &MoeShard::whole(cfg), vb.clone(), vb.pp("moe"))
    }

    /// The part `shard` of the block: router (always whole) and shared expert from `vb`
    /// (`model.layers.{i}`), routed experts from `experts_vb` (`model.layers.{i}.moe`, possibly
    /// on another device: see [`StackedExperts`]). The builders must hand out the shard's slices.
    /// The output is then this rank's partial sum of the block's output.
    pub fn new_shard(cfg: &MoeConfig, shard: &MoeShard, vb: VarBuilder, experts_vb: VarBuilder) -> Result<Self> {
        let shared_expert = match shard.shared_expert_dim {
            Some(dim) => Some(SwiGluMlp::new(cfg.hidden_size, dim, cfg.weight_format, vb.pp("share_expert"))?),
            None => None,
        };
        Ok(Self {
            router: Router::new(cfg, vb.pp("moe").pp("gate"))?,
            experts: StackedExperts::new_slice(cfg, shard.experts, experts_vb)?,
            shared_expert,
        })
    }

    /// Bytes of all weights held in memory.
    pub fn storage_bytes(&self) -> usize {
        self.router.storage_bytes()
            + self.experts.storage_bytes()
            + self.shared_expert.as_ref().map_or(0, SwiGluMlp::storage_bytes)
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn experts(&self) -> &StackedExperts {
        &self.experts
    }

    /// The shared expert (`None` on a rank that leaves it to another).
    pub fn shared_expert(&self) -> Option<&SwiGluMlp> {
        self.shared_expert.as_ref()
    }

    /// `xs: [N, H]` → (`[N, H]`, the routing used).
    pub fn forward(&self, xs: &Tensor) -> Result<(Tensor, Routing)> {
        let routing = self.router.route(xs)?;
        let routed = self.experts.forward(xs, &routing)?;
        let out = match &self.shared_expert {
            Some(shared) => (routed + shared.forward(xs)?)?,
            None => routed,
        };
        Ok((out, routing))
    }
}

#[cfg(test)]
mod tests {
    //! The block against a naive per-token reference written out in f64: softmax over every
    //! expert, a stable descending sort, the first `k` probabilities as weights, each chosen
    //! expert's SwiGLU evaluated on its own, plus the shared expert.
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::*;

    fn det(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| ((((i + seed) * 2654435761) % 1000) as f32 / 1000.0 - 0.5) * scale).collect()
    }

    struct Case {
        cfg: MoeConfig,
        tensors: HashMap<String, Tensor>,
        host: HashMap<String, Vec<f32>>,
    }

    fn case(e: usize, k: usize, h: usize, i: usize, s: usize, renorm: bool) -> candle_core::Result<Case> {
        let cfg = MoeConfig {
            hidden_size: h,
            num_experts: e,
            top_k: k,
            moe_intermediate_size: i,
            share_expert_dim: s,
            norm_expert_weight: renorm,
            weight_format: WeightFormat::Dense,
        };
        let shapes: [(&str, Vec<usize>); 7] = [
            ("moe.gate.weight", vec![e, h]),
            ("moe.gate_proj.weight", vec![e, i, h]),
            ("moe.up_proj.weight", vec![e, i, h]),
            ("moe.down_proj.weight", vec![e, h, i]),
            ("share_expert.gate_proj.weight", vec![s, h]),
            ("share_expert.up_proj.weight", vec![s, h]),
            ("share_expert.down_proj.weight", vec![h, s]),
        ];
        let (mut tensors, mut host) = (HashMap::new(), HashMap::new());
        for (seed, (name, dims)) in shapes.into_iter().enumerate() {
            let scale = if name == "moe.gate.weight" { 4.0 } else { 1.0 };
            let v = det(dims.iter().product(), 97 * seed + 13, scale);
            tensors.insert(name.to_string(), Tensor::from_vec(v.clone(), dims, &Device::Cpu)?);
            host.insert(name.to_string(), v);
        }
        Ok(Case { cfg, tensors, host })
    }

    /// `y = W_down · (silu(W_gate x) ⊙ W_up x)` with `W_gate, W_up: [i, h]`, `W_down: [h, i]`.
    fn swiglu(x: &[f64], gate: &[f32], up: &[f32], down: &[f32], i: usize) -> Vec<f64> {
        let h = x.len();
        let dot = |w: &[f32], r: usize| (0..h).map(|c| w[r * h + c] as f64 * x[c]).sum::<f64>();
        let act: Vec<f64> = (0..i)
            .map(|r| {
                let g = dot(gate, r);
                g / (1.0 + (-g).exp()) * dot(up, r)
            })
            .collect();
        (0..h).map(|o| (0..i).map(|r| down[o * i + r] as f64 * act[r]).sum()).collect()
    }

    fn reference(c: &Case, x: &[f64]) -> (Vec<u32>, Vec<f64>, Vec<f64>) {
        let MoeConfig { hidden_size: h, num_experts: e, top_k: k, moe_intermediate_size: i, .. } = c.cfg;
        let s = c.cfg.share_expert_dim;
        let router = &c.host["moe.gate.weight"];
        let logits: Vec<f64> = (0..e).map(|r| (0..h).map(|j| router[r * h + j] as f64 * x[j]).sum()).collect();
        let m = logits.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
        let probs: Vec<f64> = logits.iter().map(|l| (l - m).exp() / z).collect();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]));
        let ids: Vec<u32> = order[..k].iter().map(|&x| x as u32).collect();
        let mut w: Vec<f64> = order[..k].iter().map(|&x| probs[x]).collect();
        if c.cfg.norm_expert_weight {
            let sum: f64 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= sum);
        }
        let mut y = swiglu(
            x,
            &c.host["share_expert.gate_proj.weight"],
            &c.host["share_expert.up_proj.weight"],
            &c.host["share_expert.down_proj.weight"],
            s,
        );
        for (&id, &wj) in ids.iter().zip(&w) {
            let id = id as usize;
            let slice = |name: &str, len: usize| c.host[name][id * len..(id + 1) * len].to_vec();
            let out = swiglu(
                x,
                &slice("moe.gate_proj.weight", i * h),
                &slice("moe.up_proj.weight", i * h),
                &slice("moe.down_proj.weight", h * i),
                i,
            );
            y.iter_mut().zip(out).for_each(|(a, b)| *a += wj * b);
        }
        (ids, w, y)
    }

    fn check(e: usize, k: usize, n: usize, renorm: bool) -> candle_core::Result<()> {
        let (h, i, s) = (12, 10, 6);
        let c = case(e, k, h, i, s, renorm)?;
        let vb = VarBuilder::from_tensors(c.tensors.clone(), DType::F32, &Device::Cpu);
        let block = MoeBlock::new(&c.cfg, vb)?;
        let xv = det(n * h, 7, 2.0);
        let xs = Tensor::from_vec(xv.clone(), (n, h), &Device::Cpu)?;
        let (ys, routing) = block.forward(&xs)?;
        assert_eq!(ys.dims(), &[n, h]);
        let ys = ys.to_vec2::<f32>()?;
        let ids = routing.ids.to_vec2::<u32>()?;
        let ws = routing.weights.to_vec2::<f32>()?;
        for t in 0..n {
            let x: Vec<f64> = xv[t * h..(t + 1) * h].iter().map(|v| *v as f64).collect();
            let (want_ids, want_w, want_y) = reference(&c, &x);
            assert_eq!(ids[t], want_ids, "token {t}: experts");
            // A probability's relative error is about twice its logits' absolute error, and f32
            // logits carry up to `(h + 2)·ε·Σ|w·x|` from their summation (whose order the
            // CPU kernel and candle's GEMM choose differently).
            let router = &c.host["moe.gate.weight"];
            let spread = (0..c.cfg.num_experts)
                .map(|r| (0..h).map(|j| (router[r * h + j] as f64 * x[j]).abs()).sum::<f64>())
                .fold(0.0, f64::max);
            let logit_err = 2.0 * (h + 2) as f64 * f32::EPSILON as f64 * spread;
            for (got, want) in ws[t].iter().zip(&want_w) {
                let tol = (1e-6 + logit_err) * want.abs().max(1e-3);
                assert!((*got as f64 - want).abs() <= tol, "token {t}: {got} vs {want}");
            }
            let scale = want_y.iter().map(|v| v.abs()).fold(0.0, f64::max);
            for (o, (got, want)) in ys[t].iter().zip(&want_y).enumerate() {
                assert!((*got as f64 - want).abs() <= 1e-5 * scale, "token {t} out {o}: {got} vs {want}");
            }
        }
        Ok(())
    }

    #[test]
    fn matches_the_naive_reference_without_renormalisation() -> candle_core::Result<()> {
        check(8, 3, 11, false)
    }

    #[test]
    fn matches_the_naive_reference_with_renormalisation_and_other_sizes() -> candle_core::Result<()> {
        check(5, 2, 4, true)?;
        check(4, 1, 1, false)?;
        check(6, 6, 3, true)
    }

    /// Expert-parallel and tensor-parallel slices of a block: the partial outputs of every slice
    /// add up to the whole block's output, and the path that moves the routed rows to the
    /// experts' device (and back) computes the same thing as the direct one.
    #[test]
    fn slices_of_the_experts_sum_to_the_whole_block() -> candle_core::Result<()> {
        let (e, k, h, i, s, n) = (6, 2, 12, 10, 6, 9);
        let c = case(e, k, h, i, s, false)?;
        let whole = MoeBlock::new(&c.cfg, VarBuilder::from_tensors(c.tensors.clone(), DType::F32, &Device::Cpu))?;
        let xs = Tensor::from_vec(det(n * h, 5, 2.0), (n, h), &Device::Cpu)?;
        let (want, routing) = whole.forward(&xs)?;
        let direct = whole.experts().forward_grouped(&xs, &routing)?;
        let moved = whole.experts().forward_elsewhere(&xs, &routing)?;
        let diff = (direct - moved)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        // EP 3 × TP 2: experts {0,1}, {2,3}, {4,5}; columns {0..5}, {5..10} of each expert and of
        // the shared expert (held by the first EP slice only).
        let (ep, tp) = (3, 2);
        let mut total = Tensor::zeros((n, h), DType::F32, &Device::Cpu)?;
        for r in 0..ep {
            for t in 0..tp {
                let mut m = HashMap::new();
                let cols = |x: &Tensor, dim: usize| {
                    let len = x.dim(dim)? / tp;
                    x.narrow(dim, t * len, len)
                };
                let rows = |x: &Tensor| x.narrow(0, r * e / ep, e / ep).unwrap();
                m.insert("moe.gate.weight".to_string(), c.tensors["moe.gate.weight"].clone());
                m.insert("moe.gate_proj.weight".to_string(), cols(&rows(&c.tensors["moe.gate_proj.weight"]), 1)?);
                m.insert("moe.up_proj.weight".to_string(), cols(&rows(&c.tensors["moe.up_proj.weight"]), 1)?);
                m.insert("moe.down_proj.weight".to_string(), cols(&rows(&c.tensors["moe.down_proj.weight"]), 2)?);
                for p in ["gate_proj", "up_proj"] {
                    let w = &c.tensors[&format!("share_expert.{p}.weight")];
                    m.insert(format!("share_expert.{p}.weight"), cols(w, 0)?);
                }
                m.insert("share_expert.down_proj.weight".into(), cols(&c.tensors["share_expert.down_proj.weight"], 1)?);
                let shard = MoeShard {
                    experts: ExpertSlice { first_expert: r * e / ep, num_experts: e / ep, intermediate_size: i / tp },
                    shared_expert_dim: (r == 0).then_some(s / tp),
                };
                let vb = VarBuilder::from_tensors(m, DType::F32, &Device::Cpu);
                let block = MoeBlock::new_shard(&c.cfg, &shard, vb.clone(), vb.pp("moe"))?;
                assert_eq!(block.shared_expert().is_some(), r == 0);
                let (part, _) = block.forward(&xs)?;
                total = (total + part)?;
            }
        }
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (total - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-6 * scale, "{diff} vs {scale}");
        Ok(())
    }

    /// The CPU kernels' path gives the grouped path's output bit for bit in every CPU compute
    /// dtype, for batches from one token to more than an expert can take there (then it declines
    /// and the grouped path runs).
    #[test]
    fn the_cpu_path_is_the_grouped_path_bit_for_bit() -> candle_core::Result<()> {
        let (e, k, h, i, s) = (8, 3, 40, 24, 8);
        let c = case(e, k, h, i, s, false)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let block = MoeBlock::new(&c.cfg, VarBuilder::from_tensors(c.tensors.clone(), dtype, &Device::Cpu))?;
            for n in [1, 2, 5, 16, 60] {
                let xs = Tensor::from_vec(det(n * h, 7 + n, 3.0), (n, h), &Device::Cpu)?.to_dtype(dtype)?;
                let routing = block.router().route(&xs)?;
                let cpu = block.experts().forward_cpu(&xs, &routing)?;
                let over = block.experts().groups(&routing)?.tokens.iter().any(|t| t.len() > step3_nn::cpu::MAX_ROWS);
                assert_eq!(cpu.is_none(), over, "{dtype:?} n={n}");
                let Some(cpu) = cpu else { continue };
                let want = block.experts().forward_grouped(&xs, &routing)?;
                assert_eq!(cpu.dtype(), dtype);
                let (a, b) = (cpu.to_dtype(DType::F32)?.flatten_all()?, want.to_dtype(DType::F32)?.flatten_all()?);
                let (a, b) = (a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
                assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{dtype:?} n={n}");
                assert!(a.iter().any(|v| *v != 0.0));
            }
        }
        Ok(())
    }

    #[test]
    fn renormalised_weights_sum_to_one() -> candle_core::Result<()> {
        let c = case(7, 3, 12, 10, 6, true)?;
        let vb = VarBuilder::from_tensors(c.tensors, DType::F32, &Device::Cpu);
        let router = Router::new(&c.cfg, vb.pp("moe.gate"))?;
        let xs = Tensor::from_vec(det(5 * 12, 3, 2.0), (5, 12), &Device::Cpu)?;
        for row in router.route(&xs)?.weights.to_vec2::<f32>()? {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
            assert!(row.windows(2).all(|w| w[0] >= w[1]), "not descending: {row:?}");
        }
        Ok(())
    }

    #[test]
    fn invalid_top_k_and_bad_shapes_are_errors() -> candle_core::Result<()> {
        let mut c = case(4, 2, 12, 10, 6, false)?;
        for k in [0, 5] {
            c.cfg.top_k = k;
            let vb = VarBuilder::from_tensors(c.tensors.clone(), DType::F32, &Device::Cpu);
            let err = MoeBlock::new(&c.cfg, vb).expect_err("top_k out of range").to_string();
            assert!(err.contains("moe_top_k"), "{err}");
        }
        c.cfg.top_k = 2;
        c.cfg.moe_intermediate_size = 9; // the checkpoint says 10
        let vb = VarBuilder::from_tensors(c.tensors.clone(), DType::F32, &Device::Cpu);
        let err = MoeBlock::new(&c.cfg, vb).expect_err("shape mismatch").to_string();
        assert!(err.contains("gate_proj") || err.contains("shape"), "{err}");
        Ok(())
    }
}
