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
        &[
            "room",
            "team",
            "--invite",
            "bob,carol",
            "--duration",
            "6",
            "--topology",
            "mesh",
        ],
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

    let mut bob = Peer::spawn(
        dir.path(),
        server.addr,
        "bob",
        &["room", "team", "--duration", "5", "--topology", "mesh"],
    );
    // dave has the code.
    let mut dave = Peer::spawn(
        dir.path(),
        server.addr,
        "dave",
        &["room", "team", "--code", &code, "--duration", "4", "--topology", "mesh"],
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
        // Each member's media goes mesh (its own session), as asked; the last path change per
        // member names the path its session ended on.
        let topology = r["topology"].as_array().expect("topology");
        assert_eq!(topology.len(), 1, "{r}");
        assert_eq!(topology[0]["mode"], "mesh", "{r}");
        assert_eq!(topology[0]["why"], "--topology mesh", "{r}");
        let paths = r["paths"].as_array().expect("paths");
        for other in others {
            let last = paths
                .iter()
                .rfind(|t| t["member"] == other)
                .expect("a change per member");
            assert_eq!(last["path"], r["members"][other]["path"], "{r}");
        }
    }
}

#[test]
fn a_member_in_fan_out_reaches_the_others_through_the_server_sealed_with_its_own_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Rendezvous::start(dir.path());
    // alice sends one copy through the server; bob and carol send on their sessions.
    let mut alice = Peer::spawn(
        dir.path(),
        server.addr,
        "alice",
        &[
            "room",
            "fan",
            "--invite",
            "bob,carol",
            "--duration",
            "6",
            "--topology",
            "fan-out",
        ],
    );
    alice.wait_event("room", STEP, |_| true);
    let mut bob = Peer::spawn(
        dir.path(),
        server.addr,
        "bob",
        &["room", "fan", "--duration", "5", "--topology", "mesh"],
    );
    let mut carol = Peer::spawn(
        dir.path(),
        server.addr,
        "carol",
        &["room", "fan", "--duration", "5", "--topology", "mesh"],
    );
    for (p, name) in [(&mut alice, "alice"), (&mut bob, "bob"), (&mut carol, "carol")] {
        assert_eq!(p.wait_exit(STEP), 0, "{name}: {}", p.log_text());
    }
    let a = alice.report();
    assert_eq!(a["topology"][0]["mode"], "fan_out", "{a}");
    assert_eq!(a["topology"][0]["why"], "--topology fan-out", "{a}");
    let sent = a["fan_out"]["sent"]["audio"]["frames_sent"].as_u64().unwrap_or(0);
    assert!(sent > 150, "alice sent {sent} audio frames in fan-out: {a}");
    for (p, name) in [(&mut bob, "bob"), (&mut carol, "carol")] {
        let r = p.report();
        let from_alice = &r["members"]["alice"];
        for track in ["audio", "video"] {
            // alice's media came through the server, none on the session.
            let fan = &from_alice["fan_out"][track]["received"];
            assert!(
                fan["frames_complete"].as_u64().unwrap_or(0) > 10,
                "{name} got too little of alice's {track} by fan-out: {r}"
            );
            assert_eq!(fan["packets_auth_failed"], 0, "{r}");
            let session = from_alice["media"][track]["received"]["frames_complete"]
                .as_u64()
                .unwrap_or(0);
            assert_eq!(session, 0, "{name} got alice's {track} on the session too: {r}");
        }
        // The mesh members' media still reaches alice on their sessions.
        let got = a["members"][name]["media"]["audio"]["received"]["frames_complete"]
            .as_u64()
            .unwrap_or(0);
        assert!(got > 10, "alice got {got} audio frames from {name}: {a}");
    }
}
