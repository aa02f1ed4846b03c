//! A room of four peers behind four kinds of NAT in the lab: every pair's session takes the
//! path the lab's oracle expects for those two kinds, and every member receives every other
//! member's audio on time and its video whole.

use natcall_lab::room::{Departure, RoomOptions, run_room, run_room_with};
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

/// The binaries, after the lab's preflight, and a log folder for the run.
fn setup() -> (Binaries, Logs) {
    if let Err(e) = preflight() {
        panic!("{e}");
    }
    let bins = Binaries::locate(None).expect("natcall binaries next to the test (cargo build --bins)");
    let dir = tempfile::Builder::new()
        .prefix("natcall-room-")
        .tempdir()
        .expect("tempdir");
    (bins, Logs(Some(dir)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_peers_behind_four_kinds_of_nat_each_receive_everyone_on_the_expected_path() {
    let (bins, logs) = setup();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_leaves_and_one_who_is_killed_are_announced_and_the_rest_go_on() {
    let (bins, logs) = setup();
    let dir = logs.0.as_ref().expect("set").path().to_path_buf();
    let members = [
        ("stays", Kind::PortRestricted),
        ("also", Kind::Public),
        ("leaves", Kind::Symmetric),
        ("killed", Kind::UdpBlocked),
    ];
    let options = RoomOptions {
        departures: vec![(2, Departure::Leave), (3, Departure::Kill)],
        ..RoomOptions::default()
    };
    let out = run_room_with(&bins, &members, 8.0, &options, &dir)
        .await
        .expect("the lab runs");
    let diag = out.diagnostics();
    assert_eq!(out.error, None, "{diag}");
    for name in ["stays", "also", "leaves"] {
        assert_eq!(out.exit_codes[name], Some(0), "{name} exits 0: {diag}");
    }
    assert_eq!(out.exit_codes["killed"], Some(-1), "SIGKILL: {diag}");
    for name in ["stays", "also"] {
        let left: Vec<(String, String)> = out.events[name]
            .iter()
            .filter(|e| e["event"] == "member_left")
            .map(|e| {
                (
                    e["name"].as_str().unwrap_or("").to_owned(),
                    e["reason"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        assert!(
            left.contains(&("leaves".into(), "left".into())),
            "{name}: {left:?}\n{diag}"
        );
        assert!(
            left.contains(&("killed".into(), "connection ended".into())),
            "{name}: {left:?}\n{diag}"
        );
    }
    // The two who stay keep receiving each other for the whole room, before and after.
    for (receiver, sender) in [("stays", "also"), ("also", "stays")] {
        let got = out.received(receiver, sender).expect("a session");
        assert!(got.audio_on_time >= 0.98, "{receiver} ← {sender} {got:?}: {diag}");
        assert!(got.video_on_time >= 0.90, "{receiver} ← {sender} {got:?}: {diag}");
    }
    // They rekeyed once per departure: what they send in fan-out from then on, the two who
    // went cannot open.
    for name in ["stays", "also"] {
        let report = out.reports[name].as_ref().expect("a report");
        assert_eq!(report["fan_out"]["keys_made"], 3, "{name}: {diag}");
    }
    // Their sessions with the two who went ended (the server said so), not by timeout.
    for name in ["stays", "also"] {
        let report = out.reports[name].as_ref().expect("a report");
        for gone in ["leaves", "killed"] {
            let ended = &report["members"][gone]["ended"];
            assert!(!ended.is_null(), "{name}'s session with {gone} ended: {diag}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_fan_out_a_slow_member_gets_thinner_video_and_costs_the_others_nothing() {
    let (bins, logs) = setup();
    let dir = logs.0.as_ref().expect("set").path().to_path_buf();
    let members = [
        ("pub", Kind::Public),
        ("pr", Kind::PortRestricted),
        ("sym", Kind::Symmetric),
        ("slow", Kind::UdpBlocked),
    ];
    // Everyone sends one copy through the server; slow's downlink carries 300 kbit/s, far less
    // than the three others' video (about 1 Mbit/s each). A stranger tries to join; the
    // server's traffic is captured throughout.
    let options = RoomOptions {
        topology: "fan-out".into(),
        caps: vec![(3, 300)],
        stranger: true,
        capture_server: true,
        ..RoomOptions::default()
    };
    let out = run_room_with(&bins, &members, 10.0, &options, &dir)
        .await
        .expect("the lab runs");
    let diag = out.diagnostics();
    assert_eq!(out.error, None, "{diag}");
    for (name, _) in &members {
        assert_eq!(out.exit_codes[*name], Some(0), "{name} exits 0: {diag}");
        let report = out.reports[*name].as_ref().expect("a report");
        assert_eq!(report["topology"][0]["mode"], "fan_out", "{name}: {diag}");
    }
    let got = |r: &str, s: &str| {
        out.received_fan_out(r, s)
            .unwrap_or_else(|| panic!("{r} has {s}'s fan-out statistics: {diag}"))
    };
    let mut table = Vec::new();
    for (r, _) in &members {
        for (s, _) in members.iter().filter(|(s, _)| s != r) {
            let g = got(r, s);
            table.push(format!(
                "{r} ← {s}: audio {:.1} %, video {:.1} %",
                g.audio_on_time * 100.0,
                g.video_on_time * 100.0
            ));
        }
    }
    let table = table.join("\n");
    println!("{table}");
    // The three others get everyone's media whole, slow's included: slow costs them nothing.
    for (r, _) in members.iter().filter(|(r, _)| *r != "slow") {
        for (s, _) in members.iter().filter(|(s, _)| s != r) {
            let g = got(r, s);
            assert!(g.audio_on_time >= 0.98, "{r} ← {s}:\n{table}\n{diag}");
            assert!(g.video_on_time >= 0.90, "{r} ← {s}:\n{table}\n{diag}");
        }
    }
    // slow's own buffer at the server thins its video: whole frames, resuming at key frames
    // (2 s apart; nothing asks the senders for one in fan-out), so little video but all of it
    // complete; its audio goes first from the buffer, and the video in flight is held to what
    // its link drains, so audio does not wait behind it in the link's queue.
    // Video is counted against what each sender sent (the share of frames seen would read a
    // single frame received as 100 %).
    let slow = out.reports["slow"].as_ref().expect("a report");
    let mut video_total = 0;
    for (s, _) in members.iter().filter(|(s, _)| *s != "slow") {
        let g = got("slow", s);
        assert!(g.audio_on_time >= AUDIO_300, "slow ← {s}:\n{table}\n{diag}");
        let complete = slow["members"][*s]["fan_out"]["video"]["received"]["frames_complete"]
            .as_u64()
            .unwrap_or(0);
        let sent = out.reports[*s].as_ref().expect("a report")["fan_out"]["sent"]["video"]["frames_sent"]
            .as_u64()
            .unwrap_or(0);
        assert!(sent > 200, "{s} sent {sent} video frames\n{diag}");
        assert!(
            (complete as f64) < 0.85 * sent as f64,
            "slow ← {s} was not thinned: {complete} of {sent}\n{table}\n{diag}"
        );
        video_total += complete;
    }
    assert!(video_total > 0, "slow got no video at all:\n{table}\n{diag}");
    // The stranger was refused with the server's reason.
    let (code, error) = out.stranger.clone().expect("the stranger ran");
    assert_eq!(code, Some(4), "{error:?}\n{diag}");
    let why = error
        .as_ref()
        .and_then(|e| e["error"].as_str())
        .unwrap_or("")
        .to_owned();
    assert!(why.contains("not invited to room lab"), "{why}\n{diag}");
    // The server's wire carried no media in the clear: the test source's frames are long runs
    // of one byte ('A' audio, 'K' key and 'V' other video frames); none is in any payload.
    let sealed_runs: [&[u8]; 3] = [&[0x41; 48], &[0x4b; 48], &[0x56; 48]];
    assert!(
        out.server_packets.len() > 1_000,
        "{} packets captured\n{diag}",
        out.server_packets.len()
    );
    for p in &out.server_packets {
        for run in sealed_runs {
            assert!(
                !natcall_lab::capture::contains(&p.payload, run),
                "plaintext media at the server: {:?} → {:?}\n{diag}",
                p.src,
                p.dst
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_fan_out_when_every_member_is_slow_the_senders_adapt_to_what_they_drain() {
    let (bins, logs) = setup();
    let dir = logs.0.as_ref().expect("set").path().to_path_buf();
    let members = [
        ("pr", Kind::PortRestricted),
        ("pub", Kind::Public),
        ("sym", Kind::Symmetric),
    ];
    // Every member's downlink carries 600 kbit/s, and the two others send about 1 Mbit/s each:
    // no member can take a sender's full rate, so the server's budget (what the members that
    // take the most drain from it) holds each sender, and its video is sized to fit.
    let options = RoomOptions {
        topology: "fan-out".into(),
        caps: vec![(0, 600), (1, 600), (2, 600)],
        ..RoomOptions::default()
    };
    let out = run_room_with(&bins, &members, 12.0, &options, &dir)
        .await
        .expect("the lab runs");
    let diag = out.diagnostics();
    assert_eq!(out.error, None, "{diag}");
    for (name, _) in &members {
        assert_eq!(out.exit_codes[*name], Some(0), "{name} exits 0: {diag}");
        let report = out.reports[*name].as_ref().expect("a report");
        let rate = report["fan_out"]["rate_bps"].as_u64().unwrap_or(u64::MAX);
        assert!(
            rate < 600_000,
            "{name} sends at {rate} bit/s, not held to the budget: {diag}"
        );
    }
    for (r, _) in &members {
        for (s, _) in members.iter().filter(|(s, _)| s != r) {
            let g = out
                .received_fan_out(r, s)
                .unwrap_or_else(|| panic!("{r} has {s}'s fan-out statistics: {diag}"));
            println!(
                "{r} ← {s}: audio {:.1} %, video {:.1} %",
                g.audio_on_time * 100.0,
                g.video_on_time * 100.0
            );
            // Measured 37–64 % of the video on time; 3–4 % when senders kept their rate (the
            // receivers' buffers then resumed each sender only at its key frames).
            assert!(g.audio_on_time >= 0.95, "{r} ← {s}: {diag}");
            assert!(g.video_on_time >= 0.2, "{r} ← {s}: {diag}");
        }
    }
}

/// What slow's audio at least reaches at 300 kbit/s against three senders in fan-out (measured
/// alone, six runs: 91.6–99.9 % on time; 78–80 % before its buffer held the video in flight to
/// the bytes it drains; see docs/rooms.md).
const AUDIO_300: f64 = 0.85;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_uplink_cannot_carry_a_copy_for_everyone_moves_to_fan_out() {
    let (bins, logs) = setup();
    let dir = logs.0.as_ref().expect("set").path().to_path_buf();
    let members = [
        ("narrow", Kind::PortRestricted),
        ("bob", Kind::Public),
        ("carol", Kind::Symmetric),
        ("dave", Kind::Public),
    ];
    // narrow's uplink carries 2 000 kbit/s: one copy of its media (about 1 Mbit/s) fits, a copy
    // for each of three others does not.
    let options = RoomOptions {
        topology: "auto".into(),
        uplink_caps: vec![(0, 2_000)],
        ..RoomOptions::default()
    };
    let out = run_room_with(&bins, &members, 12.0, &options, &dir)
        .await
        .expect("the lab runs");
    let diag = out.diagnostics();
    assert_eq!(out.error, None, "{diag}");
    let report = |name: &str| out.reports[name].as_ref().expect("a report").clone();
    let narrow = report("narrow");
    let changes: Vec<&serde_json::Value> = narrow["topology"].as_array().expect("topology").iter().collect();
    let moved = changes
        .iter()
        .find(|c| c["mode"] == "fan_out")
        .unwrap_or_else(|| panic!("narrow moved to fan-out: {changes:?}\n{diag}"));
    let why = moved["why"].as_str().unwrap_or("");
    assert!(why.contains("the uplink carries"), "{why}\n{diag}");
    // The others have the uplinks for mesh and stay there.
    for name in ["bob", "carol", "dave"] {
        let r = report(name);
        let modes: Vec<&serde_json::Value> = r["topology"]
            .as_array()
            .expect("topology")
            .iter()
            .map(|c| &c["mode"])
            .collect();
        assert!(modes.iter().all(|m| *m == "mesh"), "{name}: {modes:?}\n{diag}");
    }
    // After the move, narrow's media reaches the others through the server.
    for name in ["bob", "carol", "dave"] {
        let got = out.received_fan_out(name, "narrow").expect("stats");
        assert!(got.audio_on_time >= 0.95, "{name} ← narrow by fan-out {got:?}\n{diag}");
        assert!(got.video_on_time >= 0.80, "{name} ← narrow by fan-out {got:?}\n{diag}");
    }
}
