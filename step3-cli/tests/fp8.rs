//! Block-FP8 checkpoints: compact in memory, exact dequantisation, every entry point, and clear
//! errors for broken quantisation data. (The goldens themselves run in goldens.rs.)

mod common;

use std::path::Path;

use candle_core::Tensor;
use common::*;
use step3::{DType, Device, Fp8Storage, LoadOptions, Step3Checkpoint};

const SEQ0: [u32; 11] = [223, 235, 45, 55, 150, 236, 82, 145, 54, 92, 136];

fn logits(model: &step3::Step3TextModel) -> Tensor {
    let (ids, lens) = model.batch_ids(&[&SEQ0]).unwrap();
    let mut cache = model.new_cache(1, SEQ0.len()).unwrap();
    model.logits(&model.forward(&ids, &lens, &mut cache, None).unwrap()).unwrap()
}

fn load_err(dir: &Path) -> String {
    match load_text_f32(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn weights_stay_compact_and_match_the_dequantised_model() {
    let ckpt = Step3Checkpoint::open(fixtures().join("fp8-block")).unwrap();
    let opts = |fp8| LoadOptions { dtype: DType::F32, device: Device::Cpu, fp8, ..Default::default() };
    let compact = ckpt.load_text_model_with(&opts(Fp8Storage::Compact)).unwrap();
    let dequantized = ckpt.load_text_model_with(&opts(Fp8Storage::Dequantized)).unwrap();

    // The prediction `inspect` prints is what loading really holds.
    assert_eq!(compact.storage_bytes(), ckpt.resident_bytes(DType::F32, Fp8Storage::Compact));
    assert_eq!(dequantized.storage_bytes(), ckpt.resident_bytes(DType::F32, Fp8Storage::Dequantized));
    // FP8 weights take one byte per value (+ f32 scales per 128x128 block) instead of four.
    let fp8_values: usize = ckpt.fp8_tensors().iter().map(|t| t.numel()).sum();
    assert!(compact.storage_bytes() + 3 * fp8_values <= dequantized.storage_bytes() + 4 * fp8_values / 1000);

    // In bf16 (the dtype of everything not quantised) the resident weights are exactly the bytes
    // the file stores for the language model: FP8 values, their scales and the bf16 tensors.
    let bf16 = ckpt.load_text_model_with(&opts(Fp8Storage::Compact).with_dtype(DType::BF16)).unwrap();
    let w = ckpt.weights();
    let on_disk: usize = ckpt
        .expected_tensors()
        .iter()
        .flat_map(|t| [t.name.clone(), format!("{}_scale_inv", t.name)])
        .filter_map(|n| w.info(&n).map(|i| i.nbytes()))
        .sum();
    assert_eq!(bf16.storage_bytes(), on_disk);

    // The CPU kernels read the FP8 bytes in place and apply each block's scale once to the
    // block's sum; a weight dequantised at load multiplies as f32. The same values up to f32
    // rounding.
    let (a, b) = (logits(&compact), logits(&dequantized));
    let err = step3_cli::verify::relative_error(&a, &b).unwrap();
    assert!(err < 1e-5, "{err}");
}

#[test]
fn every_entry_point_works_on_fp8() {
    let dir = fixtures().join("fp8-block").to_string_lossy().into_owned();
    let ids = SEQ0.map(|i| i.to_string()).join(",");
    let out = step3(&["generate", "--model-dir", &dir, "--ids", &ids, "--max-new-tokens", "8", "--temperature", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "240,227,56,161,124,220,242,225\n");
    let out = step3(&["generate", "--model-dir", &dir, "--ids", &ids, "--max-new-tokens", "8", "--fp8", "dequantized"]);
    assert_eq!(stdout(&out), "240,227,56,161,124,220,242,225\n");

    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("l.safetensors");
    let out = step3(&["logits", "--model-dir", &dir, "--ids", &ids, "--out", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let golden = read_tensors(&fixtures().join("fp8-block/golden.safetensors"));
    let err =
        step3_cli::verify::relative_error(&read_tensors(&file)["logits"], &golden["text.seq0.prefill_logits"]).unwrap();
    assert!(err < 1e-4, "{err}");

    let out = step3(&["inspect", "--model-dir", &dir]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("27 FP8 tensors"), "{text}");
    assert!(text.contains("with FP8 kept compact"), "{text}");
    let out = step3(&["inspect", "--model-dir", &dir, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["weights"]["fp8_tensors"].as_array().unwrap().len(), 27);
    assert_eq!(v["weights"]["quantization"]["weight_block_size"], serde_json::json!([128, 128]));

    // The library API, through the facade.
    let model = Step3Checkpoint::open(&dir).unwrap().load_text_model(DType::BF16, &Device::Cpu).unwrap();
    let params = step3::SamplingParams { max_new_tokens: 4, ..Default::default() };
    assert_eq!(step3::generate(&model, &SEQ0, &params, |_| {}).unwrap().tokens.len(), 4);
}

#[test]
fn weight_scale_is_accepted_as_an_alias() {
    let dir = copy_checkpoint("fp8-block");
    edit_weights(dir.path(), |t| {
        let names: Vec<String> = t.keys().filter(|k| k.ends_with("_scale_inv")).cloned().collect();
        for n in names {
            let v = t.remove(&n).unwrap();
            t.insert(n.trim_end_matches("_inv").to_string(), v);
        }
    });
    let ckpt = Step3Checkpoint::open(dir.path()).unwrap();
    let model = ckpt.load_text_model(DType::F32, &Device::Cpu).unwrap();
    let golden = read_tensors(&fixtures().join("fp8-block/golden.safetensors"));
    let err =
        step3_cli::verify::relative_error(&logits(&model).squeeze(0).unwrap(), &golden["text.seq0.prefill_logits"])
            .unwrap();
    assert!(err < 1e-4, "{err}");
}

#[test]
fn missing_scale_is_named() {
    let dir = copy_checkpoint("fp8-block");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.moe.up_proj.weight_scale_inv");
    });
    let err = load_err(dir.path());
    assert!(err.contains("block-FP8 weight `model.layers.1.moe.up_proj.weight` has no scale tensor"), "{err}");
}

#[test]
fn wrong_scale_shape_is_named() {
    let dir = copy_checkpoint("fp8-block");
    edit_weights(dir.path(), |t| {
        let s = t["model.layers.0.self_attn.o_proj.weight_scale_inv"].narrow(1, 0, 1).unwrap();
        t.insert("model.layers.0.self_attn.o_proj.weight_scale_inv".into(), s);
    });
    let err = load_err(dir.path());
    assert!(err.contains("tensor `model.layers.0.self_attn.o_proj.weight_scale_inv`"), "{err}");
    assert!(err.contains("expected shape [2, 2], found [2, 1]"), "{err}");
}

#[test]
fn unsupported_quantization_is_named() {
    let dir = copy_checkpoint("fp8-block");
    edit_config(dir.path(), |v| v["quantization_config"]["quant_method"] = "gptq".into());
    let err = load_err(dir.path());
    assert!(err.contains("`quantization_config.quant_method` is \"gptq\": unsupported quantization"), "{err}");
    let out = step3(&["generate", "--model-dir", dir.path().to_str().unwrap(), "--ids", "1,2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("gptq"));
}

#[test]
fn fp8_weight_without_quantization_config_is_refused() {
    let dir = copy_checkpoint("fp8-block");
    edit_config(dir.path(), |v| {
        v.as_object_mut().unwrap().remove("quantization_config");
    });
    let err = load_err(dir.path());
    assert!(err.contains("dtype F8_E4M3") && err.contains("no quantization_config"), "{err}");
}

#[test]
fn fp8_outside_the_linear_weights_is_refused() {
    let dir = copy_checkpoint("fp8-block");
    edit_weights(dir.path(), |t| {
        let r = t["model.layers.1.moe.gate.weight"].to_dtype(DType::F8E4M3).unwrap();
        t.insert("model.layers.1.moe.gate.weight".into(), r);
    });
    let err = load_err(dir.path());
    assert!(err.contains("tensor `model.layers.1.moe.gate.weight`") && err.contains("only linear weights"), "{err}");
}
