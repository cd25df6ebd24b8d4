//! Turning generated tokens into what a reader sees, as they arrive: UTF-8-safe incremental
//! detokenisation ([`Detokenizer`]), stop strings ([`StopStrings`]), and the split of Step3's
//! output into reasoning, answer and tool calls ([`OutputParser`]), all usable token by token, and
//! the three together for one generation ([`TextDecoder`]).

use serde::Serialize;

use crate::tokenizer::{
    Step3Tokenizer, THINK, THINK_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP,
};
use crate::Result;

/// Incremental detokenisation that never emits half a UTF-8 character.
///
/// Byte-level tokens may hold part of a character; decoding them alone gives U+FFFD. Each step
/// decodes a short window of recent tokens and emits the text that window gained, but only once it
/// no longer ends in a replacement character (the same window technique as Hugging Face's TGI).
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the new text when a complete piece is available.
    pub fn push(&mut self, tok: &Step3Tokenizer, id: u32) -> Result<Option<String>> {
        self.tokens.push(id);
        let new = self.gained(tok, true)?;
        if new.is_some() {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
        }
        Ok(new)
    }

    /// Whatever is still held back (an incomplete character at the very end is kept as U+FFFD).
    pub fn flush(&mut self, tok: &Step3Tokenizer) -> Result<Option<String>> {
        let rest = self.gained(tok, false)?;
        self.prefix_offset = self.tokens.len();
        self.read_offset = self.tokens.len();
        Ok(rest)
    }

    /// The text the tokens after `read_offset` add to the window, if any (and, with
    /// `whole_chars`, only if it does not end in a replacement character).
    fn gained(&self, tok: &Step3Tokenizer, whole_chars: bool) -> Result<Option<String>> {
        let prefix = tok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let text = tok.decode(&self.tokens[self.prefix_offset..])?;
        let ready = text.len() > prefix.len()
            && text.is_char_boundary(prefix.len())
            && !(whole_chars && text.ends_with('\u{FFFD}'));
        Ok(ready.then(|| text[prefix.len()..].to_string()))
    }
}

/// The longest suffix of `text` that is a proper prefix of one of `needles` (bytes to hold back
/// until the next piece shows whether a needle is being written).
fn held_suffix(text: &str, needles: &[impl AsRef<str>]) -> usize {
    let mut best = 0;
    for n in needles {
        let n = n.as_ref();
        for (i, _) in n.char_indices().skip(1) {
            if i > best && text.ends_with(&n[..i]) {
                best = i;
            }
        }
    }
    best
}

/// Takes from `pending` everything but its [`held_suffix`].
fn take_safe(pending: &mut String, needles: &[impl AsRef<str>]) -> String {
    let keep = held_suffix(pending, needles);
    pending.drain(..pending.len() - keep).collect()
}

/// Ends generation at user-given strings, holding back text that might be the start of one.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    /// Feeds text; returns the text that is safe to show and whether a stop string was reached
    /// (the stop string and everything after it are dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(pos) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        (take_safe(&mut self.pending, &self.stops), false)
    }

    /// The held-back text at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// A Step3 tool call: `<steptml:invoke name="NAME">` with one `<steptml:parameter name="ARG">`
/// per argument. Values are the raw strings the model wrote (a server casts them with the tool's
/// JSON schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Vec<(String, String)>,
}

