//! `POST /v1/completions`: plain continuations of text or token-id prompts (one or several), the
//! text exactly as generated (no reasoning or tool-call split).

use std::sync::Arc;

use async_openai::types::chat::Prompt as OaiPrompt;
use async_openai::types::completions::CreateCompletionRequest;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::Value;
use step3::engine::{Prompt, RequestHandle};
use step3::FinishReason;

use crate::choice::{Choice, Piece, ToolSet};
use crate::error::ApiError;
use crate::{finish_reason, request, AppState, Job};

pub async fn handle(state: AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let obj = request::json_object(&body?)?;
    let req: CreateCompletionRequest = request::typed(&obj)?;
    crate::check_model(&state, &req.model)?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo", "`echo` is not supported by this server"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported by this server"));
    }
    let logprobs = match req.logprobs {
        Some(k) if k > 5 => {
            return Err(ApiError::invalid("logprobs", format!("`logprobs` must be at most 5, got {k}")))
        }
        Some(k) => Some(k as usize),
        None => None,
    };
    let common = request::common(&obj, logprobs)?;
    let prompts: Vec<Prompt> = match req.prompt {
        OaiPrompt::String(s) => vec![Prompt::Text { text: s, images: Vec::new() }],
        OaiPrompt::StringArray(v) => v.into_iter().map(|text| Prompt::Text { text, images: Vec::new() }).collect(),
        OaiPrompt::IntegerArray(ids) => vec![Prompt::Tokens { ids, images: Vec::new() }],
        OaiPrompt::ArrayOfIntegerArray(v) => {
            v.into_iter().map(|ids| Prompt::Tokens { ids, images: Vec::new() }).collect()
        }
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` is empty"));
    }
    let forced = match &common.response_prefix {
        Some(p) => crate::encode(&state, p, "response_prefix")?,
        None => Vec::new(),
    };
    let mut jobs = Vec::new();
    for (i, prompt) in prompts.into_iter().enumerate() {
        let param = if jobs.is_empty() && i == 0 { "prompt".to_string() } else { format!("prompt[{i}]") };
        let prepared = crate::prepare(&state, prompt, Vec::new(), &param).await?;
        if prepared.ids.is_empty() {
            return Err(ApiError::invalid(param, "the prompt is empty"));
        }
        let mut c = common.clone();
        c.options.max_new_tokens = crate::budget(&state, prepared.ids.len(), &c, &param)?;
        jobs.push(Job {
            prepared,
            common: c,
            forced: forced.clone(),
            after_reasoning: Vec::new(),
            plain: true,
            ignore_tool_calls: true,
        });
    }
    let prompt_lens: Vec<usize> = jobs.iter().map(|j| j.prepared.ids.len()).collect();
    let prompt_ids: Vec<Vec<u32>> = jobs.iter().map(|j| j.prepared.ids.clone()).collect();
    let handles = crate::submit(&state, &jobs, "prompt")?;
    let id = crate::new_id("cmpl", handles.first());
    let created = crate::now();
    let ctx = Completions { state, id, created, n: common.n, logprobs: logprobs.is_some(), prompt_lens, prompt_ids };
    if common.stream {
        Ok(ctx.stream(handles, common.include_usage, common.return_token_ids))
    } else {
        ctx.whole(handles, common.return_token_ids).await
    }
}

struct Completions {
    state: AppState,
    id: String,
    created: u32,
    n: usize,
    logprobs: bool,
    prompt_lens: Vec<usize>,
    prompt_ids: Vec<Vec<u32>>,
}

/// The legacy `logprobs` object of a text completion.
fn legacy_logprobs(c: &Choice) -> Value {
    let mut offset = 0u32;
    let (mut tokens, mut lps, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for lp in &c.logprobs {
        offsets.push(offset);
        offset += lp.token.len() as u32;
        tokens.push(lp.token.clone());
        lps.push(lp.logprob);
        let top: serde_json::Map<String, Value> =
            lp.top_logprobs.iter().map(|t| (t.token.clone(), Value::from(t.logprob))).collect();
        tops.push(Value::Object(top));
    }
    serde_json::json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

impl Completions {
    fn model(&self) -> &str {
        &self.state.config.served_model_name
    }

    fn prompt_of(&self, choice: usize) -> usize {
        choice / self.n.max(1)
    }

    fn usage(&self, completion: usize, cached: usize) -> Value {
        crate::usage(self.prompt_lens.iter().sum(), completion, cached)
    }

    async fn whole(&self, handles: Vec<RequestHandle>, token_ids: bool) -> Result<Response, ApiError> {
        let tokenizer = self.state.step3.engine().tokenizer();
        let tools = ToolSet::default();
        let (mut choices, mut completion, mut cached) = (Vec::new(), 0, 0);
        for (i, h) in handles.into_iter().enumerate() {
            let (c, outcome) = crate::collect(h, Choice::new(i as u32, String::new()), &tools, tokenizer).await?;
            completion += outcome.stats.generated_tokens;
            // The n choices of one prompt share it: count its cached part once.
            if i % self.n.max(1) == 0 {
                cached += outcome.stats.cached_prompt_tokens;
            }
            let mut choice = serde_json::json!({
                "text": c.content,
                "index": i,
                "logprobs": if self.logprobs { legacy_logprobs(&c) } else { Value::Null },
                "finish_reason": finish_reason(outcome.finish),
            });
            if token_ids {
                choice["token_ids"] = serde_json::json!(c.tokens);
                choice["prompt_token_ids"] = serde_json::json!(self.prompt_ids[self.prompt_of(i)]);
            }
            choices.push(choice);
        }
        Ok(Json(serde_json::json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model(),
            "choices": choices,
            "usage": self.usage(completion, cached),
        }))
        .into_response())
    }

    fn chunk(&self, index: u32, text: &str, finish: Option<FinishReason>, logprobs: Value) -> Value {
        serde_json::json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model(),
            "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish.and_then(finish_reason)}],
        })
    }

    /// The chunks of a streamed completion; with `token_ids` (`return_token_ids`), each choice's
    /// first chunk carries `prompt_token_ids` and every chunk the `token_ids` generated since the
    /// one before.
    fn stream(self, handles: Vec<RequestHandle>, include_usage: bool, token_ids: bool) -> Response {
        let keep_alive = self.state.config.keep_alive;
        let (tx, rx) = tokio::sync::mpsc::channel::<Value>(64);
        let this = Arc::new(self);
        tokio::spawn(async move {
            let tokenizer = this.state.step3.engine().tokenizer();
            let tools = ToolSet::default();
            let mut choices: Vec<Choice> = (0..handles.len()).map(|i| Choice::new(i as u32, String::new())).collect();
            let mut started = vec![false; choices.len()];
            let streams = handles.into_iter().enumerate().map(|(i, h)| StreamExt::map(h, move |e| (i, e)));
            let mut events = futures_util::stream::select_all(streams);
            let (mut completion, mut cached) = (0, 0);
            while let Some((i, event)) = events.next().await {
                let c = &mut choices[i];
                let mut out = Vec::new();
                for piece in c.push(event, &tools, tokenizer) {
                    match piece {
                        Piece::Content(s) => out.push(this.chunk(c.index, &s, None, Value::Null)),
                        Piece::Logprob(lp) => {
                            let legacy = serde_json::json!({
                                "tokens": [lp.token], "token_logprobs": [lp.logprob],
                                "top_logprobs": [lp.top_logprobs.iter().map(|t| (t.token.clone(), Value::from(t.logprob))).collect::<serde_json::Map<_, _>>()],
                                "text_offset": [0],
                            });
                            out.push(this.chunk(c.index, "", None, legacy));
                        }
                        _ => {}
                    }
                }
                if let Some(o) = &c.outcome {
                    if o.finish == FinishReason::Error {
                        out.push(ApiError::internal(o.error.clone().unwrap_or_default()).body());
                    } else {
                        out.push(this.chunk(c.index, "", Some(o.finish), Value::Null));
                    }
                    completion += o.stats.generated_tokens;
                    if i % this.n.max(1) == 0 {
                        cached += o.stats.cached_prompt_tokens;
                    }
                }
                if token_ids {
                    if let Some(first) = out.first_mut().filter(|v| v["choices"][0].is_object()) {
                        first["choices"][0]["token_ids"] = serde_json::json!(c.unsent_tokens());
                        if !std::mem::replace(&mut started[i], true) {
                            first["choices"][0]["prompt_token_ids"] =
                                serde_json::json!(this.prompt_ids[this.prompt_of(i)]);
                        }
                    }
                }
                for v in out {
                    if tx.send(v).await.is_err() {
                        return;
                    }
                }
            }
            if include_usage {
                let u = serde_json::json!({
                    "id": this.id, "object": "text_completion", "created": this.created, "model": this.model(),
                    "choices": [], "usage": this.usage(completion, cached),
                });
                let _ = tx.send(u).await;
            }
        });
        crate::sse(rx, keep_alive)
    }
}
