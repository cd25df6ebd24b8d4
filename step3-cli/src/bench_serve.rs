//! `step3 bench serve`: a load generator for any OpenAI-compatible server (ours or another). For each
//! concurrency, that many clients send streamed text completions back to back until the run's
//! requests are done; the run reports requests/s, output tokens/s, time to first token and
//! inter-token latency percentiles, each rate also against concurrency 1.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures_util::StreamExt;
use serde_json::{json, Value};

#[derive(Args)]
pub struct ServeBenchArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// The model name to ask for (default: the first one `/v1/models` lists).
    #[arg(long)]
    model: Option<String>,
    /// Concurrent clients per run, comma-separated.
    #[arg(long, default_value = "1,8,32")]
    concurrency: String,
    /// Requests per run (default: 4 per client, at least 8).
    #[arg(long, value_parser = crate::bench::at_least_one())]
    requests: Option<usize>,
    /// Words of each prompt (random words, different for every request).
    #[arg(long, default_value_t = 200, value_parser = crate::bench::at_least_one())]
    prompt_words: usize,
    /// Words every prompt starts with, the same for all requests (a shared system prompt: the
    /// engine's prefix cache serves them after the first request), before its own
    /// --prompt-words.
    #[arg(long, default_value_t = 0)]
    shared_prefix_words: usize,
    /// Tokens generated per request (end-of-turn ignored).
    #[arg(long, default_value_t = 64, value_parser = crate::bench::at_least_one())]
    gen_len: usize,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "STEP3_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

/// What one request measured.
struct Sample {
    ttft: f64,
    itl: Vec<f64>,
    tokens: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

pub fn run(a: ServeBenchArgs) -> Result<ExitCode> {
    let levels = crate::bench::list(&a.concurrency)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let http = reqwest::Client::new();
        let base = a.url.trim_end_matches('/').to_string();
        let auth = |r: reqwest::RequestBuilder| match &a.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        };
        let model = match &a.model {
            Some(m) => m.clone(),
            None => {
                let v: Value = auth(http.get(format!("{base}/v1/models")))
                    .send()
                    .await
                    .with_context(|| format!("cannot reach {base}"))?
                    .json()
                    .await?;
                v["data"][0]["id"].as_str().context("/v1/models lists no model")?.to_string()
            }
        };
        println!(
            "serve bench: {base}, model {model}, {} shared + {} own prompt words, {} generated tokens per request",
            a.shared_prefix_words, a.prompt_words, a.gen_len
        );
        let shared = std::sync::Arc::new(match a.shared_prefix_words {
            0 => String::new(),
            n => words_prompt(n, 0x5EED) + " ",
        });
        let mut rows = Vec::new();
        let mut salt = 0u64;
        for &c in &levels {
            let n = a.requests.unwrap_or((4 * c).max(8));
            let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let start = Instant::now();
            let mut workers = Vec::new();
            for w in 0..c {
                let (http, base, model, next) = (http.clone(), base.clone(), model.clone(), next.clone());
                let shared = shared.clone();
                let key = a.api_key.clone();
                let (words, gen_len) = (a.prompt_words, a.gen_len);
                let seed = salt + w as u64 * 1_000_003;
                workers.push(tokio::spawn(async move {
                    let mut samples = Vec::new();
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                        let prompt = format!("{shared}{}", words_prompt(words, seed + samples.len() as u64));
                        let body = json!({"model": model, "prompt": prompt, "max_tokens": gen_len, "temperature": 0,
                            "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
                        let mut req = http.post(format!("{base}/v1/completions")).json(&body);
                        if let Some(k) = &key {
                            req = req.bearer_auth(k);
                        }
                        samples.push(one(req).await?);
                    }
                    anyhow::Ok(samples)
                }));
            }
            let mut samples = Vec::new();
            for w in workers {
                samples.extend(w.await??);
            }
            let wall = start.elapsed();
            salt += 7_777_777;
            rows.push((c, n, wall, samples));
        }
        print_table(&rows);
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A prompt of `n` pseudo-random lowercase words.
fn words_prompt(n: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = 3 + (x >> 60) as usize % 5;
            (0..len).map(|i| (b'a' + ((x >> (8 * i + 3)) % 26) as u8) as char).collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sends one streamed request and times its chunks.
async fn one(req: reqwest::RequestBuilder) -> Result<Sample> {
    let start = Instant::now();
    let resp = req.send().await?;
    if !resp.status().is_success() {
        bail!("the server answered {}: {}", resp.status(), resp.text().await.unwrap_or_default());
    }
    let mut stream = resp.bytes_stream();
    let (mut buf, mut times, mut tokens) = (String::new(), Vec::new(), 0usize);
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ") else { continue };
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data).with_context(|| format!("not JSON: {data}"))?;
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                }
                let text = v["choices"][0]["text"].as_str().unwrap_or("");
                if !text.is_empty() {
                    times.push(start.elapsed().as_secs_f64());
                }
            }
        }
    }
    let ttft = times.first().copied().unwrap_or(f64::NAN);
    let itl = times.windows(2).map(|w| w[1] - w[0]).collect();
    Ok(Sample { ttft, itl, tokens })
}

fn print_table(rows: &[(usize, usize, Duration, Vec<Sample>)]) {
    let rate = |(_, _, wall, s): &(usize, usize, Duration, Vec<Sample>)| {
        s.iter().map(|x| x.tokens).sum::<usize>() as f64 / wall.as_secs_f64()
    };
    let itl99 = |s: &[Sample]| {
        let mut v: Vec<f64> = s.iter().flat_map(|x| x.itl.iter().copied()).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let base = rows.iter().find(|r| r.0 == 1);
    println!("\n| concurrency | requests | requests/s | output tok/s | × c=1 | TTFT p50 / p99 ms | ITL p50 / p99 ms | ITL p99 × c=1 |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (c, n, wall, samples) = r;
        let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
        ttft.sort_by(f64::total_cmp);
        let itl = itl99(samples);
        let (x_rate, x_itl) = match base {
            Some(b) => (
                format!("{:.2}×", rate(r) / rate(b)),
                format!("{:.2}×", percentile(&itl, 0.99) / percentile(&itl99(&b.3), 0.99)),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {c} | {n} | {:.2} | {:.1} | {x_rate} | {:.0} / {:.0} | {:.1} / {:.1} | {x_itl} |",
            *n as f64 / wall.as_secs_f64(),
            rate(r),
            percentile(&ttft, 0.5) * 1e3,
            percentile(&ttft, 0.99) * 1e3,
            percentile(&itl, 0.5) * 1e3,
            percentile(&itl, 0.99) * 1e3,
        );
    }
}
