//! Calls through the server in-process on 127.0.0.1:0: signalling (call, ring, answer, hang up,
//! leave and suspend, ring timeout) and relaying between the two members of an active call.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use common::{Client, Got, Identity, Running, eventually, relay_frame, stun_with_token, test_config};
use natcall_proto::control::{
    CallFailure, CallStart, Candidates, ClientMsg, Decline, Fingerprint, Mapping, Policy, Reply, ServerMsg,
};
use natcall_rendezvous::{Config, RelayCounts, start_delays};

/// Nothing arrives within this: used to show a frame was dropped.
const QUIET: Duration = Duration::from_millis(200);

struct Peer {
    client: Client,
    key: Fingerprint,
}

async fn peer(srv: &Running, name: &str) -> Peer {
    let id = Identity::generate();
    let (client, _) = Client::register(srv.addr, name, &id).await;
    Peer {
        client,
        key: Fingerprint::of_cert(&id.cert),
    }
}

/// `caller` calls `callee`; both see the call ring. Returns the call id.
async fn ring(caller: &mut Client, callee: &mut Client, callee_name: &str, policy: Policy) -> u32 {
    let request = rand_request();
    caller
        .send(&ClientMsg::Call {
            request,
            callee: callee_name.into(),
            policy,
        })
        .await;
    let call = match caller.next_msg().await {
        ServerMsg::Ringing { request: r, call } => {
            assert_eq!(r, request, "the caller's request id comes back");
            call
        }
        other => panic!("expected ringing, got {other:?}"),
    };
    assert_ne!(call, 0, "call ids are nonzero");
    match callee.next_msg().await {
        ServerMsg::Incoming { call: c, policy: p, .. } => {
            assert_eq!((c, p), (call, policy));
        }
        other => panic!("expected incoming, got {other:?}"),
    }
    call
}

/// A request id as a client would pick it (any value; distinct per attempt in these tests).
fn rand_request() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1000);
    NEXT.fetch_add(7, Ordering::Relaxed)
}

/// Rings and accepts; both sides get `Start`. Returns the call id.
async fn connect(caller: &mut Client, callee: &mut Client, callee_name: &str) -> u32 {
    let call = ring(caller, callee, callee_name, Policy::Auto).await;
    callee.send(&ClientMsg::Answer { call, accept: true }).await;
    for c in [caller, callee] {
        assert!(matches!(c.next_msg().await, ServerMsg::Start(s) if s.call == call));
    }
    call
}

async fn expect_ended(c: &mut Client, call: u32) -> String {
    match c.next_msg().await {
        ServerMsg::CallEnded { call: id, reason } => {
            assert_eq!(id, call);
            reason
        }
        other => panic!("expected call ended, got {other:?}"),
    }
}

/// `old` was told that `new` took over its registration (not to come back), and then closed.
async fn expect_replaced(old: &mut Client, new: &Client) {
    let by = new.stream.get_ref().0.local_addr().expect("addr");
    match old.next_msg().await {
        ServerMsg::Replaced { by: b } => assert_eq!(b, by, "the newer connection's address"),
        other => panic!("expected replaced, got {other:?}"),
    }
    old.expect_eof().await;
}

async fn expect_declined(c: &mut Client, call: u32) -> Decline {
    match c.next_msg().await {
        ServerMsg::CallDeclined { call: id, decline } => {
            assert_eq!(id, call);
            decline
        }
        other => panic!("expected call declined, got {other:?}"),
    }
}

async fn expect_suspended(c: &mut Client, call: u32) {
    match c.next_msg().await {
        ServerMsg::CallSuspended { call: id } => assert_eq!(id, call),
        other => panic!("expected call suspended, got {other:?}"),
    }
}

/// [`expect_suspended`], skipping relay frames that were already on their way.
async fn expect_suspended_after_relay(c: &mut Client, call: u32) {
    loop {
        match c.next().await {
            Got::Relay(_) => continue,
            Got::Msg(ServerMsg::CallSuspended { call: id }) => return assert_eq!(id, call),
            other => panic!("expected call suspended, got {other:?}"),
        }
    }
}

