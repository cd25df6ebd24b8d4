//! The engine is exact: every request gets the same tokens and the same log-probabilities (f32,
//! within 1e-5 relative) whether it runs alone or among many requests of different lengths that
//! join at different steps, with preemption forced by a tiny KV pool, with prefix-cache hits, with
//! chunked prefill at several chunk sizes and with a multimodal request in the batch. The golden
//! tokens of the reference come out through it. Bad requests fail alone; the pool ends 100 % free.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use step3_engine::{Completion, Engine, EngineConfig, Event, KvCacheSize, Request, RequestHandle, SubmitError};
use step3_model::sampling::log_softmax;
use step3_model::{FinishReason, GenerateOptions, GenerationConfig, ImageSource, LoadOptions, Step3Checkpoint};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/step3-tiny")
}

fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("vl-f32/golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The images of the multimodal golden, in prompt order.
fn mm_images(g: &serde_json::Value) -> Vec<ImageSource> {
    g["mm"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| ImageSource::File(fixtures().join(format!("images/{}.png", n.as_str().unwrap()))))
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// An engine over the f32 tiny checkpoint (no tokenizer: token ids in, token ids out).
fn engine(config: EngineConfig) -> Engine {
    engine_with(config, LoadOptions::default())
}

/// [`engine`] with the layout and expert placement of `opts`.
fn engine_with(config: EngineConfig, opts: LoadOptions) -> Engine {
    let dir = fixtures().join("vl-f32");
    let ckpt = Step3Checkpoint::open(&dir).unwrap();
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, crop_size: Some(40), ..opts };
    let model = ckpt.load(&opts).unwrap();
    let generation = GenerationConfig::load(&dir, ckpt.config(), None).unwrap();
    Engine::new(model, None, generation, config).unwrap()
}

const VOCAB: usize = 320;

/// Greedy, `n` tokens, the whole distribution of every token returned.
fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        temperature: Some(0.0),
        max_new_tokens: n,
        ignore_eos: true,
        logprobs: Some(VOCAB),
        ..Default::default()
    }
}

/// The log-probabilities of every token of every step, in token-id order.
fn distributions(c: &Completion) -> Vec<Vec<f32>> {
    c.logprobs
        .iter()
        .map(|s| {
            let mut row = vec![0f32; VOCAB];
            for t in &s.top {
                row[t.token as usize] = t.logprob;
            }
            row
        })
        .collect()
}

fn relative_error(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        let scale = y.iter().map(|v| v.abs() as f64).fold(0.0, f64::max).max(1e-30);
        let diff = x.iter().zip(y).map(|(p, q)| (p - q).abs() as f64).fold(0.0, f64::max);
        worst = worst.max(diff / scale);
    }
    worst
}

/// A prompt of `len` token ids (deterministic, different per `seed`).
fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 7 + seed * 13 + 5) % 300 + 10).collect()
}

fn run_alone(engine: &Engine, req: Request) -> Completion {
    engine.submit(req).unwrap().wait()
}

#[test]
fn golden_tokens_and_logits_through_the_engine() {
    let g = golden();
    let e = engine(EngineConfig::default());
    let goldens = candle_core::safetensors::load(fixtures().join("vl-f32/golden.safetensors"), &Device::Cpu).unwrap();
    for seq in ["text.seq0", "text.seq1"] {
        let want = ids(&g[seq]["greedy_tokens"]);
        let c = run_alone(&e, Request::tokens(ids(&g[seq]["input_ids"]), greedy(want.len())));
        assert_eq!(c.tokens, want, "{seq}");
        assert_eq!(c.outcome.finish, FinishReason::Length);
        // The first token's distribution is the reference's last prefill logits, normalised.
        let logits: Tensor = goldens[&format!("{seq}.prefill_logits")].clone();
        let last = logits.get(logits.dim(0).unwrap() - 1).unwrap().to_vec1::<f32>().unwrap();
        let err = relative_error(&distributions(&c)[..1], &[log_softmax(&last)]);
        assert!(err < 1e-4, "{seq}: {err}");
    }
    // The multimodal golden: two images, their layouts in the ids.
    let images = mm_images(&g);
    let want = ids(&g["mm"]["greedy_tokens"]);
    let req = Request {
        prompt: step3_engine::Prompt::Tokens { ids: ids(&g["mm"]["input_ids"]), images },
        options: greedy(want.len()),
        ..Default::default()
    };
    assert_eq!(run_alone(&e, req).tokens, want);
}

