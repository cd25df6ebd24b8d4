//! Checks this build against golden outputs of the official reference (the `step3-tiny`
//! fixture layout): one [`GoldenCheck`] per golden tensor, with its worst relative error
//! `max|ours − ref| / max|ref|` or its count of mismatching ids, and pass/fail at the fixtures'
//! tolerances. Used by `step3 verify` and by the test suite.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::Value;
use step3_model::{LayerRouting, SamplingParams, Step3Checkpoint, Step3TextModel};

/// Relative tolerance for float32 goldens (fixtures README).
pub const F32_TOLERANCE: f64 = 1e-4;
/// Relative tolerance for bfloat16 compute (fixtures README).
pub const BF16_TOLERANCE: f64 = 5e-2;

/// What was compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Measure {
    /// Worst relative error of a float tensor.
    RelErr { worst: f64, tolerance: f64 },
    /// Ids that differ, out of how many.
    Mismatch { differ: usize, total: usize },
}

/// One golden compared.
#[derive(Debug, Clone, PartialEq)]
pub struct GoldenCheck {
    /// `<checkpoint>/<golden name>` (plus `@<dtype>` when computed in a dtype other than the golden's).
    pub name: String,
    pub measure: Measure,
    /// Informative checks (e.g. greedy tokens under bf16 compute) are reported but never fail.
    pub gating: bool,
}

impl GoldenCheck {
    pub fn passed(&self) -> bool {
        match self.measure {
            Measure::RelErr { worst, tolerance } => worst <= tolerance,
            Measure::Mismatch { differ, .. } => differ == 0,
        }
    }

    /// Fails the run: gating and not passed.
    pub fn failed(&self) -> bool {
        self.gating && !self.passed()
    }
}

impl fmt::Display for GoldenCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (self.passed(), self.gating) {
            (true, _) => "PASS",
            (false, true) => "FAIL",
            (false, false) => "info",
        };
        match self.measure {
            Measure::RelErr { worst, tolerance } => {
                write!(f, "{status}  {:<64} worst rel err {worst:.3e} (tol {tolerance:.0e})", self.name)
            }
            Measure::Mismatch { differ, total } => {
                write!(f, "{status}  {:<64} {differ}/{total} ids differ", self.name)
            }
        }
    }
}

/// `max|a − b| / max|b|` over all elements (f32 compare).
pub fn relative_error(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    if ours.dims() != reference.dims() {
        bail!("shape {:?} differs from the golden's {:?}", ours.dims(), reference.dims());
    }
    let a = ours.to_dtype(DType::F32)?.flatten_all()?;
    let b = reference.to_dtype(DType::F32)?.flatten_all()?;
    let diff = (a - &b)?.abs()?.max(0)?.to_scalar::<f32>()? as f64;
    let scale = b.abs()?.max(0)?.to_scalar::<f32>()? as f64;
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// Golden tensors and metadata of one checkpoint folder.
pub struct Goldens {
    pub name: String,
    pub tensors: HashMap<String, Tensor>,
    pub json: Value,
}

impl Goldens {
    pub fn load(dir: &Path) -> Result<Self> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let st = dir.join("golden.safetensors");
        let tensors =
            candle_core::safetensors::load(&st, &Device::Cpu).with_context(|| format!("reading {}", st.display()))?;
        let js = dir.join("golden.json");
        let json =
            serde_json::from_str(&std::fs::read_to_string(&js).with_context(|| format!("reading {}", js.display()))?)
                .with_context(|| format!("parsing {}", js.display()))?;
        Ok(Self { name, tensors, json })
    }

    pub fn get(&self, key: &str) -> Result<&Tensor> {
        self.tensors.get(key).with_context(|| format!("golden `{key}` missing from {}/golden.safetensors", self.name))
    }

    /// An integer golden (token ids) as u32s.
    pub fn ids(&self, key: &str) -> Result<Vec<u32>> {
        Ok(self
            .get(key)?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|v| v as u32)
            .collect())
    }

    /// Text prompts with goldens under `prefix` (e.g. `text` or `f32compute.text`): `seq0`, `seq1`, ...
    pub fn sequences(&self, prefix: &str) -> Vec<String> {
        let mut seqs: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{prefix}.")))
            .filter_map(|rest| rest.split('.').next())
            .filter(|s| s.starts_with("seq"))
            .map(|s| format!("{prefix}.{s}"))
            .collect();
        seqs.sort();
        seqs.dedup();
        seqs
    }
}

