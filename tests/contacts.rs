//! Trust on first use with the real binaries: a first call stores both keys (`natcall
//! contacts`), `natcall verify` prints the same safety number on both sides, and after the
//! server restarts with its name bindings gone (its own TLS key kept) and another key takes a
//! name, a call with that name is refused with exit code 9 and a warning that says how to
//! accept the new key.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use natcall_e2e::{Peer, Rendezvous, bin};
use serde_json::Value;

const EXIT: Duration = Duration::from_secs(20);
/// `natcall`'s exit code for a refused key change (see `natcall --help`).
const KEY_CHANGED: i32 = 9;

/// Runs `natcall --json --server S --name NAME --home HOME ARGS...` to its end: its exit code and
/// its JSON lines.
fn natcall(home: &Path, server: SocketAddr, name: &str, args: &[&str]) -> (i32, Vec<Value>) {
    let out = Command::new(bin("natcall"))
        .args(["--json", "--server", &server.to_string(), "--name", name, "--home"])
        .arg(home)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("runs natcall");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

/// `natcall verify PEER [--key KEY]` as `name`: its `safety_number` line.
fn verify(home: &Path, server: SocketAddr, name: &str, peer: &str, key: Option<&str>) -> Value {
    let mut args = vec!["verify", peer];
    args.extend(key.map(|k| ["--key", k]).into_iter().flatten());
    let (code, lines) = natcall(home, server, name, &args);
    assert_eq!(code, 0, "verify {peer}: {lines:?}");
    lines
        .into_iter()
        .find(|l| l["event"] == "safety_number")
        .expect("a safety_number line")
}

/// bob (home `bob_home`) listens once and alice (home `dir/alice`) calls him for a second:
/// both exit 0.
fn call_once(dir: &Path, server: SocketAddr, alice_home: &Path, bob_home: &Path) {
    let mut bob = Peer::spawn_home(dir, bob_home, server, "bob", &["listen", "--once", "--no-media"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn_home(
        dir,
        alice_home,
        server,
        "alice",
        &["call", "bob", "--duration", "1", "--no-media"],
    );
    assert_eq!(alice.wait_exit(EXIT), 0, "alice's log:\n{}", alice.log_text());
    assert_eq!(bob.wait_exit(EXIT), 0, "bob's log:\n{}", bob.log_text());
}

/// Stops the server and starts it again on its address with its TLS key (so peers that pinned
/// it connect) but without its name bindings: any key may then register any name. The name
/// store is every file named `names*` in `dir` or a directory in it (a `names` state file, or
/// a state directory's `names.v2` snapshot and journal); the key file stays.
fn restart_forgetting_names(server: Rendezvous, dir: &Path) -> Rendezvous {
    let addr = server.addr;
    server.kill();
    let mut removed = 0;
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("reads the test dir").flatten() {
            let path = entry.path();
            if path.is_dir() && d == dir {
                dirs.push(path);
            } else if entry.file_name().to_string_lossy().starts_with("names") {
                std::fs::remove_file(&path).expect("removes the server's names");
                removed += 1;
            }
        }
    }
    assert!(removed > 0, "no name store found in {}", dir.display());
    Rendezvous::start_at(dir, addr)
}

fn is_safety_number(s: &str) -> bool {
    let groups: Vec<&str> = s.split(' ').collect();
    groups.len() == 12
        && groups
            .iter()
            .all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_digit()))
}

