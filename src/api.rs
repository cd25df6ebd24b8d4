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
    ChatTemplate, Error, FinishReason, Fp8Storage, GenerateOptions, GenerationConfig, Generator, LoadOptions,
    LoadProgress, Message, OutputEvent, PreprocessedImage, Result, SamplingParams, Stats, Step3Checkpoint, Step3Model,
    Step3Tokenizer, TextDecoder, ToolCall,
};

use crate::{DType, Device};

/// Builds a [`Step3`] from a repo id or a directory.
#[derive(Debug, Clone)]
pub struct Step3Builder {
    source: BuilderSource,
    device: Device,
    dtype: Option<DType>,
    fp8: Fp8Storage,
    crop_size: Option<usize>,
    hub: HubOptions,
    progress: Option<LoadProgress>,
}

/// What a builder loads: a string to parse (repo id or path) or a directory.
#[derive(Debug, Clone)]
enum BuilderSource {
    Spec(String),
    Dir(PathBuf),
}

impl Step3Builder {
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Compute dtype: f32, bf16 or f16. Default: the fastest exact one for the device, see
    /// [`default_dtype`].
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
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
        let source = match self.source {
            BuilderSource::Spec(s) => ModelSource::parse(&s)?,
            BuilderSource::Dir(d) => ModelSource::Dir(d),
        };
        let dir = hub::resolve(&source, &self.hub)?;
        Step3::load_dir(
            &dir,
            &LoadOptions {
                dtype: self.dtype.unwrap_or_else(|| default_dtype(&self.device)),
                device: self.device,
                fp8: self.fp8,
                crop_size: self.crop_size,
                progress: self.progress,
            },
        )
    }
}

/// The compute dtype used when none is given: f32 on the CPU (candle's fastest exact CPU dtype
/// until bf16 CPU kernels catch up), bf16 on CUDA.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
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

/// Step3, ready to chat: the model, its tokenizer and chat format, and its generation settings.
#[derive(Debug)]
pub struct Step3 {
    model: Step3Model,
    /// `None` for a checkpoint without `tokenizer.json` (token ids in, token ids out).
    tokenizer: Option<Step3Tokenizer>,
    template: Option<ChatTemplate>,
    generation: GenerationConfig,
    dir: PathBuf,
}

impl Step3 {
    /// Starts a builder for a repo id (`stepfun-ai/step3`, `owner/name@revision`) or a directory
    /// (a source that looks like a path is never sent to the hub).
    pub fn from_pretrained(source: impl Into<String>) -> Step3Builder {
        Self::builder(BuilderSource::Spec(source.into()))
    }

    /// Starts a builder for a local model directory (e.g. [`crate::demo::demo_dir`]).
    pub fn from_dir(dir: impl Into<PathBuf>) -> Step3Builder {
        Self::builder(BuilderSource::Dir(dir.into()))
    }

    fn builder(source: BuilderSource) -> Step3Builder {
        Step3Builder {
            source,
            device: Device::Cpu,
            dtype: None,
            fp8: Fp8Storage::Compact,
            crop_size: None,
            hub: HubOptions::from_env(),
            progress: None,
        }
    }

