//! step3-rs: pure-Rust inference for StepFun's Step3 on candle.
//!
//! This facade re-exports what users of the library need; the model math lives in the workspace
//! crates ([`step3_model`], `step3-mfa`, `step3-moe`, `step3-nn`). It also carries [`verify`], the
//! golden-fixture checker behind `step3 verify`.

pub use candle_core::{DType, Device};
pub use step3_model::*;

mod api;
pub mod demo;
pub mod verify;

pub use api::{Event, GenerateOptions, Response, Stats, Step3, Step3Builder, Stream};

/// The README's examples are compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The embedding guide's examples are compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/embedding.md")]
pub struct EmbeddingDoctests;
