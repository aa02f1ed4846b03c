//! Seed inputs for every target, built with natcall's own encoders (and, for the ICE agent,
//! recorded from a real exchange between two agents), so the fuzzer starts from well-formed
//! traffic. `cargo run -p natcall-fuzz --bin gen-corpus` writes them to `corpus/<target>/`.

use std::net::SocketAddr;

use bytes::BytesMut;
use natcall_media::{Track, packetize};
use natcall_proto::auth::registration_message;
use natcall_proto::codec::encode_control_body;
use natcall_proto::control::{
    CallFailure, CallStart, Candidates, ClientMsg, Fingerprint, Mapping, PathKind, Policy, RoomMember, RoomRefusal,
    ServerMsg,
};
use natcall_proto::frame::{self, ErrorCode};
use natcall_proto::relay::{RelayFlags, RelayHeader, TrafficClass};
use natcall_proto::stun::{self as wire, TokenCredentials};
use natcall_traversal::{Agent, Candidate, Config, Credentials, Role};
use serde::Serialize;

use crate::agent::{ACTION, AGENT_ADDR, Harness, PASSWORD, SOURCES};
use crate::feedback::FeedbackOp;
use crate::input::Program;
use crate::media::{Op, sealer};
use crate::stun::TOKEN_MODE;

/// One seed: its target, a file name, its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The target it is for.
    pub target: &'static str,
    /// Its file name in `corpus/<target>/`.
    pub name: String,
    /// The input.
    pub data: Vec<u8>,
}

/// Every target's seeds.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    let mut add = |target: &'static str, list: Vec<(String, Vec<u8>)>| {
        seeds.extend(list.into_iter().map(|(name, data)| Seed { target, name, data }));
    };
    add(
        "control_server",
        client_msgs().into_iter().map(|(n, m)| (n, body(&m))).collect(),
    );
    add(
        "control_client",
        server_msgs().into_iter().map(|(n, m)| (n, body(&m))).collect(),
    );
    add("frame", frames());
    add("relay_header", relay_headers());
    add("stun_server", stun_server());
    add("stun_agent", stun_agent());
    add("media_open", media_packets());
    add("media_receiver", media_programs());
    add("media_feedback", feedback_programs());
    add("room_receiver", room_programs());
    seeds
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a literal socket address")
}

fn body<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_control_body(msg, &mut out).expect("seed messages encode");
    out.to_vec()
}

