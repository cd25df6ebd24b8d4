//! `config.json` of a Step3 checkpoint: `model_type: step3_vl` (a `text_config` and a
//! `vision_config`) or a bare `step3_text` config.
//!
//! Keys carry the checkpoint's own names and quirks (`max_position_embedding` without an s,
//! `moe_layers_enum` as a comma-separated string, `num_attention_groups`, ...). A key the real
//! checkpoint always carries is required: a missing one is an error naming it, never a default
//! that would build a different model. The only defaults are the ones the reference itself applies
//! to keys the published file omits (`rms_norm_eps` = 1e-5).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::{ConfigError as Error, Result};

/// Which kind of config file this was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ModelType {
    /// `step3_vl`: vision-language model (text_config + vision_config).
    Step3Vl,
    /// `step3_text`: the language model alone.
    Step3Text,
}

/// The language-model part of the config, as written in the checkpoint (`text_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub hidden_size: usize,
    /// Width of the dense SwiGLU layers.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// K/V heads; Step3's MFA has exactly one.
    pub num_attention_groups: usize,
    pub head_dim: usize,
    /// Low-rank query width.
    pub share_q_dim: usize,
    pub vocab_size: usize,
    /// Absent from the published config; the reference's default is 1e-5.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    pub moe_num_experts: usize,
    pub moe_top_k: usize,
    pub moe_intermediate_size: usize,
    pub share_expert_dim: usize,
    pub norm_expert_weight: bool,
    /// Indices of the MoE layers; all other layers are dense. Written in the file as the string
    /// `"4,5,…,59"` (a JSON list is accepted too).
    #[serde(deserialize_with = "layer_list", serialize_with = "layer_string")]
    pub moe_layers_enum: Vec<usize>,
    pub rope_theta: f64,
    /// Must be null or absent: Step3 uses plain RoPE.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// The context length (`max_position_embedding`, no trailing s, in the real file;
    /// `max_position_embeddings` is accepted as a fallback).
    #[serde(default, alias = "max_position_embeddings")]
    pub max_position_embedding: Option<usize>,
    #[serde(default)]
    pub max_seq_len: Option<usize>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default, deserialize_with = "id_list")]
    pub eos_token_id: Vec<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
}

fn default_rms_norm_eps() -> f64 {
    1e-5
}

fn layer_list<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<usize>, D::Error> {
    use serde::de::Error as _;
    match Value::deserialize(d)? {
        Value::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<usize>().map_err(|_| D::Error::custom(format!("`{p}` is not a layer index"))))
            .collect(),
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_u64().map(|v| v as usize).ok_or_else(|| D::Error::custom(format!("`{v}` is not a layer index")))
            })
            .collect(),
        other => Err(D::Error::custom(format!("expected a comma-separated string of layer indices, found {other}"))),
    }
}

fn layer_string<S: serde::Serializer>(layers: &[usize], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","))
}

/// `eos_token_id` may be one id or a list of ids.
fn id_list<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    use serde::de::Error as _;
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| D::Error::custom(format!("`{v}` is not a token id")))
    };
    match Value::deserialize(d)? {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items.iter().map(as_id).collect(),
        v => Ok(vec![as_id(&v)?]),
    }
}

impl TextConfig {
    /// The model's context length.
    pub fn max_position_embedding(&self) -> usize {
        self.max_position_embedding.unwrap_or_default()
    }

