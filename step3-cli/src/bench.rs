//! `step3 bench`: micro-benchmarks with synthetic weights at Step3's real dimensions, each line
//! printing a ratio against a baseline measured in the same process.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};

use clap::{Args, Subcommand};
use step3::{BlockFp8, Weight};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchKind,
}

#[derive(Subcommand)]
enum BenchKind {
    /// Block-FP8 linear layers: dequantise per matmul (compact weights) versus a weight dequantised
    /// once at load (the baseline), at the shapes of Step3's projections.
    Fp8(Fp8Args),
    /// The vision tower at Step3's dimensions (1792 wide, 16 heads, MLP 15360), a few layers timed
    /// and extrapolated to 63, for a 728-px global view and a 504-px crop.
    Vit(VitArgs),
    /// One MFA attention layer (projections included), one decode step, batch × context.
    Attention(AttentionArgs),
    /// One MoE layer (router, 3 routed experts, shared expert), bf16 and block-FP8 weights.
    Moe(MoeArgs),
    /// A decode step of a truncated Step3 (2 dense + 2 MoE layers) end to end.
    Decode(DecodeArgs),
    /// Whole-model decode on the CPU against its memory-bandwidth floor: a synthetic ~200M Step3
    /// (hidden 1024, 6 layers, 1-4 MoE with 16 experts top-3 + shared; random weights), per weight
    /// dtype: prefill, greedy decode of one sequence and of a batch.
    DecodeModel(DecodeModelArgs),
    /// The device's ceilings, then attention, MoE and decode with their defaults.
    All(Common),
    /// The serving engine under load: concurrent requests, aggregate rates, TTFT and inter-token
    /// latency percentiles, peak KV blocks.
    Engine(crate::bench_engine::EngineBenchArgs),
    /// Load on a running OpenAI-compatible server: requests/s, output tokens/s, TTFT and
    /// inter-token latency percentiles per concurrency.
    Serve(crate::bench_serve::ServeBenchArgs),
    /// The CPU kernels alone: every product of one decode step of the ~200M model, grouped as
    /// the model hands them to the thread pool, against the read bandwidth measured in the run.
    Products(crate::bench_products::ProductsArgs),
}

/// What every layer benchmark shares.
#[derive(Args, Clone)]
pub struct Common {
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 5, value_parser = at_least_one())]
    iters: usize,
    /// Divide Step3's widths by this (hidden, query rank, heads, MLP and expert widths; 1 = real).
    #[arg(long, default_value_t = 1, value_parser = at_least_one())]
    scale: usize,
    /// A python with PyTorch: runs bench/torch_baseline.py on the same shapes, as the peer.
    #[arg(long)]
    torch: Option<String>,
}

#[derive(Args)]
struct AttentionArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value = "1,16,64")]
    batches: String,
    #[arg(long, default_value = "4096,8192,32768")]
    contexts: String,
}

#[derive(Args)]
struct MoeArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value = "1,64,256,2048")]
    tokens: String,
}

#[derive(Args)]
struct DecodeArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 16, value_parser = at_least_one())]
    batch: usize,
    #[arg(long, default_value_t = 4096, value_parser = at_least_one())]
    context: usize,
}

#[derive(Args)]
struct DecodeModelArgs {
    /// Weight dtypes, comma-separated: f32, bf16, fp8 (block-FP8 e4m3 computing in bf16; the
    /// embedding and lm_head stay bf16).
    #[arg(long, default_value = "f32,bf16,fp8")]
    weights: String,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 256, value_parser = at_least_one())]
    prompt: usize,
    /// Greedy tokens generated per sequence.
    #[arg(long, default_value_t = 64, value_parser = at_least_one())]
    tokens: usize,
    /// Sequences of the batched run (compared with one sequence).
    #[arg(long, default_value_t = 8, value_parser = at_least_one())]
    batch: usize,
    /// A python with PyTorch: the same model (same shapes, random weights) prefilled and decoded
    /// by PyTorch eager (bench/torch_baseline.py with the fixtures' step3_ref.py), f32 and bf16.
    #[arg(long)]
    torch: Option<String>,
}

