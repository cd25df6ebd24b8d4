//! Opening and loading a Step3 checkpoint directory: `config.json`, the memory-mapped weights
//! (one file or shards), `preprocessor_config.json`, the inventory check of every tensor before
//! anything is built, and [`LoadOptions`] (compute dtype, device, how FP8 weights are held).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use step3_config::read_json;

use crate::checkpoint::{self, Checkpoint, LoadProgress};
use crate::inventory::{self, ExpectedTensor, InventoryReport};
use crate::multimodal::Step3Model;
use crate::shard::{check_layout, ExpertPlacement, Layout, RankPlan};
use crate::text::{RankBuilder, Step3TextModel};
use crate::{Error, Result, Step3Config};
use step3_nn::{Weight, WeightFormat};
use step3_vision::{PreprocessConfig, VisionConfig, VisionModel};

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
    /// Tensor × expert parallelism: the decoder split over `tp × ep` ranks, one thread each, on
    /// `layout.devices` (CUDA) or all on the CPU. [`Layout::single`] by default.
    pub layout: Layout,
    /// Where the routed experts live: with their rank (default) or in host memory.
    pub experts: ExpertPlacement,
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

    pub fn with_layout(self, layout: Layout) -> Self {
        Self { layout, ..self }
    }

    pub fn with_experts(self, experts: ExpertPlacement) -> Self {
        Self { experts, ..self }
    }
}

/// The communicators of every rank: NCCL between CUDA devices in a build with the `nccl`
/// feature, otherwise the thread backend (shared memory; between GPUs it copies through the host).
fn rank_comms(layout: &Layout, devices: &[Device]) -> Result<Vec<step3_dist::RankComms>> {
    #[cfg(feature = "nccl")]
    if devices.first().is_some_and(Device::is_cuda) && !layout.is_single() {
        return Ok(step3_dist::nccl::rank_comms(layout, devices)?);
    }
    let _ = devices;
    Ok(step3_dist::RankComms::threads(layout))
}

/// The device of rank `rank`: `main` for a single rank; otherwise the CPU, or CUDA device
/// `layout.devices[rank]` when `main` is a CUDA device.
fn rank_device(main: &Device, layout: &Layout, rank: usize) -> Result<Device> {
    if layout.is_single() {
        return Ok(main.clone());
    }
    match main {
        Device::Cpu => Ok(Device::Cpu),
        Device::Cuda(_) => Ok(Device::new_cuda(layout.devices[rank])?),
        Device::Metal(_) => {
            Err(Error::Input("tensor/expert parallelism runs on CUDA devices or the CPU, not Metal".into()))
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::BF16,
            device: Device::Cpu,
            fp8: Fp8Storage::Compact,
            crop_size: None,
            progress: None,
            layout: Layout::single(),
            experts: ExpertPlacement::Device,
        }
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
            return Err(Error::NoModelDir { dir: dir.to_path_buf() });
        }
        let config_file = dir.join("config.json");
        if !config_file.is_file() {
            return Err(Error::NoConfig { dir: dir.to_path_buf() });
        }
        let config = Step3Config::from_file(config_file)?;
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
            (Some(v), Some(i)) => inventory::vision_tensors(v, i),
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

    /// The vision tower's settings (`None` for a text-only checkpoint). When the config omits
    /// the MLP width, the tower reads it from the checkpoint's first `fc1.weight`; a config value
    /// that disagrees with the weights fails the inventory check.
    pub fn vision_config(&self) -> Option<&VisionConfig> {
        self.config.vision.as_ref()
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
                v.check_view_size(s).map_err(|problem| Error::Input(format!("the {what} {problem}")))?;
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
        let preprocess = self.preprocess_config(opts.crop_size)?;
        self.check_layout(&opts.layout)?;
        let (vb, text) = self.build_text(self.check_all(), opts)?;
        let vision = match self.vision_config() {
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
        self.check_layout(&opts.layout)?;
        Ok(self.build_text(self.check(), opts)?.1)
    }

    /// Checks that `layout` can split this checkpoint (heads, widths, experts, FP8 blocks),
    /// before anything is loaded.
    pub fn check_layout(&self, layout: &Layout) -> Result<()> {
        let block = self.config.quantization.as_ref().map(|q| q.weight_block_size);
        Ok(check_layout(&self.config.text, layout, block)?)
    }

    /// Fails with every problem of `report`; otherwise builds the language model as `opts` says
    /// (sharded over `opts.layout`, experts placed per `opts.experts`) and returns it with a
    /// builder over the whole weights on the first rank's device (for the vision tower), both
    /// reporting `opts.progress` against the tensors `report` checked (once per rank).
    fn build_text(
        &self,
        report: InventoryReport,
        opts: &LoadOptions,
    ) -> Result<(candle_nn::VarBuilder<'_>, Step3TextModel)> {
        let layout = &opts.layout;
        let total = report.checked * layout.world();
        report.into_result()?;
        let format = self.weight_format(opts.fp8);
        let block = self.config.quantization.as_ref().map(|q| q.weight_block_size);
        let loaded = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let builder = |plan: Option<RankPlan>, device: &Device| {
            let mut backend =
                checkpoint::CheckpointBackend::new(&self.weights, opts.progress.clone().map(|p| (p, total)));
            backend.loaded = loaded.clone();
            backend.plan = plan.map(|p| (p, block));
            candle_nn::VarBuilder::from_backend(Box::new(backend), opts.dtype, device.clone())
        };
        let devices = (0..layout.world()).map(|r| rank_device(&opts.device, layout, r)).collect::<Result<Vec<_>>>()?;
        let main = builder(None, &devices[0]);
        if layout.is_single() && opts.experts == ExpertPlacement::Device {
            let text = Step3TextModel::new(&self.config.text, format, main.clone())?;
            return Ok((main, text));
        }
        let comms = rank_comms(layout, &devices)?;
        let ranks = comms
            .into_iter()
            .zip(&devices)
            .enumerate()
            .map(|(r, (comms, device))| {
                let plan = RankPlan::new(layout, r);
                RankBuilder {
                    plan,
                    comms,
                    vb: builder(Some(plan), device),
                    host_vb: builder(Some(plan), &Device::Cpu),
                    placement: opts.experts,
                }
            })
            .collect();
        let text = Step3TextModel::new_ranks(&self.config.text, format, main.clone(), ranks)?;
        // Ranks skip what they do not hold (rank 0 alone loads the embedding): close the count.
        if let Some(LoadProgress(f)) = &opts.progress {
            f(total, total);
        }
        Ok((main, text))
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