    /// Is layer `i` a MoE layer?
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe_layers_enum.contains(&i)
    }

    /// Checks every value the implementation depends on; `prefix` is where the section sits
    /// in the file (e.g. `text_config.`), for error messages.
    fn validate(&self, path: &Path, prefix: &str) -> Result<()> {
        let key = |k: &str| format!("{prefix}{k}");
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("head_dim", self.head_dim),
            ("share_q_dim", self.share_q_dim),
            ("vocab_size", self.vocab_size),
            ("moe_num_experts", self.moe_num_experts),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("share_expert_dim", self.share_expert_dim),
        ];
        require_positive(path, prefix, &positive)?;
        // Sizes whose products no real model reaches would overflow the parameter and memory
        // arithmetic downstream: a clear error instead.
        let f = |v: usize| v as f64;
        let per_layer = 3.0
            * f(self.hidden_size)
            * f(self.intermediate_size)
                .max(f(self.moe_num_experts) * f(self.moe_intermediate_size) + f(self.share_expert_dim))
            + f(self.hidden_size) * (f(self.share_q_dim) + 2.0 * f(self.num_attention_heads) * f(self.head_dim))
            + f(self.share_q_dim) * f(self.num_attention_heads) * f(self.head_dim);
        let total = f(self.num_hidden_layers) * per_layer + 2.0 * f(self.vocab_size) * f(self.hidden_size);
        if total > 1e15 {
            return Err(Error::key(
                path,
                key("hidden_size"),
                format!("with the other sizes makes about {total:.2e} parameters, beyond any real model (1e15): check the sizes"),
            ));
        }
        if self.num_attention_groups != 1 {
            return Err(Error::key(
                path,
                key("num_attention_groups"),
                format!("must be 1 (MFA has a single K/V head), found {}", self.num_attention_groups),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::key(
                path,
                key("head_dim"),
                format!("must be even for rotary embeddings, found {}", self.head_dim),
            ));
        }
        if self.moe_top_k == 0 || self.moe_top_k > self.moe_num_experts {
            return Err(Error::key(
                path,
                key("moe_top_k"),
                format!("must be between 1 and moe_num_experts = {}, found {}", self.moe_num_experts, self.moe_top_k),
            ));
        }
        let mut seen = vec![false; self.num_hidden_layers];
        for &l in &self.moe_layers_enum {
            if l >= self.num_hidden_layers {
                return Err(Error::key(
                    path,
                    key("moe_layers_enum"),
                    format!(
                        "names layer {l}, but the model has {} layers (0..{})",
                        self.num_hidden_layers, self.num_hidden_layers
                    ),
                ));
            }
            if std::mem::replace(&mut seen[l], true) {
                return Err(Error::key(path, key("moe_layers_enum"), format!("lists layer {l} twice")));
            }
        }
        require_positive_number(path, key("rope_theta"), self.rope_theta)?;
        require_positive_number(path, key("rms_norm_eps"), self.rms_norm_eps)?;
        match &self.rope_scaling {
            None | Some(Value::Null) => {}
            Some(other) => {
                return Err(Error::key(
                    path,
                    key("rope_scaling"),
                    format!("is not supported (Step3 uses plain RoPE; expected null), found {other}"),
                ))
            }
        }
        match self.max_position_embedding {
            None => {
                return Err(Error::key(path, key("max_position_embedding"), "is missing (the model's context length)"))
            }
            Some(0) => {
                return Err(Error::key(path, key("max_position_embedding"), "must be a positive integer, found 0"))
            }
            Some(_) => {}
        }
        if let Some(mt) = &self.model_type {
            if mt != "step3_text" {
                return Err(Error::key(path, key("model_type"), format!("must be \"step3_text\", found \"{mt}\"")));
            }
        }
        Ok(())
    }
}

/// `vision_config` as written in the checkpoint. The published Step3 file carries only
/// `hidden_size` and `output_hidden_size`; the other keys take the reference class's defaults
/// (63 layers, 16 heads, 3 channels, 728 px, patch 14, quick_gelu) and `layer_norm_eps` the 1e-6
/// StepFun's code hard-codes. `intermediate_size` has no trustworthy default (the class says 3072,
/// the real tower has 15360): when absent it is read from `fc1.weight` at load time.
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct RawVision {
    hidden_size: usize,
    output_hidden_size: usize,
    #[serde(default)]
    intermediate_size: Option<usize>,
    #[serde(default = "d63")]
    num_hidden_layers: usize,
    #[serde(default = "d16")]
    num_attention_heads: usize,
    #[serde(default = "d3")]
    num_channels: usize,
    #[serde(default = "d728")]
    image_size: usize,
    #[serde(default = "d14")]
    patch_size: usize,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    layer_norm_eps: Option<f64>,
    #[serde(default)]
    model_type: Option<String>,
}

fn d63() -> usize {
    63
}
fn d16() -> usize {
    16
}
fn d3() -> usize {
    3
}
fn d728() -> usize {
    728
}
fn d14() -> usize {
    14
}

