//! The latency-vs-load chart (PNG, plotters' bitmap backend). Text is drawn with ab_glyph from
//! a font file read at run time (no font is bundled); without one no chart is drawn.

use std::path::Path;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Fonts tried in order (Debian: fonts-dejavu-core).
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// One line: (offered packets/s, latency ms) points.
#[derive(Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Index into the palette; p50 (thin) and p99 (thick) of one path share it.
    pub color: usize,
    pub thin: bool,
}

fn load_font() -> Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no DejaVuSans.ttf found (apt-get install fonts-dejavu-core) to draw the chart's text")?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    // The font registry wants 'static bytes: this one font lives as long as the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

/// Draws `series` (log-scale latency against offered load) into `out`.
pub fn latency_vs_load(out: &Path, title: &str, series: &[Series]) -> Result<()> {
    load_font()?;
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut xmax, mut ymin, mut ymax) = (1.0f64, f64::MAX, 0.0f64);
    for &(x, y) in pts {
        xmax = xmax.max(x);
        if y > 0.0 && y.is_finite() {
            ymin = ymin.min(y);
            ymax = ymax.max(y);
        }
    }
    if ymax == 0.0 {
        bail!("nothing to chart");
    }
    let root = BitMapBackend::new(out, (1000, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..xmax * 1.05 / 1000.0, (ymin * 0.7..ymax * 1.5).log_scale())
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("offered load (thousand 512-byte packets/s, both directions)")
        .y_desc("one-way latency (ms, log scale)")
        .y_label_formatter(&|y| format!("{y}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(draw)?;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(120, 120, 120),
    ];
    for s in series {
        let color = palette[s.color % palette.len()];
        let style = ShapeStyle::from(color).stroke_width(if s.thin { 1 } else { 2 });
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(_, y)| *y > 0.0 && y.is_finite())
            .map(|&(x, y)| (x / 1000.0, y))
            .collect();
        let marker = pts.clone();
        chart
            .draw_series(LineSeries::new(pts, style))
            .map_err(draw)?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        if s.thin {
            chart
                .draw_series(marker.into_iter().map(|p| Circle::new(p, 3, style)))
                .map_err(draw)?;
        } else {
            chart
                .draw_series(marker.into_iter().map(|p| Circle::new(p, 3, style.filled())))
                .map_err(draw)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

fn draw<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}
