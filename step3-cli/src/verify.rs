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
use step3::{
    Fp8Storage, ImageLayout, LayerRouting, LoadOptions, PreprocessedImage, SamplingParams, Step3Checkpoint, Step3Model,
    Step3TextModel,
};

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
    /// Worst absolute error (pixel tensors).
    AbsErr { worst: f64, tolerance: f64 },
    /// A hash or a structure that must be identical.
    Same { equal: bool },
    /// Not run here, and why (e.g. a layout that cannot split this checkpoint).
    Skipped { reason: &'static str },
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
            Measure::RelErr { worst, tolerance } | Measure::AbsErr { worst, tolerance } => worst <= tolerance,
            Measure::Mismatch { differ, .. } => differ == 0,
            Measure::Same { equal } => equal,
            Measure::Skipped { .. } => true,
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
            _ if matches!(self.measure, Measure::Skipped { .. }) => "skip",
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
            Measure::AbsErr { worst, tolerance } => {
                write!(f, "{status}  {:<64} worst abs err {worst:.3e} (tol {tolerance:.0e})", self.name)
            }
            Measure::Same { equal } => {
                write!(f, "{status}  {:<64} {}", self.name, if equal { "identical" } else { "differs" })
            }
            Measure::Skipped { reason } => write!(f, "{status}  {} ({reason})", self.name),
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

    /// Ids that must match whatever the compute dtype (crop counts, layouts).
    fn exact_ids(&self, name: String, ours: &[u32], golden: &[u32]) -> GoldenCheck {
        GoldenCheck { gating: true, ..self.ids(name, ours, golden) }
    }

    fn ids(&self, name: String, ours: &[u32], golden: &[u32]) -> GoldenCheck {
        let differ = ours.iter().zip(golden).filter(|(a, b)| a != b).count() + ours.len().abs_diff(golden.len());
        GoldenCheck { name, measure: Measure::Mismatch { differ, total: golden.len() }, gating: self.ids_gate }
    }
}

/// One prompt's goldens under `key` (`<key>.prefill_logits`, ...): prefill logits and hidden
/// states, router choices of every MoE layer when stored, KV-cached decode fed the golden tokens,
/// and greedy generation through the public loop. `embeds` carries merged image features.
fn check_prompt(
    model: &Step3TextModel,
    ids: &[u32],
    embeds: Option<&Tensor>,
    goldens: &Goldens,
    key: &str,
    judge: Judge,
) -> Result<Vec<GoldenCheck>> {
    let mut out = Vec::new();
    let label = |k: &str| format!("{}/{key}.{k}{}", goldens.name, judge.tag);
    let golden = |k: &str| goldens.get(&format!("{key}.{k}"));
    let greedy = goldens.ids(&format!("{key}.greedy_tokens"))?;
    let t = ids.len();
    let embeds = match embeds {
        Some(e) => e.clone(),
        None => model.embed(&Tensor::new(ids, model.device())?.unsqueeze(0)?)?,
    };

    // Prefill, with the routing of every MoE layer recorded.
    let mut cache = model.new_cache(1, t + greedy.len())?;
    let mut trace: Vec<LayerRouting> = Vec::new();
    let hidden = model.forward_embeds(&embeds, &[t], &mut cache, Some(&mut trace))?;
    out.push(judge.rel(label("prefill_logits"), &model.logits(&hidden)?.i(0)?, golden("prefill_logits")?)?);
    out.push(judge.rel(label("prefill_last_hidden"), &hidden.i(0)?, golden("prefill_last_hidden")?)?);
    for LayerRouting { layer, routing } in &trace {
        let r = format!("router.layer{layer}");
        if !goldens.tensors.contains_key(&format!("{key}.{r}.topk_ids")) {
            continue;
        }
        let ours: Vec<u32> = routing.ids.flatten_all()?.to_vec1()?;
        out.push(judge.ids(label(&format!("{r}.topk_ids")), &ours, &goldens.ids(&format!("{key}.{r}.topk_ids"))?));
        // The reference stores the weights it applied: rounded to the compute dtype.
        let applied = routing.weights.to_dtype(model.dtype())?;
        out.push(judge.rel(label(&format!("{r}.topk_weights")), &applied, golden(&format!("{r}.topk_weights"))?)?);
    }

    // KV-cached decode, teacher-forced with the golden tokens.
    let (mut dec_logits, mut dec_hidden) = (Vec::new(), Vec::new());
    for &tok in &greedy {
        let h = model.forward(&Tensor::new(&[[tok]], model.device())?, &[1], &mut cache, None)?;
        dec_logits.push(model.logits(&h.i((0, 0))?)?);
        dec_hidden.push(h.i((0, 0))?);
    }
    out.push(judge.rel(label("decode_logits"), &Tensor::stack(&dec_logits, 0)?, golden("decode_logits")?)?);
    if goldens.tensors.contains_key(&format!("{key}.decode_last_hidden")) {
        out.push(judge.rel(
            label("decode_last_hidden"),
            &Tensor::stack(&dec_hidden, 0)?,
            golden("decode_last_hidden")?,
        )?);
    }

    // Greedy generation through the public loop.
    let params = SamplingParams { temperature: 0.0, max_new_tokens: greedy.len(), ..Default::default() };
    let generated = step3::generate_from_embeds(model, ids, Some(embeds), &params, |_| {})?;
    out.push(judge.ids(label("greedy_tokens"), &generated.tokens, &greedy));
    Ok(out)
}

