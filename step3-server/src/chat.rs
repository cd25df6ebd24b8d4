//! `POST /v1/chat/completions`: messages with text, images and earlier tool calls; tools and
//! tool_choice; the answer split into `reasoning_content`, `content` and `tool_calls`; streamed as
//! server-sent events or whole.

use std::path::Path;

use async_openai::types::chat::{
    ChatCompletionMessageToolCalls, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestAssistantMessageContentPart, ChatCompletionRequestDeveloperMessageContent,
    ChatCompletionRequestDeveloperMessageContentPart, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessageContent, ChatCompletionRequestSystemMessageContentPart,
    ChatCompletionRequestToolMessageContent, ChatCompletionRequestToolMessageContentPart,
    ChatCompletionRequestUserMessageContent, ChatCompletionRequestUserMessageContentPart,
    ChatCompletionToolChoiceOption, ChatCompletionTools, CreateChatCompletionRequest, ToolChoiceOptions,
};
use serde_json::{Map, Value};
use step3::tokenizer::{TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, TOOL_SEP};
use step3::{Conversation, Message, Role, ToolCall};

use crate::choice::ToolSet;
use crate::error::ApiError;
use crate::media::image_from_url;
use crate::request::{self, Common};

/// A chat request, read and checked.
#[derive(Debug)]
pub struct ChatRequest {
    pub model: String,
    pub conversation: Conversation,
    pub common: Common,
    /// `logprobs` asked for (with this many alternatives).
    pub logprobs: Option<usize>,
    pub tools: ToolSet,
    /// Text forced right after the reasoning closes (a required or named tool call).
    pub after_reasoning: Option<String>,
    /// Where each image came from (for errors naming the field), in prompt order.
    pub image_params: Vec<String>,
}

/// Reads a chat request body (`file://` images are read here, at most `max_image_bytes` each).
pub fn parse(
    obj: &Map<String, Value>,
    allowed_media: Option<&Path>,
    max_image_bytes: usize,
) -> Result<ChatRequest, ApiError> {
    let req: CreateChatCompletionRequest = request::typed(obj)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must hold at least one message"));
    }
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(k)) if k > 20 => {
            return Err(ApiError::invalid("top_logprobs", format!("`top_logprobs` must be at most 20, got {k}")))
        }
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs` set to true"))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, _) => None,
    };
    if let Some(rf) = obj.get("response_format") {
        if rf.get("type").and_then(Value::as_str).is_some_and(|t| t != "text") {
            return Err(ApiError::invalid("response_format", "only `{\"type\": \"text\"}` is supported"));
        }
    }
    let common = request::common(obj, logprobs)?;
    let mut image_params = Vec::new();
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        messages.push(message(i, m, allowed_media, max_image_bytes, &mut image_params)?);
    }
    // Tools.
    let mut tools = ToolSet::default();
    let mut specs = Vec::new();
    for (i, t) in req.tools.iter().flatten().enumerate() {
        match t {
            ChatCompletionTools::Function(f) => {
                let params = f.function.parameters.clone().unwrap_or_else(|| serde_json::json!({}));
                tools.0.insert(f.function.name.clone(), params);
                specs.push(serde_json::json!({"type": "function", "function": f.function}));
            }
            ChatCompletionTools::Custom(_) => {
                return Err(ApiError::invalid(format!("tools[{i}]"), "only function tools are supported"))
            }
        }
    }
    let (offered, after_reasoning) = match &req.tool_choice {
        None if specs.is_empty() => (Vec::new(), None),
        None | Some(ChatCompletionToolChoiceOption::Mode(ToolChoiceOptions::Auto)) => (specs, None),
        Some(ChatCompletionToolChoiceOption::Mode(ToolChoiceOptions::None)) => (Vec::new(), None),
        Some(ChatCompletionToolChoiceOption::Mode(ToolChoiceOptions::Required)) => {
            if specs.is_empty() {
                return Err(ApiError::invalid("tool_choice", "`tool_choice` \"required\" needs `tools`"));
            }
            (specs, Some(format!("{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}<steptml:invoke name=\"")))
        }
        Some(ChatCompletionToolChoiceOption::Function(named)) => {
            let name = &named.function.name;
            if !tools.0.contains_key(name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`tool_choice` names the function `{name}`, which is not in `tools`"),
                ));
            }
            let force =
                format!("{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}<steptml:invoke name=\"{name}\">");
            (specs, Some(force))
        }
        Some(_) => return Err(ApiError::invalid("tool_choice", "this `tool_choice` is not supported")),
    };
    let template_kwargs = match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(ApiError::invalid("chat_template_kwargs", "`chat_template_kwargs` must be an object")),
    };
    Ok(ChatRequest {
        model: req.model,
        conversation: Conversation { messages, tools: offered, template_kwargs },
        common,
        logprobs,
        tools,
        after_reasoning,
        image_params,
    })
}

