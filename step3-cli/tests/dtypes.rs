//! Checkpoints stored in f16/bf16 and compute in f16: they load, and agree with the f32 goldens
//! to within the precision of the narrower dtype.

mod common;

use common::*;
use step3::{DType, Device, Step3Checkpoint};
use step3_cli::verify::relative_error;

fn prefill_logits(dir: &std::path::Path, dtype: DType) -> candle_core::Tensor {
    let ids = [252u32, 89, 59, 131, 19, 16, 159, 255, 87, 55, 100];
    let model = Step3Checkpoint::open(dir).unwrap().load_text_model(dtype, &Device::Cpu).unwrap();
    let (batch, lens) = model.batch_ids(&[&ids]).unwrap();
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    model.logits(&model.forward(&batch, &lens, &mut cache, None).unwrap()).unwrap().squeeze(0).unwrap()
}

#[test]
fn f16_checkpoint_and_f16_compute() {
    let golden = read_tensors(&fixtures().join("vl-f32/golden.safetensors"))["text.seq0.prefill_logits"].clone();

    // The f32 weights rounded to f16 on disk, computed in f32: f16 rounding (2^-11) of every weight.
    let dir = copy_checkpoint("vl-f32");
    edit_weights(dir.path(), |t| t.values_mut().for_each(|v| *v = v.to_dtype(DType::F16).unwrap()));
    let from_f16_file = relative_error(&prefill_logits(dir.path(), DType::F32), &golden).unwrap();
    assert!(from_f16_file < 5e-3, "{from_f16_file}");
    assert!(from_f16_file > 0.0, "an f16 file cannot be bit-exact with f32 weights");

    // f16 compute on the f32 file.
    let f16_compute = relative_error(&prefill_logits(&fixtures().join("vl-f32"), DType::F16), &golden).unwrap();
    assert!(f16_compute < 2e-2, "{f16_compute}");
}

#[test]
fn unsupported_compute_dtype_is_refused() {
    let ckpt = Step3Checkpoint::open(fixtures().join("vl-f32")).unwrap();
    let err = ckpt.load_text_model(DType::U8, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("use f32, bf16 or f16"), "{err}");
}