/// A registration with a real certificate and a valid signature over challenge `[0; 32]`.
fn register() -> ClientMsg {
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let key = rcgen::KeyPair::generate().expect("keygen");
    let cert = rcgen::CertificateParams::new(vec!["natcall.invalid".into()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der(), &rng).expect("pkcs8");
    let signature = pair
        .sign(&rng, &registration_message(&[0; 32], &[0; 32], "alice"))
        .expect("signs");
    ClientMsg::Register {
        name: "alice".into(),
        cert: cert.der().to_vec(),
        signature: signature.as_ref().to_vec(),
        lan_addrs: vec![addr("192.168.1.2:5000"), addr("[fe80::1]:5000")],
    }
}

fn client_msgs() -> Vec<(String, ClientMsg)> {
    let msgs = vec![
        ("register", register()),
        (
            "register-garbage-cert",
            ClientMsg::Register {
                name: "bob".into(),
                cert: vec![0x30, 0x82, 0x01, 0x00, 1, 2, 3],
                signature: vec![9; 64],
                lan_addrs: vec![],
            },
        ),
        ("lookup", ClientMsg::Lookup { name: "bob".into() }),
        ("pong", ClientMsg::Pong { nonce: u64::MAX }),
        (
            "call",
            ClientMsg::Call {
                request: 7,
                callee: "bob".into(),
                policy: Policy::DirectOnly,
            },
        ),
        ("answer", ClientMsg::Answer { call: 3, accept: true }),
        (
            "hangup",
            ClientMsg::Hangup {
                call: 3,
                reason: "bye ✓".into(),
            },
        ),
        ("relay-ack", ClientMsg::RelayAck { frames: 300 }),
        (
            "nat-mapping",
            ClientMsg::NatMapping {
                mapping: Mapping::Dependent { step: -7 },
                port_mapped: Some(addr("198.51.100.20:41000")),
            },
        ),
        (
            "call-path",
            ClientMsg::CallPath {
                call: 70_000,
                path: PathKind::Relay,
            },
        ),
        (
            "resume",
            ClientMsg::Resume {
                call: 1,
                peer: "alice".into(),
                proof: [0xab; 32],
            },
        ),
        (
            "room-create",
            ClientMsg::RoomCreate {
                room: "team".into(),
                invite: vec!["bob".into(), "carol".into()],
            },
        ),
        (
            "room-join",
            ClientMsg::RoomJoin {
                room: "team".into(),
                code: Some("abcdefghjkmn".into()),
            },
        ),
        ("room-leave", ClientMsg::RoomLeave { room: "team".into() }),
        (
            "visit",
            ClientMsg::Visit {
                node: "n1".into(),
                name: "alice".into(),
                fingerprint: Fingerprint([0x5a; 32]),
                candidates: Candidates {
                    public: Some(addr("198.51.100.7:40000")),
                    lan: vec![addr("192.168.1.5:40000")],
                    mapping: Mapping::Independent,
                    port_mapped: None,
                },
                rtt_us: Some(12_000),
                proof: [0x11; 32],
            },
        ),
    ];
    msgs.into_iter().map(|(n, m)| (n.to_owned(), m)).collect()
}

fn server_msgs() -> Vec<(String, ServerMsg)> {
    let fingerprint = Fingerprint([0x5a; 32]);
    let start = CallStart {
        call: 9,
        peer: "bob".into(),
        fingerprint,
        candidates: Candidates {
            public: Some(addr("203.0.113.9:40001")),
            lan: vec![addr("192.168.1.3:5000"), addr("[2001:db8::3]:5000")],
            mapping: Mapping::Dependent { step: 2 },
            port_mapped: None,
        },
        password: "0123456789abcdef".into(),
        controlling: true,
        delay_ms: 40,
        policy: Policy::Auto,
    };
    let msgs = vec![
        (
            "welcome",
            ServerMsg::Welcome {
                challenge: [1; 32],
                observed: addr("203.0.113.9:51000"),
            },
        ),
        (
            "registered",
            ServerMsg::Registered {
                name: "alice".into(),
                fingerprint,
                token: TokenCredentials {
                    username: "nc1:0011223344556677".into(),
                    password: "00112233445566778899aabbccddeeff".into(),
                },
                stun_addr: None,
                relay_ack_every: 4,
                stun_alt_port: Some(3479),
            },
        ),
        (
            "presence",
            ServerMsg::Presence {
                name: "bob".into(),
                online: true,
                fingerprint: Some(fingerprint),
            },
        ),
        (
            "ping",
            ServerMsg::Ping {
                nonce: 1,
                rtt_us: Some(25_000),
            },
        ),
        (
            "going-away",
            ServerMsg::GoingAway {
                reason: "restart".into(),
                reconnect_after_ms: 500,
            },
        ),
        ("ringing", ServerMsg::Ringing { request: 7, call: 9 }),
        (
            "call-failed",
            ServerMsg::CallFailed {
                request: 7,
                callee: "bob".into(),
                failure: CallFailure::Busy,
            },
        ),
        (
            "incoming",
            ServerMsg::Incoming {
                call: 9,
                caller: "alice".into(),
                fingerprint,
                policy: Policy::RelayOnly,
            },
        ),
        ("start", ServerMsg::Start(start.clone())),
        (
            "call-ended",
            ServerMsg::CallEnded {
                call: 9,
                reason: "declined".into(),
            },
        ),
        ("call-suspended", ServerMsg::CallSuspended { call: 9 }),
        ("resumed", ServerMsg::Resumed { call: 9, id: 10 }),
        (
            "resume-failed",
            ServerMsg::ResumeFailed {
                call: 9,
                reason: "no proof".into(),
            },
        ),
        (
            "relay-budget",
            ServerMsg::RelayBudget {
                call: 9,
                bps: 360_000,
                dropped: 3,
            },
        ),
        (
            "room-joined",
            ServerMsg::RoomJoined {
                room: "team".into(),
                id: 0x8000_0009,
                code: None,
                members: vec![RoomMember {
                    name: "alice".into(),
                    fingerprint,
                }],
            },
        ),
        (
            "room-refused",
            ServerMsg::RoomRefused {
                room: "team".into(),
                refusal: RoomRefusal::NotInvited,
                reason: "not invited".into(),
            },
        ),
        (
            "room-peer",
            ServerMsg::RoomPeer {
                room: "team".into(),
                start,
            },
        ),
        (
            "room-member-left",
            ServerMsg::RoomMemberLeft {
                room: "team".into(),
                name: "bob".into(),
                reason: "left".into(),
            },
        ),
        (
            "move-to",
            ServerMsg::MoveTo {
                servers: vec![addr("198.51.100.2:3478"), addr("[2001:db8::2]:3478")],
            },
        ),
        (
            "call-failed-unavailable",
            ServerMsg::CallFailed {
                request: 4,
                callee: "bob".into(),
                failure: CallFailure::Unavailable,
            },
        ),
    ];
    msgs.into_iter().map(|(n, m)| (n.to_owned(), m)).collect()
}

fn relay_headers() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for (class, flags) in [
        (TrafficClass::Control, 0),
        (TrafficClass::Audio, RelayFlags::FRAME_START | RelayFlags::FRAME_END),
        (TrafficClass::Video, RelayFlags::KEY_FRAME | RelayFlags::FRAME_START),
    ] {
        let mut out = BytesMut::new();
        RelayHeader {
            call: 0x0102_0304,
            class,
            flags: RelayFlags(flags),
        }
        .encode(&mut out);
        out.extend_from_slice(b"sealed payload");
        seeds.push((class.as_str().to_owned(), out.to_vec()));
    }
    seeds.push(("short".into(), vec![0, 0, 0, 1, 1]));
    seeds
}

