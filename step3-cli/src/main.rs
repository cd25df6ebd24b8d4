//! `step3`: run, inspect, verify and measure Step3 checkpoints from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use step3::cli::{ModelArgs, SamplingArgs};
use step3::{DType, ImageSource, Message};

mod bench;
mod bench_engine;
mod bench_products;
mod bench_serve;
mod cost;
mod experts;
mod inspect;
mod preprocess;
mod serve;
mod synthetic;

#[derive(Parser)]
#[command(name = "step3", version, about = "Pure-Rust inference for StepFun's Step3 (candle)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate after a prompt: chat text (--prompt) or exact token ids (--ids).
    Generate(GenerateArgs),
    /// Serve the model over HTTP with the OpenAI API (chat and text completions, streaming).
    Serve(serve::ServeArgs),
    /// Run one prompt of token ids and write the logits and final hidden states of every position.
    Logits(LogitsArgs),
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
    /// Write the demo checkpoint (Step3's architecture at toy size, random weights) into a directory,
    /// or, with --size 200m, the ~200M-parameter text checkpoint the benchmarks use.
    Demo(DemoArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// toy: the bundled demo (vision-language, f32, deterministic); 200m: Step3's text model at
    /// about 200M parameters (hidden 1024, 6 layers, 4 MoE with 16 experts top-3), random weights,
    /// a 32000-token byte-level tokenizer; servable and loadable like any checkpoint.
    #[arg(long, default_value = "toy", value_parser = ["toy", "200m"])]
    size: String,
    /// Weight dtype of the 200m checkpoint: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Store the 200m checkpoint's projections and experts as block-FP8 (128×128 scales).
    #[arg(long)]
    fp8: bool,
}

