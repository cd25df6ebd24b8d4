//! The composed Step3 model.
//!
//! This crate owns the configuration (`config.json`, parsed loudly: a missing key is an error
//! that names it), checkpoint discovery and memory-mapped loading (one `model.safetensors` or
//! shards listed in `model.safetensors.index.json`), the inventory check of every expected tensor
//! before anything is built, the Step3 language model composed from [`step3_mfa`] attention and
//! [`step3_moe`] feed-forward blocks, the whole vision-language model with its image-feature
//! merge ([`Step3Model`], the tower itself is [`step3_vision`]'s), the KV-cached generation loop,
//! expert-health statistics ([`experts`]) and parameter arithmetic. It does not parse command lines or print: the `step3` facade crate
//! does that.
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

pub mod chat;
pub mod checkpoint;
pub mod config;
mod error;
pub mod experts;
pub mod generation;
pub mod hub;
pub mod inventory;
mod multimodal;
pub mod params;
pub mod stream;
mod text;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use chat::{ChatTemplate, Message, Role};
pub use checkpoint::{Checkpoint, LoadProgress};
pub use config::{ModelType, QuantizationConfig, Step3Config, TextConfig, VisionSection};
pub use error::{Error, Result};
pub use generation::{
    generate, generate_from_embeds, FinishReason, GenerationOutput, Generator, SamplingParams, Stats,
};
pub use hub::{HubOptions, ModelSource};
pub use inventory::{ExpectedTensor, InventoryReport};
pub use multimodal::{merge, Step3Model};
pub use params::{kv_bytes_per_token, param_counts, ParamCounts};
pub use step3_mfa as mfa;
pub use step3_moe as moe;
pub use step3_moe::Routing;
pub use step3_nn::{BlockFp8, Linear, Weight, WeightFormat};
pub use step3_vision as vision;
pub use step3_vision::{
    ImageLayout, ImageTokenIds, PreprocessConfig, PreprocessedImage, VisionConfig, VisionModel, WindowRule,
};
pub use stream::{Detokenizer, OutputEvent, OutputParser, StopStrings, ToolCall};
pub use text::{mfa_config, moe_config};
pub use text::{LayerRouting, Step3Cache, Step3TextModel};
pub use tokenizer::Step3Tokenizer;

/// The first vision MLP weight: its rows give the MLP width when the config omits it.
const VISION_FC1: &str = "vision_model.transformer.layers.0.mlp.fc1.weight";

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
    /// Side of the local image crops (default: `preprocessor_config.json`, else 504).
    pub crop_size: Option<usize>,
    /// Told `(tensors loaded, total)` while the weights load.
    pub progress: Option<LoadProgress>,
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
        Self { dtype: DType::BF16, device: Device::Cpu, fp8: Fp8Storage::Compact, crop_size: None, progress: None }
    }
}

