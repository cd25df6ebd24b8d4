//! `step3 experts` and `step3::experts` on the tiny checkpoint: an untouched copy flags no
//! expert; a copy whose layer-2 experts 1 and 4 have their down projections scaled to ~0 and
//! whose layer-1 router is pushed away from expert 2 flags exactly those.

mod common;

use candle_core::Tensor;
use common::*;
use step3::experts::{self, ExpertFlag, FlagKind, FlagRules};
use step3::{DType, Device, Step3Checkpoint};

/// The golden prompts of `vl-f32` and `vl-bf16` (the multimodal one as plain ids): 160 tokens,
/// 80 routed slots per expert when balanced. (With fewer, this small random router leaves some
/// expert unused by chance.)
fn prompts() -> Vec<Vec<u32>> {
    let (f, b) = (golden_json("vl-f32"), golden_json("vl-bf16"));
    [(&f, "text.seq0"), (&f, "text.seq1"), (&b, "f32compute.text.seq0"), (&b, "f32compute.text.seq1"), (&f, "mm")]
        .iter()
        .map(|(g, k)| g[*k]["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
        .collect()
}

fn flags(dir: &std::path::Path) -> Vec<(usize, usize, FlagKind)> {
    let ckpt = Step3Checkpoint::open(dir).unwrap();
    let rules = FlagRules::default();
    let weights = experts::weight_stats(&ckpt, &mut |_, _| {}).unwrap();
    let model = ckpt.load_text_model(DType::F32, &Device::Cpu).unwrap();
    let routing = experts::routing_stats(&model, &prompts(), &mut |_, _| {}).unwrap();
    assert_eq!(routing.tokens, 160);
    let mut all: Vec<ExpertFlag> = rules.weight_flags(&weights);
    all.extend(rules.routing_flags(&routing));
    let mut out: Vec<_> = all.into_iter().map(|f| (f.layer, f.expert, f.kind)).collect();
    out.sort();
    out
}

/// The normalised inputs `z` of MoE layer `layer` for the prompts, one row per token.
fn layer_inputs(dir: &std::path::Path, layer: usize) -> Vec<Vec<f32>> {
    let model = Step3Checkpoint::open(dir).unwrap().load_text_model(DType::F32, &Device::Cpu).unwrap();
    let mut rows = Vec::new();
    for ids in prompts() {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        let embeds = model.embed(&input).unwrap();
        model
            .forward_observed(&embeds, &[ids.len()], &mut cache, &mut |l, z, _| {
                if l == layer {
                    rows.extend(z.to_vec2::<f32>()?);
                }
                Ok(())
            })
            .unwrap();
    }
    rows
}

/// A direction `u` with `u · z > 0` for every row (perceptron through the origin).
fn positive_direction(rows: &[Vec<f32>]) -> Vec<f32> {
    let unit = |z: &[f32]| -> Vec<f32> {
        let n = z.iter().map(|v| v * v).sum::<f32>().sqrt();
        z.iter().map(|v| v / n).collect()
    };
    let mut u = vec![0f32; rows[0].len()];
    for _ in 0..10_000 {
        let bad = rows.iter().find(|z| z.iter().zip(&u).map(|(a, b)| a * b).sum::<f32>() <= 0.1);
        let Some(z) = bad else { return u };
        u.iter_mut().zip(unit(z)).for_each(|(a, b)| *a += b);
    }
    panic!("no direction found")
}

#[test]
fn untouched_checkpoint_flags_no_expert() {
    assert_eq!(flags(&fixtures().join("vl-f32")), vec![]);
}

#[test]
fn vanishing_and_dead_experts_are_flagged_and_nothing_else() {
    let dir = copy_checkpoint("vl-f32");
    let u = positive_direction(&layer_inputs(dir.path(), 1));
    edit_weights(dir.path(), |t| {
        // Layer 2: experts 1 and 4 contribute (almost) nothing.
        let down = t["model.layers.2.moe.down_proj.weight"].clone();
        let scale = Tensor::new(&[1f32, 1e-4, 1.0, 1.0, 1e-4, 1.0], &Device::Cpu).unwrap().reshape((6, 1, 1)).unwrap();
        t.insert("model.layers.2.moe.down_proj.weight".into(), down.broadcast_mul(&scale).unwrap());
        // Layer 1: the router's row for expert 2 points away from every token.
        let gate = t["model.layers.1.moe.gate.weight"].to_vec2::<f32>().unwrap();
        let rows: Vec<f32> = gate
            .iter()
            .enumerate()
            .flat_map(|(e, row)| if e == 2 { u.iter().map(|v| -100.0 * v).collect() } else { row.clone() })
            .collect();
        t.insert("model.layers.1.moe.gate.weight".into(), Tensor::from_vec(rows, (6, 64), &Device::Cpu).unwrap());
    });
    use FlagKind::*;
    assert_eq!(
        flags(dir.path()),
        vec![(1, 2, Dead), (2, 1, Vanishing), (2, 1, VanishingWeights), (2, 4, Vanishing), (2, 4, VanishingWeights)]
    );

    // The command: the same flags in JSON, the rules spelled out, a heatmap.
    let svg = dir.path().join("experts.svg");
    let d = dir.path().to_string_lossy().into_owned();
    let p = prompts();
    let ids: Vec<String> = p.iter().map(|ids| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")).collect();
    let prompt_file = dir.path().join("prompts.txt");
    std::fs::write(&prompt_file, ids.join("\n")).unwrap();
    let prompt_file = prompt_file.to_string_lossy().into_owned();
    let out =
        step3(&["experts", "--model-dir", &d, "--prompts", &prompt_file, "--json", "--svg", svg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let got: Vec<(u64, u64, String)> = v["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["layer"].as_u64().unwrap(), f["expert"].as_u64().unwrap(), f["kind"].as_str().unwrap().to_string()))
        .collect();
    let want = [
        (1, 2, "dead"),
        (2, 1, "vanishing"),
        (2, 1, "vanishing_weights"),
        (2, 4, "vanishing"),
        (2, 4, "vanishing_weights"),
    ];
    assert_eq!(got, want.map(|(l, e, k)| (l, e, k.to_string())));
    assert_eq!(v["routing"]["layers"][0]["experts"][2]["routed"], 0);
    assert!(v["rules_text"][0].as_str().unwrap().starts_with("dead"));
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.contains("output norm before gating"), "{}", &picture[..200]);

    // Text summary: the rules and the flags are printed.
    let out = step3(&["experts", "--model-dir", &d, "--prompts", &prompt_file]);
    let text = stdout(&out);
    assert!(text.contains("starved: routed, but share of routed slots < 0.1 x 1/E"), "{text}");
    assert!(text.contains("layer   1 expert   2: dead (never routed)"), "{text}");

    // Weights only (no prompts): only the weight flags.
    let out = step3(&["experts", "--model-dir", &d, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["flags"].as_array().unwrap().len(), 2);
    assert!(v["routing"].is_null());
}

#[test]
fn bad_arguments_are_clear_errors() {
    let d = fixtures().join("vl-f32").to_string_lossy().into_owned();
    for (args, needle) in [
        (vec!["--ids", "1,x"], "--ids `1,x` is not a comma-separated list of token ids"),
        (vec!["--ids", "1,4000"], "token id 4000 is outside the vocabulary"),
        (vec!["--vanishing-fraction", "0"], "must be positive"),
    ] {
        let mut all = vec!["experts", "--model-dir", &d];
        all.extend(args);
        let out = step3(&all);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    }
}

/// Block-FP8 experts are dequantised one at a time: the norms equal those of the whole
/// dequantised tensor, slice by slice.
#[test]
fn fp8_expert_norms_match_the_dequantised_weights() {
    let ckpt = Step3Checkpoint::open(fixtures().join("fp8-block")).unwrap();
    let stats = experts::weight_stats(&ckpt, &mut |_, _| {}).unwrap();
    let layer = &stats.layers[0];
    assert_eq!((layer.layer, layer.experts.len()), (1, 4));
    let down = ckpt.dense_weight("model.layers.1.moe.down_proj.weight", DType::F32, &Device::Cpu).unwrap();
    for (e, norms) in layer.experts.iter().enumerate() {
        let want = down.get(e).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
        assert!((norms.down - want).abs() <= 1e-5 * want, "expert {e}: {} vs {want}", norms.down);
    }
    let shared = ckpt.dense_weight("model.layers.1.share_expert.up_proj.weight", DType::F32, &Device::Cpu).unwrap();
    let want = shared.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
    assert!((layer.shared.up - want).abs() <= 1e-5 * want);
}
