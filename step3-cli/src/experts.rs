//! `step3 experts`: dead, starved and vanishing routed experts (the statistics live in
//! `step3::experts`; this file parses flags, prints and draws).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use plotters::prelude::*;
use serde_json::json;
use step3::experts::{self, ExpertFlag, FlagKind, FlagRules, RoutingStats, WeightStats};

#[derive(Args)]
pub struct ExpertsArgs {
    /// Directory holding config.json and the weights (bf16, f32 or block-FP8).
    #[arg(long)]
    model_dir: PathBuf,
    /// Prompts, one per line: comma-separated token ids, or text (tokenized with the checkpoint's
    /// tokenizer.json). Without prompts only the weight statistics are computed.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// One prompt as comma-separated token ids (repeatable).
    #[arg(long = "ids")]
    ids: Vec<String>,
    /// Print everything as JSON on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// Write a heatmap (MoE layers x experts) of every statistic computed, as SVG.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Starved: routed share below this fraction of the balanced share 1/E.
    #[arg(long, default_value_t = 0.1)]
    starved_fraction: f64,
    /// Vanishing: output (or weight) norm below this fraction of the layer median.
    #[arg(long, default_value_t = 0.1)]
    vanishing_fraction: f64,
    /// Compute dtype for the prompts: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Device for the prompts: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn bar(total: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    let style = format!("{what} {{bar:40}} {{pos}}/{{len}} ({{eta}} left)");
    bar.set_style(
        indicatif::ProgressStyle::with_template(&style).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

fn parse_id_list(s: &str) -> Option<Vec<u32>> {
    let ids: Option<Vec<u32>> = s.split(',').map(|p| p.trim().parse().ok()).collect();
    ids.filter(|v| !v.is_empty())
}

/// The prompts of `--ids` and `--prompts`, as token ids.
fn prompts(a: &ExpertsArgs) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for s in &a.ids {
        out.push(parse_id_list(s).with_context(|| format!("--ids `{s}` is not a comma-separated list of token ids"))?);
    }
    if let Some(path) = &a.prompts {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut tokenizer = None;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            if let Some(ids) = parse_id_list(line) {
                out.push(ids);
                continue;
            }
            if tokenizer.is_none() {
                tokenizer = Some(step3::Step3Tokenizer::from_dir(&a.model_dir).with_context(|| {
                    format!("{} line {}: text prompts need the checkpoint's tokenizer", path.display(), n + 1)
                })?);
            }
            let ids = tokenizer.as_ref().map(|t| t.encode(line)).transpose()?.unwrap_or_default();
            if ids.is_empty() {
                bail!("{} line {}: the prompt tokenizes to nothing", path.display(), n + 1);
            }
            out.push(ids);
        }
        if out.is_empty() {
            bail!("{} holds no prompts", path.display());
        }
    }
    Ok(out)
}