/// How a golden set is computed and judged.
#[derive(Debug, Clone, Copy)]
pub struct Judge {
    pub tolerance: f64,
    /// Do float comparisons gate the result? Not when an f32 golden is recomputed in bf16: the
    /// fixtures define no tolerance for that, and a near-tie expert flip moves it past 5e-2.
    pub floats_gate: bool,
    /// Do token/expert ids gate the result (exact f32 runs) or only inform (bf16 compute)?
    pub ids_gate: bool,
    /// Suffix added to check names (e.g. `@bf16`).
    pub tag: &'static str,
}

impl Judge {
    fn rel(&self, name: String, ours: &Tensor, golden: &Tensor) -> Result<GoldenCheck> {
        let worst = relative_error(ours, golden).with_context(|| name.clone())?;
        Ok(GoldenCheck {
            name,
            measure: Measure::RelErr { worst, tolerance: self.tolerance },
            gating: self.floats_gate,
        })
    }

    fn ids(&self, name: String, ours: &[u32], golden: &[u32]) -> GoldenCheck {
        let differ = ours.iter().zip(golden).filter(|(a, b)| a != b).count() + ours.len().abs_diff(golden.len());
        GoldenCheck { name, measure: Measure::Mismatch { differ, total: golden.len() }, gating: self.ids_gate }
    }
}

/// Runs every text golden under `prefix` of `goldens` on `model`: prefill logits and hidden
/// states, router choices of every MoE layer, KV-cached decode (fed the golden tokens), greedy
/// generation, and all prompts again as one padded batch.
pub fn check_text(model: &Step3TextModel, goldens: &Goldens, prefix: &str, judge: Judge) -> Result<Vec<GoldenCheck>> {
    let mut out = Vec::new();
    let label = |key: &str| format!("{}/{key}{}", goldens.name, judge.tag);
    let seqs = goldens.sequences(prefix);
    if seqs.is_empty() {
        bail!("{} has no `{prefix}.seq*` goldens", goldens.name);
    }
    let mut prompts = Vec::new();
    for seq in &seqs {
        let ids = goldens.ids(&format!("{seq}.input_ids"))?;
        let greedy = goldens.ids(&format!("{seq}.greedy_tokens"))?;
        let t = ids.len();

        // Prefill, with the routing of every MoE layer recorded.
        let mut cache = model.new_cache(1, t + greedy.len())?;
        let mut trace: Vec<LayerRouting> = Vec::new();
        let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
        let hidden = model.forward(&input, &[t], &mut cache, Some(&mut trace))?;
        let logits = model.logits(&hidden)?;
        out.push(judge.rel(
            label(&format!("{seq}.prefill_logits")),
            &logits.i(0)?,
            goldens.get(&format!("{seq}.prefill_logits"))?,
        )?);
        out.push(judge.rel(
            label(&format!("{seq}.prefill_last_hidden")),
            &hidden.i(0)?,
            goldens.get(&format!("{seq}.prefill_last_hidden"))?,
        )?);
        for LayerRouting { layer, routing } in &trace {
            let key = format!("{seq}.router.layer{layer}");
            let ids_ours: Vec<u32> = routing.ids.flatten_all()?.to_vec1()?;
            out.push(judge.ids(
                label(&format!("{key}.topk_ids")),
                &ids_ours,
                &goldens.ids(&format!("{key}.topk_ids"))?,
            ));
            out.push(judge.rel(
                label(&format!("{key}.topk_weights")),
                &routing.weights,
                goldens.get(&format!("{key}.topk_weights"))?,
            )?);
        }

        // KV-cached decode, teacher-forced with the golden tokens.
        let (mut dec_logits, mut dec_hidden) = (Vec::new(), Vec::new());
        for &tok in &greedy {
            let h = model.forward(&Tensor::new(&[[tok]], model.device())?, &[1], &mut cache, None)?;
            dec_logits.push(model.logits(&h.i((0, 0))?)?);
            dec_hidden.push(h.i((0, 0))?);
        }
        out.push(judge.rel(
            label(&format!("{seq}.decode_logits")),
            &Tensor::stack(&dec_logits, 0)?,
            goldens.get(&format!("{seq}.decode_logits"))?,
        )?);
        out.push(judge.rel(
            label(&format!("{seq}.decode_last_hidden")),
            &Tensor::stack(&dec_hidden, 0)?,
            goldens.get(&format!("{seq}.decode_last_hidden"))?,
        )?);

        // Greedy generation through the public loop.
        let params = SamplingParams { temperature: 0.0, max_new_tokens: greedy.len(), ..Default::default() };
        let generated = step3_model::generate(model, &ids, &params, |_| {})?;
        out.push(judge.ids(label(&format!("{seq}.greedy_tokens")), &generated.tokens, &greedy));
        prompts.push((seq.clone(), ids, greedy));
    }

    // Every prompt in one right-padded batch: prefill and decode must match the single runs.
    if prompts.len() > 1 {
        let seqs: Vec<&[u32]> = prompts.iter().map(|(_, ids, _)| ids.as_slice()).collect();
        let (batch, lens) = model.batch_ids(&seqs)?;
        let steps = prompts.iter().map(|(_, _, g)| g.len()).min().unwrap_or(0);
        let mut cache = model.new_cache(prompts.len(), batch.dim(1)? + steps)?;
        let hidden = model.forward(&batch, &lens, &mut cache, None)?;
        let logits = model.logits(&hidden)?;
        let mut decode: Vec<Vec<Tensor>> = vec![Vec::new(); prompts.len()];
        for step in 0..steps {
            let toks: Vec<u32> = prompts.iter().map(|(_, _, g)| g[step]).collect();
            let ids = Tensor::new(toks.as_slice(), model.device())?.unsqueeze(1)?;
            let h = model.forward(&ids, &vec![1; prompts.len()], &mut cache, None)?;
            let l = model.logits(&h)?;
            for (row, d) in decode.iter_mut().enumerate() {
                d.push(l.i((row, 0))?);
            }
        }
        for (row, (seq, ids, _)) in prompts.iter().enumerate() {
            let name = seq.replacen(prefix, &format!("{prefix}.batched"), 1);
            let ours = logits.i(row)?.narrow(0, 0, ids.len())?;
            out.push(judge.rel(
                label(&format!("{name}.prefill_logits")),
                &ours,
                goldens.get(&format!("{seq}.prefill_logits"))?,
            )?);
            let golden = goldens.get(&format!("{seq}.decode_logits"))?.narrow(0, 0, steps)?;
            out.push(judge.rel(label(&format!("{name}.decode_logits")), &Tensor::stack(&decode[row], 0)?, &golden)?);
        }
    }
    Ok(out)
}

