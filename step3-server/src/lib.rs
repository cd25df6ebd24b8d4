//! An OpenAI-compatible HTTP server for Step3, on the step3 engine.
//!
//! This crate owns the HTTP face of the engine: the axum routes (`POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`), mapping OpenAI
//! requests (parsed with the maintained `async-openai` types, extended where Step3 needs it) to
//! engine requests and engine events back to OpenAI responses, server-sent events for streaming,
//! the API key check, body and queue limits, local-media rules, CORS, and the Prometheus export.
//! It owns no model math and no scheduling: every request is a [`step3::Step3`]'s engine request,
//! batched with all the others.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let step3 = std::sync::Arc::new(step3::Step3::from_dir(step3::demo::demo_dir()).build().expect("load"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! step3_server::serve(listener, step3, step3_server::ServerConfig::default(), std::future::pending()).await
//! # }
//! ```

mod chat;
mod choice;
mod completions;
mod error;
mod media;
mod metrics;
mod request;
mod tools;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::Value;
use step3::engine::{Prepared, Prompt, Request, RequestHandle, SubmitError};
use step3::{FinishReason, Step3};

pub use choice::{delta, finish_reason, Choice, Piece, ToolSet};
pub use error::ApiError;
pub use tools::cast_arguments;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model name clients must use (and `/v1/models` lists).
    pub served_model_name: String,
    /// Requests to `/v1/*` need `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// `file://` image URLs are read only below this directory (none when unset).
    pub allowed_local_media_path: Option<PathBuf>,
    /// Allow browsers from this origin (CORS is off when unset).
    pub cors_origin: Option<String>,
    /// Largest request body, bytes (default 32 MiB).
    pub body_limit: usize,
    /// Interval of SSE keep-alive comments.
    pub keep_alive: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            served_model_name: "step3".into(),
            api_key: None,
            allowed_local_media_path: None,
            cors_origin: None,
            body_limit: 32 << 20,
            keep_alive: Duration::from_secs(15),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    step3: Arc<Step3>,
    config: Arc<ServerConfig>,
    registry: Arc<prometheus_client::registry::Registry>,
    http: Arc<metrics::HttpCounts>,
    created: u32,
}

impl AppState {
    /// The state of a server over `step3`; the allowed media directory is resolved here.
    pub fn new(step3: Arc<Step3>, mut config: ServerConfig) -> std::io::Result<Self> {
        if let Some(dir) = &config.allowed_local_media_path {
            let real = dir.canonicalize().map_err(|e| {
                std::io::Error::new(e.kind(), format!("--allowed-local-media-path {}: {e}", dir.display()))
            })?;
            if !real.is_dir() {
                return Err(std::io::Error::other(format!(
                    "--allowed-local-media-path {}: not a directory",
                    dir.display()
                )));
            }
            config.allowed_local_media_path = Some(real);
        }
        let http = Arc::new(metrics::HttpCounts::default());
        let registry = Arc::new(metrics::registry(step3.clone(), http.clone(), config.served_model_name.clone()));
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32);
        Ok(Self { step3, config: Arc::new(config), registry, http, created })
    }

    fn context(&self) -> usize {
        self.step3.model().text.config().max_position_embedding()
    }

    /// Token slots in the whole KV cache.
    fn kv_tokens(&self) -> usize {
        let engine = self.step3.engine();
        engine.kv_blocks() * engine.config().block_size
    }
}

/// The routes, with auth on `/v1/*`, the body limit, CORS when configured, and one log line per
/// request.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(text_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    let mut app = Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .fallback(|| async { ApiError { status: StatusCode::NOT_FOUND, ..ApiError::invalid("", "no such route") } })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            let msg = format!("{} does not take {method} requests", uri.path());
            ApiError { status: StatusCode::METHOD_NOT_ALLOWED, ..ApiError::invalid("", msg) }
        })
        .layer(DefaultBodyLimit::max(state.config.body_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), log));
    if let Some(origin) = &state.config.cors_origin {
        if let Ok(origin) = origin.parse::<HeaderValue>() {
            app = app.layer(
                tower_http::cors::CorsLayer::new()
                    .allow_origin(origin)
                    .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                    .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
            );
        }
    }
    app.with_state(state)
}

