//! Step3's chat format: a conversation (system, user, assistant, tool turns, with images) into the
//! prompt text. With the checkpoint's Jinja `chat_template` when it has one (rendered with
//! minijinja and Python-compatible string/dict methods), otherwise natively:
//!
//! ```text
//! BOS + system text + (<|BOT|>{role}\n + one <im_patch> per image + text + <|EOT|>)* + <|BOT|>assistant\n<think>\n
//! ```

use std::path::PathBuf;

use serde::Serialize;

use crate::stream::ToolCall;
use crate::tokenizer::{
    Step3Tokenizer, BOT, EOT, THINK, THINK_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END,
    TOOL_SEP,
};
use crate::{Error, Result};

/// Who speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// An image of a message: a file, or its encoded bytes (PNG, JPEG, WebP, GIF, BMP).
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    File(PathBuf),
    Bytes(std::sync::Arc<[u8]>),
}

impl From<PathBuf> for ImageSource {
    fn from(p: PathBuf) -> Self {
        Self::File(p)
    }
}

impl From<&std::path::Path> for ImageSource {
    fn from(p: &std::path::Path) -> Self {
        Self::File(p.to_path_buf())
    }
}

impl From<&str> for ImageSource {
    fn from(p: &str) -> Self {
        Self::File(p.into())
    }
}

impl From<Vec<u8>> for ImageSource {
    fn from(bytes: Vec<u8>) -> Self {
        Self::Bytes(bytes.into())
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub text: String,
    /// Images, shown to the model before the text of this turn.
    pub images: Vec<ImageSource>,
    /// Tool calls an assistant turn made (after its text).
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool turn answers.
    pub tool_call_id: Option<String>,
}

/// A conversation and what a chat template may need besides: the tools the model may call
/// (OpenAI-style definitions, `{"type": "function", "function": {"name", "description",
/// "parameters"}}`) and extra template variables (`chat_template_kwargs`, e.g. `enable_thinking`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub tools: Vec<serde_json::Value>,
    pub template_kwargs: serde_json::Map<String, serde_json::Value>,
}

impl From<Vec<Message>> for Conversation {
    fn from(messages: Vec<Message>) -> Self {
        Self { messages, ..Default::default() }
    }
}

impl Conversation {
    /// `enable_thinking` (default true): false closes the reasoning in the generation prompt.
    fn thinking(&self) -> bool {
        self.template_kwargs.get("enable_thinking").and_then(serde_json::Value::as_bool).unwrap_or(true)
    }
}

impl Message {
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Self { role, text: text.into(), images: Vec::new(), tool_calls: Vec::new(), tool_call_id: None }
    }

    pub fn system(text: impl Into<String>) -> Self {
        Self::new(Role::System, text)
    }

    pub fn user(text: impl Into<String>) -> Self {
        Self::new(Role::User, text)
    }

    pub fn assistant(text: impl Into<String>) -> Self {
        Self::new(Role::Assistant, text)
    }

    pub fn tool(text: impl Into<String>) -> Self {
        Self::new(Role::Tool, text)
    }

    /// Adds an image (a path or encoded bytes; shown before the text).
    pub fn with_image(mut self, image: impl Into<ImageSource>) -> Self {
        self.images.push(image.into());
        self
    }

    /// Adds a tool call (an assistant turn).
    pub fn with_tool_call(mut self, call: ToolCall) -> Self {
        self.tool_calls.push(call);
        self
    }

    /// The turn's content as the template sees it: one `<im_patch>` per image, then the text.
    pub fn content(&self) -> String {
        let mut s = "<im_patch>".repeat(self.images.len());
        s.push_str(&self.text);
        s
    }
}

/// Step3's tool-call block: `<｜tool_calls_begin｜>`, each call, `<｜tool_calls_end｜>`.
pub fn tool_calls_text(calls: &[ToolCall]) -> String {
    if calls.is_empty() {
        return String::new();
    }
    let mut s = TOOL_CALLS_BEGIN.to_string();
    for c in calls {
        s.push_str(&c.to_steptml());
    }
    s.push_str(TOOL_CALLS_END);
    s
}

/// How a conversation becomes prompt text.
#[derive(Debug, Clone)]
pub enum ChatTemplate {
    /// The checkpoint's Jinja template (`tokenizer_config.json` → `chat_template`).
    Jinja { source: String, bos: String, eos: String },
    /// Step3's format written by this library.
    Native { bos: String },
}

