//! Argument groups shared by the `step3` command and the chat example (the `cli` feature): where
//! the model is and how to run it, how to sample, how the engine batches, and a progress bar for
//! loading. Library users who do not parse command lines leave the feature off and compile no clap.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{DType, Device, Fp8Storage, GenerateOptions, LoadOptions, LoadProgress, Step3, Step3Checkpoint};

/// Where the model is and how to run it.
#[derive(Args, Clone, Debug, Default)]
pub struct ModelArgs {
    /// A Hugging Face repo id (`stepfun-ai/step3`, `stepfun-ai/step3-fp8`, `owner/name@revision`)
    /// or a model directory. Repos are downloaded into the standard cache (HF_HOME /
    /// HF_HUB_CACHE) unless offline. Default: the bundled demo checkpoint (random weights).
    #[arg(long, conflicts_with = "model_dir")]
    pub model: Option<String>,
    /// A model directory (config.json and model.safetensors, or an index and shards).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Use only the local Hugging Face cache (as HF_HUB_OFFLINE=1 does).
    #[arg(long)]
    pub offline: bool,
    /// Compute dtype: f32, bf16 or f16. Default: f32 on the CPU, bf16 on CUDA.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Block-FP8 checkpoints: keep weights `compact` (dequantised per matmul, about the file's
    /// size in memory) or `dequantized` at load (faster, compute-dtype-sized memory).
    #[arg(long, default_value = "compact")]
    pub fp8: String,
    /// Side of the local image crops, when the model needs a non-default one (default:
    /// preprocessor_config.json, else 504).
    #[arg(long)]
    pub crop_size: Option<usize>,
    /// How the decoder is split over ranks and where the routed experts live.
    #[command(flatten)]
    pub parallel: ParallelArgs,
}

/// Tensor / expert parallelism and expert placement (`--tp --ep --devices --moe-device
/// --n-cpu-moe`): shared by every command that loads a model, `verify`, `inspect`'s memory plan and
/// `bench engine`.
#[derive(Args, Clone, Debug, Default)]
pub struct ParallelArgs {
    /// Tensor parallelism: split attention heads and every MLP's columns over N ranks (one
    /// thread each; on CUDA one GPU each). N must divide the 64 heads and the MLP widths.
    #[arg(long, default_value_t = 1, value_parser = positive, allow_negative_numbers = true)]
    pub tp: usize,
    /// Expert parallelism: split the routed experts over M groups of `--tp` ranks (M divides 48).
    #[arg(long, default_value_t = 1, value_parser = positive, allow_negative_numbers = true)]
    pub ep: usize,
    /// CUDA ordinals of the ranks, comma-separated (default: 0..tp·ep).
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<usize>>,
    /// Where the routed experts of every MoE layer live: `device` (with their rank) or `cpu`
    /// (host memory, in the checkpoint's dtype, computed on the CPU; only the routed tokens'
    /// hidden states cross).
    #[arg(long, default_value = "device", conflicts_with = "n_cpu_moe")]
    pub moe_device: String,
    /// Keep the routed experts of the first K MoE layers in host memory (see --moe-device).
    #[arg(long)]
    pub n_cpu_moe: Option<usize>,
}

impl ParallelArgs {
    /// The rank layout of `--tp`, `--ep` and `--devices` (checked against the model at load).
    pub fn layout(&self) -> Result<crate::Layout> {
        Ok(crate::Layout::new(self.tp, self.ep, self.devices.clone())?)
    }

    /// Where the routed experts live (`--moe-device`, `--n-cpu-moe`).
    pub fn expert_placement(&self) -> Result<crate::ExpertPlacement> {
        Ok(match (self.moe_device.as_str(), self.n_cpu_moe) {
            (_, Some(k)) => crate::ExpertPlacement::HostFirst(k),
            ("device" | "gpu" | "cuda", None) => crate::ExpertPlacement::Device,
            ("cpu" | "host", None) => crate::ExpertPlacement::Host,
            (other, None) => bail!("--moe-device must be `device` or `cpu`, not `{other}`"),
        })
    }

