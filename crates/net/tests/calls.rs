//! Calls between two endpoints and an in-process rendezvous server on loopback.

mod common;

use std::time::Duration;

use common::{peer, server};
use natcall::{EndReason, Endpoint, EndpointConfig, Error, Identity, Path, Policy};

/// bob accepts one call, echoes chat lines back with a prefix until alice finishes.
fn echo(bob: Endpoint) -> tokio::task::JoinHandle<(Path, EndReason)> {
    tokio::spawn(async move {
        let call = bob.accept().await.expect("offer").accept().await.expect("connects");
        while let Ok(Some(line)) = call.recv_chat().await {
            call.send_chat(&format!("echo {line}")).await.expect("sends");
        }
        let end = call.ended().await;
        (call.path(), end)
    })
}

async fn chat_round(call: &natcall::Call, text: &str) {
    call.send_chat(text).await.expect("sends");
    let back = tokio::time::timeout(Duration::from_secs(10), call.recv_chat())
        .await
        .expect("in time");
    assert_eq!(back.expect("reads").as_deref(), Some(format!("echo {text}").as_str()));
}

#[tokio::test]
async fn an_auto_call_on_one_host_ends_up_on_the_lan_path_and_chats() {
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    let bob_task = echo(bob);
    let call = alice.call("bob", Policy::Auto).await.expect("connects");
    chat_round(&call, "one").await;
    let mut path = call.watch_path();
    tokio::time::timeout(Duration::from_secs(5), path.wait_for(|p| *p == Path::Lan))
        .await
        .expect("LAN in time");
    assert_eq!(call.path(), Path::Lan, "same public IP: the LAN candidate wins");
    chat_round(&call, "two").await;
    let report = call.report();
    // Auto does not wait for the checks: it connects on the relay, unless the LAN check won
    // the race with the QUIC handshake (sub-millisecond on loopback). The core's tests show
    // the relay-first start in virtual time, where the race does not exist.
    assert!(
        matches!(report.path_at_connect, Path::Relay | Path::Lan),
        "{:?}",
        report.path_at_connect
    );
    assert!(report.path_changes.iter().any(|c| c.to == Path::Lan));
    call.finish_chat().await.expect("acked");
    call.hangup("bye");
    let (_, end) = bob_task.await.expect("bob");
    assert_eq!(end, EndReason::Peer("bye".into()));
}

#[tokio::test]
async fn direct_only_connects_over_the_public_address_and_never_the_relay() {
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    let bob_task = echo(bob.clone());
    let call = alice.call("bob", Policy::DirectOnly).await.expect("connects");
    assert_eq!(call.path(), Path::Direct);
    chat_round(&call, "direct").await;
    let report = call.report();
    assert!(
        report.path_changes.iter().all(|c| c.to != Path::Relay),
        "{:?}",
        report.path_changes
    );
    assert_eq!(report.path_changes.last().and_then(|c| c.remote), bob.public_addr());
    call.hangup("bye");
    bob_task.await.expect("bob");
}

#[tokio::test]
async fn relay_only_carries_the_chat_through_the_server() {
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    let bob_task = echo(bob);
    let call = alice.call("bob", Policy::RelayOnly).await.expect("connects");
    for i in 0..20 {
        chat_round(&call, &format!("relayed {i}")).await;
    }
    assert_eq!(call.path(), Path::Relay);
    assert_eq!(call.report().path_changes.len(), 1, "connecting → relay, nothing else");
    call.hangup("bye");
    bob_task.await.expect("bob");
}

/// What a CLI caller does at the end: hang up and close the endpoint at once. The relayed QUIC
/// close and the hang-up behind it must reach the server before the control connection closes,
/// or the server takes alice's leaving for a lost connection, suspends the call, and bob sits
/// in it until QUIC's idle timeout.
#[tokio::test]
async fn a_relayed_hang_up_then_close_reaches_the_peer_at_once() {
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    let bob_task = echo(bob);
    let call = alice.call("bob", Policy::RelayOnly).await.expect("connects");
    chat_round(&call, "one round").await;
    let started = std::time::Instant::now();
    call.hangup("done");
    alice.close().await;
    let (path, end) = tokio::time::timeout(Duration::from_secs(3), bob_task)
        .await
        .expect("bob's call ends within 3 s, not at the idle timeout")
        .expect("bob");
    assert_eq!(path, Path::Relay);
    assert_eq!(end, EndReason::Peer("done".into()), "after {:?}", started.elapsed());
}