impl ToolCall {
    /// A call from a name and JSON arguments (an object; string values are taken as written,
    /// others as their JSON text).
    pub fn from_json(name: impl Into<String>, arguments: &serde_json::Value) -> Self {
        let arguments = match arguments {
            serde_json::Value::Object(m) => {
                m.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string))).collect()
            }
            _ => Vec::new(),
        };
        Self { name: name.into(), arguments }
    }

    /// The call in Step3's syntax: `<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke …>…`.
    pub fn to_steptml(&self) -> String {
        let mut s = format!("{TOOL_CALL_BEGIN}function{TOOL_SEP}<steptml:invoke name=\"{}\">", self.name);
        for (k, v) in &self.arguments {
            s.push_str(&format!("<steptml:parameter name=\"{k}\">{v}</steptml:parameter>"));
        }
        s.push_str("</steptml:invoke>");
        s.push_str(TOOL_CALL_END);
        s
    }

    /// The call as a chat template expects it: `{"type": "function", "function": {"name",
    /// "arguments"}}` with the arguments as an object of strings.
    pub fn to_openai(&self) -> serde_json::Value {
        serde_json::json!({"type": "function", "function": {"name": self.name, "arguments": self.arguments_json()}})
    }

    /// The arguments as a JSON object of strings.
    pub fn arguments_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.arguments.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect(),
        )
    }

    /// Parses the text between `<｜tool_call_begin｜>` and `<｜tool_call_end｜>`:
    /// `function<｜tool_sep｜><steptml:invoke name="NAME"><steptml:parameter name="ARG">VALUE</steptml:parameter>…</steptml:invoke>`.
    pub fn parse(body: &str) -> Option<Self> {
        let body = body.trim();
        let body =
            body.split_once(TOOL_SEP).map_or(body, |(kind, rest)| if kind.trim() == "function" { rest } else { body });
        let rest = body.trim().strip_prefix("<steptml:invoke name=\"")?;
        let (name, mut rest) = rest.split_once("\">")?;
        let mut arguments = Vec::new();
        loop {
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix("<steptml:parameter name=\"") {
                let (arg, r) = r.split_once("\">")?;
                let (value, r) = r.split_once("</steptml:parameter>")?;
                arguments.push((arg.to_string(), value.to_string()));
                rest = r;
            } else {
                rest.strip_prefix("</steptml:invoke>")?;
                break;
            }
        }
        (!name.is_empty()).then(|| Self { name: name.to_string(), arguments })
    }
}

/// What the reader sees, piece by piece.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum OutputEvent {
    /// Text before `</think>`.
    Reasoning(String),
    /// The answer.
    Content(String),
    ToolCall(ToolCall),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Reasoning,
    Content,
    ToolCalls,
}

/// Splits Step3's output into reasoning (everything before the first `</think>`, as vLLM's step3
/// reasoning parser does; all of it when `</think>` never comes), the answer, and tool calls
/// (`<｜tool_calls_begin｜>` … `<｜tool_calls_end｜>`), from text arriving in pieces.
#[derive(Debug, Clone)]
pub struct OutputParser {
    section: Section,
    pending: String,
    /// Nothing has been emitted yet (a leading `<think>` is dropped).
    at_start: bool,
    /// Tool-call markup is parsed (else it is answer text: the request offered no tools).
    tool_calls: bool,
    /// The current `<｜tool_calls_begin｜>` has been neither parsed into a call nor shown: text
    /// shown from its section (an unparseable or unfinished call) starts with it, as written.
    marker_unshown: bool,
}

impl OutputParser {
    /// `in_reasoning`: the prompt opened the reasoning (ends with `<think>`), as Step3's does.
    pub fn new(in_reasoning: bool) -> Self {
        Self {
            section: if in_reasoning { Section::Reasoning } else { Section::Content },
            pending: String::new(),
            at_start: true,
            tool_calls: true,
            marker_unshown: false,
        }
    }

    /// Tool-call markup is left in the answer as text (for a request that offered no tools).
    pub fn without_tool_calls(mut self) -> Self {
        self.tool_calls = false;
        self
    }

    fn emit(&self, text: &str, out: &mut Vec<OutputEvent>) {
        if text.is_empty() {
            return;
        }
        match (self.section, out.last_mut()) {
            (Section::Reasoning, Some(OutputEvent::Reasoning(s)))
            | (Section::Content, Some(OutputEvent::Content(s))) => s.push_str(text),
            (Section::Reasoning, _) => out.push(OutputEvent::Reasoning(text.to_string())),
            _ => out.push(OutputEvent::Content(text.to_string())),
        }
    }