pub fn run(a: ExpertsArgs) -> Result<ExitCode> {
    let rules = FlagRules { starved_fraction: a.starved_fraction, vanishing_fraction: a.vanishing_fraction };
    if !(rules.starved_fraction > 0.0 && rules.vanishing_fraction > 0.0) {
        bail!("--starved-fraction and --vanishing-fraction must be positive");
    }
    let prompts = prompts(&a)?;
    let ckpt = step3::Step3Checkpoint::open(&a.model_dir)
        .with_context(|| format!("opening the checkpoint in {}", a.model_dir.display()))?;
    let text = &ckpt.config().text;
    if text.moe_layers_enum.is_empty() {
        bail!("{} has no MoE layers (moe_layers_enum is empty)", a.model_dir.display());
    }

    let progress = bar(text.moe_layers_enum.len() * (text.moe_num_experts + 1), "expert weights");
    let weights = experts::weight_stats(&ckpt, &mut |done, _| progress.set_position(done as u64))?;
    progress.finish_and_clear();

    let routing = if prompts.is_empty() {
        None
    } else {
        let opts = step3::LoadOptions {
            dtype: step3::parse_dtype(&a.dtype)?,
            device: step3::parse_device(&a.device)?,
            progress: Some(step3::cli::load_progress()),
            ..Default::default()
        };
        let model = ckpt.load_text_model_with(&opts).with_context(|| format!("loading {}", a.model_dir.display()))?;
        let progress = bar(prompts.len(), "prompts");
        let stats = experts::routing_stats(&model, &prompts, &mut |done, _| progress.set_position(done as u64))?;
        progress.finish_and_clear();
        Some(stats)
    };

    let mut flags = rules.weight_flags(&weights);
    if let Some(r) = &routing {
        flags.extend(rules.routing_flags(r));
    }
    flags.sort_by_key(|f| (f.layer, f.expert, f.kind));

    if let Some(path) = &a.svg {
        heatmap(path, &weights, routing.as_ref(), &flags).with_context(|| format!("writing {}", path.display()))?;
    }
    let e = weights.num_experts;
    if a.json {
        let out = json!({
            "model_dir": a.model_dir,
            "rules": rules,
            "rules_text": rules.describe(e),
            "weights": weights,
            "routing": routing,
            "flags": flags,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_summary(&weights, routing.as_ref(), &flags, &rules);
    }
    Ok(ExitCode::SUCCESS)
}

/// Index and value of the smallest and largest of `v`.
fn extremes(v: &[f64]) -> ((usize, f64), (usize, f64)) {
    let mut lo = (0, f64::INFINITY);
    let mut hi = (0, f64::NEG_INFINITY);
    for (i, &x) in v.iter().enumerate() {
        if x < lo.1 {
            lo = (i, x);
        }
        if x > hi.1 {
            hi = (i, x);
        }
    }
    (lo, hi)
}

fn range(name: &str, v: &[f64]) -> String {
    let ((lo_i, lo), (hi_i, hi)) = extremes(v);
    format!("{name} {lo:.3} (e{lo_i}) .. {hi:.3} (e{hi_i})")
}

fn print_summary(weights: &WeightStats, routing: Option<&RoutingStats>, flags: &[ExpertFlag], rules: &FlagRules) {
    let e = weights.num_experts;
    println!("{} MoE layers x {e} experts; ratios are to the layer median (1 = typical)", weights.layers.len());
    println!();
    println!("weights (Frobenius norms; shared expert for scale):");
    for l in &weights.layers {
        let down: Vec<f64> = l.ratios.iter().map(|r| r.down).collect();
        let gate: Vec<f64> = l.ratios.iter().map(|r| r.gate).collect();
        let up: Vec<f64> = l.ratios.iter().map(|r| r.up).collect();
        println!(
            "  layer {:>3}: median down {:.3}, shared down {:.3}; {}; {}; {}",
            l.layer,
            l.median.down,
            l.shared.down,
            range("down", &down),
            range("gate", &gate),
            range("up", &up)
        );
    }
    if let Some(r) = routing {
        println!();
        println!(
            "prompts: {} tokens, top-{} of {e} (balanced share 1/E = {:.4}); output norms before gating, every token \
             through every expert:",
            r.tokens,
            r.top_k,
            1.0 / e as f64
        );
        for l in &r.layers {
            let share_e: Vec<f64> = l.experts.iter().map(|x| x.share * e as f64).collect();
            let norm: Vec<f64> = l.experts.iter().map(|x| x.out_norm_ratio).collect();
            let gates: Vec<f64> = l.experts.iter().filter_map(|x| x.mean_gate_weight).collect();
            let mean_gate = if gates.is_empty() { f64::NAN } else { gates.iter().sum::<f64>() / gates.len() as f64 };
            println!(
                "  layer {:>3}: {}; {}; median out norm {:.3}, shared {:.3}; mean gate weight {:.3}",
                l.layer,
                range("share x E", &share_e),
                range("out norm", &norm),
                l.median_out_norm,
                l.shared_out_norm,
                mean_gate
            );
        }
    }
    println!();
    println!("rules:");
    for line in rules.describe(e) {
        println!("  {line}");
    }
    println!();
    if flags.is_empty() {
        println!("flags: none");
    } else {
        println!("flags ({}):", flags.len());
        for f in flags {
            let what = match f.kind {
                FlagKind::Dead => "dead (never routed)".to_string(),
                FlagKind::Starved => format!("starved (share {:.5} = {:.3} x 1/E)", f.value, f.value * e as f64),
                FlagKind::Vanishing => format!("vanishing (output norm {:.3e} x the layer median)", f.value),
                FlagKind::VanishingWeights => format!("vanishing weights (norm {:.3e} x the layer median)", f.value),
                FlagKind::NonFinite => format!("non-finite ({}: NaN or infinite weights or outputs)", f.value),
            };
            println!("  layer {:>3} expert {:>3}: {what}", f.layer, f.expert);
        }
    }
}

/// Colour of a ratio to the typical value (1): red at 0, white at 1, blue at 2 and beyond.
fn ratio_color(v: f64) -> RGBColor {
    if !v.is_finite() {
        return RGBColor(0x99, 0x99, 0x99);
    }
    let t = v.clamp(0.0, 2.0);
    let mix = |a: u8, b: u8, f: f64| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    if t < 1.0 {
        RGBColor(mix(0xb2, 0xff, t), mix(0x18, 0xff, t), mix(0x2b, 0xff, t))
    } else {
        RGBColor(mix(0xff, 0x21, t - 1.0), mix(0xff, 0x66, t - 1.0), mix(0xff, 0xac, t - 1.0))
    }
}

/// One panel per statistic (MoE layers up, experts across), the cells flagged by that statistic
/// crossed.
fn heatmap(path: &Path, weights: &WeightStats, routing: Option<&RoutingStats>, flags: &[ExpertFlag]) -> Result<()> {
    let e = weights.num_experts;
    let layers: Vec<usize> = weights.layers.iter().map(|l| l.layer).collect();
    type Panel = (String, Vec<Vec<f64>>, &'static [FlagKind]);
    let mut panels: Vec<Panel> = vec![(
        "down_proj norm / layer median (weights)".into(),
        weights.layers.iter().map(|l| l.ratios.iter().map(|r| r.down).collect()).collect(),
        &[FlagKind::VanishingWeights, FlagKind::NonFinite],
    )];
    if let Some(r) = routing {
        panels.push((
            format!("routed share x E (1 = balanced; {} prompt tokens)", r.tokens),
            r.layers.iter().map(|l| l.experts.iter().map(|x| x.share * e as f64).collect()).collect(),
            &[FlagKind::Dead, FlagKind::Starved],
        ));
        panels.push((
            "output norm before gating / layer median".into(),
            r.layers.iter().map(|l| l.experts.iter().map(|x| x.out_norm_ratio).collect()).collect(),
            &[FlagKind::Vanishing, FlagKind::NonFinite],
        ));
    }
    let cell = (900 / e.max(1)).clamp(6, 40) as u32;
    let width = (cell * e as u32 + 160).max(760);
    let panel_h = cell * layers.len() as u32 + 110;
    let root = SVGBackend::new(path, (width, panel_h * panels.len() as u32)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<std::io::Error>| anyhow::anyhow!("{e}");
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((panels.len(), 1));
    for (area, (title, values, kinds)) in areas.iter().zip(&panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(
                (0..e.saturating_sub(1)).into_segmented(),
                (0..layers.len().saturating_sub(1)).into_segmented(),
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("expert (red 0, white 1 = typical, blue >= 2; x = flagged)")
            .y_desc("MoE layer")
            .x_labels(e.min(24))
            .y_labels(layers.len().min(28))
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => i.to_string(),
                _ => String::new(),
            })
            .y_label_formatter(&|y| match y {
                SegmentValue::CenterOf(i) => layers.get(*i).map_or(String::new(), |l| l.to_string()),
                _ => String::new(),
            })
            .draw()
            .map_err(err)?;
        let cells = values.iter().enumerate().flat_map(|(li, row)| {
            row.iter().enumerate().map(move |(x, &v)| {
                let corner = |x, y| (SegmentValue::Exact(x), SegmentValue::Exact(y));
                Rectangle::new([corner(x, li), corner(x + 1, li + 1)], ratio_color(v).filled())
            })
        });
        chart.draw_series(cells).map_err(err)?;
        let crosses = flags.iter().filter(|f| kinds.contains(&f.kind)).filter_map(|f| {
            let li = layers.iter().position(|&l| l == f.layer)?;
            let at = (SegmentValue::CenterOf(f.expert), SegmentValue::CenterOf(li));
            Some(Cross::new(at, (cell / 3).max(3) as i32, BLACK.stroke_width(2)))
        });
        chart.draw_series(crosses).map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