/// Runs every text golden under `prefix` of `goldens` on `model` (see [`check_prompt`]), then all
/// prompts again as one right-padded batch.
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
        out.extend(check_prompt(model, &ids, None, goldens, seq, judge)?);
        prompts.push((seq.clone(), ids, goldens.ids(&format!("{seq}.greedy_tokens"))?));
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

/// The images a golden set names (`golden.json` → `vision.images` / `mm.images`), preprocessed
/// with the fixture's settings.
fn fixture_images(fixtures: &Path, names: &[String], model: &Step3Model) -> Result<Vec<PreprocessedImage>> {
    names.iter().map(|n| Ok(model.load_image(&fixtures.join("images").join(format!("{n}.png")))?)).collect()
}

fn names(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// Vision goldens of a checkpoint folder: model inputs (pixel tensors, crop counts), the tower's
/// output with its 4 leading tokens, both downsampler outputs, the projected features, the
/// resized position table and the features in placeholder order.
fn check_vision(model: &Step3Model, fixtures: &Path, goldens: &Goldens, judge: Judge) -> Result<Vec<GoldenCheck>> {
    let mut out = Vec::new();
    let label = |k: &str| format!("{}/{k}{}", goldens.name, judge.tag);
    let vision_json = goldens.json.get("vision");
    let images = fixture_images(fixtures, &names(vision_json.and_then(|v| v.get("images"))), model)?;
    if images.is_empty() {
        return Ok(out);
    }
    let cat = |f: &dyn Fn(&PreprocessedImage) -> Option<Tensor>| -> Result<Option<Tensor>> {
        let parts: Vec<Tensor> = images.iter().filter_map(f).collect();
        Ok(if parts.is_empty() { None } else { Some(Tensor::cat(&parts, 0)?) })
    };
    let global_px = cat(&|p| Some(p.pixel_values.clone()))?.context("no global views")?;
    let patch_px = cat(&|p| p.patch_pixel_values.clone())?;
    out.push(pixel_check(label("vision.pixel_values"), &global_px, goldens.get("vision.pixel_values")?)?);
    if let Some(px) = &patch_px {
        out.push(pixel_check(label("vision.patch_pixel_values"), px, goldens.get("vision.patch_pixel_values")?)?);
    }
    if goldens.tensors.contains_key("vision.num_patches") {
        let ours: Vec<u32> = images.iter().map(|p| p.num_crops() as u32).collect();
        out.push(judge.exact_ids(label("vision.num_patches"), &ours, &goldens.ids("vision.num_patches")?));
    }
    let vision = model.vision.as_ref().context("no vision tower")?;
    let device = model.text.device();
    let mut views = vec![("global", global_px)];
    if let Some(px) = patch_px {
        views.push(("patch", px));
    }
    for (view, px) in views {
        let o = vision.forward_all(&px.to_device(device)?)?;
        for (name, t) in [
            ("encoder_out_full", &o.encoder_out_full),
            ("down1", &o.down1),
            ("down2", &o.down2),
            ("projected", &o.projected),
        ] {
            let key = format!("vision.{view}.{name}");
            if goldens.tensors.contains_key(&key) {
                out.push(judge.rel(label(&key), t, goldens.get(&key)?)?);
            }
        }
    }
    if goldens.tensors.contains_key("vision.patch.position_embedding_interp") {
        let ours = vision.crop_position_embedding().context("no crop position table")?;
        out.push(judge.rel(
            label("vision.patch.position_embedding_interp"),
            &ours,
            goldens.get("vision.patch.position_embedding_interp")?,
        )?);
    }
    out.push(judge.rel(
        label("vision.image_embeds"),
        &model.encode_images(&images)?,
        goldens.get("vision.image_embeds")?,
    )?);
    Ok(out)
}

/// The multimodal prompt goldens under `key` (`mm`, `f32compute.mm`, `bf16compute.mm`).
fn check_mm(
    model: &Step3Model,
    fixtures: &Path,
    goldens: &Goldens,
    key: &str,
    judge: Judge,
) -> Result<Vec<GoldenCheck>> {
    let meta = goldens.json.get(key).or_else(|| goldens.json.get("bf16compute").and_then(|b| b.get(key)));
    let images = fixture_images(fixtures, &names(meta.and_then(|m| m.get("images"))), model)?;
    let ids = goldens.ids(&format!("{key}.input_ids"))?;
    let embeds = model.embed(&ids, &images)?;
    check_prompt(&model.text, &ids, Some(&embeds), goldens, key, judge)
}

/// The greedy goldens of `keys` through the serving engine, all submitted at once (so batched,
/// over the paged KV cache): the tokens every caller gets.
fn check_engine(
    model: Step3Model,
    fixtures: &Path,
    goldens: &Goldens,
    keys: &[(String, Judge)],
) -> Result<Vec<GoldenCheck>> {
    let mut requests = Vec::new();
    for (key, judge) in keys {
        let meta = goldens.json.get(key.as_str()).or_else(|| goldens.json.get("bf16compute").and_then(|b| b.get(key)));
        let images: Vec<step3::ImageSource> = names(meta.and_then(|m| m.get("images")))
            .iter()
            .map(|n| step3::ImageSource::File(fixtures.join("images").join(format!("{n}.png"))))
            .collect();
        let ids = goldens.ids(&format!("{key}.input_ids"))?;
        let greedy = goldens.ids(&format!("{key}.greedy_tokens"))?;
        let options = step3::GenerateOptions {
            temperature: Some(0.0),
            max_new_tokens: greedy.len(),
            ignore_eos: true,
            ..Default::default()
        };
        requests.push((
            key,
            judge,
            greedy,
            step3::engine::Request {
                prompt: step3::engine::Prompt::Tokens { ids, images },
                options,
                ..Default::default()
            },
        ));
    }
    let engine = step3::Engine::new(model, None, step3::GenerationConfig::default(), step3::EngineConfig::default())?;
    let handles = requests
        .into_iter()
        .map(|(key, judge, greedy, req)| Ok((key, judge, greedy, engine.submit(req)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for (key, judge, greedy, handle) in handles {
        let done = handle.wait();
        if let Some(e) = done.outcome.error {
            bail!("{}: the engine failed on {key}: {e}", goldens.name);
        }
        let name = format!("{}/engine.{key}.greedy_tokens{}", goldens.name, judge.tag);
        out.push(judge.ids(name, &done.tokens, &greedy));
    }
    Ok(out)
}

/// Absolute tolerance for preprocessing pixel tensors (fixtures README).
pub const PIXEL_TOLERANCE: f64 = 1e-5;

/// A pixel tensor against its golden: the fixtures' absolute tolerance, always gating.
fn pixel_check(name: String, ours: &Tensor, golden: &Tensor) -> Result<GoldenCheck> {
    let worst = max_abs_diff(ours, golden).with_context(|| name.clone())?;
    Ok(GoldenCheck { name, measure: Measure::AbsErr { worst, tolerance: PIXEL_TOLERANCE }, gating: true })
}

/// Every `step`-th index along the two dimensions `dims` of `t` (the fixtures' subsampled goldens).
fn every_nth(t: &Tensor, step: usize, dims: [usize; 2]) -> Result<Tensor> {
    let mut t = t.clone();
    for d in dims {
        let idx: Vec<u32> = (0..t.dim(d)?).step_by(step).map(|i| i as u32).collect();
        t = t.index_select(&Tensor::new(idx, t.device())?, d)?;
    }
    Ok(t)
}

/// `max|a − b|` over all elements.
pub fn max_abs_diff(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    if ours.dims() != reference.dims() {
        bail!("shape {:?} differs from the golden's {:?}", ours.dims(), reference.dims());
    }
    let d = (ours.to_dtype(DType::F32)? - reference.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?;
    Ok(d.to_scalar::<f32>()? as f64)
}

/// Which golden sets a checkpoint folder holds, by compute dtype.
fn text_prefixes(folder: &str, dtype: DType) -> Vec<(&'static str, Judge)> {
    let exact = Judge { tolerance: F32_TOLERANCE, floats_gate: true, ids_gate: true, tag: "" };
    let bf16 = Judge { tolerance: BF16_TOLERANCE, floats_gate: true, ids_gate: false, tag: "" };
    let bf16_of_f32 = Judge { tolerance: BF16_TOLERANCE, floats_gate: false, ids_gate: false, tag: "@bf16" };
    match (folder, dtype) {
        ("vl-bf16" | "text-bf16", DType::F32) => vec![("f32compute.text", exact)],
        ("vl-bf16" | "text-bf16", DType::BF16) => vec![("bf16compute.text", bf16)],
        ("vl-f32" | "moe-renorm-f32" | "fp8-block", DType::F32) => vec![("text", exact)],
        ("vl-f32" | "moe-renorm-f32" | "fp8-block", DType::BF16) => vec![("text", bf16_of_f32)],
        _ => Vec::new(),
    }
}

/// The checkpoint folders [`verify_fixtures`] knows, in report order. `text-bf16` is step3-rs's
/// own (see the fixtures README): a bf16 text model whose sizes, top-k and RoPE theta differ
/// from the others, where bf16 rounding that departs from PyTorch's shows.
pub const TEXT_FOLDERS: [&str; 5] = ["vl-f32", "vl-bf16", "moe-renorm-f32", "fp8-block", "text-bf16"];

/// Runs every golden of a fixture set (e.g. `tests/fixtures/step3-tiny`) that this build supports,
/// computing in `dtype` (f32 or bf16) on `device`: preprocessing, text (prefill, routers, decode,
/// greedy, batched), vision, multimodal and FP8.
pub fn verify_fixtures(dir: &Path, dtype: DType, device: &Device) -> Result<Vec<GoldenCheck>> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        bail!("verify runs in f32 or bf16, not {dtype:?}");
    }
    let mut checks = Vec::new();
    let mut found = false;
    if dir.join("preprocess").is_dir() {
        found = true;
        checks.extend(check_preprocess(dir)?);
    }
    for folder in TEXT_FOLDERS {
        let path = dir.join(folder);
        if !path.is_dir() {
            continue;
        }
        found = true;
        let goldens = Goldens::load(&path)?;
        let ckpt = Step3Checkpoint::open(&path)?;
        let crop_size = goldens.json.get("crop_size").and_then(Value::as_u64).map(|c| c as usize);
        let opts =
            LoadOptions { dtype, device: device.clone(), fp8: Fp8Storage::Compact, crop_size, ..Default::default() };
        let model = ckpt.load(&opts).with_context(|| format!("loading {}", path.display()))?;
        for (prefix, judge) in text_prefixes(folder, dtype) {
            checks.extend(check_text(&model.text, &goldens, prefix, judge)?);
        }
        if folder == "moe-renorm-f32" && dtype == DType::F32 {
            checks.extend(check_renorm_flag(&ckpt, &goldens, device)?);
        }
        if folder == "fp8-block" {
            checks.extend(check_fp8_weights(&ckpt, &goldens, device)?);
        }
        let exact = Judge { tolerance: F32_TOLERANCE, floats_gate: true, ids_gate: true, tag: "" };
        let bf16_of_f32 = Judge { tolerance: BF16_TOLERANCE, floats_gate: false, ids_gate: false, tag: "@bf16" };
        match (folder, dtype) {
            ("vl-f32" | "moe-renorm-f32", DType::F32) => checks.extend(check_vision(&model, dir, &goldens, exact)?),
            ("vl-f32" | "moe-renorm-f32", _) => checks.extend(check_vision(&model, dir, &goldens, bf16_of_f32)?),
            _ => {}
        }
        let mm = match (folder, dtype) {
            ("vl-f32", DType::F32) => vec![("mm", exact)],
            ("vl-f32", _) => vec![("mm", bf16_of_f32)],
            ("vl-bf16", DType::F32) => vec![("f32compute.mm", exact)],
            ("vl-bf16", _) => vec![(
                "bf16compute.mm",
                Judge { tolerance: BF16_TOLERANCE, floats_gate: true, ids_gate: false, tag: "" },
            )],
            _ => vec![],
        };
        let mut engine_keys: Vec<(String, Judge)> = Vec::new();
        for (prefix, judge) in text_prefixes(folder, dtype) {
            engine_keys.extend(goldens.sequences(prefix).into_iter().map(|seq| (seq, judge)));
        }
        for (key, judge) in mm {
            checks.extend(check_mm(&model, dir, &goldens, key, judge)?);
            engine_keys.push((key.to_string(), judge));
        }
        checks.extend(check_engine(model, dir, &goldens, &engine_keys)?);
    }
    if !found {
        bail!("{} holds none of the fixture folders (preprocess/, {TEXT_FOLDERS:?})", dir.display());
    }
    Ok(checks)
}

/// The text goldens of every checkpoint folder again, with the decoder split over `layout` and
/// the routed experts placed per `experts` (names tagged `@tp{N}ep{M}` / `+host-experts`).
/// Folders whose sizes the layout cannot split (e.g. FP8 blocks a TP split would cut) are
/// reported as skipped, with the reason.
pub fn verify_sharded(
    dir: &Path,
    dtype: DType,
    device: &Device,
    layout: &step3::Layout,
    experts: step3::ExpertPlacement,
) -> Result<Vec<GoldenCheck>> {
    let mut tag = format!("@tp{}ep{}", layout.tp, layout.ep);
    if experts != step3::ExpertPlacement::Device {
        tag += "+host-experts";
    }
    let mut checks = Vec::new();
    for folder in TEXT_FOLDERS {
        let path = dir.join(folder);
        if !path.is_dir() {
            continue;
        }
        let ckpt = Step3Checkpoint::open(&path)?;
        if let Err(e) = ckpt.check_layout(layout) {
            checks.push(GoldenCheck {
                name: format!("{folder}/text{tag}: {e}"),
                measure: Measure::Skipped { reason: "the layout cannot split this checkpoint" },
                gating: false,
            });
            continue;
        }
        let goldens = Goldens::load(&path)?;
        let opts = LoadOptions { dtype, device: device.clone(), layout: layout.clone(), experts, ..Default::default() };
        let model =
            ckpt.load_text_model_with(&opts).with_context(|| format!("loading {} split {tag}", path.display()))?;
        for (prefix, judge) in text_prefixes(folder, dtype) {
            for mut c in check_text(&model, &goldens, prefix, judge)? {
                c.name += &tag;
                checks.push(c);
            }
        }
    }
    Ok(checks)
}

/// Preprocessing goldens: every image of `preprocess/tiny.*` with the tiny sizes (geometry,
/// uint8 intermediates by SHA-256 and value, pixel tensors, newline masks, token layouts), and
/// `preprocess/real.*` with Step3's own sizes.
pub fn check_preprocess(fixtures: &Path) -> Result<Vec<GoldenCheck>> {
    let mut out = Vec::new();
    let dir = fixtures.join("preprocess");
    // `tiny` and `thin` hold whole tensors; `real` (728-px views) every 8th pixel and checksums.
    for set in ["tiny", "real", "thin"] {
        let json_path = dir.join(format!("{set}.json"));
        if !json_path.is_file() {
            continue;
        }
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&json_path)?)
            .with_context(|| json_path.display().to_string())?;
        let tensors = candle_core::safetensors::load(dir.join(format!("{set}.safetensors")), &Device::Cpu)?;
        let usize_of = |k: &str, d: usize| json.get(k).and_then(Value::as_u64).map_or(d, |v| v as usize);
        let cfg = step3::PreprocessConfig {
            image_size: usize_of("image_size", 728),
            crop_size: usize_of("crop_size", usize_of("patch_size", 504)),
            ..Default::default()
        };
        let entries: Vec<(String, Value)> = match json.get("images") {
            Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            _ => vec![(json.get("image").and_then(Value::as_str).unwrap_or_default().to_string(), json.clone())],
        };
        for (name, meta) in entries {
            let file = fixtures.join("images").join(format!("{name}.png"));
            let img = step3::vision::load_image(&file, cfg.max_pixels)?;
            let p = step3::vision::preprocess(&img, &cfg)?;
            let golden = Golden { set, name: &name, meta: &meta, json: &json, tensors: &tensors };
            out.extend(golden.check_structure(&p)?);
            out.extend(golden.check_pixels(&p)?);
        }
    }
    Ok(out)
}

/// The preprocessing goldens of one image: `meta` (its JSON entry) and `tensors` (keys
/// `<image>.<what>`) of the set `set` (whose JSON is `json`).
struct Golden<'a> {
    set: &'a str,
    name: &'a str,
    meta: &'a Value,
    json: &'a Value,
    tensors: &'a HashMap<String, Tensor>,
}