/// The vision tower and projector of a step3_vl config: `vision_config`, the top-level
/// projector keys, and the width of the language model the projector maps into.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub output_hidden_size: usize,
    /// `None` when the config omits it (then it comes from the checkpoint's `fc1.weight`).
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    /// `understand_projector_stride`.
    pub projector_stride: usize,
    /// `projector_bias`.
    pub projector_bias: bool,
    /// `text_config.hidden_size`: the width of the projector's output.
    pub text_hidden_size: usize,
}

impl VisionConfig {
    /// Patches per side for a view of `size` pixels.
    pub fn grid(&self, size: usize) -> usize {
        size / self.patch_size
    }

    /// Image tokens one view of `size` pixels turns into (169 for 728 px, 81 for 504 px).
    pub fn tokens_per_view(&self, size: usize) -> usize {
        tokens_per_view(size, self.patch_size, self.projector_stride)
    }

    /// Whether the tower accepts views of `size` pixels: a multiple of the patch size, at least
    /// two patches per side. The error says why not.
    pub fn check_view_size(&self, size: usize) -> std::result::Result<(), String> {
        check_view_size(size, self.patch_size)
    }
}

/// Image tokens one view of `size` pixels becomes after the ViT (`patch_size`) and the two strided
/// downsamplers (`projector_stride`, then 2): `g = size/p; h1 = (g − 2)/stride + 1;
/// h2 = (h1 − 1)/2 + 1; h2²`. Sizes below two patches give 0.
pub fn tokens_per_view(size: usize, patch_size: usize, projector_stride: usize) -> usize {
    let g = size / patch_size.max(1);
    if g < 2 || projector_stride == 0 {
        return 0;
    }
    let h1 = (g - 2) / projector_stride + 1;
    let h2 = (h1 - 1) / 2 + 1;
    h2 * h2
}

/// The one rule for view sizes: a positive multiple of `patch_size`, at least two patches.
pub(crate) fn check_view_size(size: usize, patch_size: usize) -> std::result::Result<(), String> {
    if patch_size == 0 || !size.is_multiple_of(patch_size) || size / patch_size < 2 {
        Err(format!(
            "must be a multiple of the vision patch size {patch_size} and at least {} pixels (two patches), found {size}",
            2 * patch_size
        ))
    } else {
        Ok(())
    }
}

impl RawVision {
    fn resolve(
        self,
        path: &Path,
        projector_stride: usize,
        projector_bias: bool,
        text_hidden_size: usize,
    ) -> Result<VisionConfig> {
        let key = |k: &str| format!("vision_config.{k}");
        if let Some(act) = &self.hidden_act {
            if act != "quick_gelu" {
                return Err(Error::key(path, key("hidden_act"), format!("must be \"quick_gelu\", found \"{act}\"")));
            }
        }
        if let Some(mt) = &self.model_type {
            if mt != "step3_vision_encoder" {
                return Err(Error::key(
                    path,
                    key("model_type"),
                    format!("must be \"step3_vision_encoder\", found \"{mt}\""),
                ));
            }
        }
        require_positive(
            path,
            "vision_config.",
            &[
                ("hidden_size", self.hidden_size),
                ("output_hidden_size", self.output_hidden_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("num_channels", self.num_channels),
                ("patch_size", self.patch_size),
                ("image_size", self.image_size),
            ],
        )?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::key(
                path,
                key("num_attention_heads"),
                format!("{} does not divide hidden_size {}", self.num_attention_heads, self.hidden_size),
            ));
        }
        check_view_size(self.image_size, self.patch_size).map_err(|p| Error::key(path, key("image_size"), p))?;
        let eps = self.layer_norm_eps.unwrap_or(1e-6);
        require_positive_number(path, key("layer_norm_eps"), eps)?;
        Ok(VisionConfig {
            hidden_size: self.hidden_size,
            output_hidden_size: self.output_hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_channels: self.num_channels,
            image_size: self.image_size,
            patch_size: self.patch_size,
            layer_norm_eps: eps,
            projector_stride,
            projector_bias,
            text_hidden_size,
        })
    }
}

/// Block-FP8 weight quantisation (`quantization_config` with `quant_method: fp8`): weights in
/// `float8_e4m3fn` with one f32 scale per `weight_block_size` block, dequantised as
/// `W = f32(Wq) · scale_inv[r / b0, c / b1]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuantizationConfig {
    /// `[rows, cols]` of a scale block.
    pub weight_block_size: [usize; 2],
    /// `activation_scheme` (only `dynamic` is accepted; activations are not quantised here).
    pub activation_scheme: String,
}

