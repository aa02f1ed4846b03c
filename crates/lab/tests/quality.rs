//! Call quality on slow links, on the direct path and through the relay: the sender's rate
//! controller keeps audio on time and video whole when bob's downlink is capped (also when the
//! cap changes mid-call), does not collapse under random loss, and keeps its share beside a
//! download.
//!
//! One call at a time: these measure timing (queues of tens of milliseconds, a userspace
//! forwarder for loss), which other labs busy on the same two cores would blur.

use natcall_lab::quality::{QualityOutcome, QualityPath, bench, run_quality};
use natcall_lab::{Binaries, preflight};

/// The top of the band the target must keep to, as a share of the cap. The target counts each
/// packet as the network carries it: on a UDP path the IP and UDP headers (exact), through the
/// relay its framing, a TLS record and TCP/IP per frame — what a frame costs when it travels
/// alone, a few percent more than when frames share records and segments at higher rates. So
/// through the relay the target is the wire rate to within 5 %.
fn top(path: QualityPath) -> f64 {
    match path {
        QualityPath::Direct => 1.0,
        QualityPath::Relay => 1.05,
    }
}

/// Held by the call running now (an async lock: the tests wait for their turn without
/// blocking a thread the labs' runtimes may need).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A run's log folder: kept when the test fails (or `NATCALL_LAB_KEEP` is set), else removed.
struct Logs(Option<tempfile::TempDir>);

impl Drop for Logs {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take()
            && (std::thread::panicking() || std::env::var_os("NATCALL_LAB_KEEP").is_some())
        {
            eprintln!("logs kept in {}", dir.keep().display());
        }
    }
}

/// A finished run: what it measured, and its logs (kept if the test panics while it lives).
struct Run {
    outcome: QualityOutcome,
    _logs: Logs,
}

impl std::ops::Deref for Run {
    type Target = QualityOutcome;
    fn deref(&self) -> &QualityOutcome {
        &self.outcome
    }
}

/// Runs the scenario `name` (`natcall-lab quality`'s, [`bench::preset`]) on `path`.
async fn run(name: &str, path: QualityPath) -> Run {
    let _turn = ONE_AT_A_TIME.lock().await;
    if let Err(e) = preflight() {
        panic!("{e}");
    }
    let bins = Binaries::locate(None).expect("natcall binaries next to the test (cargo build --bins)");
    let dir = tempfile::Builder::new()
        .prefix(&format!("natcall-quality-{name}-{path}-"))
        .tempdir()
        .expect("a log folder");
    let spec = bench::preset(name, path).expect("a known scenario");
    let outcome = run_quality(&bins, &spec, dir.path()).await.expect("the lab builds");
    let logs = Logs(Some(dir));
    eprintln!("{}", outcome.diagnostics());
    assert!(outcome.error.is_none(), "{}", outcome.diagnostics());
    assert_eq!(
        outcome.path.as_deref(),
        Some(path.to_string().as_str()),
        "{}",
        outcome.diagnostics()
    );
    Run { outcome, _logs: logs }
}

/// At least `share` of the audio frames alice's sender took were complete at bob before their
/// playout time.
fn audio_on_time(o: &QualityOutcome, share: f64) {
    let got = o.audio_on_time_share();
    assert!(got >= share, "audio on time {got:.3}: {}", o.diagnostics());
}

/// Each second's mean target from `from` to `to` (since connected) is within 60 % of the cap
/// and `top` of it, but for at most one second, which is within 50 % and `top` + 15 %. One
/// second's mean of a 12 s call moves with a single probe or, through the relay, a burst of
/// TCP: CI runs showed single seconds at 59.6 %, 100.9 % (direct, top 100 %) and 112.9 %
/// (relay, top 105 %) in calls whose other seconds were all in the band.
fn in_band(o: &QualityOutcome, from: f64, to: f64, top: f64) {
    let band = o.target_over_cap(from, to);
    assert!(!band.is_empty(), "no rate events in {from}–{to} s: {}", o.diagnostics());
    let outside = band.iter().filter(|r| !(0.6..=top).contains(*r)).count();
    assert!(
        outside <= 1 && band.iter().all(|r| (0.5..=top + 0.15).contains(r)),
        "target/cap in {from}–{to} s outside 60–{:.0} % for more than one second, or outside \
         50–{:.0} %: {band:?}: {}",
        top * 100.0,
        (top + 0.15) * 100.0,
        o.diagnostics()
    );
}

/// Runs scenario `name` on `path` and applies `check` (which panics on a miss), up to
/// [`ATTEMPTS`] times: the first run that passes ends it, and each miss is printed. These measure
/// one 12–24 s call's timing on two shared cores: CI runs of unchanged code missed a band in
/// about 1 run in 4 (one or two seconds a few percent outside it, a download's share at 23 %
/// against 25 %), and through the relay a TCP retransmission stall lands in a run at random
/// (see [`beside_a_download`]). Two misses in a row happened in CI (stop 26's run of the relay
/// beside a download). With a miss rate of 1 in 4, three runs all miss 1 time in 64; a
/// regression that misses 9 runs in 10 still fails 73 % of the time (and one that always
/// misses, always): these catch what breaks a scenario, not a few percent of drift.
async fn run_checked(name: &str, path: QualityPath, check: impl Fn(&QualityOutcome)) {
    for attempt in 1..ATTEMPTS {
        let run = run(name, path).await;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&run))).is_ok() {
            return;
        }
        eprintln!("{name} ({path}): run {attempt} of {ATTEMPTS} missed (above); running it again");
    }
    let last = run(name, path).await;
    check(&last);
}

