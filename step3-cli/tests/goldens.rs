//! Every golden of the reference (tests/fixtures/step3-tiny) through `step3::verify`, the same code
//! `step3 verify` runs: preprocessing (tiny and real settings), text (prefill logits and hidden
//! states, router choices, KV-cached decode, greedy tokens, the padded batch), vision (tower,
//! downsamplers, projector, resized position table), multimodal prompts and block-FP8, at the
//! fixtures' tolerances.

mod common;

use common::fixtures;
use step3::{DType, Device};
use step3_cli::verify::{verify_fixtures, GoldenCheck, Measure};

fn run(dtype: DType) -> Vec<GoldenCheck> {
    let checks = verify_fixtures(&fixtures(), dtype, &Device::Cpu).expect("fixtures run");
    for c in &checks {
        println!("{c}");
    }
    checks
}

fn assert_all_pass(checks: &[GoldenCheck]) {
    let failed: Vec<String> = checks.iter().filter(|c| c.failed()).map(|c| c.to_string()).collect();
    assert!(failed.is_empty(), "failing goldens:\n{}", failed.join("\n"));
}

#[test]
fn f32_goldens_match_the_reference() {
    let checks = run(DType::F32);
    assert_all_pass(&checks);
    // Every kind of golden must actually have been compared, for every f32 golden set.
    for want in [
        "vl-f32/text.seq0.prefill_logits",
        "vl-f32/text.seq1.prefill_last_hidden",
        "vl-f32/text.seq0.router.layer1.topk_ids",
        "vl-f32/text.seq1.router.layer2.topk_weights",
        "vl-f32/text.seq0.decode_logits",
        "vl-f32/text.seq1.decode_last_hidden",
        "vl-f32/text.seq0.greedy_tokens",
        "vl-f32/text.batched.seq1.decode_logits",
        "vl-bf16/f32compute.text.seq0.prefill_logits",
        "vl-bf16/f32compute.text.seq1.greedy_tokens",
        "text-bf16/f32compute.text.seq0.prefill_logits",
        "text-bf16/f32compute.text.seq1.decode_logits",
        "text-bf16/f32compute.text.seq1.greedy_tokens",
        "moe-renorm-f32/text.seq0.router.layer2.topk_weights",
        "moe-renorm-f32/text.seq1.greedy_tokens",
        "moe-renorm-f32/no_renorm.text.seq1.prefill_logits",
        "fp8-block/text.seq0.prefill_logits",
        "fp8-block/text.seq1.decode_logits",
        "fp8-block/text.seq1.greedy_tokens",
        "fp8-block/dequant.model.layers.0.self_attn.k_proj.weight",
        "fp8-block/dequant.model.layers.1.moe.down_proj.weight.e1_rows120_136",
        "fp8-block/quantized_tensors.model.layers.1.moe.gate_proj.weight.dequant_abs_sum",
        "preprocess/tiny.band_800x450.crop_canvas_u8_sha256",
        "preprocess/tiny.strip_200x20.resized_u8",
        "preprocess/tiny.tall_84x200.crop_canvas_u8",
        "preprocess/tiny.grid_760x620.patch_pixel_values",
        "preprocess/tiny.pano_900x150.token_layout_segments",
        "preprocess/real.grid_760x620.patch_pixel_values_sub8",
        "preprocess/real.grid_760x620.pixel_values_stats.abs_sum",
        "preprocess/thin.thin_1x1.pixel_values_sub2",
        "preprocess/thin.thin_1x4.patch_newline_mask",
        "preprocess/thin.thin_1x4000.patch_pixel_values_sub4",
        "preprocess/thin.thin_4000x1.crop_canvas_u8_sha256",
        "preprocess/thin.thin_4000x1.token_layout_segments",
        "vl-f32/vision.pixel_values",
        "vl-f32/vision.global.encoder_out_full",
        "vl-f32/vision.patch.down1",
        "vl-f32/vision.patch.down2",
        "vl-f32/vision.global.projected",
        "vl-f32/vision.patch.position_embedding_interp",
        "vl-f32/vision.image_embeds",
        "vl-f32/mm.prefill_logits",
        "vl-f32/mm.decode_logits",
        "vl-f32/mm.greedy_tokens",
        "vl-bf16/f32compute.mm.prefill_last_hidden",
        "vl-bf16/f32compute.mm.greedy_tokens",
        "moe-renorm-f32/vision.patch.projected",
        "moe-renorm-f32/vision.image_embeds",
    ] {
        assert!(checks.iter().any(|c| c.name == want), "no check named {want}");
    }
    // Every quantised tensor of the FP8 checkpoint has its sums checked.
    let sums = checks.iter().filter(|c| c.name.starts_with("fp8-block/quantized_tensors.")).count();
    assert_eq!(sums, 2 * 27);
    // Every preprocessing golden of the 7 tiny images and the real-settings image is checked.
    assert!(checks.iter().filter(|c| c.name.starts_with("preprocess/tiny.")).count() >= 7 * 6);
    // ... and of the 8 thin images (1x1 up to 4000x1).
    assert!(checks.iter().filter(|c| c.name.starts_with("preprocess/thin.")).count() >= 8 * 7);
    // Exact goldens are gating; float agreement is far inside the tolerance and the resamplers
    // are bit-exact.
    for c in &checks {
        assert!(c.gating, "{c}");
        match c.measure {
            Measure::RelErr { worst, .. } => assert!(worst < 1e-5, "{c}"),
            Measure::AbsErr { worst, .. } => assert_eq!(worst, 0.0, "{c}"),
            _ => {}
        }
    }
}

#[test]
fn bf16_compute_matches_the_reference_loosely() {
    let checks = run(DType::BF16);
    assert_all_pass(&checks);
    // The reference's own bf16 goldens gate at 5e-2, on the official checkpoint and on
    // `text-bf16` (other sizes, top-2, theta 1e4), where bf16 rounding that departs from
    // PyTorch's drifts past 5e-2. The text path follows PyTorch's rounding op for op, so it
    // stays within 2e-2 on every sequence (in practice ≤ 1e-2, mostly bit-exact).
    for folder in ["vl-bf16", "text-bf16"] {
        for want in [
            "prefill_logits",
            "prefill_last_hidden",
            "decode_logits",
            "decode_last_hidden",
            "router.layer1.topk_weights",
        ] {
            for seq in ["seq0", "seq1"] {
                let name = format!("{folder}/bf16compute.text.{seq}.{want}");
                let c = checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no check {name}"));
                assert!(c.gating && c.passed(), "{c}");
                let Measure::RelErr { worst, .. } = c.measure else { panic!("{c}") };
                assert!(worst <= 2e-2, "{c}");
            }
        }
    }
    for want in ["prefill_logits", "prefill_last_hidden", "decode_logits"] {
        let name = format!("vl-bf16/bf16compute.mm.{want}");
        let c = checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no check {name}"));
        assert!(c.gating && c.passed(), "{c}");
    }
    // ... while f32 goldens recomputed in bf16 are reported for information only.
    let cross = checks.iter().find(|c| c.name == "vl-f32/text.seq0.decode_logits@bf16").expect("cross-dtype check");
    assert!(!cross.gating);
}
