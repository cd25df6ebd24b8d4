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

/// Sets `RAYON_NUM_THREADS` to the number of CPUs this process may use, unless it is already set.
///
/// Call it first thing in `main`, before any thread starts. Without the variable, candle 0.11
/// works out its thread count for every CPU matmul by parsing `/proc/cpuinfo`, which makes small
/// models several times slower (the tiny checkpoint decodes 3–4× faster with it set).
pub fn init_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// The README's examples are compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The embedding guide's examples are compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/embedding.md")]
pub struct EmbeddingDoctests;
