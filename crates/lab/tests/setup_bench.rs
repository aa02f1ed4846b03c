//! The call-setup benchmark runs end to end: one relay-only call at no added delay, its figures
//! in range. (The full benchmark is `natcall-lab setup-bench`; figures in docs/BENCHMARKS.md.)
//!
//! Needs root, `nft`, `tc`, `ip`, and the workspace binaries built, like the other lab tests.

use natcall_lab::Binaries;
use natcall_lab::setup_bench::{self, BenchOptions, SetupPair};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_only_call_is_measured_with_connect_and_first_audio() {
    if let Err(e) = natcall_lab::preflight() {
        panic!("{e}");
    }
    let bins = Binaries::locate(None).unwrap_or_else(|e| panic!("{e}"));
    let opts = BenchOptions {
        calls: 1,
        delays_ms: vec![0],
        pairs: vec![SetupPair::RelayOnly],
        keep_logs: None,
    };
    let cells = setup_bench::run(&bins, &opts).await;
    let [cell] = cells.as_slice() else {
        panic!("one cell expected, got {}", cells.len());
    };
    assert!(cell.errors.is_empty(), "{:?} (logs in {:?})", cell.errors, cell.log_dir);
    let [call] = cell.samples.as_slice() else {
        panic!("one call expected: {cell:?}");
    };
    assert!(
        call.connected_ms > 0.0 && call.connected_ms <= call.wall_connected_ms,
        "{call:?}"
    );
    // The first frame is played out after the jitter buffer's target delay.
    assert!(call.first_audio_ms >= setup_bench::PLAYOUT_DELAY_MS, "{call:?}");
    assert!(call.direct_ms.is_none(), "relay-only never goes direct: {call:?}");
    assert!(setup_bench::table(&cells).contains("relay-only"));
}
