//! The Step3 tokenizer: `tokenizer.json` through the `tokenizers` crate, plus the special tokens
//! Step3's chat format and image layout are built from, looked up by their strings.

use std::path::Path;

use step3_vision::ImageTokenIds;

use crate::{Error, Result};

/// Step3's chat markers.
pub const BOT: &str = "<|BOT|>";
pub const EOT: &str = "<|EOT|>";
pub const THINK: &str = "<think>";
pub const THINK_END: &str = "</think>";
/// The DeepSeek-V3 family's sequence markers (Step3's BOS is id 0, `<｜begin▁of▁sentence｜>`).
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
/// Tool-call markers (full-width bars, ASCII underscores).
pub const TOOL_CALLS_BEGIN: &str = "<｜tool_calls_begin｜>";
pub const TOOL_CALLS_END: &str = "<｜tool_calls_end｜>";
pub const TOOL_CALL_BEGIN: &str = "<｜tool_call_begin｜>";
pub const TOOL_CALL_END: &str = "<｜tool_call_end｜>";
pub const TOOL_SEP: &str = "<｜tool_sep｜>";

/// A loaded tokenizer with what `tokenizer_config.json` adds (chat template, BOS/EOS strings).
#[derive(Clone)]
pub struct Step3Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `chat_template` of `tokenizer_config.json`, if any.
    pub chat_template: Option<String>,
    /// The BOS string the prompt starts with (`bos_token`, else `<｜begin▁of▁sentence｜>` if known).
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl std::fmt::Debug for Step3Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step3Tokenizer").field("vocab", &self.inner.get_vocab_size(true)).finish()
    }
}

/// `bos_token` / `eos_token` may be a string or `{"content": "..."}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl Step3Tokenizer {
    /// Reads `dir/tokenizer.json` (required) and `dir/tokenizer_config.json` (optional).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(Error::Tokenizer {
                path: file,
                msg: "missing: chat and text prompts need the model's tokenizer.json (use --ids for raw token ids)"
                    .into(),
            });
        }
        let config = dir.join("tokenizer_config.json");
        Self::from_files(&file, config.is_file().then_some(config.as_path()))
    }

    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| Error::Tokenizer { path: tokenizer_json.to_path_buf(), msg: e.to_string() })?;
        let mut tok = Self { inner, chat_template: None, bos_token: None, eos_token: None };
        if let Some(path) = tokenizer_config {
            let v = crate::read_json(path)?;
            tok.chat_template = match v.get("chat_template") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(String::from)),
                Some(other) => {
                    return Err(Error::key(path, "chat_template", format!("must be a string, found {other}")));
                }
            };
            tok.bos_token = token_string(v.get("bos_token"));
            tok.eos_token = token_string(v.get("eos_token"));
        }
        if tok.bos_token.is_none() && tok.token_id(BOS).is_some() {
            tok.bos_token = Some(BOS.to_string());
        }
        Ok(tok)
    }

    /// Size of the vocabulary including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token given by its string, if the tokenizer has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of a token the caller cannot do without, or an error naming it.
    pub fn require(&self, token: &str, why: &str) -> Result<u32> {
        self.token_id(token)
            .ok_or_else(|| Error::MissingSpecialToken { token: token.to_string(), why: why.to_string() })
    }

    /// Ids of the image markers.
    pub fn image_token_ids(&self) -> Result<ImageTokenIds> {
        let why = "images in prompts need it";
        Ok(ImageTokenIds {
            im_start: self.require("<im_start>", why)?,
            im_end: self.require("<im_end>", why)?,
            im_patch: self.require("<im_patch>", why)?,
            patch_start: self.require("<patch_start>", why)?,
            patch_end: self.require("<patch_end>", why)?,
            patch_newline: self.require("<patch_newline>", why)?,
        })
    }

    /// Token ids of `text`; special-token strings in it (`<|BOT|>`, ...) become their ids, and no
    /// BOS is added (the chat format writes it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc =
            self.inner.encode(text, false).map_err(|e| Error::Input(format!("cannot tokenize the prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens kept (the reasoning and tool-call parsers need them).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Input(format!("cannot decode tokens: {e}")))
    }
}
