//! The decode-cost model of the Step3 paper ("Step-3 is Large yet Affordable", arXiv 2507.19427),
//! for any model and accelerator.
//!
//! This crate owns the accounting that motivates attention–FFN disaggregation (AFD): per decoded
//! token, the KV-cache bytes read, the core attention FLOPs, the FLOPs of the linear projections
//! around attention and of the activated FFN ([`ModelSpec`]); accelerator unit costs from price,
//! peak FLOP/s and memory bandwidth ([`Accelerator`]); the cost of attention (the roofline maximum
//! of compute and memory, plus the linear part) and of the FFN per 1M tokens, the cheapest AFD
//! pairing, and the minimum MoE sparsity an accelerator needs (the paper's §5.3–5.4) ([`cost`]).
//! Models come from a Step3-style `config.json` (parsed by `step3-config`, so no tensor library is built) or from built-in
//! presets of the models the paper compares ([`presets`]), each documented with its public source.
//! It does not run models; the AFD runtime that this model will size comes later.
//!
//! Formulas (all per decoded token at context `c`, layer groups `g` of `n_g` identical layers):
//!
//! ```text
//! KV bytes      = Σ_g n_g · min(c, window_g) · kv_elems_g · bytes_per_elem_g
//! attn FLOPs    = Σ_g n_g · min(c, window_g) · heads_g · 2 (QKᵀ, PV) · 2 (mul+add) · d_g
//! linear FLOPs  = 2 · attention projection parameters;   FFN FLOPs = 2 · activated FFN parameters
//! $/FLOP        = price/h ÷ (3600 · peak)   (FP8 peak where supported, else BF16)
//! $/byte        = price/h ÷ (3600 · memory bandwidth)
//! attention $   = max(attn FLOPs · $/FLOP, KV bytes · $/byte) + linear FLOPs · $/FLOP
//! FFN $         = FFN FLOPs · $/FLOP
//! min sparsity  = H · peak · L ÷ (network · bandwidth · 11.1 ms)
//! ```

mod accel;
pub mod cost;
mod model;
pub mod plot;
pub mod presets;

pub use accel::{AccelError, Accelerator};
pub use cost::{CostReport, PairCost};
pub use model::{AttnGroup, AttnKind, ModelSpec};

/// "8K" context of the paper's tables, in tokens.
pub const CTX_8K: usize = 8192;
/// "32K" context of the paper's tables, in tokens.
pub const CTX_32K: usize = 32768;
