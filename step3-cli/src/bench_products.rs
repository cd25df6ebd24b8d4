//! `step3 bench products`: the CPU kernels alone, on every product of one decode step of the
//! ~200M model, against this machine's read bandwidth measured in the same run.
//!
//! The products run as the model runs them, one hand-off to the thread pool per group (q, k and
//! v together; `wq`; `o_proj`; gate and up together; down; every routed expert's gate and up;
//! every down; `lm_head`), with random weights streamed from memory (each step's weights are
//! far larger than the caches), so the time is the kernels' and the thread pool's, nothing else.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use step3::nn::cpu::{self, Product, WeightSlice};

use crate::bench::{list, read_bandwidth};
use crate::synthetic::{fill, random_e4m3_bytes};

#[derive(Args)]
pub struct ProductsArgs {
    /// Weight dtypes, comma-separated: f32, bf16, fp8 (block-FP8 e4m3, 128 × 128 scale blocks;
    /// lm_head stays bf16, as in an FP8 checkpoint). The activations are bf16 values (a bf16
    /// compute dtype's), so the AVX512-BF16 path takes bf16 and FP8 weights where it exists.
    #[arg(long, default_value = "f32,bf16,fp8")]
    weights: String,
    /// Rows (decoded tokens) of a step, comma-separated.
    #[arg(long, default_value = "1,16")]
    rows: String,
    /// Timed steps per measurement (the median is reported).
    #[arg(long, default_value_t = 15, value_parser = crate::bench::at_least_one())]
    iters: usize,
}

/// A weight of the step, in one dtype.
enum Held {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    Fp8 { values: Vec<u8>, scales: Vec<f32> },
}

impl Held {
    fn slice(&self) -> WeightSlice<'_> {
        match self {
            Held::F32(v) => WeightSlice::F32(v),
            Held::Bf16(v) => WeightSlice::Bf16(v),
            Held::Fp8 { values, scales } => WeightSlice::Fp8 { values, scales, block: [128, 128], nan_free: true },
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Held::F32(v) => v.len() * 4,
            Held::Bf16(v) => v.len() * 2,
            Held::Fp8 { values, scales } => values.len() + scales.len() * 4,
        }
    }
}

/// Uniform values in [-0.5, 0.5) from a seed, each a bf16 value (so the AVX512-BF16 path
/// takes them as activations).
fn values(len: usize, seed: u64) -> Vec<f32> {
    fill(len, seed, 0.5, |x| half::bf16::from_f32(x).to_f32())
}

fn weight(dtype: &str, n: usize, k: usize, seed: u64) -> Held {
    match dtype {
        "f32" => Held::F32(fill(n * k, seed, 0.5, |x| x)),
        "bf16" => Held::Bf16(fill(n * k, seed, 0.5, half::bf16::from_f32)),
        _ => Held::Fp8 {
            values: random_e4m3_bytes(n * k, seed),
            scales: vec![1.0 / 64.0; n.div_ceil(128) * k.div_ceil(128)],
        },
    }
}

/// One hand-off to the pool: weights `[n, k]` all against the same input of width `k`.
struct Group {
    what: &'static str,
    k: usize,
    weights: Vec<(usize, Held)>,
    /// Weights per routed expert (gate and up: 2; down: 1), 0 for the rest: a step runs only the
    /// experts its tokens hit, each on its share of the rows.
    per_expert: usize,
}

impl Group {
    /// The weights a step runs when it hits `hit` experts, and their rows.
    fn taken(&self, hit: usize, m: usize, em: usize) -> (&[(usize, Held)], usize) {
        if self.per_expert == 0 {
            (&self.weights, m)
        } else {
            (&self.weights[..(hit * self.per_expert).min(self.weights.len())], em)
        }
    }
}

/// The groups of one decode step of `cfg`, in the model's order.
fn step(cfg: &step3::TextConfig, dtype: &str) -> Vec<Group> {
    let (h, q, d, n) = (cfg.hidden_size, cfg.share_q_dim, cfg.head_dim, cfg.num_attention_heads);
    let mut seed = 0u64;
    let mut w = |n: usize, k: usize| {
        seed += 1;
        (n, weight(dtype, n, k, seed))
    };
    let mut groups = Vec::new();
    let mut g = |what, k, weights, per_expert| groups.push(Group { what, k, weights, per_expert });
    for layer in 0..cfg.num_hidden_layers {
        g("attention", h, vec![w(q, h), w(d, h), w(d, h)], 0);
        g("attention", q, vec![w(n * d, q)], 0);
        g("attention", n * d, vec![w(h, n * d)], 0);
        let moe = cfg.moe_layers_enum.contains(&layer);
        let width = if moe { cfg.share_expert_dim } else { cfg.intermediate_size };
        g("mlp", h, vec![w(width, h), w(width, h)], 0);
        g("mlp", width, vec![w(h, width)], 0);
        if moe {
            let e = cfg.moe_intermediate_size;
            let gate_up = (0..2 * cfg.moe_num_experts).map(|_| w(e, h)).collect();
            g("experts", h, gate_up, 2);
            let downs = (0..cfg.moe_num_experts).map(|_| w(h, e)).collect();
            g("experts", e, downs, 1);
        }
    }
    // An FP8 checkpoint keeps lm_head in bf16.
    let head = if dtype == "fp8" { weight("bf16", cfg.vocab_size, h, 0) } else { w(cfg.vocab_size, h).1 };
    g("lm_head", h, vec![(cfg.vocab_size, head)], 0);
    groups
}

