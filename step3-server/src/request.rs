//! Reading OpenAI requests: the body's JSON is checked against the maintained OpenAI types
//! (`async-openai`, so a field of the wrong type is named by its path), then the settings Step3
//! uses are read and validated, with the extensions Step3 needs (`top_k`, `repetition_penalty`,
//! `ignore_eos`, `chat_template_kwargs`, `return_token_ids`, `response_prefix`).

use serde_json::{Map, Value};
use step3::GenerateOptions;

use crate::error::ApiError;

/// The body as a JSON object (malformed JSON is a 400).
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::invalid("", format!("invalid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::invalid("", "the request body must be a JSON object")),
    }
}

/// Deserializes `obj` into an OpenAI request type; a type error names the field's path.
pub fn typed<T: serde::de::DeserializeOwned>(obj: &Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(obj.clone())).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = e.inner().to_string();
        let inner = inner.split(" at line ").next().unwrap_or(&inner).to_string();
        // A missing field is reported at its parent.
        if let Some(field) = inner.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
            let param = if path.is_empty() { field.to_string() } else { format!("{path}.{field}") };
            return ApiError::invalid(param.clone(), format!("`{param}` is required"));
        }
        ApiError::invalid(path.clone(), format!("invalid value for `{path}`: {inner}"))
    })
}

fn number(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::invalid(key, format!("`{key}` must be a number"))),
    }
}

fn integer(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| ApiError::invalid(key, format!("`{key}` must be an integer"))),
    }
}

pub fn boolean(obj: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(key, format!("`{key}` must be true or false"))),
    }
}

pub fn string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(key, format!("`{key}` must be a string"))),
    }
}

/// What chat and text completions share: sampling, stopping, `n`, streaming, the token budget.
#[derive(Debug, Clone)]
pub struct Common {
    pub options: GenerateOptions,
    /// The requested budget and the field it came from (`max_tokens`, `max_completion_tokens`).
    pub max_tokens: Option<(usize, &'static str)>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub return_token_ids: bool,
    /// Text the answer must start with (Step3 extension), produced as if the model wrote it.
    pub response_prefix: Option<String>,
}

/// Reads and checks the shared settings of `obj`.
pub fn common(obj: &Map<String, Value>, logprobs: Option<usize>) -> Result<Common, ApiError> {
    use step3::generation::{check_repetition_penalty, check_temperature, check_top_p};
    let temperature = number(obj, "temperature")?;
    if let Some(t) = temperature {
        check_temperature(t).map_err(|m| ApiError::invalid("temperature", format!("`temperature` {m}")))?;
    }
    let top_p = number(obj, "top_p")?;
    if let Some(p) = top_p {
        check_top_p(p).map_err(|m| ApiError::invalid("top_p", format!("`top_p` {m}")))?;
    }
    let top_k = match integer(obj, "top_k")? {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be at least 1 (or 0 or -1 for none), got {k}"),
            ))
        }
    };
    let repetition_penalty = number(obj, "repetition_penalty")?.unwrap_or(1.0);
    check_repetition_penalty(repetition_penalty as f32)
        .map_err(|m| ApiError::invalid("repetition_penalty", format!("`repetition_penalty` {m}")))?;
    for key in ["presence_penalty", "frequency_penalty"] {
        if number(obj, key)?.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(
                key,
                format!("`{key}` is not supported by this server (use `repetition_penalty`)"),
            ));
        }
    }
    if obj.get("logit_bias").is_some_and(|v| v.as_object().is_some_and(|m| !m.is_empty())) {
        return Err(ApiError::invalid("logit_bias", "`logit_bias` is not supported by this server"));
    }
    // Without a seed each request samples afresh (as OpenAI's and vLLM's do).
    let seed = integer(obj, "seed")?.map_or_else(fresh_seed, |s| s as u64);
    let n = match integer(obj, "n")? {
        None => 1,
        Some(n) if (1..=128).contains(&n) => n as usize,
        Some(n) => return Err(ApiError::invalid("n", format!("`n` must be between 1 and 128, got {n}"))),
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str().map(str::to_string).ok_or_else(|| ApiError::invalid("stop", "`stop` must hold strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid("stop", "`stop` must be a string or a list of strings")),
    };
    let mut max_tokens = None;
    for key in ["max_completion_tokens", "max_tokens"] {
        if let Some(m) = integer(obj, key)? {
            if m < 1 {
                return Err(ApiError::invalid(key, format!("`{key}` must be at least 1, got {m}")));
            }
            max_tokens = Some((m as usize, key));
            break;
        }
    }
    let stream = boolean(obj, "stream")?;
    let include_usage =
        obj.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    let options = GenerateOptions {
        temperature,
        top_p,
        top_k,
        seed,
        max_new_tokens: max_tokens.map_or(usize::MAX, |(m, _)| m),
        repetition_penalty: repetition_penalty as f32,
        stop,
        ignore_eos: boolean(obj, "ignore_eos")?,
        logprobs,
    };
    Ok(Common {
        options,
        max_tokens,
        n,
        stream,
        include_usage,
        return_token_ids: boolean(obj, "return_token_ids")?,
        response_prefix: string(obj, "response_prefix")?,
    })
}

/// A seed no earlier request had: `RandomState`'s keys are random per process and change with
/// every instance.
fn fresh_seed() -> u64 {
    use std::hash::BuildHasher as _;
    std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
}
