//! Chat, generation and the library API end to end: the public API reproduces the golden tokens,
//! the chat format, streaming, stop conditions, reasoning and sampling behave, the hub cache
//! resolves offline, the chat example works through stdin, and bad input is refused clearly.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use step3::demo::demo_dir;
use step3::{DType, Event, FinishReason, GenerateOptions, Message, Step3};

fn demo() -> Step3 {
    Step3::from_pretrained(demo_dir().to_string_lossy()).dtype(DType::F32).offline(true).build().unwrap()
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { temperature: Some(0.0), max_new_tokens: n, ..Default::default() }
}

/// A copy of a fixture checkpoint with a tokenizer whose image markers have the fixture's ids.
fn fixture_with_tokenizer(name: &str) -> tempfile::TempDir {
    let dir = copy_checkpoint(name);
    let golden = golden_json(name);
    let ids = &golden["special_token_ids"];
    let specials = step3::demo::special_ids_with(|t| ids.get(t).and_then(|v| v.as_u64()).map(|v| v as u32), 271);
    step3::demo::write_tokenizer(dir.path(), &specials).unwrap();
    dir
}

#[test]
fn public_api_reproduces_the_golden_tokens() {
    let golden = golden_json("vl-f32");
    let dir = fixture_with_tokenizer("vl-f32");
    let model = Step3::from_pretrained(dir.path().to_string_lossy()).dtype(DType::F32).crop_size(40).build().unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    let opts = GenerateOptions { ignore_eos: true, ..greedy(8) };
    for seq in ["text.seq0", "text.seq1"] {
        let r = model.complete(&ids(&golden[seq]["input_ids"]), &[], &opts).unwrap();
        assert_eq!(r.tokens, ids(&golden[seq]["greedy_tokens"]), "{seq}");
        assert_eq!(r.stats.finish, FinishReason::Length);
    }
    // With the two images of the multimodal golden.
    let images: Vec<_> = ["wide_150x62", "grid_760x620"]
        .iter()
        .map(|n| step3::ImageSource::File(fixtures().join(format!("images/{n}.png"))))
        .collect();
    let r = model.complete(&ids(&golden["mm"]["input_ids"]), &images, &opts).unwrap();
    assert_eq!(r.tokens, ids(&golden["mm"]["greedy_tokens"]));
}

#[test]
fn chat_prompts_use_the_template_and_expand_images() {
    let model = demo();
    let messages =
        [Message::system("Be brief."), Message::user("Hi").with_image(fixtures().join("images/wide_150x62.png"))];
    let text = model.render(&messages).unwrap();
    assert_eq!(text, "<｜begin▁of▁sentence｜>Be brief.<|BOT|>user\n<im_patch>Hi<|EOT|><|BOT|>assistant\n<think>\n");
    // The demo ships a Jinja template; the native format renders the same conversation identically.
    let native = step3::ChatTemplate::Native { bos: "<｜begin▁of▁sentence｜>".into() };
    assert_eq!(native.render(&messages, true).unwrap(), text);
    let (ids, images) = model.prompt(&messages).unwrap();
    let tok = model.tokenizer().unwrap();
    assert_eq!(ids[0], tok.token_id("<｜begin▁of▁sentence｜>").unwrap());
    assert!(ids.contains(&tok.token_id("<|BOT|>").unwrap()) && ids.contains(&tok.token_id("<think>").unwrap()));
    // One <im_patch> became the image's layout: 3 crops of 9 features and a global view of 16.
    assert_eq!(images.len(), 1);
    let patch = tok.token_id("<im_patch>").unwrap();
    assert_eq!(ids.iter().filter(|&&t| t == patch).count(), 3 * 9 + 16);
    assert_eq!(ids.iter().filter(|&&t| t == tok.token_id("<patch_start>").unwrap()).count(), 3);
}

/// The same prompt as messages, as rendered text and as token ids splits the answer into
/// reasoning and text the same way (the template ends with `<think>\n`, a newline token after the
/// marker).
#[test]
fn messages_text_and_ids_split_the_answer_alike() {
    let model = demo();
    let messages = [Message::user("same")];
    let opts = GenerateOptions { ignore_eos: true, ..greedy(12) };
    let whole = model.generate(&messages, &opts).unwrap();
    let from_text = model.complete_text(&model.render(&messages).unwrap(), &[], &opts).unwrap();
    let (ids, _) = model.prompt(&messages).unwrap();
    let from_ids = model.complete(&ids, &[], &opts).unwrap();
    for r in [&from_text, &from_ids] {
        assert_eq!((r.reasoning.as_str(), r.text.as_str()), (whole.reasoning.as_str(), whole.text.as_str()));
    }
    assert!(!whole.reasoning.is_empty());
}

