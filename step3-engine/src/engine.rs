//! The engine: requests are prepared on the caller's thread (chat template, tokens, images),
//! then one engine thread runs steps over a shared paged KV cache: schedule, embed (with image
//! features), one forward pass over every scheduled token, sample each sequence with its own
//! settings, stream the events, free what finished.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use step3_model::experts::ExpertLoad;
use step3_model::mfa::PagedSequence;
use step3_model::tokenizer::THINK;
use step3_model::{
    ChatTemplate, Conversation, Error, FinishReason, GenerationConfig, ImageSource, OutputEvent, PreprocessedImage,
    Sampled, Sampler, SamplingParams, Stats, Step3Model, Step3PagedCache, Step3Tokenizer, TextDecoder,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::blocks::BlockPool;
use crate::config::{cuda_free_memory, total_memory, EngineConfig, KvCacheSize};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::request::{Event, Outcome, Prompt, Request, RequestHandle, SubmitError};
use crate::scheduler::{Plan, Scheduler, SchedulerConfig, SeqId, SeqState};

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("invalid engine setting: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] Error),
    #[error("cannot start the engine thread: {0}")]
    Thread(std::io::Error),
}

/// A prompt ready to run: token ids (image layouts expanded), the preprocessed images, and whether
/// the prompt opens the reasoning (ends with `<think>`).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub ids: Vec<u32>,
    pub images: Vec<PreprocessedImage>,
    pub opens_reasoning: bool,
}

/// Messages to the engine thread.
pub(crate) enum Command {
    Add(Box<NewSequence>),
    /// Look at cancellations now.
    Wake,
}

pub(crate) struct NewSequence {
    id: SeqId,
    prepared: Prepared,
    params: SamplingParams,
    max_new_tokens: usize,
    stop: Vec<String>,
    forced: Vec<u32>,
    after_reasoning: Vec<u32>,
    plain: bool,
    ignore_tool_calls: bool,
    tx: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
}

/// What the engine thread and the callers share.
struct Shared {
    model: Step3Model,
    tokenizer: Option<Step3Tokenizer>,
    template: Option<ChatTemplate>,
    generation: GenerationConfig,
    config: EngineConfig,
    num_blocks: usize,
    metrics: Metrics,
    /// The `</think>` token, when the tokenizer has one.
    think_end: Option<u32>,
    /// Requests submitted and not yet scheduled once (for the overload limit).
    waiting: AtomicUsize,
    stop: AtomicBool,
}

