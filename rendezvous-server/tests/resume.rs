//! Resuming calls, in-process on 127.0.0.1:0: both members' `Resume` with one proof make the
//! call active again under a fresh id; anything else waits alone and fails after
//! `limits.resume_timeout_ms`; waiting resumes count against the call limit, leave with their
//! connection, and are withdrawn by a hang-up.

mod common;

use std::time::Duration;

use common::{Client, Got, Identity, Running, eventually, test_config};
use natcall_proto::control::{CallFailure, ClientMsg, Policy, ServerMsg};
use natcall_rendezvous::Config;

/// The resume timeout of these tests.
const TIMEOUT: Duration = Duration::from_millis(300);

fn config() -> Config {
    let mut c = test_config();
    c.limits.resume_timeout_ms = TIMEOUT.as_millis() as u64;
    c
}

async fn registered(srv: &Running, name: &str, id: &Identity) -> Client {
    Client::register(srv.addr, name, id).await.0
}

/// `a` calls `b` (named `b_name`), `b` accepts; returns the call id.
async fn connect(a: &mut Client, b: &mut Client, b_name: &str) -> u32 {
    a.send(&ClientMsg::Call {
        request: 1,
        callee: b_name.into(),
        policy: Policy::Auto,
    })
    .await;
    let ServerMsg::Ringing { call, .. } = a.next_msg().await else {
        panic!("expected ringing")
    };
    assert!(matches!(b.next_msg().await, ServerMsg::Incoming { .. }));
    b.send(&ClientMsg::Answer { call, accept: true }).await;
    for c in [a, b] {
        assert!(matches!(c.next_msg().await, ServerMsg::Start(s) if s.call == call));
    }
    call
}

async fn resume(c: &mut Client, call: u32, peer: &str, proof: [u8; 32]) {
    c.send(&ClientMsg::Resume {
        call,
        peer: peer.into(),
        proof,
    })
    .await;
}

/// The next message is `Resumed` for `call`; returns the new id.
async fn expect_resumed(c: &mut Client, call: u32) -> u32 {
    match c.next_msg().await {
        ServerMsg::Resumed { call: old, id } => {
            assert_eq!(old, call, "each member gets back the id it sent");
            assert_ne!(id, 0);
            id
        }
        other => panic!("expected resumed, got {other:?}"),
    }
}

/// The next message is `ResumeFailed` for `call`; returns the reason.
async fn expect_resume_failed(c: &mut Client, call: u32) -> String {
    match c.next_msg().await {
        ServerMsg::ResumeFailed { call: old, reason } => {
            assert_eq!(old, call);
            reason
        }
        other => panic!("expected resume failed, got {other:?}"),
    }
}

/// Nothing but pings arrives for a while.
async fn quiet(c: &mut Client, within: Duration) {
    if let Some(got) = c.try_next(within).await {
        panic!("expected nothing, got {got:?}");
    }
}

fn metric(srv: &Running, line: &str) -> bool {
    srv.server.metrics().render().lines().any(|l| l == line)
}

