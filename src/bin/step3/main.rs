//! `step3`: run, inspect and verify Step3 checkpoints from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use step3::DType;

mod bench;
mod cost;
mod experts;
mod inspect;
mod preprocess;
mod synthetic;

#[derive(Parser)]
#[command(name = "step3", version, about = "Pure-Rust inference for StepFun's Step3 (candle)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one prompt and write the logits and final hidden states of every position.
    Logits(LogitsArgs),
    /// Generate tokens after a prompt of token ids (KV-cached).
    Generate(GenerateArgs),
    /// Describe a checkpoint or config: layers, parameter counts, KV-cache size, tensor inventory.
    Inspect(inspect::InspectArgs),
    /// Check this build against a fixture set of golden outputs (e.g. tests/fixtures/step3-tiny).
    Verify(VerifyArgs),
    /// Micro-benchmarks with synthetic weights at Step3's real dimensions.
    Bench(bench::BenchArgs),
    /// Decode cost per token and per 1M tokens (the Step3 paper's model), for a preset or a config.
    Cost(cost::CostArgs),
    /// Run the official image preprocessing: pixel tensors, crops, newline flags, token layout.
    Preprocess(preprocess::PreprocessArgs),
    /// Dead, starved and vanishing routed experts: weight norms, routing shares and output norms.
    Experts(experts::ExpertsArgs),
    /// Write the demo checkpoint (Step3's architecture at toy size, random weights) into a directory.
    Demo {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Where the model is and how to run it.
#[derive(Args, Clone)]
struct ModelArgs {
    /// Directory holding config.json and model.safetensors (or an index + shards).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    model_dir: Option<PathBuf>,
    /// A Hugging Face repo id (`stepfun-ai/step3`, `owner/name@revision`) or a directory; repos are
    /// downloaded into the standard cache (HF_HOME / HF_HUB_CACHE) unless offline.
    #[arg(long)]
    model: Option<String>,
    /// Use only the local Hugging Face cache (same as HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Block-FP8 checkpoints: keep weights `compact` (dequantised per matmul, ≈ file-sized memory)
    /// or `dequantized` at load (faster, compute-dtype-sized memory).
    #[arg(long, default_value = "compact")]
    fp8: String,
    /// Images, in prompt order (repeatable); `--ids` must hold their expanded placeholder layouts.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Side of the local image crops, when the model needs a non-default one (default:
    /// preprocessor_config.json, else 504).
    #[arg(long)]
    crop_size: Option<usize>,
}

/// A progress bar on stderr for weight loading (hidden when stderr is not a terminal).
pub fn load_progress() -> step3::LoadProgress {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading weights {bar:40} {pos}/{len} tensors")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    step3::LoadProgress(std::sync::Arc::new(move |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if done == total {
            bar.finish_and_clear();
        }
    }))
}

impl ModelArgs {
    /// The model directory: `--model-dir`, or `--model` resolved through the hub cache.
    fn dir(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.model_dir {
            return Ok(dir.clone());
        }
        let source = step3::ModelSource::parse(self.model.as_deref().unwrap_or_default())?;
        let mut hub = step3::HubOptions::from_env();
        hub.offline |= self.offline;
        Ok(step3::hub::resolve(&source, &hub)?)
    }

    fn open(&self) -> Result<step3::Step3Checkpoint> {
        let dir = self.dir()?;
        step3::Step3Checkpoint::open(&dir).with_context(|| format!("opening the checkpoint in {}", dir.display()))
    }

    fn load(&self, ckpt: &step3::Step3Checkpoint) -> Result<step3::Step3Model> {
        let fp8 = match self.fp8.as_str() {
            "compact" => step3::Fp8Storage::Compact,
            "dequantized" | "dequantised" => step3::Fp8Storage::Dequantized,
            other => bail!("--fp8 must be `compact` or `dequantized`, not `{other}`"),
        };
        let opts = step3::LoadOptions {
            dtype: step3::parse_dtype(&self.dtype)?,
            device: step3::parse_device(&self.device)?,
            fp8,
            crop_size: self.crop_size,
            progress: Some(load_progress()),
        };
        ckpt.load(&opts).with_context(|| format!("loading {}", ckpt.dir().display()))
    }

