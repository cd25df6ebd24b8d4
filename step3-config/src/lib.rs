//! The `config.json` of a Step3 checkpoint.
//!
//! This crate owns the file format of Step3's configuration: the language-model section
//! ([`TextConfig`], keys under `text_config` or a bare `step3_text` file), the vision tower and
//! projector ([`VisionConfig`]), block-FP8 quantisation ([`QuantizationConfig`]), the top-level
//! token ids, and the size rules that follow from them (image tokens per view, which view sizes
//! a tower accepts). Parsing is loud: a key the real checkpoint always carries is required, and a
//! missing or unsupported value is a [`ConfigError`] naming the file and the key.
//!
//! It depends on no tensor library, so tools that only reason about a model's shape (the
//! decode-cost model in `step3-afd`, deployment planning) build in seconds. Loading weights,
//! `generation_config.json` and tokenizer files belong to `step3-model`.

mod config;
mod error;

pub use config::{tokens_per_view, ModelType, QuantizationConfig, Step3Config, TextConfig, VisionConfig};
pub use error::{read_json, ConfigError, Result};
