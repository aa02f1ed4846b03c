//! Rooms end to end, in-process on loopback: who may join (invited, creator, join code), what
//! members are told, the fan-out of relay frames to everyone but the sender, leaving, and the
//! limits.

mod common;

use std::time::Duration;

use common::{Client, Got, Identity, Running, eventually, relay_frame_with, test_config};
use natcall_proto::control::{ClientMsg, RoomMember, RoomRefusal, ServerMsg};
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

    // bob is invited: he is told alice is in; alice is told bob joined.
    match join(&mut bob, "team", None).await {
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
    assert_eq!(
        alice.next_msg().await,
        ServerMsg::RoomMemberJoined {
            room: "team".into(),
            member: member("bob", &bob_id)
        }
    );

    // mallory is not invited and has no code; a wrong code is refused too.
    let (r, reason) = refusal(join(&mut mallory, "team", None).await);
    assert_eq!(r, RoomRefusal::NotInvited);
    assert!(reason.contains("not invited") && reason.contains("alice"), "{reason}");
    let (r, reason) = refusal(join(&mut mallory, "team", Some("aaaaaaaaaaaa")).await);
    assert_eq!(r, RoomRefusal::NotInvited);
    assert!(reason.contains("wrong join code"), "{reason}");

    // carol has the code.
    match join(&mut carol, "team", Some(&code)).await {
        ServerMsg::RoomJoined { members, .. } => {
            let mut names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
            names.sort();
            assert_eq!(names, ["alice", "bob"]);
        }
        other => panic!("carol: {other:?}"),
    }
    for c in [&mut alice, &mut bob] {
        assert_eq!(
            c.next_msg().await,
            ServerMsg::RoomMemberJoined {
                room: "team".into(),
                member: member("carol", &carol_id)
            }
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
    assert!(metrics.contains("natcall_rooms 1"), "{metrics}");
    assert!(metrics.contains("natcall_room_members 3"), "{metrics}");
    assert!(
        metrics.contains("natcall_refused_total{reason=\"room_not_invited\"} 2"),
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
    let (id, _) = created(create(&mut alice, "team", &["bob", "carol"]).await);
    join(&mut bob, "team", None).await;
    alice.next_msg().await;
    join(&mut carol, "team", None).await;
    alice.next_msg().await;
    bob.next_msg().await;

    // Each member sends one frame of each class: the other two get it, byte for byte.
    let flags = RelayFlags::FRAME_START | RelayFlags::FRAME_END | RelayFlags::KEY_FRAME;
    let mut sent = Vec::new();
    for (i, sender) in [&mut alice, &mut bob, &mut carol].into_iter().enumerate() {
        for class in [TrafficClass::Control, TrafficClass::Audio, TrafficClass::Video] {
            let f = relay_frame_with(id, class, flags, format!("from {i} {class:?}").as_bytes());
            sender.send_raw(&f).await;
            sent.push((i, f));
        }
    }
    for (me, c) in [&mut alice, &mut bob, &mut carol].into_iter().enumerate() {
        let mut got = Vec::new();
        for _ in 0..6 {
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

    // mallory is not a member: her frame to the room's id reaches nobody.
    mallory
        .send_raw(&relay_frame_with(id, TrafficClass::Control, flags, b"let me in"))
        .await;
    for c in [&mut alice, &mut bob, &mut carol] {
        assert!(c.try_next(Duration::from_millis(200)).await.is_none());
    }
    let metrics = srv.server.metrics().render();
    for class in ["control", "audio", "video"] {
        assert!(
            metrics.contains(&format!("natcall_room_copies_total{{class=\"{class}\"}} 6")),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains("natcall_relay_dropped_frames_total{class=\"control\",reason=\"not_in_call\"} 1"),
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
    let (id, _) = created(create(&mut alice, "team", &["bob", "carol"]).await);
    join(&mut bob, "team", None).await;
    alice.next_msg().await;
    join(&mut carol, "team", None).await;
    alice.next_msg().await;
    bob.next_msg().await;

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
    }
    // carol is out: frames to the room no longer reach her, hers reach nobody.
    alice
        .send_raw(&relay_frame_with(id, TrafficClass::Control, 0, b"after"))
        .await;
    assert!(matches!(bob.next().await, Got::Relay(_)));
    assert!(carol.try_next(Duration::from_millis(200)).await.is_none());

    drop(bob);
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
    let (id, _) = created(create(&mut alice, "team", &["bob", "carol"]).await);
    join(&mut bob, "team", None).await;
    alice.next_msg().await;
    join(&mut carol, "team", None).await;
    alice.next_msg().await;
    bob.next_msg().await;
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
        if let Some(Got::Msg(m)) = alice.try_next(Duration::from_millis(20)).await {
            alice_told.push(m);
        }
    }
    let left = vec![ServerMsg::RoomMemberLeft {
        room: "team".into(),
        name: "carol".into(),
        reason: "connection ended".into(),
    }];
    assert_eq!(alice_told, left);
    assert_eq!(bob_told, left);
    assert!(srv.server.registry().peer("carol").is_none(), "carol was shed");
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
    join(&mut bob, "one", None).await;
    alice.next_msg().await;
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
    for reason in ["rooms", "room_full", "peer_rooms", "room_join_rate"] {
        assert!(
            metrics.contains(&format!("natcall_refused_total{{reason=\"{reason}\"}}")),
            "{reason}: {metrics}"
        );
    }
    assert!(
        metrics.contains("natcall_refused_total{reason=\"room_full\"} 2"),
        "{metrics}"
    );
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
    join(&mut bob, "team", None).await;
    alice.next_msg().await;
    // 30 frames at once: a second's worth (10) is copied, the rest dropped.
    for n in 0u32..30 {
        alice
            .send_raw(&relay_frame_with(id, TrafficClass::Control, 0, &n.to_be_bytes()))
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
            "natcall_relay_dropped_frames_total{{class=\"control\",reason=\"rate_limit\"}} {}",
            30 - got
        )),
        "{metrics}"
    );
    srv.shutdown().await;
}
