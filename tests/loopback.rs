//! The real binaries on loopback: a server process and two `natcall` processes.

use std::time::Duration;

use natcall_e2e::{Peer, Rendezvous, chat_both_ways, hang_up_after_media};

const EXIT: Duration = Duration::from_secs(20);

fn setup() -> (tempfile::TempDir, Rendezvous) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Rendezvous::start(dir.path());
    (dir, server)
}

/// bob listens once; alice calls with `policy`; both chat; alice closes stdin; both exit 0.
/// Returns both reports.
fn chat_call(policy: &str, alice_extra: &[&str]) -> (serde_json::Value, serde_json::Value) {
    let (dir, server) = setup();
    let mut bob = Peer::spawn(dir.path(), server.addr, "bob", &["listen", "--once"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut args = vec!["call", "bob", "--policy", policy];
    args.extend_from_slice(alice_extra);
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &args);
    alice.wait_event("connected", EXIT, |_| true);
    bob.wait_event("connected", EXIT, |_| true);
    chat_both_ways(&mut alice, &mut bob, "hello bob", "hello alice");
    if !alice_extra.is_empty() {
        // The test hook kills the direct path: wait for the relay, then chat again over it.
        alice.wait_event("path", Duration::from_secs(15), |v| v["to"] == "relay");
        chat_both_ways(&mut alice, &mut bob, "still there?", "yes, via the relay");
    }
    hang_up_after_media(&mut alice, &mut bob, EXIT)
}

#[test]
fn an_auto_call_connects_and_chat_arrives_both_ways() {
    let (alice, bob) = chat_call("auto", &[]);
    // One host: both public IPs are 127.0.0.1, so the LAN candidate is checked first and wins.
    assert_eq!(alice["path"], "lan", "{alice}");
    assert_eq!(bob["path"], "lan", "{bob}");
    assert_eq!(alice["chat_sent"], 1);
    assert_eq!(alice["chat_received"], 1);
    assert_eq!(bob["chat_received"], 1);
    assert_eq!(alice["ended"]["by"], "local");
    assert_eq!(bob["ended"], serde_json::json!({"by": "peer", "reason": "done"}));
    assert!(alice["time_to_connected_ms"].as_f64().expect("number") > 0.0);
    assert!(alice["bytes_sent"].as_u64().expect("number") > 0);
}

#[test]
fn a_direct_only_call_goes_over_the_punched_public_address() {
    let (alice, bob) = chat_call("direct-only", &[]);
    assert_eq!(alice["path"], "direct", "{alice}");
    assert_eq!(bob["path"], "direct", "{bob}");
    assert_eq!(alice["path_at_connect"], "direct");
}

#[test]
fn a_relay_only_call_carries_the_same_chat_over_the_relay() {
    let (alice, bob) = chat_call("relay-only", &[]);
    assert_eq!(alice["path"], "relay", "{alice}");
    assert_eq!(bob["path"], "relay", "{bob}");
    assert_eq!(alice["path_changes"].as_array().map(Vec::len), Some(1));
    // The hang-up reaches the server after alice's QUIC close, so the relay still forwards it.
    assert_eq!(bob["ended"], serde_json::json!({"by": "peer", "reason": "done"}));
}

#[test]
fn killing_the_direct_path_mid_call_moves_it_to_the_relay_and_it_keeps_working() {
    let (alice, bob) = chat_call("auto", &["--test-kill-udp-after", "2"]);
    assert_eq!(alice["path"], "relay", "{alice}");
    let changes: Vec<&str> = alice["path_changes"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["to"].as_str())
        .collect();
    assert_eq!(changes.last(), Some(&"relay"), "{changes:?}");
    assert!(
        changes.contains(&"lan"),
        "it was on the LAN before the kill: {changes:?}"
    );
    assert_eq!(bob["chat_received"], 2);
}

#[test]
fn a_listener_takes_a_second_call_after_the_first_ends() {
    let (dir, server) = setup();
    let mut bob = Peer::spawn(dir.path(), server.addr, "bob", &["listen"]);
    bob.wait_event("registered", EXIT, |_| true);
    for round in 0..2 {
        let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob"]);
        alice.wait_event("connected", EXIT, |_| true);
        let text = format!("call number {round}");
        alice.say(&text);
        bob.wait_chat(&text);
        alice.close_stdin();
        assert_eq!(alice.wait_exit(EXIT), 0, "{}", alice.log_text());
        bob.wait_event("report", EXIT, |v| {
            v["chat_received"] == 1 && v["call_id"].is_number() && {
                // one report per call
                true
            }
        });
        bob.seen.retain(|v| v["event"] != "report");
    }
}

#[test]
fn calling_an_offline_name_fails_with_the_right_message() {
    let (dir, server) = setup();
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "nobody"]);
    assert_eq!(alice.wait_exit(EXIT), 5);
    let err = alice.wait_event("error", EXIT, |_| true);
    assert_eq!(err["error"], "calling nobody: nobody is not online");
}

#[test]
fn a_name_taken_by_another_key_is_refused() {
    let (dir, server) = setup();
    let mut bob = Peer::spawn(dir.path(), server.addr, "bob", &["listen", "--once"]);
    bob.wait_event("registered", EXIT, |_| true);
    let other_home = dir.path().join("impostor");
    let mut impostor = Peer::spawn_home(dir.path(), &other_home, server.addr, "bob", &["listen", "--once"]);
    assert_eq!(impostor.wait_exit(EXIT), 4);
    let err = impostor.wait_event("error", EXIT, |_| true);
    assert_eq!(
        err["error"],
        "the rendezvous server refused: the name \"bob\" is taken: it is registered to another key; if it is yours, run with the --home (identity) that registered it; otherwise choose another --name"
    );
}

