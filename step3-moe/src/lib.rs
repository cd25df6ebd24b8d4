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

pub use experts::StackedExperts;
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
    shared_expert: SwiGluMlp,
}

impl MoeBlock {
    pub fn new(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        let moe = vb.pp("moe");
        Ok(Self {
            router: Router::new(cfg, moe.pp("gate"))?,
            experts: StackedExperts::new(cfg, moe)?,
            shared_expert: SwiGluMlp::new(
                cfg.hidden_size,
                cfg.share_expert_dim,
                cfg.weight_format,
                vb.pp("share_expert"),
            )?,
        })
    }

    /// Bytes of all weights held in memory.
    pub fn storage_bytes(&self) -> usize {
        self.router.storage_bytes() + self.experts.storage_bytes() + self.shared_expert.storage_bytes()
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// `xs: [N, H]` → (`[N, H]`, the routing used).
    pub fn forward(&self, xs: &Tensor) -> Result<(Tensor, Routing)> {
        let routing = self.router.route(xs)?;
        let routed = self.experts.forward(xs, &routing)?;
        let shared = self.shared_expert.forward(xs)?;
        Ok(((routed + shared)?, routing))
    }
}
