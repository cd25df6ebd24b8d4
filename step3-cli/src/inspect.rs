//! `step3 inspect`: what a checkpoint or config describes, and whether the weights match it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use step3::{kv_bytes_per_token, param_counts, Fp8Storage, Step3Checkpoint, Step3Config, TextConfig};

#[derive(Args)]
pub struct InspectArgs {
    /// Checkpoint directory (config.json + weights): also checks the tensor inventory.
    #[arg(long, conflicts_with = "config")]
    model_dir: Option<PathBuf>,
    /// A config.json alone (no weights needed).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Compute dtype assumed for the resident-memory estimate: f32, bf16 or f16. Default: what
    /// `--device` runs by default (f32 on the CPU, bf16 on CUDA).
    #[arg(long)]
    dtype: Option<String>,
    /// The device the estimate is for: cpu or cuda (only its default dtype matters here).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The deployment to plan memory for (`--tp`, `--ep`, `--moe-device`, `--n-cpu-moe`; see
    /// docs/multi-device.md).
    #[command(flatten)]
    parallel: step3::cli::ParallelArgs,
    /// Memory of each device in GiB: prints what is left for the KV cache and how many tokens fit.
    #[arg(long)]
    device_memory_gib: Option<f64>,
    /// Plan for the block-FP8 version of this config (128×128 blocks) even when it has no
    /// quantization_config (e.g. the bf16 config of stepfun-ai/step3 standing for step3-fp8).
    #[arg(long)]
    fp8: bool,
}

/// `1,2,3,7,8` → `1-3, 7-8`.
fn ranges(layers: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let start = layers[i];
        while i + 1 < layers.len() && layers[i + 1] == layers[i] + 1 {
            i += 1;
        }
        out.push(if layers[i] == start { start.to_string() } else { format!("{start}-{}", layers[i]) });
        i += 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

/// `model.layers.3.self_attn.q_proj.weight` ×N → `self_attn.q_proj ×N, ...`.
fn fp8_kinds(names: &[String]) -> String {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for n in names {
        let kind = n.trim_end_matches(".weight").splitn(4, '.').nth(3).unwrap_or(n).to_string();
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, c)) => *c += 1,
            None => kinds.push((kind, 1)),
        }
    }
    kinds.iter().map(|(k, c)| format!("{k} x{c}")).collect::<Vec<_>>().join(", ")
}

pub fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

