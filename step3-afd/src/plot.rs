//! The figure a reader of the cost model wants: USD per 1M decoded tokens (cheapest AFD pairing)
//! against context length, one line per model.

use std::path::Path;

use plotters::prelude::*;

use crate::cost::afd_best;
use crate::{Accelerator, ModelSpec};

/// Contexts plotted: 1K to 128K tokens, four points per octave.
pub fn contexts() -> Vec<usize> {
    (0..=28).map(|i| (1024.0 * 2f64.powf(i as f64 / 4.0)).round() as usize).collect()
}

/// Writes an SVG of the cheapest-AFD decode cost versus context for `models` over `accels`.
pub fn cost_vs_context_svg(path: &Path, models: &[ModelSpec], accels: &[Accelerator]) -> Result<(), String> {
    let ctxs = contexts();
    let series: Vec<(String, Vec<(f64, f64)>)> = models
        .iter()
        .map(|m| {
            let pts = ctxs.iter().filter_map(|&c| afd_best(m, accels, c).map(|p| (c as f64, p.total))).collect();
            (m.name.clone(), pts)
        })
        .collect();
    let ymax = series.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y)).fold(0.0, f64::max) * 1.05;
    let names = accels.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ");
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Decode cost per 1M tokens vs context (cheapest attention + FFN accelerators)", ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (1024f64..131072f64).log_scale().with_key_points((10..=17).map(|p| (1u64 << p) as f64).collect::<Vec<_>>()),
            0f64..ymax,
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(format!("context length (tokens); accelerators: {names}"))
        .y_desc("USD per 1M decoded tokens")
        .x_label_formatter(&|x| format!("{}K", (*x / 1024.0).round()))
        .x_labels(8)
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()
        .map_err(e)?;
    // Distinguishable colours; Step-3 drawn thick and black.
    const COLORS: [RGBColor; 10] = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x8c, 0x56, 0x4b),
        RGBColor(0xe3, 0x77, 0xc2),
        RGBColor(0x7f, 0x7f, 0x7f),
        RGBColor(0xbc, 0xbd, 0x22),
        RGBColor(0x17, 0xbe, 0xcf),
    ];
    for (i, (name, pts)) in series.into_iter().enumerate() {
        let step3 = name == "Step-3";
        let color = if step3 { BLACK } else { COLORS[i % COLORS.len()] };
        let width = if step3 { 4 } else { 2 };
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(width)))
            .map_err(e)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}