async fn expect_failed(c: &mut Client, callee: &str, policy: Policy) -> CallFailure {
    let request = rand_request();
    c.send(&ClientMsg::Call {
        request,
        callee: callee.into(),
        policy,
    })
    .await;
    match c.next_msg().await {
        ServerMsg::CallFailed {
            request: r,
            callee: name,
            failure,
        } => {
            assert_eq!((r, name.as_str()), (request, callee));
            failure
        }
        other => panic!("expected call failed, got {other:?}"),
    }
}

/// The connection is alive and its messages are answered.
async fn still_served(c: &mut Client) {
    assert!(matches!(
        c.lookup("nobody").await,
        ServerMsg::Presence { online: false, .. }
    ));
}

fn counts(srv: &Running) -> RelayCounts {
    srv.server.calls().relay_stats().counts()
}

#[tokio::test]
async fn an_accepted_call_starts_both_sides_with_each_others_key_candidates_and_one_password() {
    let srv = Running::start(test_config()).await;
    let (alice_id, bob_id) = (Identity::generate(), Identity::generate());
    let alice_lan: Vec<SocketAddr> = vec!["10.0.0.5:5000".parse().expect("addr")];
    let bob_lan: Vec<SocketAddr> = vec![
        "192.168.1.7:6000".parse().expect("addr"),
        "[fd00::7]:6000".parse().expect("addr"),
    ];
    let (mut alice, alice_token) = Client::register_with_lan(srv.addr, "alice", &alice_id, alice_lan.clone()).await;
    let (mut bob, bob_token) = Client::register_with_lan(srv.addr, "bob", &bob_id, bob_lan.clone()).await;
    let alice_udp = stun_with_token(srv.addr, &alice_token).await;
    let bob_udp = stun_with_token(srv.addr, &bob_token).await;
    // RTTs as if measured by ping/pong (the default ping interval does not run in this test).
    let reg = srv.server.registry();
    for (name, rtt) in [("alice", 80), ("bob", 20)] {
        let conn = reg.peer(name).expect("online").conn_id;
        reg.record_rtt(name, conn, Duration::from_millis(rtt));
    }
    // alice measured a symmetric NAT; bob never said: the other side hears what each reported.
    let alice_mapping = Mapping::Dependent { step: 3 };
    let alice_mapped: SocketAddr = "198.51.100.9:40001".parse().expect("addr");
    alice
        .send(&ClientMsg::NatMapping {
            mapping: alice_mapping,
            port_mapped: Some(alice_mapped),
        })
        .await;

    let call = ring(&mut alice, &mut bob, "bob", Policy::DirectOnly).await;
    bob.send(&ClientMsg::Answer { call, accept: true }).await;
    let start_a = alice.next_msg().await;
    let start_b = bob.next_msg().await;
    let (ServerMsg::Start(start_a), ServerMsg::Start(start_b)) = (start_a, start_b) else {
        panic!("both sides get Start");
    };
    let CallStart {
        call: call_a,
        peer: peer_a,
        fingerprint: key_a,
        candidates: cand_a,
        password: pw_a,
        controlling: ctl_a,
        delay_ms: delay_a,
        policy: policy_a,
    } = start_a;
    let CallStart {
        call: call_b,
        peer: peer_b,
        fingerprint: key_b,
        candidates: cand_b,
        password: pw_b,
        controlling: ctl_b,
        delay_ms: delay_b,
        policy: policy_b,
    } = start_b;
    assert_eq!((call_a, call_b), (call, call));
    assert_eq!((peer_a.as_str(), peer_b.as_str()), ("bob", "alice"));
    assert_eq!(key_a, Fingerprint::of_cert(&bob_id.cert));
    assert_eq!(key_b, Fingerprint::of_cert(&alice_id.cert));
    assert_eq!(
        cand_a,
        Candidates {
            public: Some(bob_udp.local_addr().expect("addr")),
            lan: bob_lan,
            mapping: Mapping::Unknown,
            port_mapped: None,
        }
    );
    assert_eq!(
        cand_b,
        Candidates {
            public: Some(alice_udp.local_addr().expect("addr")),
            lan: alice_lan,
            mapping: alice_mapping,
            port_mapped: Some(alice_mapped),
        }
    );
    assert_eq!(pw_a, pw_b, "one password per call");
    assert_eq!(pw_a.len(), 32);
    assert!(pw_a.chars().all(|c| c.is_ascii_hexdigit()), "{pw_a}");
    assert!(ctl_a && !ctl_b, "the caller controls");
    assert_eq!((policy_a, policy_b), (Policy::DirectOnly, Policy::DirectOnly));
    // bob (20 ms) hears of the start 30 ms before alice (80 ms) and waits that long.
    assert_eq!((delay_a, delay_b), (0, 30));
    assert_eq!(
        (delay_a, delay_b),
        start_delays(Some(Duration::from_millis(80)), Some(Duration::from_millis(20)))
    );

    // A second call gets another password and id.
    let call2 = ring(&mut alice, &mut bob, "bob", Policy::Auto).await;
    assert_ne!(call2, call);
    bob.send(&ClientMsg::Answer {
        call: call2,
        accept: true,
    })
    .await;
    match alice.next_msg().await {
        ServerMsg::Start(s) => assert_ne!(s.password, pw_a),
        other => panic!("expected start, got {other:?}"),
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn a_declined_call_ends_for_the_caller() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    let call = ring(&mut alice.client, &mut bob.client, "bob", Policy::Auto).await;
    bob.client.send(&ClientMsg::Answer { call, accept: false }).await;
    assert_eq!(expect_declined(&mut alice.client, call).await, Decline::Declined);
    assert!(srv.server.calls().is_empty());
    // Answering it again does nothing: bob gets no Start and stays connected.
    bob.client.send(&ClientMsg::Answer { call, accept: true }).await;
    still_served(&mut bob.client).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_callee_in_another_call_declines_as_busy_and_the_caller_is_told_so() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    for decline in [Decline::Busy, Decline::Declined] {
        let call = ring(&mut alice.client, &mut bob.client, "bob", Policy::Auto).await;
        let reply = Reply::Decline(decline);
        bob.client.send(&ClientMsg::Reply { call, reply }).await;
        assert_eq!(expect_declined(&mut alice.client, call).await, decline);
        assert!(srv.server.calls().is_empty());
        still_served(&mut bob.client).await;
    }
    srv.shutdown().await;
}

/// The call runs under the stricter of both policies; two that cannot both hold decline it.
#[tokio::test]
async fn the_callee_s_policy_narrows_the_call_or_declines_it() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    let cases = [
        (Policy::Auto, Policy::RelayOnly, Some(Policy::RelayOnly)),
        (Policy::DirectOnly, Policy::Auto, Some(Policy::DirectOnly)),
        (Policy::LanOnly, Policy::LanOnly, Some(Policy::LanOnly)),
        (Policy::DirectOnly, Policy::RelayOnly, None),
    ];
    for (caller, callee, runs) in cases {
        let call = ring(&mut alice.client, &mut bob.client, "bob", caller).await;
        let reply = Reply::Accept { policy: callee };
        bob.client.send(&ClientMsg::Reply { call, reply }).await;
        match runs {
            Some(policy) => {
                for c in [&mut alice.client, &mut bob.client] {
                    match c.next_msg().await {
                        ServerMsg::Start(s) => assert_eq!((s.call, s.policy), (call, policy), "{caller} + {callee}"),
                        other => panic!("expected start, got {other:?}"),
                    }
                }
                alice
                    .client
                    .send(&ClientMsg::Hangup {
                        call,
                        reason: String::new(),
                    })
                    .await;
                expect_ended(&mut bob.client, call).await;
            }
            None => {
                let allowed = Decline::Policy { allowed: callee };
                assert_eq!(expect_declined(&mut alice.client, call).await, allowed);
                assert_eq!(
                    expect_ended(&mut bob.client, call).await,
                    "alice's call asks for direct-only, and you allow only relay-only"
                );
            }
        }
        eventually("no calls left", || srv.server.calls().is_empty()).await;
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn the_incoming_call_carries_the_callers_key() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    alice
        .client
        .send(&ClientMsg::Call {
            request: 1,
            callee: "bob".into(),
            policy: Policy::RelayOnly,
        })
        .await;
    assert!(matches!(alice.client.next_msg().await, ServerMsg::Ringing { .. }));
    match bob.client.next_msg().await {
        ServerMsg::Incoming {
            caller,
            fingerprint,
            policy,
            ..
        } => {
            assert_eq!(caller, "alice");
            assert_eq!(fingerprint, alice.key);
            assert_eq!(policy, Policy::RelayOnly);
        }
        other => panic!("expected incoming, got {other:?}"),
    }
    assert_ne!(alice.key, bob.key);
    srv.shutdown().await;
}

#[tokio::test]
async fn calls_to_offline_names_to_yourself_or_past_the_limit_fail() {
    let mut config = test_config();
    config.limits.max_calls_per_peer = 2;
    let srv = Running::start(config).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    let mut carol = peer(&srv, "carol").await;
    let mut erin = peer(&srv, "erin").await;
    let a = &mut alice.client;
    assert_eq!(expect_failed(a, "dave", Policy::Auto).await, CallFailure::Offline);
    assert_eq!(expect_failed(a, "alice", Policy::Auto).await, CallFailure::SelfCall);
    ring(a, &mut bob.client, "bob", Policy::Auto).await;
    // One caller cannot fill a callee's slots: a second ring to the same callee is refused.
    assert_eq!(expect_failed(a, "bob", Policy::Auto).await, CallFailure::AlreadyRinging);
    ring(&mut carol.client, &mut bob.client, "bob", Policy::Auto).await;
    ring(a, &mut carol.client, "carol", Policy::Auto).await;
    // alice is at her limit, and so is bob.
    assert_eq!(expect_failed(a, "erin", Policy::Auto).await, CallFailure::Busy);
    assert_eq!(
        expect_failed(&mut erin.client, "bob", Policy::Auto).await,
        CallFailure::Busy
    );
    assert_eq!(srv.server.calls().len(), 3);
    srv.shutdown().await;
}

#[tokio::test]
async fn answers_from_anyone_but_the_callee_are_ignored() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    let mut carol = peer(&srv, "carol").await;
    let call = ring(&mut alice.client, &mut bob.client, "bob", Policy::Auto).await;
    alice.client.send(&ClientMsg::Answer { call, accept: true }).await;
    carol.client.send(&ClientMsg::Answer { call, accept: false }).await;
    carol
        .client
        .send(&ClientMsg::Answer {
            call: call.wrapping_add(1),
            accept: true,
        })
        .await;
    still_served(&mut alice.client).await;
    still_served(&mut carol.client).await;
    // Still ringing: bob can accept it.
    bob.client.send(&ClientMsg::Answer { call, accept: true }).await;
    assert!(matches!(alice.client.next_msg().await, ServerMsg::Start(_)));
    assert!(matches!(bob.client.next_msg().await, ServerMsg::Start(_)));
    srv.shutdown().await;
}