/// Serves many requests at once over one model: continuous batching, a paged KV cache with
/// prefix caching, per-request sampling, streaming events. Cheap to share behind an `Arc`.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use step3_engine::{Engine, EngineConfig, Request};
/// use step3_model::{GenerateOptions, Message, Step3Checkpoint, LoadOptions};
/// let dir = std::path::Path::new("path/to/step3");
/// let engine = Engine::load(dir, &LoadOptions::default(), EngineConfig::default())?;
/// let opts = GenerateOptions { max_new_tokens: 64, ..Default::default() };
/// let handle = engine.submit(Request::chat(vec![Message::user("Hello!")], opts))?;
/// for event in handle {
///     if let step3_engine::Event::Content(piece) = event {
///         print!("{piece}");
///     }
/// }
/// # Ok(()) }
/// ```
pub struct Engine {
    shared: Arc<Shared>,
    tx: Sender<Command>,
    thread: Option<JoinHandle<()>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.shared.config)
            .field("kv_blocks", &self.shared.num_blocks)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Loads the checkpoint in `dir` (weights, tokenizer when present, generation settings) and
    /// starts an engine on it.
    pub fn load(
        dir: &std::path::Path,
        opts: &step3_model::LoadOptions,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let ckpt = step3_model::Step3Checkpoint::open(dir)?;
        let tokenizer = if dir.join("tokenizer.json").is_file() { Some(Step3Tokenizer::from_dir(dir)?) } else { None };
        let generation = GenerationConfig::load(dir, ckpt.config(), tokenizer.as_ref())?;
        if let (Some(cfg), Some(tok)) =
            (ckpt.config().image_token_id, tokenizer.as_ref().and_then(|t| t.token_id("<im_patch>")))
        {
            if cfg != tok {
                return Err(Error::key(
                    &ckpt.config().path,
                    "image_token_id",
                    format!("is {cfg}, but the tokenizer's <im_patch> is {tok}"),
                )
                .into());
            }
        }
        let model = ckpt.load(opts)?;
        Self::new(model, tokenizer, generation, config)
    }

    /// Starts the engine thread on a loaded model. Without a tokenizer the engine runs on token
    /// ids and produces no text events.
    pub fn new(
        model: Step3Model,
        tokenizer: Option<Step3Tokenizer>,
        generation: GenerationConfig,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        config.validate().map_err(EngineError::Config)?;
        let text = &model.text;
        let block_bytes = text.paged_block_bytes(config.block_size) as u64;
        let context = text.config().max_position_embedding();
        let most = (config.max_num_seqs * context).div_ceil(config.block_size);
        let num_blocks = match config.kv_cache {
            KvCacheSize::Blocks(n) => n,
            KvCacheSize::Bytes(b) => (b / block_bytes) as usize,
            KvCacheSize::Auto => {
                // Every rank of a split model keeps its own pool: on a GPU each on its own device
                // (sized by the first, which holds the most weights), on the CPU all in one RAM.
                let budget = match cuda_free_memory(text.device()) {
                    Some(free) => free / 10 * 9,
                    None => total_memory().unwrap_or(8 << 30) / 10 / text.num_ranks() as u64,
                };
                ((budget / block_bytes) as usize).min(most)
            }
        };
        if num_blocks == 0 {
            return Err(EngineError::Config(format!(
                "the KV cache holds no block of {} tokens ({block_bytes} bytes each)",
                config.block_size
            )));
        }
        // An explicit size must fit where it goes (an allocation that cannot be met aborts the
        // process): the free memory of the GPU, or this machine's RAM for every rank's pool. (The
        // automatic size is derived from the same figures.)
        let room = match config.kv_cache {
            KvCacheSize::Auto => None,
            _ => match cuda_free_memory(text.device()) {
                Some(free) => Some((free, "free on the GPU")),
                None => total_memory().map(|m| (m / text.num_ranks() as u64, "of RAM per rank")),
            },
        };
        if let Some((room, place)) = room {
            let bytes = (num_blocks as u64).checked_mul(block_bytes);
            if bytes.is_none_or(|b| b > room) {
                return Err(EngineError::Config(format!(
                    "a KV cache of {num_blocks} blocks ({} bytes) does not fit in the {room} bytes {place}",
                    bytes.map_or_else(|| "more than 2^64".to_string(), |b| b.to_string())
                )));
            }
        }
        let cache = text.new_paged_cache(num_blocks, config.block_size)?;
        let template = tokenizer.as_ref().map(ChatTemplate::for_tokenizer).transpose()?;
        let think_end = tokenizer.as_ref().and_then(|t| t.token_id(step3_model::tokenizer::THINK_END));
        let shared = Arc::new(Shared {
            think_end,
            metrics: Metrics::new(num_blocks, config.block_size),
            model,
            tokenizer,
            template,
            generation,
            num_blocks,
            waiting: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            config: config.clone(),
        });
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_batched_tokens: config.max_batched_tokens,
                prefill_chunk: config.prefill_chunk,
                block_size: config.block_size,
                max_prefill_while_decoding: config.max_prefill_while_decoding,
            },
            BlockPool::new(num_blocks, config.prefix_caching),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let expert_load = ExpertLoad::for_model(shared.model.text.config());
        let runner = Runner { shared: shared.clone(), rx, scheduler, cache, active: HashMap::new(), expert_load };
        let thread = std::thread::Builder::new()
            .name("step3-engine".into())
            .spawn(move || runner.run())
            .map_err(EngineError::Thread)?;
        Ok(Self { shared, tx, thread: Some(thread), next_id: AtomicU64::new(1) })
    }

    pub fn model(&self) -> &Step3Model {
        &self.shared.model
    }

    pub fn tokenizer(&self) -> Option<&Step3Tokenizer> {
        self.shared.tokenizer.as_ref()
    }

    pub fn generation_config(&self) -> &GenerationConfig {
        &self.shared.generation
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Blocks in the KV pool.
    pub fn kv_blocks(&self) -> usize {
        self.shared.num_blocks
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.metrics.snapshot()
    }

    /// The tokenizer, or an error saying the checkpoint has none.
    pub fn require_tokenizer(&self) -> Result<&Step3Tokenizer, Error> {
        self.tokenizer().ok_or_else(|| {
            Error::Input("this checkpoint has no tokenizer.json: give token ids, or add the tokenizer files".into())
        })
    }

    /// The prompt text of a conversation (with the generation prompt).
    pub fn render(&self, conversation: &Conversation) -> Result<String, Error> {
        self.require_tokenizer()?;
        match &self.shared.template {
            Some(t) => t.render_conversation(conversation, true),
            None => Err(Error::Input("this checkpoint has no chat template".into())),
        }
    }

    /// Turns a prompt into token ids and preprocessed images (on the calling thread).
    pub fn prepare(&self, prompt: &Prompt) -> Result<Prepared, Error> {
        let model = &self.shared.model;
        let preprocess = |images: &[ImageSource]| {
            images
                .iter()
                .enumerate()
                .map(|(index, i)| model.image(i).map_err(|e| Error::Image { index, error: Box::new(e) }))
                .collect::<Result<Vec<_>, _>>()
        };
        match prompt {
            Prompt::Chat(conv) => {
                let messages = &conv.messages;
                if messages.iter().all(|m| m.text.trim().is_empty() && m.images.is_empty() && m.tool_calls.is_empty()) {
                    return Err(Error::Input("the prompt is empty".into()));
                }
                let text = self.render(conv)?;
                let images: Vec<ImageSource> = messages.iter().flat_map(|m| m.images.iter().cloned()).collect();
                self.encode(&text, preprocess(&images)?)
            }
            Prompt::Prepared(p) => Ok(p.clone()),
            Prompt::Text { text, images } => {
                if text.is_empty() && images.is_empty() {
                    return Err(Error::Input("the prompt is empty".into()));
                }
                let placeholder = "<im_patch>";
                let text = match text.contains(placeholder) || images.is_empty() {
                    true => text.clone(),
                    false => format!("{}{text}", placeholder.repeat(images.len())),
                };
                self.encode(&text, preprocess(images)?)
            }
            Prompt::Tokens { ids, images } => {
                let images = preprocess(images)?;
                let ids = self.expand(ids, &images)?;
                // As for text: the prompt ends with `<think>`, whitespace after it aside (the chat
                // template writes `<think>\n`).
                let opens_reasoning = self.tokenizer().is_some_and(|t| {
                    let Some(think) = t.token_id(THINK) else { return false };
                    let blank = |id: &u32| t.decode(&[*id]).is_ok_and(|s| s.trim().is_empty());
                    ids.iter().rev().take(8).find(|id| **id == think || !blank(id)) == Some(&think)
                });
                Ok(Prepared { ids, images, opens_reasoning })
            }
        }
    }

    fn encode(&self, text: &str, images: Vec<PreprocessedImage>) -> Result<Prepared, Error> {
        let ids = self.require_tokenizer()?.encode(text)?;
        let ids = self.expand(&ids, &images)?;
        Ok(Prepared { ids, images, opens_reasoning: text.trim_end().ends_with(THINK) })
    }

    /// `<im_patch>` tokens in `ids`, and the features `images` give (their full layouts).
    fn patch_counts(&self, ids: &[u32], images: &[PreprocessedImage]) -> Result<(usize, usize), Error> {
        let model = &self.shared.model;
        let patch = model.image_token_id.unwrap_or(u32::MAX);
        let found = ids.iter().filter(|&&t| t == patch).count();
        let layouts = images.iter().map(|i| model.layout(i)).collect::<Result<Vec<_>, _>>()?;
        Ok((found, layouts.iter().map(|l| l.num_features()).sum()))
    }

    /// A prepared prompt holds one `<im_patch>` per feature of its images (none without images).
    fn check_prepared(&self, p: &Prepared) -> Result<(), Error> {
        if p.images.is_empty() {
            return Ok(());
        }
        let (found, want) = self.patch_counts(&p.ids, &p.images)?;
        if found != want {
            return Err(Error::Input(format!(
                "the prepared prompt has {found} <im_patch> tokens, but its {} image(s) give {want} features",
                p.images.len()
            )));
        }
        Ok(())
    }

    /// One `<im_patch>` per image expanded to its layout (full layouts are kept as they are).
    fn expand(&self, ids: &[u32], images: &[PreprocessedImage]) -> Result<Vec<u32>, Error> {
        if images.is_empty() {
            return Ok(ids.to_vec());
        }
        match self.tokenizer() {
            Some(tok) => self.shared.model.expand_placeholders(ids, images, &tok.image_token_ids()?),
            None => {
                // Without a tokenizer the layouts cannot be written out: they must be there already.
                let (found, want) = self.patch_counts(ids, images)?;
                if found != want {
                    return Err(Error::Input(format!(
                        "the prompt has {found} <im_patch> tokens but the images give {want} features; without a \
                         tokenizer the ids must hold the full image layouts"
                    )));
                }
                Ok(ids.to_vec())
            }
        }
    }

    /// Queues a request. Invalid requests (settings, ids, images, a prompt beyond the context, a
    /// request larger than the whole KV pool) are refused here, alone; a full queue is
    /// [`SubmitError::Overloaded`].
    pub fn submit(&self, request: Request) -> Result<RequestHandle, SubmitError> {
        let result = self.try_submit(request);
        if result.is_err() {
            self.shared.metrics.update(|m| m.requests_rejected_total += 1);
        }
        result
    }

    fn try_submit(&self, request: Request) -> Result<RequestHandle, SubmitError> {
        let invalid = |e: Error| SubmitError::Invalid(e.to_string());
        if self.shared.stop.load(Ordering::Relaxed) {
            return Err(SubmitError::Stopped);
        }
        let waiting = self.shared.waiting.load(Ordering::Relaxed);
        if waiting >= self.shared.config.max_waiting {
            return Err(SubmitError::Overloaded { waiting });
        }
        let params = self.shared.generation.sampling(&request.options);
        params.validate().map_err(invalid)?;
        let prepared = match request.prompt {
            Prompt::Prepared(p) => {
                // Made by `prepare`, but perhaps changed since: its placeholders must match its
                // images' features exactly, or the step would fail (with every request in it).
                self.check_prepared(&p).map_err(invalid)?;
                p
            }
            other => self.prepare(&other).map_err(invalid)?,
        };
        let text = &self.shared.model.text;
        if prepared.ids.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        text.check_ids(&prepared.ids).map_err(invalid)?;
        let context = text.config().max_position_embedding();
        let prompt_len = prepared.ids.len();
        if prompt_len >= context {
            return Err(SubmitError::Invalid(format!(
                "the prompt has {prompt_len} tokens, which leaves no room in the model's context of {context} tokens"
            )));
        }
        // Generation ends when the context is full; the last token is never fed back.
        let max_new_tokens = params.max_new_tokens.min(context - prompt_len + 1);
        let positions = prompt_len + max_new_tokens - 1;
        let blocks = positions.div_ceil(self.shared.config.block_size);
        if blocks > self.shared.num_blocks {
            return Err(SubmitError::Invalid(format!(
                "the prompt and max_new_tokens need {positions} token slots ({blocks} KV blocks), more than the \
                 whole KV cache holds ({} blocks of {}): ask for fewer tokens or give the engine a larger cache",
                self.shared.num_blocks, self.shared.config.block_size
            )));
        }
        text.check_ids(&request.forced).map_err(invalid)?;
        text.check_ids(&request.after_reasoning).map_err(invalid)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let seq = NewSequence {
            id,
            prepared,
            params,
            max_new_tokens,
            stop: request.options.stop.clone(),
            forced: request.forced,
            after_reasoning: request.after_reasoning,
            plain: request.plain,
            ignore_tool_calls: request.ignore_tool_calls,
            tx,
            cancel: cancel.clone(),
            submitted: Instant::now(),
        };
        self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Command::Add(Box::new(seq))).is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::Stopped);
        }
        Ok(RequestHandle { id, rx, cancel, prompt_tokens: prompt_len, wake: self.tx.clone() })
    }
}

