//! Token generation on top of [`Step3TextModel`]: the one default set of sampling settings,
//! the checkpoint's stop tokens and defaults ([`GenerationConfig`]), the prefill + KV-cached
//! decode loop as a resumable [`Generator`] (one token per call, so callers can stream), and
//! timing.

use std::time::{Duration, Instant};

use std::path::Path;

use candle_core::{IndexOp, Tensor};
use serde::Serialize;

use crate::sampling::{Sampled, Sampler};
use crate::text::{Step3Cache, Step3TextModel};
use crate::{Error, Result, Step3Config, Step3Tokenizer};

/// The seed of every sampler unless a request sets its own.
pub const DEFAULT_SEED: u64 = 299_792_458;
/// New tokens per request unless it says otherwise (always also bounded by the context).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 1024;
/// Tokens the repetition penalty looks back over.
pub const DEFAULT_REPEAT_LAST_N: usize = 64;

/// How the next token is chosen and when generation stops: the resolved settings of one request.
///
/// The defaults are the one default set of the project: greedy, [`DEFAULT_SEED`],
/// [`DEFAULT_MAX_NEW_TOKENS`], no penalty, no stop tokens. A checkpoint's `generation_config.json`
/// changes the sampling defaults of chat requests (see [`GenerationConfig`]).
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
    /// Upper bound on generated tokens (generation also ends when the context is full).
    pub max_new_tokens: usize,
    /// Generation stops after producing any of these (the token is returned, then nothing more).
    pub stop_token_ids: Vec<u32>,
    /// Divides positive (multiplies negative) logits of tokens seen in the last
    /// `repeat_last_n` tokens; 1.0 disables it.
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    /// Return each chosen token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: DEFAULT_SEED,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            stop_token_ids: Vec::new(),
            repetition_penalty: 1.0,
            repeat_last_n: DEFAULT_REPEAT_LAST_N,
            logprobs: None,
        }
    }
}

/// Why `t` cannot be a sampling temperature, if it cannot: it must be a number >= 0 (0: greedy)
/// whose inverse is finite in f32, since the sampler divides f32 logits by it. The reason is
/// worded for the caller to put the setting's name before it.
pub fn check_temperature(t: f64) -> std::result::Result<(), String> {
    if !(t.is_finite() && t >= 0.0) {
        return Err(format!("must be a number >= 0, got {t}"));
    }
    if t > 0.0 && !(1.0 / t as f32).is_finite() {
        return Err(format!("{t} is too small to sample with (use 0 for greedy, else at least 1e-30)"));
    }
    Ok(())
}

/// Why `p` cannot be a top-p, if it cannot: it must lie in (0, 1]. Worded as [`check_temperature`].
pub fn check_top_p(p: f64) -> std::result::Result<(), String> {
    if p > 0.0 && p <= 1.0 {
        Ok(())
    } else {
        Err(format!("must be in (0, 1], got {p}"))
    }
}

/// Why `p` cannot be a repetition penalty, if it cannot: it divides or multiplies logits, so it
/// and its inverse must be finite, positive normal f32 numbers. Worded as [`check_temperature`].
pub fn check_repetition_penalty(p: f32) -> std::result::Result<(), String> {
    if p.is_finite() && p > 0.0 && (1.0 / p).is_finite() && p.is_normal() {
        Ok(())
    } else {
        Err(format!("must be a positive number (a normal f32), got {p}"))
    }
}

impl SamplingParams {
    /// Rejects settings that have no meaning.
    pub fn validate(&self) -> Result<()> {
        check_temperature(self.temperature).map_err(|m| Error::Input(format!("temperature {m}")))?;
        if let Some(p) = self.top_p {
            check_top_p(p).map_err(|m| Error::Input(format!("top-p {m}")))?;
        }
        if self.top_k == Some(0) {
            return Err(Error::Input("top-k must be at least 1".into()));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::Input("max-new-tokens must be at least 1".into()));
        }
        check_repetition_penalty(self.repetition_penalty)
            .map_err(|m| Error::Input(format!("repetition-penalty {m}")))?;
        Ok(())
    }

    /// A sampler with these settings.
    pub fn sampler(&self) -> Sampler {
        Sampler::new(self)
    }
}

