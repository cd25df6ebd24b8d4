//! The library API: load Step3 once, then chat with it.
//!
//! ```no_run
//! use step3::{Message, Step3, GenerateOptions};
//!
//! # fn main() -> step3::Result<()> {
//! let model = Step3::from_pretrained("stepfun-ai/step3-fp8")   // a repo id or a local directory
//!     .device(step3::Device::Cpu)
//!     .dtype(step3::DType::BF16)
//!     .build()?;
//! let messages = [Message::user("What is in this image?").with_image("cat.png")];
//! let reply = model.generate(&messages, &GenerateOptions::default())?;
//! println!("reasoning: {}\nanswer: {}", reply.reasoning, reply.text);
//!
//! // Or token by token:
//! for event in model.stream(&messages, &GenerateOptions::default())? {
//!     if let step3::Event::Text(piece) = event? {
//!         print!("{piece}");
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde::Serialize;
use step3_model::hub::{self, HubOptions, ModelSource};
use step3_model::{
    ChatTemplate, Detokenizer, Error, FinishReason, Fp8Storage, Generator, LoadOptions, LoadProgress, Message,
    OutputEvent, OutputParser, PreprocessedImage, Result, SamplingParams, Stats, Step3Checkpoint, Step3Model,
    Step3Tokenizer, StopStrings, ToolCall,
};

use crate::{DType, Device};

/// Builds a [`Step3`] from a repo id or a directory.
#[derive(Debug, Clone)]
pub struct Step3Builder {
    source: String,
    device: Device,
    dtype: DType,
    fp8: Fp8Storage,
    crop_size: Option<usize>,
    hub: HubOptions,
    progress: Option<LoadProgress>,
}

impl Step3Builder {
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Compute dtype: f32, bf16 (default) or f16.
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// How block-FP8 weights are held (compact by default).
    pub fn fp8(mut self, fp8: Fp8Storage) -> Self {
        self.fp8 = fp8;
        self
    }

    /// Side of the local image crops when the checkpoint needs a non-default one.
    pub fn crop_size(mut self, size: usize) -> Self {
        self.crop_size = Some(size);
        self
    }

    /// Never touch the network. The default comes from `HF_HUB_OFFLINE`; `offline(false)` allows
    /// downloads even when it is set.
    pub fn offline(mut self, offline: bool) -> Self {
        self.hub.offline = offline;
        self
    }

    /// The Hugging Face cache directory (default: `HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`).
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.hub.cache_dir = dir.into();
        self
    }

    /// Download progress bars on stderr (default on) and a weight-loading callback.
    pub fn progress(mut self, downloads: bool, loading: Option<LoadProgress>) -> Self {
        self.hub.progress = downloads;
        self.progress = loading;
        self
    }

    /// Resolves the source (downloading what is missing unless offline), checks and loads the
    /// weights, the tokenizer and the chat template.
    pub fn build(self) -> Result<Step3> {
        let source = ModelSource::parse(&self.source)?;
        let dir = hub::resolve(&source, &self.hub)?;
        Step3::load_dir(
            &dir,
            &LoadOptions {
                dtype: self.dtype,
                device: self.device,
                fp8: self.fp8,
                crop_size: self.crop_size,
                progress: self.progress,
            },
        )
    }
}

/// Options of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// 0 = greedy. Default: the checkpoint's `generation_config.json`, else 0.7.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// 1.0 disables it.
    pub repetition_penalty: f32,
    /// Generation ends before any of these strings (they are not part of the answer).
    pub stop: Vec<String>,
    /// Keep generating past end-of-turn tokens.
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            temperature: None,
            top_p: None,
            top_k: None,
            seed: 299792458,
            max_new_tokens: 1024,
            repetition_penalty: 1.0,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// What a generation produced, piece by piece.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Event {
    /// Reasoning text (before `</think>`).
    Reasoning(String),
    /// Answer text.
    Text(String),
    ToolCall(ToolCall),
    /// The end, with the numbers.
    Done(Stats),
}

/// A finished answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Response {
    pub text: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
    /// The generated token ids (the end-of-turn token included when it stopped generation).
    pub tokens: Vec<u32>,
    pub stats: Stats,
}

/// Step3, ready to chat: the model, its tokenizer and its chat format.
#[derive(Debug)]
pub struct Step3 {
    model: Step3Model,
    tokenizer: Step3Tokenizer,
    template: ChatTemplate,
    /// End-of-turn ids: config, generation_config.json, `<|EOT|>` and `<｜end▁of▁sentence｜>`.
    eos: Vec<u32>,
    /// `generation_config.json` defaults.
    default_temperature: f64,
    default_top_p: Option<f64>,
    default_top_k: Option<usize>,
    dir: PathBuf,
}

