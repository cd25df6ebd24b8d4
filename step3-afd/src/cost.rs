//! Prices per decoded token, the AFD pairing and the MoE-sparsity bound.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{Accelerator, ModelSpec};

/// Tokens in the paper's "1M tokens".
pub const PER_MILLION: f64 = 1e6;

/// USD per decoded token for attention on `a` at context `c`: the roofline maximum of the core
/// attention's compute and memory cost, plus the linear projections at the compute rate.
pub fn attention_cost(m: &ModelSpec, a: &Accelerator, c: usize) -> f64 {
    let compute = m.attn_flops(c) * a.usd_per_flop();
    let memory = m.kv_bytes(c) * a.usd_per_byte();
    compute.max(memory) + m.linear_flops() * a.usd_per_flop()
}

/// USD per decoded token for the FFN on `a` (compute-bound at the batch sizes AFD runs).
pub fn ffn_cost(m: &ModelSpec, a: &Accelerator) -> f64 {
    m.ffn_flops() * a.usd_per_flop()
}

/// Training cost per token at context `c` and 100% MFU (forward + 2× backward), as in the
/// paper's Figure 4.
pub fn training_cost(m: &ModelSpec, a: &Accelerator, c: usize) -> f64 {
    3.0 * (m.attn_flops(c) + m.linear_flops() + m.ffn_flops()) * a.usd_per_flop()
}

/// A pairing of accelerators for attention and FFN, and its price per 1M tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairCost {
    pub attention: String,
    pub ffn: String,
    /// USD per 1M decoded tokens.
    pub total: f64,
}

/// Attention on `attn`, FFN on `ffn` (the same card for a non-disaggregated deployment).
pub fn pair(m: &ModelSpec, attn: &Accelerator, ffn: &Accelerator, c: usize) -> PairCost {
    PairCost {
        attention: attn.name.clone(),
        ffn: ffn.name.clone(),
        total: (attention_cost(m, attn, c) + ffn_cost(m, ffn)) * PER_MILLION,
    }
}

/// The cheapest AFD deployment: the cheapest accelerator for attention and, independently, the
/// cheapest for the FFN.
pub fn afd_best(m: &ModelSpec, accels: &[Accelerator], c: usize) -> Option<PairCost> {
    let attn = accels.iter().min_by(|a, b| attention_cost(m, a, c).total_cmp(&attention_cost(m, b, c)))?;
    let ffn = accels.iter().min_by(|a, b| ffn_cost(m, a).total_cmp(&ffn_cost(m, b)))?;
    Some(pair(m, attn, ffn, c))
}

/// The paper's per-stage time budget for the MoE dispatch/combine of one layer: 50 ms TPOT over a
/// 3-stage pipeline is 16.6 ms per stage, of which two thirds (11.1 ms) carry communication.
pub const SPARSITY_TIME_S: f64 = 11.1e-3;

/// Minimum MoE sparsity (activated / total experts, shared included) for the FFN to be
/// compute-bound on `a` while its dispatch (8-bit) and combine (16-bit) traffic, 3·H bytes per
/// token per layer, fits the network: `S ≥ H · peak · L / (network · bandwidth · 11.1 ms)`
/// (§5.3–5.4, Table 7). `network` defaults to the card's 8-NIC server aggregate.
pub fn min_sparsity(a: &Accelerator, hidden: usize, layers: usize, network_bytes_per_s: Option<f64>) -> f64 {
    let net = network_bytes_per_s.unwrap_or_else(|| a.network_bytes_per_s());
    hidden as f64 * a.peak_flops() * layers as f64 / (net * a.mem_bw * SPARSITY_TIME_S)
}

/// Everything `step3 cost` reports for one model at one context.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostReport {
    pub model: String,
    pub context: usize,
    /// KV-cache bytes per decoded token with 8-bit KV (the paper's convention).
    pub kv_bytes: f64,
    /// The same with a BF16 KV cache.
    pub kv_bytes_bf16: f64,
    pub attn_flops: f64,
    pub linear_flops: f64,
    pub ffn_flops: f64,
    /// Attention FLOPs per KV byte.
    pub arithmetic_intensity: f64,
    pub activated_params: u64,
    pub cost_per_1m_tokens: CostTable,
}

/// USD per 1M decoded tokens, by accelerator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostTable {
    pub attention: BTreeMap<String, f64>,
    pub ffn: BTreeMap<String, f64>,
    pub afd_best: Option<PairCost>,
    /// The pairing asked for explicitly, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pairing: Option<PairCost>,
}

impl CostReport {
    pub fn new(m: &ModelSpec, accels: &[Accelerator], c: usize, pairing: Option<(&Accelerator, &Accelerator)>) -> Self {
        Self {
            model: m.name.clone(),
            context: c,
            kv_bytes: m.kv_bytes(c),
            kv_bytes_bf16: m.with_kv_bytes_per_elem(2).kv_bytes(c),
            attn_flops: m.attn_flops(c),
            linear_flops: m.linear_flops(),
            ffn_flops: m.ffn_flops(),
            arithmetic_intensity: m.arithmetic_intensity(c),
            activated_params: m.activated_params(),
            cost_per_1m_tokens: CostTable {
                attention: accels.iter().map(|a| (a.name.clone(), attention_cost(m, a, c) * PER_MILLION)).collect(),
                ffn: accels.iter().map(|a| (a.name.clone(), ffn_cost(m, a) * PER_MILLION)).collect(),
                afd_best: afd_best(m, accels, c),
                pairing: pairing.map(|(a, f)| pair(m, a, f, c)),
            },
        }
    }
}