#[tokio::test]
async fn a_dead_direct_path_falls_back_to_the_relay_mid_call() {
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    let bob_task = echo(bob);
    let call = alice.call("bob", Policy::Auto).await.expect("connects");
    let mut path = call.watch_path();
    tokio::time::timeout(Duration::from_secs(5), path.wait_for(|p| *p == Path::Lan))
        .await
        .expect("LAN");
    chat_round(&call, "before").await;
    alice.simulate_dead_udp(true);
    tokio::time::timeout(Duration::from_secs(10), path.wait_for(|p| *p == Path::Relay))
        .await
        .expect("falls back to the relay within 10 s");
    chat_round(&call, "after").await;
    call.hangup("bye");
    bob_task.await.expect("bob");
}

#[tokio::test]
async fn direct_only_without_a_working_udp_path_fails_with_the_reason() {
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    tokio::spawn(async move {
        let offer = bob.accept().await.expect("offer");
        let _ = offer.accept().await;
    });
    alice.simulate_dead_udp(true);
    let started = std::time::Instant::now();
    let e = alice.call("bob", Policy::DirectOnly).await.expect_err("no direct path");
    assert!(matches!(e, Error::NoPath(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "no direct path to bob answered within 5s, and the direct-only policy forbids the relay"
    );
    assert!(started.elapsed() >= Duration::from_secs(5), "the whole budget is tried");
}

#[tokio::test]
async fn calling_an_offline_name_is_a_clear_error() {
    let lab = server().await;
    let alice = peer(&lab, "alice").await;
    let e = alice.call("nobody", Policy::Auto).await.expect_err("offline");
    assert!(matches!(e, Error::Offline(_)));
    assert_eq!(e.to_string(), "nobody is not online");
}

#[tokio::test]
async fn a_closed_endpoint_leaves_the_server_at_once() {
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    bob.close().await;
    // The server saw bob's half-close and closed its side: bob is offline for everyone at once
    // (not after an idle timeout).
    let e = alice.call("bob", Policy::Auto).await.expect_err("offline");
    assert!(matches!(e, Error::Offline(_)), "{e}");
}

#[tokio::test]
async fn an_unreachable_server_is_a_sentence() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binds")
        .local_addr()
        .expect("addr");
    let config = EndpointConfig::new(free, "alice", Identity::generate().expect("identity"));
    let e = Endpoint::bind(config).await.expect_err("nothing listens");
    let text = e.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot reach the rendezvous server at {free}: Connection refused"
        )),
        "{text}"
    );
    assert!(text.ends_with("(is it running? check --server)"), "{text}");
}

