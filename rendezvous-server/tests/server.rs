//! The server in-process on 127.0.0.1:0: registration, names, presence, pings, bad clients,
//! STUN, drain.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use common::{Client, Got, Identity, Running, eventually, http_get, stun_round_trip, test_config};
use natcall_proto::control::{ClientMsg, ServerMsg};
use natcall_proto::frame::{self, ErrorCode};
use natcall_proto::stun as wire;
use natcall_rendezvous::Config;
use tokio::net::UdpSocket;

fn quick_config() -> Config {
    let mut c = test_config();
    c.limits.ping_interval_ms = 100;
    c.limits.idle_timeout_ms = 400;
    c.limits.drain_timeout_ms = 1000;
    c
}

#[tokio::test]
async fn peers_register_and_see_each_others_presence() {
    let srv = Running::start(test_config()).await;
    let (alice_id, bob_id) = (Identity::generate(), Identity::generate());
    let (mut alice, _) = Client::register(srv.addr, "alice", &alice_id).await;
    let (mut bob, _) = Client::register(srv.addr, "bob", &bob_id).await;
    match bob.lookup("alice").await {
        ServerMsg::Presence {
            name,
            online: true,
            fingerprint: Some(fp),
        } => {
            assert_eq!(name, "alice");
            assert_eq!(fp, natcall_proto::control::Fingerprint::of_cert(&alice_id.cert));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        alice.lookup("carol").await,
        ServerMsg::Presence {
            online: false,
            fingerprint: None,
            ..
        }
    ));
    drop(bob);
    eventually("bob unregistered after closing", || {
        srv.server.registry().peer("bob").is_none()
    })
    .await;
    assert!(matches!(
        alice.lookup("bob").await,
        ServerMsg::Presence { online: false, .. }
    ));
    srv.shutdown().await;
}

#[tokio::test]
async fn a_name_stays_with_the_first_key_that_registered_it() {
    let srv = Running::start(test_config()).await;
    let owner = Identity::generate();
    let (alice, _) = Client::register(srv.addr, "alice", &owner).await;
    let mut mallory = Client::hello(srv.addr).await;
    mallory.send_register("alice", &Identity::generate(), vec![]).await;
    let e = mallory.expect_error().await;
    assert_eq!(e.code, ErrorCode::NameTaken);
    assert_eq!(
        e.message,
        "the name \"alice\" is taken: it is registered to another key; if it is yours, run with the \
         --home (identity) that registered it; otherwise choose another --name"
    );
    mallory.expect_eof().await;
    // Even after alice leaves, the name is hers.
    drop(alice);
    eventually("alice offline", || srv.server.registry().peer("alice").is_none()).await;
    let mut mallory = Client::hello(srv.addr).await;
    mallory.send_register("alice", &Identity::generate(), vec![]).await;
    assert_eq!(mallory.expect_error().await.code, ErrorCode::NameTaken);
    // The owner comes back from a new connection.
    let (mut alice, _) = Client::register(srv.addr, "alice", &owner).await;
    assert!(matches!(
        alice.lookup("alice").await,
        ServerMsg::Presence { online: true, .. }
    ));
    srv.shutdown().await;
}

#[tokio::test]
async fn a_stolen_fingerprint_cannot_register_without_the_key() {
    let srv = Running::start(test_config()).await;
    let victim = Identity::generate();
    let mut thief = Client::hello(srv.addr).await;
    let signature = Identity::generate().sign(&thief.challenge, &thief.binding, "alice");
    thief
        .send(&ClientMsg::Register {
            name: "alice".into(),
            cert: victim.cert.clone(),
            signature,
            lan_addrs: vec![],
        })
        .await;
    let e = thief.expect_error().await;
    assert_eq!(e.code, ErrorCode::BadSignature);
    assert_eq!(e.message, "signature does not verify with the certificate's key");
    srv.shutdown().await;
}

