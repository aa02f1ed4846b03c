//! Trust in the rendezvous server, as a user meets it: the CLI remembers the server's key on
//! first use and refuses a server that comes back with another key (exit 8, naming both keys
//! and the command that accepts the new one), until the user accepts it.

use std::time::Duration;

use natcall_e2e::{Peer, Rendezvous};

/// `natcall call nobody`: registers, then ends at once (exit 5, nobody is online) — or fails
/// before registering.
fn call_nobody(dir: &std::path::Path, server: std::net::SocketAddr, extra: &[&str]) -> (i32, Peer) {
    let mut args = vec!["call", "nobody"];
    args.extend_from_slice(extra);
    let mut alice = Peer::spawn(dir, server, "alice", &args);
    let code = alice.wait_exit(Duration::from_secs(20));
    (code, alice)
}

#[test]
fn a_server_back_with_another_key_is_refused_until_the_user_accepts_it() {
    let dir = tempfile::tempdir().expect("dir");
    let first = Rendezvous::start(dir.path());
    let addr = first.addr;
    let (code, alice) = call_nobody(dir.path(), addr, &[]);
    assert_eq!(code, 5, "registered, nobody online\n{}", alice.log_text());
    let known = std::fs::read_to_string(dir.path().join("alice/known_servers")).expect("known_servers written");
    let line = known
        .lines()
        .find(|l| l.starts_with(&addr.to_string()))
        .expect("a line for the server");
    let old_key = line.split_whitespace().nth(1).expect("a key").to_owned();

    // The same address, another server (its own state, so its own key).
    first.kill();
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).expect("dir");
    let second = Rendezvous::start_at(&other, addr);
    let (code, mut alice) = call_nobody(dir.path(), addr, &[]);
    assert_eq!(code, 8, "a changed server key\n{}", alice.log_text());
    let err = alice.wait_event("error", Duration::from_secs(5), |_| true);
    let text = err["error"].as_str().expect("error text");
    assert!(text.contains(&old_key) && text.contains("presented key"), "{text}");
    let hint = err["hint"].as_str().expect("a hint");
    let accept = hint
        .split("natcall trust-server '")
        .nth(1)
        .and_then(|h| h.strip_suffix('\''))
        .unwrap_or_else(|| panic!("the accept command in {hint:?}"));
    assert!(
        accept.starts_with(&addr.to_string()) && !accept.contains(&old_key),
        "{accept}"
    );

    // The user accepts the new key with the command printed; then the server is used again.
    let mut trust = Peer::spawn(dir.path(), addr, "alice", &["trust-server", accept]);
    assert_eq!(trust.wait_exit(Duration::from_secs(10)), 0, "{}", trust.log_text());
    let (code, alice) = call_nobody(dir.path(), addr, &[]);
    assert_eq!(code, 5, "the accepted key works\n{}", alice.log_text());
    drop(second);
}

#[test]
fn a_key_given_with_the_server_that_does_not_match_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let server = Rendezvous::start(dir.path());
    let wrong = format!("{}#SHA256:{}", server.addr, "A".repeat(43));
    let mut alice = Peer::spawn_args(
        dir.path(),
        &dir.path().join("alice"),
        "alice",
        &["--server", &wrong, "call", "nobody"],
    );
    assert_eq!(alice.wait_exit(Duration::from_secs(20)), 8, "{}", alice.log_text());
    let err = alice.wait_event("error", Duration::from_secs(5), |_| true);
    assert!(
        err["error"]
            .as_str()
            .is_some_and(|e| e.contains("the key given for it is")),
        "{err}"
    );
}
