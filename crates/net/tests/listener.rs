//! What a listener does with incoming calls — declines one as busy or declined, accepts under
//! its own policy — and what its callers hear; and one session per name: a second session of
//! the same peer replaces the first for good.

mod common;

use std::time::{Duration, Instant};

use common::{config, peer, server};
use natcall::{Call, EndReason, Endpoint, Error, Identity, Path, Policy, ServerState};

/// How soon a caller hears a decline.
const AT_ONCE: Duration = Duration::from_secs(1);

/// `caller` calls `callee` under `policy`; the error it gets, and how long that took.
async fn refused(caller: &Endpoint, callee: &str, policy: Policy) -> (Error, Duration) {
    let started = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(10), caller.call(callee, policy))
        .await
        .expect("the caller hears back")
        .expect_err("the call is refused");
    (e, started.elapsed())
}

/// Sends a line and waits for the other side to read it.
async fn chat(from: &Call, to: &Call, line: &str) {
    from.send_chat(line).await.expect("sends");
    let got = tokio::time::timeout(Duration::from_secs(10), to.recv_chat())
        .await
        .expect("in time");
    assert_eq!(got.expect("reads").as_deref(), Some(line));
}

#[tokio::test]
async fn a_listener_in_a_call_answers_busy_and_the_second_caller_hears_it_at_once() {
    let lab = server().await;
    let (alice, bob, carol) = (
        peer(&lab, "alice").await,
        peer(&lab, "bob").await,
        peer(&lab, "carol").await,
    );
    let listener = tokio::spawn(async move {
        let first = bob.accept().await.expect("offer").accept().await.expect("connects");
        let second = bob.accept().await.expect("second offer");
        assert_eq!(second.caller(), "carol");
        second.busy();
        first
    });
    let with_bob = alice.call("bob", Policy::Auto).await.expect("connects");
    let (e, took) = refused(&carol, "bob", Policy::Auto).await;
    assert!(matches!(&e, Error::Busy(who) if who == "bob"), "{e:?}");
    assert_eq!(e.to_string(), "bob is busy (in another call)");
    assert!(took < AT_ONCE, "busy after {took:?}");
    // The first call goes on.
    let bobs_call = listener.await.expect("listener");
    chat(&with_bob, &bobs_call, "still here").await;
    with_bob.hangup("bye");
}

#[tokio::test]
async fn a_declined_call_says_so_at_once() {
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    let listener = tokio::spawn(async move {
        bob.accept().await.expect("offer").reject().expect("rejects");
        // An offer dropped unanswered is declined too.
        drop(bob.accept().await.expect("offer"));
    });
    for _ in 0..2 {
        let (e, took) = refused(&alice, "bob", Policy::Auto).await;
        assert!(matches!(e, Error::Ended(_)), "{e:?}");
        assert_eq!(e.to_string(), "bob declined");
        assert!(took < AT_ONCE, "declined after {took:?}");
    }
    listener.await.expect("listener");
}

#[tokio::test]
async fn a_relay_only_listener_takes_an_auto_call_on_the_relay() {
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    let listener = tokio::spawn(async move {
        let offer = bob.accept().await.expect("offer");
        assert_eq!(offer.policy(), Policy::Auto, "the caller's policy");
        offer.accept_with(Policy::RelayOnly).await.expect("connects")
    });
    let call = alice.call("bob", Policy::Auto).await.expect("connects");
    let bobs_call = listener.await.expect("listener");
    // On loopback an auto call finds the LAN path within milliseconds; this one never looks.
    for i in 0..5 {
        chat(&call, &bobs_call, &format!("relayed {i}")).await;
    }
    for c in [&call, &bobs_call] {
        let report = c.report();
        assert_eq!(report.policy, "relay-only");
        assert_eq!(c.path(), Path::Relay);
        assert!(
            report.path_changes.iter().all(|p| p.to == Path::Relay),
            "{:?}",
            report.path_changes
        );
    }
    call.hangup("bye");
}

