//! `step3 bench`: micro-benchmarks with synthetic weights at Step3's real dimensions, each line
//! printing a ratio against a baseline measured in the same process.

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
}

#[derive(Args)]
struct VitArgs {
    /// Encoder layers actually run (the time is extrapolated to 63).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 1)]
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
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: BenchArgs) -> Result<ExitCode> {
    match a.what {
        BenchKind::Fp8(a) => fp8(a),
        BenchKind::Vit(a) => vit(a),
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
    let dtype = crate::parse_dtype(&a.dtype)?;
    let device = crate::parse_device(&a.device)?;
    let tokens: Vec<usize> = a.tokens.split(',').map(|t| t.trim().parse()).collect::<Result<_, _>>()?;
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
    let dtype = crate::parse_dtype(&a.dtype)?;
    let device = crate::parse_device(&a.device)?;
    let full_layers = 63;
    let mut cfg = step3::VisionConfig {
        hidden_size: 1792,
        intermediate_size: 15360,
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