#[test]
fn special_tokens_are_single_ids_and_text_round_trips() {
    let tok = step3::Step3Tokenizer::from_dir(&demo_dir()).unwrap();
    let ids = tok.encode("<|BOT|>user\nhé 🦀<|EOT|>").unwrap();
    assert_eq!(ids[0], tok.token_id("<|BOT|>").unwrap());
    assert_eq!(*ids.last().unwrap(), tok.token_id("<|EOT|>").unwrap());
    assert_eq!(tok.decode(&ids).unwrap(), "<|BOT|>user\nhé 🦀<|EOT|>");
}

#[test]
fn a_tokenizer_without_the_chat_markers_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        std::fs::copy(demo_dir().join(f), dir.path().join(f)).unwrap();
    }
    let specials: Vec<(&str, u32)> =
        step3::demo::demo_special_ids().into_iter().filter(|(t, _)| *t != "<|BOT|>").collect();
    step3::demo::write_tokenizer(dir.path(), &specials).unwrap();
    let err = Step3::from_pretrained(dir.path().to_string_lossy()).dtype(DType::F32).build().unwrap_err().to_string();
    assert!(err.contains("the tokenizer has no `<|BOT|>` token"), "{err}");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    // Without a tokenizer the model still runs on token ids; chat says what is missing.
    let model = Step3::from_pretrained(dir.path().to_string_lossy()).build().unwrap();
    let err = model.generate(&[Message::user("hi")], &greedy(2)).unwrap_err().to_string();
    assert!(err.contains("has no tokenizer.json"), "{err}");
    let r = model.complete(&[1, 2, 3], &[], &greedy(2)).unwrap();
    assert_eq!((r.tokens.len(), r.text.as_str()), (2, ""));
}

#[test]
fn streaming_equals_the_whole_answer_and_is_utf8_safe() {
    let model = demo();
    let messages = [Message::user("Tell me something.")];
    let opts = GenerateOptions { temperature: Some(0.9), seed: 11, max_new_tokens: 60, ..Default::default() };
    let whole = model.generate(&messages, &opts).unwrap();
    let (mut text, mut reasoning, mut done) = (String::new(), String::new(), None);
    for e in model.stream(&messages, &opts).unwrap() {
        match e.unwrap() {
            Event::Text(s) => text.push_str(&s),
            Event::Reasoning(s) => reasoning.push_str(&s),
            Event::ToolCall(_) => {}
            Event::Done(stats) => done = Some(stats),
        }
    }
    assert_eq!((text, reasoning), (whole.text.clone(), whole.reasoning.clone()));
    assert_eq!(done.unwrap().generated_tokens, whole.tokens.len());

    // Multi-byte characters split across byte-level tokens come out whole, never half.
    let tok = model.tokenizer().unwrap();
    let ids = tok.encode("é🦀x").unwrap();
    assert_eq!(ids.len(), 7, "2 + 4 + 1 byte tokens");
    let mut d = step3::Detokenizer::new();
    let pieces: Vec<Option<String>> = ids.iter().map(|&id| d.push(tok, id).unwrap()).collect();
    assert_eq!(pieces, vec![None, Some("é".into()), None, None, None, Some("🦀".into()), Some("x".into())]);
    // A dangling partial character is released as U+FFFD at the end, never as broken UTF-8.
    let mut d = step3::Detokenizer::new();
    assert_eq!(d.push(tok, ids[2]).unwrap(), None);
    assert_eq!(d.flush(tok).unwrap().as_deref(), Some("\u{FFFD}"));
}

