//! Serving Step3 to many requests at once.
//!
//! This crate owns requests and their lifecycle: [`Engine`] runs one loop on its own thread over
//! one model and one paged KV cache, and every way of generating (the `step3` facade's
//! `generate`/`stream`, the CLI, the chat example, the HTTP server) submits [`Request`]s to it and
//! reads their [`Event`]s. The [`scheduler`] does iteration-level (continuous) batching: each step
//! runs every running sequence's next token plus as much waiting prefill as the token budget
//! allows, long prompts in chunks, first come first served, preempting the newest sequence
//! (recomputed later) when KV blocks run out. The [`blocks`] pool holds the prefix cache: full
//! blocks keyed by a hash of every token (and image) up to their end, shared copy-free. Each
//! request samples with its own settings and random stream, so a seeded request gives the same
//! tokens alone or batched. [`MetricsSnapshot`] has the counters a server exports.
//!
//! It does not own model math (`step3-model` and below: the paged attention itself is
//! `step3-mfa`'s), HTTP, or command lines.

pub mod blocks;
mod config;
mod engine;
mod metrics;
mod request;
pub mod scheduler;

pub use config::{EngineConfig, KvCacheSize};
pub use engine::{finish_label, Engine, EngineError, Prepared};
pub use metrics::{Histogram, MetricsSnapshot};
pub use request::{Completion, Event, Outcome, Prompt, Request, RequestHandle, SubmitError};