/// Runs of one scenario before a miss fails the test.
const ATTEMPTS: u32 = 3;

/// Downlink capped at 400 kbit/s for 12 s.
async fn capped_400(path: QualityPath) {
    run_checked("cap400", path, |o| {
        let diag = o.diagnostics();
        audio_on_time(o, 0.98);
        in_band(o, 5.0, 12.0, top(path));
        assert!(
            o.video_on_time_share() >= 0.90,
            "video on time {:.3}: {diag}",
            o.video_on_time_share()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_kbit_downlink_keeps_audio_on_time_and_video_whole_on_the_direct_path() {
    capped_400(QualityPath::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_kbit_downlink_keeps_audio_on_time_and_video_whole_through_the_relay() {
    capped_400(QualityPath::Relay).await;
}

/// The cap drops from 2 Mbit/s to 300 kbit/s at 8 s and comes back at 16 s.
async fn cap_changes(path: QualityPath) {
    run_checked("steps", path, |o| {
        audio_on_time(o, 0.95);
        // Within 5 s of each change the target is back within 60–100 % of the new cap, and
        // stays there. After the cap went up, growth (multiplicative: the link changed) runs
        // past the new cap once before the delay detector brings it back: one second's mean may
        // be up to 10 % over then.
        in_band(o, 13.0, 16.0, top(path));
        in_band(o, 21.0, 24.0, top(path) + 0.1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_that_drops_and_returns_is_followed_within_5_s_on_the_direct_path() {
    cap_changes(QualityPath::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_that_drops_and_returns_is_followed_within_5_s_through_the_relay() {
    cap_changes(QualityPath::Relay).await;
}

/// 2 % random loss each way and no cap, against the same call without loss.
async fn random_loss(path: QualityPath) {
    let reference = run("lossless", path).await;
    let o = run("loss2", path).await;
    // Each second's mean target from 5 s on: the lossy call's lowest against the median of
    // the lossless one's.
    let mut uncapped = reference.targets(5.0, 12.0);
    assert!(!uncapped.is_empty(), "{}", reference.diagnostics());
    uncapped.sort_by(f64::total_cmp);
    let median = uncapped[uncapped.len() / 2];
    let targets = o.targets(5.0, 12.0);
    assert!(!targets.is_empty(), "{}", o.diagnostics());
    let low = targets.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        low >= 0.8 * median,
        "with 2 % loss the target fell to {low:.0} bit/s, under 80 % of {median:.0} without loss: {}",
        o.diagnostics()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_percent_random_loss_does_not_collapse_the_target_on_the_direct_path() {
    random_loss(QualityPath::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_percent_random_loss_does_not_collapse_the_target_through_the_relay() {
    random_loss(QualityPath::Relay).await;
}

/// A TCP download shares bob's 400 kbit/s downlink with the call (under way when it starts).
///
/// Audio on time: 95 % on the direct path, 90 % through the relay. There the call is a TCP
/// stream too, and the download (BBR, the lab's default, which does not back off for loss)
/// keeps the 150 ms queue overflowing: the relay's connection loses segments, and now and then
/// a retransmission as well, which costs a retransmission timeout (stalls of 130–430 ms in the
/// server's log), in which the relay drops audio past its 150 ms deadline. Runs of
/// `natcall-lab quality --scenarios bulk --paths relay`: 42 before linear timeouts for thin
/// streams (median 98.8 %, 6 under 95 %, the lowest 85.7 % after a 2.1 s backoff), 24 with them
/// (median 97.6 %, 1 under 95 %, the lowest 93.5 %).
async fn beside_a_download(path: QualityPath) {
    run_checked("bulk", path, |o| {
        let diag = o.diagnostics();
        audio_on_time(
            o,
            match path {
                QualityPath::Direct => 0.95,
                QualityPath::Relay => 0.90,
            },
        );
        let bulk = o.bulk_bps.unwrap_or(0.0);
        eprintln!("call {:.0} bit/s, download {bulk:.0} bit/s", o.media_bps);
        assert!(bulk > 50_000.0, "the download ran ({bulk:.0} bit/s): {diag}");
        // Two flows: an even split is half each. A delay-based call beside a loss-based
        // download must not starve (GCC without its threshold adaptation falls to its floor):
        // it keeps at least half of that, a quarter of what the link carried.
        let share = o.media_bps / (o.media_bps + bulk);
        assert!(share >= 0.25, "the call got {:.0} % of the link: {diag}", share * 100.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_beside_the_call_leaves_it_a_fair_share_on_the_direct_path() {
    beside_a_download(QualityPath::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_beside_the_call_leaves_it_a_fair_share_through_the_relay() {
    beside_a_download(QualityPath::Relay).await;
}