/// Which golden sets a checkpoint folder holds, by compute dtype.
fn text_prefixes(folder: &str, dtype: DType) -> Vec<(&'static str, Judge)> {
    let exact = Judge { tolerance: F32_TOLERANCE, floats_gate: true, ids_gate: true, tag: "" };
    let bf16 = Judge { tolerance: BF16_TOLERANCE, floats_gate: true, ids_gate: false, tag: "" };
    let bf16_of_f32 = Judge { tolerance: BF16_TOLERANCE, floats_gate: false, ids_gate: false, tag: "@bf16" };
    match (folder, dtype) {
        ("vl-bf16", DType::F32) => vec![("f32compute.text", exact)],
        ("vl-bf16", DType::BF16) => vec![("bf16compute.text", bf16)],
        ("vl-f32" | "moe-renorm-f32" | "fp8-block", DType::F32) => vec![("text", exact)],
        ("vl-f32" | "moe-renorm-f32" | "fp8-block", DType::BF16) => vec![("text", bf16_of_f32)],
        _ => Vec::new(),
    }
}

/// The checkpoint folders [`verify_fixtures`] knows, in report order.
pub const TEXT_FOLDERS: [&str; 4] = ["vl-f32", "vl-bf16", "moe-renorm-f32", "fp8-block"];

/// Runs every golden of a fixture set (e.g. `tests/fixtures/step3-tiny`) that this build supports,
/// computing in `dtype` (f32 or bf16) on `device`.
pub fn verify_fixtures(dir: &Path, dtype: DType, device: &Device) -> Result<Vec<GoldenCheck>> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        bail!("verify runs in f32 or bf16, not {dtype:?}");
    }
    let mut checks = Vec::new();
    let mut found = false;
    for folder in TEXT_FOLDERS {
        let path = dir.join(folder);
        if !path.is_dir() {
            continue;
        }
        found = true;
        let goldens = Goldens::load(&path)?;
        let ckpt = Step3Checkpoint::open(&path)?;
        let model = ckpt.load_text_model(dtype, device).with_context(|| format!("loading {}", path.display()))?;
        for (prefix, judge) in text_prefixes(folder, dtype) {
            checks.extend(check_text(&model, &goldens, prefix, judge)?);
        }
        if folder == "moe-renorm-f32" && dtype == DType::F32 {
            checks.extend(check_renorm_flag(&ckpt, &goldens, device)?);
        }
        if folder == "fp8-block" {
            checks.extend(check_fp8_weights(&ckpt, &goldens, device)?);
        }
    }
    if !found {
        bail!("{} holds none of the fixture folders {TEXT_FOLDERS:?}", dir.display());
    }
    Ok(checks)
}

