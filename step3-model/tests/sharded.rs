//! Tensor and expert parallelism on the thread backend, proved on the tiny fixtures: a sharded
//! model (every layout the issue names, FP8 included, routed experts on the host) gives the
//! unsharded model's f32 logits within 1e-5 relative and the same greedy tokens; the slices every
//! rank reads put back together rebuild every tensor (FP8 values and scales); layouts that cannot
//! run are errors before loading.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use float8::F8E4M3;
use step3_model::shard::RankPlan;
use step3_model::{ExpertPlacement, Layout, LoadOptions, Step3Checkpoint, Step3TextModel};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/step3-tiny")
}

fn load(dir: &Path, tp: usize, ep: usize, experts: ExpertPlacement) -> step3_model::Result<Step3TextModel> {
    let ckpt = Step3Checkpoint::open(dir)?;
    let layout = Layout::new(tp, ep, None)?;
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, layout, experts, ..Default::default() };
    ckpt.load_text_model_with(&opts)
}

const SEQS: [&[u32]; 3] =
    [&[223, 235, 45, 55, 150, 236, 82, 145, 54, 92, 136], &[7, 19, 250, 3], &[101, 31, 65, 8, 300, 12, 77]];

/// Logits of a padded batch prefill, then `steps` greedy decode steps of every sequence: the
/// logits of every step and the tokens chosen.
fn run(model: &Step3TextModel, steps: usize) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let (ids, lens) = model.batch_ids(&SEQS).unwrap();
    let mut cache = model.new_cache(SEQS.len(), 32).unwrap();
    let hidden = model.forward(&ids, &lens, &mut cache, None).unwrap();
    // The last real position of each sequence.
    let last: Vec<Tensor> = lens.iter().enumerate().map(|(b, &l)| hidden.get(b).unwrap().get(l - 1).unwrap()).collect();
    let mut logits = model.logits(&Tensor::stack(&last, 0).unwrap()).unwrap();
    let (mut all, mut tokens) = (Vec::new(), vec![Vec::new(); SEQS.len()]);
    for step in 0..=steps {
        all.push(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let next = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        for (t, n) in tokens.iter_mut().zip(&next) {
            t.push(*n);
        }
        if step == steps {
            break;
        }
        let ids = Tensor::new(next.as_slice(), &Device::Cpu).unwrap().unsqueeze(1).unwrap();
        let hidden = model.forward(&ids, &vec![1; SEQS.len()], &mut cache, None).unwrap();
        logits = model.logits(&hidden.squeeze(1).unwrap()).unwrap();
    }
    (all, tokens)
}

fn assert_close(dir: &Path, tp: usize, ep: usize, experts: ExpertPlacement) {
    let whole = load(dir, 1, 1, ExpertPlacement::Device).unwrap();
    let sharded = load(dir, tp, ep, experts).unwrap_or_else(|e| panic!("{} tp {tp} ep {ep}: {e}", dir.display()));
    assert_eq!(sharded.num_ranks(), tp * ep);
    let (want, want_tokens) = run(&whole, 4);
    let (got, got_tokens) = run(&sharded, 4);
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        let scale = w.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if step == 0 {
            eprintln!("{} tp {tp} ep {ep} {experts:?}: max |Δ logit| {diff:.3e} of {scale:.3e}", dir.display());
        }
        assert!(
            diff <= 1e-5 * scale,
            "{} tp {tp} ep {ep} {experts:?}, step {step}: max |Δ| {diff} vs max |logit| {scale}",
            dir.display()
        );
    }
    assert_eq!(got_tokens, want_tokens, "{} tp {tp} ep {ep} {experts:?}", dir.display());
}

#[test]
fn tensor_and_expert_parallel_logits_equal_the_unsharded_model() {
    let vl = fixtures().join("vl-f32"); // 4 heads, 6 experts
    for (tp, ep) in [(2, 1), (4, 1), (1, 2), (2, 2)] {
        assert_close(&vl, tp, ep, ExpertPlacement::Device);
    }
    let renorm = fixtures().join("moe-renorm-f32"); // 8 experts, top-4, renormalised
    for (tp, ep) in [(1, 2), (1, 4)] {
        assert_close(&renorm, tp, ep, ExpertPlacement::Device);
    }
}

