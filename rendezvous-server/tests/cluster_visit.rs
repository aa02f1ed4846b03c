//! Visits (a node speaking for its peer on another node) against an attacker: a visit without
//! the cluster's secret is refused, and a proof made for one TLS session does not work on
//! another (a captured visit cannot be replayed); a peer connecting from a node's address is
//! held to the per-address connection limit, which visits are not. Each test starts its own
//! `redis-server`.

mod common;

use common::Redis;

use common::{Client, Got};
use natcall_proto::control::{Candidates, ClientMsg, Fingerprint, ServerMsg};
use natcall_proto::frame::ErrorCode;
use natcall_proto::server_key::ServerKey;
use natcall_rendezvous::cluster::Cluster;
use natcall_rendezvous::{ClusterConfig, Server, Sockets};

fn redis() -> Redis {
    Redis::start()
}

/// A cluster node `id` on `redis`, running in this process; its address.
async fn node(redis: &Redis, id: &str) -> std::net::SocketAddr {
    node_with(redis, id, |_| {}).await
}

/// [`node`] with its configuration changed by `change`.
async fn node_with(
    redis: &Redis,
    id: &str,
    change: impl FnOnce(&mut natcall_rendezvous::Config),
) -> std::net::SocketAddr {
    let sockets = Sockets::bind("127.0.0.1:0".parse().expect("addr")).expect("binds");
    let addr = sockets.local_addr().expect("addr");
    let mut config = common::test_config();
    change(&mut config);
    config.cluster = Some(ClusterConfig::new(redis.url(), id));
    let server = Server::open(config, addr).await.expect("joins the cluster");
    tokio::spawn(async move { server.run(sockets, std::future::pending()).await });
    addr
}

fn visit(node: &str, proof: [u8; 32]) -> ClientMsg {
    ClientMsg::Visit {
        node: node.into(),
        name: "alice".into(),
        fingerprint: Fingerprint([5; 32]),
        candidates: Candidates::default(),
        rtt_us: None,
        proof,
    }
}

/// An insider of the cluster: node "n1" joined to `redis` (same secret), recorded at
/// 127.0.0.1:9, not serving.
async fn insider(redis: &Redis) -> std::sync::Arc<Cluster> {
    let config = ClusterConfig::new(redis.url(), "n1");
    Cluster::connect(
        &config,
        "127.0.0.1:9".parse().expect("addr"),
        ServerKey([1; 32]),
        natcall_rendezvous::Metrics::new(),
    )
    .await
    .expect("joins")
}

/// Sends n1's visit for alice with `proof` on `c` and expects it accepted.
async fn visit_accepted(c: &mut Client, proof: [u8; 32]) {
    c.send(&visit("n1", proof)).await;
    match c.next_no_pong().await {
        Got::Msg(ServerMsg::Registered { name, .. }) => assert_eq!(name, "alice"),
        other => panic!("expected the visit accepted, got {other:?}"),
    }
}

async fn refused_bad_signature(c: &mut Client) {
    match c.next().await {
        Got::Error(e) => assert_eq!(e.code, ErrorCode::BadSignature, "{e:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_visit_without_the_clusters_secret_is_refused() {
    let r = redis();
    let addr = node(&r, "n2").await;
    let mut c = Client::hello(addr).await;
    c.send(&visit("n1", [0x42; 32])).await;
    refused_bad_signature(&mut c).await;
    // Nobody speaks for alice there: a lookup from a registered peer finds her offline.
    let (mut bob, _) = Client::register(addr, "bob", &common::Identity::generate()).await;
    bob.send(&ClientMsg::Lookup { name: "alice".into() }).await;
    match bob.next_no_pong().await {
        Got::Msg(ServerMsg::Presence { online, .. }) => assert!(!online),
        other => panic!("expected presence, got {other:?}"),
    }
}

#[tokio::test]
async fn a_visit_proof_works_only_on_the_tls_session_it_was_made_for() {
    let r = redis();
    let addr = node(&r, "n2").await;
    // An insider of the cluster (same Redis, same secret) makes a valid proof for session A.
    let n1 = insider(&r).await;
    let mut a = Client::hello(addr).await;
    let proof = n1.visit_proof("n1", "n2", "alice", &Fingerprint([5; 32]), &a.binding);
    // Captured and replayed on another session: refused.
    let mut b = Client::hello(addr).await;
    b.send(&visit("n1", proof)).await;
    refused_bad_signature(&mut b).await;
    // On its own session it is accepted.
    visit_accepted(&mut a, proof).await;
}

#[tokio::test]
async fn a_node_that_does_not_hold_the_key_it_recorded_is_not_visited() {
    let r = redis();
    let n1 = node(&r, "n1").await;
    let n2 = node(&r, "n2").await;
    // Redis says bob is on node "fake", at n2's address but with another key (a machine in the
    // middle, or a stale record): n1 must not speak for its peer there.
    let mut redis = redis::Client::open(r.url())
        .expect("url")
        .get_connection()
        .expect("connects");
    let wrong = "ab".repeat(32);
    let _: () = redis::cmd("SET")
        .arg("{nc}:node:fake")
        .arg(format!("0000 {n2} {wrong}"))
        .query(&mut redis)
        .expect("set");
    let _: () = redis::cmd("SET")
        .arg("{nc}:home:bob")
        .arg("fake")
        .query(&mut redis)
        .expect("set");
    let (mut alice, _) = Client::register(n1, "alice", &common::Identity::generate()).await;
    alice
        .send(&ClientMsg::Call {
            request: 7,
            callee: "bob".into(),
            policy: natcall_proto::control::Policy::Auto,
        })
        .await;
    match alice.next_no_pong().await {
        Got::Msg(ServerMsg::CallFailed { request, failure, .. }) => {
            assert_eq!(request, 7);
            assert_eq!(failure, natcall_proto::control::CallFailure::Unavailable);
        }
        other => panic!("expected the call refused, got {other:?}"),
    }
}

#[tokio::test]
async fn from_a_nodes_address_a_peer_counts_against_the_per_address_limit_and_a_visit_does_not() {
    let r = redis();
    // n1 first (recorded in Redis at 127.0.0.1): n2 then knows 127.0.0.1 as a node's address.
    let n1 = insider(&r).await;
    let addr = node_with(&r, "n2", |c| c.limits.max_connections_per_ip = 2).await;
    let (_p1, _) = Client::register(addr, "p1", &common::Identity::generate()).await;
    let (_p2, _) = Client::register(addr, "p2", &common::Identity::generate()).await;
    // A third peer from that address is refused when it registers, saying why (it used to pass
    // as the node's: peers behind a node's address escaped the limit).
    let mut p3 = Client::hello(addr).await;
    p3.send_register("p3", &common::Identity::generate(), Vec::new()).await;
    let e = p3.expect_error().await;
    assert_eq!(e.code, ErrorCode::ServerFull, "{e:?}");
    assert_eq!(
        e.message,
        "server full for your address: it has 2 connections, the most one address may; try later"
    );
    // The node's visits are not one source's connections: one is still accepted.
    let mut v = Client::hello(addr).await;
    let proof = n1.visit_proof("n1", "n2", "alice", &Fingerprint([5; 32]), &v.binding);
    visit_accepted(&mut v, proof).await;
}
