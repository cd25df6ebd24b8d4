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

    /// Every weight random (uniform, standard deviation 1/sqrt(fan-in); norms 1), so that every
    /// byte is real memory.
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
            return random_uniform(shape, (1.0 / fan_in.sqrt()) as f32, seed_of(name), dtype, dev);
        }
        if dtype == DType::F8E4M3 {
            let n: usize = shape.iter().product();
            let bytes = if self.random { random_e4m3_bytes(n, seed_of(name)) } else { vec![0u8; n] };
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

/// A seed from a tensor's name (FNV-1a), so that every tensor gets its own values.
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}

/// A tensor of uniform random values with standard deviation `std`, made straight in `dtype`
/// (f32, bf16, f16) in parallel chunks: Step3's real-size expert stacks hold billions of values,
/// which a normal sampler through an f32 copy would take minutes and twice the memory to fill.
fn random_uniform(shape: &[usize], std: f32, seed: u64, dtype: DType, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    // Uniform on [-a, a] has standard deviation a / sqrt(3).
    let a = std * 3f32.sqrt();
    match dtype {
        DType::BF16 => Tensor::from_vec(fill(n, seed, a, half::bf16::from_f32), shape, dev),
        DType::F16 => Tensor::from_vec(fill(n, seed, a, half::f16::from_f32), shape, dev),
        _ => Tensor::from_vec(fill(n, seed, a, |x| x), shape, dev)?.to_dtype(dtype),
    }
}

/// `n` values uniform on [-a, a) from `seed`, each passed through `f` (a conversion to the
/// storage type), made in parallel chunks.
pub(crate) fn fill<T: Copy + Default + Send>(n: usize, seed: u64, a: f32, f: impl Fn(f32) -> T + Sync) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut v = vec![T::default(); n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut state = (seed ^ 0x9E37_79B9_7F4A_7C15).wrapping_add((c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)) | 1;
        for o in out {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // The top 24 bits, as a number in [-1, 1).
            *o = f(a * ((state >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0));
        }
    });
    v
}

/// `n` random finite e4m3 codes (exponent field below 15, so never a NaN).
pub(crate) fn random_e4m3_bytes(n: usize, seed: u64) -> Vec<u8> {
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

/// The ~200M-parameter Step3 the engine, server and decode benchmarks use: hidden 1024, 6 layers
/// of which 1–4 are MoE with 16 experts (top-3, 512 wide) plus a 512-wide shared expert, dense
/// FFN 2816, 8 query heads of 256 on a 512 query rank, vocabulary 32000.
pub fn bench_200m() -> anyhow::Result<TextConfig> {
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
    Ok(step3::Step3Config::from_json_str(&text.to_string(), "bench-200m")?.text)
}

/// Writes a servable text-only checkpoint of `cfg` into `dir`: `config.json`, random weights
/// (`model.safetensors`, in `dtype`; with `fp8`, the projections as block-FP8 with 128×128
/// scales), a byte-level tokenizer with Step3's special tokens whose vocabulary is padded with
/// word-like filler tokens up to `cfg.vocab_size` (so every id the model can emit decodes to
/// text), the demo's chat template and a `generation_config.json`. Random, not zero, weights:
/// memory traffic and expert routing are then those of a real model of this size.
pub fn write_checkpoint(dir: &std::path::Path, cfg: &TextConfig, dtype: DType, fp8: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    use step3::demo::{demo_special_ids, tokenizer_json, CHAT_TEMPLATE, SPECIAL_TOKENS};

    let specials = demo_special_ids();
    let first_filler = specials.iter().map(|(_, id)| id + 1).max().unwrap_or(256) as usize;
    if cfg.vocab_size < first_filler {
        anyhow::bail!("vocab_size {} is below the tokenizer's {first_filler} byte and special tokens", cfg.vocab_size)
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, v: serde_json::Value| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    };
    let id = |t: &str| specials.iter().find(|(s, _)| *s == t).map(|(_, id)| *id);
    let mut tokenizer = tokenizer_json(&specials);
    if let Some(vocab) = tokenizer.pointer_mut("/model/vocab").and_then(|v| v.as_object_mut()) {
        // 'Ġ' is the byte-level encoding of a space: fillers decode to " w<id>".
        for i in first_filler..cfg.vocab_size {
            vocab.insert(format!("Ġw{i}"), i.into());
        }
    }
    write("tokenizer.json", tokenizer)?;
    write(
        "tokenizer_config.json",
        serde_json::json!({"bos_token": SPECIAL_TOKENS[0], "eos_token": "<|EOT|>", "chat_template": CHAT_TEMPLATE,
                           "model_max_length": cfg.max_position_embedding}),
    )?;
    write("generation_config.json", serde_json::json!({"eos_token_id": id("<|EOT|>")}))?;
    let mut config = serde_json::json!({
        "architectures": ["Step3TextForCausalLM"],
        "model_type": "step3_text",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_attention_groups": 1,
        "head_dim": cfg.head_dim,
        "share_q_dim": cfg.share_q_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "moe_num_experts": cfg.moe_num_experts,
        "moe_top_k": cfg.moe_top_k,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "share_expert_dim": cfg.share_expert_dim,
        "norm_expert_weight": cfg.norm_expert_weight,
        "moe_layers_enum": (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)).map(|l| l.to_string()).collect::<Vec<_>>().join(","),
        "rope_theta": cfg.rope_theta,
        "max_position_embedding": cfg.max_position_embedding,
        "max_seq_len": cfg.max_position_embedding,
        "bos_token_id": id(SPECIAL_TOKENS[0]),
        "eos_token_id": id("<|EOT|>"),
        "torch_dtype": match dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
    });
    if fp8 {
        config["quantization_config"] = serde_json::json!({
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]
        });
    }
    write("config.json", config)?;

    let synthetic = Synthetic::new(cfg, fp8).random();
    let dev = Device::Cpu;
    let mut tensors = HashMap::new();
    for t in text_tensors(cfg) {
        if fp8 && t.quantizable {
            // Random finite e4m3 codes and block scales that size them like the dense weights.
            let scale_dims = BlockFp8::scale_dims(&t.shape, [128, 128])
                .with_context(|| format!("{}: FP8 needs dimensions the 128×128 blocks can cover", t.name))?;
            let scale_name = format!("{}_scale_inv", t.name);
            tensors.insert(scale_name.clone(), synthetic.make(&scale_name, &scale_dims, DType::F32, &dev)?);
            tensors.insert(t.name.clone(), synthetic.make(&t.name, &t.shape, DType::F8E4M3, &dev)?);
        } else {
            tensors.insert(t.name.clone(), synthetic.make(&t.name, &t.shape, dtype, &dev)?);
        }
    }
    let path = dir.join("model.safetensors");
    step3::checkpoint::save_tensors(&tensors, &path)?;
    Ok(())
}