#[derive(Serialize)]
struct JinjaMessage {
    role: &'static str,
    content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
}

impl ChatTemplate {
    /// The tokenizer's template if it has one, else the native format. The native format needs
    /// `<|BOT|>`, `<|EOT|>` and `<think>` as single tokens: a tokenizer without them is an error.
    pub fn for_tokenizer(tok: &Step3Tokenizer) -> Result<Self> {
        for (t, why) in [
            (BOT, "Step3's chat format opens every turn with it"),
            (EOT, "Step3's chat format ends every turn with it"),
            (THINK, "the generation prompt opens the reasoning with it"),
        ] {
            tok.require(t, why)?;
        }
        let bos = tok.bos_token.clone().unwrap_or_default();
        Ok(match &tok.chat_template {
            Some(source) => {
                let t = Self::Jinja { source: source.clone(), bos, eos: tok.eos_token.clone().unwrap_or_default() };
                // Fail at load, not at the first prompt, if the template does not compile.
                t.render(&[Message::user("")], true)?;
                t
            }
            None => Self::Native { bos },
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's answer
    /// (reasoning first) begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_conversation(&Conversation::from(messages.to_vec()), add_generation_prompt)
    }

    /// [`Self::render`] with tools and template variables. The checkpoint's Jinja template gets
    /// `messages` (with `tool_calls` and `tool_call_id`), `tools`, `add_generation_prompt`,
    /// `bos_token`, `eos_token` and every template variable; the native format lists the tools
    /// after the system text and writes earlier tool calls in Step3's steptml syntax.
    pub fn render_conversation(&self, conv: &Conversation, add_generation_prompt: bool) -> Result<String> {
        let messages = &conv.messages;
        match self {
            Self::Native { bos } => {
                let mut out = bos.clone();
                let tools = native_tools(&conv.tools);
                let mut tools_written = tools.is_empty();
                for m in messages {
                    if m.role == Role::System {
                        out.push_str(&m.content());
                        if !tools_written {
                            out.push_str(&tools);
                            tools_written = true;
                        }
                        continue;
                    }
                    if !tools_written {
                        out.push_str(tools.trim_start());
                        tools_written = true;
                    }
                    let body = format!("{}{}", m.content(), tool_calls_text(&m.tool_calls));
                    out.push_str(&format!("{BOT}{}\n{body}{EOT}", m.role.as_str()));
                }
                if !tools_written {
                    out.push_str(tools.trim_start());
                }
                if add_generation_prompt {
                    out.push_str(&format!("{BOT}assistant\n{THINK}\n"));
                    if !conv.thinking() {
                        out.push_str(&format!("{THINK_END}\n"));
                    }
                }
                Ok(out)
            }
            Self::Jinja { source, bos, eos } => {
                let mut env = minijinja::Environment::new();
                env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
                env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
                    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
                });
                env.add_template("chat", source).map_err(|e| Error::Template(e.to_string()))?;
                let msgs: Vec<JinjaMessage> = messages
                    .iter()
                    .map(|m| JinjaMessage {
                        role: m.role.as_str(),
                        content: m.content(),
                        tool_calls: m.tool_calls.iter().map(ToolCall::to_openai).collect(),
                        tool_call_id: m.tool_call_id.clone(),
                    })
                    .collect();
                let mut ctx = conv.template_kwargs.clone();
                ctx.insert("messages".into(), serde_json::to_value(msgs).map_err(|e| Error::Template(e.to_string()))?);
                ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
                ctx.insert("bos_token".into(), bos.clone().into());
                ctx.insert("eos_token".into(), eos.clone().into());
                if !conv.tools.is_empty() {
                    ctx.insert("tools".into(), conv.tools.clone().into());
                }
                let tpl = env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
                tpl.render(minijinja::Value::from_serialize(&ctx)).map_err(|e| Error::Template(e.to_string()))
            }
        }
    }
}

