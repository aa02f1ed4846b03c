//! Rooms between endpoints and an in-process rendezvous server on loopback: creating, joining,
//! refusals, the pairwise sessions each pair of members gets, and leaving.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Lab, server};
use natcall::{Call, EndReason, Endpoint, EndpointConfig, Error, Frame, Identity, Room, RoomEvent, RoomRefusal, Track};

const STEP: Duration = Duration::from_secs(10);

async fn peer(lab: &Lab, name: &str) -> Endpoint {
    let mut config = EndpointConfig::new(lab.addr, name, Identity::generate().expect("identity"));
    config.bind = "127.0.0.1:0".parse().expect("addr");
    Endpoint::bind(config).await.expect("registers")
}

async fn next(room: &mut Room) -> RoomEvent {
    tokio::time::timeout(STEP, room.next_event())
        .await
        .expect("a room event in time")
        .expect("the endpoint is open")
}

/// Takes `room`'s events until it has a connected session with each of `peers` (member joins
/// on the way are fine).
async fn sessions(room: &mut Room, peers: &[&str]) -> BTreeMap<String, Call> {
    let mut out = BTreeMap::new();
    while out.len() < peers.len() {
        match next(room).await {
            RoomEvent::Session { peer, call } => {
                assert!(peers.contains(&peer.as_str()), "a session with {peer}");
                assert_eq!(call.peer(), peer);
                out.insert(peer, *call);
            }
            RoomEvent::MemberJoined(m) => assert!(peers.contains(&m.name.as_str()), "{m:?}"),
            other => panic!("{other:?}"),
        }
    }
    out
}

/// Each side of every session sends a line; each receives the other's.
async fn chat_everywhere(all: &BTreeMap<&str, BTreeMap<String, Call>>) {
    for (me, calls) in all {
        for call in calls.values() {
            call.send_chat(&format!("hi from {me}")).await.expect("sends");
        }
    }
    for (me, calls) in all {
        for (peer, call) in calls {
            let line = tokio::time::timeout(STEP, call.recv_chat())
                .await
                .expect("in time")
                .expect("reads");
            assert_eq!(
                line.as_deref(),
                Some(format!("hi from {peer}").as_str()),
                "{me} from {peer}"
            );
        }
    }
}

#[tokio::test]
async fn three_members_get_a_session_with_each_other_and_chat_on_every_one() {
    let lab = server().await;
    let alice = peer(&lab, "alice").await;
    let bob = peer(&lab, "bob").await;
    let carol = peer(&lab, "carol").await;
    let mallory = peer(&lab, "mallory").await;

    let mut a = alice.create_room("team", &["bob"]).await.expect("created");
    assert!(a.members().is_empty());
    let code = a.code().expect("the creator gets the join code").to_owned();

    let mut b = bob.join_room("team", None).await.expect("bob is invited");
    assert_eq!(
        b.members().iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["alice"]
    );
    assert_eq!(b.code(), None);
    assert_eq!(b.id(), a.id());

    match mallory.join_room("team", None).await {
        Err(Error::Room { refusal, reason }) => {
            assert_eq!(refusal, RoomRefusal::NotInvited);
            assert!(reason.contains("not invited"), "{reason}");
        }
        other => panic!("mallory: {other:?}"),
    }

    let mut c = carol.join_room("team", Some(&code)).await.expect("carol has the code");
    let mut all = BTreeMap::new();
    all.insert("alice", sessions(&mut a, &["bob", "carol"]).await);
    all.insert("bob", sessions(&mut b, &["alice", "carol"]).await);
    all.insert("carol", sessions(&mut c, &["alice", "bob"]).await);
    chat_everywhere(&all).await;

    // carol leaves: the others are told, their sessions with her end.
    c.leave();
    for (me, room) in [("alice", &mut a), ("bob", &mut b)] {
        match next(room).await {
            RoomEvent::MemberLeft { name, reason } => assert_eq!((name.as_str(), reason.as_str()), ("carol", "left")),
            other => panic!("{me}: {other:?}"),
        }
        let with_carol = &all[me]["carol"];
        let end = tokio::time::timeout(STEP, with_carol.ended())
            .await
            .expect("ends in time");
        assert!(
            matches!(end, EndReason::Peer(_) | EndReason::Server(_)),
            "{me}: {end:?}"
        );
    }
    // alice and bob still talk.
    all.remove("carol");
    for calls in all.values_mut() {
        calls.remove("carol");
    }
    chat_everywhere(&all).await;
}

/// Sends `frames` audio frames of 80 bytes (20 ms apart) and, every fifth, a video key frame of
/// 2 000 bytes, in fan-out.
async fn send_fan_out(room: &Room, frames: u32) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for i in 0..frames {
        tick.tick().await;
        room.send_fan_out_frame(Track::AUDIO, Frame::new(i * 20, vec![7; 80]))
            .await
            .expect("queued");
        if i % 5 == 0 {
            room.send_fan_out_frame(Track::VIDEO, Frame::key(i * 20, vec![9; 2_000]))
                .await
                .expect("queued");
        }
    }
}

