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
//! use candle_core::{DType, Device, Tensor};
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

use candle_core::{DType, Device, Tensor};

pub use checkpoint::Checkpoint;
pub use config::{ModelType, QuantizationConfig, Step3Config, TextConfig};
pub use error::{Error, Result};
pub use generation::{generate, FinishReason, GenerationOutput, SamplingParams};
pub use inventory::{ExpectedTensor, InventoryReport};
pub use params::{kv_bytes_per_token, param_counts, ParamCounts};
pub use step3_moe::Routing;
pub use step3_nn::{BlockFp8, Linear, Weight, WeightFormat};
pub use text::{LayerRouting, Step3Cache, Step3TextModel};

/// How block-FP8 weights are held once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fp8Storage {
    /// Keep the FP8 values and scales (≈ the checkpoint's size) and dequantise each weight when a
    /// matmul uses it.
    #[default]
    Compact,
    /// Dequantise everything to the compute dtype at load: faster, 2× (bf16) or 4× (f32) the memory.
    Dequantized,
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype: f32, bf16 or f16.
    pub dtype: DType,
    pub device: Device,
    pub fp8: Fp8Storage,
}

impl LoadOptions {
    pub fn with_dtype(self, dtype: DType) -> Self {
        Self { dtype, ..self }
    }

    pub fn with_device(self, device: Device) -> Self {
        Self { device, ..self }
    }

    pub fn with_fp8(self, fp8: Fp8Storage) -> Self {
        Self { fp8, ..self }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::BF16, device: Device::Cpu, fp8: Fp8Storage::Compact }
    }
}

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

    /// Checks presence, shape and dtype of every expected tensor (and of FP8 scales).
    pub fn check(&self) -> InventoryReport {
        inventory::check(&self.weights, &self.expected_tensors(), self.config.quantization.as_ref())
    }

    /// How linear weights are stored, for loading with `fp8`.
    pub fn weight_format(&self, fp8: Fp8Storage) -> WeightFormat {
        match &self.config.quantization {
            None => WeightFormat::Dense,
            Some(q) => WeightFormat::BlockFp8 {
                block: q.weight_block_size,
                dequantize_at_load: fp8 == Fp8Storage::Dequantized,
            },
        }
    }

    /// Expected tensors stored as block-FP8.
    pub fn fp8_tensors(&self) -> Vec<ExpectedTensor> {
        inventory::fp8_tensors(&self.weights, &self.expected_tensors()).into_iter().cloned().collect()
    }

    /// Bytes the language model's weights will occupy once loaded with these options.
    pub fn resident_bytes(&self, dtype: DType, fp8: Fp8Storage) -> usize {
        inventory::resident_bytes(&self.weights, &self.expected_tensors(), dtype, fp8 == Fp8Storage::Compact)
    }

    /// Checks the inventory, then builds the language model in `dtype` (f32, bf16 or f16) on
    /// `device`, keeping block-FP8 weights compact. Tensors are read from the mapping one at a time.
    pub fn load_text_model(&self, dtype: DType, device: &Device) -> Result<Step3TextModel> {
        self.load_text_model_with(&LoadOptions { dtype, device: device.clone(), fp8: Fp8Storage::Compact })
    }

    /// [`Self::load_text_model`] with every option.
    pub fn load_text_model_with(&self, opts: &LoadOptions) -> Result<Step3TextModel> {
        if !matches!(opts.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype(opts.dtype));
        }
        self.check().into_result()?;
        let vb = self.var_builder(opts.dtype, &opts.device);
        Ok(Step3TextModel::new(&self.config.text, self.weight_format(opts.fp8), vb)?)
    }

    /// One weight of the checkpoint as a dense tensor in `dtype` (FP8 weights dequantised with
    /// their block scales).
    pub fn dense_weight(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let info =
            self.weights.info(name).ok_or_else(|| Error::MissingTensor { name: name.to_string(), within: None })?;
        let vb = self.var_builder(dtype, device);
        Ok(Weight::load(&vb, name, &info.shape.clone(), self.weight_format(Fp8Storage::Compact))?.to_dense()?)
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
