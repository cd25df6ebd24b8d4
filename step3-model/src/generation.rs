//! Token generation on top of [`Step3TextModel`]: sampling settings, the prefill + KV-cached
//! decode loop, stop conditions and timing.

use std::time::{Duration, Instant};

use candle_core::{IndexOp, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Serialize;

use crate::text::Step3TextModel;
use crate::{Error, Result};

/// How the next token is chosen and when generation stops.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling. Must be ≥ 0.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (sampling only).
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `p`, in (0, 1].
    pub top_p: Option<f64>,
    /// Seed of the sampler's random generator.
    pub seed: u64,
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// Generation stops after producing any of these (the token is kept in the output).
    pub stop_token_ids: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 299792458,
            max_new_tokens: 256,
            stop_token_ids: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Rejects settings that have no meaning.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Input(format!("temperature must be a number >= 0, got {}", self.temperature)));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Input(format!("top-p must be in (0, 1], got {p}")));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::Input("top-k must be at least 1".into()));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::Input("max-new-tokens must be at least 1".into()));
        }
        Ok(())
    }

    /// The candle sampler for these settings.
    pub fn logits_processor(&self) -> LogitsProcessor {
        let temperature = self.temperature;
        let sampling = if temperature == 0.0 {
            Sampling::ArgMax
        } else {
            match (self.top_k, self.top_p) {
                (None, None) | (None, Some(1.0)) => Sampling::All { temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            }
        };
        LogitsProcessor::from_sampling(self.seed, sampling)
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FinishReason {
    /// A stop token was produced.
    Stop(u32),
    /// `max_new_tokens` were produced.
    Length,
    /// The model's context (`max_position_embedding`) is full.
    Context,
}

/// The generated tokens and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationOutput {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt processing plus the first token.
    pub prefill_time: Duration,
    /// Every later token.
    pub decode_time: Duration,
}

impl GenerationOutput {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Decode rate over the tokens after the first.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Generates from `prompt` with a KV cache: one prefill pass over the prompt, then one decode
/// pass per new token. `on_token` sees every token as it is produced.
pub fn generate(
    model: &Step3TextModel,
    prompt: &[u32],
    params: &SamplingParams,
    on_token: impl FnMut(u32),
) -> Result<GenerationOutput> {
    generate_from_embeds(model, prompt, None, params, on_token)
}

/// [`generate`] with the prompt's embeddings given (`[1, T, H]`, e.g. with image features merged
/// in by [`crate::Step3Model::embed`]); `prompt` holds the matching token ids.
pub fn generate_from_embeds(
    model: &Step3TextModel,
    prompt: &[u32],
    embeds: Option<Tensor>,
    params: &SamplingParams,
    mut on_token: impl FnMut(u32),
) -> Result<GenerationOutput> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    model.check_ids(prompt)?;
    let context = model.config().max_position_embedding();
    if prompt.len() >= context {
        return Err(Error::Input(format!(
            "the prompt has {} tokens, which leaves no room in the model's context of {context} tokens",
            prompt.len()
        )));
    }
    // The last generated token is never fed back, hence the -1.
    let capacity = (prompt.len() + params.max_new_tokens - 1).min(context);
    let mut cache = model.new_cache(1, capacity)?;
    let mut sampler = params.logits_processor();
    let device = model.device();

    let start = Instant::now();
    let embeds = match embeds {
        Some(e) => {
            if e.dims() != [1, prompt.len(), model.config().hidden_size] {
                return Err(Error::Input(format!(
                    "prompt embeddings {:?} do not match {} prompt tokens",
                    e.dims(),
                    prompt.len()
                )));
            }
            e
        }
        None => model.embed(&Tensor::new(prompt, device)?.unsqueeze(0)?)?,
    };
    let hidden = model.forward_embeds(&embeds, &[prompt.len()], &mut cache, None)?;
    let logits = model.logits(&hidden.i((0, prompt.len() - 1))?)?;
    let mut next = sampler.sample(&logits)?;
    let prefill_time = start.elapsed();

    let start = Instant::now();
    let mut tokens = vec![next];
    on_token(next);
    let finish = loop {
        if params.stop_token_ids.contains(&next) {
            break FinishReason::Stop(next);
        }
        if tokens.len() >= params.max_new_tokens {
            break FinishReason::Length;
        }
        if prompt.len() + tokens.len() > capacity {
            break FinishReason::Context;
        }
        let ids = Tensor::new(&[[next]], device)?;
        let hidden = model.forward(&ids, &[1], &mut cache, None)?;
        let logits = model.logits(&hidden.i((0, 0))?)?;
        next = sampler.sample(&logits)?;
        tokens.push(next);
        on_token(next);
    };
    Ok(GenerationOutput { tokens, finish, prompt_tokens: prompt.len(), prefill_time, decode_time: start.elapsed() })
}