fn demo(a: DemoArgs) -> Result<ExitCode> {
    if let Some(f) = ["config.json", "model.safetensors"].iter().find(|f| a.out.join(f).exists()) {
        bail!("{} already holds a checkpoint ({f}): give a new or empty directory", a.out.display())
    }
    if a.size == "toy" {
        if a.fp8 || a.dtype != "f32" {
            bail!("--dtype and --fp8 apply to --size 200m; the toy demo is f32")
        }
        step3::demo::write_demo(&a.out)?;
    } else {
        let dtype = step3::parse_dtype(&a.dtype)?;
        let cfg = synthetic::bench_200m()?;
        synthetic::write_checkpoint(&a.out, &cfg, dtype, a.fp8)?;
        let p = step3::param_counts(&cfg);
        println!(
            "wrote {} ({:.0}M parameters, {:.1}M active per token, {dtype:?}{})",
            a.out.display(),
            p.total as f64 / 1e6,
            p.active_per_token as f64 / 1e6,
            if a.fp8 { ", block-FP8 projections" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The prompt: text or token ids, and images.
#[derive(Args)]
#[group(required = true, multiple = false, id = "input")]
struct PromptArgs {
    /// The prompt as text: a user message put through the model's chat template (with --raw, the
    /// text as it is). `<im_patch>` placeholders for --image are added (chat) or expanded (raw).
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// The prompt as token ids, comma-separated (e.g. 3,1,4), taken exactly: with --image they
    /// must already hold each image's expanded placeholder layout (see `step3 preprocess`).
    #[arg(long, group = "input")]
    ids: Option<String>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// With --prompt: use the text as it is, without the chat template.
    #[arg(long, requires = "prompt")]
    raw: bool,
    /// With --prompt: a system message before it.
    #[arg(long, requires = "prompt")]
    system: Option<String>,
    /// Images, in prompt order (repeatable).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// What to print on stdout: `ids` (the new token ids, comma-separated), `text` (reasoning in
    /// <think> tags, then the answer) or `stats` (ids, then counts and speed on stderr).
    /// Default: `text` for --prompt, `ids` for --ids.
    #[arg(long)]
    print: Option<String>,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt token ids, comma-separated (e.g. 3,1,4).
    #[arg(long)]
    ids: String,
    /// Images, in prompt order; --ids must hold their expanded placeholder layouts.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Output safetensors file: `logits` [T, vocab] and `last_hidden` [T, hidden], f32.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct VerifyArgs {
    /// Fixture directory (holding vl-f32/, vl-bf16/, ...).
    #[arg(long)]
    fixtures: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Also check the text goldens with the decoder split over ranks (thread backend, or NCCL in
    /// a build with the `nccl` feature) and/or the routed experts in host memory.
    #[command(flatten)]
    parallel: step3::cli::ParallelArgs,
}

fn main() -> ExitCode {
    step3::init_cpu();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Logits(a) => logits(a),
        Command::Generate(a) => generate(a),
        Command::Serve(a) => serve::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Verify(a) => verify(a),
        Command::Bench(a) => bench::run(a),
        Command::Cost(a) => cost::run(a),
        Command::Preprocess(a) => preprocess::run(a),
        Command::Experts(a) => experts::run(a),
        Command::Demo(a) => demo(a),
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
    let model = a.model.open()?.load(&a.model.load_options()?)?;
    let images = a.images.iter().map(|p| model.load_image(p)).collect::<step3::Result<Vec<_>>>()?;
    let embeds = model.embed(&ids, &images)?;
    let text = &model.text;
    let mut cache = text.new_cache(1, ids.len())?;
    let hidden = text.forward_embeds(&embeds, &[ids.len()], &mut cache, None)?.squeeze(0)?;
    let logits = text.logits(&hidden)?;
    let tensors = [("logits".to_string(), logits), ("last_hidden".to_string(), hidden.to_dtype(DType::F32)?)];
    step3::checkpoint::save_tensors(&tensors.into_iter().collect(), &a.out)?;
    Ok(ExitCode::SUCCESS)
}

fn generate(a: GenerateArgs) -> Result<ExitCode> {
    let print = a.print.clone().unwrap_or_else(|| if a.prompt.prompt.is_some() { "text" } else { "ids" }.into());
    if !matches!(print.as_str(), "ids" | "text" | "stats") {
        bail!("--print must be `ids`, `text` or `stats`, not `{print}`");
    }
    let ids = a.prompt.ids.as_deref().map(parse_ids).transpose()?;
    a.sampling.validate()?;
    let opts = a.sampling.options();
    let model = a.model.load()?;
    let images: Vec<ImageSource> = a.images.iter().cloned().map(ImageSource::File).collect();
    let reply = match (&a.prompt.prompt, ids) {
        (_, Some(ids)) => model.complete(&ids, &images, &opts)?,
        (Some(text), None) if a.raw => model.complete_text(text, &images, &opts)?,
        (Some(text), None) => {
            let mut messages: Vec<Message> = a.system.iter().map(Message::system).collect();
            let mut user = Message::user(text.clone());
            user.images = images;
            messages.push(user);
            model.generate(&messages, &opts)?
        }
        (None, None) => bail!("give --prompt TEXT or --ids IDS"),
    };
    match print.as_str() {
        "text" => {
            if !reply.reasoning.is_empty() {
                println!("<think>{}</think>", reply.reasoning);
            }
            println!("{}", reply.text);
            for call in &reply.tool_calls {
                println!("[tool call] {}({})", call.name, call.arguments_json());
            }
        }
        _ => println!("{}", reply.tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(",")),
    }
    if print == "stats" {
        eprintln!("{}", step3::cli::describe_stats(&reply.stats));
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(a: VerifyArgs) -> Result<ExitCode> {
    let dtype = step3::parse_dtype(&a.dtype)?;
    let device = step3::parse_device(&a.device)?;
    let experts = a.parallel.expert_placement()?;
    let layout = a.parallel.layout()?;
    let mut checks = step3_cli::verify::verify_fixtures(&a.fixtures, dtype, &device)?;
    if !layout.is_single() || experts != step3::ExpertPlacement::Device {
        checks.extend(step3_cli::verify::verify_sharded(&a.fixtures, dtype, &device, &layout, experts)?);
    }
    for c in &checks {
        println!("{c}");
    }
    let failed = checks.iter().filter(|c| c.failed()).count();
    println!("{} goldens checked on {} in {:?}: {} failed", checks.len(), a.device, dtype, failed);
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