impl Step3 {
    /// Starts a builder for a repo id (`stepfun-ai/step3`, `owner/name@revision`) or a directory.
    pub fn from_pretrained(source: impl Into<String>) -> Step3Builder {
        Step3Builder {
            source: source.into(),
            device: Device::Cpu,
            dtype: DType::BF16,
            fp8: Fp8Storage::Compact,
            crop_size: None,
            hub: HubOptions::from_env(),
            progress: None,
        }
    }

    /// Loads a local directory.
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let tokenizer = Step3Tokenizer::from_dir(dir)?;
        let template = ChatTemplate::for_tokenizer(&tokenizer)?;
        let ckpt = Step3Checkpoint::open(dir)?;
        let model = ckpt.load(opts)?;
        let mut eos = ckpt.config().eos_token_ids.clone();
        let gen = read_json(&dir.join("generation_config.json"))?;
        if let Some(g) = &gen {
            match g.get("eos_token_id") {
                Some(serde_json::Value::Array(ids)) => {
                    eos.extend(ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
                }
                Some(v) => eos.extend(v.as_u64().map(|v| v as u32)),
                None => {}
            }
        }
        eos.extend(
            [step3_model::tokenizer::EOT, step3_model::tokenizer::EOS].iter().filter_map(|t| tokenizer.token_id(t)),
        );
        eos.sort_unstable();
        eos.dedup();
        // Image markers must agree between the tokenizer and config.json.
        if let (Some(cfg), Some(tok)) = (model.image_token_id, tokenizer.token_id("<im_patch>")) {
            if cfg != tok {
                return Err(Error::ConfigKey {
                    path: ckpt.config().path.clone(),
                    key: "image_token_id".into(),
                    problem: format!("is {cfg}, but the tokenizer's <im_patch> is {tok}"),
                });
            }
        }
        let num = |k: &str| gen.as_ref().and_then(|g| g.get(k)).and_then(|v| v.as_f64());
        Ok(Self {
            model,
            tokenizer,
            template,
            eos,
            default_temperature: num("temperature").unwrap_or(0.7),
            default_top_p: num("top_p").filter(|p| *p < 1.0),
            default_top_k: num("top_k").map(|k| k as usize).filter(|k| *k > 0),
            dir: dir.to_path_buf(),
        })
    }

    /// Where the model's files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn model(&self) -> &Step3Model {
        &self.model
    }

    pub fn tokenizer(&self) -> &Step3Tokenizer {
        &self.tokenizer
    }

    /// The prompt text a conversation becomes (with the generation prompt).
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        self.template.render(messages, true)
    }

    /// Prompt token ids of a conversation, images expanded to their full layouts, and the
    /// preprocessed images in prompt order.
    pub fn prompt(&self, messages: &[Message]) -> Result<(Vec<u32>, Vec<PreprocessedImage>)> {
        let (_, ids, images) = self.prepare(messages)?;
        Ok((ids, images))
    }

    /// The rendered prompt text, its token ids (images expanded) and the preprocessed images.
    fn prepare(&self, messages: &[Message]) -> Result<(String, Vec<u32>, Vec<PreprocessedImage>)> {
        if messages.iter().all(|m| m.text.trim().is_empty() && m.images.is_empty()) {
            return Err(Error::Input("the prompt is empty".into()));
        }
        let text = self.render(messages)?;
        let ids = self.tokenizer.encode(&text)?;
        let paths: Vec<&PathBuf> = messages.iter().flat_map(|m| &m.images).collect();
        if paths.is_empty() {
            return Ok((text, ids, Vec::new()));
        }
        let images = paths.iter().map(|p| self.model.load_image(p)).collect::<Result<Vec<_>>>()?;
        let ids = self.model.expand_placeholders(&ids, &images, &self.tokenizer.image_token_ids()?)?;
        Ok((text, ids, images))
    }

    fn sampling(&self, opts: &GenerateOptions) -> SamplingParams {
        SamplingParams {
            temperature: opts.temperature.unwrap_or(self.default_temperature),
            top_p: opts.top_p.or(self.default_top_p),
            top_k: opts.top_k.or(self.default_top_k),
            seed: opts.seed,
            max_new_tokens: opts.max_new_tokens,
            stop_token_ids: if opts.ignore_eos { Vec::new() } else { self.eos.clone() },
            repetition_penalty: opts.repetition_penalty,
            ..Default::default()
        }
    }

    /// Streams the answer to `messages` as [`Event`]s.
    pub fn stream<'a>(&'a self, messages: &[Message], opts: &GenerateOptions) -> Result<Stream<'a>> {
        let (text, ids, images) = self.prepare(messages)?;
        let opens_reasoning = text.trim_end().ends_with(step3_model::tokenizer::THINK);
        self.stream_ids(&ids, &images, opens_reasoning, opts)
    }

    /// Streams a continuation of raw prompt token ids (no chat template), with `images` filling
    /// the prompt's `<im_patch>` placeholders. `opens_reasoning`: the prompt ends inside `<think>`.
    pub fn stream_ids<'a>(
        &'a self,
        ids: &[u32],
        images: &[PreprocessedImage],
        opens_reasoning: bool,
        opts: &GenerateOptions,
    ) -> Result<Stream<'a>> {
        let embeds = self.model.embed(ids, images)?;
        let generator = Generator::new(&self.model.text, ids, Some(embeds), &self.sampling(opts))?;
        Ok(Stream {
            owner: self,
            generator,
            detok: Detokenizer::new(),
            stops: StopStrings::new(opts.stop.clone()),
            parser: OutputParser::new(opens_reasoning),
            queue: VecDeque::new(),
            done: false,
        })
    }

    /// Generates a whole answer, calling `on_event` for every piece as it comes; returning
    /// `ControlFlow::Break` from it stops generation.
    pub fn generate_with(
        &self,
        messages: &[Message],
        opts: &GenerateOptions,
        on_event: impl FnMut(&Event) -> ControlFlow<()>,
    ) -> Result<Response> {
        collect(self.stream(messages, opts)?, on_event)
    }

    /// Generates a whole answer.
    pub fn generate(&self, messages: &[Message], opts: &GenerateOptions) -> Result<Response> {
        self.generate_with(messages, opts, |_| ControlFlow::Continue(()))
    }

    /// Continues raw prompt token ids (no chat template; images fill the `<im_patch>`
    /// placeholders). The answer counts as reasoning only if `opens_reasoning`.
    pub fn complete(
        &self,
        ids: &[u32],
        images: &[PreprocessedImage],
        opens_reasoning: bool,
        opts: &GenerateOptions,
    ) -> Result<Response> {
        collect(self.stream_ids(ids, images, opens_reasoning, opts)?, |_| ControlFlow::Continue(()))
    }
}

