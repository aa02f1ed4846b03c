//! A room of four peers behind four kinds of NAT in the lab: every pair's session takes the
//! path the lab's oracle expects for those two kinds, and every member receives every other
//! member's audio on time and its video whole.

use natcall_lab::room::run_room;
use natcall_lab::{Binaries, Kind, preflight};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_peers_behind_four_kinds_of_nat_each_receive_everyone_on_the_expected_path() {
    if let Err(e) = preflight() {
        panic!("{e}");
    }
    let bins = Binaries::locate(None).expect("natcall binaries next to the test (cargo build --bins)");
    let logs = Logs(Some(
        tempfile::Builder::new()
            .prefix("natcall-room-")
            .tempdir()
            .expect("tempdir"),
    ));
    let dir = logs.0.as_ref().expect("set").path().to_path_buf();
    let members = [
        ("pub", Kind::Public),
        ("pr", Kind::PortRestricted),
        ("sym", Kind::Symmetric),
        ("blocked", Kind::UdpBlocked),
    ];
    let out = run_room(&bins, &members, 10.0, &dir).await.expect("the lab runs");
    let diag = out.diagnostics();
    assert_eq!(out.error, None, "{diag}");
    for (name, _) in &members {
        assert_eq!(out.exit_codes[*name], Some(0), "{name} exits 0: {diag}");
    }
    let mut table = Vec::new();
    let mut pairs = Vec::new();
    for (receiver, _) in &members {
        for (sender, _) in members.iter().filter(|(s, _)| s != receiver) {
            let got = out
                .received(receiver, sender)
                .unwrap_or_else(|| panic!("{receiver} has a session with {sender}: {diag}"));
            let expected = out.expected_path(receiver, sender);
            table.push(format!(
                "{receiver} ← {sender}: path {:?} (expected {expected:?}), audio {:.1} %, video {:.1} %",
                got.path,
                got.audio_on_time * 100.0,
                got.video_on_time * 100.0
            ));
            pairs.push((receiver, sender, got, expected));
        }
    }
    let table = table.join("\n");
    println!("{table}");
    for (receiver, sender, got, expected) in pairs {
        assert_eq!(got.path, expected, "{receiver} ← {sender}:\n{table}\n{diag}");
        assert!(
            got.audio_on_time >= 0.98,
            "{receiver} ← {sender} audio:\n{table}\n{diag}"
        );
        assert!(
            got.video_on_time >= 0.90,
            "{receiver} ← {sender} video:\n{table}\n{diag}"
        );
    }
}
