//! Synthetic weights for benchmarks: every tensor of a Step3 text config, zeros (the arithmetic
//! costs the same) except the routers, which are random so that tokens spread over experts as
//! they do in a real model; or all random ([`Synthetic::random`]) where memory traffic matters: on
//! the CPU, untouched zero pages are all one physical page, which the caches serve far faster
//! than memory. Dense or block-FP8 (1-byte values and f32 block scales).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Shape, Tensor};
use step3::inventory::text_tensors;
use step3::{BlockFp8, TextConfig};

pub struct Synthetic {
    /// Every tensor's shape and whether it may be stored as block-FP8.
    tensors: HashMap<String, (Vec<usize>, bool)>,
    fp8: bool,
    random: bool,
}

impl Synthetic {
    pub fn new(cfg: &TextConfig, fp8: bool) -> Self {
        Self {
            tensors: text_tensors(cfg).into_iter().map(|t| (t.name, (t.shape, t.quantizable))).collect(),
            fp8,
            random: false,
        }
    }

    /// Every weight random (scaled by 1/sqrt(fan-in), norms 1), so that every byte is real memory.
    pub fn random(mut self) -> Self {
        self.random = true;
        self
    }

    fn make(&self, name: &str, shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
        if name.ends_with("moe.gate.weight") {
            let h = *shape.last().unwrap_or(&1) as f64;
            return Tensor::randn(0f32, (1.0 / h.sqrt()) as f32, shape, dev)?.to_dtype(dtype);
        }
        if name.ends_with("_scale_inv") {
            if self.random {
                // Random e4m3 bytes average about 60 in magnitude: scales that make the weights
                // about as large as the dense random ones (1/sqrt(fan-in)).
                let fan_in = (*shape.last().unwrap_or(&1) * 128) as f64;
                return Tensor::full((1.0 / (60.0 * fan_in.sqrt())) as f32, shape, dev);
            }
            return Tensor::ones(shape, DType::F32, dev);
        }
        if self.random && dtype != DType::F8E4M3 {
            if name.ends_with("norm.weight") {
                return Tensor::ones(shape, dtype, dev);
            }
            let fan_in = *shape.last().unwrap_or(&1) as f64;
            return Tensor::randn(0f32, (1.0 / fan_in.sqrt()) as f32, shape, dev)?.to_dtype(dtype);
        }
        if dtype == DType::F8E4M3 {
            let n: usize = shape.iter().product();
            let bytes = if self.random { random_e4m3_bytes(n, name.len() as u64) } else { vec![0u8; n] };
            return Tensor::from_raw_buffer(&bytes, DType::F8E4M3, shape, dev);
        }
        Tensor::zeros(shape, dtype, dev)
    }
}

impl candle_nn::var_builder::SimpleBackend for Synthetic {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.make(name, s.dims(), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let unknown = || candle_core::Error::Msg(format!("synthetic weights: unknown tensor {name}"));
        let shape = match name.strip_suffix("_scale_inv") {
            Some(weight) => BlockFp8::scale_dims(&self.tensors.get(weight).ok_or_else(unknown)?.0, [128, 128])?,
            None => self.tensors.get(name).ok_or_else(unknown)?.0.clone(),
        };
        self.make(name, &shape, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match name.strip_suffix("_scale_inv") {
            Some(weight) => self.fp8 && self.tensors.get(weight).is_some_and(|(_, q)| *q),
            None => self.tensors.contains_key(name),
        }
    }
}

/// `n` random finite e4m3 codes (exponent field below 15, so never a NaN).
fn random_e4m3_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state as u8) & 0b1111_0111
        })
        .collect()
}

/// Step3's architecture at about 200M parameters, 89.5M of them active per token: hidden 1024,
/// 6 layers of which 1-4 are MoE (16 experts of width 512, top-3, plus a shared expert of 512),
/// dense FFN 2816, 8 query heads of 256 from a 512-wide query rank, one K/V head, vocabulary
/// 32000. The checkpoint of `step3 bench engine` and `step3 bench decode-model`.
pub fn small_config() -> anyhow::Result<TextConfig> {
    let text = serde_json::json!({
        "model_type": "step3_text",
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_attention_groups": 1,
        "head_dim": 256,
        "share_q_dim": 512,
        "vocab_size": 32000,
        "moe_num_experts": 16,
        "moe_top_k": 3,
        "moe_intermediate_size": 512,
        "share_expert_dim": 512,
        "norm_expert_weight": false,
        "moe_layers_enum": "1,2,3,4",
        "rope_theta": 500000.0,
        "max_position_embedding": 65536,
    });
    Ok(step3::Step3Config::from_json_str(&text.to_string(), "synthetic")?.text)
}

/// A Step3 text config at real dimensions, divided by `scale` (hidden, query rank, heads, MLP and
/// expert widths; head_dim, experts and top-k stay), with `layers` layers of which `moe` are MoE.
pub fn config(scale: usize, layers: usize, moe: &[usize]) -> anyhow::Result<TextConfig> {
    let s = scale.max(1);
    let text = serde_json::json!({
        "model_type": "step3_text",
        "hidden_size": 7168 / s,
        "intermediate_size": 18432 / s,
        "num_hidden_layers": layers,
        "num_attention_heads": (64 / s).max(1),
        "num_attention_groups": 1,
        "head_dim": 256,
        "share_q_dim": 2048 / s,
        "vocab_size": 128815 / s,
        "moe_num_experts": 48,
        "moe_top_k": 3,
        "moe_intermediate_size": 5120 / s,
        "share_expert_dim": 5120 / s,
        "norm_expert_weight": false,
        "moe_layers_enum": moe.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","),
        "rope_theta": 500000.0,
        "max_position_embedding": 65536,
    });
    Ok(step3::Step3Config::from_json_str(&text.to_string(), format!("--scale {s}"))?.text)
}