pub fn run(a: ProductsArgs) -> Result<std::process::ExitCode> {
    let cfg = crate::synthetic::bench_200m()?;
    let rows = list(&a.rows).map_err(|e| anyhow::anyhow!("--rows: {e}"))?;
    if rows.iter().any(|&m| m > cpu::MAX_ROWS) {
        anyhow::bail!("--rows: the kernels take at most {} rows", cpu::MAX_ROWS)
    }
    let dtypes: Vec<&str> = a.weights.split(',').map(str::trim).collect();
    if let Some(bad) = dtypes.iter().find(|d| !matches!(**d, "f32" | "bf16" | "fp8")) {
        anyhow::bail!("--weights: `{bad}` is not one of f32, bf16, fp8")
    }
    let bw = read_bandwidth(1 << 30, 5);
    println!("CPU kernels: {}", cpu::describe());
    println!(
        "one decode step of the ~200M model (hidden {}, {} layers, {} of them MoE with {} experts top-{}); \
         streaming read bandwidth (all cores, 1 GiB): {:.1} GB/s",
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.moe_layers_enum.len(),
        cfg.moe_num_experts,
        cfg.moe_top_k,
        bw / 1e9
    );
    println!();
    println!(
        "| weights | rows | experts × rows | group | products | MB | ms (median) | GB/s | × read bandwidth | GMAC/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for dtype in dtypes {
        let groups = step(&cfg, dtype);
        for &m in &rows {
            // The experts a step of `m` tokens is expected to hit (E · (1 − (1 − k/E)^m), the
            // routing being random), each on its share of the m · k routed rows.
            let (e, k) = (cfg.moe_num_experts as f64, cfg.moe_top_k as f64);
            let hit = ((e * (1.0 - (1.0 - k / e).powi(m as i32))).round() as usize).clamp(1, cfg.moe_num_experts);
            let em = (m * cfg.moe_top_k).div_ceil(hit);
            let inputs: Vec<Vec<f32>> =
                groups.iter().enumerate().map(|(i, g)| values(g.taken(hit, m, em).1 * g.k, 1000 + i as u64)).collect();
            let run_group = |(g, x): (&Group, &Vec<f32>)| {
                let (taken, m) = g.taken(hit, m, em);
                let products: Vec<Product> =
                    taken.iter().map(|(n, w)| Product { x, m, k: g.k, w: w.slice(), n: *n }).collect();
                std::hint::black_box(cpu::matmul_t_many(&products));
            };
            // Per group kind: the medians of its share of each step.
            let kinds = ["attention", "mlp", "experts", "lm_head"];
            let mut times = vec![Vec::with_capacity(a.iters); kinds.len()];
            for it in 0..a.iters + 1 {
                let mut step_times = [0f64; 4];
                for pair in groups.iter().zip(&inputs) {
                    let start = Instant::now();
                    run_group(pair);
                    let kind = kinds.iter().position(|k| *k == pair.0.what).unwrap_or(0);
                    step_times[kind] += start.elapsed().as_secs_f64();
                }
                if it > 0 {
                    for (t, s) in times.iter_mut().zip(step_times) {
                        t.push(s);
                    }
                }
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let mut total = (0usize, 0usize, 0f64, 0f64);
            for (kind, t) in kinds.iter().zip(times.iter_mut()) {
                let in_kind: Vec<&Group> = groups.iter().filter(|g| g.what == *kind).collect();
                let products: usize = in_kind.iter().map(|g| g.taken(hit, m, em).0.len()).sum();
                let bytes: usize =
                    in_kind.iter().flat_map(|g| g.taken(hit, m, em).0.iter().map(|(_, w)| w.bytes())).sum();
                let macs: f64 = in_kind
                    .iter()
                    .map(|g| {
                        let (taken, m) = g.taken(hit, m, em);
                        taken.iter().map(|(n, _)| (m * n * g.k) as f64).sum::<f64>()
                    })
                    .sum();
                let secs = median(t);
                total = (total.0 + products, total.1 + bytes, total.2 + secs, total.3 + macs);
                line(dtype, m, (hit, em), kind, products, bytes, secs, macs, bw);
            }
            line(dtype, m, (hit, em), "**step**", total.0, total.1, total.2, total.3, bw);
        }
    }
    println!();
    println!(
        "experts × rows: the routed experts a step of that many tokens is expected to hit under random routing, \
         and each one's share of the routed rows; MB counts the weights a step reads"
    );
    Ok(std::process::ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn line(
    dtype: &str,
    m: usize,
    (hit, em): (usize, usize),
    what: &str,
    products: usize,
    bytes: usize,
    secs: f64,
    macs: f64,
    bw: f64,
) {
    let gbs = bytes as f64 / secs / 1e9;
    println!(
        "| {dtype} | {m} | {hit} × {em} | {what} | {products} | {:.1} | {:.2} | {gbs:.1} | {:.2}× | {:.1} |",
        bytes as f64 / 1e6,
        secs * 1e3,
        gbs * 1e9 / bw,
        macs / secs / 1e9
    );
}