/// Serves `step3` on `listener` until `shutdown` resolves; then stops accepting, lets running
/// requests finish for up to 30 s, and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    step3: Arc<Step3>,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AppState::new(step3, config)?;
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopped_tx.send(());
    });
    let grace = async move {
        let _ = stopped_rx.await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    };
    tokio::select! {
        r = server => r,
        () = grace => {
            tracing::warn!("requests still running 30 s after shutdown began: cancelling them");
            Ok(())
        }
    }
}

/// One line per request: method, path, status, time.
async fn log(State(state): State<AppState>, req: HttpRequest, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let start = Instant::now();
    let resp = next.run(req).await;
    state.http.record(resp.status().as_u16());
    tracing::info!("{method} {path} {} {:.1} ms", resp.status().as_u16(), start.elapsed().as_secs_f64() * 1e3);
    resp
}

/// `Authorization: Bearer <key>`, compared in constant time.
async fn auth(State(state): State<AppState>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        use subtle::ConstantTimeEq;
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            // The scheme is case-insensitive (RFC 9110).
            .and_then(|(scheme, key)| scheme.eq_ignore_ascii_case("bearer").then(|| key.trim()))
            .unwrap_or("");
        let ok: bool = given.len() == key.len() && bool::from(given.as_bytes().ct_eq(key.as_bytes()));
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn health(State(state): State<AppState>) -> Response {
    let m = state.step3.engine().metrics();
    Json(serde_json::json!({"status": "ok", "running": m.running, "waiting": m.waiting})).into_response()
}

async fn prometheus(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        metrics::render(&state.registry),
    )
        .into_response()
}

/// The served model as `/v1/models` lists it; `max_model_len` is the longest prompt + answer a
/// request can have (the context, or less when the KV cache holds fewer tokens).
fn model_card(state: &AppState) -> Value {
    let pool = state.kv_tokens();
    serde_json::json!({
        "id": state.config.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "step3-rs",
        "max_model_len": state.context().min(pool + 1),
    })
}

async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(serde_json::json!({"object": "list", "data": [model_card(&state)]}))
}

async fn model(State(state): State<AppState>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    match check_model(&state, &id) {
        Ok(()) => Json(model_card(&state)).into_response(),
        Err(e) => ApiError { status: StatusCode::NOT_FOUND, ..e }.into_response(),
    }
}

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model != state.config.served_model_name {
        return Err(ApiError::invalid(
            "model",
            format!("the model `{model}` does not exist: this server serves `{}`", state.config.served_model_name),
        )
        .with_code("model_not_found"));
    }
    Ok(())
}

/// Turns a prompt into ids and images on a blocking thread; errors name the field at fault.
async fn prepare(
    state: &AppState,
    prompt: Prompt,
    image_params: Vec<String>,
    param: &str,
) -> Result<Prepared, ApiError> {
    let step3 = state.step3.clone();
    let result = tokio::task::spawn_blocking(move || step3.engine().prepare(&prompt))
        .await
        .map_err(|e| ApiError::internal(format!("preparing the prompt failed: {e}")))?;
    result.map_err(|e| match e {
        step3::Error::Image { index, error } => {
            ApiError::invalid(image_params.get(index).cloned().unwrap_or_else(|| param.to_string()), error.to_string())
        }
        other => ApiError::invalid(param, other.to_string()),
    })
}

