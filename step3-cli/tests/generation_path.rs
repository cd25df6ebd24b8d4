//! One generation path: the `step3` command and the library decide the stop tokens in one place
//! (`config.json`, `generation_config.json`, the tokenizer's end-of-turn tokens) and share one set
//! of defaults; impossible budgets are clamped to the context, never a panic.

mod common;

use common::*;
use step3::demo::demo_dir;
use step3::generation::{DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED};
use step3::{DType, Event, FinishReason, GenerateOptions, Message, SamplingParams, Step3};

fn greedy(n: usize, ignore_eos: bool) -> GenerateOptions {
    GenerateOptions { temperature: Some(0.0), max_new_tokens: n, ignore_eos, ..Default::default() }
}

/// Greedy with a repetition penalty, so the demo's random weights give varied tokens.
fn varied(n: usize, ignore_eos: bool) -> GenerateOptions {
    GenerateOptions { repetition_penalty: 3.0, ..greedy(n, ignore_eos) }
}

fn load(dir: &std::path::Path) -> Step3 {
    Step3::from_pretrained(dir.to_string_lossy()).dtype(DType::F32).build().unwrap()
}

fn ids_line(tokens: &[u32]) -> String {
    tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn an_eos_id_added_by_generation_config_stops_the_cli_generate_and_stream_alike() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(demo_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let messages = [Message::user("Hello")];
    // The greedy answer without stopping; its first token not seen before position 2 becomes an
    // extra end-of-turn id in generation_config.json (config.json does not know it).
    let free = load(dir.path()).generate(&messages, &varied(12, true)).unwrap().tokens;
    let stop_at = (2..free.len()).find(|&i| !free[..i].contains(&free[i])).expect("a fresh token");
    let eos = free[stop_at];
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert!(!config.to_string().contains(&format!("\"eos_token_id\":{eos}")));
    let gen_path = dir.path().join("generation_config.json");
    let mut gen: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&gen_path).unwrap()).unwrap();
    gen["eos_token_id"].as_array_mut().unwrap().push(eos.into());
    std::fs::write(&gen_path, gen.to_string()).unwrap();

    let expected = free[..=stop_at].to_vec();
    let model = load(dir.path());
    assert!(model.generation_config().eos_token_ids.contains(&eos));
    // The library, whole and streamed.
    let whole = model.generate(&messages, &varied(12, false)).unwrap();
    assert_eq!((whole.tokens.clone(), whole.stats.finish), (expected.clone(), FinishReason::Stop(eos)));
    let mut done = None;
    for e in model.stream(&messages, &varied(12, false)).unwrap() {
        if let Event::Done(stats) = e.unwrap() {
            done = Some(stats);
        }
    }
    let done = done.unwrap();
    assert_eq!((done.generated_tokens, done.finish), (expected.len(), FinishReason::Stop(eos)));
    // The command, from chat text and from the same prompt's token ids.
    let model_dir = dir.path().to_string_lossy().into_owned();
    let common = [
        "--model-dir",
        model_dir.as_str(),
        "--temperature",
        "0",
        "--repetition-penalty",
        "3",
        "--max-new-tokens",
        "12",
        "--print",
        "ids",
    ];
    let out = step3(&[&["generate", "--prompt", "Hello"], &common[..]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), ids_line(&expected));
    let (prompt, _) = model.prompt(&messages).unwrap();
    let out = step3(&[&["generate", "--ids", &ids_line(&prompt)], &common[..]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), ids_line(&expected));
    // --ignore-eos keeps going through it.
    let out = step3(&[&["generate", "--prompt", "Hello", "--ignore-eos"], &common[..]].concat());
    assert_eq!(stdout(&out).trim(), ids_line(&free));
}

#[test]
fn one_default_set() {
    let (opts, params) = (GenerateOptions::default(), SamplingParams::default());
    assert_eq!((opts.seed, params.seed), (DEFAULT_SEED, DEFAULT_SEED));
    assert_eq!((opts.max_new_tokens, params.max_new_tokens), (DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_NEW_TOKENS));
    // Without generation_config.json, a request that sets nothing is greedy, like the defaults.
    let resolved = step3::GenerationConfig::default().sampling(&opts);
    assert_eq!(resolved, params);
    // The command's defaults are the same constants.
    let help = stdout(&step3(&["generate", "--help"]));
    assert!(help.contains(&format!("[default: {DEFAULT_SEED}]")), "{help}");
    assert!(help.contains(&format!("[default: {DEFAULT_MAX_NEW_TOKENS}]")), "{help}");
    for flag in ["--top-k", "--max-new-tokens", "--seed", "--prompt", "--raw"] {
        let line = help.lines().find(|l| l.trim_start().starts_with(flag)).unwrap_or_default();
        let documented =
            help.split(flag).nth(1).is_some_and(|rest| rest.lines().nth(1).is_some_and(|l| !l.trim().is_empty()));
        assert!(documented || line.len() > flag.len() + 12, "{flag} has no help text:\n{help}");
    }
}

#[test]
fn a_huge_token_budget_is_clamped_to_the_context() {
    let demo = demo_dir().to_string_lossy().into_owned();
    for args in [
        vec!["generate", "--model-dir", &demo, "--ids", "1,2,3", "--temperature", "0", "--ignore-eos"],
        vec!["generate", "--model-dir", &demo, "--prompt", "Hi", "--temperature", "0", "--ignore-eos"],
    ] {
        let out = step3(&[&args[..], &["--max-new-tokens", "18446744073709551615", "--print", "stats"]].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("(the model's context is full)"), "{}", stderr(&out));
    }
    let model = load(&demo_dir());
    let r = model.generate(&[Message::user("Hi")], &greedy(usize::MAX, true)).unwrap();
    let context = model.model().text.config().max_position_embedding();
    assert_eq!(r.stats.finish, FinishReason::Context);
    // The cache holds `context` positions; the last token is produced from the last of them.
    assert_eq!(r.stats.prompt_tokens + r.tokens.len(), context + 1);
}