/// Reads and parses a JSON file; errors name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

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

    /// Every tensor the language model needs.
    pub fn expected_tensors(&self) -> Vec<ExpectedTensor> {
        inventory::text_tensors(&self.config.text)
    }

    /// Every tensor the vision tower and projector need (empty for a text-only checkpoint).
    pub fn expected_vision_tensors(&self) -> Vec<ExpectedTensor> {
        match (&self.config.vision, self.vision_intermediate_size()) {
            (Some(v), Some(i)) => inventory::vision_tensors(v, i, self.config.text.hidden_size),
            _ => Vec::new(),
        }
    }

    /// The vision MLP width: from the config, else from the checkpoint's first `fc1.weight`.
    fn vision_intermediate_size(&self) -> Option<usize> {
        self.config.vision.as_ref()?.intermediate_size.or_else(|| self.vision_fc1_rows())
    }

    /// Rows of the checkpoint's first vision `fc1.weight`, if it is there.
    fn vision_fc1_rows(&self) -> Option<usize> {
        self.weights.info(VISION_FC1).and_then(|i| i.shape.first().copied())
    }

    /// Checks presence, shape and dtype of every language-model tensor (and of FP8 scales).
    pub fn check(&self) -> InventoryReport {
        inventory::check(&self.weights, &self.expected_tensors(), self.config.quantization.as_ref())
    }

    /// [`Self::check`] over the language model and the vision tower together.
    pub fn check_all(&self) -> InventoryReport {
        let mut expected = self.expected_tensors();
        expected.extend(self.expected_vision_tensors());
        let mut report = inventory::check(&self.weights, &expected, self.config.quantization.as_ref());
        if self.config.vision.is_some() && self.vision_intermediate_size().is_none() {
            report.problems.push(Error::MissingTensor { name: VISION_FC1.into(), within: None });
        }
        report
    }

    /// The vision tower's settings, with the MLP width resolved against the checkpoint (a config
    /// value that disagrees with the weights is an error).
    pub fn vision_config(&self) -> Result<Option<VisionConfig>> {
        let Some(v) = &self.config.vision else { return Ok(None) };
        let intermediate = match (v.intermediate_size, self.vision_fc1_rows()) {
            (Some(c), Some(w)) if c != w => {
                return Err(Error::key(
                    &self.config.path,
                    "vision_config.intermediate_size",
                    format!("is {c}, but the checkpoint's {VISION_FC1} has {w} rows"),
                ))
            }
            (_, Some(w)) => w,
            (Some(c), None) => c,
            (None, None) => return Err(Error::MissingTensor { name: VISION_FC1.into(), within: None }),
        };
        Ok(Some(VisionConfig {
            hidden_size: v.hidden_size,
            intermediate_size: intermediate,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            num_channels: v.num_channels,
            image_size: v.image_size,
            patch_size: v.patch_size,
            layer_norm_eps: v.layer_norm_eps,
            output_hidden_size: v.output_hidden_size,
            projector_stride: v.projector_stride,
            projector_bias: v.projector_bias,
            text_hidden_size: self.config.text.hidden_size,
        }))
    }

    /// Preprocessing settings: Step3's defaults, the global size of the vision tower, then
    /// `preprocessor_config.json` (`crop_size`, `max_image_size`, `window_rule` "<=" or "<",
    /// `enable_patch`), then `crop_size` if given.
    pub fn preprocess_config(&self, crop_size: Option<usize>) -> Result<PreprocessConfig> {
        let mut cfg = PreprocessConfig::default();
        if let Some(v) = &self.config.vision {
            cfg.image_size = v.image_size;
        }
        let path = self.dir.join("preprocessor_config.json");
        if path.is_file() {
            let json = read_json(&path)?;
            let size = |key: &str| -> Result<Option<usize>> {
                match json.get(key) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(v) => v
                        .as_u64()
                        .filter(|&n| n > 0)
                        .map(|n| Some(n as usize))
                        .ok_or_else(|| Error::key(&path, key, format!("must be a positive integer, found {v}"))),
                }
            };
            if let Some(s) = size("image_size")? {
                if s != cfg.image_size {
                    return Err(Error::key(
                        &path,
                        "image_size",
                        format!("is {s}, but the vision tower is built for {}", cfg.image_size),
                    ));
                }
            }
            if let Some(s) = size("crop_size")? {
                cfg.crop_size = s;
            }
            if let Some(s) = size("max_image_size")? {
                cfg.max_image_size = s;
            }
            if let Some(rule) = json.get("window_rule").and_then(|v| v.as_str()) {
                cfg.window_rule = rule.parse().map_err(|problem| Error::key(&path, "window_rule", problem))?;
            }
            if let Some(v) = json.get("enable_patch") {
                cfg.enable_patch =
                    v.as_bool().ok_or_else(|| Error::key(&path, "enable_patch", "must be true or false"))?;
            }
        }
        if let Some(c) = crop_size {
            cfg.crop_size = c;
        }
        if let Some(v) = &self.config.vision {
            for (what, s) in [("crop size", cfg.crop_size), ("image size", cfg.image_size)] {
                if s % v.patch_size != 0 || s / v.patch_size < 2 {
                    return Err(Error::Input(format!(
                        "the {what} {s} must be a multiple of the vision patch size {} (at least two patches)",
                        v.patch_size
                    )));
                }
            }
        }
        Ok(cfg)
    }

    /// Checks every tensor, then builds the whole model: the language model and, for a
    /// `step3_vl` checkpoint, the vision tower (its crop position table resized once, here).
    pub fn load(&self, opts: &LoadOptions) -> Result<Step3Model> {
        if !matches!(opts.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype(opts.dtype));
        }
        let vision_cfg = self.vision_config()?;
        let preprocess = self.preprocess_config(opts.crop_size)?;
        let vb = self.loading_var_builder(self.check_all(), opts)?;
        let text = Step3TextModel::new(&self.config.text, self.weight_format(opts.fp8), vb.clone())?;
        let vision = match &vision_cfg {
            Some(cfg) => Some(VisionModel::new(cfg, Some(preprocess.crop_size), vb)?),
            None => None,
        };
        Ok(Step3Model { text, vision, image_token_id: self.config.image_token_id, preprocess })
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
        self.load_text_model_with(&LoadOptions { dtype, device: device.clone(), ..Default::default() })
    }

    /// [`Self::load_text_model`] with every option.
    pub fn load_text_model_with(&self, opts: &LoadOptions) -> Result<Step3TextModel> {
        if !matches!(opts.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype(opts.dtype));
        }
        let vb = self.loading_var_builder(self.check(), opts)?;
        Ok(Step3TextModel::new(&self.config.text, self.weight_format(opts.fp8), vb)?)
    }

    /// Fails with every problem of `report`; otherwise a builder over the weights in `opts.dtype`
    /// on `opts.device` that reports `opts.progress` against the tensors `report` checked.
    fn loading_var_builder(&self, report: InventoryReport, opts: &LoadOptions) -> Result<candle_nn::VarBuilder<'_>> {
        let total = report.checked;
        report.into_result()?;
        let backend = checkpoint::CheckpointBackend::new(&self.weights, opts.progress.clone().map(|p| (p, total)));
        Ok(candle_nn::VarBuilder::from_backend(Box::new(backend), opts.dtype, opts.device.clone()))
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
            Box::new(checkpoint::CheckpointBackend::new(&self.weights, None)),
            dtype,
            device.clone(),
        )
    }
}