#[tokio::test]
async fn both_members_resuming_with_one_proof_make_the_call_active_under_a_fresh_id() {
    let srv = Running::start(config()).await;
    let (alice_id, bob_id, carol_id) = (Identity::generate(), Identity::generate(), Identity::generate());
    let mut alice = registered(&srv, "alice", &alice_id).await;
    let mut bob = registered(&srv, "bob", &bob_id).await;
    let old = connect(&mut alice, &mut bob, "bob").await;
    drop(bob);
    assert!(matches!(alice.next_msg().await, ServerMsg::CallSuspended { call } if call == old));

    // Another call on this server whose id equals the one bob brings back (as ids of a
    // restarted server may): the `call` of a Resume is only echoed, never the new id.
    let mut carol = registered(&srv, "carol", &carol_id).await;
    let live = connect(&mut alice, &mut carol, "carol").await;

    let mut bob = registered(&srv, "bob", &bob_id).await;
    let proof = [42; 32];
    resume(&mut alice, old, "bob", proof).await;
    eventually("alice's resume waits", || srv.server.calls().waiting_resumes() == 1).await;
    assert!(metric(&srv, "natcall_pending_resumes 1"));
    quiet(&mut alice, Duration::from_millis(50)).await;
    resume(&mut bob, live, "alice", proof).await;
    let id = expect_resumed(&mut alice, old).await;
    assert_eq!(expect_resumed(&mut bob, live).await, id, "one new id for both");
    assert_ne!(id, live, "a fresh id, not one in use");
    assert_eq!(srv.server.calls().waiting_resumes(), 0);
    assert_eq!(srv.server.calls().len(), 2);
    assert!(metric(&srv, "natcall_calls_resumed_total 1"));
    assert!(metric(&srv, "natcall_pending_resumes 0"));

    // Relay frames flow under the new id between the two, byte for byte.
    for i in 0..5u8 {
        let sent = alice.send_relay(id, &[i; 300]).await;
        assert_eq!(bob.expect_relay().await, sent);
        let sent = bob.send_relay(id, &[i; 700]).await;
        assert_eq!(alice.expect_relay().await, sent);
    }
    // The call with carol is untouched; the old id reaches nobody from bob.
    let sent = carol.send_relay(live, b"still carol").await;
    assert_eq!(alice.expect_relay().await, sent);
    bob.send_relay(live, b"not bob's call").await;
    quiet(&mut carol, Duration::from_millis(100)).await;
    quiet(&mut alice, Duration::from_millis(100)).await;
    // A resumed call is a call like any other: it ends with a hang-up.
    bob.send(&ClientMsg::Hangup {
        call: id,
        reason: "bye".into(),
    })
    .await;
    assert!(
        matches!(alice.next_msg().await, ServerMsg::CallEnded { call, reason } if call == id && reason == "bob hung up: bye")
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn a_wrong_proof_or_the_wrong_peer_is_not_matched_and_each_fails_after_the_timeout() {
    let srv = Running::start(config()).await;
    let mut alice = registered(&srv, "alice", &Identity::generate()).await;
    let mut bob = registered(&srv, "bob", &Identity::generate()).await;
    let mut carol = registered(&srv, "carol", &Identity::generate()).await;
    let started = tokio::time::Instant::now();
    resume(&mut alice, 7, "bob", [1; 32]).await;
    resume(&mut bob, 7, "alice", [2; 32]).await; // another proof
    resume(&mut carol, 7, "alice", [1; 32]).await; // alice's proof, but alice named bob
    eventually("three resumes wait", || srv.server.calls().waiting_resumes() == 3).await;
    assert_eq!(
        expect_resume_failed(&mut alice, 7).await,
        "bob did not resume the call within 0.3 s"
    );
    assert!(started.elapsed() >= TIMEOUT, "not before the timeout");
    assert_eq!(
        expect_resume_failed(&mut bob, 7).await,
        "alice did not resume the call within 0.3 s"
    );
    assert_eq!(
        expect_resume_failed(&mut carol, 7).await,
        "alice did not resume the call within 0.3 s"
    );
    assert!(srv.server.calls().is_empty());
    assert_eq!(srv.server.calls().waiting_resumes(), 0);
    assert!(metric(&srv, "natcall_resumes_failed_total 3"));
    assert!(metric(&srv, "natcall_calls_resumed_total 0"));
    srv.shutdown().await;
}

#[tokio::test]
async fn a_registered_peer_with_a_wrong_proof_cannot_disturb_a_waiting_resume() {
    let srv = Running::start(config()).await;
    let mut alice = registered(&srv, "alice", &Identity::generate()).await;
    let mut mallory = registered(&srv, "mallory", &Identity::generate()).await;
    let bob_id = Identity::generate();
    let proof = [9; 32];
    resume(&mut alice, 5, "bob", proof).await;
    // Bob's name with a guessed proof, from bob's own key (a second device, say), and
    // mallory naming alice with guesses and with bob's name.
    let mut bob = registered(&srv, "bob", &bob_id).await;
    resume(&mut bob, 5, "alice", [0; 32]).await;
    resume(&mut mallory, 5, "alice", [0; 32]).await;
    resume(&mut mallory, 6, "bob", proof).await;
    eventually("four resumes wait", || srv.server.calls().waiting_resumes() == 4).await;
    quiet(&mut alice, Duration::from_millis(50)).await;
    // The real one still matches.
    resume(&mut bob, 8, "alice", proof).await;
    let id = expect_resumed(&mut alice, 5).await;
    assert_eq!(expect_resumed(&mut bob, 8).await, id);
    // The guesses fail on their own.
    assert!(
        expect_resume_failed(&mut bob, 5)
            .await
            .starts_with("alice did not resume")
    );
    let mut reasons = vec![
        expect_resume_failed(&mut mallory, 5).await,
        expect_resume_failed(&mut mallory, 6).await,
    ];
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "alice did not resume the call within 0.3 s",
            "bob did not resume the call within 0.3 s"
        ]
    );
    quiet(&mut alice, Duration::from_millis(100)).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn a_waiting_resume_leaves_with_its_connection() {
    let srv = Running::start(config()).await;
    let alice_id = Identity::generate();
    let mut alice = registered(&srv, "alice", &alice_id).await;
    let mut bob = registered(&srv, "bob", &Identity::generate()).await;
    resume(&mut alice, 3, "bob", [3; 32]).await;
    eventually("alice's resume waits", || srv.server.calls().waiting_resumes() == 1).await;
    drop(alice);
    eventually("gone with alice's connection", || {
        srv.server.calls().waiting_resumes() == 0
    })
    .await;
    assert!(metric(&srv, "natcall_pending_resumes 0"));
    // Alice is back on a new connection, but her old resume is gone: bob's waits alone.
    let mut alice = registered(&srv, "alice", &alice_id).await;
    resume(&mut bob, 3, "alice", [3; 32]).await;
    assert!(
        expect_resume_failed(&mut bob, 3)
            .await
            .starts_with("alice did not resume")
    );
    quiet(&mut alice, Duration::from_millis(50)).await;

    // A replaced registration drops its waiting resumes at once.
    resume(&mut alice, 4, "bob", [4; 32]).await;
    eventually("alice's resume waits", || srv.server.calls().waiting_resumes() == 1).await;
    let _alice2 = registered(&srv, "alice", &alice_id).await;
    assert_eq!(srv.server.calls().waiting_resumes(), 0);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_hangup_withdraws_a_waiting_resume() {
    let srv = Running::start(config()).await;
    let mut alice = registered(&srv, "alice", &Identity::generate()).await;
    let mut bob = registered(&srv, "bob", &Identity::generate()).await;
    resume(&mut alice, 11, "bob", [5; 32]).await;
    eventually("alice's resume waits", || srv.server.calls().waiting_resumes() == 1).await;
    alice
        .send(&ClientMsg::Hangup {
            call: 11,
            reason: String::new(),
        })
        .await;
    eventually("withdrawn", || srv.server.calls().waiting_resumes() == 0).await;
    resume(&mut bob, 11, "alice", [5; 32]).await;
    assert!(
        expect_resume_failed(&mut bob, 11)
            .await
            .starts_with("alice did not resume")
    );
    // Withdrawn is not failed: alice hears nothing.
    quiet(&mut alice, Duration::from_millis(50)).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn waiting_and_resumed_calls_count_against_the_call_limit() {
    let mut config = config();
    config.limits.max_calls_per_peer = 2;
    config.limits.resume_timeout_ms = 10_000;
    let srv = Running::start(config).await;
    let mut alice = registered(&srv, "alice", &Identity::generate()).await;
    let mut bob = registered(&srv, "bob", &Identity::generate()).await;
    let mut carol = registered(&srv, "carol", &Identity::generate()).await;
    let mut dave = registered(&srv, "dave", &Identity::generate()).await;
    connect(&mut alice, &mut carol, "carol").await;
    resume(&mut alice, 1, "bob", [1; 32]).await;
    eventually("alice's resume waits", || srv.server.calls().waiting_resumes() == 1).await;
    // Alice is at her limit: one active call, one waiting resume.
    resume(&mut alice, 2, "dave", [2; 32]).await;
    assert_eq!(
        expect_resume_failed(&mut alice, 2).await,
        "alice is already in 2 calls (ringing, active or waiting to resume), the most this server allows"
    );
    alice
        .send(&ClientMsg::Call {
            request: 9,
            callee: "dave".into(),
            policy: Policy::Auto,
        })
        .await;
    assert!(matches!(
        alice.next_msg().await,
        ServerMsg::CallFailed {
            request: 9,
            failure: CallFailure::Busy,
            ..
        }
    ));
    // Bob at his limit cannot complete the match; alice's resume is still there for later.
    connect(&mut bob, &mut dave, "dave").await;
    resume(&mut bob, 3, "carol", [3; 32]).await;
    eventually("bob's resume waits", || srv.server.calls().waiting_resumes() == 2).await;
    resume(&mut bob, 1, "alice", [1; 32]).await;
    assert!(
        expect_resume_failed(&mut bob, 1)
            .await
            .starts_with("bob is already in 2 calls")
    );
    assert_eq!(srv.server.calls().waiting_resumes(), 2);
    // Once bob withdraws one, the match goes through.
    bob.send(&ClientMsg::Hangup {
        call: 3,
        reason: String::new(),
    })
    .await;
    resume(&mut bob, 1, "alice", [1; 32]).await;
    let id = expect_resumed(&mut alice, 1).await;
    assert_eq!(expect_resumed(&mut bob, 1).await, id);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_resume_naming_yourself_or_no_possible_name_fails_at_once() {
    let srv = Running::start(config()).await;
    let mut alice = registered(&srv, "alice", &Identity::generate()).await;
    resume(&mut alice, 1, "alice", [1; 32]).await;
    assert_eq!(
        expect_resume_failed(&mut alice, 1).await,
        "a call cannot be resumed with yourself"
    );
    resume(&mut alice, 2, &"x".repeat(1000), [1; 32]).await;
    assert!(
        expect_resume_failed(&mut alice, 2)
            .await
            .starts_with("no peer can have that name")
    );
    assert_eq!(srv.server.calls().waiting_resumes(), 0);
    // Before registering, a Resume is refused like any request.
    let mut anon = Client::hello(srv.addr).await;
    resume(&mut anon, 1, "alice", [1; 32]).await;
    match anon.next().await {
        Got::Error(e) => assert_eq!(e.code, natcall_proto::frame::ErrorCode::NotRegistered),
        other => panic!("expected an error frame, got {other:?}"),
    }
    srv.shutdown().await;
}
