//! Several rendezvous servers on one Redis, as real processes on loopback (each test starts its
//! own `redis-server` and stops it): calls across servers, direct and relayed, carry chat and
//! media; a name bound through one server is refused to another key on another; when a server
//! dies mid-call its peers register with another within 5 s and the relayed call resumes; while
//! Redis is down a call in progress goes on and a new cross-server call fails with a clear
//! error, and calls work again once Redis is back; behind Sentinel, the nodes follow a failover
//! to the promoted replica.

use std::time::{Duration, Instant};

use natcall_e2e::{Peer, Redis, RedisGroup, Rendezvous, chat_both_ways, hang_up_after_media};

const EXIT: Duration = Duration::from_secs(20);

/// Redis and `n` nodes (n1, n2, …) on loopback.
fn cluster(n: usize) -> (tempfile::TempDir, Redis, Vec<Rendezvous>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start(dir.path());
    let nodes = (1..=n)
        .map(|i| Rendezvous::start_node(dir.path(), &redis, &format!("n{i}"), &[]))
        .collect();
    (dir, redis, nodes)
}

/// `caller` on `server` calls `callee` (media off, for a second) until a call ends well, for
/// at most 15 s after `after` happened.
fn call_until_it_works(dir: &std::path::Path, server: std::net::SocketAddr, caller: &str, callee: &str, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut peer = Peer::spawn(dir, server, caller, &["call", callee, "--no-media", "--duration", "1"]);
        if peer.wait_exit(EXIT) == 0 {
            let report = peer.report();
            assert_eq!(report["peer"], callee, "{report}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no cross-server call 15 s after {after}:\n{}",
            peer.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// bob on n2 listens once, alice on n1 calls him with `policy`; they chat both ways and run
/// the built-in media for a while. Returns both reports.
fn call_across(policy: &str) -> (serde_json::Value, serde_json::Value, String) {
    let (dir, _redis, nodes) = cluster(2);
    let mut bob = Peer::spawn(dir.path(), nodes[1].addr, "bob", &["listen", "--once"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn(dir.path(), nodes[0].addr, "alice", &["call", "bob", "--policy", policy]);
    alice.wait_event("connected", EXIT, |_| true);
    bob.wait_event("connected", EXIT, |_| true);
    chat_both_ways(&mut alice, &mut bob, "hello bob, from the other server", "hello alice");
    let (a, b) = hang_up_after_media(&mut alice, &mut bob, EXIT);
    let n1_log = std::fs::read_to_string(&nodes[0].log).unwrap_or_default();
    (a, b, n1_log)
}

#[test]
fn a_call_across_servers_connects_directly_and_carries_chat_and_media() {
    let (alice, bob, n1_log) = call_across("auto");
    // One host: the LAN candidate wins, as between two peers of one server.
    assert_eq!(alice["path"], "lan", "{alice}");
    assert_eq!(bob["path"], "lan", "{bob}");
    assert_eq!(alice["chat_received"], 1, "{alice}");
    assert_eq!(bob["chat_received"], 1, "{bob}");
    assert!(
        n1_log.contains("visit link open"),
        "alice's server reached bob's:\n{n1_log}"
    );
}

#[test]
fn a_relay_only_call_across_servers_goes_through_both_and_carries_chat_and_media() {
    let (alice, bob, n1_log) = call_across("relay-only");
    assert_eq!(alice["path"], "relay", "{alice}");
    assert_eq!(bob["path"], "relay", "{bob}");
    assert_eq!(alice["chat_received"], 1, "{alice}");
    assert_eq!(bob["chat_received"], 1, "{bob}");
    assert!(n1_log.contains("visit link open"), "{n1_log}");
}

#[test]
fn a_name_bound_through_one_server_is_refused_to_another_key_on_another() {
    let (dir, _redis, nodes) = cluster(2);
    let mut bob = Peer::spawn(dir.path(), nodes[0].addr, "bob", &["listen", "--once"]);
    bob.wait_event("registered", EXIT, |_| true);
    bob.close_stdin();
    drop(bob);
    // Another key (its own home) asks for "bob" on the other server.
    let mallory_home = dir.path().join("mallory");
    let mut mallory = Peer::spawn_home(dir.path(), &mallory_home, nodes[1].addr, "bob", &["listen", "--once"]);
    let err = mallory.wait_event("error", EXIT, |_| true);
    assert_eq!(mallory.wait_exit(EXIT), 4, "{err}");
    assert!(err["error"].as_str().unwrap_or("").contains("taken"), "{err}");
    // The owner still registers through either server.
    let mut again = Peer::spawn(dir.path(), nodes[1].addr, "bob", &["listen", "--once"]);
    again.wait_event("registered", EXIT, |_| true);
}

#[test]
fn when_the_callees_server_dies_mid_call_both_register_elsewhere_within_5_s_and_the_relayed_call_resumes() {
    let (dir, _redis, mut nodes) = cluster(3);
    let n3 = nodes[2].addr.to_string();
    let (n1, n2) = (nodes[0].addr.to_string(), nodes[1].addr.to_string());
    let mut bob = Peer::spawn_args(
        dir.path(),
        &dir.path().join("bob"),
        "bob",
        &["--server", &n2, "--server", &n3, "listen", "--once"],
    );
    bob.wait_event("registered", EXIT, |v| v["server"] == n2.as_str());
    let mut alice = Peer::spawn_args(
        dir.path(),
        &dir.path().join("alice"),
        "alice",
        &[
            "--server",
            &n1,
            "--server",
            &n3,
            "call",
            "bob",
            "--policy",
            "relay-only",
        ],
    );
    alice.wait_event("connected", EXIT, |v| v["path"] == "relay");
    bob.wait_event("connected", EXIT, |_| true);
    alice.say("before");
    bob.wait_chat("before");
    // The call lives on bob's server: kill it.
    let killed = Instant::now();
    nodes.remove(1).kill();
    let again = bob.wait_event("registered", EXIT, |v| v["again"] == true);
    let moved = killed.elapsed();
    assert_eq!(again["server"], n3.as_str(), "{again}");
    assert!(
        moved < Duration::from_secs(5),
        "bob registered again {moved:?} after the kill"
    );
    // The relayed call resumes (through bob's new server) and chat flows both ways again.
    alice.say("after the server died");
    bob.wait_chat("after the server died");
    bob.say("still here");
    alice.wait_chat("still here");
    alice.close_stdin();
    assert_eq!(alice.wait_exit(EXIT), 0, "alice's log:\n{}", alice.log_text());
    assert_eq!(bob.wait_exit(EXIT), 0, "bob's log:\n{}", bob.log_text());
    let (a, b) = (alice.report(), bob.report());
    assert_eq!(a["path"], "relay", "{a}");
    assert_eq!(
        b["ended"]["by"], "peer",
        "the call ended by alice, not by the failure: {b}"
    );
}

#[test]
fn with_redis_down_a_call_goes_on_new_cross_server_calls_fail_clearly_and_all_recovers() {
    let (dir, mut redis, nodes) = cluster(2);
    let (n1, n2) = (nodes[0].addr, nodes[1].addr);
    let mut bob = Peer::spawn(dir.path(), n2, "bob", &["listen", "--once"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut dave = Peer::spawn(dir.path(), n2, "dave", &["listen"]);
    dave.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn(dir.path(), n1, "alice", &["call", "bob", "--policy", "relay-only"]);
    alice.wait_event("connected", EXIT, |_| true);
    bob.wait_event("connected", EXIT, |_| true);
    let mut carol = Peer::spawn(dir.path(), n1, "carol", &["listen"]);
    carol.wait_event("registered", EXIT, |_| true);
    drop(carol);

    redis.stop();
    let down = Instant::now();
    // The call in progress goes on.
    alice.say("redis is gone");
    bob.wait_chat("redis is gone");
    // A new call to a peer of the other server fails, saying why.
    let mut carol = Peer::spawn(dir.path(), n1, "carol", &["call", "dave", "--no-media"]);
    let err = carol.wait_event("error", EXIT, |_| true);
    let code = carol.wait_exit(EXIT);
    assert_ne!(code, 0, "{err}");
    assert!(
        err["error"].as_str().unwrap_or("").contains("cannot be reached")
            || err["error"].as_str().unwrap_or("").contains("registry is unreachable"),
        "{err}"
    );
    // Ten seconds without Redis, then it is back, without its data (no persistence): the nodes
    // write their entries and their peers' presence again, peers' names are bound again.
    let rest = Duration::from_secs(10).saturating_sub(down.elapsed());
    std::thread::sleep(rest);
    alice.say("still talking after 10 s");
    bob.wait_chat("still talking after 10 s");
    redis.restart();
    // New cross-server calls work again.
    call_until_it_works(dir.path(), n1, "carol", "dave", "Redis came back");
    alice.close_stdin();
    assert_eq!(alice.wait_exit(EXIT), 0, "alice's log:\n{}", alice.log_text());
}

#[test]
fn a_draining_server_sends_its_peers_to_another_node_where_they_keep_their_names() {
    let (dir, _redis, mut nodes) = cluster(2);
    let n2 = nodes[1].addr;
    // alice knows only n1: where to go next comes from n1 as it drains (MoveTo).
    let mut alice = Peer::spawn(dir.path(), nodes[0].addr, "alice", &["listen"]);
    alice.wait_event("registered", EXIT, |_| true);
    let drained = Instant::now();
    nodes.remove(0).terminate();
    let again = alice.wait_event("registered", EXIT, |v| v["again"] == true);
    assert_eq!(again["server"], n2.to_string().as_str(), "{again}");
    assert!(drained.elapsed() < Duration::from_secs(5), "{:?}", drained.elapsed());
    // Her name came with her: bob, on n2, calls her there.
    let mut bob = Peer::spawn(
        dir.path(),
        n2,
        "bob",
        &["call", "alice", "--no-media", "--duration", "1"],
    );
    assert_eq!(bob.wait_exit(EXIT), 0, "bob's log:\n{}", bob.log_text());
    assert_eq!(bob.report()["peer"], "alice");
}

#[test]
fn a_node_whose_redis_does_not_answer_at_start_exits_1_saying_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = natcall_e2e::free_port();
    let out = std::process::Command::new(natcall_e2e::bin("natcall-rendezvous"))
        .args(["--listen", "127.0.0.1:0", "--ephemeral", "--node-id", "n1", "--cluster"])
        .arg(format!("redis://127.0.0.1:{port}"))
        .current_dir(dir.path())
        .output()
        .expect("runs natcall-rendezvous");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr.lines().last().unwrap_or_default();
    assert!(
        line.starts_with("error: ") && line.contains("cannot reach the cluster's Redis"),
        "{stderr}"
    );
    // --cluster without --node-id is a usage error.
    let out = std::process::Command::new(natcall_e2e::bin("natcall-rendezvous"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--ephemeral",
            "--cluster",
            "redis://127.0.0.1:1",
        ])
        .output()
        .expect("runs natcall-rendezvous");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Two nodes on the Redis `url` names: a name bound through one is refused to another key on
/// the other, and a relayed call across them carries chat.
fn names_and_a_call_across(dir: &std::path::Path, url: &str) {
    let n1 = Rendezvous::start_node_at(dir, url, "n1", &[]);
    let n2 = Rendezvous::start_node_at(dir, url, "n2", &[]);
    let mut bob = Peer::spawn(dir, n2.addr, "bob", &["listen", "--once"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut mallory = Peer::spawn_home(dir, &dir.join("mallory"), n1.addr, "bob", &["listen", "--once"]);
    let err = mallory.wait_event("error", EXIT, |_| true);
    assert_eq!(mallory.wait_exit(EXIT), 4, "{err}");
    let mut alice = Peer::spawn(
        dir,
        n1.addr,
        "alice",
        &["call", "bob", "--policy", "relay-only", "--no-media"],
    );
    alice.wait_event("connected", EXIT, |v| v["path"] == "relay");
    alice.say("through a Redis of another shape");
    bob.wait_chat("through a Redis of another shape");
    alice.close_stdin();
    assert_eq!(alice.wait_exit(EXIT), 0, "alice's log:\n{}", alice.log_text());
}

#[test]
fn nodes_on_a_redis_cluster_share_names_and_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = RedisGroup::cluster(dir.path());
    names_and_a_call_across(dir.path(), &group.url);
}

#[test]
fn nodes_on_a_redis_behind_sentinel_share_names_and_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = RedisGroup::sentinel(dir.path());
    names_and_a_call_across(dir.path(), &group.url);
}

#[test]
fn when_sentinel_promotes_the_replica_the_nodes_follow_it_and_names_survive() {
    failover("died", RedisGroup::kill_master, None);
}

/// A master whose host went silent leaves no connection error behind, only unanswered
/// commands: the nodes give up on one after `timeout_ms` and ask the Sentinel again. With
/// `timeout_ms` under the redis crate's own answer timeout (500 ms), only the nodes' deadline
/// can tell them: the command it drops must take the master's connection with it.
#[test]
fn when_the_master_goes_silent_the_nodes_follow_the_promoted_replica() {
    failover("went silent", RedisGroup::freeze_master, Some(300));
}

/// Two nodes on a Sentinel-watched master with a replica (`timeout_ms` if given); bob binds his
/// name on one; the master fails (`fail`, described as `how`); a cross-server call works
/// again, and bob's name is still his.
fn failover(how: &str, fail: fn(&mut RedisGroup) -> Duration, timeout_ms: Option<u64>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = RedisGroup::sentinel_with_replica(dir.path());
    let config = dir.path().join("rendezvous.toml");
    let mut extra: Vec<&str> = Vec::new();
    if let Some(ms) = timeout_ms {
        // The flags name the Redis and the node; the file adds the deadline.
        std::fs::write(
            &config,
            format!(
                "[cluster]\nredis = {:?}\nnode_id = \"n0\"\ntimeout_ms = {ms}\n",
                group.url
            ),
        )
        .expect("config written");
        extra = vec!["--config", config.to_str().expect("utf-8 path")];
    }
    let n1 = Rendezvous::start_node_at(dir.path(), &group.url, "n1", &extra);
    let n2 = Rendezvous::start_node_at(dir.path(), &group.url, "n2", &extra);
    let mut bob = Peer::spawn(dir.path(), n2.addr, "bob", &["listen"]);
    bob.wait_event("registered", EXIT, |_| true);
    // Replication is asynchronous: what the master held when it failed is what the replica had.
    group.wait_replicated("{nc}:name:bob");
    group.wait_replicated("{nc}:home:bob");
    let promoted = fail(&mut group);
    eprintln!("the Sentinel promoted the replica {promoted:?} after the master {how}");
    // The nodes ask the Sentinel again (after the connection error, or the unanswered command)
    // and follow it to the new master: a cross-server call (a presence lookup by n1, a visit
    // to n2) works again.
    let failed_over = Instant::now();
    call_until_it_works(dir.path(), n1.addr, "alice", "bob", "the failover");
    eprintln!(
        "calls across servers again {:?} after the promotion",
        failed_over.elapsed()
    );
    // bob's name, bound before the failover, is still his on the new master.
    let mut mallory = Peer::spawn_home(
        dir.path(),
        &dir.path().join("mallory"),
        n1.addr,
        "bob",
        &["listen", "--once"],
    );
    let err = mallory.wait_event("error", EXIT, |_| true);
    assert_eq!(mallory.wait_exit(EXIT), 4, "{err}");
    assert!(err["error"].as_str().unwrap_or("").contains("taken"), "{err}");
}

#[test]
fn a_room_on_one_server_is_joined_from_another_and_its_name_is_taken_cluster_wide() {
    let (dir, _redis, nodes) = cluster(2);
    let (n1, n2) = (nodes[0].addr, nodes[1].addr);
    let mut alice = Peer::spawn(
        dir.path(),
        n1,
        "alice",
        &[
            "room",
            "team",
            "--invite",
            "bob",
            "--duration",
            "5",
            "--topology",
            "fan-out",
        ],
    );
    alice.wait_event("room", EXIT, |_| true);
    // Another room named team on the other server is refused: the name is the cluster's.
    let mut carol = Peer::spawn(dir.path(), n2, "carol", &["room", "team", "--invite", "dave"]);
    let err = carol.wait_event("error", EXIT, |_| true);
    assert_eq!(carol.wait_exit(EXIT), 4, "{err}");
    assert!(err["error"].as_str().unwrap_or("").contains("another server"), "{err}");
    // bob, on the other server, joins alice's room there and gets her media through both.
    let mut bob = Peer::spawn(
        dir.path(),
        n2,
        "bob",
        &["room", "team", "--duration", "4", "--topology", "fan-out"],
    );
    bob.wait_nth("connected", 1, EXIT);
    alice.wait_nth("connected", 1, EXIT);
    alice.say("hello from n1's room");
    bob.wait_chat("hello from n1's room");
    assert_eq!(bob.wait_exit(EXIT), 0, "bob: {}", bob.log_text());
    assert_eq!(alice.wait_exit(EXIT), 0, "alice: {}", alice.log_text());
    // Fan-out: alice's media went through her server and bob's, sealed with her room key.
    let r = bob.report();
    let got = &r["members"]["alice"]["fan_out"]["audio"]["received"];
    assert!(got["frames_complete"].as_u64().unwrap_or(0) > 10, "{r}");
    assert_eq!(got["packets_auth_failed"], 0, "{r}");
}