    /// Feeds a piece of decoded text (special tokens kept).
    pub fn push(&mut self, text: &str) -> Vec<OutputEvent> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.at_start {
                let trimmed = self.pending.trim_start();
                if trimmed.is_empty() || THINK.starts_with(trimmed) && trimmed.len() < THINK.len() {
                    return out;
                }
                if let Some(rest) = trimmed.strip_prefix(THINK) {
                    self.pending = rest.to_string();
                }
                self.at_start = false;
            }
            match self.section {
                Section::Reasoning => match self.pending.find(THINK_END) {
                    Some(i) => {
                        let before = self.pending[..i].to_string();
                        self.emit(&before, &mut out);
                        self.pending.drain(..i + THINK_END.len());
                        self.section = Section::Content;
                    }
                    None => return self.emit_safe(&[THINK_END], out),
                },
                Section::Content if !self.tool_calls => {
                    let text = std::mem::take(&mut self.pending);
                    self.emit(&text, &mut out);
                    return out;
                }
                Section::Content => match self.pending.find(TOOL_CALLS_BEGIN) {
                    Some(i) => {
                        let before = self.pending[..i].to_string();
                        self.emit(&before, &mut out);
                        self.pending.drain(..i + TOOL_CALLS_BEGIN.len());
                        self.section = Section::ToolCalls;
                        self.marker_unshown = true;
                    }
                    None => return self.emit_safe(&[TOOL_CALLS_BEGIN], out),
                },
                Section::ToolCalls => {
                    let Some(end) = self.pending.find(TOOL_CALL_END) else {
                        if let Some(i) = self.pending.find(TOOL_CALLS_END) {
                            // Closing marker: anything after it is answer text again.
                            self.pending.drain(..i + TOOL_CALLS_END.len());
                            self.section = Section::Content;
                            self.marker_unshown = false;
                            continue;
                        }
                        return out;
                    };
                    let call = self.pending[..end].to_string();
                    self.pending.drain(..end + TOOL_CALL_END.len());
                    let body = call.split_once(TOOL_CALL_BEGIN).map_or(call.as_str(), |(_, b)| b);
                    match ToolCall::parse(body) {
                        Some(tc) => {
                            self.marker_unshown = false;
                            out.push(OutputEvent::ToolCall(tc))
                        }
                        None => {
                            // Unparseable: show it as text rather than lose it.
                            let prev = std::mem::replace(&mut self.section, Section::Content);
                            let marker = if std::mem::take(&mut self.marker_unshown) { TOOL_CALLS_BEGIN } else { "" };
                            self.emit(&format!("{marker}{call}"), &mut out);
                            self.section = prev;
                        }
                    }
                }
            }
        }
    }

    fn emit_safe(&mut self, markers: &[&str], mut out: Vec<OutputEvent>) -> Vec<OutputEvent> {
        let text = take_safe(&mut self.pending, markers);
        self.emit(&text, &mut out);
        out
    }

    /// Everything still held back, at the end of generation.
    pub fn finish(&mut self) -> Vec<OutputEvent> {
        let mut out = Vec::new();
        let mut rest = std::mem::take(&mut self.pending);
        if self.section == Section::ToolCalls {
            // An unfinished call: keep its text as answer text, as the model wrote it.
            if std::mem::take(&mut self.marker_unshown) {
                rest.insert_str(0, TOOL_CALLS_BEGIN);
            }
            self.section = Section::Content;
        }
        self.emit(&rest, &mut out);
        out
    }
}

/// Everything between generated token ids and what a reader sees, for one generation: the
/// detokenizer, the stop strings and the reasoning / answer / tool-call split, fed token by token.
/// Stop tokens are not fed: they end generation without being shown.
#[derive(Debug, Clone)]
pub struct TextDecoder {
    detok: Detokenizer,
    stops: StopStrings,
    /// `None`: plain text (everything is content, markers included).
    parser: Option<OutputParser>,
    stopped: bool,
}

impl TextDecoder {
    /// `opens_reasoning`: the prompt ends inside `<think>` (Step3's chat prompts do).
    pub fn new(stop_strings: Vec<String>, opens_reasoning: bool) -> Self {
        Self {
            detok: Detokenizer::new(),
            stops: StopStrings::new(stop_strings),
            parser: Some(OutputParser::new(opens_reasoning)),
            stopped: false,
        }
    }

    /// Tool-call markup stays in the answer as text (a request that offered no tools).
    pub fn without_tool_calls(mut self) -> Self {
        self.parser = self.parser.map(OutputParser::without_tool_calls);
        self
    }

    /// The text as written, all of it content (no reasoning or tool-call split): what a plain
    /// completion returns.
    pub fn plain(stop_strings: Vec<String>) -> Self {
        Self { detok: Detokenizer::new(), stops: StopStrings::new(stop_strings), parser: None, stopped: false }
    }

