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

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde::Serialize;
use step3_engine::{self as engine, Engine, EngineConfig, EngineError, Prompt, Request, RequestHandle};
use step3_model::hub::{self, HubOptions, ModelSource};
use step3_model::{
    Error, ExpertPlacement, FinishReason, Fp8Storage, GenerateOptions, GenerationConfig, ImageSource, Layout,
    LoadOptions, LoadProgress, Message, PreprocessedImage, Result, Sampled, SamplingParams, Stats, Step3Model,
    Step3Tokenizer, ToolCall,
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
    engine: EngineConfig,
    layout: Layout,
    experts: ExpertPlacement,
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

    /// Split the decoder over `layout.tp × layout.ep` ranks (tensor × expert parallelism), one
    /// thread each, on `layout.devices` (CUDA ordinals) or all on the CPU. See
    /// `docs/multi-device.md`; a layout that cannot split the checkpoint fails before loading.
    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Where the routed experts live: with their rank (default), or in host memory computed on
    /// the CPU ([`ExpertPlacement::Host`], or the first K MoE layers only).
    pub fn experts(mut self, placement: ExpertPlacement) -> Self {
        self.experts = placement;
        self
    }

    /// How the engine batches requests and sizes its KV cache (see [`EngineConfig`]).
    pub fn engine(mut self, config: EngineConfig) -> Self {
        self.engine = config;
        self
    }

    /// Resolves the source (downloading what is missing unless offline), checks and loads the
    /// weights, the tokenizer and the chat template, and starts the engine.
    pub fn build(self) -> Result<Step3> {
        let source = match self.source {
            BuilderSource::Spec(s) => ModelSource::parse(&s)?,
            BuilderSource::Dir(d) => ModelSource::Dir(d),
        };
        let dir = hub::resolve(&source, &self.hub)?;
        let opts = LoadOptions {
            dtype: self.dtype.unwrap_or_else(|| default_dtype(&self.device)),
            device: self.device,
            fp8: self.fp8,
            crop_size: self.crop_size,
            progress: self.progress,
            layout: self.layout,
            experts: self.experts,
        };
        Step3::load_dir(&dir, &opts, self.engine)
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
    /// Per token, when `GenerateOptions::logprobs` asked for them.
    pub logprobs: Vec<Sampled>,
    pub stats: Stats,
}

/// Step3, ready to chat: the model with its tokenizer, chat format and generation settings, served
/// by an [`Engine`] (every call below is a request to it, so threads may share one `Step3` and
/// their requests are batched together).
#[derive(Debug)]
pub struct Step3 {
    engine: Engine,
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
            engine: EngineConfig::default(),
            layout: Layout::single(),
            experts: ExpertPlacement::Device,
        }
    }

    /// Loads a local directory and starts its engine. Without `tokenizer.json` the model still
    /// runs on token ids ([`Self::complete`]); chat needs the tokenizer.
    pub fn load_dir(dir: &Path, opts: &LoadOptions, engine: EngineConfig) -> Result<Self> {
        let engine = Engine::load(dir, opts, engine).map_err(|e| match e {
            EngineError::Model(e) => e,
            other => Error::Input(other.to_string()),
        })?;
        Ok(Self { engine, dir: dir.to_path_buf() })
    }

    /// Where the model's files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The engine serving this model (submit requests directly, read its metrics).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn model(&self) -> &Step3Model {
        self.engine.model()
    }

    /// The checkpoint's stop tokens and sampling defaults.
    pub fn generation_config(&self) -> &GenerationConfig {
        self.engine.generation_config()
    }

    /// The tokenizer, or an error saying the checkpoint has none.
    pub fn tokenizer(&self) -> Result<&Step3Tokenizer> {
        self.engine.require_tokenizer()
    }

    /// The prompt text a conversation becomes (with the generation prompt).
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        self.engine.render(&messages.to_vec().into())
    }

    /// Prompt token ids of a conversation, images expanded to their full layouts, and the
    /// preprocessed images in prompt order.
    pub fn prompt(&self, messages: &[Message]) -> Result<(Vec<u32>, Vec<PreprocessedImage>)> {
        let p = self.engine.prepare(&Prompt::Chat(messages.to_vec().into()))?;
        Ok((p.ids, p.images))
    }

    /// Token ids of raw text (no chat template) with `images` filling its `<im_patch>`
    /// placeholders, and the preprocessed images. One `<im_patch>` per image is expanded to the
    /// image's whole layout; text without any gets one per image in front, as a chat message does.
    pub fn encode(&self, text: &str, images: &[ImageSource]) -> Result<(Vec<u32>, Vec<PreprocessedImage>)> {
        let p = self.engine.prepare(&Prompt::Text { text: text.to_string(), images: images.to_vec() })?;
        Ok((p.ids, p.images))
    }

    /// The resolved settings of a request (its own, else the checkpoint's, else the defaults).
    pub fn sampling(&self, opts: &GenerateOptions) -> SamplingParams {
        self.engine.generation_config().sampling(opts)
    }

    fn submit(&self, prompt: Prompt, opts: &GenerateOptions) -> Result<Stream> {
        let handle = self
            .engine
            .submit(Request { prompt, options: opts.clone(), ..Default::default() })
            .map_err(|e| Error::Input(e.to_string()))?;
        Ok(Stream { handle, tokens: Vec::new(), logprobs: Vec::new(), done: false })
    }

    /// Streams the answer to `messages` as [`Event`]s.
    pub fn stream(&self, messages: &[Message], opts: &GenerateOptions) -> Result<Stream> {
        self.submit(Prompt::Chat(messages.to_vec().into()), opts)
    }

    /// Streams a continuation of raw prompt token ids (no chat template), with `images` filling
    /// the prompt's `<im_patch>` placeholders (one per image, or their full layouts). The answer
    /// counts as reasoning when the prompt ends with `<think>`. Without a tokenizer the events
    /// carry no text, only the final [`Event::Done`].
    pub fn stream_ids(&self, ids: &[u32], images: &[ImageSource], opts: &GenerateOptions) -> Result<Stream> {
        self.submit(Prompt::Tokens { ids: ids.to_vec(), images: images.to_vec() }, opts)
    }

    /// Generates a whole answer, calling `on_event` for every piece as it comes; returning
    /// `ControlFlow::Break` from it stops generation.
    pub fn generate_with(
        &self,
        messages: &[Message],
        opts: &GenerateOptions,
        on_event: impl FnMut(&Event) -> ControlFlow<()>,
    ) -> Result<Response> {
        self.stream(messages, opts)?.collect_with(on_event)
    }

    /// Generates a whole answer.
    pub fn generate(&self, messages: &[Message], opts: &GenerateOptions) -> Result<Response> {
        self.generate_with(messages, opts, |_| ControlFlow::Continue(()))
    }

    /// Continues raw text (no chat template; images fill its `<im_patch>` placeholders, or one
    /// each in front when it has none).
    pub fn complete_text(&self, text: &str, images: &[ImageSource], opts: &GenerateOptions) -> Result<Response> {
        self.submit(Prompt::Text { text: text.to_string(), images: images.to_vec() }, opts)?
            .collect_with(|_| ControlFlow::Continue(()))
    }

    /// Continues raw prompt token ids (no chat template; images fill the `<im_patch>`
    /// placeholders).
    pub fn complete(&self, ids: &[u32], images: &[ImageSource], opts: &GenerateOptions) -> Result<Response> {
        self.stream_ids(ids, images, opts)?.collect_with(|_| ControlFlow::Continue(()))
    }
}

