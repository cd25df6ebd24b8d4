//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

/// The repository's root (this package sits one level below it).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/step3-tiny")
}

/// A fixture checkpoint's `golden.json`.
pub fn golden_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join(name).join("golden.json")).expect("read golden.json");
    serde_json::from_str(&text).expect("parse golden.json")
}

/// Copies a fixture checkpoint folder (config + weights only) into a fresh temporary directory.
pub fn copy_checkpoint(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join(name).join(f), dir.path().join(f)).expect("copy fixture");
    }
    dir
}

pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("read safetensors")
}

pub fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, path).expect("write safetensors")
}

/// Rewrites a checkpoint's `model.safetensors` after `f` has edited its tensors.
pub fn edit_weights(dir: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = read_tensors(&path);
    f(&mut t);
    write_tensors(&path, &t);
}

/// Rewrites a checkpoint's `config.json` after `f` has edited it.
pub fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read config.json")).expect("parse config.json");
    f(&mut v);
    std::fs::write(&path, v.to_string()).expect("write config.json")
}

/// Loads the text model of the checkpoint in `dir` in f32 on the CPU.
pub fn load_text_f32(dir: &Path) -> Result<step3::Step3TextModel, step3::Error> {
    step3::Step3Checkpoint::open(dir)?.load_text_model(candle_core::DType::F32, &Device::Cpu)
}

/// Runs the `step3` binary.
pub fn step3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_step3")).args(args).output().expect("run step3")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `step3 generate --model-dir DIR --ids IDS [extra..] --max-new-tokens 8 --temperature 0 --print ids`:
/// the eight greedy tokens the goldens record, printed as one comma-separated line.
pub fn greedy_ids(model_dir: &str, ids: &str, extra: &[&str]) -> Output {
    let mut args = vec!["generate", "--model-dir", model_dir, "--ids", ids];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--max-new-tokens", "8", "--temperature", "0", "--print", "ids"]);
    step3(&args)
}