/// Media frames of many sizes cross the call intact (sealed, cut into ≤ 512-byte packets,
/// reassembled) on the direct path and over the relay.
#[tokio::test]
async fn media_frames_arrive_intact_on_the_direct_path_and_over_the_relay() {
    use natcall::{Frame, Track};
    let lab = server().await;
    for (i, policy) in [Policy::DirectOnly, Policy::RelayOnly].into_iter().enumerate() {
        let (alice, bob) = (
            peer(&lab, &format!("alice{i}")).await,
            peer(&lab, &format!("bob{i}")).await,
        );
        let bob_task = tokio::spawn(async move {
            let call = bob.accept().await.expect("offer").accept().await.expect("connects");
            let mut got = Vec::new();
            while got.len() < 4 {
                let f = tokio::time::timeout(Duration::from_secs(10), call.recv_frame())
                    .await
                    .expect("in time");
                let Some(f) = f else {
                    panic!(
                        "media ended after {:?}; stats {:?}",
                        got.iter()
                            .map(|f: &natcall::ReceivedFrame| (f.frame_id, f.data.len()))
                            .collect::<Vec<_>>(),
                        call.media_report()
                    );
                };
                got.push(f);
            }
            let report = call.report();
            call.ended().await;
            (got, report)
        });
        let call = alice.call(&format!("bob{i}"), policy).await.expect("connects");
        // 10 kB: 290 ms at the rate controller's 300 kbit/s start, under the 400 ms the sender
        // lets video queue.
        let sizes = [0usize, 1, 477, 10_000];
        for (n, size) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..*size).map(|b| (b * 7 + n) as u8).collect();
            let frame = if n == 0 {
                Frame::key(n as u32 * 33, data)
            } else {
                Frame::new(n as u32 * 33, data)
            };
            call.send_frame(Track::VIDEO, frame).await.expect("queued");
        }
        let (got, _) = {
            let done = bob_task;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            call.hangup("bye");
            done.await.expect("bob")
        };
        assert_eq!(got.len(), 4, "{policy:?}");
        for (n, f) in got.iter().enumerate() {
            assert_eq!(f.track, Track::VIDEO);
            let want: Vec<u8> = (0..sizes[n]).map(|b| (b * 7 + n) as u8).collect();
            assert!(
                f.data == want,
                "{policy:?}: frame {n} of {} bytes arrived different",
                sizes[n]
            );
        }
    }
}

/// A byte stream sent with `send_stream` far faster than the path's pace (2 MB at the 2 Mbit/s
/// default would take 8 s; the source offers it at once) is slowed, not cut: on the direct path
/// every piece arrives, in order, including the ones still in bob's jitter buffer when alice
/// hangs up right after `flush_media`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_paced_not_cut_and_its_tail_survives_the_hang_up() {
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    let bob_task = tokio::spawn(async move {
        let call = bob.accept().await.expect("offer").accept().await.expect("connects");
        let mut got = Vec::new();
        while let Some(f) = call.recv_frame().await {
            got.extend_from_slice(&f.data);
        }
        (got, call.media_report())
    });
    let call = alice.call("bob", Policy::DirectOnly).await.expect("connects");
    call.set_media_rate(20_000_000).await.expect("rate");
    let stream: Vec<u8> = (0..400_000u32).flat_map(|i| i.to_be_bytes()).collect();
    for piece in stream.chunks(1434) {
        call.send_stream(natcall::Track::VIDEO, piece.to_vec())
            .await
            .expect("handed over");
    }
    call.flush_media().await.expect("flushed");
    // No linger: what bob's jitter buffer holds when the call ends must still reach him.
    tokio::time::sleep(Duration::from_millis(20)).await;
    call.hangup("sent everything");
    let (got, report) = tokio::time::timeout(Duration::from_secs(20), bob_task)
        .await
        .expect("bob's media ends with the call")
        .expect("bob");
    let sent = call.media_report();
    assert_eq!(sent.video.sent.as_ref().map(|s| s.frames_dropped), Some(0), "{sent:?}");
    assert_eq!(got.len(), stream.len(), "bob: {report:?}");
    assert!(got == stream, "the stream arrived altered");
}