fn frames() -> Vec<(String, Vec<u8>)> {
    let mut stream = BytesMut::new();
    frame::encode_hello(natcall_proto::PROTOCOL_VERSION, &mut stream);
    let hello = stream.to_vec();
    for (_, msg) in client_msgs().into_iter().skip(2).take(4) {
        frame::encode_control(&msg, &mut stream).expect("encodes");
    }
    let header = RelayHeader {
        call: 9,
        class: TrafficClass::Audio,
        flags: RelayFlags(RelayFlags::FRAME_START | RelayFlags::FRAME_END),
    };
    frame::encode_relay(&header, &[0x10; 60], &mut stream).expect("encodes");
    let mut error = BytesMut::new();
    frame::encode_error(ErrorCode::NameTaken, "the name \"bob\" is taken", &mut error);
    stream.extend_from_slice(&error);
    let mut welcome = BytesMut::new();
    for (_, msg) in server_msgs() {
        frame::encode_control(&msg, &mut welcome).expect("encodes");
    }
    let mut seeds = vec![
        ("hello".to_owned(), [&[0x00][..], &hello].concat()),
        ("session-in-one-read".to_owned(), [&[0x00][..], &stream].concat()),
        // Limit 64 bytes, split in the middle.
        (
            "session-small-limit-split".to_owned(),
            [&[0x80 | 2][..], &stream].concat(),
        ),
        ("server-messages".to_owned(), [&[0x41][..], &welcome].concat()),
        ("error".to_owned(), [&[0x00][..], &error].concat()),
        ("too-large".to_owned(), vec![0x00, 0x00, 0x01, 0x00, 0x01, 0x01]),
        ("empty-frame".to_owned(), vec![0x00, 0, 0, 0, 0]),
        ("unknown-kind".to_owned(), vec![0x00, 0, 0, 0, 1, 0x33]),
    ];
    let partial = stream.len() - 7;
    seeds.push(("session-partial".into(), [&[0xfc][..], &stream[..partial]].concat()));
    seeds
}

fn stun_server() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut buf = [0u8; 256];
    let n = wire::encode_binding_request(&[3; 12], None, &mut buf).expect("encodes");
    let plain = &buf[..n];
    seeds.push(("plain-v4".to_owned(), [&[0x00][..], plain].concat()));
    seeds.push(("plain-v6".to_owned(), [&[0x01][..], plain].concat()));
    let unknown = TokenCredentials {
        username: "nc1:ffffffffffffffff".into(),
        password: "not-registered".into(),
    };
    let mut buf = [0u8; 256];
    let n = wire::encode_binding_request(&[4; 12], Some(&unknown), &mut buf).expect("encodes");
    let token = &buf[..n];
    seeds.push(("unknown-token".to_owned(), [&[0x00][..], token].concat()));
    let mut buf = [0u8; 256];
    let n = wire::encode_binding_success(&[5; 12], addr("[2001:db8::9]:9"), Some("pw"), &mut buf).expect("encodes");
    seeds.push(("a-response".to_owned(), [&[0x00][..], &buf[..n]].concat()));
    seeds.push(("header-only".to_owned(), [&[0x00][..], &plain[..20]].concat()));
    seeds.push(("token".to_owned(), [&[TOKEN_MODE][..], &[6; 12]].concat()));
    seeds.push(("token-v6".to_owned(), [&[TOKEN_MODE | 1][..], &[7; 12]].concat()));
    // Byte 25 is in USERNAME's value; the last bytes are FINGERPRINT.
    seeds.push((
        "token-flipped".to_owned(),
        [&[TOKEN_MODE][..], &[8; 12], &[25, 0x20]].concat(),
    ));
    seeds.push((
        "token-bad-fingerprint".to_owned(),
        [&[TOKEN_MODE][..], &[9; 12], &[95, 1]].concat(),
    ));
    seeds
}