impl QuantizationConfig {
    fn parse(value: &Value, path: &Path) -> Result<Self> {
        let key = |k: &str| format!("quantization_config.{k}");
        let obj = value.as_object().ok_or_else(|| Error::key(path, "quantization_config", "must be an object"))?;
        let text = |k: &str| obj.get(k).and_then(Value::as_str);
        match text("quant_method") {
            Some("fp8") => {}
            Some(other) => {
                return Err(Error::key(
                    path,
                    key("quant_method"),
                    format!(
                        "is \"{other}\": unsupported quantization (this build reads block-FP8, quant_method \"fp8\")"
                    ),
                ))
            }
            None => return Err(Error::key(path, key("quant_method"), "is missing")),
        }
        match text("fmt") {
            None | Some("e4m3") | Some("float8_e4m3fn") => {}
            Some(other) => {
                return Err(Error::key(path, key("fmt"), format!("is \"{other}\": unsupported FP8 format (only e4m3)")))
            }
        }
        let activation_scheme = text("activation_scheme").unwrap_or("dynamic").to_string();
        if activation_scheme != "dynamic" {
            return Err(Error::key(
                path,
                key("activation_scheme"),
                format!("is \"{activation_scheme}\": unsupported (only dynamic activation scaling)"),
            ));
        }
        let block =
            obj.get("weight_block_size").ok_or_else(|| Error::key(path, key("weight_block_size"), "is missing"))?;
        let weight_block_size = match block.as_array().map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>()) {
            Some(v) if v.len() == 2 && v.iter().all(|x| x.is_some_and(|x| x > 0)) => {
                [v[0].unwrap_or_default() as usize, v[1].unwrap_or_default() as usize]
            }
            _ => {
                return Err(Error::key(
                    path,
                    key("weight_block_size"),
                    format!("must be two positive integers like [128, 128], found {block}"),
                ))
            }
        };
        Ok(Self { weight_block_size, activation_scheme })
    }
}

/// A parsed and validated Step3 `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step3Config {
    pub model_type: ModelType,
    pub text: TextConfig,
    /// The vision tower and projector (step3_vl only).
    pub vision: Option<VisionConfig>,
    /// Block-FP8 quantisation of the language model's linear weights, if any.
    pub quantization: Option<QuantizationConfig>,
    /// Token id of `<im_patch>` (step3_vl only).
    pub image_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids (top level, else `text_config`); may be empty.
    pub eos_token_ids: Vec<u32>,
    /// The file this came from.
    #[serde(skip)]
    pub path: PathBuf,
}

