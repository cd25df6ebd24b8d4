//! `GET /metrics`: the engine's counters, gauges and latency histograms in the Prometheus text
//! format (through `prometheus-client`), read from the engine at each scrape, plus the server's
//! own HTTP response counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use step3::engine::Histogram;
use step3::Step3;

/// HTTP responses by status class, counted by the server.
#[derive(Debug, Default)]
pub struct HttpCounts {
    pub ok: AtomicU64,
    pub client_error: AtomicU64,
    pub server_error: AtomicU64,
}

impl HttpCounts {
    pub fn record(&self, status: u16) {
        let c = match status {
            500.. => &self.server_error,
            400..=499 => &self.client_error,
            _ => &self.ok,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct EngineCollector {
    step3: Arc<Step3>,
    http: Arc<HttpCounts>,
    model: String,
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn labelled_counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(String, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut enc = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(enc.encode_family(labels)?)?;
    }
    Ok(())
}

fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> Result<(), std::fmt::Error> {
    let mut enc = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    let buckets: Vec<(f64, u64)> = h.bounds.iter().copied().chain([f64::MAX]).zip(h.counts.iter().copied()).collect();
    enc.encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)
}

impl Collector for EngineCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.step3.engine().metrics();
        let model = || vec![("model_name".to_string(), self.model.clone())];
        gauge(&mut e, "step3_num_requests_waiting", "Requests waiting to start or restart", m.waiting as f64)?;
        gauge(&mut e, "step3_num_requests_running", "Requests running", m.running as f64)?;
        gauge(&mut e, "step3_kv_cache_blocks_used", "KV cache blocks held by requests", m.kv_blocks_used as f64)?;
        gauge(&mut e, "step3_kv_cache_blocks_total", "KV cache blocks in the pool", m.kv_blocks_total as f64)?;
        gauge(
            &mut e,
            "step3_kv_cache_usage_ratio",
            "Fraction of KV cache blocks in use",
            m.kv_blocks_used as f64 / (m.kv_blocks_total as f64).max(1.0),
        )?;
        counter(&mut e, "step3_num_preemptions", "Sequences preempted (recomputed later)", m.preemptions_total)?;
        counter(
            &mut e,
            "step3_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            m.prefix_cache_queries_total,
        )?;
        counter(
            &mut e,
            "step3_prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            m.prefix_cache_hits_total,
        )?;
        counter(&mut e, "step3_prompt_tokens", "Prompt tokens computed", m.prompt_tokens_total)?;
        counter(&mut e, "step3_generation_tokens", "Tokens generated", m.generation_tokens_total)?;
        counter(&mut e, "step3_engine_steps", "Engine steps run", m.steps_total)?;
        counter(&mut e, "step3_requests_rejected", "Requests refused at submission", m.requests_rejected_total)?;
        gauge(
            &mut e,
            "step3_prompt_tokens_per_second",
            "Prompt tokens per second (last 5 s)",
            m.prompt_tokens_per_sec,
        )?;
        gauge(
            &mut e,
            "step3_generation_tokens_per_second",
            "Generated tokens per second (last 5 s)",
            m.generation_tokens_per_sec,
        )?;
        let finished: Vec<(Vec<(String, String)>, u64)> = m
            .requests_total
            .iter()
            .map(|(reason, v)| {
                let mut l = model();
                l.push(("finished_reason".into(), reason.clone()));
                (l, *v)
            })
            .collect();
        labelled_counter(&mut e, "step3_request_success", "Requests finished, by finish reason", &finished)?;
        histogram(&mut e, "step3_time_to_first_token_seconds", "Time to first token", &m.time_to_first_token)?;
        histogram(
            &mut e,
            "step3_inter_token_latency_seconds",
            "Time between tokens of a request",
            &m.inter_token_latency,
        )?;
        let load: Vec<(Vec<(String, String)>, u64)> = m
            .expert_load
            .iter()
            .flat_map(|(layer, experts)| {
                experts.iter().enumerate().map(move |(e, v)| {
                    (vec![("layer".to_string(), layer.to_string()), ("expert".to_string(), e.to_string())], *v)
                })
            })
            .collect();
        if !load.is_empty() {
            labelled_counter(
                &mut e,
                "step3_moe_expert_routed_tokens",
                "Tokens routed to each expert of each MoE layer",
                &load,
            )?;
        }
        let http = [("2xx", &self.http.ok), ("4xx", &self.http.client_error), ("5xx", &self.http.server_error)];
        let rows: Vec<(Vec<(String, String)>, u64)> = http
            .iter()
            .map(|(class, c)| (vec![("status".to_string(), class.to_string())], c.load(Ordering::Relaxed)))
            .collect();
        labelled_counter(&mut e, "step3_http_responses", "HTTP responses by status class", &rows)
    }
}

/// A registry that reads `step3`'s engine at every scrape.
pub fn registry(step3: Arc<Step3>, http: Arc<HttpCounts>, model: String) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(EngineCollector { step3, http, model }));
    r
}

/// The registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}
