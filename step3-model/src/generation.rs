//! Token generation on top of [`Step3TextModel`]: sampling settings, the prefill + KV-cached
//! decode loop as a resumable [`Generator`] (one token per call, so callers can stream), stop
//! tokens, repetition penalty and timing.

use std::time::{Duration, Instant};

use candle_core::{IndexOp, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Serialize;

use crate::text::{Step3Cache, Step3TextModel};
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
    /// Generation stops after producing any of these (the token is returned, then nothing more).
    pub stop_token_ids: Vec<u32>,
    /// Divides positive (multiplies negative) logits of tokens seen in the last
    /// `repeat_last_n` tokens; 1.0 disables it.
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
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
            repetition_penalty: 1.0,
            repeat_last_n: 64,
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
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::Input(format!(
                "repetition penalty must be a positive number, got {}",
                self.repetition_penalty
            )));
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
    /// A stop string appeared in the text.
    StopString,
    /// `max_new_tokens` were produced.
    Length,
    /// The model's context (`max_position_embedding`) is full.
    Context,
    /// The caller stopped it.
    Cancelled,
}

/// Token counts and timing of a generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt processing plus the first token.
    pub prefill_time: Duration,
    /// Every later token.
    pub decode_time: Duration,
    pub finish: FinishReason,
}

impl Stats {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Decode rate over the tokens after the first.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// The generated tokens and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationOutput {
    pub tokens: Vec<u32>,
    pub stats: Stats,
}

/// A generation in progress: prefill on the first [`Generator::next_token`], then one decode step
/// per call. Holds the KV cache.
pub struct Generator<'m> {
    model: &'m Step3TextModel,
    cache: Step3Cache,
    sampler: LogitsProcessor,
    params: SamplingParams,
    /// Prompt then generated tokens (repetition penalty).
    history: Vec<u32>,
    prompt_len: usize,
    /// Prompt embeddings, consumed by the prefill.
    embeds: Option<Tensor>,
    capacity: usize,
    finish: Option<FinishReason>,
    prefill_time: Duration,
    decode_time: Duration,
}

impl<'m> Generator<'m> {
    /// Validates everything (settings, ids, context) before any compute. `embeds` (`[1, T, H]`)
    /// carries merged image features; otherwise the token embeddings of `prompt` are used.
    pub fn new(
        model: &'m Step3TextModel,
        prompt: &[u32],
        embeds: Option<Tensor>,
        params: &SamplingParams,
    ) -> Result<Self> {
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
        if let Some(e) = &embeds {
            if e.dims() != [1, prompt.len(), model.config().hidden_size] {
                return Err(Error::Input(format!(
                    "prompt embeddings {:?} do not match {} prompt tokens",
                    e.dims(),
                    prompt.len()
                )));
            }
        }
        // The last generated token is never fed back, hence the -1.
        let capacity = (prompt.len() + params.max_new_tokens - 1).min(context);
        Ok(Self {
            model,
            cache: model.new_cache(1, capacity)?,
            sampler: params.logits_processor(),
            params: params.clone(),
            history: prompt.to_vec(),
            prompt_len: prompt.len(),
            embeds,
            capacity,
            finish: None,
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        })
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Ends the generation (e.g. a stop string was seen by the caller).
    pub fn stop(&mut self, reason: FinishReason) {
        self.finish.get_or_insert(reason);
    }

    fn sample(&mut self, logits: Tensor) -> Result<u32> {
        let logits = if self.params.repetition_penalty != 1.0 {
            let start = self.history.len().saturating_sub(self.params.repeat_last_n);
            candle_transformers::utils::apply_repeat_penalty(
                &logits,
                self.params.repetition_penalty,
                &self.history[start..],
            )?
        } else {
            logits
        };
        Ok(self.sampler.sample(&logits)?)
    }

    /// The next token, or `None` once generation has finished.
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        let start = Instant::now();
        let device = self.model.device();
        let logits = if self.generated().is_empty() {
            let embeds = match self.embeds.take() {
                Some(e) => e,
                None => self.model.embed(&Tensor::new(&self.history[..], device)?.unsqueeze(0)?)?,
            };
            let hidden = self.model.forward_embeds(&embeds, &[self.prompt_len], &mut self.cache, None)?;
            self.model.logits(&hidden.i((0, self.prompt_len - 1))?)?
        } else {
            let last = *self.history.last().unwrap_or(&0);
            let hidden = self.model.forward(&Tensor::new(&[[last]], device)?, &[1], &mut self.cache, None)?;
            self.model.logits(&hidden.i((0, 0))?)?
        };
        let next = self.sample(logits)?;
        if self.generated().is_empty() {
            self.prefill_time = start.elapsed();
        } else {
            self.decode_time += start.elapsed();
        }
        self.history.push(next);
        let produced = self.generated().len();
        if self.params.stop_token_ids.contains(&next) {
            self.finish = Some(FinishReason::Stop(next));
        } else if produced >= self.params.max_new_tokens {
            self.finish = Some(FinishReason::Length);
        } else if self.history.len() > self.capacity {
            self.finish = Some(FinishReason::Context);
        }
        Ok(Some(next))
    }

    /// Counts and timing so far (final after the last token; `Cancelled` while unfinished).
    pub fn stats(&self) -> Stats {
        Stats {
            prompt_tokens: self.prompt_len,
            generated_tokens: self.generated().len(),
            prefill_time: self.prefill_time,
            decode_time: self.decode_time,
            finish: self.finish.unwrap_or(FinishReason::Cancelled),
        }
    }

    /// The result so far (call after the last token).
    pub fn output(&self) -> GenerationOutput {
        GenerationOutput { tokens: self.generated().to_vec(), stats: self.stats() }
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
    let mut g = Generator::new(model, prompt, embeds, params)?;
    while let Some(t) = g.next_token()? {
        on_token(t);
    }
    Ok(g.output())
}