/// Complete audio frames `room`'s member got from `from` by fan-out.
fn audio_from(room: &Room, from: &str) -> u64 {
    room.fan_out_report()
        .received
        .get(from)
        .and_then(|m| m.audio.received.as_ref())
        .map_or(0, |s| s.frames_complete)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn fan_out_media_reaches_every_other_member_under_sender_keys_that_change_when_one_leaves() {
    let lab = server().await;
    let alice = peer(&lab, "alice").await;
    let bob = peer(&lab, "bob").await;
    let carol = peer(&lab, "carol").await;
    let mut a = alice.create_room("fan", &["bob", "carol"]).await.expect("created");
    let mut b = bob.join_room("fan", None).await.expect("joins");
    let mut c = carol.join_room("fan", None).await.expect("joins");
    // The sessions carry the keys: each member has both others' once they connected.
    let mut all = BTreeMap::new();
    all.insert("alice", sessions(&mut a, &["bob", "carol"]).await);
    all.insert("bob", sessions(&mut b, &["alice", "carol"]).await);
    all.insert("carol", sessions(&mut c, &["alice", "bob"]).await);
    for room in [&a, &b, &c] {
        eventually("every member has the others' keys", || {
            room.fan_out_report().received.len() == 2
        })
        .await;
    }

    tokio::join!(send_fan_out(&a, 50), send_fan_out(&b, 50), send_fan_out(&c, 50));
    for (me, room, others) in [
        ("alice", &a, ["bob", "carol"]),
        ("bob", &b, ["alice", "carol"]),
        ("carol", &c, ["alice", "bob"]),
    ] {
        for from in others {
            eventually(&format!("{me} gets {from}'s audio"), || audio_from(room, from) >= 48).await;
            let video = room.fan_out_report().received[from]
                .video
                .received
                .clone()
                .expect("video");
            assert!(video.frames_complete >= 9, "{me} from {from}: {video:?}");
        }
        let report = room.fan_out_report();
        assert_eq!(report.keys_made, 1, "{me}");
        assert_eq!(
            report.unknown_key_packets, 0,
            "{me}: every packet came under a key it had"
        );
        let sent = report.sent[0].clone().expect("audio sent");
        assert_eq!(sent.frames_sent, 50, "{me}");
    }

    // carol leaves: alice and bob make new keys and give them only to each other.
    c.leave();
    for (me, room) in [("alice", &mut a), ("bob", &mut b)] {
        match next(room).await {
            RoomEvent::MemberLeft { name, .. } => assert_eq!(name, "carol", "{me}"),
            other => panic!("{me}: {other:?}"),
        }
    }
    for (me, room) in [("alice", &a), ("bob", &b)] {
        eventually(&format!("{me} rekeyed"), || room.fan_out_report().keys_made == 2).await;
    }
    let (before_a, before_b) = (audio_from(&b, "alice"), audio_from(&a, "bob"));
    tokio::join!(send_fan_out(&a, 50), send_fan_out(&b, 50));
    eventually("bob opens alice's media under her new key", || {
        audio_from(&b, "alice") >= before_a + 48
    })
    .await;
    eventually("alice opens bob's media under his new key", || {
        audio_from(&a, "bob") >= before_b + 48
    })
    .await;
    for (me, room) in [("alice", &a), ("bob", &b)] {
        assert_eq!(room.fan_out_report().unknown_key_packets, 0, "{me}");
    }
    drop(all);
}

/// A member of the room as the server sees members: a raw client (the rendezvous server's test
/// client), which gets every fan-out copy byte for byte as the server forwards it.
#[path = "../../../rendezvous-server/tests/common/mod.rs"]
#[allow(unused_imports)]
mod raw;

const MARKER: &[u8] = b"PLAINTEXT-MARKER";

fn marked(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

#[tokio::test]
async fn what_the_server_forwards_in_fan_out_is_sealed_and_a_member_without_keys_reads_nothing() {
    let lab = server().await;
    let alice = peer(&lab, "alice").await;
    let bob = peer(&lab, "bob").await;
    let mut a = alice.create_room("seal", &["bob"]).await.expect("created");
    let code = a.code().expect("code").to_owned();
    let mut b = bob.join_room("seal", None).await.expect("joins");
    let _sa = sessions(&mut a, &["bob"]).await;
    let _sb = sessions(&mut b, &["alice"]).await;
    eventually("bob has alice's key", || {
        b.fan_out_report().received.contains_key("alice")
    })
    .await;

    // eve joins with the code, as the server's own view of a member: no session, no keys.
    let (mut eve, _) = raw::Client::register(lab.addr, "eve", &raw::Identity::generate()).await;
    eve.send(&natcall_proto::control::ClientMsg::RoomJoin {
        room: "seal".into(),
        code: Some(code),
    })
    .await;
    let room_id = match eve.next_msg().await {
        natcall_proto::control::ServerMsg::RoomJoined { id, .. } => id,
        other => panic!("eve: {other:?}"),
    };

    // alice sends frames whose plaintext is a marker, in fan-out.
    let sending = async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for i in 0..50u32 {
            tick.tick().await;
            a.send_fan_out_frame(Track::AUDIO, Frame::new(i * 20, marked(80)))
                .await
                .expect("queued");
            if i % 10 == 0 {
                a.send_fan_out_frame(Track::VIDEO, Frame::key(i * 20, marked(3_000)))
                    .await
                    .expect("queued");
            }
        }
    };
    let watching = async {
        let mut copies = Vec::new();
        let deadline = tokio::time::Instant::now() + STEP;
        while copies.len() < 60 && tokio::time::Instant::now() < deadline {
            if let Some(raw::Got::Relay(frame)) = eve.try_next(Duration::from_millis(500)).await {
                copies.push(frame);
            }
        }
        copies
    };
    let ((), copies) = tokio::join!(sending, watching);
    assert!(copies.len() >= 60, "eve got {} fan-out copies", copies.len());
    let header = natcall_proto::frame::LEN_PREFIX + 1;
    for c in &copies {
        let call = u32::from_be_bytes(c[header..header + 4].try_into().expect("4 bytes"));
        assert_eq!(call, room_id, "a copy of the room's traffic");
        assert!(
            !c.windows(MARKER.len()).any(|w| w == MARKER),
            "the server forwarded plaintext: {c:?}"
        );
    }
    // bob, who has alice's key, reads the same packets.
    eventually("bob opens alice's frames", || audio_from(&b, "alice") >= 48).await;
}