impl Drop for Engine {
    /// Cancels what is still running and stops the thread.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Command::Wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running request's state on the engine thread.
struct Active {
    tx: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    sampler: Sampler,
    params: SamplingParams,
    /// Tokens to produce next instead of sampling.
    forced: std::collections::VecDeque<u32>,
    /// Forced once the reasoning closes.
    after_reasoning: Vec<u32>,
    max_new_tokens: usize,
    decoder: TextDecoder,
    images: Vec<PreprocessedImage>,
    /// Image features `[n, H]`, computed when a prompt chunk first needs them.
    features: Option<Tensor>,
    /// Prompt positions of `<im_patch>` tokens, in order (feature `k` goes to position `k`).
    patch_positions: Vec<usize>,
    saw_tool_call: bool,
    generated: usize,
    submitted: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    latencies: Vec<Duration>,
}

struct Runner {
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    scheduler: Scheduler,
    cache: Step3PagedCache,
    active: HashMap<SeqId, Active>,
    /// Tokens routed to each expert of each MoE layer since the start.
    expert_load: ExpertLoad,
}

impl Runner {
    fn run(mut self) {
        loop {
            if self.scheduler.is_idle() && !self.shared.stop.load(Ordering::Relaxed) {
                match self.rx.recv() {
                    Ok(cmd) => self.command(cmd),
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.command(cmd);
            }
            if self.shared.stop.load(Ordering::Relaxed) {
                let ids: Vec<SeqId> = self.active.keys().copied().collect();
                for id in ids {
                    self.finish(id, FinishReason::Cancelled, Some("the engine shut down".into()));
                }
                return;
            }
            self.reap_cancelled();
            if self.scheduler.is_idle() {
                self.publish();
                continue;
            }
            let plan = self.scheduler.schedule();
            if plan.items.is_empty() {
                self.unblock();
                continue;
            }
            for item in &plan.items {
                if let Some(a) = self.active.get_mut(&item.id).filter(|a| a.first_scheduled.is_none()) {
                    a.first_scheduled = Some(Instant::now());
                    self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
                }
            }
            match self.execute(&plan) {
                Ok(results) => {
                    // A row that could not be sampled fails its own request only.
                    let mut samples = Vec::with_capacity(results.len());
                    let mut failed = Vec::new();
                    for (id, r) in results {
                        match r {
                            Ok(s) => samples.push((id, s)),
                            Err(e) => failed.push((id, e)),
                        }
                    }
                    let tokens: Vec<(SeqId, u32)> = samples.iter().map(|(id, s)| (*id, s.token)).collect();
                    self.scheduler.complete(&plan, &tokens);
                    let prompt_tokens: usize = plan
                        .items
                        .iter()
                        .filter_map(|i| Some(self.scheduler.get(i.id)?.prompt_len.saturating_sub(i.start).min(i.len)))
                        .sum();
                    self.shared.metrics.tokens(prompt_tokens as u64, samples.len() as u64);
                    for (id, sampled) in samples {
                        self.emit(id, sampled);
                    }
                    for (id, e) in failed {
                        self.finish(id, FinishReason::Error, Some(format!("sampling failed: {e}")));
                    }
                }
                Err(e) => {
                    tracing::warn!("step of {} tokens failed: {e}", plan.num_tokens());
                    for item in &plan.items {
                        self.finish(item.id, FinishReason::Error, Some(format!("the model failed: {e}")));
                    }
                }
            }
            self.publish();
        }
    }

    fn command(&mut self, cmd: Command) {
        let Command::Add(seq) = cmd else { return };
        let seq = *seq;
        let model = &self.shared.model;
        let patch = model.image_token_id;
        let ids = &seq.prepared.ids;
        let patch_positions: Vec<usize> = match (patch, seq.prepared.images.is_empty()) {
            (Some(p), false) => ids.iter().enumerate().filter(|(_, &t)| t == p).map(|(i, _)| i).collect(),
            _ => Vec::new(),
        };
        let extras = image_extras(model, &seq.prepared.images, &patch_positions);
        self.scheduler.add(SeqState::new(seq.id, seq.prepared.ids.clone(), extras));
        let mut forced: std::collections::VecDeque<u32> = seq.forced.into();
        let mut after_reasoning = seq.after_reasoning;
        if !seq.prepared.opens_reasoning || seq.plain {
            forced.extend(after_reasoning.drain(..));
        }
        let decoder = match (seq.plain, seq.ignore_tool_calls) {
            (true, _) => TextDecoder::plain(seq.stop),
            (false, false) => TextDecoder::new(seq.stop, seq.prepared.opens_reasoning),
            (false, true) => TextDecoder::new(seq.stop, seq.prepared.opens_reasoning).without_tool_calls(),
        };
        self.active.insert(
            seq.id,
            Active {
                tx: seq.tx,
                cancel: seq.cancel,
                sampler: seq.params.sampler(),
                decoder,
                params: seq.params,
                forced,
                after_reasoning,
                max_new_tokens: seq.max_new_tokens,
                images: seq.prepared.images,
                features: None,
                patch_positions,
                saw_tool_call: false,
                generated: 0,
                submitted: seq.submitted,
                first_scheduled: None,
                first_token: None,
                last_token: None,
                latencies: Vec::new(),
            },
        );
    }

    /// Ends requests whose handle was cancelled or dropped.
    fn reap_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.cancel.load(Ordering::Relaxed) || a.tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.finish(id, FinishReason::Cancelled, None);
        }
    }