#[test]
fn an_unreachable_server_is_reported_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], natcall_e2e::free_port()));
    let mut alice = Peer::spawn(dir.path(), addr, "alice", &["call", "bob"]);
    assert_eq!(alice.wait_exit(EXIT), 3);
    let err = alice.wait_event("error", EXIT, |_| true);
    let text = err["error"].as_str().expect("text");
    assert!(
        text.starts_with(&format!(
            "cannot reach the rendezvous server at {addr}: Connection refused"
        )),
        "{text}"
    );
}

#[test]
fn a_listener_registers_again_after_the_server_restarts() {
    let (dir, server) = setup();
    let addr = server.addr;
    let mut bob = Peer::spawn(dir.path(), addr, "bob", &["listen", "--once"]);
    bob.wait_event("registered", EXIT, |_| true);
    server.kill();
    bob.wait_event("server_lost", EXIT, |_| true);
    let _again = Rendezvous::start_at(dir.path(), addr);
    bob.wait_nth("registered", 2, EXIT);
    let mut alice = Peer::spawn(dir.path(), addr, "alice", &["call", "bob"]);
    alice.wait_event("connected", EXIT, |_| true);
    alice.say("after the restart");
    bob.wait_chat("after the restart");
    alice.close_stdin();
    assert_eq!(alice.wait_exit(EXIT), 0);
    assert_eq!(bob.wait_exit(EXIT), 0);
}

/// The README's run command: `natcall demo` makes a real call on loopback with no configuration.
#[test]
fn the_demo_makes_a_real_call_with_chat_and_media() {
    let out = std::process::Command::new(natcall_e2e::bin("natcall"))
        .args(["demo", "--json"])
        .env_remove("NATCALL_SERVER")
        .output()
        .expect("runs natcall demo");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a report line")).expect("JSON report");
    assert_eq!(report["event"], "report");
    assert_eq!(report["alice"]["path"], "lan", "{report}");
    assert!(stdout.contains(r#"bob heard:   \"hello bob, alice here\""#), "{stdout}");
    let bob = &report["bob"]["media"];
    // 50 audio and 30 video frames were sent over loopback UDP: nearly all must arrive.
    assert!(
        bob["audio"]["received"]["frames_complete"].as_u64().unwrap_or(0) >= 45,
        "{report}"
    );
    assert!(
        bob["video"]["received"]["frames_complete"].as_u64().unwrap_or(0) >= 25,
        "{report}"
    );
}

/// `natcall release-name` run from `home` as `name`: exit code and stdout.
fn release_name(server: std::net::SocketAddr, name: &str, home: &std::path::Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(natcall_e2e::bin("natcall"))
        .args(["--server", &server.to_string(), "--name", name, "--home"])
        .arg(home)
        .arg("release-name")
        .output()
        .expect("runs natcall");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn release_name_frees_only_your_own_name_and_says_so_in_one_line() {
    let (dir, server) = setup();
    let (owner, other) = (dir.path().join("owner"), dir.path().join("other"));
    let mut frank = Peer::spawn_home(dir.path(), &owner, server.addr, "frank", &["listen"]);
    frank.wait_event("registered", EXIT, |_| true);
    let (code, _) = release_name(server.addr, "frank", &other);
    assert_eq!(code, Some(4), "another key cannot release frank's name (refused)");
    let (code, stdout) = release_name(server.addr, "frank", &owner);
    assert_eq!(code, Some(0));
    assert_eq!(
        stdout,
        format!(
            "released the name frank on {}: anyone may register it now\n",
            server.addr
        )
    );
    let (code, _) = release_name(server.addr, "frank", &other);
    assert_eq!(code, Some(0), "the name was free for another key");
}

#[test]
fn a_server_on_ipv6_gets_stun_answers_and_peers_call_each_other_directly_over_ipv6() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback on this host: nothing to test");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Rendezvous::start_at(dir.path(), "[::1]:0".parse().expect("addr"));
    let mut bob = Peer::spawn(dir.path(), server.addr, "bob", &["listen", "--once", "--no-media"]);
    let registered = bob.wait_event("registered", EXIT, |_| true);
    // The STUN binding went over IPv6 (it used to fail: "UDP looks blocked").
    let public = registered["public_addr"].as_str().unwrap_or_default().to_owned();
    assert!(public.starts_with("[::1]:"), "{registered}");
    let mut alice = Peer::spawn(
        dir.path(),
        server.addr,
        "alice",
        &["call", "bob", "--policy", "direct-only", "--no-media"],
    );
    let connected = alice.wait_event("connected", EXIT, |_| true);
    assert_eq!(connected["path"], "direct", "{connected}");
    alice.say("over six");
    bob.wait_chat("over six");
    alice.close_stdin();
    assert_eq!(alice.wait_exit(EXIT), 0);
    assert_eq!(bob.wait_exit(EXIT), 0);
    assert!(!alice.log_text().contains("UDP looks blocked"), "{}", alice.log_text());
    let report = alice.report();
    assert!(
        report["remote_addr"].as_str().is_some_and(|a| a.starts_with("[::1]:")),
        "{report}"
    );
}