pub fn run(a: InspectArgs) -> Result<ExitCode> {
    let (config, ckpt) = match (&a.model_dir, &a.config) {
        (Some(dir), _) => {
            let ckpt =
                Step3Checkpoint::open(dir).with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
            (ckpt.config().clone(), Some(ckpt))
        }
        (None, Some(file)) => (Step3Config::from_file(file)?, None),
        (None, None) => bail!("give --model-dir DIR or --config FILE"),
    };
    let t: &TextConfig = &config.text;
    let moe: Vec<usize> = (0..t.num_hidden_layers).filter(|&l| t.is_moe_layer(l)).collect();
    let dense: Vec<usize> = (0..t.num_hidden_layers).filter(|&l| !t.is_moe_layer(l)).collect();
    let p = param_counts(t);
    let report = ckpt.as_ref().map(|c| c.check_all());
    let dtype = match &a.dtype {
        Some(d) => step3::parse_dtype(d)?,
        None => match step3::device_ordinal(&a.device).context("--device")? {
            None => step3::default_dtype(&step3::Device::Cpu),
            Some(_) => step3::DType::BF16,
        },
    };
    if let Some(g) = a.device_memory_gib {
        if !(g.is_finite() && g > 0.0 && g <= 1e6) {
            bail!("--device-memory-gib must be a positive number of GiB (at most 1e6), not {g}")
        }
    }
    let fp8: Vec<String> =
        ckpt.as_ref().map(|c| c.fp8_tensors().into_iter().map(|t| t.name).collect()).unwrap_or_default();
    let resident = ckpt
        .as_ref()
        .map(|c| (c.resident_bytes(dtype, Fp8Storage::Compact), c.resident_bytes(dtype, Fp8Storage::Dequantized)));

    let wants_plan = !a.parallel.is_single() || a.device_memory_gib.is_some() || a.fp8;
    let device_plan = if wants_plan {
        Some(plan(&a, t, config.quantization.as_ref().map(|q| q.weight_block_size), dtype)?)
    } else {
        None
    };
    if a.json {
        let mut out = json!({
            "config": config.path,
            "model_type": config.model_type,
            "layers": t.num_hidden_layers,
            "moe_layers": moe,
            "dense_layers": dense,
            "parameters": p,
            "kv_cache_bytes_per_token": {
                "bf16": kv_bytes_per_token(t, 2),
                "fp8": kv_bytes_per_token(t, 1),
                "f32": kv_bytes_per_token(t, 4),
            },
            "context": t.max_position_embedding(),
        });
        if let (Some(ckpt), Some(r)) = (&ckpt, &report) {
            out["weights"] = json!({
                "files": ckpt.weights().files(),
                "file_bytes": ckpt.weights().file_bytes(),
                "expected_tensors": r.checked,
                "problems": r.problems.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                "other_tensors": r.unexpected.len(),
                "quantization": config.quantization,
                "fp8_tensors": fp8,
                "resident_bytes": resident.map(|(c, d)| json!({ "dtype": format!("{dtype:?}"), "fp8_compact": c, "fp8_dequantized": d })),
            });
        }
        if let Some((value, _, _)) = &device_plan {
            out["device_plan"] = value.clone();
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("config          {} ({:?})", config.path.display(), config.model_type);
        println!("layers          {} (MoE: {}; dense: {})", t.num_hidden_layers, ranges(&moe), ranges(&dense));
        println!(
            "attention       MFA: hidden {} -> q {} -> {} heads x {}; 1 K/V head; RoPE theta {}",
            t.hidden_size, t.share_q_dim, t.num_attention_heads, t.head_dim, t.rope_theta
        );
        println!(
            "feed-forward    dense {}; MoE {} experts x {} (top-{}, renormalise: {}) + shared {}",
            t.intermediate_size,
            t.moe_num_experts,
            t.moe_intermediate_size,
            t.moe_top_k,
            t.norm_expert_weight,
            t.share_expert_dim
        );
        println!("vocabulary      {} tokens; context {} tokens", t.vocab_size, t.max_position_embedding());
        println!(
            "parameters      {} language model ({} params); active per token {} ({} with the input embedding)",
            human(p.total),
            p.total,
            human(p.active_per_token),
            human(p.active_per_token + p.embedding)
        );
        println!(
            "  by part       embedding {}, lm_head {}, attention {}, dense FFN {}, routed experts {}, shared experts {}, routers {}, norms {}",
            human(p.embedding),
            human(p.lm_head),
            human(p.attention),
            human(p.dense_ffn),
            human(p.routed_experts),
            human(p.shared_experts),
            human(p.routers),
            human(p.norms)
        );
        println!(
            "KV cache        {} per token in bf16 ({} in 8-bit), {} per layer per token",
            bytes(kv_bytes_per_token(t, 2) as u64),
            bytes(kv_bytes_per_token(t, 1) as u64),
            bytes((kv_bytes_per_token(t, 2) / t.num_hidden_layers) as u64)
        );
        if let (Some(ckpt), Some(r)) = (&ckpt, &report) {
            println!(
                "weights         {} file(s), {} on disk",
                ckpt.weights().files().len(),
                bytes(ckpt.weights().file_bytes())
            );
            if let Some(q) = &config.quantization {
                println!(
                    "quantization    block-FP8 (e4m3, {}x{} blocks, {} activations): {} FP8 tensors ({})",
                    q.weight_block_size[0],
                    q.weight_block_size[1],
                    q.activation_scheme,
                    fp8.len(),
                    fp8_kinds(&fp8)
                );
            }
            if let Some((compact, dequantized)) = resident {
                if fp8.is_empty() {
                    println!("resident        {} of language-model weights in {dtype:?}", bytes(compact as u64));
                } else {
                    println!(
                        "resident        {} of language-model weights in {dtype:?} with FP8 kept compact ({} if dequantised at load)",
                        bytes(compact as u64),
                        bytes(dequantized as u64)
                    );
                }
            }
            if r.is_ok() {
                println!(
                    "inventory       OK: all {} expected tensors present with the expected shapes and dtypes",
                    r.checked
                );
            } else {
                println!("inventory       {} problem(s) among {} expected tensors:", r.problems.len(), r.checked);
                for e in &r.problems {
                    println!("  - {e}");
                }
            }
            if !r.unexpected.is_empty() {
                println!("                {} other tensor(s) this build does not use", r.unexpected.len());
            }
        }
        for line in device_plan.iter().flat_map(|p| &p.1) {
            println!("{line}");
        }
    }
    let plan_ok = device_plan.as_ref().is_none_or(|p| p.2);
    Ok(if report.is_some_and(|r| !r.is_ok()) || !plan_ok { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// The per-device memory of the layout the flags describe: a JSON value, the text lines, and
/// whether the layout can run.
fn plan(
    a: &InspectArgs,
    t: &TextConfig,
    block: Option<[usize; 2]>,
    dtype: step3::DType,
) -> Result<(serde_json::Value, Vec<String>, bool)> {
    let layout = a.parallel.layout()?;
    let placement = a.parallel.expert_placement()?;
    let block = block.or(a.fp8.then_some([128, 128]));
    let what = match block {
        Some(b) => format!("block-FP8 ({}x{}) linear weights, other weights in {dtype:?}", b[0], b[1]),
        None => format!("{dtype:?} weights"),
    };
    if let Err(e) = step3::check_layout(t, &layout, block) {
        let line = format!("layout          tp {} x ep {}: cannot run: {e}", layout.tp, layout.ep);
        return Ok((json!({ "tp": layout.tp, "ep": layout.ep, "error": e.to_string() }), vec![line], false));
    }
    let plan = step3::shard::memory_plan(t, &layout, placement, dtype.size_in_bytes(), block);
    let budget = a.device_memory_gib.map(|g| (g * (1u64 << 30) as f64) as u64);
    let ranks: Vec<_> = plan
        .iter()
        .map(|m| {
            let free = budget.map(|b| b.saturating_sub(m.device_weights));
            json!({
                "device_weights": m.device_weights,
                "host_weights": m.host_weights,
                "kv_bytes_per_token": m.kv_bytes_per_token,
                "free_for_kv": free,
                "kv_tokens": free.map(|f| f / m.kv_bytes_per_token.max(1)),
            })
        })
        .collect();
    let value = json!({ "tp": layout.tp, "ep": layout.ep, "weights": what, "ranks": ranks });
    let mut lines = vec![format!(
        "layout          tp {} x ep {} = {} device(s); {what}; routed experts {}",
        layout.tp,
        layout.ep,
        layout.world(),
        match placement {
            step3::ExpertPlacement::Device => "on the devices".to_string(),
            step3::ExpertPlacement::Host => "in host memory (all MoE layers)".to_string(),
            step3::ExpertPlacement::HostFirst(k) => format!("of the first {k} MoE layers in host memory"),
        }
    )];
    // Runs of ranks that hold the same, one line each.
    let mut r = 0;
    while r < plan.len() {
        let m = plan[r];
        let end = (r..plan.len()).take_while(|&q| plan[q] == m).last().unwrap_or(r);
        let label = if end > r { format!("ranks {r}-{end}") } else { format!("rank {r}") };
        let mut line = format!(
            "  {label:<13} weights {} on the device, KV cache {} per token",
            bytes(m.device_weights),
            bytes(m.kv_bytes_per_token)
        );
        match budget {
            Some(b) if b >= m.device_weights => {
                let free = b - m.device_weights;
                line += &format!(
                    "; of {}: {} free for KV = {} tokens",
                    bytes(b),
                    bytes(free),
                    human(free / m.kv_bytes_per_token.max(1))
                );
            }
            Some(b) => line += &format!("; does not fit in {}", bytes(b)),
            None => {}
        }
        lines.push(line);
        r = end + 1;
    }
    let host: u64 = plan.iter().map(|m| m.host_weights).sum();
    if host > 0 {
        lines.push(format!("  host memory   {} of routed experts (all ranks)", bytes(host)));
    }
    Ok((value, lines, true))
}
