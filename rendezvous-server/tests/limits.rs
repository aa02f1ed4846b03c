//! Names nobody can steal or hoard, and abuse limits with clear answers: durable bindings,
//! expiry, quotas per key and per source, connections per source, ring and lookup limits, and
//! releasing a name. Each test checks what a client is told and the metric that counts it.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{Client, Got, Identity, Running, test_config};
use natcall_proto::control::{CallFailure, ClientMsg, Fingerprint, Policy, ServerMsg};
use natcall_proto::frame::ErrorCode;
use natcall_rendezvous::Config;

/// The value of the metric line starting with `series` (name and labels), or 0 if absent.
fn metric(srv: &Running, series: &str) -> f64 {
    srv.server
        .metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn durable(dir: &std::path::Path) -> Config {
    let mut c = test_config();
    c.state_dir = Some(dir.to_owned());
    c
}

/// `id` tries to register `name` on a new connection; the error frame it gets.
async fn refused(srv: &Running, name: &str, id: &Identity) -> natcall_proto::frame::ErrorFrame {
    let mut c = Client::hello(srv.addr).await;
    c.send_register(name, id, vec![]).await;
    let e = c.expect_error().await;
    c.expect_eof().await;
    e
}

#[tokio::test]
async fn a_restarted_server_keeps_every_name_in_its_state_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let owner = Identity::generate();
    let srv = Running::start(durable(dir.path())).await;
    let (alice, _) = Client::register(srv.addr, "alice", &owner).await;
    drop(alice);
    srv.shutdown().await;

    let srv = Running::start(durable(dir.path())).await;
    let e = refused(&srv, "alice", &Identity::generate()).await;
    assert_eq!(e.code, ErrorCode::NameTaken);
    assert_eq!(metric(&srv, "natcall_names_bound"), 1.0);
    Client::register(srv.addr, "alice", &owner).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_name_unused_past_its_expiry_is_free_for_another_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    let day = 86_400;
    let old_key = Fingerprint([7; 32]);
    let recent_key = Fingerprint([8; 32]);
    std::fs::write(
        dir.path().join("names.v2"),
        format!(
            "natcall-rendezvous names v2\nfrank {old_key} {}\ngrace {recent_key} {}\n",
            now - 181 * day,
            now - 10 * day
        ),
    )
    .expect("writes a snapshot");
    let srv = Running::start(durable(dir.path())).await;
    assert_eq!(
        metric(&srv, "natcall_names_expired_total"),
        1.0,
        "frank expired at load"
    );
    let thief = Identity::generate();
    Client::register(srv.addr, "frank", &thief).await;
    assert_eq!(
        refused(&srv, "grace", &thief).await.code,
        ErrorCode::NameTaken,
        "used 10 days ago: still grace's"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn a_key_holds_at_most_its_quota_of_names() {
    let mut config = test_config();
    config.limits.max_names_per_key = 2;
    let srv = Running::start(config).await;
    let hoarder = Identity::generate();
    let _a = Client::register(srv.addr, "a", &hoarder).await;
    let _b = Client::register(srv.addr, "b", &hoarder).await;
    let e = refused(&srv, "c", &hoarder).await;
    assert_eq!(e.code, ErrorCode::QuotaExceeded);
    assert_eq!(
        e.message,
        "this key already holds 2 names, the most one key may; release one first"
    );
    assert_eq!(metric(&srv, "natcall_refused_total{reason=\"key_quota\"}"), 1.0);
    Client::register(srv.addr, "c", &Identity::generate()).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn one_source_binds_at_most_its_new_names_per_hour_but_keeps_its_own() {
    let mut config = test_config();
    config.limits.new_names_per_ip_per_hour = 2;
    let srv = Running::start(config).await;
    let (ids, names) = ([Identity::generate(), Identity::generate()], ["n1", "n2"]);
    for (id, name) in ids.iter().zip(names) {
        drop(Client::register(srv.addr, name, id).await);
    }
    let e = refused(&srv, "n3", &Identity::generate()).await;
    assert_eq!(e.code, ErrorCode::QuotaExceeded);
    assert_eq!(
        e.message,
        "too many new names from your address: at most 2 an hour; try later"
    );
    assert_eq!(metric(&srv, "natcall_refused_total{reason=\"new_name_rate\"}"), 1.0);
    // Names it already holds are not new: their owners register again.
    Client::register(srv.addr, "n1", &ids[0]).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn registrations_per_source_and_minute_are_limited() {
    let mut config = test_config();
    config.limits.registrations_per_ip_per_min = 3;
    let srv = Running::start(config).await;
    let id = Identity::generate();
    for _ in 0..3 {
        drop(Client::register(srv.addr, "alice", &id).await);
    }
    let e = refused(&srv, "alice", &id).await;
    assert_eq!(e.code, ErrorCode::RateLimited);
    assert_eq!(
        e.message,
        "too many registrations from your address: at most 3 a minute; try later"
    );
    assert_eq!(metric(&srv, "natcall_refused_total{reason=\"registration_rate\"}"), 1.0);
    srv.shutdown().await;
}

#[tokio::test]
async fn connections_past_the_per_source_limit_are_told_server_full() {
    let mut config = test_config();
    config.limits.max_connections_per_ip = 2;
    let srv = Running::start(config).await;
    let first = Client::hello(srv.addr).await;
    let _second = Client::hello(srv.addr).await;
    let mut third = Client::connect(srv.addr).await;
    let e = third.expect_error().await;
    assert_eq!(e.code, ErrorCode::ServerFull);
    assert_eq!(
        e.message,
        "server full for your address: it has 2 connections, the most one address may; try later"
    );
    third.expect_eof().await;
    assert_eq!(
        metric(&srv, "natcall_refused_total{reason=\"per_ip_connections\"}"),
        1.0
    );
    // A slot frees when a connection ends.
    drop(first);
    common::eventually("the first connection's slot is free", || {
        srv.server
            .registry()
            .sources()
            .connections_from("127.0.0.1".parse().expect("ip"))
            == 1
    })
    .await;
    Client::hello(srv.addr).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn past_the_connection_limit_the_answer_says_server_full_try_later() {
    let mut config = test_config();
    config.limits.max_connections = 1;
    let srv = Running::start(config).await;
    let _first = Client::hello(srv.addr).await;
    let mut second = Client::connect(srv.addr).await;
    let e = second.expect_error().await;
    assert_eq!(e.code, ErrorCode::ServerFull);
    assert_eq!(
        e.message,
        "server full: the server is at its connection limit; try later"
    );
    assert_eq!(metric(&srv, "natcall_refused_total{reason=\"server_full\"}"), 1.0);
    assert_eq!(metric(&srv, "natcall_max_connections"), 1.0);
    srv.shutdown().await;
}

#[tokio::test]
async fn lookups_need_registration_and_are_rate_limited() {
    let mut config = test_config();
    config.limits.lookups_per_min = 2;
    let srv = Running::start(config).await;
    let mut stranger = Client::hello(srv.addr).await;
    stranger.send(&ClientMsg::Lookup { name: "bob".into() }).await;
    assert_eq!(stranger.expect_error().await.code, ErrorCode::NotRegistered);

    let (_bob, _) = Client::register(srv.addr, "bob", &Identity::generate()).await;
    let (mut alice, _) = Client::register(srv.addr, "alice", &Identity::generate()).await;
    for _ in 0..2 {
        assert!(matches!(
            alice.lookup("bob").await,
            ServerMsg::Presence { online: true, .. }
        ));
    }
    match alice.lookup("bob").await {
        ServerMsg::LookupFailed { name, reason } => {
            assert_eq!(name, "bob");
            assert_eq!(reason, "too many lookups: at most 2 a minute; try later");
        }
        other => panic!("expected LookupFailed, got {other:?}"),
    }
    assert_eq!(metric(&srv, "natcall_refused_total{reason=\"lookup_rate\"}"), 1.0);
    srv.shutdown().await;
}

async fn call(c: &mut Client, callee: &str, request: u32) -> ServerMsg {
    c.send(&ClientMsg::Call {
        request,
        callee: callee.into(),
        policy: Policy::Auto,
    })
    .await;
    c.next_msg().await
}

#[tokio::test]
async fn a_callee_is_rung_at_most_its_rate_by_all_callers_together() {
    let mut config = test_config();
    config.limits.rings_per_callee_per_min = 2;
    let srv = Running::start(config).await;
    let (mut bob, _) = Client::register(srv.addr, "bob", &Identity::generate()).await;
    let mut callers = Vec::new();
    for name in ["c1", "c2", "c3"] {
        callers.push(Client::register(srv.addr, name, &Identity::generate()).await.0);
    }
    for (i, c) in callers.iter_mut().take(2).enumerate() {
        let call = match call(c, "bob", i as u32).await {
            ServerMsg::Ringing { call, .. } => call,
            other => panic!("expected ringing, got {other:?}"),
        };
        assert!(matches!(bob.next_msg().await, ServerMsg::Incoming { .. }));
        c.send(&ClientMsg::Hangup {
            call,
            reason: "never mind".into(),
        })
        .await;
        assert!(matches!(bob.next_msg().await, ServerMsg::CallEnded { .. }));
    }
    match call(&mut callers[2], "bob", 9).await {
        ServerMsg::CallFailed { failure, request, .. } => {
            assert_eq!((failure, request), (CallFailure::RateLimited, 9));
        }
        other => panic!("expected CallFailed, got {other:?}"),
    }
    assert_eq!(metric(&srv, "natcall_refused_total{reason=\"ring_rate\"}"), 1.0);
    assert!(
        bob.try_next(std::time::Duration::from_millis(200)).await.is_none(),
        "bob was not rung"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn a_released_name_is_free_for_another_key_even_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = Running::start(durable(dir.path())).await;
    let (mut alice, _) = Client::register(srv.addr, "alice", &Identity::generate()).await;
    alice.send(&ClientMsg::ReleaseName).await;
    match alice.next_msg().await {
        ServerMsg::NameReleased { name } => assert_eq!(name, "alice"),
        other => panic!("expected NameReleased, got {other:?}"),
    }
    alice.expect_eof().await;
    assert!(srv.server.registry().peer("alice").is_none());
    assert_eq!(srv.server.registry().owner("alice").await.expect("embedded"), None);
    assert_eq!(metric(&srv, "natcall_names_bound"), 0.0);
    srv.shutdown().await;

    let srv = Running::start(durable(dir.path())).await;
    let newcomer = Identity::generate();
    let (_c, _) = Client::register(srv.addr, "alice", &newcomer).await;
    assert_eq!(
        srv.server.registry().owner("alice").await.expect("embedded"),
        Some(Fingerprint::of_cert(&newcomer.cert))
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn release_before_registering_is_refused() {
    let srv = Running::start(test_config()).await;
    let mut c = Client::hello(srv.addr).await;
    c.send(&ClientMsg::ReleaseName).await;
    match c.next().await {
        Got::Error(e) => assert_eq!(e.code, ErrorCode::NotRegistered),
        other => panic!("expected an error, got {other:?}"),
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_never_registers_is_closed_after_the_hello_timeout_whatever_it_sends() {
    let mut config = test_config();
    config.limits.hello_timeout_ms = 400;
    let srv = Running::start(config).await;
    let started = tokio::time::Instant::now();
    let mut idler = Client::hello(srv.addr).await;
    // Unsolicited pongs every 100 ms used to count as activity and keep it open for good.
    let e = loop {
        idler.send(&ClientMsg::Pong { nonce: 1 }).await;
        if let Some(got) = idler.try_next(std::time::Duration::from_millis(100)).await {
            match got {
                Got::Error(e) => break e,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "still open 5 s after a hello timeout of 400 ms"
        );
    };
    assert_eq!(e.code, ErrorCode::Timeout);
    assert_eq!(e.message, "no hello and registration within 400ms; closing");
    assert!(started.elapsed() >= std::time::Duration::from_millis(400));
    srv.shutdown().await;
}