#[tokio::test]
async fn a_version_mismatch_is_refused_naming_both_versions() {
    let srv = Running::start(test_config()).await;
    let mut c = Client::connect(srv.addr).await;
    let mut b = BytesMut::new();
    frame::encode_hello(999, &mut b);
    c.send_raw(&b).await;
    let e = c.expect_error().await;
    assert_eq!(e.code, ErrorCode::VersionMismatch);
    assert_eq!(
        e.message,
        format!(
            "protocol version mismatch: this side speaks version {}, the other side version 999",
            natcall_proto::PROTOCOL_VERSION
        )
    );
    c.expect_eof().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn bad_clients_are_closed_with_a_reason_and_good_clients_keep_working() {
    let srv = Running::start(quick_config()).await;
    let (mut good, _) = Client::register(srv.addr, "good", &Identity::generate()).await;

    let mut oversized = Client::register(srv.addr, "big", &Identity::generate()).await.0;
    oversized.send_raw(&(1_000_000u32).to_be_bytes()).await;
    let e = oversized.expect_error().await;
    assert_eq!(e.code, ErrorCode::FrameTooLarge);
    assert_eq!(e.message, "frame of 1000000 bytes exceeds the limit of 16384 bytes");
    oversized.expect_eof().await;

    let mut garbage = Client::register(srv.addr, "junk", &Identity::generate()).await.0;
    garbage.send_raw(&[0, 0, 0, 4, 0x01, 0xff, 0xff, 0xff]).await;
    let e = garbage.expect_error().await;
    assert_eq!(e.code, ErrorCode::Malformed);
    assert!(e.message.starts_with("malformed control message"), "{}", e.message);
    garbage.expect_eof().await;

    let mut no_hello = Client::connect(srv.addr).await;
    no_hello.send(&ClientMsg::Lookup { name: "good".into() }).await;
    let e = no_hello.expect_error().await;
    assert_eq!(e.code, ErrorCode::Unexpected);
    assert_eq!(e.message, "unexpected control frame: expected hello first");

    let mut http = Client::connect(srv.addr).await;
    http.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(http.expect_error().await.code, ErrorCode::FrameTooLarge);

    // The good client noticed nothing: it still registers presence and answers pings.
    for _ in 0..5 {
        assert!(matches!(
            good.lookup("good").await,
            ServerMsg::Presence { online: true, .. }
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        srv.server.registry().peer("good").and_then(|p| p.rtt).is_some(),
        "RTT measured by ping/pong"
    );
    assert!(srv.server.registry().peer("big").is_none());
    srv.shutdown().await;
}

#[tokio::test]
async fn a_silent_peer_times_out_and_its_registration_disappears() {
    let srv = Running::start(quick_config()).await;
    let (mut chatty, _) = Client::register(srv.addr, "chatty", &Identity::generate()).await;
    let started = tokio::time::Instant::now();
    let (mut silent, _) = Client::register(srv.addr, "silent", &Identity::generate()).await;
    // `silent` reads but never answers a ping; `chatty` answers them and keeps talking.
    let silent_side = async {
        let e = loop {
            match silent.next_no_pong().await {
                Got::Msg(ServerMsg::Ping { .. }) => continue,
                Got::Error(e) => break e,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(e.code, ErrorCode::Timeout);
        assert_eq!(e.message, "no message within 400ms; closing");
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "not before the idle timeout"
        );
        silent.expect_eof().await;
    };
    let chatty_side = async {
        while started.elapsed() < Duration::from_millis(900) {
            assert!(matches!(
                chatty.lookup("chatty").await,
                ServerMsg::Presence { online: true, .. }
            ));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::join!(silent_side, chatty_side);
    assert!(srv.server.registry().peer("silent").is_none());
    assert!(srv.server.registry().peer("chatty").is_some());
    srv.shutdown().await;
}

#[tokio::test]
async fn a_flooding_client_is_shed_with_a_reset() {
    let mut config = test_config();
    config.limits.frames_per_sec = 20;
    let srv = Running::start(config).await;
    let (mut flood, _) = Client::register(srv.addr, "flood", &Identity::generate()).await;
    let mut burst = BytesMut::new();
    for _ in 0..200 {
        frame::encode_control(&ClientMsg::Lookup { name: "x".into() }, &mut burst).expect("encodes");
    }
    let _ = tokio::io::AsyncWriteExt::write_all(&mut flood.stream, &burst).await;
    let mut sink = vec![0u8; 65536];
    let err = loop {
        match tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut flood.stream, &mut sink),
        )
        .await
        .expect("the server acts within 5 s")
        {
            Ok(0) => panic!("a flood must end in a reset, not a graceful close"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    srv.shutdown().await;
}

#[tokio::test]
async fn past_the_connection_limit_a_client_is_told_why() {
    let mut config = test_config();
    config.limits.max_connections = 1;
    let srv = Running::start(config).await;
    let _first = Client::hello(srv.addr).await;
    let mut second = Client::connect(srv.addr).await;
    let e = second.expect_error().await;
    assert_eq!(e.code, ErrorCode::ServerFull);
    second.expect_eof().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn stun_with_a_registration_token_records_the_public_address() {
    let srv = Running::start(test_config()).await;
    let (_alice, token) = Client::register(srv.addr, "alice", &Identity::generate()).await;
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
    let mut req = [0u8; 256];

    // A wrong password: no reply, nothing recorded.
    let forged = wire::TokenCredentials {
        username: token.username.clone(),
        password: "guess".into(),
    };
    let n = wire::encode_binding_request(&[1; 12], Some(&forged), &mut req).expect("encodes");
    assert_eq!(stun_round_trip(&udp, srv.addr, &req[..n]).await, None);
    assert_eq!(srv.server.registry().peer("alice").and_then(|p| p.public_udp), None);

    let n = wire::encode_binding_request(&[2; 12], Some(&token), &mut req).expect("encodes");
    let resp = stun_round_trip(&udp, srv.addr, &req[..n]).await.expect("a reply");
    let mapped = wire::parse_binding_success(&resp, &[2; 12], Some(&token.password)).expect("signed reply");
    let local = udp.local_addr().expect("addr");
    assert_eq!(mapped, local);
    assert_eq!(
        srv.server.registry().peer("alice").and_then(|p| p.public_udp),
        Some(local)
    );
    srv.shutdown().await;
}

/// A token binding captured on the path and replayed from the attacker's own address must not
/// move the peer's recorded address (the caller's `Start` would then name the attacker); a
/// retransmission from the same source is still answered, and a newer binding moves it.
#[tokio::test]
async fn a_replayed_token_binding_does_not_move_the_recorded_address() {
    let srv = Running::start(test_config()).await;
    let (_alice, token) = Client::register(srv.addr, "alice", &Identity::generate()).await;
    let alice = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
    let attacker = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
    let mut req = [0u8; 256];
    let tid = |seq: u64| {
        let mut t = [9u8; 12];
        t[..8].copy_from_slice(&seq.to_be_bytes());
        t
    };
    let recorded = || srv.server.registry().peer("alice").and_then(|p| p.public_udp);
    let n = wire::encode_binding_request(&tid(5), Some(&token), &mut req).expect("encodes");
    let captured = req[..n].to_vec();
    assert!(stun_round_trip(&alice, srv.addr, &captured).await.is_some());
    assert_eq!(recorded(), Some(alice.local_addr().expect("addr")));
    // The same bytes from elsewhere: no answer, nothing moves, counted.
    assert_eq!(stun_round_trip(&attacker, srv.addr, &captured).await, None);
    assert_eq!(recorded(), Some(alice.local_addr().expect("addr")));
    // An older one, signed and all (captured earlier): also a replay.
    let n = wire::encode_binding_request(&tid(4), Some(&token), &mut req).expect("encodes");
    assert_eq!(stun_round_trip(&attacker, srv.addr, &req[..n]).await, None);
    assert_eq!(recorded(), Some(alice.local_addr().expect("addr")));
    let metrics = srv.server.metrics().render();
    assert!(metrics.contains("natcall_stun_replays_total 2"), "{metrics}");
    // A retransmission from alice's own address is answered again.
    assert!(stun_round_trip(&alice, srv.addr, &captured).await.is_some());
    // Alice's NAT rebinds: her next (newer) binding moves the address.
    let moved = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
    let n = wire::encode_binding_request(&tid(6), Some(&token), &mut req).expect("encodes");
    assert!(stun_round_trip(&moved, srv.addr, &req[..n]).await.is_some());
    assert_eq!(recorded(), Some(moved.local_addr().expect("addr")));
    srv.shutdown().await;
}

#[tokio::test]
async fn stun_answers_plain_bindings_small_and_drops_everything_else() {
    let srv = Running::start(test_config()).await;
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
    let mut req = [0u8; 256];
    let n = wire::encode_binding_request(&[3; 12], None, &mut req).expect("encodes");
    let resp = stun_round_trip(&udp, srv.addr, &req[..n]).await.expect("a reply");
    assert_eq!(
        wire::parse_binding_success(&resp, &[3; 12], None),
        Ok(udp.local_addr().expect("addr"))
    );
    assert!(resp.len() <= 3 * n, "reply {} bytes for a {n}-byte request", resp.len());

    // The smallest legal request: a bare 20-byte header.
    let bare = [
        0x00, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
    ];
    let resp = stun_round_trip(&udp, srv.addr, &bare).await.expect("a reply");
    assert!(
        resp.len() <= 3 * bare.len(),
        "reply {} bytes for a 20-byte request",
        resp.len()
    );

    assert_eq!(
        stun_round_trip(&udp, srv.addr, b"hello, are you a STUN server?").await,
        None
    );
    assert_eq!(stun_round_trip(&udp, srv.addr, &[0u8; 1]).await, None);
    let mut oversized = vec![0u8; 600];
    oversized[..20].copy_from_slice(&bare);
    oversized[2..4].copy_from_slice(&580u16.to_be_bytes());
    assert_eq!(stun_round_trip(&udp, srv.addr, &oversized).await, None);
    let mut corrupt = req;
    corrupt[n - 1] ^= 0xff; // breaks FINGERPRINT
    assert_eq!(stun_round_trip(&udp, srv.addr, &corrupt[..n]).await, None);
    // A success response sent to the server is not a request: dropped.
    let mut out = [0u8; 256];
    let m =
        wire::encode_binding_success(&[5; 12], "192.0.2.1:9".parse().expect("addr"), None, &mut out).expect("encodes");
    assert_eq!(stun_round_trip(&udp, srv.addr, &out[..m]).await, None);
    // Still alive.
    assert!(stun_round_trip(&udp, srv.addr, &req[..n]).await.is_some());
    srv.shutdown().await;
}

#[tokio::test]
async fn drain_delivers_every_queued_reply_then_going_away_then_a_clean_close() {
    let srv = Running::start(test_config()).await;
    let (mut peer, _) = Client::register(srv.addr, "reader", &Identity::generate()).await;
    // 150 lookups the server answers while the peer is not reading (within the frame rate).
    let mut burst = BytesMut::new();
    for _ in 0..150 {
        frame::encode_control(&ClientMsg::Lookup { name: "reader".into() }, &mut burst).expect("encodes");
    }
    peer.send_raw(&burst).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = tokio::spawn(srv.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The peer keeps talking during the drain: the server must still not reset.
    let mut more = BytesMut::new();
    for _ in 0..20 {
        frame::encode_control(&ClientMsg::Pong { nonce: 1 }, &mut more).expect("encodes");
    }
    peer.send_raw(&more).await;
    let mut replies = 0;
    loop {
        match peer.next().await {
            Got::Msg(ServerMsg::Presence { online: true, .. }) => replies += 1,
            Got::Msg(ServerMsg::GoingAway { reason, .. }) => {
                assert_eq!(reason, "server is shutting down");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(replies, 150, "every reply queued before the drain arrives");
    peer.expect_eof().await; // the server half-closed: EOF, not a reset
    drop(peer); // our close lets the server finish
    stop.await.expect("server stops");
}

#[tokio::test]
async fn the_drain_ends_as_soon_as_every_peer_has_closed_its_side() {
    let mut config = test_config();
    config.limits.drain_timeout_ms = 10_000;
    let srv = Running::start(config).await;
    let mut peers = Vec::new();
    for i in 0..6 {
        peers.push(
            Client::register(srv.addr, &format!("p{i}"), &Identity::generate())
                .await
                .0,
        );
    }
    // Two of them in an active call, relay frames in flight; one connection not registered yet.
    let (a, b) = peers.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    a.send(&ClientMsg::Call {
        request: 1,
        callee: "p1".into(),
        policy: natcall_proto::control::Policy::RelayOnly,
    })
    .await;
    let ServerMsg::Ringing { call, .. } = a.next_msg().await else {
        panic!("expected ringing")
    };
    assert!(matches!(b.next_msg().await, ServerMsg::Incoming { .. }));
    b.send(&ClientMsg::Answer { call, accept: true }).await;
    for c in [&mut *a, &mut *b] {
        assert!(matches!(c.next_msg().await, ServerMsg::Start(_)));
    }
    for _ in 0..20 {
        a.send_relay(call, &[1; 200]).await;
    }
    peers.push(Client::hello(srv.addr).await);

    let started = tokio::time::Instant::now();
    let stop = tokio::spawn(srv.shutdown());
    // Every peer does what a natcall peer does on GoingAway: close its side at once, then read
    // until the server's side closes.
    let closing = peers.into_iter().map(|mut peer| async move {
        loop {
            match peer.next().await {
                Got::Msg(ServerMsg::GoingAway { .. }) => break,
                Got::Msg(_) | Got::Relay(_) => continue,
                other => panic!("expected going-away, got {other:?}"),
            }
        }
        tokio::io::AsyncWriteExt::shutdown(&mut peer.stream)
            .await
            .expect("half-closes");
        peer.expect_eof().await;
    });
    futures_join_all(closing).await;
    stop.await.expect("server stops");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the drain took {took:?}: it must end when the peers have closed, not at its 10 s deadline"
    );
}

/// Runs every future to completion, concurrently.
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(futures: impl Iterator<Item = F>) {
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    while let Some(r) = set.join_next().await {
        r.expect("no panic");
    }
}

#[tokio::test]
async fn prometheus_metrics_and_health_are_served_over_http() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binds")
        .local_addr()
        .expect("addr")
        .port();
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut config = test_config();
    config.metrics_listen = Some(metrics_addr);
    let srv = Running::start(config).await;
    let (_a, _) = Client::register(srv.addr, "alice", &Identity::generate()).await;
    let (_b, _) = Client::register(srv.addr, "bob", &Identity::generate()).await;
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
    let mut req = [0u8; 64];
    let n = wire::encode_binding_request(&[1; 12], None, &mut req).expect("encodes");
    stun_round_trip(&udp, srv.addr, &req[..n]).await.expect("answered");
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = http_get(metrics_addr, "/metrics").await;
        if metrics.contains("natcall_registered_peers 2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(metrics.contains("natcall_registered_peers 2"), "{metrics}");
    assert!(metrics.contains("natcall_stun_answered_total 1"), "{metrics}");
    assert!(
        metrics.contains("natcall_relayed_frames_total{class=\"audio\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# HELP natcall_relay_dropped_frames_total"),
        "{metrics}"
    );
    let health = http_get(metrics_addr, "/health").await;
    assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
    assert!(
        health.ends_with("{\"status\":\"ok\",\"registered_peers\":2,\"calls\":0,\"rooms\":0}\n"),
        "{health}"
    );
    assert!(http_get(metrics_addr, "/nope").await.starts_with("HTTP/1.1 404"));
    srv.shutdown().await;
}