/// What a caller asks of one generation. Unset sampling settings come from the checkpoint's
/// `generation_config.json`, else from [`SamplingParams::default`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// 0 = greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: u64,
    /// Default [`DEFAULT_MAX_NEW_TOKENS`]; generation also ends when the context is full.
    pub max_new_tokens: usize,
    /// 1.0 disables it.
    pub repetition_penalty: f32,
    /// Generation ends before any of these strings (they are not part of the answer).
    pub stop: Vec<String>,
    /// Keep generating past end-of-turn tokens.
    pub ignore_eos: bool,
    /// Return each token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        let d = SamplingParams::default();
        Self {
            temperature: None,
            top_p: None,
            top_k: None,
            seed: d.seed,
            max_new_tokens: d.max_new_tokens,
            repetition_penalty: d.repetition_penalty,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// The checkpoint's generation settings, decided in one place: the end-of-turn ids (`config.json`'s
/// `eos_token_id`, `generation_config.json`'s, and the tokenizer's `<|EOT|>` and
/// `<｜end▁of▁sentence｜>`) and the sampling defaults of `generation_config.json`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationConfig {
    /// Every id that ends a turn, sorted.
    pub eos_token_ids: Vec<u32>,
    pub temperature: Option<f64>,
    /// Only values below 1 (1 is no truncation).
    pub top_p: Option<f64>,
    /// Only values above 0 (0 is no truncation).
    pub top_k: Option<usize>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json` (optional) on top of `config` and `tokenizer` (optional).
    pub fn load(dir: &Path, config: &Step3Config, tokenizer: Option<&Step3Tokenizer>) -> Result<Self> {
        let path = dir.join(GENERATION_CONFIG);
        let file = if path.is_file() { Some(step3_config::read_json(&path)?) } else { None };
        let mut eos = config.eos_token_ids.clone();
        let mut out = Self::default();
        if let Some(g) = &file {
            let bad = |key: &str, v: &serde_json::Value| Error::key(&path, key, format!("is invalid: {v}"));
            let as_id = |v: &serde_json::Value| {
                v.as_u64().and_then(|v| u32::try_from(v).ok()).ok_or_else(|| bad("eos_token_id", v))
            };
            match g.get("eos_token_id") {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::Array(ids)) => {
                    for v in ids {
                        eos.push(as_id(v)?);
                    }
                }
                Some(v) => eos.push(as_id(v)?),
            }
            let number = |key: &str| match g.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(key, v)),
            };
            out.temperature = number("temperature")?;
            if let Some(t) = out.temperature {
                if !(t.is_finite() && t >= 0.0) {
                    return Err(Error::key(&path, "temperature", format!("must be a number >= 0, found {t}")));
                }
            }
            let top_p = number("top_p")?;
            if let Some(p) = top_p {
                check_top_p(p).map_err(|m| Error::key(&path, "top_p", m))?;
            }
            out.top_p = top_p.filter(|p| *p < 1.0);
            // As in transformers: a whole number, 0 for none.
            let top_k = number("top_k")?;
            if let Some(k) = top_k {
                if !(k >= 0.0 && k.fract() == 0.0 && k < 1e15) {
                    return Err(Error::key(
                        &path,
                        "top_k",
                        format!("must be a whole number >= 0 (0: none), found {k}"),
                    ));
                }
            }
            out.top_k = top_k.map(|k| k as usize).filter(|k| *k > 0);
        }
        if let Some(tok) = tokenizer {
            eos.extend([crate::tokenizer::EOT, crate::tokenizer::EOS].iter().filter_map(|t| tok.token_id(t)));
        }
        eos.sort_unstable();
        eos.dedup();
        out.eos_token_ids = eos;
        Ok(out)
    }

    /// The resolved settings of a request: what it sets, else these defaults, else
    /// [`SamplingParams::default`].
    pub fn sampling(&self, opts: &GenerateOptions) -> SamplingParams {
        let d = SamplingParams::default();
        SamplingParams {
            temperature: opts.temperature.or(self.temperature).unwrap_or(d.temperature),
            top_p: opts.top_p.or(self.top_p),
            top_k: opts.top_k.or(self.top_k),
            seed: opts.seed,
            max_new_tokens: opts.max_new_tokens,
            stop_token_ids: if opts.ignore_eos { Vec::new() } else { self.eos_token_ids.clone() },
            repetition_penalty: opts.repetition_penalty,
            logprobs: opts.logprobs,
            ..d
        }
    }
}

/// The optional file of sampling defaults and extra end-of-turn ids beside `config.json`.
pub const GENERATION_CONFIG: &str = "generation_config.json";

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
    /// The caller stopped it (or went away).
    Cancelled,
    /// The answer ended with tool calls (a stop token after `<｜tool_calls_end｜>`).
    ToolCalls,
    /// The request failed; the error says why.
    Error,
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stop(id) => write!(f, "stop token {id}"),
            Self::StopString => write!(f, "stop string"),
            Self::Length => write!(f, "max new tokens reached"),
            Self::Context => write!(f, "the model's context is full"),
            Self::Cancelled => write!(f, "cancelled"),
            Self::ToolCalls => write!(f, "tool calls"),
            Self::Error => write!(f, "error"),
        }
    }
}

/// Token counts and timing of a generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V came from the prefix cache (not computed again).
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From the first step that ran the prompt to the first token.
    pub prefill_time: Duration,
    /// From the first token to the last.
    pub decode_time: Duration,
    /// From submission (queueing included) to the first token.
    pub time_to_first_token: Duration,
    /// The time between consecutive tokens (`generated_tokens − 1` of them).
    pub token_latencies: Vec<Duration>,
    pub finish: FinishReason,
}

impl Stats {
    /// Computed prompt tokens (cached ones excluded) per second of prefill.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        (self.prompt_tokens - self.cached_prompt_tokens.min(self.prompt_tokens)) as f64
            / self.prefill_time.as_secs_f64().max(1e-9)
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
    sampler: Sampler,
    params: SamplingParams,
    /// Prompt then generated tokens (repetition penalty).
    history: Vec<u32>,
    prompt_len: usize,
    /// Prompt embeddings, consumed by the prefill.
    embeds: Option<Tensor>,
    capacity: usize,
    /// What the sampler returned for every generated token.
    logprobs: Vec<Sampled>,
    finish: Option<FinishReason>,
    prefill_time: Duration,
    decode_time: Duration,
    token_latencies: Vec<Duration>,
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
        // The last generated token is never fed back, hence the -1; the context bounds it all.
        let capacity = prompt.len().saturating_add(params.max_new_tokens - 1).min(context);
        Ok(Self {
            model,
            cache: model.new_cache(1, capacity)?,
            sampler: params.sampler(),
            params: params.clone(),
            history: prompt.to_vec(),
            prompt_len: prompt.len(),
            embeds,
            capacity,
            logprobs: Vec::new(),
            finish: None,
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
            token_latencies: Vec::new(),
        })
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// Each generated token as the sampler returned it (with log-probabilities when asked for).
    pub fn sampled(&self) -> &[Sampled] {
        &self.logprobs
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Ends the generation (e.g. a stop string was seen by the caller).
    pub fn stop(&mut self, reason: FinishReason) {
        self.finish.get_or_insert(reason);
    }

    fn sample(&mut self, logits: Tensor) -> Result<Sampled> {
        let row = logits.to_vec1::<f32>()?;
        self.sampler.sample(&row, &self.history)
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
        let sampled = self.sample(logits)?;
        let next = sampled.token;
        self.logprobs.push(sampled);
        if self.generated().is_empty() {
            self.prefill_time = start.elapsed();
        } else {
            self.decode_time += start.elapsed();
            self.token_latencies.push(start.elapsed());
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
            cached_prompt_tokens: 0,
            generated_tokens: self.generated().len(),
            prefill_time: self.prefill_time,
            decode_time: self.decode_time,
            time_to_first_token: self.prefill_time,
            token_latencies: self.token_latencies.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `generation_config.json`'s sampling values are checked, not silently dropped: top-p in
    /// (0, 1] (1: none), top-k a whole number (0: none, as in transformers), temperature >= 0.
    #[test]
    fn generation_config_values_are_checked() {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/step3-tiny/vl-f32");
        let config = Step3Config::from_file(fixture.join("config.json")).unwrap();
        let load = |body: &str| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(GENERATION_CONFIG), body).unwrap();
            GenerationConfig::load(dir.path(), &config, None)
        };
        let ok = load(r#"{"temperature": 0.7, "top_p": 1.0, "top_k": 0}"#).unwrap();
        assert_eq!((ok.temperature, ok.top_p, ok.top_k), (Some(0.7), None, None));
        let ok = load(r#"{"top_p": 0.9, "top_k": 40}"#).unwrap();
        assert_eq!((ok.top_p, ok.top_k), (Some(0.9), Some(40)));
        for (body, key) in [
            (r#"{"top_p": 7}"#, "top_p"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_k": -5}"#, "top_k"),
            (r#"{"top_k": 2.5}"#, "top_k"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_k": "many"}"#, "top_k"),
        ] {
            let err = load(body).unwrap_err().to_string();
            assert!(err.contains(key), "{body}: {err}");
        }
    }
}
