//! Step3's chat format: a conversation (system, user, assistant, tool turns, with images) into the
//! prompt text. With the checkpoint's Jinja `chat_template` when it has one (rendered with
//! minijinja and Python-compatible string/dict methods), otherwise natively:
//!
//! ```text
//! BOS + system text + (<|BOT|>{role}\n + one <im_patch> per image + text + <|EOT|>)* + <|BOT|>assistant\n<think>\n
//! ```

use std::path::PathBuf;

use serde::Serialize;

use crate::tokenizer::{Step3Tokenizer, BOT, EOT, THINK};
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
}

impl Message {
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Self { role, text: text.into(), images: Vec::new() }
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

    /// The turn's content as the template sees it: one `<im_patch>` per image, then the text.
    pub fn content(&self) -> String {
        let mut s = "<im_patch>".repeat(self.images.len());
        s.push_str(&self.text);
        s
    }
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
        match self {
            Self::Native { bos } => {
                let mut out = bos.clone();
                for m in messages {
                    if m.role == Role::System {
                        out.push_str(&m.content());
                    } else {
                        out.push_str(&format!("{BOT}{}\n{}{EOT}", m.role.as_str(), m.content()));
                    }
                }
                if add_generation_prompt {
                    out.push_str(&format!("{BOT}assistant\n{THINK}\n"));
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
                let msgs: Vec<JinjaMessage> =
                    messages.iter().map(|m| JinjaMessage { role: m.role.as_str(), content: m.content() }).collect();
                let ctx = minijinja::context! {
                    messages => msgs,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => bos,
                    eos_token => eos,
                };
                let tpl = env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
                tpl.render(ctx).map_err(|e| Error::Template(e.to_string()))
            }
        }
    }
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