/// The token budget of a request: what it asked for (refused beyond the context), else what the
/// context and the KV cache leave.
fn budget(state: &AppState, prompt_len: usize, common: &request::Common, param: &str) -> Result<usize, ApiError> {
    let context = state.context();
    if prompt_len >= context {
        return Err(ApiError::invalid(
            param,
            format!("the prompt has {prompt_len} tokens, which leaves no room in the model's context of {context}"),
        ));
    }
    let room = context - prompt_len;
    let pool = state.kv_tokens();
    if prompt_len > pool {
        return Err(ApiError::invalid(
            param,
            format!("the prompt has {prompt_len} tokens, more than this server's whole KV cache holds ({pool})"),
        ));
    }
    match common.max_tokens {
        Some((m, key)) if m > room => Err(ApiError::invalid(
            key,
            format!("`{key}` is {m}, but the prompt ({prompt_len} tokens) leaves room for {room} in the model's context of {context}"),
        )),
        // The last token is never fed back, so it needs no KV slot.
        Some((m, key)) if prompt_len + m - 1 > pool => Err(ApiError::invalid(
            key,
            format!(
                "`{key}` is {m}, but the prompt ({prompt_len} tokens) leaves room for {} in this server's KV cache of {pool} tokens",
                pool + 1 - prompt_len
            ),
        )),
        Some((m, _)) => Ok(m),
        None => Ok(room.min(pool + 1 - prompt_len)),
    }
}

/// What to run for one prompt: its choices share the prepared prompt.
struct Job {
    prepared: Prepared,
    common: request::Common,
    forced: Vec<u32>,
    after_reasoning: Vec<u32>,
    plain: bool,
    /// The request offered no tools: tool-call markup stays answer text.
    ignore_tool_calls: bool,
}

/// Submits `n` choices of every job (choice `i` of job `j` is index `j·n + i`, seeded `seed + i`).
fn submit(state: &AppState, jobs: &[Job], param: &str) -> Result<Vec<RequestHandle>, ApiError> {
    // More sequences than the waiting queue holds could never be admitted at once: a 503 would
    // send the client into retrying for ever.
    let total: usize = jobs.iter().map(|j| j.common.n).sum();
    let queue = state.step3.engine().config().max_waiting;
    if total > queue {
        let (field, what) = match jobs.first().map_or(1, |j| j.common.n) {
            n if n > 1 => ("n", format!("{} prompt(s) × `n` = {n}", jobs.len())),
            _ => (param, format!("{} prompts", jobs.len())),
        };
        return Err(ApiError::invalid(
            field,
            format!("{what} make {total} sequences, more than the {queue} this server queues at once (--max-waiting)"),
        ));
    }
    let mut handles = Vec::new();
    for job in jobs {
        for i in 0..job.common.n {
            let mut options = job.common.options.clone();
            options.seed = options.seed.wrapping_add(i as u64);
            let req = Request {
                prompt: Prompt::Prepared(job.prepared.clone()),
                options,
                forced: job.forced.clone(),
                after_reasoning: job.after_reasoning.clone(),
                plain: job.plain,
                ignore_tool_calls: job.ignore_tool_calls,
            };
            match state.step3.engine().submit(req) {
                Ok(h) => handles.push(h),
                Err(SubmitError::Overloaded { waiting }) => {
                    return Err(ApiError::overloaded(format!(
                        "the server is busy ({waiting} requests waiting): retry shortly"
                    )))
                }
                Err(SubmitError::Invalid(msg)) => return Err(ApiError::invalid(param, msg)),
                Err(other) => return Err(ApiError::overloaded(other.to_string())),
            }
        }
    }
    Ok(handles)
}

/// Token ids of `text`, for forced continuations.
fn encode(state: &AppState, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
    let tok = state.step3.tokenizer().map_err(|e| ApiError::invalid(param, e.to_string()))?;
    tok.encode(text).map_err(|e| ApiError::invalid(param, e.to_string()))
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    serde_json::json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn new_id(prefix: &str, first: Option<&RequestHandle>) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{:x}{nanos:08x}", first.map_or(0, RequestHandle::id))
}

fn now() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32)
}