#[derive(Args)]
struct VitArgs {
    /// Encoder layers actually run (the time is extrapolated to 63).
    #[arg(long, default_value_t = 2, value_parser = at_least_one())]
    layers: usize,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 1, value_parser = at_least_one())]
    iters: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct Fp8Args {
    /// Tokens per matmul (comma-separated).
    #[arg(long, default_value = "1,16")]
    tokens: String,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = at_least_one())]
    iters: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: BenchArgs) -> Result<ExitCode> {
    match a.what {
        BenchKind::Fp8(a) => fp8(a),
        BenchKind::Vit(a) => vit(a),
        BenchKind::Attention(a) => {
            let c = Ctx::new(&a.common)?;
            attention(&c, &list(&a.batches)?, &list(&a.contexts)?)
        }
        BenchKind::Moe(a) => {
            let c = Ctx::new(&a.common)?;
            moe(&c, &list(&a.tokens)?)
        }
        BenchKind::Decode(a) => {
            let c = Ctx::new(&a.common)?;
            decode(&c, a.batch, a.context)
        }
        BenchKind::DecodeModel(a) => decode_model(a),
        BenchKind::Engine(a) => crate::bench_engine::run(a),
        BenchKind::Serve(a) => crate::bench_serve::run(a),
        BenchKind::Products(a) => crate::bench_products::run(a),
        BenchKind::All(common) => {
            let c = Ctx::new(&common)?;
            attention(&c, &[1, 16, 64], &[4096, 8192, 32768])?;
            moe(&c, &[1, 64, 256, 2048])?;
            decode(&c, 16, 4096)
        }
    }
}

/// Median wall time of `f` in microseconds over `iters` runs after one warm-up.
pub fn time_us(iters: usize, device: &Device, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        let out = f()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
        drop(out);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Random block-FP8 weight `[rows, cols]` (finite values only) with scales around 1/448.
fn random_fp8(rows: usize, cols: usize, dtype: DType, device: &Device) -> Result<BlockFp8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let bytes: Vec<float8::F8E4M3> = (0..rows * cols)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Exponent field below 15 keeps clear of the NaN encodings.
            float8::F8E4M3::from_bits((state as u8) & 0b1111_0111)
        })
        .collect();
    let values = Tensor::from_vec(bytes, (rows, cols), device)?;
    let sdims = BlockFp8::scale_dims(&[rows, cols], [128, 128])?;
    let scales = (Tensor::rand(0.5f32, 1.5, sdims.as_slice(), device)? / 448.0)?;
    Ok(BlockFp8::new(values, scales, [128, 128], dtype)?)
}