/// The native format's description of the tools a model may call (empty without tools).
fn native_tools(tools: &[serde_json::Value]) -> String {
    if tools.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "\n\n# Tools\n\nYou may call the functions below. To call them, write {TOOL_CALLS_BEGIN}, then for each call \
         {TOOL_CALL_BEGIN}function{TOOL_SEP}<steptml:invoke name=\"NAME\"><steptml:parameter name=\"ARGUMENT\">VALUE\
         </steptml:parameter></steptml:invoke>{TOOL_CALL_END}, then {TOOL_CALLS_END}.\n"
    );
    for t in tools {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Jinja template the demo checkpoint ships, equivalent to the native format.
    pub const TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% else %}<|BOT|>{{ message['role'] }}\n{{ message['content'] }}<|EOT|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|BOT|>assistant\n<think>\n{% endif %}";

    fn conversation() -> Vec<Message> {
        vec![
            Message::system("You are a helpful assistant."),
            Message::user("What is in this picture?").with_image("cat.png"),
            Message::assistant("A cat."),
            Message::user("And its colour?"),
        ]
    }

    #[test]
    fn native_format_matches_step3_prompts() {
        let t = ChatTemplate::Native { bos: "<s>".into() };
        assert_eq!(
            t.render(&conversation(), true).unwrap(),
            "<s>You are a helpful assistant.<|BOT|>user\n<im_patch>What is in this picture?<|EOT|><|BOT|>assistant\nA cat.<|EOT|><|BOT|>user\nAnd its colour?<|EOT|><|BOT|>assistant\n<think>\n"
        );
        assert_eq!(t.render(&[Message::user("hi")], false).unwrap(), "<s><|BOT|>user\nhi<|EOT|>");
    }

    #[test]
    fn native_format_lists_tools_and_writes_earlier_calls_in_steptml() {
        let t = ChatTemplate::Native { bos: "<s>".into() };
        let tools = vec![serde_json::json!({"type": "function", "function": {"name": "now"}})];
        let mut history = conversation();
        history.insert(
            3,
            Message::assistant("")
                .with_tool_call(ToolCall::from_json("now", &serde_json::json!({"tz": "UTC", "n": 2}))),
        );
        let mut result = Message::tool("12:00");
        result.tool_call_id = Some("call_1".into());
        history.insert(4, result);
        let conv = Conversation { messages: history, tools, template_kwargs: Default::default() };
        let out = t.render_conversation(&conv, true).unwrap();
        assert!(out.starts_with("<s>You are a helpful assistant.\n\n# Tools"), "{out}");
        assert!(out.contains("{\"function\":{\"name\":\"now\"},\"type\":\"function\"}"), "{out}");
        assert!(out.contains(
            "<|BOT|>assistant\n<｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name=\"now\"><steptml:parameter name=\"n\">2</steptml:parameter><steptml:parameter name=\"tz\">UTC</steptml:parameter></steptml:invoke><｜tool_call_end｜><｜tool_calls_end｜><|EOT|><|BOT|>tool\n12:00<|EOT|>"
        ), "{out}");
        // Reasoning switched off closes the think block in the generation prompt.
        let mut off = Conversation::from(vec![Message::user("hi")]);
        off.template_kwargs.insert("enable_thinking".into(), false.into());
        assert!(t.render_conversation(&off, true).unwrap().ends_with("<|BOT|>assistant\n<think>\n</think>\n"));
    }

    #[test]
    fn jinja_template_renders_the_same_and_supports_python_methods() {
        let jinja = ChatTemplate::Jinja { source: TEMPLATE.into(), bos: "<s>".into(), eos: "</s>".into() };
        let native = ChatTemplate::Native { bos: "<s>".into() };
        for gen in [true, false] {
            assert_eq!(jinja.render(&conversation(), gen).unwrap(), native.render(&conversation(), gen).unwrap());
        }
        // Python-style methods that real templates use.
        let py = ChatTemplate::Jinja {
            source: "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.role.startswith('us') }}{% endfor %}"
                .into(),
            bos: String::new(),
            eos: String::new(),
        };
        assert_eq!(py.render(&[Message::user("  hi ")], false).unwrap(), "HI|True"); // Jinja2 prints True
        let raise = ChatTemplate::Jinja {
            source: "{{ raise_exception('no tools here') }}".into(),
            bos: String::new(),
            eos: String::new(),
        };
        assert!(raise.render(&[], false).unwrap_err().to_string().contains("no tools here"));
        let broken = ChatTemplate::Jinja { source: "{% for %}".into(), bos: String::new(), eos: String::new() };
        assert!(broken.render(&[], false).unwrap_err().to_string().contains("chat template"));
    }
}