async fn chat_completions(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    match chat_inner(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(state: AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let obj = request::json_object(&body?)?;
    // On a blocking thread: `file://` images are read while parsing.
    let config = state.config.clone();
    let req = tokio::task::spawn_blocking(move || {
        chat::parse(&obj, config.allowed_local_media_path.as_deref(), config.body_limit)
    })
    .await
    .map_err(|e| ApiError::internal(format!("reading the request failed: {e}")))??;
    check_model(&state, &req.model)?;
    // No tools offered (none given, or `tool_choice` "none"): tool-call markup is answer text.
    let ignore_tool_calls = req.conversation.tools.is_empty();
    let prepared = prepare(&state, Prompt::Chat(req.conversation), req.image_params, "messages").await?;
    let prompt_len = prepared.ids.len();
    let mut common = req.common;
    common.options.max_new_tokens = budget(&state, prompt_len, &common, "messages")?;
    let forced = match &common.response_prefix {
        Some(p) => encode(&state, p, "response_prefix")?,
        None => Vec::new(),
    };
    let after_reasoning = match &req.after_reasoning {
        Some(t) => encode(&state, t, "tool_choice")?,
        None => Vec::new(),
    };
    let prompt_ids = common.return_token_ids.then(|| prepared.ids.clone());
    let job = Job { prepared, common: common.clone(), forced, after_reasoning, plain: false, ignore_tool_calls };
    let handles = submit(&state, std::slice::from_ref(&job), "messages")?;
    let id = new_id("chatcmpl", handles.first());
    let ctx = Ctx { state, id, created: now(), tools: Arc::new(req.tools), logprobs: req.logprobs.is_some() };
    if common.stream {
        Ok(ctx.stream_chat(handles, prompt_len, common.include_usage, prompt_ids).into_response())
    } else {
        ctx.whole_chat(handles, prompt_len, prompt_ids).await
    }
}

/// A response being built.
struct Ctx {
    state: AppState,
    id: String,
    created: u32,
    tools: Arc<ToolSet>,
    logprobs: bool,
}

impl Ctx {
    fn model(&self) -> &str {
        &self.state.config.served_model_name
    }

    async fn whole_chat(
        &self,
        handles: Vec<RequestHandle>,
        prompt_len: usize,
        prompt_ids: Option<Vec<u32>>,
    ) -> Result<Response, ApiError> {
        let tokenizer = self.state.step3.engine().tokenizer();
        let mut choices = Vec::new();
        let (mut completion, mut cached) = (0, 0);
        for (i, h) in handles.into_iter().enumerate() {
            let c = Choice::new(i as u32, format!("{}_{i}", self.id.trim_start_matches("chatcmpl-")));
            let (c, outcome) = collect(h, c, &self.tools, tokenizer).await?;
            completion += outcome.stats.generated_tokens;
            // The choices share one prompt: its cached part counts once.
            cached = cached.max(outcome.stats.cached_prompt_tokens);
            let mut choice = serde_json::json!({
                "index": i,
                "message": c.message(),
                "finish_reason": finish_reason(outcome.finish),
                "logprobs": c.logprobs_value(self.logprobs),
            });
            if prompt_ids.is_some() {
                choice["token_ids"] = serde_json::json!(c.tokens);
            }
            choices.push(choice);
        }
        let mut resp = serde_json::json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model(),
            "choices": choices,
            "usage": usage(prompt_len, completion, cached),
        });
        if let Some(ids) = prompt_ids {
            resp["prompt_token_ids"] = serde_json::json!(ids);
        }
        Ok(Json(resp).into_response())
    }

    fn chunk(&self, index: u32, delta: Value, finish: Option<FinishReason>, logprobs: Option<Value>) -> Value {
        serde_json::json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model(),
            "choices": [{
                "index": index,
                "delta": delta,
                "finish_reason": finish.and_then(finish_reason),
                "logprobs": logprobs,
            }],
        })
    }

    /// The chunks of a streamed chat answer. With `prompt_ids` (`return_token_ids`), each
    /// choice's first chunk carries `prompt_token_ids` (beside `choices`, as vLLM has it) and every
    /// later chunk the `token_ids` generated since the one before.
    fn stream_chat(
        self,
        handles: Vec<RequestHandle>,
        prompt_len: usize,
        include_usage: bool,
        prompt_ids: Option<Vec<u32>>,
    ) -> Response {
        let keep_alive = self.state.config.keep_alive;
        let (tx, rx) = tokio::sync::mpsc::channel::<Value>(64);
        tokio::spawn(async move {
            let tokenizer = self.state.step3.engine().tokenizer();
            let mut choices: Vec<Choice> = (0..handles.len())
                .map(|i| Choice::new(i as u32, format!("{}_{i}", self.id.trim_start_matches("chatcmpl-"))))
                .collect();
            for c in &choices {
                let mut role = self.chunk(c.index, serde_json::json!({"role": "assistant", "content": ""}), None, None);
                if let Some(ids) = &prompt_ids {
                    role["prompt_token_ids"] = serde_json::json!(ids);
                }
                if tx.send(role).await.is_err() {
                    return;
                }
            }
            let streams = handles.into_iter().enumerate().map(|(i, h)| StreamExt::map(h, move |e| (i, e)));
            let mut events = futures_util::stream::select_all(streams);
            let (mut completion, mut cached) = (0, 0);
            while let Some((i, event)) = events.next().await {
                let c = &mut choices[i];
                let mut out = Vec::new();
                for piece in c.push(event, &self.tools, tokenizer) {
                    match &piece {
                        Piece::Logprob(lp) => {
                            let lp = serde_json::json!({"content": [lp]});
                            out.push(self.chunk(c.index, serde_json::json!({}), None, Some(lp)));
                        }
                        other => out.extend(delta(other).into_iter().map(|d| self.chunk(c.index, d, None, None))),
                    }
                }
                if let Some(o) = &c.outcome {
                    if o.finish == FinishReason::Error {
                        let msg = o.error.clone().unwrap_or_else(|| "generation failed".into());
                        out.push(ApiError::internal(msg).body());
                    } else {
                        out.push(self.chunk(c.index, serde_json::json!({}), Some(o.finish), None));
                    }
                    completion += o.stats.generated_tokens;
                    cached = cached.max(o.stats.cached_prompt_tokens);
                }
                if prompt_ids.is_some() {
                    if let Some(first) = out.first_mut().filter(|v| v["choices"][0].is_object()) {
                        first["choices"][0]["token_ids"] = serde_json::json!(c.unsent_tokens());
                    }
                }
                for v in out {
                    if tx.send(v).await.is_err() {
                        return; // the client went away: dropping the handles cancels the requests
                    }
                }
            }
            if include_usage {
                let u = serde_json::json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model(), "choices": [], "usage": usage(prompt_len, completion, cached),
                });
                let _ = tx.send(u).await;
            }
        });
        sse(rx, keep_alive)
    }
}

