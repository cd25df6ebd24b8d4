//! The `step3` binary as a user runs it: the exact command forms of the README.

mod common;

use common::*;

const SEQ0: &str = "252,89,59,131,19,16,159,255,87,55,100";

fn dir(name: &str) -> String {
    fixtures().join(name).to_string_lossy().into_owned()
}

#[test]
fn logits_writes_goldens_shapes_and_values() {
    let out_dir = tempfile::tempdir().unwrap();
    let out_file = out_dir.path().join("logits.safetensors");
    let out = step3(&[
        "logits",
        "--model-dir",
        &dir("vl-f32"),
        "--ids",
        SEQ0,
        "--out",
        out_file.to_str().unwrap(),
        "--dtype",
        "f32",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ours = read_tensors(&out_file);
    let golden = read_tensors(&fixtures().join("vl-f32/golden.safetensors"));
    for (key, golden_key) in [("logits", "text.seq0.prefill_logits"), ("last_hidden", "text.seq0.prefill_last_hidden")]
    {
        let err = step3_cli::verify::relative_error(&ours[key], &golden[golden_key]).unwrap();
        assert!(err < 1e-4, "{key}: {err}");
        assert_eq!(ours[key].dtype(), step3::DType::F32);
    }
}

#[test]
fn logits_in_bf16_is_close() {
    let out_dir = tempfile::tempdir().unwrap();
    let out_file = out_dir.path().join("logits.safetensors");
    let ids = "116,209,216,97,147,121,83,173,171,148,81";
    let out = step3(&[
        "logits",
        "--model-dir",
        &dir("vl-bf16"),
        "--ids",
        ids,
        "--out",
        out_file.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let golden = read_tensors(&fixtures().join("vl-bf16/golden.safetensors"));
    let err = step3_cli::verify::relative_error(
        &read_tensors(&out_file)["logits"],
        &golden["bf16compute.text.seq0.prefill_logits"],
    )
    .unwrap();
    assert!(err < step3_cli::verify::BF16_TOLERANCE, "{err}");
}

#[test]
fn generate_prints_exactly_the_greedy_ids() {
    let out = greedy_ids(&dir("vl-f32"), SEQ0, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "62,254,177,158,44,184,243,245\n");
    let out = greedy_ids(&dir("moe-renorm-f32"), "155,130,177,218,127,116", &[]);
    assert_eq!(stdout(&out), "16,75,148,319,260,176,74,61\n");
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let run = |seed: &str| {
        let out = step3(&[
            "generate",
            "--model-dir",
            &dir("vl-f32"),
            "--ids",
            SEQ0,
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            seed,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn inspect_reports_the_real_step3_size() {
    let config = format!("{}/../configs/step3/config.json", env!("CARGO_MANIFEST_DIR"));
    let out = step3(&["inspect", "--config", &config]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("316.29B language model"), "{text}");
    assert!(text.contains("MoE: 4-59; dense: 0-3, 60"), "{text}");
    assert!(text.contains("61.0 KiB per token in bf16"), "{text}");
    let out = step3(&["inspect", "--config", &config, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["parameters"]["total"], 316_294_538_240u64);
    assert_eq!(v["kv_cache_bytes_per_token"]["bf16"], 61 * 1024);
}

#[test]
fn inspect_checks_the_inventory() {
    let out = step3(&["inspect", "--model-dir", &dir("vl-f32")]);
    assert!(out.status.success(), "{}", stderr(&out));
    // 55 language-model tensors and the 33 of the vision tower and projector.
    assert!(stdout(&out).contains("inventory       OK: all 88 expected tensors"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("other tensor"), "{}", stdout(&out));
}

#[test]
fn bad_arguments_fail_cleanly() {
    let cases: [(&[&str], &str); 8] = [
        (&["generate", "--model-dir", &dir("vl-f32"), "--ids", "1,x"], "`x` in --ids is not a token id"),
        (&["generate", "--model-dir", &dir("vl-f32"), "--ids", ""], "--ids is empty"),
        (&["generate", "--model-dir", &dir("vl-f32"), "--ids", "1,999"], "token id 999 is outside the vocabulary"),
        (
            &["generate", "--model-dir", &dir("vl-f32"), "--ids", "1", "--temperature", "-1"],
            "temperature must be a number >= 0",
        ),
        (
            &["generate", "--model-dir", &dir("vl-f32"), "--ids", "1", "--temperature", "1", "--top-p", "1.5"],
            "top-p must be in (0, 1]",
        ),
        (&["generate", "--model-dir", &dir("vl-f32"), "--ids", "1", "--device", "tpu"], "unknown device `tpu`"),
        (&["generate", "--model-dir", &dir("vl-f32"), "--ids", "1", "--dtype", "int4"], "unknown dtype `int4`"),
        (&["generate", "--model-dir", "/nonexistent/model", "--ids", "1"], "/nonexistent/model"),
    ];
    for (args, needle) in cases {
        let out = step3(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{args:?} printed {}", stdout(&out));
    }
}

/// `step3 bench products` refuses what the kernels cannot run before it allocates anything.
#[test]
fn bench_products_refuses_bad_flags() {
    let cases: [(&[&str], &str); 3] = [
        (&["bench", "products", "--rows", "17"], "at most 16 rows"),
        (&["bench", "products", "--weights", "bf16,q4"], "`q4` is not one of f32, bf16, fp8"),
        (&["bench", "products", "--rows", "1,0"], "--rows"),
    ];
    for (args, needle) in cases {
        let out = step3(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{args:?} printed {}", stdout(&out));
    }
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    // The tiny checkpoint has a 4096-token context.
    let ids = vec!["7"; 4096].join(",");
    let out = step3(&["generate", "--model-dir", &dir("vl-f32"), "--ids", &ids, "--max-new-tokens", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no room in the model's context of 4096 tokens"), "{}", stderr(&out));
}

#[test]
fn verify_runs_the_goldens() {
    let out = step3(&["verify", "--fixtures", &fixtures().to_string_lossy(), "--device", "cpu", "--dtype", "f32"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains(": 0 failed"), "{}", stdout(&out));
}

/// Each error says its cause once (no "X: X" from an error printed and also chained as its source).
#[test]
fn errors_say_their_cause_once() {
    let empty = tempfile::tempdir().unwrap();
    let empty_dir = empty.path().to_string_lossy().into_owned();
    let demo = step3::demo::demo_dir().to_string_lossy().into_owned();
    let cases: [(&[&str], &str); 4] = [
        (&["generate", "--model-dir", "/nonexistent", "--ids", "1"], "no such model directory: /nonexistent"),
        (&["generate", "--model-dir", &empty_dir, "--ids", "1"], "has no config.json"),
        (
            &["generate", "--model-dir", &demo, "--prompt", "hi", "--image", "/nonexistent.png"],
            "/nonexistent.png: No such file",
        ),
        (&["generate", "--model", "./nonexistent", "--ids", "1"], "no such model directory: ./nonexistent"),
    ];
    for (args, needle) in cases {
        let out = step3(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.matches(needle).count(), 1, "{args:?}: {err}");
        let cause = needle.split(": ").last().unwrap();
        assert_eq!(err.matches(cause).count(), 1, "{args:?} repeats `{cause}`: {err}");
        assert!(!err.contains("os error 2): No such"), "{err}");
    }
    // --offline names itself, not an environment variable that is not set.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_step3"))
        .args(["generate", "--model", "nobody/nothing", "--offline", "--ids", "1"])
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(err.contains("working offline (--offline or HF_HUB_OFFLINE)"), "{err}");
    assert!(!err.contains("HF_HUB_OFFLINE is set"), "{err}");
}

/// Text prompts: chat-templated by default, raw with --raw, images placed and expanded by the
/// command itself.
#[test]
fn generate_takes_text_and_images() {
    let demo = step3::demo::demo_dir().to_string_lossy().into_owned();
    let img = fixtures().join("images/wide_150x62.png").to_string_lossy().into_owned();
    let run = |extra: &[&str]| {
        let base = ["generate", "--model-dir", demo.as_str(), "--temperature", "0", "--max-new-tokens", "6"];
        step3(&[&base[..], extra].concat())
    };
    let chat = run(&["--prompt", "What is this?", "--image", &img, "--print", "stats"]);
    assert!(chat.status.success(), "{}", stderr(&chat));
    let prompt_tokens = |o: &std::process::Output| {
        let err = stderr(o);
        err.lines().find_map(|l| l.strip_prefix("prompt ")?.split(' ').next()?.parse::<usize>().ok()).unwrap()
    };
    // The chat prompt holds the image's whole layout (3 crops of 11 and a global view of 18 tokens
    // plus markers) around the text.
    assert!(prompt_tokens(&chat) > 60, "{}", stderr(&chat));
    let text = run(&["--prompt", "What is this?"]);
    assert!(text.status.success(), "{}", stderr(&text));
    assert!(stdout(&text).starts_with("<think>"), "{}", stdout(&text));
    // Raw text without a placeholder gets one per image, in front.
    let raw = run(&["--prompt", "What is this?", "--raw", "--image", &img, "--print", "stats"]);
    assert!(raw.status.success(), "{}", stderr(&raw));
    let raw_plain = run(&["--prompt", "What is this?", "--raw", "--print", "stats"]);
    assert!(prompt_tokens(&raw) > prompt_tokens(&raw_plain) + 50);
    assert!(prompt_tokens(&raw) < prompt_tokens(&chat));
    // --prompt and --ids are one or the other; --raw needs --prompt.
    let both = run(&["--prompt", "x", "--ids", "1"]);
    assert_eq!(both.status.code(), Some(2));
    let neither = run(&[]);
    assert_eq!(neither.status.code(), Some(2));
    assert!(stderr(&neither).contains("--prompt") && stderr(&neither).contains("--ids"), "{}", stderr(&neither));
    // Flags with rules say them, negative numbers included.
    let neg = step3(&["generate", "--model-dir", &demo, "--prompt", "x", "--max-new-tokens", "-5"]);
    assert!(stderr(&neg).contains("must be a whole number of at least 1, got -5"), "{}", stderr(&neg));
}

#[test]
fn inspect_assumes_the_dtype_the_device_runs() {
    let demo = step3::demo::demo_dir().to_string_lossy().into_owned();
    let out = step3(&["inspect", "--model-dir", &demo]);
    assert!(stdout(&out).contains("language-model weights in F32"), "{}", stdout(&out));
    let out = step3(&["inspect", "--model-dir", &demo, "--device", "cuda"]);
    assert!(stdout(&out).contains("language-model weights in BF16"), "{}", stdout(&out));
}

#[test]
fn generate_and_logits_split_over_ranks_give_the_same_answer() {
    // Greedy ids through the engine with TP 2 × EP 2 and host experts: the unsharded answer.
    let out = greedy_ids(&dir("vl-f32"), SEQ0, &["--tp", "2", "--ep", "2", "--n-cpu-moe", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "62,254,177,158,44,184,243,245\n");
    // Logits with TP 4 against the golden.
    let out_dir = tempfile::tempdir().unwrap();
    let out_file = out_dir.path().join("logits.safetensors");
    let path = out_file.to_str().unwrap();
    let out = step3(&["logits", "--model-dir", &dir("vl-f32"), "--ids", SEQ0, "--out", path, "--tp", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let golden = read_tensors(&fixtures().join("vl-f32/golden.safetensors"));
    let err =
        step3_cli::verify::relative_error(&read_tensors(&out_file)["logits"], &golden["text.seq0.prefill_logits"])
            .unwrap();
    assert!(err < 1e-5, "{err}");
    // Layouts that cannot run fail before loading, naming the constraint.
    let out = greedy_ids(&dir("vl-f32"), SEQ0, &["--tp", "3"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("num_attention_heads = 4 is not divisible by tp 3"), "{}", stderr(&out));
    let out = greedy_ids(&dir("vl-f32"), SEQ0, &["--moe-device", "disk"]);
    assert!(stderr(&out).contains("--moe-device must be"), "{}", stderr(&out));
}

#[test]
fn inspect_plans_memory_per_device() {
    let config = format!("{}/../configs/step3/config.json", env!("CARGO_MANIFEST_DIR"));
    let plan = |args: &[&str]| {
        let mut all = vec!["inspect", "--config", &config, "--device", "cuda"];
        all.extend_from_slice(args);
        step3(&all)
    };
    // FP8 on 8 GPUs, TP 8: about 41 GiB on rank 0 (embedding and lm_head), 37.6 GiB elsewhere.
    let out = plan(&["--tp", "8", "--fp8", "--device-memory-gib", "96"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("tp 8 x ep 1 = 8 device(s)"), "{text}");
    assert!(text.contains("rank 0        weights 41.00 GiB"), "{text}");
    assert!(text.contains("ranks 1-7     weights 37.56 GiB"), "{text}");
    // One GPU with every routed expert in host memory.
    let out = plan(&["--moe-device", "cpu", "--fp8", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let rank = &v["device_plan"]["ranks"][0];
    assert!(rank["device_weights"].as_u64().unwrap() < 25 << 30, "{rank}");
    assert!(rank["host_weights"].as_u64().unwrap() > 250 << 30, "{rank}");
    // A split that cuts FP8 blocks is refused, naming the tensor.
    let out = plan(&["--tp", "16", "--fp8"]);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("model.layers.4.share_expert.gate_proj.weight"), "{}", stdout(&out));
}

#[test]
fn verify_checks_the_goldens_on_a_split_model() {
    // Two fixture folders: one the layout splits, one whose FP8 blocks it would cut.
    let tmp = tempfile::tempdir().unwrap();
    for name in ["vl-f32", "fp8-block"] {
        std::os::unix::fs::symlink(fixtures().join(name), tmp.path().join(name)).unwrap();
    }
    let layout = step3::Layout::new(2, 2, None).unwrap();
    let checks = step3_cli::verify::verify_sharded(
        tmp.path(),
        step3::DType::F32,
        &step3::Device::Cpu,
        &layout,
        step3::ExpertPlacement::Host,
    )
    .unwrap();
    let split: Vec<_> = checks.iter().filter(|c| c.name.starts_with("vl-f32/")).collect();
    assert!(split.len() >= 20, "{checks:?}");
    assert!(split.iter().all(|c| c.gating && c.passed() && c.name.ends_with("@tp2ep2+host-experts")), "{split:?}");
    let skipped: Vec<_> = checks.iter().filter(|c| c.name.starts_with("fp8-block/")).collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(!skipped[0].gating && skipped[0].to_string().starts_with("skip"), "{}", skipped[0]);
}