#[tokio::test]
async fn a_hangup_ends_the_call_for_the_other_side_with_the_reason() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    let (a, b) = (&mut alice.client, &mut bob.client);

    let call = connect(a, b, "bob").await;
    a.send(&ClientMsg::Hangup {
        call,
        reason: "see you".into(),
    })
    .await;
    assert_eq!(expect_ended(b, call).await, "alice hung up: see you");
    assert!(srv.server.calls().is_empty());

    // A ringing call withdrawn by the caller, with no reason.
    let call = ring(a, b, "bob", Policy::Auto).await;
    a.send(&ClientMsg::Hangup {
        call,
        reason: String::new(),
    })
    .await;
    assert_eq!(expect_ended(b, call).await, "alice hung up");

    // The callee hangs up; a third peer's hangup for the call is ignored.
    let call = connect(a, b, "bob").await;
    let mut carol = peer(&srv, "carol").await;
    carol
        .client
        .send(&ClientMsg::Hangup {
            call,
            reason: "x".into(),
        })
        .await;
    still_served(&mut carol.client).await;
    assert_eq!(srv.server.calls().len(), 1);
    b.send(&ClientMsg::Hangup {
        call,
        reason: "busy".into(),
    })
    .await;
    assert_eq!(expect_ended(a, call).await, "bob hung up: busy");
    srv.shutdown().await;
}