fn fp8(a: Fp8Args) -> Result<ExitCode> {
    let dtype = step3::parse_dtype(&a.dtype)?;
    let device = step3::parse_device(&a.device)?;
    let tokens = list(&a.tokens)?;
    let shapes = [
        ("q_proj", 2048, 7168),
        ("wq", 16384, 2048),
        ("o_proj", 7168, 16384),
        ("expert gate/up", 5120, 7168),
        ("expert down", 7168, 5120),
    ];
    println!("block-FP8 linear on {} in {dtype:?}, median of {} runs", a.device, a.iters);
    println!(
        "{:<16} {:>13} {:>6} {:>14} {:>14} {:>14} {:>9}",
        "layer", "[out, in]", "tokens", "dense µs", "dequant µs", "compact µs", "compact/dense"
    );
    for (name, rows, cols) in shapes {
        let q = random_fp8(rows, cols, dtype, &device)?;
        let dense = step3::Linear::from_weight(Weight::Dense(q.dequantize()?), None);
        let compact = step3::Linear::from_weight(Weight::BlockFp8(q.clone()), None);
        let dequant = time_us(a.iters, &device, || Ok(q.dequantize()?))?;
        for &t in &tokens {
            let x = Tensor::randn(0f32, 1.0, (t, cols), &device)?.to_dtype(dtype)?;
            let base = time_us(a.iters, &device, || Ok(dense.forward(&x)?))?;
            let fly = time_us(a.iters, &device, || Ok(compact.forward(&x)?))?;
            println!(
                "{name:<16} {:>13} {t:>6} {base:>14.0} {dequant:>14.0} {fly:>14.0} {:>9.2}x",
                format!("[{rows}, {cols}]"),
                fly / base
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn vit(a: VitArgs) -> Result<ExitCode> {
    let dtype = step3::parse_dtype(&a.dtype)?;
    let device = step3::parse_device(&a.device)?;
    let full_layers = 63;
    let mut cfg = step3::VisionConfig {
        hidden_size: 1792,
        intermediate_size: Some(15360),
        num_hidden_layers: 0,
        num_attention_heads: 16,
        num_channels: 3,
        image_size: 728,
        patch_size: 14,
        layer_norm_eps: 1e-6,
        output_hidden_size: 4096,
        projector_stride: 2,
        projector_bias: false,
        text_hidden_size: 7168,
    };
    // Weights are constant (zeros): the arithmetic is the same as with real ones.
    let vb = candle_nn::VarBuilder::zeros(dtype, &device);
    let bare = step3::VisionModel::new(&cfg, Some(504), vb.clone())?;
    cfg.num_hidden_layers = a.layers;
    let tower = step3::VisionModel::new(&cfg, Some(504), vb)?;
    println!("Step3 ViT on {} in {dtype:?}: {} of {full_layers} layers run, median of {}", a.device, a.layers, a.iters);
    println!(
        "{:<14} {:>7} {:>12} {:>12} {:>14} {:>10}",
        "view", "tokens", "layer ms", "convs ms", "63 layers s", "GFLOP/s"
    );
    for (view, size) in [("global 728px", 728usize), ("crop 504px", 504)] {
        let px = Tensor::zeros((1, 3, size, size), DType::F32, &device)?;
        let base = time_us(a.iters, &device, || Ok(bare.forward(&px)?))?;
        let with = time_us(a.iters, &device, || Ok(tower.forward(&px)?))?;
        let layer_us = (with - base).max(0.0) / a.layers.max(1) as f64;
        let t = (size / 14) * (size / 14) + 4;
        let (d, i) = (1792f64, 15360f64);
        let flops =
            2.0 * t as f64 * d * 3.0 * d + 4.0 * (t * t) as f64 * d + 2.0 * t as f64 * d * d + 4.0 * t as f64 * d * i;
        println!(
            "{view:<14} {t:>7} {:>12.0} {:>12.0} {:>14.1} {:>10.1}",
            layer_us / 1e3,
            base / 1e3,
            (full_layers as f64 * layer_us + base) / 1e6,
            flops / (layer_us * 1e3)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A comma-separated list of counts, each at least 1.
pub(crate) fn list(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|v| match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            Ok(_) => Err(anyhow::anyhow!("`{v}`: each value must be at least 1")),
            Err(_) => Err(anyhow::anyhow!("`{v}` is not a number")),
        })
        .collect()
}

/// A count flag that must be at least 1.
pub(crate) fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

/// The device, the dtype and the device's measured ceilings, shared by the layer benchmarks.
struct Ctx {
    common: Common,
    device: Device,
    dtype: DType,
    /// Memory bandwidth, bytes/s: on the CPU a streaming read on every core
    /// ([`read_bandwidth`]), on a GPU a large device copy.
    read_bps: f64,
    /// Dense matmul rate in `dtype`, FLOP/s.
    matmul_flops: f64,
}

impl Ctx {
    fn new(common: &Common) -> Result<Self> {
        let device = step3::parse_device(&common.device)?;
        let dtype = step3::parse_dtype(&common.dtype)?;
        let (read_bps, how) = if device.is_cuda() {
            let n = 512usize << 20;
            let x = Tensor::zeros(n / dtype.size_in_bytes(), dtype, &device)?;
            let t = time_us(common.iters, &device, || Ok(x.copy()?))?;
            (2.0 * n as f64 / (t * 1e-6), "copy")
        } else {
            (read_bandwidth(1 << 30, common.iters), "streaming read (all cores, 1 GiB)")
        };
        let m = if device.is_cuda() { 8192usize } else { 1536 };
        let a = Tensor::randn(0f32, 1.0, (m, m), &device)?.to_dtype(dtype)?;
        let t = time_us(common.iters, &device, || Ok(a.matmul(&a)?))?;
        let matmul_flops = 2.0 * (m as f64).powi(3) / (t * 1e-6);
        println!(
            "device {} ({dtype:?}): {how} {:.1} GB/s, {m}x{m} matmul {:.2} TFLOP/s (the roofline ceilings below)",
            common.device,
            read_bps / 1e9,
            matmul_flops / 1e12
        );
        Ok(Self { common: common.clone(), device, dtype, read_bps, matmul_flops })
    }

    fn roofline_us(&self, bytes: f64, flops: f64) -> f64 {
        (bytes / self.read_bps).max(flops / self.matmul_flops) * 1e6
    }

    /// Runs the PyTorch eager peer on the same shapes: case name -> µs.
    fn torch(&self, which: &str, cfg: serde_json::Value) -> HashMap<String, f64> {
        let Some(py) = &self.common.torch else { return HashMap::new() };
        torch_peer(py, which, &cfg, "us")
    }

    /// Synthetic weights: zeros (cheap at any size), or with `random` real random memory, which
    /// a memory-bound measurement on the CPU needs (zero pages all map one physical page).
    fn vb(&self, cfg: &step3::TextConfig, fp8: bool, random: bool) -> candle_nn::VarBuilder<'static> {
        let synthetic = crate::synthetic::Synthetic::new(cfg, fp8);
        candle_nn::VarBuilder::from_backend(
            Box::new(if random { synthetic.random() } else { synthetic }),
            self.dtype,
            self.device.clone(),
        )
    }
}

/// Runs `bench/torch_baseline.py WHICH --json CFG` with the python `py`: case name -> the
/// figure `field` of each JSON line it prints. A failing peer is reported and gives nothing.
fn torch_peer(py: &str, which: &str, cfg: &serde_json::Value, field: &str) -> HashMap<String, f64> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/torch_baseline.py");
    let script = if script.is_file() { script } else { std::path::PathBuf::from("bench/torch_baseline.py") };
    let out = std::process::Command::new(py).arg(&script).arg(which).arg("--json").arg(cfg.to_string()).output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v.get("case")?.as_str()?.to_string(), v.get(field)?.as_f64()?)))
            .collect(),
        Ok(o) => {
            eprintln!("torch baseline failed: {}", String::from_utf8_lossy(&o.stderr));
            HashMap::new()
        }
        Err(e) => {
            eprintln!("torch baseline: cannot run {py}: {e}");
            HashMap::new()
        }
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

fn attention(c: &Ctx, batches: &[usize], contexts: &[usize]) -> Result<ExitCode> {
    use step3::mfa::{KvCache, MfaAttention, RotaryEmbedding, SequenceTable};
    let cfg = crate::synthetic::config(c.common.scale, 1, &[])?;
    let attn = MfaAttention::new(
        &step3::mfa_config(&cfg, step3::WeightFormat::Dense),
        c.vb(&cfg, false, false).pp("model.layers.0.self_attn"),
    )?;
    let rope = RotaryEmbedding::new(cfg.rope_theta, cfg.head_dim, &c.device)?;
    let (h, q, nh, d) = (cfg.hidden_size, cfg.share_q_dim, cfg.num_attention_heads, cfg.head_dim);
    let params = (h * q + 2 * h * d + q * nh * d + nh * d * h) as f64;
    let wb = c.dtype.size_in_bytes() as f64;
    let torch = c.torch("attention", serde_json::json!({"hidden": h, "share_q": q, "heads": nh, "batches": batches, "contexts": contexts, "iters": c.common.iters, "dtype": c.common.dtype}));
    println!("\nMFA attention layer, one decode step (hidden {h}, q {q}, {nh} heads x {d}, 1 K/V head)");
    println!(
        "{:>5} {:>7} {:>10} {:>8} {:>9} {:>12} {:>7} {:>10} {:>9} {:>14}",
        "batch",
        "context",
        "us/layer",
        "GB/s",
        "TFLOP/s",
        "roofline us",
        "ratio",
        "torch us",
        "vs torch",
        "paper H800 us"
    );
    for &b in batches {
        for &ctx in contexts {
            let mut cache = KvCache::new(ctx + 1);
            let kv = Tensor::randn(0f32, 1.0, (b, ctx, d), &c.device)?.to_dtype(c.dtype)?;
            cache.append(&kv, &kv)?;
            let mut table = SequenceTable::new(b, ctx + 1, 65536)?;
            table.advance(&vec![ctx; b], ctx);
            let step = table.step(&vec![1; b], 1, &rope, c.dtype, &c.device)?;
            let x = Tensor::randn(0f32, 1.0, (b, 1, h), &c.device)?.to_dtype(c.dtype)?;
            let us = time_us(c.common.iters, &c.device, || {
                let y = attn.forward(&x, &rope, &step, &mut cache)?;
                cache.truncate(ctx);
                Ok(y)
            })?;
            let bytes = params * wb + (b * ctx * 2 * d) as f64 * wb;
            let flops = 2.0 * b as f64 * params + 4.0 * (b * nh * ctx * d) as f64;
            let roof = c.roofline_us(bytes, flops);
            let t = torch.get(&format!("b{b}_c{ctx}")).copied();
            let paper = match (b, ctx, c.common.scale) {
                (64, 8192, 1) => Some(281.0),
                (64, 32768, 1) => Some(791.0),
                _ => None,
            };
            println!(
                "{b:>5} {ctx:>7} {us:>10.0} {:>8.0} {:>9.2} {roof:>12.0} {:>6.2}x {:>10} {:>9} {:>14}",
                bytes / us / 1e3,
                flops / us / 1e6,
                us / roof,
                fmt_opt(t),
                t.map_or("-".into(), |t| format!("{:.2}x", us / t)),
                fmt_opt(paper)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn moe(c: &Ctx, tokens: &[usize]) -> Result<ExitCode> {
    use step3::moe::MoeBlock;
    let cfg = crate::synthetic::config(c.common.scale, 2, &[1])?;
    let (h, i, e, k) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_num_experts, cfg.moe_top_k);
    let torch = c.torch("moe", serde_json::json!({"hidden": h, "inter": i, "tokens": tokens, "iters": c.common.iters, "dtype": c.common.dtype}));
    println!(
        "\nMoE layer (hidden {h}, {e} experts x {i}, top-{k}, + shared {i}): router, routed experts, shared expert"
    );
    println!(
        "{:>7} {:>6} {:>8} {:>10} {:>8} {:>9} {:>12} {:>7} {:>10} {:>9}",
        "weights", "tokens", "experts", "us/layer", "GB/s", "TFLOP/s", "roofline us", "ratio", "torch us", "vs torch"
    );
    for fp8 in [false, true] {
        let format = if fp8 {
            step3::WeightFormat::BlockFp8 { block: [128, 128], dequantize_at_load: false }
        } else {
            step3::WeightFormat::Dense
        };
        // On the CPU the experts are random (real memory, ~11 GB in bf16 at --scale 1): decode
        // there streams them from DRAM, which zero pages would hide. One format at a time.
        let random = !c.device.is_cuda();
        let block = MoeBlock::new(&step3::moe_config(&cfg, format), c.vb(&cfg, fp8, random).pp("model.layers.1"))?;
        for &t in tokens {
            let x = Tensor::randn(0f32, 1.0, (t, h), &c.device)?.to_dtype(c.dtype)?;
            let (_, routing) = block.forward(&x)?;
            let mut ids: Vec<u32> = routing.ids.flatten_all()?.to_vec1()?;
            ids.sort_unstable();
            ids.dedup();
            let us = time_us(c.common.iters, &c.device, || Ok(block.forward(&x)?.0))?;
            let per = if fp8 { 1.0 + 4.0 / (128.0 * 128.0) } else { c.dtype.size_in_bytes() as f64 };
            let expert = 3.0 * (h * i) as f64;
            let bytes = (ids.len() as f64 + 1.0) * expert * per + (e * h * 2) as f64;
            let flops = 2.0 * t as f64 * ((k + 1) as f64 * expert + (e * h) as f64);
            let roof = c.roofline_us(bytes, flops);
            let tt = if fp8 { None } else { torch.get(&format!("t{t}")).copied() };
            println!(
                "{:>7} {t:>6} {:>8} {us:>10.0} {:>8.0} {:>9.2} {roof:>12.0} {:>6.2}x {:>10} {:>9}",
                if fp8 { "fp8".to_string() } else { format!("{:?}", c.dtype).to_lowercase() },
                ids.len(),
                bytes / us / 1e3,
                flops / us / 1e6,
                us / roof,
                fmt_opt(tt),
                tt.map_or("-".into(), |tt| format!("{:.2}x", us / tt))
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn decode(c: &Ctx, batch: usize, context: usize) -> Result<ExitCode> {
    let cfg = crate::synthetic::config(c.common.scale, 4, &[2, 3])?;
    let model = step3::Step3TextModel::new(&cfg, step3::WeightFormat::Dense, c.vb(&cfg, false, false))?;
    let mut cache = model.new_cache(batch, context + 1)?;
    let prompt = Tensor::zeros((batch, context), DType::U32, &c.device)?;
    model.forward(&prompt, &vec![context; batch], &mut cache, None)?;
    let ids = Tensor::zeros((batch, 1), DType::U32, &c.device)?;
    let start = std::time::Instant::now();
    let mut times = Vec::new();
    for _ in 0..c.common.iters.max(1) {
        let mut step = cache.clone();
        let t = Instant::now();
        let h = model.forward(&ids, &vec![1; batch], &mut step, None)?;
        let _ = model.logits(&h)?;
        c.device.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let us = times[times.len() / 2];
    println!("\nDecode step, truncated Step3 (layers 0-1 dense, 2-3 MoE, lm_head), batch {batch}, context {context}");
    println!(
        "{us:.0} us per step ({:.0} us per layer incl. lm_head share), {:.0} tokens/s for the batch ({:.1} s measuring)",
        us / 4.0,
        batch as f64 / (us * 1e-6),
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// The machine's streaming read bandwidth in bytes/s: `bytes` of non-zero memory (real pages, not
/// the shared zero page) summed as u64 by every core on its own contiguous share, best of `iters`
/// passes after one warm-up. This is the ceiling a weight-streaming decode can reach.
pub fn read_bandwidth(bytes: usize, iters: usize) -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = bytes / 8;
    let share = n.div_ceil(threads);
    let mut buf = vec![0u64; n];
    std::thread::scope(|s| {
        for (t, c) in buf.chunks_mut(share).enumerate() {
            s.spawn(move || {
                for (i, v) in c.iter_mut().enumerate() {
                    *v = ((t * share + i) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                }
            });
        }
    });
    fn sum(c: &[u64]) -> u64 {
        let mut acc = [0u64; 8];
        for ch in c.chunks_exact(8) {
            for (a, v) in acc.iter_mut().zip(ch) {
                *a = a.wrapping_add(*v);
            }
        }
        acc.iter().fold(0, |a, b| a.wrapping_add(*b))
    }
    let mut best = 0f64;
    for _ in 0..iters.max(1) + 1 {
        let start = Instant::now();
        let total = std::thread::scope(|s| {
            let handles: Vec<_> = buf.chunks(share).map(|c| s.spawn(move || sum(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((n * 8) as f64 / start.elapsed().as_secs_f64());
    }
    best
}

/// Bytes of weights one decoded token reads: every tensor but the embedding (one row) and the
/// experts the router did not choose (`top_k` of `moe_num_experts`); block-FP8 tensors at one
/// byte per value plus their f32 scales, the rest at `dtype`'s size.
fn active_bytes_per_token(cfg: &step3::TextConfig, dtype: DType, fp8: bool) -> f64 {
    let expert_share = cfg.moe_top_k as f64 / cfg.moe_num_experts as f64;
    step3::inventory::text_tensors(cfg)
        .iter()
        .filter(|t| t.name != "model.embed_tokens.weight")
        .map(|t| {
            let per = if fp8 && t.quantizable { 1.0 + 4.0 / (128.0 * 128.0) } else { dtype.size_in_bytes() as f64 };
            let routed = t.name.contains(".moe.") && !t.name.contains(".moe.gate.");
            t.numel() as f64 * per * if routed { expert_share } else { 1.0 }
        })
        .sum()
}

/// Prefill of `batch` prompts of `prompt` tokens, then `tokens` greedy steps; (prefill s, decode s).
fn greedy_run(model: &step3::Step3TextModel, batch: usize, prompt: usize, tokens: usize) -> Result<(f64, f64)> {
    let dev = Device::Cpu;
    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = (0..(batch * prompt) as u32).map(|i| i.wrapping_mul(2_654_435_761) % vocab).collect();
    let mut cache = model.new_cache(batch, prompt + tokens)?;
    let start = Instant::now();
    let h = model.forward(&Tensor::from_vec(ids, (batch, prompt), &dev)?, &vec![prompt; batch], &mut cache, None)?;
    let mut next = model.logits(&h.narrow(1, prompt - 1, 1)?)?.argmax(candle_core::D::Minus1)?;
    next.to_vec2::<u32>()?;
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..tokens {
        let h = model.forward(&next, &vec![1; batch], &mut cache, None)?;
        next = model.logits(&h)?.argmax(candle_core::D::Minus1)?;
        next.to_vec2::<u32>()?;
    }
    Ok((prefill, start.elapsed().as_secs_f64()))
}

fn decode_model(a: DecodeModelArgs) -> Result<ExitCode> {
    if a.prompt == 0 || a.tokens == 0 || a.batch == 0 {
        anyhow::bail!("--prompt, --tokens and --batch must be at least 1")
    }
    // Issue 15's checkpoint: the engine benchmark's ~200M model with a dense FFN of 1024, which
    // makes 204M parameters, 89.5M of them active per token.
    let mut cfg = crate::synthetic::bench_200m()?;
    cfg.intermediate_size = 1024;
    let p = step3::param_counts(&cfg);
    let bw = read_bandwidth(1 << 30, 5);
    println!(
        "synthetic Step3: {:.1}M parameters, {:.1}M active per token; CPU kernels: {}",
        p.total as f64 / 1e6,
        p.active_per_token as f64 / 1e6,
        step3::nn::cpu::describe()
    );
    println!("streaming read bandwidth (all {} cores, 1 GiB): {:.1} GB/s", rayon_threads(), bw / 1e9);
    println!("prompt {}, {} greedy tokens; floor = bandwidth / active bytes per token", a.prompt, a.tokens);
    let torch_cols = a.torch.is_some();
    print!(
        "{:>7} {:>10} {:>12} {:>12} {:>10} {:>7} {:>14} {:>9}",
        "weights",
        "MB/token",
        "prefill t/s",
        "decode t/s",
        "floor t/s",
        "ratio",
        format!("batch {} t/s", a.batch),
        "vs batch 1"
    );
    if torch_cols {
        print!(" {:>13} {:>12} {:>9}", "torch prefill", "torch decode", "vs torch");
    }
    println!();
    for w in a.weights.split(',').map(str::trim) {
        let (dtype, fp8) = match w {
            "f32" => (DType::F32, false),
            "bf16" => (DType::BF16, false),
            "fp8" => (DType::BF16, true),
            other => anyhow::bail!("--weights: `{other}` is not one of f32, bf16, fp8"),
        };
        let format = if fp8 {
            step3::WeightFormat::BlockFp8 { block: [128, 128], dequantize_at_load: false }
        } else {
            step3::WeightFormat::Dense
        };
        let vb = candle_nn::VarBuilder::from_backend(
            Box::new(crate::synthetic::Synthetic::new(&cfg, fp8).random()),
            dtype,
            Device::Cpu,
        );
        // PyTorch first, in its own process, so the two models are never in memory together.
        let torch = match (&a.torch, fp8) {
            (Some(py), false) => {
                let tensors: Vec<_> =
                    step3::inventory::text_tensors(&cfg).into_iter().map(|t| (t.name, t.shape)).collect();
                let spec = serde_json::json!({"config": cfg, "tensors": tensors, "prompt": a.prompt,
                                              "tokens": a.tokens, "dtype": w});
                torch_peer(py, "decode-model", &spec, "tok_s")
            }
            _ => HashMap::new(),
        };
        let model = step3::Step3TextModel::new(&cfg, format, vb)?;
        let active = active_bytes_per_token(&cfg, dtype, fp8);
        let (prefill, decode) = greedy_run(&model, 1, a.prompt, a.tokens)?;
        let (_, decode_b) = greedy_run(&model, a.batch, a.prompt, a.tokens)?;
        let tps = a.tokens as f64 / decode;
        let floor = bw / active;
        let tps_b = (a.batch * a.tokens) as f64 / decode_b;
        print!(
            "{w:>7} {:>10.1} {:>12.0} {tps:>12.1} {floor:>10.1} {:>6.2}x {tps_b:>14.1} {:>8.2}x",
            active / 1e6,
            a.prompt as f64 / prefill,
            tps / floor,
            tps_b / tps
        );
        if torch_cols {
            let (tp, td) = (torch.get("prefill").copied(), torch.get("decode").copied());
            print!(
                " {:>13} {:>12} {:>9}",
                fmt_opt(tp),
                td.map_or("-".into(), |t| format!("{t:.1}")),
                td.map_or("-".into(), |t| format!("{:.2}x", tps / t))
            );
        }
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