impl Step3Config {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_json_str(&text, path)
    }

    /// Parses config text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let root: Value =
            serde_json::from_str(text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        let obj = root.as_object().ok_or_else(|| Error::key(path, "(top level)", "must be a JSON object"))?;
        let model_type = match obj.get("model_type").and_then(Value::as_str) {
            Some("step3_vl") => ModelType::Step3Vl,
            Some("step3_text") => ModelType::Step3Text,
            Some(other) => {
                return Err(Error::key(
                    path,
                    "model_type",
                    format!("must be \"step3_vl\" or \"step3_text\", found \"{other}\""),
                ))
            }
            None => return Err(Error::key(path, "model_type", "is missing (expected \"step3_vl\" or \"step3_text\")")),
        };
        let (text_value, prefix) = match model_type {
            ModelType::Step3Vl => {
                (obj.get("text_config").ok_or_else(|| Error::key(path, "text_config", "is missing"))?, "text_config.")
            }
            ModelType::Step3Text => (&root, ""),
        };
        let text: TextConfig = deserialize_section(text_value.clone(), path, prefix)?;
        text.validate(path, prefix)?;

        let vision = match model_type {
            ModelType::Step3Vl => {
                let section =
                    obj.get("vision_config").ok_or_else(|| Error::key(path, "vision_config", "is missing"))?;
                let raw: RawVision = deserialize_section(section.clone(), path, "vision_config.")?;
                let top = |key: &str| {
                    obj.get(key).ok_or_else(|| {
                        Error::key(
                            path,
                            key,
                            "is missing (always read from config.json: the class default builds a different model)",
                        )
                    })
                };
                let stride = top("understand_projector_stride")?
                    .as_u64()
                    .filter(|&v| v > 0)
                    .ok_or_else(|| Error::key(path, "understand_projector_stride", "must be a positive integer"))?;
                let bias = top("projector_bias")?
                    .as_bool()
                    .ok_or_else(|| Error::key(path, "projector_bias", "must be true or false"))?;
                Some(raw.resolve(path, stride as usize, bias, text.hidden_size)?)
            }
            ModelType::Step3Text => None,
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| Error::key(path, key, format!("must be a token id, found {v}"))),
            }
        };
        let image_token_id = id("image_token_id")?;
        let bos_token_id = id("bos_token_id")?.or(text.bos_token_id);
        let eos_token_ids = match obj.get("eos_token_id") {
            Some(v) if model_type == ModelType::Step3Vl => {
                let ids: Wrapper = deserialize_section(serde_json::json!({ "eos_token_id": v }), path, "")?;
                ids.eos_token_id
            }
            _ => text.eos_token_id.clone(),
        };
        for &t in eos_token_ids.iter().chain(bos_token_id.iter()).chain(image_token_id.iter()) {
            if t as usize >= text.vocab_size {
                return Err(Error::key(
                    path,
                    "eos_token_id/bos_token_id/image_token_id",
                    format!("id {t} is outside the vocabulary of {}", text.vocab_size),
                ));
            }
        }
        Ok(Self {
            model_type,
            text,
            vision,
            quantization: match obj.get("quantization_config").filter(|v| !v.is_null()) {
                Some(v) => Some(QuantizationConfig::parse(v, path)?),
                None => None,
            },
            image_token_id,
            bos_token_id,
            eos_token_ids,
            path: path.to_path_buf(),
        })
    }
}

#[derive(Deserialize)]
struct Wrapper {
    #[serde(deserialize_with = "id_list")]
    eos_token_id: Vec<u32>,
}

/// The first of `fields` (keys under `prefix`) that is 0, as an error naming it.
fn require_positive(path: &Path, prefix: &str, fields: &[(&str, usize)]) -> Result<()> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some((k, _)) => Err(Error::key(path, format!("{prefix}{k}"), "must be a positive integer, found 0")),
        None => Ok(()),
    }
}

/// `value` must be finite and greater than zero.
fn require_positive_number(path: &Path, key: String, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::key(path, key, format!("must be a positive number, found {value}")))
    }
}