#[tokio::test]
async fn an_active_call_whose_member_leaves_is_suspended_for_the_other() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let bob_id = Identity::generate();
    let (mut bob, _) = Client::register(srv.addr, "bob", &bob_id).await;
    let call = connect(&mut alice.client, &mut bob, "bob").await;
    drop(bob); // EOF, no hang-up
    expect_suspended(&mut alice.client, call).await;
    eventually("no calls left", || srv.server.calls().is_empty()).await;
    // The server forgot the call: its relay frames go nowhere, and alice stays connected.
    alice.client.send_relay(call, b"anyone?").await;
    eventually("the frame is dropped", || counts(&srv).dropped_not_in_call == 1).await;
    still_served(&mut alice.client).await;

    // Replacing a registration suspends the old connection's active calls too.
    let (mut bob, _) = Client::register(srv.addr, "bob", &bob_id).await;
    let call = connect(&mut alice.client, &mut bob, "bob").await;
    let (bob2, _) = Client::register(srv.addr, "bob", &bob_id).await;
    expect_suspended(&mut alice.client, call).await;
    expect_replaced(&mut bob, &bob2).await;
    assert!(srv.server.calls().is_empty());
    srv.shutdown().await;
}

#[tokio::test]
async fn a_ringing_call_whose_member_leaves_ends_for_the_other() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let bob_id = Identity::generate();
    let (mut bob, _) = Client::register(srv.addr, "bob", &bob_id).await;
    let call = ring(&mut alice.client, &mut bob, "bob", Policy::Auto).await;
    drop(bob);
    assert_eq!(expect_ended(&mut alice.client, call).await, "bob left");

    // Replaced while it rings: the same.
    let (mut bob, _) = Client::register(srv.addr, "bob", &bob_id).await;
    let call = ring(&mut alice.client, &mut bob, "bob", Policy::Auto).await;
    let (bob2, _) = Client::register(srv.addr, "bob", &bob_id).await;
    assert_eq!(expect_ended(&mut alice.client, call).await, "bob left");
    expect_replaced(&mut bob, &bob2).await;

    // And the caller leaving ends it for the callee.
    let (mut bob, _) = Client::register(srv.addr, "bob", &bob_id).await;
    let call = ring(&mut alice.client, &mut bob, "bob", Policy::Auto).await;
    drop(alice);
    assert_eq!(expect_ended(&mut bob, call).await, "alice left");
    srv.shutdown().await;
}

