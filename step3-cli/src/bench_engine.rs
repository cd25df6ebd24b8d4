//! `step3 bench engine`: the serving engine under load. For each concurrency, that many requests
//! (distinct prompts, greedy, fixed length) are submitted at once; the run reports aggregate
//! output and decode rates, time to first token and inter-token latency percentiles, and the peak
//! of KV blocks in use, each rate also as a multiple of the single-stream one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use step3::engine::{Completion, Request};
use step3::{Engine, EngineConfig, GenerateOptions, GenerationConfig, KvCacheSize, WeightFormat};

#[derive(Args)]
pub struct EngineBenchArgs {
    /// A checkpoint directory; default: synthetic weights of Step3's architecture at about 200M
    /// parameters (hidden 1024, 6 layers of which 1-4 are MoE with 16 experts, top-3, plus the
    /// shared expert).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Concurrent requests per run, comma-separated.
    #[arg(long, default_value = "1,4,16,64")]
    concurrency: String,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 256, value_parser = crate::bench::at_least_one())]
    prompt_len: usize,
    /// Generated tokens per request (at least 2: the decode rate is timed after the first).
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    gen_len: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype (default: f32 on the CPU, bf16 on CUDA).
    #[arg(long)]
    dtype: Option<String>,
    /// Tokens per engine step, decodes and prompt chunks together (default: the engine's).
    #[arg(long)]
    max_batched_tokens: Option<usize>,
    /// Most prompt tokens of one request per step (default: the engine's).
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Most prompt tokens in a step that also runs decodes (default: the whole step).
    #[arg(long)]
    max_prefill_while_decoding: Option<usize>,
    /// KV cache size in GB (default: the engine's automatic size).
    #[arg(long)]
    kv_cache_gb: Option<f64>,
    /// Also list every request of each run (prompt and generated tokens, finish reason, TTFT,
    /// inter-token latency, decode rate).
    #[arg(long)]
    per_request: bool,
    /// With --model-dir: the decoder split over ranks and/or the routed experts in host memory
    /// (see docs/multi-device.md).
    #[command(flatten)]
    parallel: step3::cli::ParallelArgs,
}

/// Weight elements a decode step of `c` sequences streams: everything but the embedding, with
/// each MoE layer's routed experts counted at the number a step is expected to touch when each
/// token picks top-k of E uniformly, E·(1 − (1 − k/E)^c). Decode on a CPU is weight streaming, so
/// `c · weights(1) / weights(c)` is how far batching can raise the aggregate decode rate over one
/// sequence (the ceiling column; attention over the cache adds to both sides and is ignored).
fn streamed_weights(cfg: &step3::TextConfig, c: usize) -> f64 {
    let p = step3::param_counts(cfg);
    let (e, k) = (cfg.moe_num_experts as f64, cfg.moe_top_k as f64);
    let touched = e * (1.0 - (1.0 - k / e).powi(c as i32));
    (p.total - p.embedding - p.routed_experts) as f64 + p.routed_experts as f64 * touched / e
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// One concurrency level's figures.
struct Run {
    concurrency: usize,
    wall: Duration,
    generated: usize,
    /// Σ over requests of their decode rate (they decode side by side).
    decode_rate: f64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
    peak_blocks: usize,
}

pub fn run(a: EngineBenchArgs) -> Result<ExitCode> {
    let device = step3::parse_device(&a.device)?;
    let dtype = match &a.dtype {
        Some(d) => step3::parse_dtype(d)?,
        None => step3::default_dtype(&device),
    };
    let levels = crate::bench::list(&a.concurrency)?;
    let most = levels.iter().copied().max().unwrap_or(1);
    let defaults = EngineConfig::default();
    let config = EngineConfig {
        max_num_seqs: most,
        max_batched_tokens: a.max_batched_tokens.unwrap_or(defaults.max_batched_tokens),
        prefill_chunk: a.prefill_chunk.unwrap_or(defaults.prefill_chunk),
        kv_cache: a.kv_cache_gb.map_or(KvCacheSize::Auto, |gb| KvCacheSize::Bytes((gb * 1e9) as u64)),
        max_waiting: most.max(1024),
        max_prefill_while_decoding: a.max_prefill_while_decoding,
        ..Default::default()
    };
    let (engine, what) = match &a.model_dir {
        Some(dir) => {
            let experts = a.parallel.expert_placement()?;
            let layout = a.parallel.layout()?;
            let what = format!("{} (tp {} × ep {}, experts {experts:?})", dir.display(), layout.tp, layout.ep);
            let opts = step3::LoadOptions { dtype, device: device.clone(), layout, experts, ..Default::default() };
            (Engine::load(dir, &opts, config)?, what)
        }
        None => {
            if !a.parallel.is_single() {
                anyhow::bail!(
                    "--tp, --ep, --moe-device and --n-cpu-moe need --model-dir (the synthetic model is built unsharded)"
                );
            }
            let cfg = crate::synthetic::bench_200m()?;
            let vb = candle_nn::VarBuilder::from_backend(
                Box::new(crate::synthetic::Synthetic::new(&cfg, false).random()),
                dtype,
                device.clone(),
            );
            let text = step3::Step3TextModel::new(&cfg, WeightFormat::Dense, vb)?;
            let p = step3::param_counts(&cfg);
            let model = step3::Step3Model {
                text,
                vision: None,
                image_token_id: None,
                preprocess: step3::PreprocessConfig::default(),
            };
            let what = format!(
                "synthetic Step3 ({:.0}M parameters, {:.1}M active per token)",
                p.total as f64 / 1e6,
                p.active_per_token as f64 / 1e6
            );
            (Engine::new(model, None, GenerationConfig::default(), config)?, what)
        }
    };
    let text_cfg = engine.model().text.config().clone();
    let vocab = text_cfg.vocab_size as u32;
    println!(
        "engine bench: {what}, {dtype:?} on {}, prompt {} + {} generated tokens per request; {} KV blocks of {}, \
         {} tokens per step, prefill chunk {}, {} threads",
        a.device,
        a.prompt_len,
        a.gen_len,
        engine.kv_blocks(),
        engine.config().block_size,
        engine.config().max_batched_tokens,
        engine.config().prefill_chunk,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "?".into()),
    );
    // Warm-up: one short request.
    let warm = GenerateOptions { temperature: Some(0.0), max_new_tokens: 4, ignore_eos: true, ..Default::default() };
    engine.submit(Request::tokens(vec![1; 16], warm))?.wait();

    let mut runs = Vec::new();
    let mut salt = 0u32;
    for &c in &levels {
        runs.push(run_level(&engine, c, a.prompt_len, a.gen_len, vocab, &mut salt, a.per_request)?);
    }
    print_table(&runs, &text_cfg);
    Ok(ExitCode::SUCCESS)
}

