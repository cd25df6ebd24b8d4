//! What the engine counts, for a server to export: queue sizes, KV blocks, prefix-cache hits,
//! token totals and rates, time to first token and inter-token latency distributions.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// A latency distribution: counts per upper bound (seconds; the last bucket is unbounded).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Histogram {
    /// Upper bounds of the buckets, ascending.
    pub bounds: Vec<f64>,
    /// Observations per bucket (`bounds.len() + 1` of them, the last one above every bound).
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// Buckets from 1 ms to about 65 s, doubling.
    pub fn latency() -> Self {
        let bounds: Vec<f64> = (0..17).map(|i| 0.001 * f64::powi(2.0, i)).collect();
        Self { counts: vec![0; bounds.len() + 1], bounds, sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| s <= b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += s;
        self.count += 1;
    }

    /// The upper bound of the bucket holding quantile `q` (in seconds; `None` when empty).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let target = (q.clamp(0.0, 1.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Some(self.bounds.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }
}

/// The engine's counters and gauges at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsSnapshot {
    /// Requests waiting to start (or restart after preemption).
    pub waiting: usize,
    pub running: usize,
    pub preemptions_total: u64,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub kv_block_size: usize,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_cache_queries_total: u64,
    pub prefix_cache_hits_total: u64,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    /// Requests finished, by finish reason (`stop`, `length`, `tool_calls`, `cancelled`, `error`, …).
    pub requests_total: BTreeMap<String, u64>,
    /// Requests refused at submission (invalid, too long, overloaded).
    pub requests_rejected_total: u64,
    pub steps_total: u64,
    /// Over the last few seconds.
    pub prompt_tokens_per_sec: f64,
    pub generation_tokens_per_sec: f64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// Per MoE layer (in layer order), routed tokens per expert since the start.
    pub expert_load: Vec<(usize, Vec<u64>)>,
}

impl MetricsSnapshot {
    /// Fraction of looked-up prompt tokens found in the prefix cache.
    pub fn prefix_cache_hit_rate(&self) -> f64 {
        self.prefix_cache_hits_total as f64 / (self.prefix_cache_queries_total as f64).max(1.0)
    }
}

/// Token rates over a sliding window.
#[derive(Debug)]
struct Rate {
    window: Duration,
    events: std::collections::VecDeque<(Instant, u64)>,
}

impl Rate {
    fn new() -> Self {
        Self { window: Duration::from_secs(5), events: Default::default() }
    }

    fn add(&mut self, now: Instant, n: u64) {
        self.events.push_back((now, n));
        while self.events.front().is_some_and(|(t, _)| now.duration_since(*t) > self.window) {
            self.events.pop_front();
        }
    }

    fn per_sec(&self, now: Instant) -> f64 {
        let total: u64 =
            self.events.iter().filter(|(t, _)| now.duration_since(*t) <= self.window).map(|(_, n)| n).sum();
        total as f64 / self.window.as_secs_f64()
    }
}

/// Shared between the engine thread (writer) and readers.
#[derive(Debug)]
pub(crate) struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    snap: MetricsSnapshot,
    prompt_rate: Rate,
    gen_rate: Rate,
}

impl Metrics {
    pub fn new(kv_blocks_total: usize, kv_block_size: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                snap: MetricsSnapshot {
                    waiting: 0,
                    running: 0,
                    preemptions_total: 0,
                    kv_blocks_used: 0,
                    kv_blocks_total,
                    kv_block_size,
                    prefix_cache_queries_total: 0,
                    prefix_cache_hits_total: 0,
                    prompt_tokens_total: 0,
                    generation_tokens_total: 0,
                    requests_total: BTreeMap::new(),
                    requests_rejected_total: 0,
                    steps_total: 0,
                    prompt_tokens_per_sec: 0.0,
                    generation_tokens_per_sec: 0.0,
                    time_to_first_token: Histogram::latency(),
                    inter_token_latency: Histogram::latency(),
                    expert_load: Vec::new(),
                },
                prompt_rate: Rate::new(),
                gen_rate: Rate::new(),
            }),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut MetricsSnapshot)) {
        if let Ok(mut m) = self.inner.lock() {
            f(&mut m.snap);
        }
    }

    /// Records a step's computed prompt tokens and generated tokens.
    pub fn tokens(&self, prompt: u64, generated: u64) {
        if let Ok(mut m) = self.inner.lock() {
            let now = Instant::now();
            m.prompt_rate.add(now, prompt);
            m.gen_rate.add(now, generated);
            m.snap.prompt_tokens_total += prompt;
            m.snap.generation_tokens_total += generated;
            m.snap.steps_total += 1;
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        match self.inner.lock() {
            Ok(m) => {
                let now = Instant::now();
                let mut s = m.snap.clone();
                s.prompt_tokens_per_sec = m.prompt_rate.per_sec(now);
                s.generation_tokens_per_sec = m.gen_rate.per_sec(now);
                s
            }
            Err(p) => p.into_inner().snap.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let mut h = Histogram::latency();
        for ms in [0.5, 3.0, 3.5, 100.0] {
            h.observe(Duration::from_secs_f64(ms / 1000.0));
        }
        assert_eq!(h.count, 4);
        assert_eq!(h.quantile(0.25), Some(0.001));
        assert_eq!(h.quantile(0.5), Some(0.004));
        assert_eq!(h.quantile(1.0), Some(0.128));
        h.observe(Duration::from_secs(1000));
        assert_eq!(h.quantile(1.0), Some(f64::INFINITY));
    }
}
