//! Primitive layers shared by every step3-rs crate.
//!
//! This crate owns the few building blocks that more than one part of Step3 needs and that must
//! behave identically everywhere: [`RmsNorm`] (computed in f32, cast back, then scaled by the gain,
//! exactly like StepFun's reference) and [`Linear`] (a `[out, in]` weight applied as `x · Wᵀ`, the
//! one place where weight formats are handled). It owns no model structure, no configuration
//! and no file handling: callers hand it a [`candle_nn::VarBuilder`] positioned at the layer.

mod linear;
mod norm;

pub use linear::Linear;
pub use norm::RmsNorm;
