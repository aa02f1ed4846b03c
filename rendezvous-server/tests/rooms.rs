//! Rooms end to end, in-process on loopback: who may join (invited, creator, join code), what
//! members are told, the fan-out of relay frames to everyone but the sender, leaving, and the
//! limits.

mod common;

use std::time::Duration;

use common::{Client, Got, Identity, Running, eventually, http_get, relay_frame_with, test_config};
use natcall_proto::control::{CallStart, ClientMsg, RoomMember, RoomRefusal, ServerMsg};
use natcall_proto::relay::{ROOM_ID_BIT, RelayFlags, TrafficClass};
use natcall_rendezvous::Config;

async fn registered(srv: &Running, name: &str) -> (Client, Identity) {
    let id = Identity::generate();
    let (c, _) = Client::register(srv.addr, name, &id).await;
    (c, id)
}

async fn create(c: &mut Client, room: &str, invite: &[&str]) -> ServerMsg {
    c.send(&ClientMsg::RoomCreate {
        room: room.into(),
        invite: invite.iter().map(|s| (*s).to_owned()).collect(),
    })
    .await;
    c.next_msg().await
}

async fn join(c: &mut Client, room: &str, code: Option<&str>) -> ServerMsg {
    c.send(&ClientMsg::RoomJoin {
        room: room.into(),
        code: code.map(str::to_owned),
    })
    .await;
    c.next_msg().await
}

/// `c` joins `room`: its `RoomJoined`, then one pairwise session per member already in.
async fn join_in(c: &mut Client, room: &str, code: Option<&str>) -> (ServerMsg, Vec<CallStart>) {
    let joined = join(c, room, code).await;
    let ServerMsg::RoomJoined { members, .. } = &joined else {
        panic!("expected RoomJoined, got {joined:?}")
    };
    let mut starts = Vec::new();
    for _ in 0..members.len() {
        match c.next_msg().await {
            ServerMsg::RoomPeer { room: r, start } if r == room => starts.push(start),
            other => panic!("expected RoomPeer, got {other:?}"),
        }
    }
    (joined, starts)
}

/// What a member already in `room` is sent when another joins: who, and their session.
async fn told_of_join(c: &mut Client, room: &str) -> (RoomMember, CallStart) {
    let member = match c.next_msg().await {
        ServerMsg::RoomMemberJoined { room: r, member } if r == room => member,
        other => panic!("expected RoomMemberJoined, got {other:?}"),
    };
    match c.next_msg().await {
        ServerMsg::RoomPeer { room: r, start } if r == room => (member, start),
        other => panic!("expected RoomPeer, got {other:?}"),
    }
}

/// alice creates `team` inviting bob and carol, who join: returns the room's id.
async fn team_of_three(alice: &mut Client, bob: &mut Client, carol: &mut Client) -> u32 {
    let (id, _) = created(create(alice, "team", &["bob", "carol"]).await);
    join_in(bob, "team", None).await;
    told_of_join(alice, "team").await;
    join_in(carol, "team", None).await;
    told_of_join(alice, "team").await;
    told_of_join(bob, "team").await;
    id
}

/// The next message is `CallEnded` with `reason`.
async fn expect_ended(c: &mut Client, reason: &str) {
    match c.next_msg().await {
        ServerMsg::CallEnded { reason: got, .. } => assert_eq!(got, reason),
        other => panic!("expected CallEnded, got {other:?}"),
    }
}

/// The room's id and join code from a creator's `RoomJoined`.
fn created(msg: ServerMsg) -> (u32, String) {
    match msg {
        ServerMsg::RoomJoined {
            id,
            code: Some(code),
            members,
            ..
        } => {
            assert!(members.is_empty(), "{members:?}");
            (id, code)
        }
        other => panic!("expected RoomJoined with a code, got {other:?}"),
    }
}

fn refusal(msg: ServerMsg) -> (RoomRefusal, String) {
    match msg {
        ServerMsg::RoomRefused { refusal, reason, .. } => (refusal, reason),
        other => panic!("expected RoomRefused, got {other:?}"),
    }
}

