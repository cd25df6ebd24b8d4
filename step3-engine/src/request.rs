//! What goes into the engine (a [`Request`]) and what comes out (a [`RequestHandle`] yielding
//! [`Event`]s, as a blocking iterator or an async stream).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Serialize;
use step3_model::{Conversation, FinishReason, GenerateOptions, ImageSource, Message, Sampled, Stats, ToolCall};
use tokio::sync::mpsc::UnboundedReceiver;

/// What to continue.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A conversation (with the tools the model may call and template variables), put through
    /// the model's chat template; images as the messages carry them.
    Chat(Conversation),
    /// Raw text (no template); `<im_patch>` placeholders for `images` are added in front when
    /// the text has none, and expanded to each image's layout.
    Text { text: String, images: Vec<ImageSource> },
    /// Token ids taken exactly; with images, one `<im_patch>` per image or their full layouts.
    Tokens { ids: Vec<u32>, images: Vec<ImageSource> },
    /// A prompt already turned into ids and images ([`crate::Engine::prepare`]).
    Prepared(crate::Prepared),
}

/// One generation request.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub prompt: Prompt,
    /// Sampling and stopping; unset sampling settings come from the checkpoint's
    /// `generation_config.json`.
    pub options: GenerateOptions,
    /// Tokens the answer starts with, produced (and streamed) as if sampled: a response prefix.
    pub forced: Vec<u32>,
    /// Tokens produced right after the model closes its reasoning (`</think>`), or at the start
    /// when the prompt does not open reasoning: e.g. the opening of a tool call the caller requires.
    pub after_reasoning: Vec<u32>,
    /// Plain text out: no reasoning / answer / tool-call split (plain completions).
    pub plain: bool,
    /// Tool-call markup stays answer text, never parsed into [`Event::ToolCall`]: for a request
    /// that offered the model no tools.
    pub ignore_tool_calls: bool,
}

impl Default for Prompt {
    fn default() -> Self {
        Self::Tokens { ids: Vec::new(), images: Vec::new() }
    }
}

impl Request {
    pub fn chat(messages: Vec<Message>, options: GenerateOptions) -> Self {
        Self { prompt: Prompt::Chat(messages.into()), options, ..Default::default() }
    }

    pub fn tokens(ids: Vec<u32>, options: GenerateOptions) -> Self {
        Self { prompt: Prompt::Tokens { ids, images: Vec::new() }, options, ..Default::default() }
    }

    pub fn text(text: impl Into<String>, options: GenerateOptions) -> Self {
        Self { prompt: Prompt::Text { text: text.into(), images: Vec::new() }, options, ..Default::default() }
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub finish: FinishReason,
    /// Why it failed, for [`FinishReason::Error`].
    pub error: Option<String>,
    pub stats: Stats,
}

/// What a request produces, in order. The last event is always [`Event::Finished`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Event {
    /// Every generated token (the end-of-turn token included), with its log-probabilities when
    /// they were asked for.
    Token(Sampled),
    /// Reasoning text (before `</think>`).
    Reasoning(String),
    /// Answer text.
    Content(String),
    ToolCall(ToolCall),
    Finished(Outcome),
}

/// Everything a request produced, collected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    pub reasoning: String,
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    /// Generated ids (the end-of-turn token included when it stopped generation).
    pub tokens: Vec<u32>,
    /// Per token, when log-probabilities were asked for.
    pub logprobs: Vec<Sampled>,
    pub outcome: Outcome,
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The request itself is invalid (settings, ids, images, a prompt too long); the message
    /// names the problem.
    #[error("{0}")]
    Invalid(String),
    /// The waiting queue is full: try again later.
    #[error("the engine is overloaded: {waiting} requests are already waiting")]
    Overloaded { waiting: usize },
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// A submitted request: its events as they come. Dropping it cancels the request.
#[derive(Debug)]
pub struct RequestHandle {
    pub(crate) id: u64,
    pub(crate) rx: UnboundedReceiver<Event>,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) prompt_tokens: usize,
    pub(crate) wake: std::sync::mpsc::Sender<crate::engine::Command>,
}

impl RequestHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Tokens of the prompt as it was submitted (image layouts expanded).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Cancels the request: it ends with [`FinishReason::Cancelled`] and its KV blocks are freed
    /// at the next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        let _ = self.wake.send(crate::engine::Command::Wake);
    }

    /// The next event, waiting for it (not from inside an async runtime: use the `Stream`).
    pub fn next_blocking(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// The next event, asynchronously.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Waits for the end and collects everything (blocking).
    pub fn wait(mut self) -> Completion {
        let mut c = Completion::default_for(self.prompt_tokens);
        while let Some(e) = self.next_blocking() {
            if c.push(e) {
                break;
            }
        }
        c
    }
}

impl Completion {
    fn default_for(prompt_tokens: usize) -> Self {
        Self {
            reasoning: String::new(),
            text: String::new(),
            tool_calls: Vec::new(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            outcome: Outcome {
                finish: FinishReason::Error,
                error: Some("the engine stopped before the request finished".into()),
                stats: Stats {
                    prompt_tokens,
                    cached_prompt_tokens: 0,
                    generated_tokens: 0,
                    prefill_time: Default::default(),
                    decode_time: Default::default(),
                    time_to_first_token: Default::default(),
                    token_latencies: Vec::new(),
                    finish: FinishReason::Error,
                },
            },
        }
    }

    /// Everything `events` hold (a request's events, in order).
    pub fn from_events(events: impl IntoIterator<Item = Event>) -> Self {
        let mut c = Self::default_for(0);
        for e in events {
            c.push(e);
        }
        c
    }

    /// Adds an event; true at the last one.
    pub fn push(&mut self, e: Event) -> bool {
        match e {
            Event::Token(s) => {
                self.tokens.push(s.token);
                if s.logprob.is_some() {
                    self.logprobs.push(s);
                }
            }
            Event::Reasoning(s) => self.reasoning.push_str(&s),
            Event::Content(s) => self.text.push_str(&s),
            Event::ToolCall(t) => self.tool_calls.push(t),
            Event::Finished(o) => {
                self.outcome = o;
                return true;
            }
        }
        false
    }
}

impl Iterator for RequestHandle {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        self.next_blocking()
    }
}

impl futures_core::Stream for RequestHandle {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        // A finished request ignores it; a running one is cancelled at the next step.
        self.cancel();
    }
}