#[test]
fn fp8_checkpoints_shard_by_expert_and_by_aligned_blocks() {
    // The FP8 fixture's widths are not multiples of 128 after a TP split, so it runs EP only
    // (TP is the error below); a copy of the f32 fixture quantised with 2×2 blocks runs TP too.
    let fp8 = fixtures().join("fp8-block");
    for (tp, ep) in [(1, 2), (1, 4)] {
        assert_close(&fp8, tp, ep, ExpertPlacement::Device);
    }
    let small_blocks = quantized_copy(&fixtures().join("vl-f32"), 2);
    for (tp, ep) in [(2, 1), (4, 1), (2, 2)] {
        assert_close(small_blocks.path(), tp, ep, ExpertPlacement::Device);
    }
}

#[test]
fn routed_experts_in_host_memory_give_the_same_output() {
    let vl = fixtures().join("vl-f32");
    assert_close(&vl, 1, 1, ExpertPlacement::Host);
    assert_close(&vl, 1, 1, ExpertPlacement::HostFirst(1));
    assert_close(&vl, 2, 2, ExpertPlacement::Host);
    // FP8 experts stay FP8 on the host.
    let fp8 = fixtures().join("fp8-block");
    assert_close(&fp8, 1, 2, ExpertPlacement::Host);
    let model = load(&fp8, 1, 1, ExpertPlacement::Host).unwrap();
    let experts = model.moe_block(1).unwrap().experts();
    assert!(experts.device().is_cpu());
    let whole = load(&fp8, 1, 1, ExpertPlacement::Device).unwrap();
    assert_eq!(experts.storage_bytes(), whole.moe_block(1).unwrap().experts().storage_bytes());
}

#[test]
fn ranks_hold_their_share_of_the_weights() {
    let vl = fixtures().join("vl-f32");
    let whole = load(&vl, 1, 1, ExpertPlacement::Device).unwrap();
    let sharded = load(&vl, 2, 1, ExpertPlacement::Device).unwrap();
    let per_rank = sharded.rank_storage_bytes();
    assert_eq!(per_rank.len(), 2);
    // Rank 1 holds neither embedding nor lm_head, and about half of each layer.
    assert!(per_rank[1] < per_rank[0], "{per_rank:?}");
    assert!(per_rank[1] < whole.storage_bytes() / 2, "{per_rank:?} vs {}", whole.storage_bytes());
    let ep = load(&vl, 1, 2, ExpertPlacement::Device).unwrap();
    let (a, b) = (ep.moe_block(1).unwrap().experts(), whole.moe_block(1).unwrap().experts());
    assert_eq!((a.num_experts(), a.first_expert()), (3, 0));
    assert_eq!(2 * a.storage_bytes(), b.storage_bytes());
}

#[test]
fn layouts_that_cannot_run_fail_before_loading() {
    let err = |dir: &str, tp, ep| match load(&fixtures().join(dir), tp, ep, ExpertPlacement::Device) {
        Ok(_) => panic!("{dir} tp {tp} ep {ep} should fail"),
        Err(e) => e.to_string(),
    };
    let e = err("vl-f32", 3, 1);
    assert!(e.contains("num_attention_heads = 4") && e.contains("tp 3"), "{e}");
    let e = err("vl-f32", 1, 4);
    assert!(e.contains("moe_num_experts = 6") && e.contains("ep 4"), "{e}");
    let e = err("fp8-block", 2, 1);
    assert!(e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("128"), "{e}");
    let e = Layout::new(2, 2, Some(vec![0, 1])).unwrap_err().to_string();
    assert!(e.contains("4 ranks") && e.contains("--devices lists 2"), "{e}");
}