#[test]
fn sampling_is_deterministic_with_a_seed() {
    let model = demo();
    let messages = [Message::user("Hello")];
    let run = |seed| {
        model
            .generate(
                &messages,
                &GenerateOptions {
                    temperature: Some(1.0),
                    top_p: Some(0.9),
                    top_k: Some(50),
                    seed,
                    max_new_tokens: 30,
                    ..Default::default()
                },
            )
            .unwrap()
            .tokens
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
    let g1 = model.generate(&messages, &greedy(20)).unwrap().tokens;
    assert_eq!(g1, model.generate(&messages, &greedy(20)).unwrap().tokens);
    // A repetition penalty changes greedy decoding.
    let pen = model.generate(&messages, &GenerateOptions { repetition_penalty: 1.5, ..greedy(20) }).unwrap().tokens;
    assert_ne!(g1, pen);
}

#[test]
fn stop_conditions() {
    let model = demo();
    let messages = [Message::user("Hello")];
    // max_new_tokens.
    let r = model.generate(&messages, &GenerateOptions { ignore_eos: true, ..greedy(12) }).unwrap();
    assert_eq!((r.tokens.len(), r.stats.finish), (12, FinishReason::Length));
    // End-of-turn token: the demo's <|EOT|> (generation_config.json) ends a long enough answer,
    // and is not part of the text.
    let long = GenerateOptions { temperature: Some(0.7), seed: 1, max_new_tokens: 2000, ..Default::default() };
    let r = model.generate(&messages, &long).unwrap();
    let eot = model.tokenizer().unwrap().token_id("<|EOT|>").unwrap();
    assert_eq!(r.stats.finish, FinishReason::Stop(eot));
    assert_eq!(*r.tokens.last().unwrap(), eot);
    assert!(!r.text.contains("<|EOT|>"));
    // A stop string: the text ends before it.
    let full = model.generate(&messages, &GenerateOptions { ignore_eos: true, ..greedy(80) }).unwrap();
    let visible = format!("{}{}", full.reasoning, full.text);
    let cut = visible.char_indices().nth(10).map(|(i, _)| i).unwrap();
    let stop: String = visible[cut..].chars().take(2).collect();
    let r = model
        .generate(&messages, &GenerateOptions { ignore_eos: true, stop: vec![stop.clone()], ..greedy(80) })
        .unwrap();
    assert_eq!(r.stats.finish, FinishReason::StopString);
    let got = format!("{}{}", r.reasoning, r.text);
    assert!(!got.contains(&stop), "{got:?} still holds {stop:?}");
    assert!(visible.starts_with(&got));
    // The callback can stop generation.
    let mut seen = 0;
    let r = model
        .generate_with(&messages, &GenerateOptions { ignore_eos: true, ..greedy(50) }, |e| {
            seen += 1;
            if matches!(e, Event::Reasoning(_) | Event::Text(_)) && seen >= 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(r.stats.finish, FinishReason::Cancelled);
    assert!(r.tokens.len() < 50);
}

#[test]
fn reasoning_and_answer_are_split() {
    let model = demo();
    let r = model
        .generate(
            &[Message::user("Hi")],
            &GenerateOptions { temperature: Some(0.7), seed: 2, max_new_tokens: 300, ..Default::default() },
        )
        .unwrap();
    let decoded = model.tokenizer().unwrap().decode(&r.tokens).unwrap();
    match decoded.split_once("</think>") {
        Some((before, _)) => assert_eq!(r.reasoning, before),
        None => assert!(r.text.is_empty()),
    }
    assert!(!r.reasoning.contains("</think>"));
}

#[test]
fn bad_input_is_refused() {
    let model = demo();
    let err = |m: &[Message], o: &GenerateOptions| model.generate(m, o).unwrap_err().to_string();
    assert!(err(&[Message::user("  ")], &greedy(4)).contains("the prompt is empty"));
    assert!(err(&[Message::user("hi")], &GenerateOptions { temperature: Some(-1.0), ..Default::default() })
        .contains("temperature must be a number >= 0"));
    assert!(err(
        &[Message::user("hi")],
        &GenerateOptions { top_p: Some(1.5), temperature: Some(1.0), ..Default::default() }
    )
    .contains("top-p must be in (0, 1]"));
    assert!(err(
        &[Message::user("hi")],
        &GenerateOptions { top_p: Some(0.0), temperature: Some(1.0), ..Default::default() }
    )
    .contains("top-p must be in (0, 1]"));
    // Longer than the demo's 4096-token context.
    assert!(err(&[Message::user("ab ".repeat(2100))], &greedy(4))
        .contains("leaves no room in the model's context of 4096 tokens"));
    assert!(err(&[Message::user("look").with_image("/no/such/image.png")], &greedy(4)).contains("/no/such/image.png"));
}

/// A Hugging Face cache holding `owner/name` at `main` (the layout huggingface_hub writes).
fn fake_hub_cache(root: &Path, repo: &str, files: &[&str]) -> PathBuf {
    let base = root.join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(base.join("refs")).unwrap();
    std::fs::write(base.join("refs/main"), commit).unwrap();
    let snap = base.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for f in files {
        std::fs::copy(demo_dir().join(f), snap.join(f)).unwrap();
    }
    snap
}

const ALL_FILES: [&str; 6] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "preprocessor_config.json",
];

#[test]
fn hub_cache_resolves_offline() {
    let cache = tempfile::tempdir().unwrap();
    let snap = fake_hub_cache(cache.path(), "stepfun-ai/step3-demo", &ALL_FILES);
    let model = Step3::from_pretrained("stepfun-ai/step3-demo")
        .cache_dir(cache.path())
        .offline(true)
        .dtype(DType::F32)
        .build()
        .unwrap();
    assert_eq!(model.dir(), snap);
    assert!(!model.generate(&[Message::user("hi")], &greedy(3)).unwrap().tokens.is_empty());
    // A revision given as a commit hash works too.
    let src = step3::ModelSource::parse("stepfun-ai/step3-demo@0123456789abcdef0123456789abcdef01234567").unwrap();
    let opts = step3::HubOptions { offline: true, cache_dir: cache.path().into(), progress: false, token: None };
    assert_eq!(step3::hub::resolve(&src, &opts).unwrap(), snap);

    // A missing weight file is named.
    let cache2 = tempfile::tempdir().unwrap();
    fake_hub_cache(cache2.path(), "owner/partial", &["config.json", "tokenizer.json"]);
    let err =
        Step3::from_pretrained("owner/partial").cache_dir(cache2.path()).offline(true).build().unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("not in the Hugging Face cache"), "{err}");
    let err =
        Step3::from_pretrained("owner/absent").cache_dir(cache2.path()).offline(true).build().unwrap_err().to_string();
    assert!(err.contains("`config.json` of owner/absent@main is not in the Hugging Face cache"), "{err}");
}

#[test]
fn the_binary_takes_model_repo_ids_from_the_cache() {
    let home = tempfile::tempdir().unwrap();
    fake_hub_cache(&home.path().join("hub"), "stepfun-ai/step3-demo", &ALL_FILES);
    let out = Command::new(env!("CARGO_BIN_EXE_step3"))
        .args([
            "generate",
            "--model",
            "stepfun-ai/step3-demo",
            "--ids",
            "256,258,117,115,101,114,10,104,105,259",
            "--max-new-tokens",
            "3",
        ])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim().split(',').count(), 3);
    let out = Command::new(env!("CARGO_BIN_EXE_step3"))
        .args(["logits", "--model", "nobody/nothing", "--ids", "1", "--out", "/dev/null"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nobody/nothing@main is not in the Hugging Face cache"), "{}", stderr(&out));
}

/// The chat example's binary (built by `cargo test`; built here if a filtered run skipped it).
fn chat_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().join("examples");
    let path = dir.join(format!("chat{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", "chat"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .unwrap();
        assert!(status.success());
    }
    path
}

fn chat(args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(chat_example())
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn chat_example_through_stdin() {
    let img = fixtures().join("images/wide_150x62.png");
    let script =
        format!("How are you?\n/image {}\nWhat is in the picture?\n/reset\n\n/quit\nnever read\n", img.display());
    let out = chat(&["--max-new-tokens", "16", "--seed", "4"], &script);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("its answers are noise"), "{err}");
    assert!(err.contains("--model stepfun-ai/step3"), "{err}");
    // Two messages, two answers (no automatic turn); the image went with the second message.
    let stats: Vec<&str> = err.lines().filter(|l| l.starts_with("[prompt ")).collect();
    assert_eq!(stats.len(), 2, "{err}");
    assert!(err.contains("(conversation cleared)"));
    // Piped input is echoed, in order, before each answer.
    let echoed: Vec<&str> = err.lines().filter(|l| l.starts_with("> ")).collect();
    assert_eq!(echoed[..2], ["> How are you?", &format!("> /image {}", img.display())], "{err}");
    // The turn with the image has the image's 3 crops x 11 + 18 global tokens more.
    let prompt_tokens = |l: &str| l.split(' ').nth(1).unwrap().parse::<usize>().unwrap();
    assert!(prompt_tokens(stats[1]) > prompt_tokens(stats[0]) + 50);
    // Reasoning is marked (stdout is not a terminal); --hide-reasoning drops it.
    assert!(stdout(&out).contains("<think>"), "{}", stdout(&out));
    let hidden = chat(&["--max-new-tokens", "16", "--seed", "4", "--hide-reasoning"], "");
    assert!(hidden.status.success());
    assert!(!stdout(&hidden).contains("<think>"));

    // One-shot.
    let one = chat(&["--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0"], "");
    assert!(one.status.success(), "{}", stderr(&one));
    assert_eq!(stderr(&one).lines().filter(|l| l.starts_with("[prompt ")).count(), 1);
}

#[test]
fn chat_example_refuses_bad_input() {
    // A flag clap refuses: its usage error (exit 2), naming the rule.
    let out = chat(&["--prompt", "hi", "--max-new-tokens", "-5"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("must be a whole number of at least 1, got -5"), "{}", stderr(&out));
    let cases: [(&[&str], &str); 7] = [
        (&["--prompt", ""], "--prompt is empty"),
        (&["--prompt", "hi", "--temperature", "-0.5"], "--temperature must be a number >= 0"),
        (&["--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (&["--prompt", "hi", "--device", "tpu"], "unknown device `tpu`"),
        (&["--prompt", "hi", "--model", "nobody/nothing"], "nobody/nothing@main is not in the Hugging Face cache"),
        (&["--prompt", "hi", "--model", "/tmp"], "/tmp has no config.json"),
        (&["--prompt", "hi", "--model", "./nonexistent"], "no such model directory: ./nonexistent"),
    ];
    for (args, needle) in cases {
        let out = chat(args, "");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{args:?}");
        assert!(stdout(&out).is_empty(), "{args:?}: {}", stdout(&out));
    }
}
