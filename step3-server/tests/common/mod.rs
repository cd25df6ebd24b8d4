//! A server on an ephemeral loopback port, in process, with helpers to talk to it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use step3::{DType, EngineConfig, Step3};
use step3_server::ServerConfig;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/step3-tiny")
}

/// The bundled demo checkpoint (a tokenizer, a chat template, a vision tower) in f32.
pub fn demo(engine: EngineConfig) -> Arc<Step3> {
    Arc::new(Step3::from_dir(step3::demo::demo_dir()).dtype(DType::F32).engine(engine).build().expect("demo"))
}

pub struct Server {
    pub addr: SocketAddr,
    pub step3: Arc<Step3>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    pub async fn start(step3: Arc<Step3>, config: ServerConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(step3_server::serve(listener, step3.clone(), config, async move {
            let _ = rx.await;
        }));
        Self { addr, step3, stop: Some(tx), task: Some(task) }
    }

    /// The demo with the served name `step3-demo`.
    pub async fn demo() -> Self {
        Self::start(demo(EngineConfig::default()), config()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// An OpenAI client pointed at this server.
    pub fn client(&self) -> async_openai::Client<async_openai::config::OpenAIConfig> {
        let cfg = async_openai::config::OpenAIConfig::new().with_api_base(self.url("/v1")).with_api_key("unused");
        async_openai::Client::with_config(cfg)
    }

    /// POSTs JSON; returns the status and the body parsed as JSON (or as a string).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = reqwest::Client::new().post(self.url(path)).json(body).send().await.expect("post");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// POSTs a streaming request and returns every `data:` payload (`[DONE]` last).
    pub async fn post_stream(&self, path: &str, body: &Value) -> (u16, Vec<String>) {
        let resp = reqwest::Client::new().post(self.url(path)).json(body).send().await.expect("post");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let data = text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect();
        (status, data)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

pub fn config() -> ServerConfig {
    ServerConfig { served_model_name: "step3-demo".into(), ..Default::default() }
}

/// Waits until the engine has nothing running or waiting and no KV block in use.
pub async fn wait_idle(step3: &Step3) -> step3::MetricsSnapshot {
    for _ in 0..2000 {
        let m = step3.engine().metrics();
        if m.running == 0 && m.waiting == 0 && m.kv_blocks_used == 0 {
            return m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("the engine never went idle: {:?}", step3.engine().metrics());
}

/// The text a streamed chat answer adds up to: (reasoning, content, tool calls by index as
/// (id, name, arguments), finish reasons by choice index).
#[derive(Debug, Default, PartialEq)]
pub struct Streamed {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<(String, String, String)>,
    pub finish: Vec<Option<String>>,
    pub usage: Option<Value>,
}

pub fn fold_chat_stream(data: &[String]) -> Streamed {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "the stream must end with [DONE]");
    let mut s = Streamed::default();
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert!(v.get("error").is_none(), "error in the stream: {v}");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            s.usage = Some(u.clone());
        }
        for c in v["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().expect("index") as usize;
            if s.finish.len() <= i {
                s.finish.resize(i + 1, None);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                s.finish[i] = Some(f.to_string());
            }
            let delta = &c["delta"];
            if let Some(r) = delta["reasoning_content"].as_str() {
                s.reasoning.push_str(r);
            }
            if let Some(t) = delta["content"].as_str() {
                s.content.push_str(t);
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let k = call["index"].as_u64().expect("tool call index") as usize;
                if s.tool_calls.len() <= k {
                    // The first delta of a call carries its id and name.
                    let id = call["id"].as_str().expect("id first").to_string();
                    let name = call["function"]["name"].as_str().expect("name first").to_string();
                    s.tool_calls.push((id, name, String::new()));
                }
                if let Some(a) = call["function"]["arguments"].as_str() {
                    s.tool_calls[k].2.push_str(a);
                }
            }
        }
    }
    s
}