/// The requests of the batched tests: different lengths, one multimodal, one sharing another's
/// prompt (a prefix-cache hit), one seeded sampler.
fn mixed_requests() -> Vec<Request> {
    let g = golden();
    let mut reqs: Vec<Request> = [3usize, 17, 40, 5, 64, 9, 33, 1]
        .iter()
        .enumerate()
        .map(|(i, &len)| Request::tokens(prompt(len, i as u32), greedy(6 + i % 4)))
        .collect();
    let images = mm_images(&g);
    reqs.push(Request {
        prompt: step3_engine::Prompt::Tokens { ids: ids(&g["mm"]["input_ids"]), images },
        options: greedy(5),
        ..Default::default()
    });
    reqs.push(Request::tokens(prompt(40, 2), greedy(7)));
    let sampled = GenerateOptions {
        temperature: Some(0.9),
        top_p: Some(0.95),
        seed: 77,
        max_new_tokens: 8,
        ignore_eos: true,
        logprobs: Some(VOCAB),
        ..Default::default()
    };
    reqs.push(Request::tokens(prompt(21, 9), sampled));
    reqs
}

/// Submits the requests in waves (each wave after the previous one produced a token), collects
/// them all.
fn run_staggered(engine: &Engine, reqs: &[Request]) -> Vec<Completion> {
    let mut handles: Vec<RequestHandle> = Vec::new();
    let mut firsts: Vec<Vec<Event>> = Vec::new();
    for wave in reqs.chunks(4) {
        for r in wave {
            handles.push(engine.submit(r.clone()).unwrap());
            firsts.push(Vec::new());
        }
        // Let the wave start: wait for its first token.
        let i = handles.len() - 1;
        while let Some(e) = handles[i].next_blocking() {
            let token = matches!(e, Event::Token(_) | Event::Finished(_));
            firsts[i].push(e);
            if token {
                break;
            }
        }
    }
    handles
        .into_iter()
        .zip(firsts)
        .map(|(mut h, early)| {
            let mut done = early.iter().any(|e| matches!(e, Event::Finished(_)));
            let mut c = Completion::from_events(early);
            while !done {
                match h.next_blocking() {
                    Some(e) => done = c.push(e),
                    None => break,
                }
            }
            c
        })
        .collect()
}

fn assert_same(alone: &[Completion], batched: &[Completion], what: &str) {
    for (i, (a, b)) in alone.iter().zip(batched).enumerate() {
        assert_eq!(a.tokens, b.tokens, "{what}: request {i}");
        let err = relative_error(&distributions(b), &distributions(a));
        assert!(err <= 1e-5, "{what}: request {i}: log-probabilities differ by {err:e}");
    }
}

