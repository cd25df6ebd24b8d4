//! Primitive layers shared by every step3-rs crate.
//!
//! This crate owns the few building blocks that more than one part of Step3 needs and that must
//! behave identically everywhere: [`RmsNorm`] (computed in f32, cast back, then scaled by the gain,
//! exactly like StepFun's reference), [`silu`] (rounded once in half precision, as PyTorch does), [`Weight`] (a weight matrix or a stack of expert matrices,
//! dense or block-FP8 with per-128×128-block scales, dequantised on use or read in place by the
//! skinny CPU products of [`cpu`]: AVX2 with AVX512-BF16 where present, NEON or scalar), and [`Linear`] (a
//! `[out, in]` weight applied as `x · Wᵀ`). Weight formats are handled here and nowhere else. It
//! owns no model structure, no configuration and no file handling: callers hand it a
//! [`candle_nn::VarBuilder`] positioned at the layer and a [`WeightFormat`].

mod act;
pub mod cpu;
mod linear;
mod norm;
mod weight;

pub use act::{silu, silu_f32};
pub use linear::Linear;
pub use norm::RmsNorm;
pub use weight::{tensor_bytes, BlockFp8, Weight, WeightFormat};
