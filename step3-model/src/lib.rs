//! The composed Step3 model.
//!
//! This crate owns what turns a checkpoint directory into a running model: checkpoint discovery
//! and memory-mapped loading ([`loader`]: one `model.safetensors` or shards, the inventory check
//! of every tensor before anything is built), the Step3 language model composed from
//! [`step3_mfa`] attention and [`step3_moe`] feed-forward blocks ([`Step3TextModel`]; also split
//! over tensor- and expert-parallel ranks, routed experts optionally in host memory: [`shard`]), the
//! vision-language model with its image-feature merge ([`Step3Model`]; the tower itself is
//! [`step3_vision`]'s), the tokenizer and chat format, turning generated tokens into reasoning,
//! answer and tool calls ([`stream`]), sampling ([`sampling`]), the checkpoint's generation
//! settings and the single-sequence decode loop ([`generation`]), the Hugging Face hub,
//! expert-health statistics ([`experts`]) and parameter arithmetic. `config.json` itself is parsed by [`step3_config`] (re-exported here).
//! It does not schedule requests (`step3-engine`), speak HTTP, parse command lines or print.
//!
//! ```no_run
//! # fn main() -> step3_model::Result<()> {
//! use candle_core::{DType, Device};
//! let ckpt = step3_model::Step3Checkpoint::open("path/to/step3")?;
//! let model = ckpt.load_text_model(DType::BF16, &Device::Cpu)?;
//! let params = step3_model::SamplingParams { max_new_tokens: 8, ..Default::default() };
//! let out = step3_model::generate(&model, &[0, 1, 2], &params, |_| {})?;
//! println!("{:?}", out.tokens);
//! # Ok(()) }
//! ```

pub mod chat;
pub mod checkpoint;
mod error;
pub mod experts;
pub mod generation;
pub mod hub;
pub mod inventory;
pub mod loader;
mod multimodal;
pub mod params;
mod runtime;
pub mod sampling;
pub mod shard;
pub mod stream;
mod text;
pub mod tokenizer;

pub use chat::{ChatTemplate, Conversation, ImageSource, Message, Role};
pub use checkpoint::{Checkpoint, LoadProgress};
pub use error::{Error, Result};
pub use generation::{
    generate, generate_from_embeds, FinishReason, GenerateOptions, GenerationConfig, GenerationOutput, Generator,
    SamplingParams, Stats,
};
pub use hub::{HubOptions, ModelSource};
pub use inventory::{ExpectedTensor, InventoryReport};
pub use loader::{Fp8Storage, LoadOptions, Step3Checkpoint};
pub use multimodal::{merge, Step3Model};
pub use params::{kv_bytes_per_token, param_counts, ParamCounts};
pub use runtime::{init_cpu, init_cpu_threads, keep_freed_memory};
pub use sampling::{Sampled, Sampler, TokenLogprob};
pub use shard::{check_layout, ExpertPlacement, Layout, LayoutError};
pub use step3_config as config;
pub use step3_config::{read_json, ConfigError, ModelType, QuantizationConfig, Step3Config, TextConfig};
pub use step3_mfa as mfa;
pub use step3_moe as moe;
pub use step3_moe::Routing;
pub use step3_nn as nn;
pub use step3_nn::{BlockFp8, Linear, Weight, WeightFormat};
pub use step3_vision as vision;
pub use step3_vision::{
    ImageLayout, ImageTokenIds, PreprocessConfig, PreprocessedImage, VisionConfig, VisionModel, WindowRule,
};
pub use stream::{Detokenizer, OutputEvent, OutputParser, StopStrings, TextDecoder, ToolCall};
pub use text::{mfa_config, moe_config};
pub use text::{LayerRouting, Step3Cache, Step3PagedCache, Step3TextModel};
pub use tokenizer::Step3Tokenizer;