/// Runs one choice to its end (a failed generation is a 500: the input was accepted).
async fn collect(
    mut h: RequestHandle,
    mut c: Choice,
    tools: &ToolSet,
    tokenizer: Option<&step3::Step3Tokenizer>,
) -> Result<(Choice, step3::engine::Outcome), ApiError> {
    while let Some(e) = h.next_event().await {
        c.push(e, tools, tokenizer);
        if c.outcome.is_some() {
            break;
        }
    }
    let outcome = c.outcome.clone().ok_or_else(|| ApiError::internal("the engine stopped"))?;
    if outcome.finish == FinishReason::Error {
        return Err(ApiError::internal(outcome.error.unwrap_or_else(|| "generation failed".into())));
    }
    Ok((c, outcome))
}

/// Server-sent events: every value as `data: <json>`, then `data: [DONE]`, with keep-alive
/// comments.
fn sse(mut rx: tokio::sync::mpsc::Receiver<Value>, keep_alive: Duration) -> Response {
    let mut done = false;
    let stream = futures_util::stream::poll_fn(move |cx| {
        if done {
            return std::task::Poll::Ready(None);
        }
        match rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(v)) => {
                std::task::Poll::Ready(Some(Ok::<_, Infallible>(SseEvent::default().data(v.to_string()))))
            }
            std::task::Poll::Ready(None) => {
                done = true;
                std::task::Poll::Ready(Some(Ok(SseEvent::default().data("[DONE]"))))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive")).into_response()
}

async fn text_completions(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    match completions::handle(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}