/// The agent under test's peer, which knows the agent at [`AGENT_ADDR`].
fn peer(role: Role) -> Agent {
    let credentials = Credentials::new(PASSWORD, "peer", "agent").expect("valid credentials");
    let mut config = Config::default();
    config.rng_seed = 0x9ee7;
    Agent::new(
        config,
        role,
        credentials,
        vec![Candidate::server_reflexive(AGENT_ADDR)],
        false,
        crate::epoch(),
    )
}

/// Records what a real peer sends the agent under test, in 10 ms steps, with the agent's
/// answers delivered back when they go to where the peer is (`SOURCES[source]`).
fn agent_exchange(setup: u8, source: usize, steps: usize) -> Vec<u8> {
    let mut harness = Harness::new(setup);
    let peer_role = if setup & 1 == 1 {
        Role::Controlled
    } else {
        Role::Controlling
    };
    let mut peer = peer(peer_role);
    let mut program = Program::new();
    program.u8(setup);
    let mut to_agent: Vec<Vec<u8>> = Vec::new();
    for _ in 0..steps {
        let now = harness.now() + crate::agent::STEP;
        while let Some(at) = peer.poll_timeout().filter(|&at| at <= now) {
            peer.handle_timeout(at);
        }
        to_agent.extend(std::iter::from_fn(|| peer.poll_transmit()).map(|t| t.contents));
        let mut records: Vec<(u8, Vec<u8>)> = Vec::new();
        let src = source as u8;
        if to_agent.is_empty() {
            records.push(((1 << 2) | src, Vec::new()));
        }
        for (i, datagram) in to_agent.drain(..).enumerate() {
            let advance = if i == 0 { 1 << 2 } else { 0 };
            records.push((advance | src, datagram));
        }
        for (ctl, datagram) in records {
            program.u8(ctl).long_bytes(&datagram);
            for t in harness.step(ctl, &datagram) {
                if t.destination == SOURCES[source] {
                    peer.handle_input(harness.now(), AGENT_ADDR, &t.contents);
                    to_agent.extend(std::iter::from_fn(|| peer.poll_transmit()).map(|t| t.contents));
                }
            }
        }
    }
    program.finish()
}

fn stun_agent() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for setup in 0..4u8 {
        for source in [0, 2] {
            let role = if setup & 1 == 1 { "controlling" } else { "controlled" };
            let lan = if setup & 2 == 2 { "-lan" } else { "" };
            let from = if source == 0 { "srflx" } else { "prflx" };
            seeds.push((format!("{role}{lan}-{from}"), agent_exchange(setup, source, 12)));
        }
    }
    let mut actions = agent_exchange(1, 0, 12);
    actions.extend_from_slice(&[ACTION | 2, ACTION | 1, ACTION, 0x7c, 0x00, 0x00]);
    seeds.push(("actions".into(), actions));
    seeds
}

fn media_packets() -> Vec<(String, Vec<u8>)> {
    let mut sealer = sealer();
    let mut seeds = Vec::new();
    let frames: [(&str, Track, bool, Vec<u8>); 3] = [
        ("audio", Track::AUDIO, false, vec![0x11; 80]),
        ("video-key", Track::VIDEO, true, (0..1000).map(|i| i as u8).collect()),
        ("data-empty", Track::data(0).expect("data track 0"), false, Vec::new()),
    ];
    for (name, track, key, data) in frames {
        let parts = packetize(track, 5, 1234, key, &data).expect("packetizes");
        for (i, (header, fragment)) in parts.enumerate() {
            let packet = sealer.seal(header, fragment).expect("seals");
            seeds.push((format!("{name}-{i}"), packet));
        }
    }
    seeds
}