fn run_level(
    engine: &Engine,
    c: usize,
    prompt_len: usize,
    gen_len: usize,
    vocab: u32,
    salt: &mut u32,
    per_request: bool,
) -> Result<Run> {
    let opts =
        GenerateOptions { temperature: Some(0.0), max_new_tokens: gen_len, ignore_eos: true, ..Default::default() };
    // Distinct prompts, so the prefix cache does not help.
    let prompts: Vec<Vec<u32>> = (0..c)
        .map(|_| {
            *salt += 1;
            let s = *salt;
            (0..prompt_len as u32).map(|i| (i.wrapping_mul(2654435761) ^ s.wrapping_mul(40503)) % vocab).collect()
        })
        .collect();
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (peak, done) = (peak.clone(), done.clone());
        let metrics = move || engine.metrics().kv_blocks_used;
        std::thread::scope(|scope| -> Result<(Duration, Vec<Completion>)> {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(metrics(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            let start = Instant::now();
            let completions = prompts
                .into_iter()
                .map(|p| engine.submit(Request::tokens(p, opts.clone())))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(|handles| handles.into_iter().map(|h| h.wait()).collect::<Vec<Completion>>());
            let wall = start.elapsed();
            // The watcher stops whatever happened (a refused request must not leave it running:
            // the scope would wait for it for ever).
            done.store(true, Ordering::Relaxed);
            let completions = completions.context("submitting the benchmark requests")?;
            Ok((wall, completions))
        })?
    };
    let (wall, completions) = watcher;
    let mut ttft: Vec<f64> = Vec::new();
    let mut itl: Vec<f64> = Vec::new();
    let (mut generated, mut decode_rate) = (0, 0.0);
    for c in &completions {
        if let Some(e) = &c.outcome.error {
            anyhow::bail!("a benchmark request failed: {e}");
        }
        let s = &c.outcome.stats;
        generated += s.generated_tokens;
        ttft.push(s.time_to_first_token.as_secs_f64());
        itl.extend(s.token_latencies.iter().map(Duration::as_secs_f64));
        decode_rate += s.decode_tokens_per_sec();
    }
    if per_request {
        println!("\nconcurrency {c}, {:.2} s wall:", wall.as_secs_f64());
        println!("| request | prompt tokens | generated | finish | TTFT ms | ITL mean / max ms | decode tok/s |");
        println!("|---|---|---|---|---|---|---|");
        for (i, c) in completions.iter().enumerate() {
            let s = &c.outcome.stats;
            let lat: Vec<f64> = s.token_latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
            let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
            println!(
                "| {i} | {} | {} | {:?} | {:.0} | {:.1} / {:.1} | {:.1} |",
                s.prompt_tokens,
                s.generated_tokens,
                c.outcome.finish,
                s.time_to_first_token.as_secs_f64() * 1e3,
                mean,
                lat.iter().copied().fold(0.0, f64::max),
                s.decode_tokens_per_sec()
            );
        }
    }
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    Ok(Run { concurrency: c, wall, generated, decode_rate, ttft, itl, peak_blocks: peak.load(Ordering::Relaxed) })
}

fn print_table(runs: &[Run], cfg: &step3::TextConfig) {
    let base = runs.iter().find(|r| r.concurrency == 1);
    let ms = |s: f64| s * 1e3;
    println!(
        "\n| concurrency | output tok/s | decode tok/s (aggregate) | × single | weight-streaming ceiling × | TTFT p50 / p99 ms | ITL p50 / p99 ms | ITL p99 × single | peak KV blocks |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let output = r.generated as f64 / r.wall.as_secs_f64();
        let itl99 = percentile(&r.itl, 0.99);
        let (x_rate, x_itl) = match base {
            Some(b) => {
                (format!("{:.2}×", r.decode_rate / b.decode_rate), format!("{:.2}×", itl99 / percentile(&b.itl, 0.99)))
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {:.1} | {:.1} | {} | {:.2}× | {:.0} / {:.0} | {:.1} / {:.1} | {} | {} |",
            r.concurrency,
            output,
            r.decode_rate,
            x_rate,
            r.concurrency as f64 * streamed_weights(cfg, 1) / streamed_weights(cfg, r.concurrency),
            ms(percentile(&r.ttft, 0.5)),
            ms(percentile(&r.ttft, 0.99)),
            ms(percentile(&r.itl, 0.5)),
            ms(itl99),
            x_itl,
            r.peak_blocks
        );
    }
}
