//! The composed Step3 model.
//!
//! This crate owns the configuration (`config.json`, parsed loudly: a missing key is an error
//! that names it), checkpoint discovery and memory-mapped loading (one `model.safetensors` or
//! shards listed in `model.safetensors.index.json`), the inventory check of every expected tensor
//! before anything is built, the Step3 language model composed from [`step3_mfa`] attention and
//! [`step3_moe`] feed-forward blocks, the KV-cached generation loop and parameter arithmetic.
//! It does not parse command lines or print: the `step3` facade crate does that.
//!
//! ```no_run
//! # fn main() -> step3_model::Result<()> {
//! use candle_core::{DType, Device};
//! let ckpt = step3_model::Step3Checkpoint::open("path/to/step3")?;
//! let model = ckpt.load_text_model(DType::BF16, &Device::Cpu)?;
//! let params = step3_model::SamplingParams { max_new_tokens: 8, ..Default::default() };
//! let out = step3_model::generate(&model, &[0, 1, 2], &params, |_| {})?;
//! println!("{:?}", out.tokens);
//! # Ok(()) }
//! ```

pub mod checkpoint;
pub mod config;
mod error;
pub mod generation;
pub mod inventory;
pub mod params;
mod text;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

pub use checkpoint::Checkpoint;
pub use config::{ModelType, Step3Config, TextConfig};
pub use error::{Error, Result};
pub use generation::{generate, FinishReason, GenerationOutput, SamplingParams};
pub use inventory::{ExpectedTensor, InventoryReport};
pub use params::{kv_bytes_per_token, param_counts, ParamCounts};
pub use step3_moe::Routing;
pub use text::{LayerRouting, Step3Cache, Step3TextModel};

/// A Step3 checkpoint directory: its config and its (memory-mapped, not yet loaded) weights.
#[derive(Debug)]
pub struct Step3Checkpoint {
    dir: PathBuf,
    config: Step3Config,
    weights: Checkpoint,
}

impl Step3Checkpoint {
    /// Reads `dir/config.json` and maps the safetensors files; no tensor data is read yet.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model directory"),
            });
        }
        let config = Step3Config::from_file(dir.join("config.json"))?;
        let weights = Checkpoint::open_dir(dir)?;
        Ok(Self { dir: dir.to_path_buf(), config, weights })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &Step3Config {
        &self.config
    }

    pub fn weights(&self) -> &Checkpoint {
        &self.weights
    }

    /// Every tensor the config implies for the parts this build loads.
    pub fn expected_tensors(&self) -> Vec<ExpectedTensor> {
        inventory::text_tensors(&self.config.text)
    }

    /// Checks presence, shape and dtype of every expected tensor.
    pub fn check(&self) -> InventoryReport {
        inventory::check(&self.weights, &self.expected_tensors())
    }

    /// Checks the inventory, then builds the language model in `dtype` (f32, bf16 or f16) on
    /// `device`. Tensors are read from the mapping one at a time.
    pub fn load_text_model(&self, dtype: DType, device: &Device) -> Result<Step3TextModel> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype(dtype));
        }
        if let Some(q) = &self.config.quantization {
            return Err(Error::key(
                &self.config.path,
                "quantization_config",
                format!("is not supported by this build: {q}"),
            ));
        }
        self.check().into_result()?;
        Ok(Step3TextModel::new(&self.config.text, self.var_builder(dtype, device))?)
    }

    /// A [`candle_nn::VarBuilder`] over the weights, converting to `dtype` on `device`, for
    /// building components by hand (no inventory check).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'_> {
        candle_nn::VarBuilder::from_backend(
            Box::new(checkpoint::CheckpointBackend(&self.weights)),
            dtype,
            device.clone(),
        )
    }
}
