//! `natcall-lab trials`: one scenario run many times in fresh labs, for the success rate and
//! the distribution of the time to the final path (the birthday traversal figures of
//! `docs/traversal.md`).

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::process::Binaries;
use crate::{Outcome, Path, RunOptions, Scenario, run_scenario};

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    /// The caller's final path.
    pub path: Option<Path>,
    /// Whether the run passed (connected, chatted both ways, exited 0, expected path).
    pub passed: bool,
    /// From placing the call to the last path change (ms), when the path changed.
    pub time_to_final_path_ms: Option<f64>,
    /// Birthday probes the probing side sent.
    pub probes_sent: u64,
    /// Sockets the side behind the symmetric NAT opened.
    pub spray_sockets: u64,
    /// The winning candidate's kind, as the caller's report names it.
    pub won: Option<String>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// Every run and the summary.
#[derive(Debug, Clone, Serialize)]
pub struct Trials {
    /// The scenario.
    pub scenario: Scenario,
    /// The runs, in order.
    pub runs: Vec<Trial>,
    /// Runs whose final path was the expected one.
    pub on_expected_path: usize,
    /// Time to the final path over the runs that got there: median, 90th percentile, max (ms).
    pub time_to_final_path_ms: Option<[f64; 3]>,
}

fn sum_over_reports(o: &Outcome, f: impl Fn(&Value) -> Option<u64>) -> u64 {
    o.reports.iter().flatten().filter_map(&f).sum()
}

fn trial(o: &Outcome) -> Trial {
    let traversal = |r: &Value, key: &str| r["traversal"][key].as_u64();
    Trial {
        path: o.observed,
        passed: o.passed(),
        time_to_final_path_ms: o.time_to_final_path_ms,
        probes_sent: sum_over_reports(o, |r| traversal(r, "probes_sent")),
        spray_sockets: sum_over_reports(o, |r| traversal(r, "spray_sockets")),
        won: o.reports[0]
            .as_ref()
            .and_then(|r| r["traversal"]["won"].as_str())
            .map(str::to_owned),
        error: o.error.clone(),
    }
}

/// The `q` quantile of sorted `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Runs `scenario` `count` times, one fresh lab at a time.
pub async fn run(bins: &Binaries, scenario: Scenario, count: usize, opts: &RunOptions) -> Trials {
    let mut runs = Vec::with_capacity(count);
    for _ in 0..count {
        let outcome = run_scenario(bins, scenario, opts).await;
        if !outcome.passed() {
            eprintln!("{}\n", outcome.diagnostics());
        }
        runs.push(trial(&outcome));
    }
    let expected = scenario.expected();
    let on_expected_path = runs.iter().filter(|r| r.path == Some(expected)).count();
    let mut times: Vec<f64> = runs
        .iter()
        .filter(|r| r.path == Some(expected))
        .filter_map(|r| r.time_to_final_path_ms)
        .collect();
    times.sort_by(f64::total_cmp);
    let time_to_final_path_ms =
        (!times.is_empty()).then(|| [quantile(&times, 0.5), quantile(&times, 0.9), quantile(&times, 1.0)]);
    Trials {
        scenario,
        runs,
        on_expected_path,
        time_to_final_path_ms,
    }
}

/// A Markdown table of the runs and a summary line.
pub fn table(t: &Trials) -> String {
    let mut out = String::from(
        "| run | path | time to final path | probes | sockets opened | won |\n|---|---|---|---|---|---|\n",
    );
    for (i, r) in t.runs.iter().enumerate() {
        let path = r.path.map_or("-".to_owned(), |p| p.to_string());
        let time = r
            .time_to_final_path_ms
            .map_or("-".to_owned(), |ms| format!("{:.2} s", ms / 1000.0));
        let _ = writeln!(
            out,
            "| {} | {path} | {time} | {} | {} | {} |",
            i + 1,
            r.probes_sent,
            r.spray_sockets,
            r.won.as_deref().unwrap_or("-")
        );
    }
    let _ = write!(
        out,
        "\n{}: {} of {} runs on the expected path ({})",
        t.scenario,
        t.on_expected_path,
        t.runs.len(),
        t.scenario.expected()
    );
    if let Some([p50, p90, max]) = t.time_to_final_path_ms {
        let _ = write!(
            out,
            "; time to it: median {:.2} s, p90 {:.2} s, max {:.2} s",
            p50 / 1000.0,
            p90 / 1000.0,
            max / 1000.0
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(quantile(&v, 0.5), 5.0);
        assert_eq!(quantile(&v, 0.9), 9.0);
        assert_eq!(quantile(&v, 1.0), 10.0);
        assert_eq!(quantile(&[3.0], 0.5), 3.0);
    }
}