#[test]
fn a_callee_whose_key_changed_is_refused_with_exit_code_9_until_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice_home, bob_home, new_bob_home) = (
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("bob2"),
    );
    let server = Rendezvous::start(dir.path());
    let addr = server.addr;
    call_once(dir.path(), addr, &alice_home, &bob_home);

    // Both stored the other's key; the safety numbers agree.
    let (code, listed) = natcall(&alice_home, addr, "alice", &["contacts"]);
    assert_eq!(code, 0);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let contact = &listed[0];
    assert_eq!(
        (&contact["event"], &contact["name"]),
        (&"contact".into(), &"bob".into())
    );
    assert_eq!(contact["server"], addr.to_string());
    assert_eq!(contact["trust"], "first-use");
    let alice_says = verify(&alice_home, addr, "alice", "bob", None);
    let bob_says = verify(&bob_home, addr, "bob", "alice", None);
    assert!(
        is_safety_number(alice_says["safety_number"].as_str().unwrap_or("")),
        "{alice_says}"
    );
    assert_eq!(alice_says["safety_number"], bob_says["safety_number"]);
    assert_eq!(
        contact["fingerprint"], bob_says["fingerprint"],
        "alice stored bob's real key"
    );
    assert_eq!(alice_says["stored"], true);
    let alice_key = alice_says["fingerprint"].as_str().expect("alice's key").to_owned();

    // The server restarts without its name bindings; a new key registers as bob.
    let _server = restart_forgetting_names(server, dir.path());
    let new_bob_says = verify(&new_bob_home, addr, "bob", "alice", Some(&alice_key));
    let new_key = new_bob_says["fingerprint"].as_str().expect("the new key").to_owned();
    assert_ne!(
        new_bob_says["safety_number"], alice_says["safety_number"],
        "another key, another number"
    );
    let mut new_bob = Peer::spawn_home(
        dir.path(),
        &new_bob_home,
        addr,
        "bob",
        &["listen", "--once", "--no-media"],
    );
    new_bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn_home(dir.path(), &alice_home, addr, "alice", &["call", "bob", "--no-media"]);
    assert_eq!(alice.wait_exit(EXIT), KEY_CHANGED, "alice's log:\n{}", alice.log_text());
    let error = alice.wait_event("error", EXIT, |_| true);
    assert_eq!(error["exit_code"], KEY_CHANGED);
    let text = error["error"].as_str().expect("a message");
    assert!(text.contains("the key of bob changed"), "{text}");
    assert!(
        text.contains(&format!("natcall contacts accept bob {new_key}")),
        "{text}"
    );
    assert!(
        !alice.seen.iter().any(|v| v["event"] == "connected"),
        "no call: {:?}",
        alice.seen
    );
    // The new bob was never connected: the caller hung up before QUIC, and bob is told at once.
    assert_eq!(
        new_bob.wait_exit(Duration::from_secs(5)),
        5,
        "bob's log:\n{}",
        new_bob.log_text()
    );
    assert!(
        !new_bob.seen.iter().any(|v| v["event"] == "connected"),
        "{:?}",
        new_bob.seen
    );
    let (_, listed) = natcall(&alice_home, addr, "alice", &["contacts"]);
    assert_eq!(
        listed[0]["fingerprint"], bob_says["fingerprint"],
        "the refused key is not stored"
    );

    // alice checks the new key out of band (both sides print the same number), accepts it, calls.
    let alice_checks = verify(&alice_home, addr, "alice", "bob", Some(&new_key));
    assert_eq!(alice_checks["safety_number"], new_bob_says["safety_number"]);
    assert_eq!(alice_checks["stored"], false);
    let (code, accepted) = natcall(&alice_home, addr, "alice", &["contacts", "accept", "bob", &new_key]);
    assert_eq!(code, 0, "{accepted:?}");
    call_once(dir.path(), addr, &alice_home, &new_bob_home);
    let (_, listed) = natcall(&alice_home, addr, "alice", &["contacts"]);
    assert_eq!(
        (&listed[0]["fingerprint"], &listed[0]["trust"]),
        (&new_key.into(), &"accepted".into())
    );
}

#[test]
fn a_listener_declines_a_caller_whose_key_changed_and_exits_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice_home, bob_home, new_alice_home) = (
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("alice2"),
    );
    let server = Rendezvous::start(dir.path());
    let addr = server.addr;
    call_once(dir.path(), addr, &alice_home, &bob_home);

    let _server = restart_forgetting_names(server, dir.path());
    let mut bob = Peer::spawn_home(dir.path(), &bob_home, addr, "bob", &["listen", "--once", "--no-media"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn_home(
        dir.path(),
        &new_alice_home,
        addr,
        "alice",
        &["call", "bob", "--no-media"],
    );
    // The caller is told at once that bob declined (exit 5), not left ringing.
    assert_eq!(alice.wait_exit(EXIT), 5, "alice's log:\n{}", alice.log_text());
    let declined = alice.wait_event("error", EXIT, |_| true);
    assert!(
        declined["error"].as_str().unwrap_or("").contains("declined"),
        "{declined}"
    );
    assert_eq!(bob.wait_exit(EXIT), KEY_CHANGED, "bob's log:\n{}", bob.log_text());
    let error = bob.wait_event("error", EXIT, |_| true);
    let text = error["error"].as_str().expect("a message");
    assert!(text.contains("the key of alice changed"), "{text}");
}
