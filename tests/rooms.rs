//! `natcall room` with the real binaries on loopback: a server process and three or four
//! `natcall` processes in one room.

use std::time::Duration;

use natcall_e2e::{Peer, Rendezvous};

const STEP: Duration = Duration::from_secs(20);

#[test]
fn three_members_exchange_media_and_chat_and_an_uninvited_peer_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Rendezvous::start(dir.path());
    let mut alice = Peer::spawn(
        dir.path(),
        server.addr,
        "alice",
        &["room", "team", "--invite", "bob,carol", "--duration", "6"],
    );
    let created = alice.wait_event("room", STEP, |_| true);
    let code = created["code"].as_str().expect("the creator gets a code").to_owned();
    assert_eq!(created["members"], serde_json::json!([]));

    // mallory was not invited and has no code: exit 4, a reason that says so.
    let mut mallory = Peer::spawn(dir.path(), server.addr, "mallory", &["room", "team"]);
    assert_eq!(mallory.wait_exit(STEP), 4, "{}", mallory.log_text());
    let err = mallory.wait_event("error", STEP, |_| true);
    assert!(
        err["error"].as_str().unwrap_or("").contains("not invited to room team"),
        "{err}"
    );

    let mut bob = Peer::spawn(dir.path(), server.addr, "bob", &["room", "team", "--duration", "5"]);
    // dave has the code.
    let mut dave = Peer::spawn(
        dir.path(),
        server.addr,
        "dave",
        &["room", "team", "--code", &code, "--duration", "4"],
    );
    for p in [&mut alice, &mut bob, &mut dave] {
        p.wait_nth("connected", 2, STEP);
    }
    alice.say("hello room");
    bob.wait_chat("hello room");
    dave.wait_chat("hello room");
    for (p, name) in [(&mut alice, "alice"), (&mut bob, "bob"), (&mut dave, "dave")] {
        assert_eq!(p.wait_exit(STEP), 0, "{name}: {}", p.log_text());
    }
    for (p, name, others) in [
        (&mut alice, "alice", ["bob", "dave"]),
        (&mut bob, "bob", ["alice", "dave"]),
        (&mut dave, "dave", ["alice", "bob"]),
    ] {
        let r = p.report();
        assert_eq!(r["room"], "team");
        for other in others {
            let m = &r["members"][other];
            for track in ["audio", "video"] {
                let got = &m["media"][track]["received"];
                assert!(
                    got["frames_complete"].as_u64().unwrap_or(0) > 10,
                    "{name} received too little {track} from {other}: {r}"
                );
                assert_eq!(got["packets_auth_failed"], 0, "{r}");
            }
        }
        // Each member's media goes mesh (its own session); the last change per member names the
        // path its session ended on.
        let topology = r["topology"].as_array().expect("topology");
        assert!(topology.iter().all(|t| t["mode"] == "mesh"), "{r}");
        for other in others {
            let last = topology
                .iter()
                .rfind(|t| t["member"] == other)
                .expect("a change per member");
            assert_eq!(last["path"], r["members"][other]["path"], "{r}");
        }
    }
}
