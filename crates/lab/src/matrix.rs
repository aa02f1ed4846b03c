//! The scenario matrix: every pair of kinds, run concurrently in separate labs, and its table.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::{Binaries, Outcome, RunOptions, Scenario, run_scenario};

/// Runs `scenarios`, at most `jobs` at a time (each in its own lab), in the given order.
pub async fn run(bins: &Binaries, scenarios: Vec<Scenario>, jobs: usize, opts: &RunOptions) -> Vec<Outcome> {
    let permits = Arc::new(Semaphore::new(jobs.max(1)));
    let mut tasks = Vec::new();
    for scenario in scenarios {
        let (bins, opts, permits) = (bins.clone(), opts.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            run_scenario(&bins, scenario, &opts).await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        if let Ok(outcome) = task.await {
            outcomes.push(outcome);
        }
    }
    outcomes
}

/// The table: A kind, B kind, expected path, observed path, time to connect, time to final
/// path, pass/FAIL.
pub fn table(outcomes: &[Outcome]) -> String {
    let header = [
        "A kind",
        "B kind",
        "expected",
        "observed",
        "connect ms",
        "final path ms",
        "result",
    ];
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let rows: Vec<[String; 7]> = outcomes
        .iter()
        .map(|o| {
            [
                o.scenario.a_label(),
                o.scenario.b_label(),
                o.expected.to_string(),
                o.observed.map_or("-".to_string(), |p| p.to_string()),
                ms(o.time_to_connected_ms),
                ms(o.time_to_final_path_ms),
                if o.passed() { "pass".into() } else { "FAIL".into() },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = line(&header.map(String::from));
    out.push('\n');
    out.push_str(&line(&widths.map(|w| "-".repeat(w))));
    for row in &rows {
        out.push('\n');
        out.push_str(&line(row));
    }
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    out.push_str(&format!("\n{} passed, {failed} failed", outcomes.len() - failed));
    out
}