    /// One rank with every expert on it: the unsplit model.
    pub fn is_single(&self) -> bool {
        self.tp * self.ep == 1 && self.moe_device == "device" && self.n_cpu_moe.is_none()
    }
}

impl ModelArgs {
    /// Whether no model was named (the bundled demo is used).
    pub fn is_demo(&self) -> bool {
        self.model.is_none() && self.model_dir.is_none()
    }

    /// The model directory: `--model-dir`, `--model` resolved as a directory or through the hub
    /// cache, or the bundled demo.
    pub fn dir(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.model_dir {
            return Ok(dir.clone());
        }
        let Some(model) = &self.model else { return Ok(crate::demo::demo_dir()) };
        let source = crate::ModelSource::parse(model)?;
        let mut hub = crate::HubOptions::from_env();
        hub.offline |= self.offline;
        Ok(crate::hub::resolve(&source, &hub)?)
    }

    pub fn device(&self) -> Result<Device> {
        Ok(crate::parse_device(&self.device)?)
    }

    /// The compute dtype: as given, else the fastest exact one for the device.
    pub fn dtype(&self, device: &Device) -> Result<DType> {
        match &self.dtype {
            Some(d) => crate::parse_dtype(d).context("--dtype"),
            None => Ok(crate::default_dtype(device)),
        }
    }

    /// Load options with a progress bar on stderr.
    pub fn load_options(&self) -> Result<LoadOptions> {
        let fp8 = match self.fp8.as_str() {
            "compact" => Fp8Storage::Compact,
            "dequantized" | "dequantised" => Fp8Storage::Dequantized,
            other => bail!("--fp8 must be `compact` or `dequantized`, not `{other}`"),
        };
        let device = self.device()?;
        Ok(LoadOptions {
            dtype: self.dtype(&device)?,
            device,
            fp8,
            crop_size: self.crop_size,
            progress: Some(load_progress()),
            layout: self.parallel.layout()?,
            experts: self.parallel.expert_placement()?,
        })
    }

    /// Opens the checkpoint (config and mapped weights; nothing loaded yet).
    pub fn open(&self) -> Result<Step3Checkpoint> {
        Ok(Step3Checkpoint::open(self.dir()?)?)
    }

    /// Loads the whole model with its tokenizer (when it has one) and generation settings.
    pub fn load(&self) -> Result<Step3> {
        self.load_with(crate::EngineConfig::default())
    }

    /// [`Self::load`] with the engine's settings.
    pub fn load_with(&self, engine: crate::EngineConfig) -> Result<Step3> {
        if self.is_demo() {
            eprintln!(
                "Using the bundled demo checkpoint ({}): Step3's architecture at toy size with random \
                 weights, so its answers are noise.\nFor the real model: --model stepfun-ai/step3-fp8 \
                 --device cuda (a build with --features cuda), or --model DIR for a local copy.",
                crate::demo::demo_dir().display()
            );
        }
        // Every loading error names its file, key or tensor already.
        Ok(Step3::load_dir(&self.dir()?, &self.load_options()?, engine)?)
    }
}

/// A whole number of at least 1, with a message that names the rule (negative numbers reach it).
fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<i128>() {
        Ok(n) if n >= 1 && n <= usize::MAX as i128 => Ok(n as usize),
        Ok(n) => Err(format!("must be a whole number of at least 1, got {n}")),
        Err(_) => Err(format!("must be a whole number of at least 1, got `{s}`")),
    }
}

