//! step3-rs: pure-Rust inference for StepFun's Step3 on candle.
//!
//! This facade is the library people embed: [`Step3`] (load a checkpoint from the hub, a
//! directory or the cache; chat, stream, complete token ids), the bundled [`demo`] checkpoint, and
//! re-exports of the layers below. It composes and adds no model math: that lives in
//! [`step3_model`] and the crates under it (`step3-mfa`, `step3-moe`, `step3-vision`, `step3-nn`,
//! `step3-config`). Command-line parsing, benchmarks and the golden checker live in the
//! `step3-cli` package, so a program that depends on `step3` compiles none of them.

pub use candle_core::{DType, Device};
pub use step3_model::*;

mod api;
#[cfg(feature = "cli")]
pub mod cli;
pub mod demo;

pub use api::{default_dtype, Event, Response, Step3, Step3Builder, Stream};
pub use step3_engine as engine;
pub use step3_engine::{Engine, EngineConfig, KvCacheSize, MetricsSnapshot};

/// A compute dtype from its name: `f32`, `bf16` or `f16` (long forms accepted).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::Input(format!("unknown dtype `{other}`: use f32, bf16 or f16"))),
    }
}

/// The CUDA device a device name asks for (`None`: the CPU), without opening it: `cpu`, `cuda` (or
/// `gpu`, device 0) or `cuda:N`.
pub fn device_ordinal(s: &str) -> Result<Option<usize>> {
    match s.to_ascii_lowercase().as_str() {
        "cpu" => Ok(None),
        "cuda" | "gpu" => Ok(Some(0)),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(Error::Input(format!("unknown device `{other}`: use cpu, cuda or cuda:N"))),
        },
    }
}

/// A device from its name: `cpu`, `cuda` (or `gpu`, device 0) or `cuda:N`, with a clear error when
/// the build has no CUDA support or the device cannot be opened.
pub fn parse_device(s: &str) -> Result<Device> {
    let Some(ordinal) = device_ordinal(s)? else { return Ok(Device::Cpu) };
    let s = s.to_ascii_lowercase();
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Input(format!(
            "device `{s}` requested, but this binary was built without CUDA support (rebuild with `--features cuda`)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Input(format!("cannot open CUDA device {ordinal}: {e}")))
}

/// The README's examples are compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The embedding guide's examples are compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/embedding.md")]
pub struct EmbeddingDoctests;