fn wait_idle(engine: &Engine) {
    let start = Instant::now();
    loop {
        let m = engine.metrics();
        if m.running == 0 && m.waiting == 0 && m.kv_blocks_used == 0 {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "engine never went idle: {m:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn batched_paged_preempted_cached_and_chunked_runs_equal_the_single_runs() {
    let reqs = mixed_requests();
    let solo = engine(EngineConfig { max_num_seqs: 1, prefix_caching: false, ..Default::default() });
    let alone: Vec<Completion> = reqs.iter().map(|r| run_alone(&solo, r.clone())).collect();
    for c in &alone {
        assert!(matches!(c.outcome.finish, FinishReason::Length), "{:?}", c.outcome);
    }
    drop(solo);

    let configs = [
        ("batched", EngineConfig::default()),
        // 20 blocks of 8 slots: far fewer than the requests need together, so sequences are
        // preempted and recomputed.
        ("preempted", EngineConfig { kv_cache: KvCacheSize::Blocks(20), block_size: 8, ..Default::default() }),
        ("chunk 3", EngineConfig { prefill_chunk: 3, block_size: 4, ..Default::default() }),
        ("chunk 7, budget 16", EngineConfig { prefill_chunk: 7, max_batched_tokens: 16, ..Default::default() }),
        ("no prefix cache", EngineConfig { prefix_caching: false, ..Default::default() }),
    ];
    for (what, cfg) in configs {
        let e = engine(cfg);
        let batched = run_staggered(&e, &reqs);
        assert_same(&alone, &batched, what);
        wait_idle(&e);
        let m = e.metrics();
        if what == "preempted" {
            assert!(m.preemptions_total > 0, "{what}: nothing was preempted: {m:?}");
        }
        if what == "batched" {
            // Request 9 repeats request 2's prompt: its full blocks came from the cache.
            assert!(batched[9].outcome.stats.cached_prompt_tokens >= 32, "{:?}", batched[9].outcome.stats);
            assert!(m.prefix_cache_hits_total >= 32);
        }
    }
}

/// The engine schedules once and every rank runs the same step: a tensor × expert parallel model
/// (2 × 2 ranks on threads, routed experts of the first MoE layer in host memory) gives the
/// tokens and log-probabilities of the unsharded model, for a staggered batch of mixed requests
/// (a multimodal one, a prefix-cache hit, a seeded sampler) with chunked prefill.
#[test]
fn a_sharded_model_through_the_engine_equals_the_unsharded_one() {
    let reqs = mixed_requests();
    let cfg = || EngineConfig { prefill_chunk: 7, block_size: 4, ..Default::default() };
    let whole = engine(cfg());
    let want = run_staggered(&whole, &reqs);
    drop(whole);
    let layout = step3_model::Layout::new(2, 2, None).unwrap();
    let opts = LoadOptions { layout, experts: step3_model::ExpertPlacement::HostFirst(1), ..Default::default() };
    let sharded = engine_with(cfg(), opts);
    let got = run_staggered(&sharded, &reqs);
    assert_same(&want, &got, "tp 2 × ep 2");
    wait_idle(&sharded);
}

#[test]
fn a_seeded_request_samples_the_same_alone_or_batched() {
    let e = engine(EngineConfig::default());
    let opts =
        GenerateOptions { temperature: Some(1.0), seed: 5, max_new_tokens: 12, ignore_eos: true, ..Default::default() };
    let alone = run_alone(&e, Request::tokens(prompt(11, 4), opts.clone())).tokens;
    let mut others: Vec<RequestHandle> =
        (0..6).map(|i| e.submit(Request::tokens(prompt(5 + i, 20 + i as u32), opts.clone())).unwrap()).collect();
    let batched = e.submit(Request::tokens(prompt(11, 4), opts.clone())).unwrap().wait().tokens;
    assert_eq!(alone, batched);
    let other_seed = GenerateOptions { seed: 6, ..opts };
    assert_ne!(alone, run_alone(&e, Request::tokens(prompt(11, 4), other_seed)).tokens);
    others.iter_mut().for_each(|h| while h.next_blocking().is_some() {});
}

#[test]
fn bad_requests_fail_alone_and_the_pool_ends_free() {
    let e = engine(EngineConfig { kv_cache: KvCacheSize::Blocks(64), ..Default::default() });
    let good: Vec<RequestHandle> =
        (0..4).map(|i| e.submit(Request::tokens(prompt(9, i), greedy(20))).unwrap()).collect();
    let bad = |opts: GenerateOptions, ids: Vec<u32>| match e.submit(Request::tokens(ids, opts)) {
        Err(SubmitError::Invalid(msg)) => msg,
        other => panic!("accepted: {other:?}"),
    };
    assert!(bad(GenerateOptions { temperature: Some(-1.0), ..greedy(4) }, vec![1, 2]).contains("temperature"));
    assert!(bad(GenerateOptions { top_p: Some(0.0), ..greedy(4) }, vec![1, 2]).contains("top-p"));
    assert!(bad(greedy(4), vec![1, 999]).contains("outside the vocabulary"));
    assert!(bad(greedy(4), vec![]).contains("empty"));
    assert!(bad(greedy(4), vec![7; 4096]).contains("no room in the model's context of 4096"));
    assert!(bad(greedy(2000), prompt(10, 1)).contains("more than the whole KV cache holds"));
    // Settings that pass as numbers but cannot be sampled with (a temperature that is 0 in f32, a
    // penalty whose inverse overflows) are refused here, not left to fail a whole step.
    let sampled = GenerateOptions { temperature: Some(1e-46), top_k: None, ..greedy(4) };
    assert!(bad(sampled, vec![1, 2]).contains("too small"));
    assert!(bad(GenerateOptions { repetition_penalty: 1e-40, ..greedy(4) }, vec![1, 2]).contains("repetition"));
    // A prepared prompt whose placeholders no longer match its image's features.
    let g = golden();
    let mut prepared =
        e.prepare(&step3_engine::Prompt::Tokens { ids: ids(&g["mm"]["input_ids"]), images: mm_images(&g) }).unwrap();
    prepared.ids.extend(std::iter::repeat_n(e.model().image_token_id.unwrap(), 3));
    let req = Request { prompt: step3_engine::Prompt::Prepared(prepared), options: greedy(2), ..Default::default() };
    match e.submit(req) {
        Err(SubmitError::Invalid(msg)) => assert!(msg.contains("features"), "{msg}"),
        other => panic!("accepted: {other:?}"),
    }
    // A cancelled request and a dropped one end (and free their blocks) at the next step.
    let cancelled = e.submit(Request::tokens(prompt(30, 7), greedy(500))).unwrap();
    cancelled.cancel();
    let dropped = e.submit(Request::tokens(prompt(31, 8), greedy(500))).unwrap();
    drop(dropped);
    let c = cancelled.wait();
    assert_eq!(c.outcome.finish, FinishReason::Cancelled);
    for h in good {
        let c = h.wait();
        assert_eq!((c.tokens.len(), c.outcome.finish), (20, FinishReason::Length));
    }
    // The dropped handle's request may still be on its way to the engine thread.
    let start = Instant::now();
    while e.metrics().requests_total.get("cancelled") != Some(&2) {
        assert!(start.elapsed() < Duration::from_secs(30), "{:?}", e.metrics().requests_total);
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_idle(&e);
    let m = e.metrics();
    assert_eq!(m.kv_blocks_used, 0);
    assert_eq!(m.requests_rejected_total, 9);
    assert_eq!(m.requests_total.get("length"), Some(&4));
    assert_eq!(m.requests_total.get("cancelled"), Some(&2));
    assert!(m.time_to_first_token.count >= 4 && m.inter_token_latency.count >= 4 * 19);
    // Routing balance: every computed token went to top-k experts of every MoE layer.
    let cfg = e.model().text.config();
    assert_eq!(m.expert_load.iter().map(|(l, _)| *l).collect::<Vec<_>>(), cfg.moe_layers_enum);
    let routed: Vec<u64> = m.expert_load.iter().map(|(_, c)| c.iter().sum()).collect();
    assert!(routed.iter().all(|&r| r == routed[0] && r > 0 && r % cfg.moe_top_k as u64 == 0), "{routed:?}");
}

/// An explicit KV cache larger than the machine can hold is a configuration error, not an abort.
#[test]
fn an_impossible_kv_cache_is_a_config_error() {
    for size in [KvCacheSize::Blocks(1 << 40), KvCacheSize::Blocks(usize::MAX), KvCacheSize::Bytes(u64::MAX)] {
        let dir = fixtures().join("vl-f32");
        let ckpt = Step3Checkpoint::open(&dir).unwrap();
        let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, ..Default::default() };
        let model = ckpt.load(&opts).unwrap();
        let generation = GenerationConfig::load(&dir, ckpt.config(), None).unwrap();
        match Engine::new(model, None, generation, EngineConfig { kv_cache: size, ..Default::default() }) {
            Err(step3_engine::EngineError::Config(msg)) => assert!(msg.contains("does not fit"), "{msg}"),
            Err(other) => panic!("{size:?}: {other}"),
            Ok(_) => panic!("{size:?} accepted"),
        }
    }
}

#[test]
fn the_queue_is_bounded() {
    let e = engine(EngineConfig { max_num_seqs: 1, max_waiting: 2, ..Default::default() });
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..8 {
        match e.submit(Request::tokens(prompt(5, i), greedy(300))) {
            Ok(h) => held.push(h),
            Err(SubmitError::Overloaded { .. }) => refused += 1,
            Err(other) => panic!("{other}"),
        }
    }
    assert!(refused >= 4, "{refused} refused");
    drop(held);
    wait_idle(&e);
}

#[test]
fn streams_work_in_async_code() {
    let e = engine(EngineConfig::default());
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut handle = e.submit(Request::tokens(prompt(8, 1), greedy(5))).unwrap();
    let events = rt.block_on(async {
        let mut events = Vec::new();
        while let Some(ev) = handle.next_event().await {
            events.push(ev);
        }
        events
    });
    assert_eq!(events.iter().filter(|e| matches!(e, Event::Token(_))).count(), 5);
    assert!(matches!(events.last(), Some(Event::Finished(_))));
}

#[test]
fn forced_tokens_come_first_then_the_model_goes_on() {
    let e = engine(EngineConfig::default());
    let mut req = Request::tokens(prompt(5, 1), greedy(6));
    req.forced = vec![11, 12, 13];
    let c = run_alone(&e, req);
    assert_eq!((&c.tokens[..3], c.tokens.len()), (&[11u32, 12, 13][..], 6));
    // What follows is what the model says after the prompt and the forced tokens.
    let cont = run_alone(&e, Request::tokens([prompt(5, 1), vec![11, 12, 13]].concat(), greedy(3)));
    assert_eq!(&c.tokens[3..], &cont.tokens[..]);
    let err = relative_error(&distributions(&c)[3..], &distributions(&cont));
    assert!(err <= 1e-5, "{err}");
}
