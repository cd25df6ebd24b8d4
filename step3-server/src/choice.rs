//! One choice of an answer, assembled from the engine's events: the pieces a stream sends
//! (reasoning, content, whole tool calls, log-probabilities), and the same pieces folded into the
//! non-streamed message, so the two always agree however the text arrived.

use std::collections::HashMap;

use async_openai::types::chat::{
    ChatChoiceLogprobs, ChatCompletionMessageToolCall, ChatCompletionMessageToolCallChunk,
    ChatCompletionMessageToolCalls, ChatCompletionTokenLogprob, FinishReason as OaiFinish, FunctionCall,
    FunctionCallStream, FunctionType, TopLogprobs,
};
use serde_json::Value;
use step3::engine::{Event, Outcome};
use step3::{FinishReason, Sampled, Step3Tokenizer};

use crate::tools::cast_arguments;

/// The tools a request offers: name → parameter schema.
#[derive(Debug, Clone, Default)]
pub struct ToolSet(pub HashMap<String, Value>);

/// A piece of one choice, in the order it was produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Reasoning(String),
    Content(String),
    /// A whole tool call (streamed as its index, id and name, then its arguments).
    ToolCall {
        index: u32,
        id: String,
        name: String,
        arguments: String,
    },
    /// The log-probabilities of a generated token.
    Logprob(ChatCompletionTokenLogprob),
}

/// One choice in progress.
#[derive(Debug)]
pub struct Choice {
    pub index: u32,
    id_prefix: String,
    calls: u32,
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ChatCompletionMessageToolCall>,
    pub logprobs: Vec<ChatCompletionTokenLogprob>,
    pub tokens: Vec<u32>,
    /// How many of `tokens` a stream has sent (`return_token_ids`).
    tokens_sent: usize,
    pub outcome: Option<Outcome>,
}

impl Choice {
    /// `id_prefix` makes the tool-call ids of this choice unique (`call_<prefix>_<k>`).
    pub fn new(index: u32, id_prefix: String) -> Self {
        Self {
            index,
            id_prefix,
            calls: 0,
            reasoning: String::new(),
            content: String::new(),
            tool_calls: Vec::new(),
            logprobs: Vec::new(),
            tokens: Vec::new(),
            tokens_sent: 0,
            outcome: None,
        }
    }

    /// For a stream with `return_token_ids`: the generated token ids not yet sent, to go with the
    /// next chunk of this choice (concatenated over the chunks, they are all the ids).
    pub fn unsent_tokens(&mut self) -> Vec<u32> {
        let new = self.tokens[self.tokens_sent..].to_vec();
        self.tokens_sent = self.tokens.len();
        new
    }

    /// Takes an engine event; returns the pieces to stream (already folded into this choice).
    pub fn push(&mut self, event: Event, tools: &ToolSet, tokenizer: Option<&Step3Tokenizer>) -> Vec<Piece> {
        let piece = match event {
            Event::Token(s) => {
                self.tokens.push(s.token);
                match token_logprob(&s, tokenizer) {
                    Some(lp) => Piece::Logprob(lp),
                    None => return Vec::new(),
                }
            }
            Event::Reasoning(s) => Piece::Reasoning(s),
            Event::Content(s) => Piece::Content(s),
            Event::ToolCall(call) => {
                let arguments = cast_arguments(&call, tools.0.get(&call.name)).to_string();
                let piece = Piece::ToolCall {
                    index: self.calls,
                    id: format!("call_{}_{}", self.id_prefix, self.calls),
                    name: call.name,
                    arguments,
                };
                self.calls += 1;
                piece
            }
            Event::Finished(o) => {
                self.outcome = Some(o);
                return Vec::new();
            }
        };
        self.fold(&piece);
        vec![piece]
    }

    /// Adds a piece to the non-streamed answer.
    pub fn fold(&mut self, piece: &Piece) {
        match piece {
            Piece::Reasoning(s) => self.reasoning.push_str(s),
            Piece::Content(s) => self.content.push_str(s),
            Piece::ToolCall { id, name, arguments, .. } => self.tool_calls.push(ChatCompletionMessageToolCall {
                id: id.clone(),
                function: FunctionCall { name: name.clone(), arguments: arguments.clone() },
            }),
            Piece::Logprob(lp) => self.logprobs.push(lp.clone()),
        }
    }

