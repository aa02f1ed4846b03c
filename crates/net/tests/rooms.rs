//! Rooms between endpoints and an in-process rendezvous server on loopback: creating, joining,
//! refusals, the pairwise sessions each pair of members gets, and leaving.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Lab, server};
use natcall::{Call, EndReason, Endpoint, EndpointConfig, Error, Identity, Room, RoomEvent, RoomRefusal};

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