/// A generation in progress, yielding [`Event`]s; the last one is [`Event::Done`]. Dropping it
/// cancels the request.
pub struct Stream {
    handle: RequestHandle,
    tokens: Vec<u32>,
    logprobs: Vec<Sampled>,
    done: bool,
}

impl Stream {
    /// Stops after the events already produced (the stream then ends with `Done`, finish
    /// `Cancelled`).
    pub fn cancel(&mut self) {
        self.handle.cancel();
    }

    /// The generated token ids so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Drains the stream into a [`Response`], showing every event to `on_event`.
    pub fn collect_with(mut self, mut on_event: impl FnMut(&Event) -> ControlFlow<()>) -> Result<Response> {
        let (mut text, mut reasoning, mut tool_calls) = (String::new(), String::new(), Vec::new());
        while let Some(event) = self.next() {
            let event = event?;
            let flow = on_event(&event);
            match event {
                Event::Reasoning(s) => reasoning.push_str(&s),
                Event::Text(s) => text.push_str(&s),
                Event::ToolCall(t) => tool_calls.push(t),
                Event::Done(stats) => {
                    let (tokens, logprobs) = (std::mem::take(&mut self.tokens), std::mem::take(&mut self.logprobs));
                    return Ok(Response { text, reasoning, tool_calls, tokens, logprobs, stats });
                }
            }
            if flow.is_break() {
                self.cancel();
            }
        }
        Err(Error::Input("generation ended without its final event".into()))
    }
}

impl Iterator for Stream {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let event = match self.handle.next_blocking() {
                Some(e) => e,
                None => {
                    self.done = true;
                    return Some(Err(Error::Input("the engine stopped before the request finished".into())));
                }
            };
            match event {
                engine::Event::Token(s) => {
                    self.tokens.push(s.token);
                    if s.logprob.is_some() {
                        self.logprobs.push(s);
                    }
                }
                engine::Event::Reasoning(s) => return Some(Ok(Event::Reasoning(s))),
                engine::Event::Content(s) => return Some(Ok(Event::Text(s))),
                engine::Event::ToolCall(t) => return Some(Ok(Event::ToolCall(t))),
                engine::Event::Finished(outcome) => {
                    self.done = true;
                    return Some(match (outcome.finish, outcome.error) {
                        (FinishReason::Error, error) => {
                            Err(Error::Input(error.unwrap_or_else(|| "the request failed".into())))
                        }
                        _ => Ok(Event::Done(outcome.stats)),
                    });
                }
            }
        }
        None
    }
}
