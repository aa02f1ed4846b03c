//! Calls outlive the server: a direct call goes on untouched while the server is down, and a
//! relayed call resumes when a server is back (SIGTERM or SIGKILL, then a restart), without a
//! new QUIC handshake.

use std::process::Command;
use std::time::Duration;

use natcall_e2e::{Peer, Rendezvous, bin};

const EXIT: Duration = Duration::from_secs(20);

#[test]
fn a_direct_call_goes_on_while_the_server_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Rendezvous::start(dir.path());
    let addr = server.addr;
    let mut bob = Peer::spawn(dir.path(), addr, "bob", &["listen", "--once"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn(dir.path(), addr, "alice", &["call", "bob", "--duration", "5"]);
    // On one host the LAN path is selected within milliseconds, often before QUIC connects.
    let connected = alice.wait_event("connected", EXIT, |_| true);
    if connected["path"] != "lan" {
        alice.wait_event("path", EXIT, |v| v["to"] == "lan");
    }
    server.kill();
    alice.wait_event("server_lost", EXIT, |_| true);
    bob.wait_event("server_lost", EXIT, |_| true);
    // Chat still flows both ways, and the call is not ended by the loss.
    alice.say("can you hear me without the server?");
    bob.wait_chat("can you hear me without the server?");
    bob.say("yes, on the LAN");
    alice.wait_chat("yes, on the LAN");
    assert_eq!(alice.wait_exit(EXIT), 0, "the call ran to its --duration");
    let report = alice.report();
    assert_eq!(report["ended"]["by"], "local", "{report}");
    assert_eq!(report["path"], "lan", "{report}");
    let bob_exit = bob.wait_exit(EXIT);
    assert_eq!(bob_exit, 0);
    let bob_report = bob.report();
    // Audio (50 frames/s) kept arriving through the outage: about 5 s of it.
    let frames = bob_report["media"]["audio"]["received"]["frames_complete"]
        .as_u64()
        .unwrap_or(0);
    assert!(frames >= 200, "{frames} audio frames in a 5 s call: {bob_report}");
}

/// Runs `natcall-bench resume` once: a relayed call, the server stopped with `stop` and started
/// again after 500 ms; returns the run's figures.
fn resume_once(stop: &str) -> serde_json::Value {
    let out = Command::new(bin("natcall-bench"))
        .args(["resume", "--stop", stop, "--runs", "1", "--down-ms", "500", "--json"])
        .output()
        .expect("runs natcall-bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let run = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "run")
        .expect("a run line");
    run["sample"].clone()
}

#[test]
fn a_relayed_call_resumes_after_the_server_is_killed_and_restarted() {
    let s = resume_once("kill");
    assert_eq!(s["call_survived"], true, "{s}");
    let ms = s["resume_ms"].as_f64().expect("resume_ms");
    assert!(ms < 3000.0, "media flowing {ms} ms after the new server accepted: {s}");
}

#[test]
fn a_relayed_call_resumes_after_a_sigterm_and_the_drain_ends_when_the_peers_left() {
    let s = resume_once("term");
    assert_eq!(s["call_survived"], true, "{s}");
    let ms = s["resume_ms"].as_f64().expect("resume_ms");
    assert!(ms < 3000.0, "media flowing {ms} ms after the new server accepted: {s}");
    // The drain deadline is 5 s by default: the server left as soon as both peers closed.
    let exit = s["exit_ms"].as_f64().expect("exit_ms");
    assert!(exit < 2000.0, "the drain took {exit} ms: {s}");
}
