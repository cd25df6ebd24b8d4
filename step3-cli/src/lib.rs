//! The `step3` command line and the chat example, on top of the [`step3`] library.
//!
//! This package owns what only a program run from a terminal needs: the clap argument groups the
//! `step3` binary and `examples/chat.rs` share ([`args`]: where the model is, how to run it, how
//! to sample), the weight-loading progress bar, and the golden-fixture checker behind
//! `step3 verify` ([`verify`]). Library users depend on `step3` alone and compile none of it
//! (no clap, plotters, sha2 or terminal progress bars).

pub mod args;
pub mod verify;

pub use args::{load_progress, ModelArgs, SamplingArgs};