    /// Loads a local directory. Without `tokenizer.json` the model still runs on token ids
    /// ([`Self::complete`]); chat needs the tokenizer.
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let ckpt = Step3Checkpoint::open(dir)?;
        let tokenizer = if dir.join("tokenizer.json").is_file() { Some(Step3Tokenizer::from_dir(dir)?) } else { None };
        let template = tokenizer.as_ref().map(ChatTemplate::for_tokenizer).transpose()?;
        let generation = GenerationConfig::load(dir, ckpt.config(), tokenizer.as_ref())?;
        // Image markers must agree between the tokenizer and config.json.
        let image_id = ckpt.config().image_token_id;
        if let (Some(cfg), Some(tok)) = (image_id, tokenizer.as_ref().and_then(|t| t.token_id("<im_patch>"))) {
            if cfg != tok {
                return Err(Error::key(
                    &ckpt.config().path,
                    "image_token_id",
                    format!("is {cfg}, but the tokenizer's <im_patch> is {tok}"),
                ));
            }
        }
        let model = ckpt.load(opts)?;
        Ok(Self { model, tokenizer, template, generation, dir: dir.to_path_buf() })
    }

    /// Where the model's files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn model(&self) -> &Step3Model {
        &self.model
    }

    /// The checkpoint's stop tokens and sampling defaults.
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// The tokenizer, or an error naming the missing file.
    pub fn tokenizer(&self) -> Result<&Step3Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Input(format!(
                "{} has no tokenizer.json: give token ids, or add the checkpoint's tokenizer files",
                self.dir.display()
            ))
        })
    }

    /// The prompt text a conversation becomes (with the generation prompt).
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        self.tokenizer()?;
        match &self.template {
            Some(t) => t.render(messages, true),
            None => Err(Error::Input("this checkpoint has no chat template".into())),
        }
    }

    /// Prompt token ids of a conversation, images expanded to their full layouts, and the
    /// preprocessed images in prompt order.
    pub fn prompt(&self, messages: &[Message]) -> Result<(Vec<u32>, Vec<PreprocessedImage>)> {
        let (ids, images, _) = self.prepare(messages)?;
        Ok((ids, images))
    }

    /// [`Self::prompt`], and whether the rendered prompt opens the reasoning (ends in `<think>`).
    fn prepare(&self, messages: &[Message]) -> Result<(Vec<u32>, Vec<PreprocessedImage>, bool)> {
        if messages.iter().all(|m| m.text.trim().is_empty() && m.images.is_empty()) {
            return Err(Error::Input("the prompt is empty".into()));
        }
        let text = self.render(messages)?;
        let (ids, images) = self.encode(&text, messages.iter().flat_map(|m| &m.images))?;
        Ok((ids, images, text.trim_end().ends_with(step3_model::tokenizer::THINK)))
    }

    /// Token ids of raw text (no chat template) with `images` filling its `<im_patch>`
    /// placeholders, and the preprocessed images. One `<im_patch>` per image is expanded to the
    /// image's whole layout; text without any gets one per image in front, as a chat message does.
    pub fn encode<'p>(
        &self,
        text: &str,
        images: impl IntoIterator<Item = &'p PathBuf>,
    ) -> Result<(Vec<u32>, Vec<PreprocessedImage>)> {
        let tok = self.tokenizer()?;
        let images = images.into_iter().map(|p| self.model.load_image(p)).collect::<Result<Vec<_>>>()?;
        if images.is_empty() {
            return Ok((tok.encode(text)?, images));
        }
        const PLACEHOLDER: &str = "<im_patch>";
        let ids = match text.contains(PLACEHOLDER) {
            true => tok.encode(text)?,
            false => tok.encode(&format!("{}{text}", PLACEHOLDER.repeat(images.len())))?,
        };
        let ids = self.model.expand_placeholders(&ids, &images, &tok.image_token_ids()?)?;
        Ok((ids, images))
    }

    /// The resolved settings of a request (its own, else the checkpoint's, else the defaults).
    pub fn sampling(&self, opts: &GenerateOptions) -> SamplingParams {
        self.generation.sampling(opts)
    }

    /// Streams the answer to `messages` as [`Event`]s.
    pub fn stream<'a>(&'a self, messages: &[Message], opts: &GenerateOptions) -> Result<Stream<'a>> {
        let (ids, images, opens_reasoning) = self.prepare(messages)?;
        self.stream_ids(&ids, &images, opens_reasoning, opts)
    }

    /// Streams a continuation of raw prompt token ids (no chat template), with `images` filling
    /// the prompt's `<im_patch>` placeholders. `opens_reasoning`: the prompt ends inside `<think>`.
    /// Without a tokenizer the events carry no text, only the final [`Event::Done`].
    pub fn stream_ids<'a>(
        &'a self,
        ids: &[u32],
        images: &[PreprocessedImage],
        opens_reasoning: bool,
        opts: &GenerateOptions,
    ) -> Result<Stream<'a>> {
        let params = self.sampling(opts);
        params.validate()?;
        let embeds = self.model.embed(ids, images)?;
        let generator = Generator::new(&self.model.text, ids, Some(embeds), &params)?;
        Ok(Stream {
            owner: self,
            generator,
            decoder: TextDecoder::new(opts.stop.clone(), opens_reasoning),
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

/// A generation in progress, yielding [`Event`]s; the last one is [`Event::Done`].
pub struct Stream<'a> {
    owner: &'a Step3,
    generator: Generator<'a>,
    decoder: TextDecoder,
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
        let tok = self.owner.tokenizer.as_ref();
        match (self.generator.next_token()?, tok) {
            (Some(id), _) if matches!(self.generator.finish_reason(), Some(FinishReason::Stop(s)) if s == id) => {}
            (Some(id), Some(tok)) => {
                let events = self.decoder.push(tok, id)?;
                self.push_events(events);
                if self.decoder.hit_stop_string() {
                    self.generator.stop(FinishReason::StopString);
                }
            }
            (Some(_), None) => {}
            (None, tok) => {
                if let Some(tok) = tok {
                    let events = self.decoder.finish(tok)?;
                    self.push_events(events);
                }
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