fn member(name: &str, id: &Identity) -> RoomMember {
    RoomMember {
        name: name.into(),
        fingerprint: id.fingerprint(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invited_members_and_code_holders_join_everyone_else_is_refused() {
    let srv = Running::start(test_config()).await;
    let (mut alice, alice_id) = registered(&srv, "alice").await;
    let (mut bob, bob_id) = registered(&srv, "bob").await;
    let (mut carol, carol_id) = registered(&srv, "carol").await;
    let (mut mallory, _) = registered(&srv, "mallory").await;

    let (id, code) = created(create(&mut alice, "team", &["bob"]).await);
    assert_ne!(id & ROOM_ID_BIT, 0, "a room's id has the room bit");
    assert_eq!(code.len(), 12);

    // bob is invited: he is told alice is in; alice is told bob joined. Both get their
    // pairwise session: one call, one password, bob (the joiner) controls, each pins the
    // other's key.
    let (joined, bob_starts) = join_in(&mut bob, "team", None).await;
    match joined {
        ServerMsg::RoomJoined {
            room,
            id: got,
            code,
            members,
        } => {
            assert_eq!(
                (room.as_str(), got, code),
                ("team", id, None),
                "only the creator gets the code"
            );
            assert_eq!(members, vec![member("alice", &alice_id)]);
        }
        other => panic!("bob: {other:?}"),
    }
    let (joined, alice_start) = told_of_join(&mut alice, "team").await;
    assert_eq!(joined, member("bob", &bob_id));
    let bob_start = &bob_starts[0];
    assert_eq!((bob_start.peer.as_str(), alice_start.peer.as_str()), ("alice", "bob"));
    assert_eq!(bob_start.call, alice_start.call);
    assert_eq!(bob_start.call & ROOM_ID_BIT, 0, "a session is a call");
    assert_eq!(bob_start.password, alice_start.password);
    assert!(bob_start.controlling && !alice_start.controlling);
    assert_eq!(bob_start.fingerprint, alice_id.fingerprint());
    assert_eq!(alice_start.fingerprint, bob_id.fingerprint());

    // mallory is not invited and has no code; a wrong code is refused too.
    let (r, reason) = refusal(join(&mut mallory, "team", None).await);
    assert_eq!(r, RoomRefusal::NotInvited);
    assert!(
        reason.contains("not invited") && !reason.contains("alice"),
        "the reason does not name the creator to strangers: {reason}"
    );
    let (r, reason) = refusal(join(&mut mallory, "team", Some("aaaaaaaaaaaa")).await);
    assert_eq!(r, RoomRefusal::NotInvited);
    assert!(reason.contains("wrong join code"), "{reason}");

    // carol has the code: sessions with both.
    let (joined, starts) = join_in(&mut carol, "team", Some(&code)).await;
    match joined {
        ServerMsg::RoomJoined { members, .. } => {
            let mut names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
            names.sort();
            assert_eq!(names, ["alice", "bob"]);
        }
        other => panic!("carol: {other:?}"),
    }
    let mut peers: Vec<_> = starts.iter().map(|s| s.peer.as_str()).collect();
    peers.sort();
    assert_eq!(peers, ["alice", "bob"]);
    for c in [&mut alice, &mut bob] {
        let (joined, start) = told_of_join(c, "team").await;
        assert_eq!(joined, member("carol", &carol_id));
        assert_eq!(start.peer, "carol");
        assert!(
            starts
                .iter()
                .any(|s| s.call == start.call && s.password == start.password)
        );
    }

    // Other refusals: no such room, a second create, joining twice, a bad room name.
    assert_eq!(
        refusal(join(&mut mallory, "nope", None).await).0,
        RoomRefusal::NoSuchRoom
    );
    assert_eq!(refusal(create(&mut mallory, "team", &[]).await).0, RoomRefusal::Exists);
    assert_eq!(
        refusal(join(&mut bob, "team", None).await).0,
        RoomRefusal::AlreadyMember
    );
    assert_eq!(
        refusal(create(&mut mallory, "Team!", &[]).await).0,
        RoomRefusal::InvalidName
    );
    assert_eq!(
        refusal(create(&mut mallory, "ok", &["BAD NAME"]).await).0,
        RoomRefusal::InvalidName
    );

    let metrics = srv.server.metrics().render();
    assert!(metrics.contains("natcall_rooms 1\n"), "{metrics}");
    assert!(metrics.contains("natcall_room_members 3\n"), "{metrics}");
    assert!(
        metrics.contains("natcall_refused_total{reason=\"room_not_invited\"} 2\n"),
        "{metrics}"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_relay_frame_reaches_everyone_but_itself_and_strangers_reach_nobody() {
    let srv = Running::start(test_config()).await;
    let (mut alice, _) = registered(&srv, "alice").await;
    let (mut bob, _) = registered(&srv, "bob").await;
    let (mut carol, _) = registered(&srv, "carol").await;
    let (mut mallory, _) = registered(&srv, "mallory").await;
    let id = team_of_three(&mut alice, &mut bob, &mut carol).await;

    // Each member sends two frames of each media class: the other two get them, byte for byte.
    let flags = RelayFlags::FRAME_START | RelayFlags::FRAME_END | RelayFlags::KEY_FRAME;
    let mut sent = Vec::new();
    for (i, sender) in [&mut alice, &mut bob, &mut carol].into_iter().enumerate() {
        for class in [
            TrafficClass::Audio,
            TrafficClass::Video,
            TrafficClass::Audio,
            TrafficClass::Video,
        ] {
            let f = relay_frame_with(id, class, flags, format!("from {i} {class:?}").as_bytes());
            sender.send_raw(&f).await;
            sent.push((i, f));
        }
    }
    for (me, c) in [&mut alice, &mut bob, &mut carol].into_iter().enumerate() {
        let mut got = Vec::new();
        for _ in 0..8 {
            got.push(c.expect_relay().await);
        }
        let mut want: Vec<_> = sent
            .iter()
            .filter(|(from, _)| *from != me)
            .map(|(_, f)| f.clone())
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "member {me} gets the others' frames, not its own");
        assert!(
            c.try_next(Duration::from_millis(200)).await.is_none(),
            "nothing more for {me}"
        );
    }

    // mallory is not a member: her frame to the room's id reaches nobody. Nor does a
    // member's control-class frame: rooms carry media (control frames are never dropped, so
    // they could fill every member's buffer).
    mallory
        .send_raw(&relay_frame_with(id, TrafficClass::Audio, flags, b"let me in"))
        .await;
    alice
        .send_raw(&relay_frame_with(id, TrafficClass::Control, flags, b"control"))
        .await;
    for c in [&mut alice, &mut bob, &mut carol] {
        assert!(c.try_next(Duration::from_millis(200)).await.is_none());
    }
    let metrics = srv.server.metrics().render();
    for class in ["audio", "video"] {
        assert!(
            metrics.contains(&format!("natcall_room_copies_total{{class=\"{class}\"}} 12\n")),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains("natcall_relay_dropped_frames_total{class=\"audio\",reason=\"not_in_call\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("natcall_relay_dropped_frames_total{class=\"control\",reason=\"room_control\"} 1\n"),
        "{metrics}"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_who_leave_or_vanish_are_announced_and_the_last_one_closes_the_room() {
    let srv = Running::start(test_config()).await;
    let (mut alice, _) = registered(&srv, "alice").await;
    let (mut bob, _) = registered(&srv, "bob").await;
    let (mut carol, _) = registered(&srv, "carol").await;
    let id = team_of_three(&mut alice, &mut bob, &mut carol).await;

    carol.send(&ClientMsg::RoomLeave { room: "team".into() }).await;
    for c in [&mut alice, &mut bob] {
        assert_eq!(
            c.next_msg().await,
            ServerMsg::RoomMemberLeft {
                room: "team".into(),
                name: "carol".into(),
                reason: "left".into()
            }
        );
        // Their sessions with carol end.
        expect_ended(c, "carol left the room").await;
    }
    for _ in 0..2 {
        expect_ended(&mut carol, "you left the room").await;
    }
    // carol is out: frames to the room no longer reach her, hers reach nobody.
    alice
        .send_raw(&relay_frame_with(id, TrafficClass::Audio, 0, b"after"))
        .await;
    assert!(matches!(bob.next().await, Got::Relay(_)));
    assert!(carol.try_next(Duration::from_millis(200)).await.is_none());
    carol
        .send_raw(&relay_frame_with(id, TrafficClass::Audio, 0, b"me too"))
        .await;
    assert!(alice.try_next(Duration::from_millis(200)).await.is_none());

    drop(bob);
    expect_ended(&mut alice, "bob left the room").await;
    assert_eq!(
        alice.next_msg().await,
        ServerMsg::RoomMemberLeft {
            room: "team".into(),
            name: "bob".into(),
            reason: "connection ended".into()
        }
    );
    assert_eq!(srv.server.rooms().len(), 1);
    alice.send(&ClientMsg::RoomLeave { room: "team".into() }).await;
    eventually("the empty room is gone", || srv.server.rooms().is_empty()).await;
    // The name is free again.
    let (_, code) = created(create(&mut carol, "team", &[]).await);
    assert_eq!(code.len(), 12);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_reading_costs_only_itself() {
    let mut config: Config = test_config();
    config.relay.overload_timeout_ms = 1000;
    let srv = Running::start(config).await;
    let (mut alice, _) = registered(&srv, "alice").await;
    let (mut bob, _) = registered(&srv, "bob").await;
    let (mut carol, _) = registered(&srv, "carol").await;
    let id = team_of_three(&mut alice, &mut bob, &mut carol).await;
    carol.acks = false; // and carol never reads again

    // 3 s of audio every 20 ms from alice: bob gets every frame, in order, while carol's
    // buffer fills, she is shed, and both are told she left.
    let (mut alice_told, mut bob_told) = (Vec::new(), Vec::new());
    for n in 0u32..150 {
        let f = relay_frame_with(
            id,
            TrafficClass::Audio,
            RelayFlags::FRAME_START | RelayFlags::FRAME_END,
            &n.to_be_bytes(),
        );
        alice.send_raw(&f).await;
        loop {
            match bob.next().await {
                Got::Relay(got) => {
                    assert_eq!(got, f, "frame {n}");
                    break;
                }
                Got::Msg(m) => bob_told.push(m),
                other => panic!("bob: {other:?}"),
            }
        }
        while let Some(Got::Msg(m)) = alice.try_next(Duration::from_millis(10)).await {
            alice_told.push(m);
        }
    }
    for told in [alice_told, bob_told] {
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(
            matches!(&told[0], ServerMsg::CallEnded { reason, .. } if reason == "carol left the room"),
            "{told:?}"
        );
        assert_eq!(
            told[1],
            ServerMsg::RoomMemberLeft {
                room: "team".into(),
                name: "carol".into(),
                reason: "connection ended".into(),
            }
        );
    }
    assert!(srv.server.registry().peer("carol").is_none(), "carol was shed");
    srv.shutdown().await;
}

/// The frames `/rooms` says `name`'s buffer dropped: (audio, video).
fn dropped(doc: &str, name: &str) -> (u64, u64) {
    let at = format!("{{\"name\":\"{name}\",\"dropped\":{{\"audio\":");
    let rest = &doc[doc.find(&at).unwrap_or_else(|| panic!("{name} in {doc}")) + at.len()..];
    let (audio, rest) = rest.split_once(",\"video\":").expect("video");
    let video = rest.split_once('}').expect("end").0;
    (audio.parse().expect("a count"), video.parse().expect("a count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rooms_document_names_the_member_whose_buffer_thins_a_senders_video() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binds")
        .local_addr()
        .expect("addr")
        .port();
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut config: Config = test_config();
    config.metrics_listen = Some(metrics);
    let srv = Running::start(config).await;
    let (mut alice, _) = registered(&srv, "alice").await;
    let (mut bob, _) = registered(&srv, "bob").await;
    let (mut carol, _) = registered(&srv, "carol").await;
    let id = team_of_three(&mut alice, &mut bob, &mut carol).await;
    carol.acks = false; // carol reads nothing more: her buffer fills

    // 600 frames of 1 000 bytes of video from alice (a key frame, then deltas): bob reads every
    // one; carol's buffer goes over its bound and drops whole frames.
    for n in 0u32..600 {
        let flags = RelayFlags::FRAME_START | RelayFlags::FRAME_END | if n == 0 { RelayFlags::KEY_FRAME } else { 0 };
        let f = relay_frame_with(id, TrafficClass::Video, flags, &[n as u8; 1_000]);
        alice.send_raw(&f).await;
        loop {
            match bob.next().await {
                Got::Relay(got) => {
                    assert_eq!(got, f, "frame {n}");
                    break;
                }
                Got::Msg(_) => {}
                other => panic!("bob: {other:?}"),
            }
        }
    }
    let doc = http_get(metrics, "/rooms").await;
    assert!(doc.starts_with("HTTP/1.1 200"), "{doc}");
    assert!(doc.contains("\"rooms_total\":1"), "{doc}");
    assert!(doc.contains(&format!("\"room\":\"team\",\"id\":{id}")), "{doc}");
    assert_eq!(dropped(&doc, "bob"), (0, 0), "{doc}");
    assert_eq!(dropped(&doc, "alice"), (0, 0), "{doc}");
    let (audio, video) = dropped(&doc, "carol");
    assert_eq!(audio, 0, "{doc}");
    assert!(video > 100, "carol's buffer dropped {video} video frames: {doc}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_limits_refuse_with_a_reason_and_are_counted() {
    let mut config = test_config();
    config.limits.max_room_members = 2;
    config.limits.max_rooms = 2;
    config.limits.max_rooms_per_peer = 1;
    config.limits.room_joins_per_min = 3;
    let srv = Running::start(config).await;
    let (mut alice, _) = registered(&srv, "alice").await;
    let (mut bob, _) = registered(&srv, "bob").await;
    let (mut carol, _) = registered(&srv, "carol").await;
    let (mut dave, _) = registered(&srv, "dave").await;

    created(create(&mut alice, "one", &["bob", "carol"]).await);
    // One room per peer.
    let (r, reason) = refusal(create(&mut alice, "two", &[]).await);
    assert_eq!(r, RoomRefusal::PeerRoomLimit);
    assert!(reason.contains("leave one first"), "{reason}");
    // Two members per room.
    join_in(&mut bob, "one", None).await;
    told_of_join(&mut alice, "one").await;
    let (r, reason) = refusal(join(&mut carol, "one", None).await);
    assert_eq!(r, RoomRefusal::Full);
    assert!(reason.contains("full"), "{reason}");
    // Three invitations are more than a room of two holds.
    assert_eq!(
        refusal(create(&mut carol, "big", &["a", "b", "c"]).await).0,
        RoomRefusal::Full
    );
    // Two rooms per server.
    created(create(&mut carol, "two", &[]).await);
    let (r, _) = refusal(create(&mut dave, "three", &[]).await);
    assert_eq!(r, RoomRefusal::TooManyRooms);
    // Three creates or joins a minute per connection: carol has made three.
    let (r, reason) = refusal(join(&mut carol, "one", None).await);
    assert_eq!(r, RoomRefusal::RateLimited);
    assert!(reason.contains("at most 3 a minute"), "{reason}");

    let metrics = srv.server.metrics().render();
    for (reason, n) in [("rooms", 1), ("room_full", 2), ("peer_rooms", 1), ("room_join_rate", 1)] {
        assert!(
            metrics.contains(&format!("natcall_refused_total{{reason=\"{reason}\"}} {n}\n")),
            "{reason}: {metrics}"
        );
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_over_the_room_rate_has_its_frames_dropped_not_copied() {
    let mut config = test_config();
    config.limits.room_frames_per_sec = 10;
    let srv = Running::start(config).await;
    let (mut alice, _) = registered(&srv, "alice").await;
    let (mut bob, _) = registered(&srv, "bob").await;
    let (id, _) = created(create(&mut alice, "team", &["bob"]).await);
    join_in(&mut bob, "team", None).await;
    told_of_join(&mut alice, "team").await;
    // 30 frames at once: a second's worth (10) is copied, the rest dropped.
    for n in 0u32..30 {
        alice
            .send_raw(&relay_frame_with(id, TrafficClass::Audio, 0, &n.to_be_bytes()))
            .await;
    }
    let mut got = 0;
    while let Some(Got::Relay(_)) = bob.try_next(Duration::from_millis(300)).await {
        got += 1;
    }
    assert!((10..=12).contains(&got), "{got} copied");
    let metrics = srv.server.metrics().render();
    assert!(
        metrics.contains(&format!(
            "natcall_relay_dropped_frames_total{{class=\"audio\",reason=\"room_rate\"}} {}\n",
            30 - got
        )),
        "{metrics}"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pairwise_session_relays_between_its_two_members_only() {
    let srv = Running::start(test_config()).await;
    let (mut alice, _) = registered(&srv, "alice").await;
    let (mut bob, _) = registered(&srv, "bob").await;
    let (mut carol, _) = registered(&srv, "carol").await;
    created(create(&mut alice, "team", &["bob", "carol"]).await);
    let (_, bob_starts) = join_in(&mut bob, "team", None).await;
    told_of_join(&mut alice, "team").await;
    join_in(&mut carol, "team", None).await;
    told_of_join(&mut alice, "team").await;
    told_of_join(&mut bob, "team").await;
    let ab = bob_starts[0].call;

    let f = relay_frame_with(ab, TrafficClass::Control, 0, b"alice to bob");
    alice.send_raw(&f).await;
    assert_eq!(bob.expect_relay().await, f);
    let f = relay_frame_with(ab, TrafficClass::Control, 0, b"bob to alice");
    bob.send_raw(&f).await;
    assert_eq!(alice.expect_relay().await, f);
    // carol is in the room, not in that session.
    carol
        .send_raw(&relay_frame_with(ab, TrafficClass::Control, 0, b"carol"))
        .await;
    for c in [&mut alice, &mut bob, &mut carol] {
        assert!(c.try_next(Duration::from_millis(200)).await.is_none());
    }
    assert_eq!(srv.server.calls().len(), 3, "one session per pair");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_sessions_do_not_count_against_the_calls_a_peer_may_have() {
    // max_calls_per_peer is 4; a room of six gives each member five sessions, and a member
    // can still place a call.
    let srv = Running::start(test_config()).await;
    let names = ["m0", "m1", "m2", "m3", "m4", "m5"];
    let mut members = Vec::new();
    for n in names {
        members.push(registered(&srv, n).await.0);
    }
    created(create(&mut members[0], "six", &names[1..]).await);
    for i in 1..names.len() {
        let (_, starts) = join_in(&mut members[i], "six", None).await;
        assert_eq!(starts.len(), i);
        for earlier in &mut members[..i] {
            told_of_join(earlier, "six").await;
        }
    }
    assert_eq!(srv.server.calls().len(), 15);
    members[0]
        .send(&ClientMsg::Call {
            request: 1,
            callee: "m1".into(),
            policy: natcall_proto::control::Policy::Auto,
        })
        .await;
    assert!(
        matches!(members[0].next_msg().await, ServerMsg::Ringing { request: 1, .. }),
        "not busy"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_name_leaves_its_rooms_and_a_new_key_under_it_is_not_the_member_invited() {
    let srv = Running::start(test_config()).await;
    let (mut alice, _) = registered(&srv, "alice").await;
    let (mut bob, bob_id) = registered(&srv, "bob").await;
    created(create(&mut alice, "team", &["bob", "carol"]).await);
    join_in(&mut bob, "team", None).await;
    told_of_join(&mut alice, "team").await;

    // bob frees his name: he leaves the room, alice is told, his session ends.
    bob.send(&ClientMsg::ReleaseName).await;
    assert!(matches!(bob.next_msg().await, ServerMsg::NameReleased { .. }));
    expect_ended(&mut alice, "bob left the room").await;
    assert_eq!(
        alice.next_msg().await,
        ServerMsg::RoomMemberLeft {
            room: "team".into(),
            name: "bob".into(),
            reason: "connection ended".into()
        }
    );
    let metrics = srv.server.metrics().render();
    assert!(metrics.contains("natcall_room_members 1\n"), "{metrics}");

    // Someone else registers "bob" with another key: not the bob alice invited.
    let (mut other_bob, other_id) = registered(&srv, "bob").await;
    assert_ne!(other_id.fingerprint(), bob_id.fingerprint());
    assert_eq!(
        refusal(join(&mut other_bob, "team", None).await).0,
        RoomRefusal::NotInvited
    );

    // alice frees her name too: the room, now empty, is gone.
    alice.send(&ClientMsg::ReleaseName).await;
    assert!(matches!(alice.next_msg().await, ServerMsg::NameReleased { .. }));
    eventually("the room is gone with its last member", || {
        srv.server.rooms().is_empty()
    })
    .await;
    srv.shutdown().await;
}
