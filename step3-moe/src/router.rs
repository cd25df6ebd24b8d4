use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use step3_nn::{Linear, WeightFormat};

use crate::MoeConfig;

/// The experts chosen for each token and the weights applied to their outputs.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `[N, k]` u32, per token sorted by descending router probability.
    pub ids: Tensor,
    /// `[N, k]` f32, the weights actually applied (renormalised only if the config says so).
    pub weights: Tensor,
}

/// Softmax router: `p = softmax(x · Wᵀ)` over all experts in f32, top-k by probability, the
/// selected probabilities used as weights (divided by their sum only when `norm_expert_weight`).
/// No bias, no scaling factor, no grouped routing.
#[derive(Debug, Clone)]
pub struct Router {
    gate: Linear,
    top_k: usize,
    renormalize: bool,
}

impl Router {
    /// Loads `weight [E, H]` from `vb` (`model.layers.{i}.moe.gate`).
    pub fn new(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.top_k == 0 || cfg.top_k > cfg.num_experts {
            candle_core::bail!("moe_top_k = {} must be in 1..={} (moe_num_experts)", cfg.top_k, cfg.num_experts)
        }
        Ok(Self {
            gate: Linear::new(cfg.hidden_size, cfg.num_experts, false, WeightFormat::Dense, vb)?,
            top_k: cfg.top_k,
            renormalize: cfg.norm_expert_weight,
        })
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Bytes of the router weight.
    pub fn storage_bytes(&self) -> usize {
        self.gate.storage_bytes()
    }

    /// `xs: [N, H]` → the routing of each of the `N` tokens.
    pub fn route(&self, xs: &Tensor) -> Result<Routing> {
        let logits = self.gate.forward(xs)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let ids = probs.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, self.top_k)?.contiguous()?;
        let mut weights = probs.gather(&ids, D::Minus1)?;
        if self.renormalize {
            weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
        }
        Ok(Routing { ids, weights })
    }
}