/// A program sealing the fragments `order` names of one frame of `len` bytes.
fn frame_program(setup: u8, track: u8, frame_id: u32, timestamp: u32, len: u16, order: &[u16]) -> Program {
    let count = (usize::from(len).div_ceil(natcall_media::MAX_FRAGMENT_PAYLOAD)).max(1) as u16;
    let mut p = Program::new();
    p.u8(setup);
    for &index in order.iter().filter(|&&i| i < count) {
        let mut flags = 0;
        if index == 0 {
            flags |= natcall_media::Flags::FRAME_START;
        }
        if index + 1 == count {
            flags |= natcall_media::Flags::FRAME_END;
        }
        let rest = usize::from(len) - usize::from(index) * natcall_media::MAX_FRAGMENT_PAYLOAD;
        let fragment = rest.min(natcall_media::MAX_FRAGMENT_PAYLOAD) as u16;
        p.u8(Op::Seal as u8)
            .u8(track)
            .u32(timestamp)
            .u32(frame_id)
            .u16(index)
            .u16(count)
            .u8(flags)
            .u16(fragment)
            .u8(0x5a);
    }
    p
}

fn media_programs() -> Vec<(String, Vec<u8>)> {
    let deadline = Op::Deadline as u8;
    let mut seeds = Vec::new();
    let mut audio = frame_program(0, 0, 0, 0, 80, &[0]);
    audio.u8(Op::Advance as u8).u16(20);
    for id in 1..4u32 {
        let next = frame_program(0, 0, id, id * 20, 80, &[0]).finish();
        audio.bytes(&next[1..]).u8(Op::Advance as u8).u16(20);
    }
    audio.u8(deadline).u8(Op::Report as u8);
    seeds.push(("audio-in-order".to_owned(), audio.finish()));
    let mut video = frame_program(0, 1, 0, 0, 1200, &[2, 0, 1]);
    video.u8(deadline).u8(Op::Report as u8);
    seeds.push(("video-reordered".to_owned(), video.finish()));
    let mut replay = frame_program(0, 1, 0, 0, 1200, &[0, 1]);
    replay
        .u8(Op::Replay as u8)
        .u8(0)
        .u8(Op::Tamper as u8)
        .u8(1)
        .u16(20)
        .u8(0x80);
    replay
        .u8(Op::Lose as u8)
        .u8(1)
        .u8(70)
        .u8(Op::Replay as u8)
        .u8(1)
        .u8(deadline);
    seeds.push(("replay-tamper-lose".to_owned(), replay.finish()));
    let mut partial = frame_program(4, 1, 0, 0, 1200, &[0, 1]);
    let next = frame_program(4, 1, 1, 33, 100, &[0]).finish();
    partial.bytes(&next[1..]).u8(deadline).u8(deadline).u8(Op::Report as u8);
    seeds.push(("partial-overtaken".to_owned(), partial.finish()));
    let mut evict = frame_program(3, 2, 0, 0, 10, &[0]);
    for id in 1..7u32 {
        let next = frame_program(3, 2, id * 2, id, 900, &[1]).finish();
        evict.bytes(&next[1..]);
    }
    evict.u8(Op::Raw as u8).short_bytes(&[0x12; 40]).u8(deadline);
    seeds.push(("evict-arrival-playout".to_owned(), evict.finish()));
    seeds
}

