//! The bundled demo checkpoint is exactly what `step3::demo::write_demo` writes, and it works.

use step3::demo::{demo_dir, write_demo};

#[test]
fn bundled_demo_is_regenerated_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    write_demo(tmp.path()).unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "preprocessor_config.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    for name in names {
        let fresh = std::fs::read(tmp.path().join(&name)).unwrap();
        let bundled = std::fs::read(demo_dir().join(&name)).unwrap_or_else(|e| panic!("demo/step3-demo/{name}: {e}"));
        assert!(
            fresh == bundled,
            "demo/step3-demo/{name} differs from what write_demo writes: run `step3 demo --out demo/step3-demo`"
        );
    }
}

#[test]
fn demo_passes_the_inventory_and_has_step3_specials() {
    let ckpt = step3::Step3Checkpoint::open(demo_dir()).unwrap();
    let report = ckpt.check_all();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    let tok = step3::Step3Tokenizer::from_dir(&demo_dir()).unwrap();
    for t in step3::demo::SPECIAL_TOKENS {
        assert!(tok.token_id(t).is_some(), "{t}");
    }
    assert_eq!(tok.token_id("<im_patch>"), ckpt.config().image_token_id);
}

/// `step3 demo --size 200m` writes a checkpoint that passes the inventory (block-FP8 included),
/// whose tokenizer decodes every id the model can emit, and that `step3 generate` runs.
#[test]
fn bench_checkpoint_loads_decodes_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s200");
    let step3 = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_step3")).args(args).output().unwrap();
    let out = step3(&["demo", "--out", dir.to_str().unwrap(), "--size", "200m", "--dtype", "bf16", "--fp8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let ckpt = step3::Step3Checkpoint::open(&dir).unwrap();
    let report = ckpt.check_all();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    let cfg = &ckpt.config().text;
    let tok = step3::Step3Tokenizer::from_dir(&dir).unwrap();
    for id in [0, 300, cfg.vocab_size as u32 - 1] {
        assert!(!tok.decode(&[id]).unwrap().is_empty(), "id {id} decodes to nothing");
    }

    let out = step3(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        "1,2,3",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The toy size takes no dtype: a mistaken flag is an error, not a silently ignored one.
    let out = step3(&["demo", "--out", tmp.path().join("toy").to_str().unwrap(), "--fp8"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size 200m"));
}