    /// Nothing could be scheduled: the oldest request cannot fit even an empty pool. It fails,
    /// alone (submission checks make this unreachable in practice).
    fn unblock(&mut self) {
        let stuck = self.active.keys().copied().min();
        if let Some(id) = stuck {
            self.finish(id, FinishReason::Error, Some("the request does not fit in the KV cache".into()));
        }
    }

    /// Runs one step: embeddings (with image features), the forward pass, and a sample for every
    /// piece that ends at its sequence's last token (or why that row could not be sampled: its
    /// request alone fails).
    #[allow(clippy::type_complexity)]
    fn execute(&mut self, plan: &Plan) -> Result<Vec<(SeqId, Result<Sampled, Error>)>, Error> {
        let model = &self.shared.model;
        let text = &model.text;
        let device = text.device();
        let mut ids = Vec::with_capacity(plan.num_tokens());
        for item in &plan.items {
            let seq = self.scheduler.get(item.id).ok_or_else(|| Error::Input("unknown sequence".into()))?;
            ids.extend_from_slice(&seq.tokens[item.start..item.start + item.len]);
        }
        let n = ids.len();
        let mut xs = text.embed(&Tensor::new(ids, device)?.unsqueeze(0)?)?.squeeze(0)?;

        // Image features at their placeholder rows.
        let mut feature_parts = Vec::new();
        let mut index: Vec<u32> = (0..n as u32).collect();
        let (mut row, mut extra) = (0usize, 0usize);
        for item in &plan.items {
            let Some(a) = self.active.get_mut(&item.id) else { continue };
            let span = item.start..item.start + item.len;
            let first = a.patch_positions.partition_point(|&p| p < span.start);
            let last = a.patch_positions.partition_point(|&p| p < span.end);
            if first < last {
                if a.features.is_none() {
                    a.features = Some(model.encode_images(&a.images)?);
                }
                let features = a.features.as_ref().ok_or_else(|| Error::Input("no image features".into()))?;
                feature_parts.push(features.narrow(0, first, last - first)?);
                for (k, &p) in a.patch_positions[first..last].iter().enumerate() {
                    index[row + p - span.start] = (n + extra + k) as u32;
                }
                extra += last - first;
            }
            row += item.len;
        }
        if !feature_parts.is_empty() {
            feature_parts.insert(0, xs);
            let all = Tensor::cat(&feature_parts, 0)?;
            xs = all.index_select(&Tensor::new(index, device)?, 0)?;
        }

        let tables: Vec<Vec<u32>> =
            plan.items.iter().map(|i| self.scheduler.get(i.id).map(|s| s.blocks.clone()).unwrap_or_default()).collect();
        let seqs: Vec<PagedSequence> = plan
            .items
            .iter()
            .zip(&tables)
            .map(|(i, t)| PagedSequence { block_table: t, context_len: i.start, new_tokens: i.len })
            .collect();
        let step = text.paged_step(&seqs, &self.cache)?;
        let mut trace = Vec::new();
        let hidden = text.forward_paged(&xs, &step, &mut self.cache, Some(&mut trace))?;
        for r in &trace {
            self.expert_load.record(r)?;
        }

        let mut rows = Vec::new();
        let mut owners = Vec::new();
        let mut offset = 0;
        for item in &plan.items {
            if item.sample {
                rows.push((offset + item.len - 1) as u32);
                owners.push(item.id);
            }
            offset += item.len;
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let logits = text.logits(&hidden.index_select(&Tensor::new(rows, device)?, 0)?)?.to_vec2::<f32>()?;
        let mut out = Vec::with_capacity(owners.len());
        for (id, row) in owners.into_iter().zip(logits) {
            let (Some(a), Some(seq)) = (self.active.get_mut(&id), self.scheduler.get(id)) else { continue };
            let sampled = match a.forced.pop_front() {
                Some(token) => Ok(a.sampler.force(&row, token)),
                None => a.sampler.sample(&row, &seq.tokens),
            };
            out.push((id, sampled));
        }
        Ok(out)
    }

    /// Sends a new token's events and ends the request when it should stop.
    fn emit(&mut self, id: SeqId, sampled: Sampled) {
        let context = self.shared.model.text.config().max_position_embedding();
        let total = self.scheduler.get(id).map_or(0, |s| s.tokens.len());
        let tokenizer = self.shared.tokenizer.as_ref();
        let Some(a) = self.active.get_mut(&id) else { return };
        let now = Instant::now();
        match a.last_token {
            None => {
                a.first_token = Some(now);
                self.shared.metrics.update(|m| m.time_to_first_token.observe(now - a.submitted));
            }
            Some(last) => {
                a.latencies.push(now - last);
                self.shared.metrics.update(|m| m.inter_token_latency.observe(now - last));
            }
        }
        a.last_token = Some(now);
        a.generated += 1;
        let token = sampled.token;
        let _ = a.tx.send(Event::Token(sampled));
        if !a.after_reasoning.is_empty() && Some(token) == self.shared.think_end {
            let next = std::mem::take(&mut a.after_reasoning);
            a.forced.extend(next);
        }
        let mut finish = None;
        if a.params.stop_token_ids.contains(&token) {
            finish = Some(if a.saw_tool_call { FinishReason::ToolCalls } else { FinishReason::Stop(token) });
        } else if let Some(tok) = tokenizer {
            match a.decoder.push(tok, token) {
                Ok(events) => send_text(a, events),
                Err(e) => {
                    self.finish(id, FinishReason::Error, Some(e.to_string()));
                    return;
                }
            }
            if a.decoder.hit_stop_string() {
                finish = Some(FinishReason::StopString);
            }
        }
        if finish.is_none() {
            if a.generated >= a.params.max_new_tokens {
                finish = Some(FinishReason::Length);
            } else if a.generated >= a.max_new_tokens || total > context {
                // The budget was clamped to the context, and the context is now full.
                finish = Some(FinishReason::Context);
            }
        }
        if let Some(reason) = finish {
            self.finish(id, reason, None);
        }
    }

    /// Ends a request: flushes its text (unless cancelled or failed), sends the outcome, frees
    /// its blocks.
    fn finish(&mut self, id: SeqId, mut reason: FinishReason, error: Option<String>) {
        let seq = self.scheduler.remove(id);
        let Some(mut a) = self.active.remove(&id) else { return };
        if a.first_scheduled.is_none() {
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        if !matches!(reason, FinishReason::Cancelled | FinishReason::Error) {
            if let Some(tok) = self.shared.tokenizer.as_ref() {
                match a.decoder.finish(tok) {
                    Ok(events) => send_text(&mut a, events),
                    Err(e) => {
                        let _ = a.tx.send(Event::Content(String::new()));
                        tracing::warn!("request {id}: detokenizing the end failed: {e}");
                    }
                }
            }
            if matches!(reason, FinishReason::Stop(_)) && a.saw_tool_call {
                reason = FinishReason::ToolCalls;
            }
        }
        let first_token = a.first_token.unwrap_or_else(Instant::now);
        let stats = Stats {
            prompt_tokens: seq.as_ref().map_or(0, |s| s.prompt_len),
            cached_prompt_tokens: seq.as_ref().map_or(0, |s| s.cached_prompt_tokens),
            generated_tokens: a.generated,
            prefill_time: a.first_scheduled.map_or(Duration::ZERO, |s| first_token.saturating_duration_since(s)),
            decode_time: a.last_token.map_or(Duration::ZERO, |l| l.saturating_duration_since(first_token)),
            time_to_first_token: a.first_token.map_or(Duration::ZERO, |f| f - a.submitted),
            token_latencies: std::mem::take(&mut a.latencies),
            finish: reason,
        };
        let label = finish_label(reason);
        let _ = a.tx.send(Event::Finished(Outcome { finish: reason, error, stats }));
        self.shared.metrics.update(|m| *m.requests_total.entry(label.to_string()).or_default() += 1);
    }

    /// Publishes the gauges after a step.
    fn publish(&self) {
        let s = &self.scheduler;
        let (queries, hits) = s.prefix_cache_counts();
        self.shared.metrics.update(|m| {
            m.waiting = s.num_waiting();
            m.running = s.num_running();
            m.preemptions_total = s.preemptions();
            m.kv_blocks_used = s.pool().num_blocks() - s.pool().num_free();
            m.prefix_cache_queries_total = queries;
            m.prefix_cache_hits_total = hits;
            m.expert_load = self
                .expert_load
                .layers()
                .iter()
                .map(|&l| (l, self.expert_load.counts(l).unwrap_or_default().to_vec()))
                .collect();
        });
    }
}

fn send_text(a: &mut Active, events: Vec<OutputEvent>) {
    for e in events {
        let event = match e {
            OutputEvent::Reasoning(s) => Event::Reasoning(s),
            OutputEvent::Content(s) => Event::Content(s),
            OutputEvent::ToolCall(t) => {
                a.saw_tool_call = true;
                Event::ToolCall(t)
            }
        };
        let _ = a.tx.send(event);
    }
}

/// The OpenAI-style name of a finish reason.
pub fn finish_label(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop(_) | FinishReason::StopString => "stop",
        FinishReason::Length | FinishReason::Context => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::Cancelled => "cancelled",
        FinishReason::Error => "error",
    }
}

/// Prefix-cache keys of a request's images: the token range each image's features fill, and a
/// digest of its pixels, so equal token ids with other images never share blocks.
fn image_extras(model: &Step3Model, images: &[PreprocessedImage], patches: &[usize]) -> Vec<(Range<usize>, u64)> {
    use std::hash::{Hash, Hasher};
    let mut out = Vec::new();
    let mut next = 0;
    for img in images {
        let n = model.layout(img).map(|l| l.num_features()).unwrap_or(0);
        let Some(span) = patches.get(next..next + n) else { break };
        let (Some(&first), Some(&last)) = (span.first(), span.last()) else { continue };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        img.global_u8.as_raw().hash(&mut h);
        img.canvas_u8.as_ref().map(|c| c.as_raw()).hash(&mut h);
        img.newline_mask.hash(&mut h);
        out.push((first..last + 1, h.finish()));
        next += n;
    }
    out
}