    /// Prompt embeddings `[1, T, H]` with the images' features merged in.
    fn embed(&self, model: &step3::Step3Model, ids: &[u32]) -> Result<candle_core::Tensor> {
        let images = self.images.iter().map(|p| model.load_image(p)).collect::<step3::Result<Vec<_>>>()?;
        Ok(model.embed(ids, &images)?)
    }
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt token ids, comma-separated (e.g. 3,1,4).
    #[arg(long)]
    ids: String,
    /// Output safetensors file: `logits` [T, vocab] and `last_hidden` [T, hidden], f32.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt token ids, comma-separated.
    #[arg(long)]
    ids: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Nucleus sampling threshold, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
    /// Keep generating past the config's end-of-sequence id(s).
    #[arg(long)]
    ignore_eos: bool,
    /// What to print: `ids` (one comma-separated line) or `stats` (ids, then timing on stderr).
    #[arg(long, default_value = "ids")]
    print: String,
}

#[derive(Args)]
struct VerifyArgs {
    /// Fixture directory (holding vl-f32/, vl-bf16/, ...).
    #[arg(long)]
    fixtures: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

fn main() -> ExitCode {
    step3::init_cpu_threads();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Logits(a) => logits(a),
        Command::Generate(a) => generate(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Verify(a) => verify(a),
        Command::Bench(a) => bench::run(a),
        Command::Cost(a) => cost::run(a),
        Command::Preprocess(a) => preprocess::run(a),
        Command::Experts(a) => experts::run(a),
        Command::Demo { out } => step3::demo::write_demo(&out).map(|_| ExitCode::SUCCESS).map_err(Into::into),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().with_context(|| format!("`{p}` in --ids is not a token id")))
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--ids is empty: give at least one token id");
    }
    Ok(ids)
}

fn logits(a: LogitsArgs) -> Result<ExitCode> {
    let ids = parse_ids(&a.ids)?;
    let model = a.model.load(&a.model.open()?)?;
    let embeds = a.model.embed(&model, &ids)?;
    let text = &model.text;
    let mut cache = text.new_cache(1, ids.len())?;
    let hidden = text.forward_embeds(&embeds, &[ids.len()], &mut cache, None)?.squeeze(0)?;
    let logits = text.logits(&hidden)?;
    let tensors = [("logits", logits), ("last_hidden", hidden.to_dtype(DType::F32)?)];
    candle_core::safetensors::save(&tensors.into_iter().collect(), &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn generate(a: GenerateArgs) -> Result<ExitCode> {
    let ids = parse_ids(&a.ids)?;
    if !matches!(a.print.as_str(), "ids" | "stats") {
        bail!("--print must be `ids` or `stats`, not `{}`", a.print);
    }
    let params = step3::SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        max_new_tokens: a.max_new_tokens,
        ..Default::default()
    };
    params.validate()?;
    let ckpt = a.model.open()?;
    let params = step3::SamplingParams {
        stop_token_ids: if a.ignore_eos { Vec::new() } else { ckpt.config().eos_token_ids.clone() },
        ..params
    };
    let model = a.model.load(&ckpt)?;
    let embeds = a.model.embed(&model, &ids)?;
    let out = step3::generate_from_embeds(&model.text, &ids, Some(embeds), &params, |_| {})?;
    println!("{}", out.tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    if a.print == "stats" {
        eprintln!(
            "prompt {} tokens, generated {} ({:?}); prefill {:.1} tok/s, decode {:.1} tok/s",
            out.stats.prompt_tokens,
            out.stats.generated_tokens,
            out.stats.finish,
            out.stats.prefill_tokens_per_sec(),
            out.stats.decode_tokens_per_sec()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(a: VerifyArgs) -> Result<ExitCode> {
    let dtype = step3::parse_dtype(&a.dtype)?;
    let device = step3::parse_device(&a.device)?;
    let checks = step3::verify::verify_fixtures(&a.fixtures, dtype, &device)?;
    for c in &checks {
        println!("{c}");
    }
    let failed = checks.iter().filter(|c| c.failed()).count();
    println!("{} goldens checked on {} in {:?}: {} failed", checks.len(), a.device, dtype, failed);
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