/// Deserializes a section, turning serde's messages into errors that name the full key.
fn deserialize_section<T: serde::de::DeserializeOwned>(value: Value, path: &Path, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.inner().to_string();
        let at = e.path().to_string();
        let at = if at == "." { String::new() } else { at };
        // serde reports a missing field at its parent: "missing field `x`".
        if let Some(field) = inner.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
            let key = if at.is_empty() { format!("{prefix}{field}") } else { format!("{prefix}{at}.{field}") };
            return Error::key(path, key, "is missing");
        }
        let key = if at.is_empty() { prefix.trim_end_matches('.').to_string() } else { format!("{prefix}{at}") };
        let inner = inner.split(" at line ").next().unwrap_or(&inner).to_string();
        Error::key(path, key, format!("is invalid: {inner}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"{
        "model_type": "step3_text", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_attention_groups": 1, "head_dim": 32, "share_q_dim": 48,
        "vocab_size": 320, "moe_num_experts": 6, "moe_top_k": 3, "moe_intermediate_size": 40,
        "share_expert_dim": 56, "norm_expert_weight": false, "moe_layers_enum": "1,2",
        "rope_theta": 500000.0, "rope_scaling": null, "max_position_embedding": 4096
    }"#;

    fn edit(f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
        let mut v: Value = serde_json::from_str(TEXT).unwrap();
        f(v.as_object_mut().unwrap());
        v.to_string()
    }

    fn vision() -> Value {
        serde_json::json!({"hidden_size": 32, "output_hidden_size": 48, "image_size": 56, "patch_size": 4, "num_hidden_layers": 2, "num_attention_heads": 2})
    }

    #[test]
    fn vision_config_defaults_and_checks() {
        let text: Value = serde_json::from_str(TEXT).unwrap();
        let vl = |v: Value, extra: &[(&str, Value)]| {
            let mut o = serde_json::json!({"model_type": "step3_vl", "text_config": text, "vision_config": v, "understand_projector_stride": 2, "projector_bias": false});
            for (k, val) in extra {
                o[*k] = val.clone();
            }
            Step3Config::from_json_str(&o.to_string(), "c.json")
        };
        // The published file's two keys only: the rest are the reference class's defaults.
        let c = vl(serde_json::json!({"hidden_size": 1792, "output_hidden_size": 4096}), &[]).unwrap();
        let v = c.vision.unwrap();
        assert_eq!((v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size), (63, 16, 728, 14));
        assert_eq!(
            (v.intermediate_size, v.layer_norm_eps, v.projector_stride, v.projector_bias),
            (None, 1e-6, 2, false)
        );
        let e = vl(serde_json::json!({"output_hidden_size": 4096}), &[]).unwrap_err().to_string();
        assert!(e.contains("`vision_config.hidden_size` is missing"), "{e}");
        let e = vl(serde_json::json!({"hidden_size": 32, "output_hidden_size": 48, "hidden_act": "gelu"}), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("vision_config.hidden_act"), "{e}");
        let mut o = serde_json::json!({"model_type": "step3_vl", "text_config": text, "vision_config": vision(), "projector_bias": false});
        let e = Step3Config::from_json_str(&o.to_string(), "c.json").unwrap_err().to_string();
        assert!(e.contains("`understand_projector_stride` is missing"), "{e}");
        o["understand_projector_stride"] = 2.into();
        o.as_object_mut().unwrap().remove("projector_bias");
        let e = Step3Config::from_json_str(&o.to_string(), "c.json").unwrap_err().to_string();
        assert!(e.contains("`projector_bias` is missing"), "{e}");
    }

    fn err(text: &str) -> String {
        Step3Config::from_json_str(text, "config.json").unwrap_err().to_string()
    }

    #[test]
    fn zero_sizes_and_non_positive_numbers_are_named() {
        for (key, value) in [("hidden_size", Value::from(0)), ("share_expert_dim", 0.into())] {
            let e = err(&edit(|o| {
                o.insert(key.into(), value);
            }));
            assert!(e.contains(&format!("`{key}` must be a positive integer, found 0")), "{key}: {e}");
        }
        for (key, value) in [("rope_theta", Value::from(0.0)), ("rms_norm_eps", (-1e-5).into())] {
            let e = err(&edit(|o| {
                o.insert(key.into(), value);
            }));
            assert!(e.contains(&format!("`{key}` must be a positive number")), "{key}: {e}");
        }
        let text: Value = serde_json::from_str(TEXT).unwrap();
        for (key, value) in [("patch_size", Value::from(0)), ("layer_norm_eps", 0.0.into())] {
            let mut v = vision();
            v[key] = value;
            let o = serde_json::json!({"model_type": "step3_vl", "text_config": text, "vision_config": v, "understand_projector_stride": 2, "projector_bias": false});
            let e = err(&o.to_string());
            assert!(e.contains(&format!("`vision_config.{key}` must be a positive")), "{key}: {e}");
        }
    }

    #[test]
    fn parses_bare_text_config_with_quirks() {
        let c = Step3Config::from_json_str(TEXT, "config.json").unwrap();
        assert_eq!(c.model_type, ModelType::Step3Text);
        assert_eq!(c.text.moe_layers_enum, vec![1, 2]);
        assert_eq!(c.text.max_position_embedding(), 4096);
        assert_eq!(c.text.rms_norm_eps, 1e-5);
        assert!(c.text.is_moe_layer(2) && !c.text.is_moe_layer(3));
    }

    #[test]
    fn missing_keys_are_named() {
        for key in [
            "hidden_size",
            "moe_layers_enum",
            "norm_expert_weight",
            "share_expert_dim",
            "num_attention_groups",
            "rope_theta",
        ] {
            let e = err(&edit(|o| {
                o.remove(key);
            }));
            assert!(e.contains(&format!("key `{key}` is missing")), "{key}: {e}");
        }
        let e = err(&edit(|o| {
            o.remove("max_position_embedding");
        }));
        assert!(e.contains("`max_position_embedding` is missing"), "{e}");
    }

    #[test]
    fn plural_max_position_embeddings_is_accepted() {
        let c = Step3Config::from_json_str(
            &edit(|o| {
                let v = o.remove("max_position_embedding").unwrap();
                o.insert("max_position_embeddings".into(), v);
            }),
            "config.json",
        )
        .unwrap();
        assert_eq!(c.text.max_position_embedding(), 4096);
    }

    #[test]
    fn unsupported_values_are_named() {
        type Edit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|o| {
                    o.insert("num_attention_groups".into(), 2.into());
                }),
                "num_attention_groups",
            ),
            (
                Box::new(|o| {
                    o.insert("rope_scaling".into(), serde_json::json!({"type": "yarn"}));
                }),
                "rope_scaling",
            ),
            (
                Box::new(|o| {
                    o.insert("moe_layers_enum".into(), "1,9".into());
                }),
                "moe_layers_enum",
            ),
            (
                Box::new(|o| {
                    o.insert("moe_layers_enum".into(), "1,x".into());
                }),
                "moe_layers_enum",
            ),
            (
                Box::new(|o| {
                    o.insert("moe_top_k".into(), 7.into());
                }),
                "moe_top_k",
            ),
            (
                Box::new(|o| {
                    o.insert("head_dim".into(), 31.into());
                }),
                "head_dim",
            ),
            (
                Box::new(|o| {
                    o.insert("hidden_size".into(), "big".into());
                }),
                "hidden_size",
            ),
            (
                Box::new(|o| {
                    o.insert("model_type".into(), "llama".into());
                }),
                "model_type",
            ),
        ];
        for (f, key) in cases {
            let e = err(&edit(|o| f(o)));
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
    }

    #[test]
    fn vl_config_reports_nested_key_path() {
        let text: Value = serde_json::from_str(TEXT).unwrap();
        let mut t = text.clone();
        t.as_object_mut().unwrap().remove("vocab_size");
        let vl = serde_json::json!({"model_type": "step3_vl", "text_config": t, "vision_config": vision(), "understand_projector_stride": 2, "projector_bias": false});
        let e = err(&vl.to_string());
        assert!(e.contains("`text_config.vocab_size` is missing"), "{e}");
        let vl = serde_json::json!({"model_type": "step3_vl", "vision_config": vision()});
        assert!(err(&vl.to_string()).contains("`text_config` is missing"));
        let vl = serde_json::json!({"model_type": "step3_vl", "text_config": text, "vision_config": vision(), "understand_projector_stride": 2, "projector_bias": false, "eos_token_id": [7, 9], "image_token_id": 301});
        let c = Step3Config::from_json_str(&vl.to_string(), "c.json").unwrap();
        assert_eq!(c.eos_token_ids, vec![7, 9]);
        assert_eq!(c.image_token_id, Some(301));
        assert!(err(r#"{"hidden_size": 3}"#).contains("`model_type` is missing"));
        let q = |q: Value| {
            let v = serde_json::json!({"model_type": "step3_vl", "text_config": text, "vision_config": vision(), "understand_projector_stride": 2, "projector_bias": false, "quantization_config": q});
            Step3Config::from_json_str(&v.to_string(), "c.json")
        };
        let ok = q(
            serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}),
        );
        assert_eq!(ok.unwrap().quantization.unwrap().weight_block_size, [128, 128]);
        let e = q(serde_json::json!({"quant_method": "awq", "weight_block_size": [128, 128]})).unwrap_err().to_string();
        assert!(e.contains("`quantization_config.quant_method` is \"awq\": unsupported quantization"), "{e}");
        let e = q(serde_json::json!({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("quantization_config.fmt"), "{e}");
        let e = q(serde_json::json!({"quant_method": "fp8", "weight_block_size": [128]})).unwrap_err().to_string();
        assert!(e.contains("quantization_config.weight_block_size"), "{e}");
        let e =
            q(serde_json::json!({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [1, 1]}))
                .unwrap_err()
                .to_string();
        assert!(e.contains("quantization_config.activation_scheme"), "{e}");
        assert!(err("{not json").contains("not valid JSON"));
    }
}