    pub fn finish(&self) -> Option<FinishReason> {
        self.outcome.as_ref().map(|o| o.finish)
    }

    /// The message of the non-streamed answer (`reasoning_content` added, as vLLM does for Step3).
    pub fn message(&self) -> Value {
        let tool_calls: Vec<ChatCompletionMessageToolCalls> =
            self.tool_calls.iter().cloned().map(ChatCompletionMessageToolCalls::Function).collect();
        let content = (!self.content.is_empty() || tool_calls.is_empty()).then(|| self.content.clone());
        let mut m = serde_json::json!({"role": "assistant", "content": content});
        if !self.reasoning.is_empty() {
            m["reasoning_content"] = Value::String(self.reasoning.clone());
        }
        if !tool_calls.is_empty() {
            m["tool_calls"] = serde_json::to_value(tool_calls).unwrap_or_default();
        }
        m
    }

    /// `logprobs` of the non-streamed choice, when they were asked for.
    pub fn logprobs_value(&self, asked: bool) -> Value {
        if !asked {
            return Value::Null;
        }
        serde_json::to_value(ChatChoiceLogprobs { content: Some(self.logprobs.clone()), refusal: None })
            .unwrap_or_default()
    }
}

/// The OpenAI finish reason of an engine finish reason.
pub fn finish_reason(f: FinishReason) -> Option<OaiFinish> {
    match f {
        FinishReason::Stop(_) | FinishReason::StopString => Some(OaiFinish::Stop),
        FinishReason::Length | FinishReason::Context => Some(OaiFinish::Length),
        FinishReason::ToolCalls => Some(OaiFinish::ToolCalls),
        FinishReason::Cancelled | FinishReason::Error => None,
    }
}

/// The streamed `delta` of a piece (`None` for a log-probability, which goes beside the delta).
pub fn delta(piece: &Piece) -> Vec<Value> {
    match piece {
        Piece::Reasoning(s) => vec![serde_json::json!({"reasoning_content": s})],
        Piece::Content(s) => vec![serde_json::json!({"content": s})],
        Piece::ToolCall { index, id, name, arguments } => {
            let head = ChatCompletionMessageToolCallChunk {
                index: *index,
                id: Some(id.clone()),
                r#type: Some(FunctionType::Function),
                function: Some(FunctionCallStream { name: Some(name.clone()), arguments: Some(String::new()) }),
            };
            let args = ChatCompletionMessageToolCallChunk {
                index: *index,
                id: None,
                r#type: None,
                function: Some(FunctionCallStream { name: None, arguments: Some(arguments.clone()) }),
            };
            [head, args]
                .into_iter()
                .map(|c| serde_json::json!({"tool_calls": [serde_json::to_value(c).unwrap_or_default()]}))
                .collect()
        }
        Piece::Logprob(_) => Vec::new(),
    }
}

/// The text of one token (`U+FFFD` where it holds part of a character) and its bytes.
fn token_text(id: u32, tokenizer: Option<&Step3Tokenizer>) -> String {
    tokenizer.and_then(|t| t.decode(&[id]).ok()).unwrap_or_else(|| format!("<{id}>"))
}

fn token_logprob(s: &Sampled, tokenizer: Option<&Step3Tokenizer>) -> Option<ChatCompletionTokenLogprob> {
    let logprob = s.logprob?;
    let token = token_text(s.token, tokenizer);
    Some(ChatCompletionTokenLogprob {
        bytes: Some(token.as_bytes().to_vec()),
        token,
        logprob,
        top_logprobs: s
            .top
            .iter()
            .map(|t| {
                let token = token_text(t.token, tokenizer);
                TopLogprobs { bytes: Some(token.as_bytes().to_vec()), token, logprob: t.logprob }
            })
            .collect(),
    })
}
