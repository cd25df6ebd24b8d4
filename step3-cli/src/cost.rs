//! `step3 cost`: the Step3 paper's decode-cost model for a preset or any Step3-style config.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use step3_afd::cost::{attention_cost, ffn_cost, min_sparsity, PER_MILLION};
use step3_afd::{presets, Accelerator, CostReport, ModelSpec};

#[derive(Args)]
pub struct CostArgs {
    /// Built-in model: step3, dsv3, kimi_k2, qwen3_moe, qwen3_32b, llama4_maverick, minimax_m1,
    /// ernie45, pangu_pro.
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// A Step3-style config.json (step3_vl or step3_text) instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Context length in tokens.
    #[arg(long, default_value_t = step3_afd::CTX_8K)]
    context: usize,
    /// Restrict the accelerators considered (repeatable): H800, H20, A800, 910B, H100, H200, B200,
    /// L20, L4, or names from --accel-file.
    #[arg(long = "accel")]
    accels: Vec<String>,
    /// Price one specific disaggregated pairing: attention on this accelerator ...
    #[arg(long, requires = "ffn_accel")]
    attn_accel: Option<String>,
    /// ... and the FFN on this one.
    #[arg(long, requires = "attn_accel")]
    ffn_accel: Option<String>,
    /// Extra accelerators from a JSON or TOML file (fields: name, usd_per_hour, bf16_flops,
    /// fp8_flops, mem_bw, nics, nic_gbps).
    #[arg(long)]
    accel_file: Option<PathBuf>,
    /// Print one JSON object instead of the tables.
    #[arg(long)]
    json: bool,
    /// Also write an SVG plot of cost versus context for all presets (and the --config model).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// USD with three decimals like the paper, or three significant digits when that would print 0.
fn usd(x: f64) -> String {
    if x == 0.0 || x >= 0.0005 {
        format!("{x:.3}")
    } else {
        format!("{x:.2e}")
    }
}

fn pick<'a>(all: &'a [Accelerator], name: &str) -> Result<&'a Accelerator> {
    all.iter().find(|a| a.name.eq_ignore_ascii_case(name)).with_context(|| {
        let names: Vec<&str> = all.iter().map(|a| a.name.as_str()).collect();
        format!("unknown accelerator `{name}`; known: {}", names.join(", "))
    })
}

pub fn run(a: CostArgs) -> Result<ExitCode> {
    if a.context == 0 {
        bail!("--context must be at least 1 token");
    }
    let mut all = presets::accelerators();
    if let Some(file) = &a.accel_file {
        for custom in Accelerator::from_file(file)? {
            all.retain(|x| !x.name.eq_ignore_ascii_case(&custom.name));
            all.push(custom);
        }
    }
    let model = match (&a.preset, &a.config) {
        (Some(p), _) => presets::model(p).with_context(|| {
            let keys: Vec<String> = presets::models().into_iter().map(|m| m.key).collect();
            format!("unknown preset `{p}`; known: {}", keys.join(", "))
        })?,
        (None, Some(file)) => {
            let cfg = step3::Step3Config::from_file(file)?;
            let name =
                file.parent().and_then(|d| d.file_name()).map_or("config".into(), |n| n.to_string_lossy().into_owned());
            ModelSpec::from_text_config(&name, &name, &cfg.text, 1)
        }
        (None, None) if a.plot.is_some() => presets::step3(),
        (None, None) => bail!("give --preset NAME or --config FILE"),
    };
    let accels: Vec<Accelerator> = if a.accels.is_empty() {
        all.clone()
    } else {
        a.accels.iter().map(|n| pick(&all, n).cloned()).collect::<Result<_>>()?
    };
    let pairing = match (&a.attn_accel, &a.ffn_accel) {
        (Some(at), Some(ff)) => Some((pick(&all, at)?, pick(&all, ff)?)),
        _ => None,
    };
    let c = a.context;
    let report = CostReport::new(&model, &accels, c, pairing);

    if let Some(path) = &a.plot {
        let mut models = presets::models();
        if a.config.is_some() {
            models.push(model.clone());
        }
        step3_afd::plot::cost_vs_context_svg(path, &models, &accels)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }

    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{} at {c} tokens of context, per decoded token", model.name);
    println!(
        "  KV cache          {:.3e} bytes with 8-bit KV ({:.3e} with bf16)",
        report.kv_bytes, report.kv_bytes_bf16
    );
    println!(
        "  attention FLOPs   {:.3e}  (arithmetic intensity {:.0} FLOP/byte)",
        report.attn_flops, report.arithmetic_intensity
    );
    println!("  linear FLOPs      {:.3e}  (projections around attention)", report.linear_flops);
    println!("  FFN FLOPs         {:.3e}", report.ffn_flops);
    println!("  activated params  {} ({})", report.activated_params, crate::inspect::human(report.activated_params));
    println!();
    println!("USD per 1M decoded tokens");
    println!(
        "  {:<8} {:>7} {:>10} {:>8} {:>11} {:>9} {:>12}",
        "accel", "$/h", "attention", "FFN", "attn bound", "roofline", "min MoE S"
    );
    for acc in &accels {
        let compute = model.attn_flops(c) * acc.usd_per_flop();
        let memory = model.kv_bytes(c) * acc.usd_per_byte();
        println!(
            "  {:<8} {:>6.2}{} {:>10} {:>8} {:>11} {:>9.0} {:>12.3}",
            acc.name,
            acc.usd_per_hour,
            if acc.price_is_assumption { "*" } else { " " },
            usd(attention_cost(&model, acc, c) * PER_MILLION),
            usd(ffn_cost(&model, acc) * PER_MILLION),
            if memory >= compute { "memory" } else { "compute" },
            acc.roofline(),
            min_sparsity(acc, model.hidden, model.layers, None),
        );
    }
    if accels.iter().any(|x| x.price_is_assumption) {
        println!("  (* price assumed; the paper's Table 4 covers H800, H20, A800 and 910B)");
    }
    if let Some(best) = &report.cost_per_1m_tokens.afd_best {
        println!();
        println!(
            "cheapest AFD: attention on {} + FFN on {} = {} USD per 1M tokens",
            best.attention,
            best.ffn,
            usd(best.total)
        );
    }
    if let Some(p) = &report.cost_per_1m_tokens.pairing {
        println!("requested:    attention on {} + FFN on {} = {} USD per 1M tokens", p.attention, p.ffn, usd(p.total));
    }
    Ok(ExitCode::SUCCESS)
}