/// Every tensor of `dir`, read as the slices of every rank of `tp × ep` and put back in place,
/// is the original tensor; every element is covered.
fn slices_rebuild(dir: &Path, tp: usize, ep: usize) {
    let ckpt = Step3Checkpoint::open(dir).unwrap();
    let w = ckpt.weights();
    let block = ckpt.config().quantization.as_ref().map(|q| q.weight_block_size);
    let layout = Layout::new(tp, ep, None).unwrap();
    let mut split = 0;
    for name in w.names() {
        let info = w.info(name).unwrap();
        let whole = w.load(name, None, DType::F32, &Device::Cpu).unwrap();
        let weight = name.strip_suffix("_scale_inv").unwrap_or(name);
        let scale_of = match (weight != name, block) {
            (true, Some(b)) => Some((w.info(weight).unwrap().shape.as_slice(), b)),
            _ => None,
        };
        if RankPlan::new(&layout, 0).splits(weight).is_empty() {
            continue;
        }
        let mut rebuilt = whole.zeros_like().unwrap();
        let mut covered = whole.zeros_like().unwrap();
        for rank in 0..layout.world() {
            let plan = RankPlan::new(&layout, rank);
            let region = plan.region(name, &info.shape, scale_of).unwrap().expect("a split tensor has a region");
            let part = w.load_region(name, &region, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            let ranges: Vec<_> = region.iter().map(|&(s, l)| s..s + l).collect();
            rebuilt = rebuilt.slice_assign(&ranges, &part).unwrap();
            let count = (covered.i_slice(&ranges) + 1.0).unwrap();
            covered = covered.slice_assign(&ranges, &count).unwrap();
        }
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(bits(&rebuilt), bits(&whole), "{name}");
        // Every element is read by some rank (ranks of one expert slice under TP, or the TP
        // ranks of different EP indices, read the same region).
        let c = covered.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(c.iter().all(|&v| v >= 1.0), "{name}: some element no rank reads");
        split += 1;
    }
    assert!(split > 0, "{}: nothing was split", dir.display());
}

trait ISlice {
    fn i_slice(&self, ranges: &[std::ops::Range<usize>]) -> Tensor;
}

impl ISlice for Tensor {
    fn i_slice(&self, ranges: &[std::ops::Range<usize>]) -> Tensor {
        let mut t = self.clone();
        for (d, r) in ranges.iter().enumerate() {
            t = t.narrow(d, r.start, r.end - r.start).unwrap();
        }
        t
    }
}

#[test]
fn the_slices_of_every_rank_rebuild_every_tensor() {
    slices_rebuild(&fixtures().join("vl-f32"), 2, 2);
    slices_rebuild(&fixtures().join("vl-f32"), 4, 1);
    slices_rebuild(&fixtures().join("fp8-block"), 1, 4);
    let q = quantized_copy(&fixtures().join("vl-f32"), 2);
    slices_rebuild(q.path(), 2, 2);
    slices_rebuild(q.path(), 4, 1);
}

/// A copy of the checkpoint in `src` with every linear weight of the decoder quantised to
/// block-FP8 with `block × block` scale blocks (scale = amax / 448 per block), and a
/// `quantization_config` saying so.
fn quantized_copy(src: &Path, block: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["quantization_config"] = serde_json::json!({
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [block, block]
    });
    std::fs::write(dir.path().join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let ckpt = step3_model::Checkpoint::open_dir(src).unwrap();
    let mut out: HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = HashMap::new();
    for name in ckpt.names() {
        let t = ckpt.load(name, None, DType::F32, &Device::Cpu).unwrap();
        let dims = t.dims().to_vec();
        let linear = name.starts_with("model.layers.")
            && name.ends_with(".weight")
            && (name.contains("_proj.") || name.contains(".wq."));
        if !linear {
            let bytes =
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
            out.insert(name.to_string(), (safetensors::Dtype::F32, dims, bytes));
            continue;
        }
        let n = dims.len();
        let (rows, cols) = (dims[n - 2], dims[n - 1]);
        let mats = dims[..n - 2].iter().product::<usize>();
        let (rb, cb) = (rows.div_ceil(block), cols.div_ceil(block));
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut q = vec![0u8; v.len()];
        let mut scales = vec![0f32; mats * rb * cb];
        for m in 0..mats {
            for bi in 0..rb {
                for bj in 0..cb {
                    let cells: Vec<usize> = (bi * block..((bi + 1) * block).min(rows))
                        .flat_map(|r| {
                            (bj * block..((bj + 1) * block).min(cols)).map(move |c| (m * rows + r) * cols + c)
                        })
                        .collect();
                    let amax = cells.iter().map(|&i| v[i].abs()).fold(0f32, f32::max);
                    let s = if amax == 0.0 { 1.0 } else { amax / 448.0 };
                    scales[(m * rb + bi) * cb + bj] = s;
                    for i in cells {
                        q[i] = F8E4M3::from_f32(v[i] / s).to_bits();
                    }
                }
            }
        }
        let mut sdims = dims.clone();
        sdims[n - 2] = rb;
        sdims[n - 1] = cb;
        out.insert(name.to_string(), (safetensors::Dtype::F8_E4M3, dims, q));
        let sbytes = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.insert(format!("{name}_scale_inv"), (safetensors::Dtype::F32, sdims, sbytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = out
        .iter()
        .map(|(k, (dt, dims, bytes))| {
            (k.clone(), safetensors::tensor::TensorView::new(*dt, dims.clone(), bytes).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}
