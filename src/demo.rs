//! The bundled demo checkpoint: Step3's architecture (vision-language, MFA, MoE, block layout and
//! file format all real) at toy size, with random weights and a small byte-level tokenizer that
//! carries Step3's special tokens. It exists so `cargo run --example chat` works offline in
//! seconds; its answers are noise.
//!
//! The files in `demo/step3-demo/` are written by [`write_demo`] (also `step3 demo --out DIR`),
//! deterministically: a test regenerates them and checks they are byte-identical.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;
use step3_model::inventory::{text_tensors, vision_tensors};
use step3_model::{Result, Step3Config};

/// Where the bundled demo checkpoint lives in this repository.
pub fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/step3-demo")
}

/// Step3's special tokens, in the order they get ids after the 256 byte tokens.
pub const SPECIAL_TOKENS: [&str; 17] = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<|BOT|>",
    "<|EOT|>",
    "<think>",
    "</think>",
    "<im_start>",
    "<im_end>",
    "<im_patch>",
    "<patch_start>",
    "<patch_end>",
    "<patch_newline>",
    "<｜tool_calls_begin｜>",
    "<｜tool_calls_end｜>",
    "<｜tool_call_begin｜>",
    "<｜tool_call_end｜>",
    "<｜tool_sep｜>",
];

/// The chat template the demo ships (the format Step3's prompts use).
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% else %}<|BOT|>{{ message['role'] }}\n{{ message['content'] }}<|EOT|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|BOT|>assistant\n<think>\n{% endif %}";

fn id_of(token: &str) -> u32 {
    256 + SPECIAL_TOKENS.iter().position(|t| *t == token).unwrap_or_default() as u32
}

/// GPT-2's byte → printable character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

fn config() -> serde_json::Value {
    json!({
        "architectures": ["Step3VLForConditionalGeneration"],
        "model_type": "step3_vl",
        "image_token_id": id_of("<im_patch>"),
        "bos_token_id": id_of("<｜begin▁of▁sentence｜>"),
        "eos_token_id": id_of("<|EOT|>"),
        "projector_bias": false,
        "understand_projector_stride": 2,
        "torch_dtype": "float32",
        "text_config": {
            "architectures": ["Step3TextForCausalLM"],
            "model_type": "step3_text",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_attention_groups": 1,
            "head_dim": 32,
            "share_q_dim": 64,
            "vocab_size": 288,
            "rms_norm_eps": 1e-5,
            "moe_num_experts": 8,
            "moe_top_k": 3,
            "moe_intermediate_size": 48,
            "share_expert_dim": 64,
            "norm_expert_weight": false,
            "moe_layers_enum": "1,2",
            "rope_theta": 500000.0,
            "rope_scaling": null,
            "max_position_embedding": 4096,
            "max_seq_len": 4096,
            "torch_dtype": "float32"
        },
        "vision_config": {
            "model_type": "step3_vision_encoder",
            "hidden_size": 32,
            "intermediate_size": 64,
            "output_hidden_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_channels": 3,
            "image_size": 56,
            "patch_size": 4,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-6
        }
    })
}

/// The demo's special-token ids: right after the 256 byte tokens, in [`SPECIAL_TOKENS`] order.
pub fn demo_special_ids() -> Vec<(&'static str, u32)> {
    SPECIAL_TOKENS.iter().map(|t| (*t, id_of(t))).collect()
}

/// Step3's special tokens at the ids `known` gives (e.g. a checkpoint's `image_token_id`), the
/// others numbered from `first_free` on: the specials of a byte-level tokenizer for a checkpoint
/// that fixes some of them.
pub fn special_ids_with(known: impl Fn(&str) -> Option<u32>, first_free: u32) -> Vec<(&'static str, u32)> {
    let mut next = first_free;
    SPECIAL_TOKENS
        .iter()
        .map(|t| match known(t) {
            Some(id) => (*t, id),
            None => {
                next += 1;
                (*t, next - 1)
            }
        })
        .collect()
}