    fn parse(&mut self, text: &str) -> Vec<OutputEvent> {
        match &mut self.parser {
            Some(p) => p.push(text),
            None if text.is_empty() => Vec::new(),
            None => vec![OutputEvent::Content(text.to_string())],
        }
    }

    /// Feeds a generated token; returns what it completes. After a stop string has been reached
    /// ([`Self::hit_stop_string`]) nothing more is shown.
    pub fn push(&mut self, tok: &Step3Tokenizer, id: u32) -> Result<Vec<OutputEvent>> {
        if self.stopped {
            return Ok(Vec::new());
        }
        let Some(text) = self.detok.push(tok, id)? else { return Ok(Vec::new()) };
        let (safe, hit) = self.stops.push(&text);
        self.stopped = hit;
        Ok(self.parse(&safe))
    }

    /// Whether a stop string has been reached (generation should end).
    pub fn hit_stop_string(&self) -> bool {
        self.stopped
    }

    /// The end of generation: releases what the detokenizer, the stop strings and the parser
    /// held back (nothing past a stop string), and closes an unfinished tool call.
    pub fn finish(&mut self, tok: &Step3Tokenizer) -> Result<Vec<OutputEvent>> {
        let mut events = Vec::new();
        if !self.stopped {
            let tail = self.detok.flush(tok)?.unwrap_or_default();
            let (mut text, hit) = self.stops.push(&tail);
            self.stopped = hit;
            if !hit {
                text.push_str(&self.stops.flush());
            }
            events = self.parse(&text);
        }
        if let Some(p) = &mut self.parser {
            events.extend(p.finish());
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str], in_reasoning: bool) -> Vec<OutputEvent> {
        let mut p = OutputParser::new(in_reasoning);
        let mut all: Vec<OutputEvent> = Vec::new();
        for piece in pieces {
            all.extend(p.push(piece));
        }
        all.extend(p.finish());
        // Merge adjacent text events so streamed and whole inputs compare equal.
        let mut merged: Vec<OutputEvent> = Vec::new();
        for e in all {
            match (merged.last_mut(), e) {
                (Some(OutputEvent::Reasoning(a)), OutputEvent::Reasoning(b)) => a.push_str(&b),
                (Some(OutputEvent::Content(a)), OutputEvent::Content(b)) => a.push_str(&b),
                (_, e) => merged.push(e),
            }
        }
        merged
    }

    /// Splits `s` into pieces of `n` characters (a worst case for markers split across pieces).
    fn chop(s: &str, n: usize) -> Vec<String> {
        let chars: Vec<char> = s.chars().collect();
        chars.chunks(n).map(|c| c.iter().collect()).collect()
    }

    const OUTPUT: &str = "Let me think about the weather.</think>I'll check it.<｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name=\"get_weather\"><steptml:parameter name=\"city\">Paris</steptml:parameter><steptml:parameter name=\"unit\">celsius</steptml:parameter></steptml:invoke><｜tool_call_end｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name=\"now\"></steptml:invoke><｜tool_call_end｜><｜tool_calls_end｜>";

    fn expected() -> Vec<OutputEvent> {
        vec![
            OutputEvent::Reasoning("Let me think about the weather.".into()),
            OutputEvent::Content("I'll check it.".into()),
            OutputEvent::ToolCall(ToolCall {
                name: "get_weather".into(),
                arguments: vec![("city".into(), "Paris".into()), ("unit".into(), "celsius".into())],
            }),
            OutputEvent::ToolCall(ToolCall { name: "now".into(), arguments: vec![] }),
        ]
    }

    #[test]
    fn reasoning_answer_and_tool_calls_whole_and_streamed() {
        assert_eq!(run(&[OUTPUT], true), expected());
        for n in [1, 2, 3, 7, 13] {
            let pieces = chop(OUTPUT, n);
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            assert_eq!(run(&refs, true), expected(), "pieces of {n}");
        }
        let tc = match &expected()[2] {
            OutputEvent::ToolCall(tc) => tc.clone(),
            _ => unreachable!(),
        };
        assert_eq!(tc.arguments_json(), serde_json::json!({"city": "Paris", "unit": "celsius"}));
    }