impl Golden<'_> {
    /// The check's name: `preprocess/<set>.<image>.<what>`.
    fn key(&self, what: &str) -> String {
        format!("preprocess/{}.{}.{what}", self.set, self.name)
    }

    fn tensor(&self, what: &str) -> Option<&Tensor> {
        self.tensors.get(&format!("{}.{what}", self.name))
    }

    fn same(&self, what: &str, equal: bool) -> GoldenCheck {
        GoldenCheck { name: self.key(what), measure: Measure::Same { equal }, gating: true }
    }

    /// Crop count, newline flags, token layout, geometry and the 8-bit intermediate images.
    fn check_structure(&self, p: &PreprocessedImage) -> Result<Vec<GoldenCheck>> {
        use sha2::{Digest, Sha256};
        let meta = self.meta;
        let mut out = vec![
            self.same("num_patches", meta.get("num_patches").and_then(Value::as_u64) == Some(p.num_crops() as u64))
        ];
        let mask: Vec<bool> = meta
            .get("patch_newline_mask")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_bool).collect())
            .unwrap_or_default();
        out.push(self.same("patch_newline_mask", mask == p.newline_mask));
        let tokens = |k: &str| {
            let set = self.set;
            self.json
                .get(k)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .with_context(|| format!("{set}.json lacks {k}"))
        };
        let layout = ImageLayout {
            newline_mask: p.newline_mask.clone(),
            crop_tokens: tokens("num_patch_feature_size")?,
            global_tokens: tokens("num_image_feature_size")?,
        };
        let segs: Vec<(String, u64)> = meta
            .get("token_layout_segments")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| Some((s.get(0)?.as_str()?.to_string(), s.get(1)?.as_u64()?))).collect())
            .unwrap_or_default();
        let ours: Vec<(String, u64)> = layout.segments().into_iter().map(|(n, c)| (n.to_string(), c as u64)).collect();
        out.push(self.same("token_layout_segments", segs == ours));
        if let Some(g) = meta.get("geometry") {
            let eq = |k: &str, v: Value| g.get(k) == Some(&v);
            let geo = &p.geometry;
            let ok = eq("original_size", serde_json::json!(geo.original_size))
                && eq("resized_size", serde_json::json!(geo.resized_size))
                && eq("square_padded", serde_json::json!(geo.square_padded))
                && eq("window_size", serde_json::json!(geo.window_size))
                && g.get("crop_canvas_size").is_none_or(|c| *c == serde_json::json!(geo.crop_canvas_size))
                && g.get("boxes_xywh").is_none_or(|b| *b == serde_json::json!(geo.boxes));
            out.push(self.same("geometry", ok));
        }
        let sha = |img: &image::RgbImage| format!("{:x}", Sha256::digest(img.as_raw()));
        for (what, img) in [("resized_u8", Some(&p.global_u8)), ("crop_canvas_u8", p.canvas_u8.as_ref())] {
            let want = meta.get(format!("{what}_sha256")).and_then(Value::as_str);
            if let (Some(h), Some(img)) = (want, img) {
                out.push(self.same(&format!("{what}_sha256"), sha(img) == h));
            }
        }
        for (what, img, step) in [
            ("resized_u8", Some(&p.global_u8), 1),
            ("crop_canvas_u8", p.canvas_u8.as_ref(), 1),
            ("crop_canvas_u8_sub7", p.canvas_u8.as_ref(), 7),
        ] {
            if let (Some(g), Some(img)) = (self.tensor(what), img) {
                let (w, h) = (img.width() as usize, img.height() as usize);
                let ours = every_nth(&Tensor::from_vec(img.as_raw().clone(), (h, w, 3), &Device::Cpu)?, step, [0, 1])?;
                out.push(self.same(what, ours.dims() == g.dims() && max_abs_diff(&ours, g)? == 0.0));
            }
        }
        Ok(out)
    }

    /// The normalised pixel tensors, against every stored golden of them: whole (`<what>`) or every
    /// k-th row and column (`<what>_sub<k>`), and the absolute sums of the whole tensors when given.
    fn check_pixels(&self, p: &PreprocessedImage) -> Result<Vec<GoldenCheck>> {
        let mut out = Vec::new();
        for (what, t) in
            [("pixel_values", Some(&p.pixel_values)), ("patch_pixel_values", p.patch_pixel_values.as_ref())]
        {
            let Some(t) = t else { continue };
            let prefix = format!("{}.{what}", self.name);
            let mut stored: Vec<(String, usize)> = self
                .tensors
                .keys()
                .filter_map(|k| {
                    let rest = k.strip_prefix(&prefix)?;
                    let step = if rest.is_empty() { 1 } else { rest.strip_prefix("_sub")?.parse().ok()? };
                    Some((k.clone(), step))
                })
                .collect();
            stored.sort();
            if stored.is_empty() {
                bail!("{}.safetensors holds no {prefix} (full or subsampled)", self.set);
            }
            for (key, step) in stored {
                let what = key.strip_prefix(&format!("{}.", self.name)).unwrap_or(&key).to_string();
                out.push(pixel_check(self.key(&what), &every_nth(t, step, [2, 3])?, &self.tensors[&key])?);
            }
            if let Some(stats) = self.meta.get(format!("{what}_stats")) {
                let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
                let abs_sum: f64 = v.iter().map(|x| x.abs() as f64).sum();
                let want = stats.get("abs_sum").and_then(Value::as_f64).unwrap_or(f64::NAN);
                out.push(GoldenCheck {
                    name: self.key(&format!("{what}_stats.abs_sum")),
                    measure: Measure::RelErr { worst: (abs_sum - want).abs() / want, tolerance: 1e-6 },
                    gating: true,
                });
            }
        }
        Ok(out)
    }
}

/// `moe-renorm-f32` also stores logits computed with renormalisation switched off: the same
/// weights with `norm_expert_weight = false` must reproduce them.
fn check_renorm_flag(ckpt: &Step3Checkpoint, goldens: &Goldens, device: &Device) -> Result<Vec<GoldenCheck>> {
    let mut config = ckpt.config().text.clone();
    config.norm_expert_weight = false;
    let vb = ckpt.var_builder(DType::F32, device);
    let model = Step3TextModel::new(&config, ckpt.weight_format(step3::Fp8Storage::Compact), vb)?;
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