/// Drains a stream into a [`Response`], showing every event to `on_event`.
fn collect(mut stream: Stream<'_>, mut on_event: impl FnMut(&Event) -> ControlFlow<()>) -> Result<Response> {
    let (mut text, mut reasoning, mut tool_calls) = (String::new(), String::new(), Vec::new());
    while let Some(event) = stream.next() {
        let event = event?;
        let flow = on_event(&event);
        match event {
            Event::Reasoning(s) => reasoning.push_str(&s),
            Event::Text(s) => text.push_str(&s),
            Event::ToolCall(t) => tool_calls.push(t),
            Event::Done(stats) => {
                let tokens = stream.generator.generated().to_vec();
                return Ok(Response { text, reasoning, tool_calls, tokens, stats });
            }
        }
        if flow.is_break() {
            stream.cancel();
        }
    }
    Err(Error::Input("generation ended without its final event".into()))
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    step3_model::read_json(path).map(Some)
}

/// A generation in progress, yielding [`Event`]s; the last one is [`Event::Done`].
pub struct Stream<'a> {
    owner: &'a Step3,
    generator: Generator<'a>,
    detok: Detokenizer,
    stops: StopStrings,
    parser: OutputParser,
    queue: VecDeque<Event>,
    done: bool,
}

impl Stream<'_> {
    /// Stops after the events already produced.
    pub fn cancel(&mut self) {
        self.generator.stop(FinishReason::Cancelled);
    }

    fn push_events(&mut self, events: Vec<OutputEvent>) {
        self.queue.extend(events.into_iter().map(|e| match e {
            OutputEvent::Reasoning(s) => Event::Reasoning(s),
            OutputEvent::Content(s) => Event::Text(s),
            OutputEvent::ToolCall(t) => Event::ToolCall(t),
        }));
    }

    fn step(&mut self) -> Result<()> {
        let tok = &self.owner.tokenizer;
        match self.generator.next_token()? {
            Some(id) if matches!(self.generator.finish_reason(), Some(FinishReason::Stop(s)) if s == id) => {}
            Some(id) => {
                if let Some(text) = self.detok.push(tok, id)? {
                    let (safe, hit) = self.stops.push(&text);
                    let events = self.parser.push(&safe);
                    self.push_events(events);
                    if hit {
                        self.generator.stop(FinishReason::StopString);
                    }
                }
            }
            None => {
                // The end: release what the detokenizer and the stop strings held back.
                if self.generator.finish_reason() != Some(FinishReason::StopString) {
                    let tail = self.detok.flush(tok)?.unwrap_or_default();
                    let (mut text, hit) = self.stops.push(&tail);
                    if !hit {
                        text.push_str(&self.stops.flush());
                    }
                    let events = self.parser.push(&text);
                    self.push_events(events);
                }
                let events = self.parser.finish();
                self.push_events(events);
                self.queue.push_back(Event::Done(self.generator.stats()));
                self.done = true;
            }
        }
        Ok(())
    }
}

impl Iterator for Stream<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.step() {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}