/// A relay upload saturated for 10 s (a lossless stream as fast as the relay takes it) must not
/// starve the control lane: alice's health checks for what bob relays to her keep flowing, so
/// bob's audio keeps arriving, nobody is disconnected as stalled, and chat still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_relay_upload_never_delays_the_health_checks() {
    use natcall::{Frame, ServerState, Track};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let lab = server().await;
    let (alice, bob) = (peer(&lab, "alice").await, peer(&lab, "bob").await);
    let bob_task = tokio::spawn({
        let bob = bob.clone();
        async move {
            let call = Arc::new(bob.accept().await.expect("offer").accept().await.expect("connects"));
            // bob talks to alice: 50 audio frames a second, relayed to her.
            let talker = {
                let call = call.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(20));
                    for n in 0u32..600 {
                        tick.tick().await;
                        if call
                            .send_frame(Track::AUDIO, Frame::new(n * 20, vec![7; 80]))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                })
            };
            while let Ok(Some(line)) = call.recv_chat().await {
                call.send_chat(&format!("echo {line}")).await.expect("sends");
            }
            talker.abort();
            call.ended().await
        }
    });
    let call = Arc::new(alice.call("bob", Policy::RelayOnly).await.expect("connects"));
    call.set_media_rate(400_000_000).await.expect("rate");
    let heard = Arc::new(AtomicU64::new(0));
    let listener = {
        let (call, heard) = (call.clone(), heard.clone());
        tokio::spawn(async move {
            while let Some(f) = call.recv_frame().await {
                if f.track == Track::AUDIO {
                    heard.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let uploaded = Arc::new(AtomicU64::new(0));
    let uploader = {
        let (call, uploaded) = (call.clone(), uploaded.clone());
        tokio::spawn(async move {
            let piece = vec![0x55u8; 16 * 1024];
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < until {
                if call.send_stream(Track::VIDEO, piece.clone()).await.is_err() {
                    return;
                }
                uploaded.fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
        })
    };
    let started = heard.load(Ordering::Relaxed);
    uploader.await.expect("uploader");
    let during = heard.load(Ordering::Relaxed) - started;
    let sent = uploaded.load(Ordering::Relaxed);
    assert!(sent > 5_000_000, "the upload ran: {sent} bytes in 10 s");
    assert!(
        during >= 400,
        "bob's audio kept arriving under the upload: {during} frames in 10 s (500 sent)"
    );
    assert_eq!(alice.server_state(), ServerState::Up, "alice was never disconnected");
    chat_round(&call, "still here").await;
    call.finish_chat().await.expect("acked");
    call.hangup("bye");
    listener.abort();
    // Bob learns it from alice's QUIC close or, when that packet was behind a full relay queue,
    // from the server relaying her hang-up: either way with her reason.
    let end = bob_task.await.expect("bob");
    assert!(
        end == EndReason::Peer("bye".into()) || end == EndReason::Server("alice hung up: bye".into()),
        "{end:?}"
    );
}

#[tokio::test]
async fn a_released_name_can_be_registered_by_another_key() {
    let lab = server().await;
    let config = |identity| {
        let mut c = EndpointConfig::new(lab.addr, "frank", identity);
        c.bind = "127.0.0.1:0".parse().expect("addr");
        c
    };
    let owner = config(Identity::generate().expect("identity"));
    let other = config(Identity::generate().expect("identity"));
    let frank = Endpoint::bind(owner.clone()).await.expect("registers");
    frank.close().await;
    match Endpoint::bind(other.clone()).await {
        Err(Error::Refused { message, .. }) => {
            assert_eq!(
                message,
                "the name \"frank\" is taken: it is registered to another key; if it is yours, run \
                 with the --home (identity) that registered it; otherwise choose another --name"
            )
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("another key took frank's name"),
    }
    Endpoint::release_name(&owner).await.expect("releases");
    let newcomer = Endpoint::bind(other).await.expect("the name is free");
    assert_eq!(newcomer.name(), "frank");
    newcomer.close().await;
}

/// A peer measures how its NAT maps ports on the server's second STUN port (on loopback: one
/// port for every destination) and tells the server, which hands it to callers; without the
/// second port the mapping stays unknown and nothing is reported.
#[tokio::test]
async fn peers_measure_their_nat_mapping_on_the_servers_second_port() {
    use natcall::Mapping;
    let lab = server().await;
    let alice = peer(&lab, "alice").await;
    assert_eq!(alice.nat_mapping(), Mapping::Independent);
    let reported = async {
        loop {
            if lab.server.registry().peer("alice").map(|p| p.mapping) == Some(Mapping::Independent) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), reported)
        .await
        .expect("the server records the reported mapping");

    let sockets =
        natcall_rendezvous::Sockets::bind_with_alt("127.0.0.1:0".parse().expect("addr"), Some(0)).expect("binds");
    assert!(sockets.udp_alt.is_none(), "0 turns the second port off");
    let one_port = common::start_on(sockets, natcall_rendezvous::Config::default());
    let bob = peer(&one_port, "bob").await;
    assert_eq!(bob.nat_mapping(), Mapping::Unknown);
    assert_eq!(
        one_port.server.registry().peer("bob").map(|p| p.mapping),
        Some(Mapping::Unknown)
    );
}