/// `moe-renorm-f32` also stores logits computed with renormalisation switched off: the same
/// weights with `norm_expert_weight = false` must reproduce them.
fn check_renorm_flag(ckpt: &Step3Checkpoint, goldens: &Goldens, device: &Device) -> Result<Vec<GoldenCheck>> {
    let mut config = ckpt.config().text.clone();
    config.norm_expert_weight = false;
    let vb = ckpt.var_builder(DType::F32, device);
    let model = Step3TextModel::new(&config, ckpt.weight_format(step3_model::Fp8Storage::Compact), vb)?;
    let judge = Judge { tolerance: F32_TOLERANCE, floats_gate: true, ids_gate: true, tag: "" };
    let mut out = Vec::new();
    for seq in goldens.sequences("no_renorm.text") {
        let ids = goldens.ids(&format!("{}.input_ids", seq.trim_start_matches("no_renorm.")))?;
        let mut cache = model.new_cache(1, ids.len())?;
        let input = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
        let logits = model.logits(&model.forward(&input, &[ids.len()], &mut cache, None)?)?;
        let key = format!("{seq}.prefill_logits");
        out.push(judge.rel(format!("{}/{key}", goldens.name), &logits.i(0)?, goldens.get(&key)?)?);
    }
    Ok(out)
}

/// `fp8-block` stores two dequantised weights and, for every quantised tensor, the float64 sum
/// and absolute sum of its dequantised values: our block dequantisation must reproduce them.
pub fn check_fp8_weights(ckpt: &Step3Checkpoint, goldens: &Goldens, device: &Device) -> Result<Vec<GoldenCheck>> {
    let mut out = Vec::new();
    let exact = |name: String, worst: f64| GoldenCheck {
        name: format!("{}/{name}", goldens.name),
        measure: Measure::RelErr { worst, tolerance: F32_TOLERANCE },
        gating: true,
    };
    let mut keys: Vec<&String> = goldens.tensors.keys().filter(|k| k.starts_with("dequant.")).collect();
    keys.sort();
    for key in keys {
        let spec = key.trim_start_matches("dequant.");
        // `<weight>` or `<weight>.e<expert>_rows<start>_<end>`.
        let (weight, slice) = match spec.rsplit_once(".weight.") {
            Some((w, s)) => (format!("{w}.weight"), Some(s)),
            None => (spec.to_string(), None),
        };
        let mut ours = ckpt.dense_weight(&weight, DType::F32, device)?;
        if let Some(slice) = slice {
            let parse = || -> Option<(usize, usize, usize)> {
                let (e, rows) = slice.strip_prefix('e')?.split_once("_rows")?;
                let (a, b) = rows.split_once('_')?;
                Some((e.parse().ok()?, a.parse().ok()?, b.parse().ok()?))
            };
            let (e, a, b) = parse().with_context(|| format!("cannot read the slice in golden `{key}`"))?;
            ours = ours.i(e)?.narrow(0, a, b - a)?;
        }
        out.push(exact(key.clone(), relative_error(&ours, goldens.get(key)?)?));
    }
    let listed = goldens
        .json
        .get("quantized_tensors")
        .and_then(Value::as_object)
        .context("golden.json lacks quantized_tensors")?;
    let mut names: Vec<&String> = listed.keys().collect();
    names.sort();
    let fp8 = ckpt.fp8_tensors();
    for name in names {
        let want = &listed[name];
        let field = |k: &str| want.get(k).and_then(Value::as_f64).with_context(|| format!("golden.json: {name}.{k}"));
        let (sum, abs_sum) = (field("dequant_sum")?, field("dequant_abs_sum")?);
        if !fp8.iter().any(|t| &t.name == name) {
            bail!("golden.json lists {name} as quantised, but the checkpoint does not store it as FP8");
        }
        let values: Vec<f32> = ckpt.dense_weight(name, DType::F32, device)?.flatten_all()?.to_vec1()?;
        let ours_sum: f64 = values.iter().map(|&v| v as f64).sum();
        let ours_abs: f64 = values.iter().map(|&v| (v as f64).abs()).sum();
        // Both relative to the absolute sum, which is never near zero.
        out.push(exact(format!("quantized_tensors.{name}.dequant_sum"), (ours_sum - sum).abs() / abs_sum));
        out.push(exact(format!("quantized_tensors.{name}.dequant_abs_sum"), (ours_abs - abs_sum).abs() / abs_sum));
    }
    if fp8.len() != listed.len() {
        bail!("the checkpoint stores {} FP8 tensors, golden.json lists {}", fp8.len(), listed.len());
    }
    Ok(out)
}