/// A byte-level BPE `tokenizer.json` (the 256 bytes as ids 0–255) with Step3's special tokens at
/// the given ids.
pub fn tokenizer_json(specials: &[(&str, u32)]) -> serde_json::Value {
    // Special tokens are in the model vocabulary too, as in real tokenizer.json files: the
    // `tokenizers` crate numbers added tokens the vocabulary lacks by itself, ignoring their ids.
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .chain(specials.iter().map(|(t, id)| (t.to_string(), json!(id))))
        .collect();
    let added: Vec<serde_json::Value> = specials
        .iter()
        .map(|(t, id)| json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

/// SplitMix64 with an Irwin–Hall normal approximation: integer and basic float arithmetic only,
/// so the weights are the same bytes on every platform.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Approximately N(0, 1): the sum of 12 uniforms minus 6.
    fn normal(&mut self) -> f32 {
        let s: f64 = (0..12).map(|_| (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64).sum();
        (s - 6.0) as f32
    }
}

/// The demo's per-token output bias (see [`legible`]).
fn token_bias(id: u32) -> f32 {
    match id {
        0x20..=0x7E | 0x0A => 0.0,
        0..=255 => -3.0,
        _ if id == id_of("</think>") => DEMO_THINK_END_BIAS,
        _ if id == id_of("<|EOT|>") => DEMO_EOT_BIAS,
        _ => -3.0,
    }
}

const DEMO_THINK_END_BIAS: f32 = 0.0;
const DEMO_EOT_BIAS: f32 = 0.2;

/// Random weights, made legible: hidden dimension 0 carries a constant (+4 in every token
/// embedding, and nothing that writes to the residual stream touches it), so the final norm keeps
/// it positive and column 0 of `lm_head` acts as a per-token bias: printable ASCII competes, other
/// bytes and markers hardly ever win, and `</think>` and `<|EOT|>` come up often enough for the
/// demo to show reasoning, an answer and a stop.
fn legible(name: &str, shape: &[usize], mut v: Vec<f32>) -> Vec<f32> {
    let writes_residual = name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight");
    match name {
        "model.embed_tokens.weight" => v.chunks_mut(shape[1]).for_each(|row| row[0] = 4.0),
        "lm_head.weight" => v.chunks_mut(shape[1]).enumerate().for_each(|(id, row)| row[0] = token_bias(id as u32)),
        "model.norm.weight" => v[0] = 1.0,
        _ if writes_residual && name.starts_with("model.") => {
            // [.., H, in]: zero row 0 of every (expert) matrix.
            let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
            v.chunks_mut(rows * cols).for_each(|m| m[..cols].iter_mut().for_each(|x| *x = 0.0));
        }
        _ => {}
    }
    v
}

/// Writes `v` as pretty JSON (with a final newline) to `dir/name`.
fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<()> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(v).map_err(|e| step3_model::Error::Input(format!("{name}: {e}")))?;
    std::fs::write(&path, text + "\n").map_err(|e| step3_model::Error::io(path, e))
}

/// Writes `tokenizer.json` (byte-level, Step3's specials at `specials`) and `tokenizer_config.json`
/// (BOS/EOS strings and the chat template) into `dir`.
pub fn write_tokenizer(dir: &Path, specials: &[(&str, u32)]) -> Result<()> {
    write_json(dir, "tokenizer.json", &tokenizer_json(specials))?;
    write_json(
        dir,
        "tokenizer_config.json",
        &json!({"bos_token": SPECIAL_TOKENS[0], "eos_token": "<|EOT|>", "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}),
    )
}

/// Writes the demo checkpoint (config, tokenizer, chat template, generation and preprocessing
/// settings, random f32 weights) into `dir`.
pub fn write_demo(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| step3_model::Error::io(dir, e))?;
    let write = |name: &str, v: &serde_json::Value| write_json(dir, name, v);
    let cfg = config();
    write("config.json", &cfg)?;
    write_tokenizer(dir, &demo_special_ids())?;
    write(
        "generation_config.json",
        &json!({"eos_token_id": [id_of("<|EOT|>"), id_of("<｜end▁of▁sentence｜>")], "temperature": 0.7, "top_p": 0.95}),
    )?;
    write(
        "preprocessor_config.json",
        &json!({"image_size": 56, "crop_size": 40, "max_image_size": 3024, "window_rule": "<="}),
    )?;

    let parsed = Step3Config::from_json_str(&cfg.to_string(), dir.join("config.json"))?;
    let vision = parsed
        .vision
        .as_ref()
        .ok_or_else(|| step3_model::Error::Input("the demo config lacks vision_config".into()))?;
    let mut expected = text_tensors(&parsed.text);
    expected.extend(vision_tensors(vision, vision.intermediate_size.unwrap_or(64)));
    let mut rng = Rng(0x5EED_57E9_0003);
    let mut tensors = BTreeMap::new();
    for t in expected {
        let n = t.numel();
        let name = t.name.as_str();
        let values: Vec<f32> = if name.ends_with("norm.weight")
            || name.contains("layer_norm") && name.ends_with(".weight")
        {
            (0..n).map(|_| 1.0 + 0.02 * rng.normal()).collect()
        } else if name.ends_with(".bias") || name.contains("position_embedding") || name.ends_with("class_embedding") {
            (0..n).map(|_| 0.02 * rng.normal()).collect()
        } else {
            let fan_in: usize =
                if t.shape.len() == 4 { t.shape[1..].iter().product() } else { *t.shape.last().unwrap_or(&1) };
            let scale = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| scale * rng.normal()).collect()
        };
        let values = legible(name, &t.shape, values);
        tensors.insert(t.name.clone(), Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu)?);
    }
    let path = dir.join("model.safetensors");
    step3_model::checkpoint::save_tensors(&tensors.into_iter().collect(), &path)?;
    std::fs::write(
        dir.join("README.md"),
        "# step3-demo\n\nStep3's architecture at toy size (4 layers, 2 of them MoE; a 2-layer vision tower), with random\n\
         weights and a byte-level tokenizer carrying Step3's special tokens. Written by `step3 demo --out DIR`\n\
         (deterministic; `cargo test --test demo` checks these files are what it writes). Its answers are noise:\n\
         it exists so that `cargo run --example chat` runs offline in seconds.\n",
    )
    .map_err(|e| step3_model::Error::io(dir.join("README.md"), e))?;
    Ok(())
}
