//! Criterion benchmarks of the CPU kernels Step3 spends its time in, at Step3's shapes where a CPU
//! can hold them and at 1/8 width otherwise: `cargo bench -p step3-model`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use step3_model::mfa::{KvCache, MfaAttention, MfaConfig, RotaryEmbedding, SequenceTable};
use step3_model::moe::{MoeBlock, MoeConfig};
use step3_model::{BlockFp8, Linear, Weight, WeightFormat};

fn fp8_weight(rows: usize, cols: usize, dtype: DType) -> BlockFp8 {
    let dev = Device::Cpu;
    let bits: Vec<float8::F8E4M3> =
        (0..rows * cols).map(|i| float8::F8E4M3::from_bits(((i * 37) % 119) as u8)).collect();
    let values = Tensor::from_vec(bits, (rows, cols), &dev).unwrap();
    let scales = Tensor::ones((rows.div_ceil(128), cols.div_ceil(128)), DType::F32, &dev).unwrap();
    BlockFp8::new(values, scales, [128, 128], dtype).unwrap()
}

fn linear(c: &mut Criterion) {
    step3_model::init_cpu_threads();
    let dev = Device::Cpu;
    let (out, inp) = (2048, 7168); // q_proj
    let x32 = Tensor::randn(0f32, 1.0, (1, inp), &dev).unwrap();
    let q = fp8_weight(out, inp, DType::F32);
    let dense32 = Linear::from_weight(Weight::Dense(q.dequantize().unwrap()), None);
    let compact32 = Linear::from_weight(Weight::BlockFp8(q.clone()), None);
    let qb = fp8_weight(out, inp, DType::BF16);
    let dense16 = Linear::from_weight(Weight::Dense(qb.dequantize().unwrap()), None);
    let xb = x32.to_dtype(DType::BF16).unwrap();
    let mut g = c.benchmark_group("q_proj 2048x7168, 1 token");
    g.sample_size(20);
    g.bench_function("f32 dense", |b| b.iter(|| dense32.forward(&x32).unwrap()));
    g.bench_function("f32 from block-fp8", |b| b.iter(|| compact32.forward(&x32).unwrap()));
    g.bench_function("bf16 dense (tiled widening)", |b| b.iter(|| dense16.forward(&xb).unwrap()));
    g.bench_function("dequantize block-fp8 to f32", |b| b.iter(|| q.dequantize().unwrap()));
    g.finish();
}

fn norm_and_rope(c: &mut Criterion) {
    step3_model::init_cpu_threads();
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (64, 7168), &dev).unwrap();
    let norm = step3_nn::RmsNorm::from_weight(Tensor::ones(7168, DType::F32, &dev).unwrap(), 1e-5).unwrap();
    c.bench_function("rms_norm 64x7168 f32", |b| b.iter(|| norm.forward(&x).unwrap()));
    let rope = RotaryEmbedding::new(500000.0, 256, &dev).unwrap();
    let q = Tensor::randn(0f32, 1.0, (1, 64, 64, 256), &dev).unwrap();
    let pos = Tensor::arange(0u32, 64, &dev).unwrap().unsqueeze(0).unwrap();
    let (cos, sin) = rope.cos_sin(&pos, DType::F32).unwrap();
    c.bench_function("rope 64 tokens x 64 heads x 256", |b| b.iter(|| rope.apply(&q, &cos, &sin).unwrap()));
}

fn attention(c: &mut Criterion) {
    step3_model::init_cpu_threads();
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = MfaConfig {
        hidden_size: 896,
        share_q_dim: 256,
        num_heads: 8,
        head_dim: 256,
        rms_norm_eps: 1e-5,
        weight_format: WeightFormat::Dense,
    };
    let attn = MfaAttention::new(&cfg, vb).unwrap();
    let rope = RotaryEmbedding::new(500000.0, 256, &dev).unwrap();
    let (b, ctx) = (16, 2048);
    let mut cache = KvCache::new(ctx + 1);
    let kv = Tensor::randn(0f32, 1.0, (b, ctx, 256), &dev).unwrap();
    cache.append(&kv, &kv).unwrap();
    let mut table = SequenceTable::new(b, ctx + 1, 65536).unwrap();
    table.advance(&vec![ctx; b], ctx);
    let step = table.step(&vec![1; b], 1, &rope, DType::F32, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (b, 1, 896), &dev).unwrap();
    let mut g = c.benchmark_group("MFA decode, 1/8 width, batch 16, context 2048");
    g.sample_size(10);
    g.bench_function("layer", |bch| {
        bch.iter(|| {
            let y = attn.forward(&x, &rope, &step, &mut cache).unwrap();
            cache.truncate(ctx);
            y
        })
    });
    g.finish();
}

fn moe(c: &mut Criterion) {
    step3_model::init_cpu_threads();
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = MoeConfig {
        hidden_size: 896,
        num_experts: 48,
        top_k: 3,
        moe_intermediate_size: 640,
        share_expert_dim: 640,
        norm_expert_weight: false,
        weight_format: WeightFormat::Dense,
    };
    let block = MoeBlock::new(&cfg, vb).unwrap();
    let mut g = c.benchmark_group("MoE layer, 1/8 width, grouped dispatch");
    g.sample_size(10);
    for t in [1usize, 64] {
        let x = Tensor::randn(0f32, 1.0, (t, 896), &dev).unwrap();
        g.bench_function(format!("{t} tokens"), |b| b.iter(|| block.forward(&x).unwrap()));
    }
    g.finish();
}

fn preprocessing(c: &mut Criterion) {
    step3_model::init_cpu_threads();
    let img = image::RgbImage::from_fn(1920, 1080, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let cfg = step3_model::PreprocessConfig::default();
    let mut g = c.benchmark_group("image preprocessing");
    g.sample_size(10);
    g.bench_function("1920x1080 -> global 728 + 8 crops 504", |b| {
        b.iter(|| step3_model::vision::preprocess(&img, &cfg).unwrap())
    });
    g.finish();
}

criterion_group!(benches, linear, norm_and_rope, attention, moe, preprocessing);
criterion_main!(benches);