/// How to sample and when to stop.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 = greedy (default: the model's generation_config.json, else 0).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Keep only the K most likely tokens (at least 1).
    #[arg(long, allow_negative_numbers = true, value_parser = positive)]
    pub top_k: Option<usize>,
    /// Seed of the sampler, for reproducible sampling.
    #[arg(long, default_value_t = crate::generation::DEFAULT_SEED)]
    pub seed: u64,
    /// Most tokens to generate (at least 1; generation also stops when the context is full).
    #[arg(long, allow_negative_numbers = true, value_parser = positive,
          default_value_t = crate::generation::DEFAULT_MAX_NEW_TOKENS)]
    pub max_new_tokens: usize,
    /// Penalise tokens seen in the last 64 tokens; 1.0 = off.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Stop before this string (repeatable); it is not part of the answer.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Keep generating past end-of-turn tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    /// Checks the settings before anything is loaded; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        let params = crate::GenerationConfig::default().sampling(&self.options());
        params.validate().map_err(|e| anyhow::anyhow!("--{e}"))
    }

    /// The request's options (checked when generation starts).
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
            repetition_penalty: self.repetition_penalty,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: None,
        }
    }
}

/// A progress bar on stderr for weight loading (hidden when stderr is not a terminal).
pub fn load_progress() -> LoadProgress {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading weights {bar:40} {pos}/{len} tensors")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    LoadProgress(std::sync::Arc::new(move |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if done == total {
            bar.finish_and_clear();
        }
    }))
}

/// One line with a generation's counts, why it ended and its speed.
pub fn describe_stats(stats: &crate::Stats) -> String {
    format!(
        "prompt {} tokens, generated {} ({}); prefill {:.1} tok/s, decode {:.1} tok/s",
        stats.prompt_tokens,
        stats.generated_tokens,
        stats.finish,
        stats.prefill_tokens_per_sec(),
        stats.decode_tokens_per_sec()
    )
}

/// How the engine batches requests and sizes its KV cache.
#[derive(Args, Clone, Debug)]
pub struct EngineArgs {
    /// Most requests running at once.
    #[arg(long, default_value_t = 64, value_parser = positive, allow_negative_numbers = true)]
    pub max_num_seqs: usize,
    /// Most tokens one engine step runs (decodes and prompt chunks together).
    #[arg(long, default_value_t = 2048, value_parser = positive, allow_negative_numbers = true)]
    pub max_batched_tokens: usize,
    /// Most prompt tokens of one request per step (longer prompts are chunked).
    #[arg(long, default_value_t = 512, value_parser = positive, allow_negative_numbers = true)]
    pub prefill_chunk: usize,
    /// KV cache size in GB (default: 90 % of free GPU memory, or a tenth of RAM on the CPU).
    #[arg(long)]
    pub kv_cache_gb: Option<f64>,
    /// Token slots per KV block.
    #[arg(long, default_value_t = 16, value_parser = positive, allow_negative_numbers = true)]
    pub block_size: usize,
    /// Do not reuse the KV cache of shared prompt prefixes.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Most prompt tokens in a step that also runs decodes (default: the whole step): lower keeps
    /// running streams fluent while new prompts arrive, at the cost of their time to first token.
    #[arg(long, value_parser = positive, allow_negative_numbers = true)]
    pub max_prefill_while_decoding: Option<usize>,
    /// Most requests waiting to start; more are refused as overloaded (HTTP 503).
    #[arg(long, default_value_t = 1024, value_parser = positive, allow_negative_numbers = true)]
    pub max_waiting: usize,
}

impl EngineArgs {
    pub fn config(&self) -> Result<crate::EngineConfig> {
        let kv_cache = match self.kv_cache_gb {
            None => crate::KvCacheSize::Auto,
            Some(gb) if gb.is_finite() && gb > 0.0 => crate::KvCacheSize::Bytes((gb * 1e9) as u64),
            Some(gb) => bail!("--kv-cache-gb must be a positive number, got {gb}"),
        };
        Ok(crate::EngineConfig {
            max_num_seqs: self.max_num_seqs,
            max_batched_tokens: self.max_batched_tokens,
            prefill_chunk: self.prefill_chunk,
            block_size: self.block_size,
            kv_cache,
            prefix_caching: !self.no_prefix_cache,
            max_waiting: self.max_waiting,
            max_prefill_while_decoding: self.max_prefill_while_decoding,
        })
    }
}
