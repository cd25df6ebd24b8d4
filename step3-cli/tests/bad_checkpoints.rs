//! Every kind of broken checkpoint gets an error that names the problem, through the library and
//! through the `step3` binary (non-zero exit, no panic).

mod common;

use std::path::Path;

use common::*;
use step3::{DType, Step3Checkpoint};

/// The library error and the CLI's stderr both contain `needle`; the CLI exits 1 without panicking.
fn assert_fails(dir: &Path, needle: &str) {
    let err = load_text_f32(dir).expect_err("load must fail").to_string();
    assert!(err.contains(needle), "library error {err:?} lacks {needle:?}");
    let out = step3(&["logits", "--model-dir", dir.to_str().unwrap(), "--ids", "1,2", "--out", "/dev/null"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains(needle), "CLI stderr {:?} lacks {needle:?}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_checkpoint("vl-f32");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.2.moe.up_proj.weight");
    });
    assert_fails(dir.path(), "tensor `model.layers.2.moe.up_proj.weight` is missing");
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() {
    let dir = copy_checkpoint("vl-f32");
    edit_weights(dir.path(), |t| {
        let w = t["model.layers.0.self_attn.wq.weight"].narrow(0, 0, 64).unwrap();
        t.insert("model.layers.0.self_attn.wq.weight".into(), w);
    });
    assert_fails(dir.path(), "tensor `model.layers.0.self_attn.wq.weight`");
    let err = load_text_f32(dir.path()).unwrap_err().to_string();
    assert!(err.contains("expected shape [128, 48], found [64, 48]"), "{err}");
}

#[test]
fn all_problems_are_counted() {
    let dir = copy_checkpoint("vl-f32");
    edit_weights(dir.path(), |t| {
        t.remove("lm_head.weight");
        t.remove("model.norm.weight");
    });
    let ckpt = Step3Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.check().problems.len(), 2);
    assert!(load_text_f32(dir.path()).unwrap_err().to_string().contains("(and 1 more problems)"));
}

#[test]
fn unsupported_weight_dtype_is_named() {
    let dir = copy_checkpoint("vl-f32");
    edit_weights(dir.path(), |t| {
        let w = t["model.norm.weight"].to_dtype(DType::U8).unwrap();
        t.insert("model.norm.weight".into(), w);
    });
    assert_fails(dir.path(), "tensor `model.norm.weight`");
    assert!(load_text_f32(dir.path()).unwrap_err().to_string().contains("dtype U8"));
}

#[test]
fn truncated_file_is_reported() {
    let dir = copy_checkpoint("vl-f32");
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 1000).unwrap();
    assert_fails(dir.path(), "truncated");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(0).unwrap();
    assert_fails(dir.path(), "model.safetensors");
}

#[test]
fn garbage_file_is_reported() {
    let dir = copy_checkpoint("vl-f32");
    std::fs::write(dir.path().join("model.safetensors"), b"this is not a safetensors file at all").unwrap();
    assert_fails(dir.path(), "not a readable safetensors file");
}

#[test]
fn missing_weights_file_is_reported() {
    let dir = copy_checkpoint("vl-f32");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_fails(dir.path(), "expected model.safetensors or model.safetensors.index.json");
}

#[test]
fn missing_config_key_is_named() {
    let dir = copy_checkpoint("vl-f32");
    edit_config(dir.path(), |v| {
        v["text_config"].as_object_mut().unwrap().remove("moe_layers_enum");
    });
    assert_fails(dir.path(), "key `text_config.moe_layers_enum` is missing");
}

#[test]
fn missing_config_file_is_named() {
    let dir = copy_checkpoint("vl-f32");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_fails(dir.path(), "config.json");
}

#[test]
fn wrong_model_type_is_named() {
    let dir = copy_checkpoint("vl-f32");
    edit_config(dir.path(), |v| v["model_type"] = "deepseek_v3".into());
    assert_fails(dir.path(), "key `model_type` must be \"step3_vl\" or \"step3_text\", found \"deepseek_v3\"");
}

#[test]
fn config_disagreeing_with_weights_is_caught_before_building() {
    // A config that says layer 3 is MoE, while the file has a dense MLP there.
    let dir = copy_checkpoint("vl-f32");
    edit_config(dir.path(), |v| v["text_config"]["moe_layers_enum"] = "1,2,3".into());
    assert_fails(dir.path(), "tensor `model.layers.3.moe.gate.weight` is missing");
}

#[test]
fn sharded_checkpoints_load_and_check_the_index() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("vl-f32/config.json"), dir.path().join("config.json")).unwrap();
    let all = read_tensors(&fixtures().join("vl-f32/model.safetensors"));
    let (mut a, mut b) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in all.into_iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        shard.insert(name.clone(), t);
        map.insert(name, file.into());
    }
    write_tensors(&dir.path().join("model-00001-of-00002.safetensors"), &a);
    write_tensors(&dir.path().join("model-00002-of-00002.safetensors"), &b);
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();

    // Loads, and gives the same logits as the single file.
    let out = greedy_ids(dir.path().to_str().unwrap(), "252,89,59,131,19,16,159,255,87,55,100", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "62,254,177,158,44,184,243,245");

    // An index naming a shard that is not there.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    assert_fails(dir.path(), "model-00002-of-00002.safetensors");

    // An index listing a tensor its shard lacks.
    write_tensors(&dir.path().join("model-00002-of-00002.safetensors"), &b);
    let mut index = index;
    index["weight_map"]["model.extra.weight"] = "model-00002-of-00002.safetensors".into();
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_fails(dir.path(), "tensor `model.extra.weight` is missing from the checkpoint (looked in");
}