/// The text of content parts (text parts joined, refusals kept as text).
fn join<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    parts.collect::<Vec<_>>().join("\n")
}

fn message(
    i: usize,
    m: &ChatCompletionRequestMessage,
    allowed_media: Option<&Path>,
    max_image_bytes: usize,
    image_params: &mut Vec<String>,
) -> Result<Message, ApiError> {
    Ok(match m {
        ChatCompletionRequestMessage::System(s) => Message::system(match &s.content {
            ChatCompletionRequestSystemMessageContent::Text(t) => t.clone(),
            ChatCompletionRequestSystemMessageContent::Array(p) => join(p.iter().map(|p| match p {
                ChatCompletionRequestSystemMessageContentPart::Text(t) => t.text.as_str(),
            })),
        }),
        ChatCompletionRequestMessage::Developer(s) => Message::system(match &s.content {
            ChatCompletionRequestDeveloperMessageContent::Text(t) => t.clone(),
            ChatCompletionRequestDeveloperMessageContent::Array(p) => join(p.iter().map(|p| match p {
                ChatCompletionRequestDeveloperMessageContentPart::Text(t) => t.text.as_str(),
            })),
        }),
        ChatCompletionRequestMessage::User(u) => match &u.content {
            ChatCompletionRequestUserMessageContent::Text(t) => Message::user(t.clone()),
            ChatCompletionRequestUserMessageContent::Array(parts) => {
                let mut msg = Message::user(String::new());
                let mut texts = Vec::new();
                for (j, p) in parts.iter().enumerate() {
                    match p {
                        ChatCompletionRequestUserMessageContentPart::Text(t) => texts.push(t.text.as_str()),
                        ChatCompletionRequestUserMessageContentPart::ImageUrl(img) => {
                            let param = format!("messages[{i}].content[{j}].image_url.url");
                            let image = image_from_url(&img.image_url.url, allowed_media, max_image_bytes)
                                .map_err(|e| ApiError::invalid(&param, e))?;
                            image_params.push(param);
                            msg.images.push(image);
                        }
                        _ => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}]"),
                                "only text and image_url parts are supported",
                            ))
                        }
                    }
                }
                msg.text = join(texts.into_iter());
                msg
            }
        },
        ChatCompletionRequestMessage::Assistant(a) => {
            let text = match &a.content {
                None => String::new(),
                Some(ChatCompletionRequestAssistantMessageContent::Text(t)) => t.clone(),
                Some(ChatCompletionRequestAssistantMessageContent::Array(p)) => join(p.iter().map(|p| match p {
                    ChatCompletionRequestAssistantMessageContentPart::Text(t) => t.text.as_str(),
                    ChatCompletionRequestAssistantMessageContentPart::Refusal(r) => r.refusal.as_str(),
                })),
            };
            let mut msg = Message::assistant(text);
            for (j, call) in a.tool_calls.iter().flatten().enumerate() {
                let ChatCompletionMessageToolCalls::Function(f) = call else {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].tool_calls[{j}]"),
                        "only function tool calls are supported",
                    ));
                };
                let args: Value = if f.function.arguments.trim().is_empty() {
                    Value::Object(Map::new())
                } else {
                    serde_json::from_str(&f.function.arguments).map_err(|e| {
                        ApiError::invalid(
                            format!("messages[{i}].tool_calls[{j}].function.arguments"),
                            format!("the arguments are not valid JSON: {e}"),
                        )
                    })?
                };
                msg.tool_calls.push(ToolCall::from_json(&f.function.name, &args));
            }
            msg
        }
        ChatCompletionRequestMessage::Tool(t) => {
            let mut msg = Message::new(
                Role::Tool,
                match &t.content {
                    ChatCompletionRequestToolMessageContent::Text(s) => s.clone(),
                    ChatCompletionRequestToolMessageContent::Array(p) => join(p.iter().map(|p| match p {
                        ChatCompletionRequestToolMessageContentPart::Text(t) => t.text.as_str(),
                    })),
                },
            );
            msg.tool_call_id = Some(t.tool_call_id.clone());
            msg
        }
        ChatCompletionRequestMessage::Function(_) => {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                "`function` messages are not supported: use tools",
            ))
        }
    })
}