/// A call's worth of sending and feedback: packets sent every 10 ms, feedback every 40 ms
/// acknowledging them (arriving 20 ms later, one in ten lost), a relay budget, silence.
fn feedback_programs() -> Vec<(String, Vec<u8>)> {
    use natcall_media::{Arrival, Feedback, TrackCount};
    let mut p = Program::new();
    let (mut seq, mut received, mut bytes) = (0u32, 0u32, 0u64);
    let mut arrivals = Vec::new();
    for tick in 0..40u32 {
        p.u8(FeedbackOp::Send as u8).u8(1).u8(4).u16(500);
        for i in 0..4 {
            if (seq + i) % 10 != 9 {
                arrivals.push(Arrival {
                    track: Track::VIDEO,
                    sequence: seq + i,
                    at_us: u64::from(tick) * 10_000 + 20_000 + u64::from(i) * 500,
                });
                received += 1;
                bytes += 500;
            }
        }
        seq += 4;
        p.u8(FeedbackOp::Advance as u8).u16(10);
        if tick % 4 == 3 {
            let f = Feedback {
                seq: (tick / 4) as u16,
                received_bytes: bytes,
                at_us: u64::from(tick) * 10_000 + 20_000,
                counts: vec![TrackCount {
                    track: Track::VIDEO,
                    highest: seq - 1,
                    received,
                }],
                arrivals: std::mem::take(&mut arrivals),
            };
            p.u8(FeedbackOp::Datagram as u8).long_bytes(&f.encode());
        }
    }
    let mut budget = p.clone();
    budget.u8(FeedbackOp::Budget as u8).u32(200_000);
    budget.u8(FeedbackOp::Max as u8).u32(150_000);
    let mut silent = p.clone();
    silent.u8(FeedbackOp::Advance as u8).u16(1_500);
    vec![
        ("acked-with-loss".to_owned(), p.finish()),
        ("budget-and-ceiling".to_owned(), budget.finish()),
        ("silence".to_owned(), silent.finish()),
    ]
}

/// `room_receiver` programs: keys handed over, audio and a two-packet video frame from two
/// senders, a rekey, a replay, a tamper, a departure, and a key message.
fn room_programs() -> Vec<(String, Vec<u8>)> {
    use crate::room::RoomOp;
    let seal = |p: &mut Program, key: u8, track: u8, frame: u32, index: u16, count: u16, len: u16| {
        let mut flags = 0;
        if index == 0 {
            flags |= natcall_media::Flags::FRAME_START;
        }
        if index + 1 == count {
            flags |= natcall_media::Flags::FRAME_END;
        }
        p.u8(RoomOp::Seal as u8)
            .u8(key)
            .u8(track)
            .u32(frame * 20)
            .u32(frame)
            .u16(index)
            .u16(count)
            .u8(flags)
            .u16(len)
            .u8(0x5a);
    };
    let mut seeds = Vec::new();
    let mut two = Program::new();
    two.u8(RoomOp::Key as u8).u8(0).u8(0).u8(RoomOp::Key as u8).u8(1).u8(1);
    for frame in 0..4u32 {
        seal(&mut two, 0, 0, frame, 0, 1, 80);
        seal(&mut two, 1, 0, frame, 0, 1, 80);
        two.u8(RoomOp::Advance as u8).u16(20);
    }
    seal(&mut two, 1, 1, 0, 0, 2, 478);
    seal(&mut two, 1, 1, 0, 1, 2, 100);
    two.u8(RoomOp::Advance as u8).u16(200).u8(RoomOp::Report as u8);
    seeds.push(("two-senders".to_owned(), two.finish()));
    let mut rekey = Program::new();
    rekey.u8(RoomOp::Key as u8).u8(0).u8(0);
    seal(&mut rekey, 0, 0, 0, 0, 1, 80);
    // The same id with another secret, then a new key: the old one is kept for packets on
    // their way, the one before it forgotten.
    rekey
        .u8(RoomOp::Key as u8)
        .u8(0)
        .u8(4)
        .u8(RoomOp::Key as u8)
        .u8(0)
        .u8(2);
    seal(&mut rekey, 2, 0, 1, 0, 1, 80);
    seal(&mut rekey, 4, 0, 2, 0, 1, 80);
    rekey.u8(RoomOp::Key as u8).u8(0).u8(3);
    seal(&mut rekey, 0, 0, 3, 0, 1, 80);
    rekey
        .u8(RoomOp::Replay as u8)
        .u8(1)
        .u8(RoomOp::Tamper as u8)
        .u8(0)
        .u16(2)
        .u8(0x40);
    rekey.u8(RoomOp::Remove as u8).u8(0);
    seal(&mut rekey, 3, 0, 4, 0, 1, 80);
    rekey.u8(RoomOp::Key as u8).u8(1).u8(3).u8(RoomOp::Report as u8);
    seeds.push(("rekey-replay-leave".to_owned(), rekey.finish()));
    let mut raw = Program::new();
    raw.u8(RoomOp::KeyMessage as u8)
        .short_bytes(&crate::room::key(5).encode())
        .u8(RoomOp::Raw as u8)
        .short_bytes(&[0, 0, 0, 6, 0x11, 0, 0, 0, 0]);
    seeds.push(("key-message-raw".to_owned(), raw.finish()));
    seeds
}