#[tokio::test]
async fn incompatible_policies_decline_the_call_saying_what_the_listener_allows() {
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    let listener = tokio::spawn(async move {
        let offer = bob.accept().await.expect("offer");
        offer.accept_with(Policy::RelayOnly).await.expect_err("declined")
    });
    let (e, took) = refused(&alice, "bob", Policy::DirectOnly).await;
    assert!(matches!(e, Error::NoPath(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "bob allows only relay-only calls, and this call asked for direct-only"
    );
    assert!(took < AT_ONCE, "declined after {took:?}");
    let theirs = listener.await.expect("listener");
    assert!(matches!(theirs, Error::NoPath(_)), "{theirs:?}");
    assert_eq!(
        theirs.to_string(),
        "alice asked for a direct-only call, and this side allows only relay-only"
    );
}

/// Two processes with one identity and name: the second takes over, the first stops for good
/// (no registering again, which would take the name back and start a tug of war), its calls
/// end, and its listener loop ends with one clear error.
#[tokio::test]
async fn a_second_session_of_a_peer_replaces_the_first_for_good() {
    let lab = server().await;
    let identity = Identity::generate().expect("identity");
    let first = Endpoint::bind(config(&lab, "dave", identity.clone()))
        .await
        .expect("registers");
    let carol = peer(&lab, "carol").await;
    // The first session is in a call when the second comes.
    let answering = {
        let first = first.clone();
        tokio::spawn(async move { first.accept().await.expect("offer").accept().await.expect("connects") })
    };
    let carols_call = carol.call("dave", Policy::Auto).await.expect("connects");
    let first_call = answering.await.expect("first session");

    let second = Endpoint::bind(config(&lab, "dave", identity)).await.expect("registers");
    let registered = lab.server.registry().peer("dave").expect("online").conn_id;
    let gone = tokio::time::timeout(Duration::from_secs(2), first.server_changed(&ServerState::Up))
        .await
        .expect("the first session hears of it at once");
    let ServerState::Gone(why) = gone else {
        panic!("expected the first session gone, got {gone:?}")
    };
    assert!(
        why.starts_with("another natcall session registered as dave (from 127.0.0.1:")
            && why.ends_with(") and replaced this one"),
        "{why}"
    );
    match tokio::time::timeout(AT_ONCE, first.accept()).await.expect("at once") {
        Err(Error::Replaced(r)) => assert_eq!(r, why),
        Err(e) => panic!("expected Replaced, got {e:?}"),
        Ok(offer) => panic!("an offer from {} reached a replaced session", offer.caller()),
    }
    // Its call ended, on both sides.
    let ends = tokio::time::timeout(Duration::from_secs(3), async {
        tokio::join!(first_call.ended(), carols_call.ended())
    })
    .await
    .expect("the call ends on both sides");
    assert_eq!(ends.0, EndReason::Lost(why.clone()));
    assert_eq!(
        ends.1,
        EndReason::Peer("replaced by a newer session of the same peer".into())
    );

    // The second session keeps the name: nothing flaps for a few seconds...
    let quiet = Duration::from_secs(3);
    let still_gone = ServerState::Gone(why.clone());
    let (a, b) = tokio::join!(
        tokio::time::timeout(quiet, first.server_changed(&still_gone)),
        tokio::time::timeout(quiet, second.server_changed(&ServerState::Up)),
    );
    assert!(a.is_err(), "the first session changed state again: {a:?}");
    assert!(b.is_err(), "the second session lost its registration: {b:?}");
    assert_eq!(
        lab.server.registry().peer("dave").map(|p| p.conn_id),
        Some(registered),
        "the server saw no registration after the second one"
    );
    // ... and it takes calls.
    let listener = tokio::spawn(async move { second.accept().await.expect("offer").accept().await.expect("connects") });
    let call = carol
        .call("dave", Policy::Auto)
        .await
        .expect("the second session answers");
    let daves = listener.await.expect("second session");
    chat(&call, &daves, "hello, other dave").await;
    call.hangup("bye");
}

/// Replacement is final, but a server going away is not a replacement: a drained and restarted
/// server (same key, same port) is registered with again, and the session takes calls.
#[tokio::test]
async fn a_restarted_server_is_registered_with_again() {
    use natcall_rendezvous::{Config, Sockets};
    let state = tempfile::tempdir().expect("state dir");
    let config = || Config {
        state_dir: Some(state.path().to_owned()),
        ..Config::default()
    };
    let lab = common::start(config()).await;
    let (addr, key) = (lab.addr, lab.key);
    let mut ep_config = common::config(&lab, "erin", Identity::generate().expect("identity"));
    ep_config.server_trust = natcall::ServerTrust::pinned(addr.to_string(), key);
    let erin = Endpoint::bind(ep_config).await.expect("registers");
    drop(lab); // drains: erin gets GoingAway
    let lost = tokio::time::timeout(Duration::from_secs(5), erin.server_changed(&ServerState::Up))
        .await
        .expect("erin notices");
    assert!(matches!(lost, ServerState::Reconnecting(_)), "{lost:?}");
    let sockets = loop {
        match Sockets::bind(addr) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let lab = common::start_on(sockets, config());
    let back = tokio::time::timeout(Duration::from_secs(10), erin.server_changed(&lost))
        .await
        .expect("erin registers again");
    assert_eq!(back, ServerState::Up);
    let frank = peer(&lab, "frank").await;
    let listener = tokio::spawn(async move { erin.accept().await.expect("offer").accept().await.expect("connects") });
    let call = frank.call("erin", Policy::Auto).await.expect("connects");
    let erins = listener.await.expect("erin");
    chat(&call, &erins, "welcome back").await;
    call.hangup("bye");
}