    #[test]
    fn reasoning_rules_of_the_step3_parser() {
        // No </think>: everything is reasoning.
        assert_eq!(run(&["still thinking"], true), vec![OutputEvent::Reasoning("still thinking".into())]);
        // A leading <think> the model writes itself is dropped.
        assert_eq!(
            run(&["<think>", "x</think>y"], true),
            vec![OutputEvent::Reasoning("x".into()), OutputEvent::Content("y".into())]
        );
        // A prompt that did not open reasoning: plain answer.
        assert_eq!(run(&["hello"], false), vec![OutputEvent::Content("hello".into())]);
        // A text that merely looks like the start of a marker is released at the end.
        assert_eq!(run(&["a</thi"], true), vec![OutputEvent::Reasoning("a</thi".into())]);
        // An unparseable call stays visible as text.
        let bad = "</think>x<｜tool_calls_begin｜><｜tool_call_begin｜>garbage<｜tool_call_end｜>";
        let shown = "x<｜tool_calls_begin｜><｜tool_call_begin｜>garbage";
        assert_eq!(run(&[bad], true), vec![OutputEvent::Content(shown.into())]);
    }

    /// A tool-call section cut off before any call closed comes back as written, its opening
    /// marker included; after a parsed call, the unfinished rest does. Whole or in pieces alike.
    #[test]
    fn an_unfinished_tool_call_stays_text_as_written() {
        let cut =
            "x</think>ok<｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name=\"g";
        let want = vec![
            OutputEvent::Reasoning("x".into()),
            OutputEvent::Content(
                "ok<｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name=\"g".into(),
            ),
        ];
        let one = "<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name=\"now\"></steptml:invoke><｜tool_call_end｜>";
        let after = format!("</think><｜tool_calls_begin｜>{one}<｜tool_call_begin｜>func");
        let want_after = vec![
            OutputEvent::ToolCall(ToolCall { name: "now".into(), arguments: vec![] }),
            OutputEvent::Content("<｜tool_call_begin｜>func".into()),
        ];
        for n in [1, 3, 1000] {
            let pieces = chop(cut, n);
            assert_eq!(run(&pieces.iter().map(String::as_str).collect::<Vec<_>>(), true), want, "pieces of {n}");
            let pieces = chop(&after, n);
            assert_eq!(run(&pieces.iter().map(String::as_str).collect::<Vec<_>>(), true), want_after, "pieces of {n}");
        }
    }

    /// Without tools, tool-call markup is answer text, whole or in pieces.
    #[test]
    fn without_tool_calls_the_markup_is_answer_text() {
        for n in [1, 2, 5, 1000] {
            let mut p = OutputParser::new(true).without_tool_calls();
            let mut all = Vec::new();
            for piece in chop(OUTPUT, n) {
                all.extend(p.push(&piece));
            }
            all.extend(p.finish());
            let (mut reasoning, mut content) = (String::new(), String::new());
            for e in all {
                match e {
                    OutputEvent::Reasoning(s) => reasoning.push_str(&s),
                    OutputEvent::Content(s) => content.push_str(&s),
                    OutputEvent::ToolCall(t) => panic!("parsed {t:?}"),
                }
            }
            let (r, c) = OUTPUT.split_once(THINK_END).unwrap();
            assert_eq!((reasoning.as_str(), content.as_str()), (r, c), "pieces of {n}");
        }
    }

    #[test]
    fn stop_strings_hold_back_and_cut() {
        let mut s = StopStrings::new(vec!["STOP".into(), "\n\n".into()]);
        assert_eq!(s.push("abc ST"), ("abc ".to_string(), false));
        assert_eq!(s.push("O"), (String::new(), false));
        assert_eq!(s.push("Px"), (String::new(), true));
        let mut s = StopStrings::new(vec!["STOP".into()]);
        assert_eq!(s.push("abc ST"), ("abc ".to_string(), false));
        assert_eq!(s.push("ay"), ("STay".to_string(), false));
        assert_eq!(s.push("S"), (String::new(), false));
        assert_eq!(s.flush(), "S");
        let mut s = StopStrings::new(vec!["é!".into()]);
        assert_eq!(s.push("café"), ("caf".to_string(), false));
        assert_eq!(s.push("!"), (String::new(), true));
    }
}
