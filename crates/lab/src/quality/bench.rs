//! `natcall-lab quality`: the call-quality scenarios side by side, as a table and charts.
//!
//! The scenarios are the ones the lab's tests check ([`preset`]), each run on the direct path
//! and through the relay, one call at a time (they measure timing). For each: audio frames on
//! time, video frames complete and on time, alice's target against the cap (each second's
//! mean, from 5 s into each cap), bob's one-way delay percentiles for audio, and
//! with a download beside the call what share of the link the call kept. [`chart`] draws
//! alice's target and the rate that reached bob over time, with the cap, as a PNG.
//!
//! Binaries from before the rate controller (no `rate` events, no delay percentiles) run the
//! same scenarios; their columns that need those say `–`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::{Condition, QualityOutcome, QualityPath, QualitySpec};

/// The scenarios, by name.
pub const PRESETS: [&str; 5] = ["cap400", "steps", "loss2", "lossless", "bulk"];

/// The scenario `name` on `path` (see [`PRESETS`]); `None` for an unknown name.
pub fn preset(name: &str, path: QualityPath) -> Option<QualitySpec> {
    let (condition, secs, video_kbps) = match name {
        // bob's downlink capped at 400 kbit/s.
        "cap400" => (Condition::cap(400), 12, 1000),
        // 2 Mbit/s, 300 kbit/s from 8 s, 2 Mbit/s again from 16 s.
        "steps" => (
            Condition {
                caps: vec![
                    (Duration::ZERO, 2000),
                    (Duration::from_secs(8), 300),
                    (Duration::from_secs(16), 2000),
                ],
                loss_pct: 0.0,
                bulk: false,
            },
            24,
            2000,
        ),
        // 2 % random loss each way, no cap.
        "loss2" => (
            Condition {
                caps: Vec::new(),
                loss_pct: 2.0,
                bulk: false,
            },
            12,
            2000,
        ),
        // The same without loss: the reference of loss2.
        "lossless" => (
            Condition {
                caps: Vec::new(),
                loss_pct: 0.0,
                bulk: false,
            },
            12,
            2000,
        ),
        // 400 kbit/s shared with a TCP download under way when the call starts.
        "bulk" => (
            Condition {
                caps: vec![(Duration::ZERO, 400)],
                loss_pct: 0.0,
                bulk: true,
            },
            15,
            1000,
        ),
        _ => return None,
    };
    Some(QualitySpec {
        name: name.to_owned(),
        path,
        condition,
        duration: Duration::from_secs(secs),
        video_kbps,
        media_kbps: 2500,
    })
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

/// A Markdown table of `outcomes`.
pub fn table(outcomes: &[QualityOutcome]) -> String {
    let mut out = String::from(
        "| scenario | path | audio on time | video complete, on time | target ÷ cap from 5 s into each cap (min / median / max of each second's mean) | target from 5 s, kbit/s (median) | audio delay p50 / p95 | call's share of the link |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let end = o.spec.duration.as_secs_f64();
        // Each phase of the cap from 5 s after it began (the whole call without a cap).
        let mut starts: Vec<f64> = o.spec.condition.caps.iter().map(|(at, _)| at.as_secs_f64()).collect();
        if starts.is_empty() {
            starts.push(0.0);
        }
        let phases: Vec<String> = starts
            .iter()
            .enumerate()
            .filter_map(|(i, &start)| {
                let stop = starts.get(i + 1).copied().unwrap_or(end);
                let r = sorted(o.target_over_cap(start + 5.0, stop));
                (!r.is_empty()).then(|| format!("{:.2} / {:.2} / {:.2}", r[0], r[r.len() / 2], r[r.len() - 1]))
            })
            .collect();
        let ratio = if phases.is_empty() {
            "–".to_owned()
        } else {
            phases.join("; ")
        };
        let targets = sorted(o.targets(5.0, end));
        let target = match (targets.get(targets.len() / 2), o.final_target_bps) {
            (Some(t), _) => format!("{:.0}", t / 1000.0),
            // Binaries without rate events: the pace their report ended with.
            (None, Some(last)) => format!("{:.0} (at the end)", last as f64 / 1000.0),
            (None, None) => "–".to_owned(),
        };
        let delay = o
            .audio_delay_ms
            .map_or("–".to_owned(), |(p50, p95)| format!("{p50:.0} / {p95:.0} ms"));
        let share = o
            .bulk_bps
            .map_or("–".to_owned(), |b| pct(o.media_bps / (o.media_bps + b).max(1.0)));
        let failed = o.error.as_ref().map_or(String::new(), |e| format!(" (failed: {e})"));
        out.push_str(&format!(
            "| {}{failed} | {} | {} ({}/{}) | {} ({}/{}) | {ratio} | {target} | {delay} | {share} |\n",
            o.spec.name,
            o.spec.path,
            pct(o.audio_on_time_share()),
            o.audio_on_time,
            o.audio_frames,
            pct(o.video_on_time_share()),
            o.video_on_time,
            o.video_frames,
        ));
    }
    out
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// (seconds, kbit/s) points of one line.
type Points = Vec<(f64, f64)>;

/// Fonts tried in order (Debian: fonts-dejavu-core).
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn load_font() -> Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no DejaVuSans.ttf found (apt-get install fonts-dejavu-core) to draw the chart's text")?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    // The font registry wants 'static bytes: this one font lives as long as the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| anyhow::anyhow!("{path} is not a usable font"))
}

fn draw<E: std::error::Error + Send + Sync + 'static>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}

/// Draws alice's target, the rate that reached bob, and the cap over time into `out` (PNG).
pub fn chart(o: &QualityOutcome, out: &Path) -> Result<()> {
    if o.rates.is_empty() {
        bail!("{} ({}): no rate events to chart", o.spec.name, o.spec.path);
    }
    load_font()?;
    let secs = o.spec.duration.as_secs_f64();
    let kbps = |b: u64| b as f64 / 1000.0;
    let caps: Vec<(f64, f64)> = (0..=(secs * 10.0) as u32)
        .filter_map(|i| {
            let t = f64::from(i) / 10.0;
            o.spec
                .condition
                .cap_at(Duration::from_secs_f64(t))
                .map(|k| (t, f64::from(k)))
        })
        .collect();
    let ymax = o
        .rates
        .iter()
        .map(|r| kbps(r.target_bps.max(r.delivered_bps.unwrap_or(0))))
        .chain(caps.iter().map(|c| c.1))
        .fold(100.0f64, f64::max)
        * 1.1;
    let root = BitMapBackend::new(out, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let title = format!("{} through the {} path", o.spec.name, o.spec.path);
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..secs, 0.0..ymax)
        .map_err(draw)?;
    c.configure_mesh()
        .x_desc("seconds since the call connected")
        .y_desc("kbit/s")
        .draw()
        .map_err(draw)?;
    let target: Vec<(f64, f64)> = o.rates.iter().map(|r| (r.at_s, kbps(r.target_bps))).collect();
    let delivered: Vec<(f64, f64)> = o
        .rates
        .iter()
        .filter_map(|r| Some((r.at_s, kbps(r.delivered_bps?))))
        .collect();
    let series: [(&str, Points, RGBColor); 3] = [
        ("cap", caps, RGBColor(150, 150, 150)),
        ("alice's target", target, RGBColor(200, 40, 40)),
        ("reached bob", delivered, RGBColor(40, 80, 200)),
    ];
    for (label, points, color) in series {
        if points.is_empty() {
            continue;
        }
        c.draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(draw)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}
