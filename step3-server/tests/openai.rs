//! The server as clients use it, on loopback: the async-openai client and raw HTTP; chat and text
//! completions, streamed and whole; images, tools, token ids; greedy output equal to the library's
//! and to the reference's golden tokens; 32 concurrent streams; disconnects, overload, limits, auth,
//! local files and bad input.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use step3::{EngineConfig, GenerateOptions, Message};
use step3_server::ServerConfig;

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": "step3-demo", "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_whole_and_streamed_agree_with_the_library() {
    let server = Server::demo().await;
    let opts = json!({"temperature": 0, "max_tokens": 24, "ignore_eos": true});
    let (status, whole) = server.post("/v1/chat/completions", &chat("Hello there!", opts.clone())).await;
    assert_eq!(status, 200, "{whole}");
    let msg = &whole["choices"][0]["message"];
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 24);
    // The same request through the library.
    // (The library's calls block: off the async runtime.)
    let step3 = server.step3.clone();
    let lib = tokio::task::spawn_blocking(move || {
        step3.generate(
            &[Message::user("Hello there!")],
            &GenerateOptions { temperature: Some(0.0), max_new_tokens: 24, ignore_eos: true, ..Default::default() },
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(msg["reasoning_content"].as_str().unwrap_or(""), lib.reasoning);
    assert_eq!(msg["content"].as_str().unwrap_or(""), lib.text);
    assert_eq!(whole["usage"]["prompt_tokens"], lib.stats.prompt_tokens);
    // Streamed, with usage.
    let mut body = chat("Hello there!", opts);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, data) = server.post_stream("/v1/chat/completions", &body).await;
    assert_eq!(status, 200);
    let s = fold_chat_stream(&data);
    assert_eq!((s.reasoning.as_str(), s.content.as_str()), (lib.reasoning.as_str(), lib.text.as_str()));
    assert_eq!(s.finish, vec![Some("length".to_string())]);
    assert_eq!(s.usage.as_ref().unwrap()["completion_tokens"], 24);
    // The first chunk carries the role.
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");

    // The OpenAI client reads both forms.
    use async_openai::types::chat::CreateChatCompletionRequest;
    let req: CreateChatCompletionRequest = serde_json::from_value(json!({
        "model": "step3-demo", "messages": [{"role": "user", "content": "Hello there!"}],
        "temperature": 0.0, "max_completion_tokens": 24
    }))
    .unwrap();
    let resp = server.client().chat().create(req.clone()).await.expect("client create");
    assert_eq!(resp.choices.len(), 1);
    let mut stream = server.client().chat().create_stream(req).await.expect("client stream");
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        chunk.expect("a well-formed chunk");
        chunks += 1;
    }
    assert!(chunks >= 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_ids_over_http_give_the_golden_tokens() {
    // The f32 fixture with a tokenizer whose image markers have the fixture's ids.
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("vl-f32");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(src.join("golden.json")).unwrap()).unwrap();
    let ids = &golden["special_token_ids"];
    let specials = step3::demo::special_ids_with(|t| ids.get(t).and_then(Value::as_u64).map(|v| v as u32), 271);
    step3::demo::write_tokenizer(dir.path(), &specials).unwrap();
    let step3 =
        std::sync::Arc::new(step3::Step3::from_dir(dir.path()).dtype(step3::DType::F32).crop_size(40).build().unwrap());
    let server = Server::start(step3, ServerConfig { served_model_name: "tiny".into(), ..Default::default() }).await;
    for seq in ["text.seq0", "text.seq1"] {
        let body = json!({"model": "tiny", "prompt": golden[seq]["input_ids"], "max_tokens": 8, "temperature": 0,
            "ignore_eos": true, "return_token_ids": true});
        let (status, resp) = server.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{resp}");
        assert_eq!(resp["choices"][0]["token_ids"], golden[seq]["greedy_tokens"], "{seq}");
        assert_eq!(resp["choices"][0]["prompt_token_ids"], golden[seq]["input_ids"]);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_completions_whole_streamed_and_batched() {
    let server = Server::demo().await;
    let body = json!({"model": "step3-demo", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0,
        "ignore_eos": true, "logprobs": 2});
    let (status, whole) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    let lp = &whole["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 12);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, data) = server.post_stream("/v1/completions", &streamed).await;
    let joined: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(joined, text);
    // Sampling without a seed differs from request to request; with one it repeats.
    let sampled = |seed: Option<u64>| {
        let mut b = json!({"model": "step3-demo", "prompt": "Once upon", "max_tokens": 16, "temperature": 1.0,
            "ignore_eos": true});
        if let Some(s) = seed {
            b["seed"] = json!(s);
        }
        b
    };
    let mut texts = Vec::new();
    for seed in [None, None, Some(7), Some(7)] {
        let (status, resp) = server.post("/v1/completions", &sampled(seed)).await;
        assert_eq!(status, 200, "{resp}");
        texts.push(resp["choices"][0]["text"].as_str().unwrap().to_string());
    }
    assert_ne!(texts[0], texts[1]);
    assert_eq!(texts[2], texts[3]);
    // Several prompts and n: one choice per prompt and sample, in order.
    let body = json!({"model": "step3-demo", "prompt": ["a", "b c"], "n": 2, "max_tokens": 3, "ignore_eos": true});
    let (status, resp) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    let idx: Vec<u64> = resp["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(idx, vec![0, 1, 2, 3]);
    assert_eq!(resp["usage"]["completion_tokens"], 12);
    server.stop().await;
}

/// The answer a test scripts with the `response_prefix` extension: reasoning, text, two tool calls
/// (one without arguments; values with `<` and a newline), then the end-of-turn token.
const SCRIPT: &str = "Let me look.</think>Sure.<｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name=\"get_weather\"><steptml:parameter name=\"city\">Paris <Nord>\nrive gauche</steptml:parameter><steptml:parameter name=\"days\">3</steptml:parameter></steptml:invoke><｜tool_call_end｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name=\"now\"></steptml:invoke><｜tool_call_end｜><｜tool_calls_end｜><|EOT|>";

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}}}}},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_whole_and_streamed() {
    let server = Server::demo().await;
    let body = chat("Weather in Paris?", json!({"tools": tools(), "response_prefix": SCRIPT, "max_tokens": 400}));
    let (status, whole) = server.post("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{whole}");
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let msg = &choice["message"];
    assert_eq!(msg["reasoning_content"], "Let me look.");
    assert_eq!(msg["content"], "Sure.");
    let calls = msg["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris <Nord>\nrive gauche", "days": 3}));
    assert_eq!(calls[1]["function"]["name"], "now");
    assert_eq!(calls[1]["function"]["arguments"], "{}");
    assert_ne!(calls[0]["id"], calls[1]["id"]);
    // Streamed: the deltas add up to the same answer (ids aside: each response has its own).
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, data) = server.post_stream("/v1/chat/completions", &streamed).await;
    let s = fold_chat_stream(&data);
    assert_eq!((s.reasoning.as_str(), s.content.as_str()), ("Let me look.", "Sure."));
    let names_args: Vec<(String, String)> = s.tool_calls.iter().map(|(_, n, a)| (n.clone(), a.clone())).collect();
    let whole_calls: Vec<(String, String)> = calls
        .iter()
        .map(|c| {
            (
                c["function"]["name"].as_str().unwrap().to_string(),
                c["function"]["arguments"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(names_args, whole_calls);
    assert_eq!(s.finish, vec![Some("tool_calls".to_string())]);

    // A conversation whose history holds the calls and their results renders and runs.
    let history = json!({"model": "step3-demo", "tools": tools(), "max_tokens": 4, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Sure.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny, 21 °C"},
        {"role": "tool", "tool_call_id": calls[1]["id"], "content": "12:00"},
        {"role": "user", "content": "Thanks!"}
    ]});
    let (status, resp) = server.post("/v1/chat/completions", &history).await;
    assert_eq!(status, 200, "{resp}");
    assert!(resp["usage"]["prompt_tokens"].as_u64().unwrap() > whole["usage"]["prompt_tokens"].as_u64().unwrap() + 50);

    // A named tool_choice opens that call right after the reasoning (here: no reasoning).
    let named = chat(
        "Weather?",
        json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "chat_template_kwargs": {"enable_thinking": false}, "max_tokens": 80, "return_token_ids": true,
            "seed": step3::generation::DEFAULT_SEED}),
    );
    let (status, resp) = server.post("/v1/chat/completions", &named).await;
    assert_eq!(status, 200, "{resp}");
    let tok = server.step3.tokenizer().unwrap();
    let want = tok
        .encode(
            "<｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name=\"get_weather\">",
        )
        .unwrap();
    let got: Vec<u32> =
        resp["choices"][0]["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    // (The demo's template ignores `enable_thinking`: the model reasons first, then the call opens.)
    let think_end = tok.token_id("</think>").unwrap();
    let start = got.iter().position(|&t| t == think_end).map_or(0, |p| p + 1);
    assert_eq!(&got[start..start + want.len()], &want[..], "{got:?}");
    // Without tools offered (none given, or `tool_choice` "none"), the markup is answer text.
    let script_text = SCRIPT.trim_end_matches("<|EOT|>");
    let (_, r) = script_text.split_once("</think>").unwrap();
    for extra in [json!({}), json!({"tools": tools(), "tool_choice": "none"})] {
        let mut body = chat("Weather in Paris?", json!({"response_prefix": SCRIPT, "max_tokens": 400}));
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, resp) = server.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{resp}");
        let choice = &resp["choices"][0];
        assert_eq!((choice["finish_reason"].as_str(), choice["message"]["content"].as_str()), (Some("stop"), Some(r)));
        assert!(choice["message"]["tool_calls"].is_null(), "{resp}");
        body["stream"] = json!(true);
        let (_, data) = server.post_stream("/v1/chat/completions", &body).await;
        let s = fold_chat_stream(&data);
        assert_eq!((s.content.as_str(), s.tool_calls.len()), (r, 0));
    }
    // Streamed token ids add up to the whole answer's.
    let ids_body = chat("Hi", json!({"max_tokens": 9, "ignore_eos": true, "temperature": 0, "return_token_ids": true}));
    let (_, whole) = server.post("/v1/chat/completions", &ids_body).await;
    let mut streamed = ids_body.clone();
    streamed["stream"] = json!(true);
    let (_, data) = server.post_stream("/v1/chat/completions", &streamed).await;
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let ids: Vec<Value> =
        chunks.iter().flat_map(|c| c["choices"][0]["token_ids"].as_array().cloned().unwrap_or_default()).collect();
    assert_eq!(Value::Array(ids), whole["choices"][0]["token_ids"]);
    assert!(chunks[0]["prompt_token_ids"].as_array().is_some_and(|p| !p.is_empty()));
    assert_eq!(chunks[0]["prompt_token_ids"], whole["prompt_token_ids"]);
    let bad = chat("x", json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}));
    let (status, resp) = server.post("/v1/chat/completions", &bad).await;
    assert_eq!((status, resp["error"]["param"].as_str()), (400, Some("tool_choice")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_as_data_urls_and_allowed_local_files() {
    let media = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let png = std::fs::read(fixtures().join("images/wide_150x62.png")).unwrap();
    std::fs::write(media.path().join("wide.png"), &png).unwrap();
    std::fs::write(outside.path().join("secret.png"), &png).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.png"), media.path().join("link.png")).unwrap();
    let step3 = demo(EngineConfig::default());
    let cfg = ServerConfig { allowed_local_media_path: Some(media.path().to_path_buf()), ..config() };
    let server = Server::start(step3, cfg).await;
    let with_image = |url: String| {
        json!({"model": "step3-demo", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let (status, resp) = server.post("/v1/chat/completions", &with_image(format!("data:image/png;base64,{b64}"))).await;
    assert_eq!(status, 200, "{resp}");
    let text_only = server.post("/v1/chat/completions", &chat("What is this?", json!({"max_tokens": 2}))).await.1;
    let image_tokens =
        resp["usage"]["prompt_tokens"].as_u64().unwrap() - text_only["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(image_tokens > 40, "{image_tokens}");
    let url = |p: &std::path::Path| format!("file://{}", p.display());
    let (status, _) = server.post("/v1/chat/completions", &with_image(url(&media.path().join("wide.png")))).await;
    assert_eq!(status, 200);
    let param = "messages[0].content[1].image_url.url";
    let escape = media.path().join("..").join(outside.path().file_name().unwrap()).join("secret.png");
    for bad in [
        url(&escape),
        url(&media.path().join("link.png")),
        url(&outside.path().join("secret.png")),
        "file:///etc/passwd".to_string(),
        "https://example.com/cat.png".to_string(),
        "data:image/png;base64,!!!".to_string(),
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(b"not an image")),
    ] {
        let (status, resp) = server.post("/v1/chat/completions", &with_image(bad.clone())).await;
        assert_eq!(status, 400, "{bad}: {resp}");
        assert_eq!(resp["error"]["param"], param, "{bad}: {resp}");
    }
    server.stop().await;
    // Without an allowed directory no local file is read.
    let server = Server::demo().await;
    let (status, resp) = server.post("/v1/chat/completions", &with_image(url(&media.path().join("wide.png")))).await;
    assert_eq!(status, 400);
    assert!(resp["error"]["message"].as_str().unwrap().contains("--allowed-local-media-path"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_streams_are_complete_and_correct() {
    let server = Server::demo().await;
    let body = |i: usize, stream: bool| {
        chat(
            &format!("Request number {i}, say something."),
            json!({"temperature": 0, "max_tokens": 12, "ignore_eos": true, "stream": stream}),
        )
    };
    // The references, one at a time.
    let mut want = Vec::new();
    for i in 0..32 {
        let (status, r) = server.post("/v1/chat/completions", &body(i, false)).await;
        assert_eq!(status, 200);
        let m = &r["choices"][0]["message"];
        want.push((
            m["reasoning_content"].as_str().unwrap_or("").to_string(),
            m["content"].as_str().unwrap_or("").to_string(),
        ));
    }
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let url = server.url("/v1/chat/completions");
            let b = body(i, true);
            tokio::spawn(async move {
                let resp = reqwest::Client::new().post(url).json(&b).send().await.unwrap();
                let text = resp.text().await.unwrap();
                text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect::<Vec<_>>()
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let s = fold_chat_stream(&t.await.unwrap());
        assert_eq!((s.reasoning, s.content), want[i], "stream {i}");
        assert_eq!(s.finish, vec![Some("length".to_string())]);
    }
    wait_idle(&server.step3).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_request() {
    let server = Server::demo().await;
    let body = chat("Talk for a long time.", json!({"max_tokens": 3000, "ignore_eos": true, "stream": true}));
    let resp = reqwest::Client::new().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    let mut bytes = resp.bytes_stream();
    let mut seen = 0;
    while let Some(chunk) = bytes.next().await {
        seen += chunk.unwrap().len();
        if seen > 1000 {
            break;
        }
    }
    assert!(server.step3.engine().metrics().running >= 1);
    drop(bytes);
    let m = wait_idle(&server.step3).await;
    assert_eq!(m.requests_total.get("cancelled"), Some(&1));
    assert!(m.generation_tokens_total < 3000);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_at_once() {
    let step3 = demo(EngineConfig { max_num_seqs: 1, max_waiting: 1, ..Default::default() });
    let server = Server::start(step3, config()).await;
    let body = chat("Busy?", json!({"max_tokens": 300, "ignore_eos": true}));
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let url = server.url("/v1/chat/completions");
            let b = body.clone();
            tokio::spawn(async move {
                let resp = reqwest::Client::new().post(url).json(&b).send().await.unwrap();
                let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                (resp.status().as_u16(), retry, resp.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut refused = 0;
    for t in tasks {
        let (status, retry, body) = tokio::time::timeout(Duration::from_secs(120), t).await.unwrap().unwrap();
        match status {
            200 => {}
            503 => {
                refused += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert_eq!(body["error"]["code"], "overloaded");
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(refused >= 1, "nothing was refused");
    wait_idle(&server.step3).await;
    // More choices than the queue holds could never be admitted: a 400, not a 503 to retry.
    let (status, resp) = server.post("/v1/chat/completions", &chat("Two?", json!({"n": 2, "max_tokens": 2}))).await;
    assert_eq!((status, resp["error"]["param"].as_str()), (400, Some("n")), "{resp}");
    let two = json!({"model": "step3-demo", "prompt": ["a", "b"], "max_tokens": 2});
    let (status, resp) = server.post("/v1/completions", &two).await;
    assert_eq!((status, resp["error"]["param"].as_str()), (400, Some("prompt")), "{resp}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_auth_and_bad_input_get_openai_errors() {
    let cfg = ServerConfig { api_key: Some("s3cret".into()), body_limit: 4096, ..config() };
    let server = Server::start(demo(EngineConfig::default()), cfg).await;
    let http = reqwest::Client::new();
    let send = |body: String, key: Option<&str>| {
        let mut req =
            http.post(server.url("/v1/chat/completions")).header("content-type", "application/json").body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let ok = chat("hi", json!({"max_tokens": 2})).to_string();
    assert_eq!(send(ok.clone(), None).await.0, 401);
    let (status, body) = send(ok.clone(), Some("wrong")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("invalid_api_key")));
    assert_eq!(send(ok.clone(), Some("s3cret")).await.0, 200);
    // The scheme is case-insensitive.
    let lower = http
        .post(server.url("/v1/chat/completions"))
        .header("authorization", "bearer s3cret")
        .header("content-type", "application/json")
        .body(ok.clone());
    assert_eq!(lower.send().await.unwrap().status().as_u16(), 200);
    // A route with the wrong method: 405 in the OpenAI error shape.
    let resp = http.get(server.url("/v1/chat/completions")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert!(resp.json::<Value>().await.unwrap()["error"]["message"].as_str().is_some_and(|m| m.contains("GET")));
    // One model by id.
    let one = http.get(server.url("/v1/models/step3-demo")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(one.json::<Value>().await.unwrap()["id"], "step3-demo");
    let none = http.get(server.url("/v1/models/gpt-9")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(none.status().as_u16(), 404);
    assert_eq!(http.get(server.url("/health")).send().await.unwrap().status().as_u16(), 200);
    let models =
        http.get(server.url("/v1/models")).bearer_auth("s3cret").send().await.unwrap().json::<Value>().await.unwrap();
    assert_eq!(models["data"][0]["id"], "step3-demo");
    // Too large.
    let big = chat(&"x".repeat(8000), json!({})).to_string();
    let (status, body) = send(big, Some("s3cret")).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "request_too_large");
    // Bad input: 400 naming the field, never a 500.
    let cases: Vec<(String, Option<&str>)> = vec![
        ("{\"model\": ".to_string(), None),
        ("[1, 2]".to_string(), None),
        (chat("hi", json!({"temperature": "hot"})).to_string(), Some("temperature")),
        (chat("hi", json!({"temperature": -0.5})).to_string(), Some("temperature")),
        (chat("hi", json!({"top_p": 0})).to_string(), Some("top_p")),
        (chat("hi", json!({"top_p": 1.5})).to_string(), Some("top_p")),
        (chat("hi", json!({"n": 0})).to_string(), Some("n")),
        (chat("hi", json!({"max_tokens": 100000})).to_string(), Some("max_tokens")),
        (chat("hi", json!({"max_completion_tokens": 0})).to_string(), Some("max_completion_tokens")),
        (chat("hi", json!({"top_k": -3})).to_string(), Some("top_k")),
        (chat("hi", json!({"repetition_penalty": 0})).to_string(), Some("repetition_penalty")),
        (chat("hi", json!({"stop": 7})).to_string(), Some("stop")),
        (chat("hi", json!({"repetition_penalty": 1e39})).to_string(), Some("repetition_penalty")),
        (chat("hi", json!({"repetition_penalty": 1e-40})).to_string(), Some("repetition_penalty")),
        (chat("hi", json!({"temperature": 1e-46})).to_string(), Some("temperature")),
        (chat("hi", json!({"top_logprobs": 2})).to_string(), Some("top_logprobs")),
        (json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}).to_string(), Some("model")),
        (json!({"model": "step3-demo", "messages": []}).to_string(), Some("messages")),
        (json!({"model": "step3-demo"}).to_string(), Some("messages")),
        (
            json!({"model": "step3-demo", "messages": [{"role": "wizard", "content": "hi"}]}).to_string(),
            Some("messages[0]"),
        ),
        (json!({"model": "step3-demo", "messages": [{"role": "user", "content": 5}]}).to_string(), Some("messages[0]")),
    ];
    for (body, param) in cases {
        let (status, resp) = send(body.clone(), Some("s3cret")).await;
        assert_eq!(status, 400, "{body}: {resp}");
        let err = &resp["error"];
        assert_eq!(err["type"], "invalid_request_error", "{body}: {resp}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
        match param {
            Some(p) => assert!(err["param"].as_str().is_some_and(|got| got.starts_with(p)), "{body}: {resp}"),
            None => assert!(err["param"].is_null()),
        }
    }
    let metrics = http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("step3_request_success_total{model_name=\"step3-demo\",finished_reason=\"length\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("step3_http_responses_total{status=\"4xx\"}"));
    assert!(metrics.contains("step3_time_to_first_token_seconds_bucket"));
    assert!(metrics.contains("step3_moe_expert_routed_tokens_total{layer="));
    assert!(!metrics.contains("status=\"5xx\"} 1"));
    server.stop().await;
}