#[tokio::test]
async fn a_member_that_resets_its_connection_is_counted_as_a_reset_not_a_stall() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    let call = connect(&mut alice.client, &mut bob.client, "bob").await;
    // Relay frames on their way to bob when he resets.
    for _ in 0..50 {
        alice.client.send_relay(call, &[0; 500]).await;
    }
    let Peer { client: bob, .. } = bob;
    socket2::SockRef::from(bob.stream.get_ref().0)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(bob); // a reset, not a FIN
    expect_suspended_after_relay(&mut alice.client, call).await;
    for _ in 0..20 {
        alice.client.send_relay(call, &[0; 500]).await;
    }
    still_served(&mut alice.client).await;
    let metrics = srv.server.metrics().render();
    assert!(
        metrics.contains("natcall_disconnects_total{reason=\"reset\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("natcall_disconnects_total{reason=\"stalled\"} 0"),
        "{metrics}"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn an_unanswered_call_ends_after_the_ring_timeout() {
    let mut config = test_config();
    config.limits.ring_timeout_ms = 300;
    let srv = Running::start(config).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    let started = tokio::time::Instant::now();
    let call = ring(&mut alice.client, &mut bob.client, "bob", Policy::Auto).await;
    assert_eq!(expect_ended(&mut alice.client, call).await, "no answer");
    assert_eq!(expect_ended(&mut bob.client, call).await, "no answer");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(srv.server.calls().is_empty());

    // An accepted call does not expire.
    let call = connect(&mut alice.client, &mut bob.client, "bob").await;
    assert!(bob.client.try_next(Duration::from_millis(500)).await.is_none());
    let sent = alice.client.send_relay(call, b"still here").await;
    assert_eq!(bob.client.expect_relay().await, sent);
    srv.shutdown().await;
}

#[tokio::test]
async fn relay_frames_cross_an_active_call_byte_for_byte() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    let (a, b) = (&mut alice.client, &mut bob.client);
    let call = connect(a, b, "bob").await;
    for i in 0..10u8 {
        let sent = a.send_relay(call, &[i; 100]).await;
        assert_eq!(b.expect_relay().await, sent);
        let sent = b.send_relay(call, &vec![i; 1000 + usize::from(i)]).await;
        assert_eq!(a.expect_relay().await, sent);
    }
    assert_eq!(counts(&srv).forwarded, 20);
    // After a hangup, late frames are dropped without closing anything.
    a.send(&ClientMsg::Hangup {
        call,
        reason: String::new(),
    })
    .await;
    assert_eq!(expect_ended(b, call).await, "alice hung up");
    b.send_relay(call, b"late").await;
    assert!(a.try_next(QUIET).await.is_none());
    still_served(b).await;
    assert_eq!(counts(&srv).dropped_not_in_call, 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn relay_frames_from_outside_the_call_are_dropped_without_closing() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    let mut mallory = peer(&srv, "mallory").await;
    let (a, b) = (&mut alice.client, &mut bob.client);

    // Before the call is accepted, nothing is forwarded.
    let call = ring(a, b, "bob", Policy::Auto).await;
    a.send_relay(call, b"too early").await;
    eventually("the early frame is dropped", || counts(&srv).dropped_not_in_call == 1).await;
    b.send(&ClientMsg::Answer { call, accept: true }).await;
    assert!(matches!(a.next_msg().await, ServerMsg::Start(_)));
    assert!(
        matches!(b.next_msg().await, ServerMsg::Start(_)),
        "no relay frame first"
    );

    // A third peer using the call's id reaches nobody and stays connected.
    let m = &mut mallory.client;
    for _ in 0..5 {
        m.send_relay(call, b"injected").await;
    }
    m.send_relay(0, b"no such call").await;
    still_served(m).await;
    assert_eq!(counts(&srv).dropped_not_in_call, 7);
    let sent = a.send_relay(call, b"genuine").await;
    assert_eq!(
        b.expect_relay().await,
        sent,
        "the first relay frame bob sees is alice's"
    );
    assert!(b.try_next(QUIET).await.is_none());
    assert!(a.try_next(QUIET).await.is_none());
    srv.shutdown().await;
}

#[tokio::test]
async fn a_relay_burst_does_not_trip_the_control_rate_limit() {
    let srv = Running::start(test_config()).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    let call = connect(&mut alice.client, &mut bob.client, "bob").await;
    const N: usize = 2000;
    let mut burst = BytesMut::new();
    for i in 0..N {
        burst.extend_from_slice(&relay_frame(call, &(i as u32).to_be_bytes()));
    }
    let b = &mut bob.client;
    let receive = async {
        let mut got = 0usize;
        let mut last = None;
        while let Some(Got::Relay(f)) = b.try_next(Duration::from_millis(500)).await {
            let seq = u32::from_be_bytes(f[f.len() - 4..].try_into().expect("4 bytes"));
            assert!(last.is_none_or(|l| seq > l), "in order");
            last = Some(seq);
            got += 1;
        }
        got
    };
    let send = async {
        alice.client.send_raw(&burst).await;
        // Control frames still flow: alice was not shed for 10x her control rate in frames.
        still_served(&mut alice.client).await;
    };
    let (got, ()) = tokio::join!(receive, send);
    let c = counts(&srv);
    assert_eq!(c.dropped_rate, 0);
    assert_eq!(c.dropped_not_in_call, 0);
    assert_eq!(c.forwarded as usize, N);
    assert_eq!(got, N, "control-class relay frames are never dropped");
    srv.shutdown().await;
}

#[tokio::test]
async fn relay_frames_over_the_relay_rate_are_dropped_not_shed() {
    let mut config: Config = test_config();
    config.limits.relay_frames_per_sec = 100;
    let srv = Running::start(config).await;
    let mut alice = peer(&srv, "alice").await;
    let mut bob = peer(&srv, "bob").await;
    let call = connect(&mut alice.client, &mut bob.client, "bob").await;
    let mut burst = BytesMut::new();
    for _ in 0..300 {
        burst.extend_from_slice(&relay_frame(call, b"x"));
    }
    alice.client.send_raw(&burst).await;
    still_served(&mut alice.client).await;
    let c = counts(&srv);
    assert!(c.dropped_rate >= 150, "{c:?}");
    assert_eq!(c.forwarded + c.dropped_rate, 300, "{c:?}");
    let mut got = 0;
    while let Some(Got::Relay(_)) = bob.client.try_next(QUIET).await {
        got += 1;
    }
    assert_eq!(got, c.forwarded);
    srv.shutdown().await;
}
