//! Property tests of every decoder: round-trips, and truncated, bit-flipped or random input
//! never panics and yields a typed error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BytesMut;
use natcall_proto::codec::decode_control;
use natcall_proto::control::{
    CallFailure, CallStart, Candidates, ClientMsg, Decline, Fingerprint, Mapping, PathKind, Policy, Reply, RoomMember,
    RoomRefusal, ServerMsg,
};
use natcall_proto::frame::{self, DEFAULT_MAX_FRAME_LEN, ErrorCode, Frame, FrameDecoder, FrameError, MAX_ERROR_TEXT};
use natcall_proto::relay::{RelayFlags, RelayHeader, TrafficClass};
use natcall_proto::stun::{self, StunError, TokenCredentials};
use proptest::prelude::*;

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
        (any::<u128>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
    ]
}

fn client_msg() -> impl Strategy<Value = ClientMsg> {
    prop_oneof![
        (
            "[a-z0-9._-]{1,32}",
            prop::collection::vec(any::<u8>(), 0..600),
            prop::collection::vec(any::<u8>(), 0..80),
            prop::collection::vec(addr(), 0..8)
        )
            .prop_map(|(name, cert, signature, lan_addrs)| ClientMsg::Register {
                name,
                cert,
                signature,
                lan_addrs
            }),
        "\\PC{0,40}".prop_map(|name| ClientMsg::Lookup { name }),
        any::<u64>().prop_map(|nonce| ClientMsg::Pong { nonce }),
        (any::<u32>(), "[a-z]{1,32}", policy()).prop_map(|(request, callee, policy)| ClientMsg::Call {
            request,
            callee,
            policy
        }),
        (any::<u32>(), any::<bool>()).prop_map(|(call, accept)| ClientMsg::Answer { call, accept }),
        (any::<u32>(), "\\PC{0,40}").prop_map(|(call, reason)| ClientMsg::Hangup { call, reason }),
        any::<u32>().prop_map(|frames| ClientMsg::RelayAck { frames }),
        (
            any::<u32>(),
            prop_oneof![Just(PathKind::Lan), Just(PathKind::Direct), Just(PathKind::Relay)]
        )
            .prop_map(|(call, path)| ClientMsg::CallPath { call, path }),
        (any::<u32>(), "[a-z]{1,32}", any::<[u8; 32]>()).prop_map(|(call, peer, proof)| ClientMsg::Resume {
            call,
            peer,
            proof
        }),
        Just(ClientMsg::ReleaseName),
        ("[a-z]{1,32}", prop::collection::vec("[a-z]{1,32}", 0..5))
            .prop_map(|(room, invite)| ClientMsg::RoomCreate { room, invite }),
        ("[a-z]{1,32}", prop::option::of("[a-z2-9]{12}")).prop_map(|(room, code)| ClientMsg::RoomJoin { room, code }),
        "[a-z]{1,32}".prop_map(|room| ClientMsg::RoomLeave { room }),
        (any::<u32>(), reply()).prop_map(|(call, reply)| ClientMsg::Reply { call, reply }),
        (mapping(), prop::option::of(addr()))
            .prop_map(|(mapping, port_mapped)| ClientMsg::NatMapping { mapping, port_mapped }),
    ]
}

fn decline() -> impl Strategy<Value = Decline> {
    prop_oneof![
        Just(Decline::Declined),
        Just(Decline::Busy),
        policy().prop_map(|allowed| Decline::Policy { allowed }),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        policy().prop_map(|policy| Reply::Accept { policy }),
        decline().prop_map(Reply::Decline),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::Auto),
        Just(Policy::DirectOnly),
        Just(Policy::RelayOnly),
        Just(Policy::LanOnly)
    ]
}

fn server_msg() -> impl Strategy<Value = ServerMsg> {
    prop_oneof![
        (any::<[u8; 32]>(), addr()).prop_map(|(challenge, observed)| ServerMsg::Welcome { challenge, observed }),
        (
            "[a-z]{1,32}",
            any::<[u8; 32]>(),
            "[a-z0-9:]{1,40}",
            "[a-f0-9]{32}",
            prop::option::of(addr()),
            prop::option::of(any::<u16>()),
        )
            .prop_map(
                |(name, fp, username, password, stun_addr, stun_alt_port)| ServerMsg::Registered {
                    name,
                    fingerprint: Fingerprint(fp),
                    token: TokenCredentials { username, password },
                    stun_addr,
                    relay_ack_every: 16,
                    stun_alt_port,
                }
            ),
        ("\\PC{0,32}", any::<bool>(), prop::option::of(any::<[u8; 32]>())).prop_map(|(name, online, fp)| {
            ServerMsg::Presence {
                name,
                online,
                fingerprint: fp.map(Fingerprint),
            }
        }),
        (any::<u64>(), prop::option::of(any::<u64>())).prop_map(|(nonce, rtt_us)| ServerMsg::Ping { nonce, rtt_us }),
        ("\\PC{0,64}", any::<u32>()).prop_map(|(reason, reconnect_after_ms)| ServerMsg::GoingAway {
            reason,
            reconnect_after_ms
        }),
        (any::<u32>(), any::<u32>()).prop_map(|(request, call)| ServerMsg::Ringing { request, call }),
        (
            any::<u32>(),
            "[a-z]{1,32}",
            prop_oneof![
                Just(CallFailure::Offline),
                Just(CallFailure::SelfCall),
                Just(CallFailure::Busy),
                Just(CallFailure::AlreadyRinging),
                Just(CallFailure::RateLimited),
            ]
        )
            .prop_map(|(request, callee, failure)| ServerMsg::CallFailed {
                request,
                callee,
                failure
            }),
        (any::<u32>(), "[a-z]{1,32}", any::<[u8; 32]>(), policy()).prop_map(|(call, caller, fp, policy)| {
            ServerMsg::Incoming {
                call,
                caller,
                fingerprint: Fingerprint(fp),
                policy,
            }
        }),
        start().prop_map(ServerMsg::Start),
        (any::<u32>(), "\\PC{0,40}").prop_map(|(call, reason)| ServerMsg::CallEnded { call, reason }),
        any::<u32>().prop_map(|call| ServerMsg::CallSuspended { call }),
        (any::<u32>(), any::<u32>()).prop_map(|(call, id)| ServerMsg::Resumed { call, id }),
        (any::<u32>(), "\\PC{0,40}").prop_map(|(call, reason)| ServerMsg::ResumeFailed { call, reason }),
        "[a-z]{1,32}".prop_map(|name| ServerMsg::NameReleased { name }),
        ("[a-z]{1,32}", "\\PC{0,40}").prop_map(|(name, reason)| ServerMsg::LookupFailed { name, reason }),
        (any::<u32>(), any::<u64>(), any::<u32>()).prop_map(|(call, bps, dropped)| ServerMsg::RelayBudget {
            call,
            bps,
            dropped
        }),
        (
            "[a-z]{1,32}",
            any::<u32>(),
            prop::option::of("[a-z2-9]{12}"),
            prop::collection::vec(room_member(), 0..4)
        )
            .prop_map(|(room, id, code, members)| ServerMsg::RoomJoined {
                room,
                id,
                code,
                members
            }),
        ("[a-z]{1,32}", room_refusal(), "\\PC{0,40}").prop_map(|(room, refusal, reason)| ServerMsg::RoomRefused {
            room,
            refusal,
            reason
        }),
        ("[a-z]{1,32}", room_member()).prop_map(|(room, member)| ServerMsg::RoomMemberJoined { room, member }),
        ("[a-z]{1,32}", start()).prop_map(|(room, start)| ServerMsg::RoomPeer { room, start }),
        ("[a-z]{1,32}", "[a-z]{1,32}", "\\PC{0,40}").prop_map(|(room, name, reason)| ServerMsg::RoomMemberLeft {
            room,
            name,
            reason
        }),
        (any::<u32>(), decline()).prop_map(|(call, decline)| ServerMsg::CallDeclined { call, decline }),
        addr().prop_map(|by| ServerMsg::Replaced { by }),
    ]
}

fn mapping() -> impl Strategy<Value = Mapping> {
    prop_oneof![
        Just(Mapping::Unknown),
        Just(Mapping::Independent),
        any::<i32>().prop_map(|step| Mapping::Dependent { step }),
    ]
}

fn start() -> impl Strategy<Value = CallStart> {
    (
        (any::<u32>(), "[a-z]{1,32}", any::<[u8; 32]>()),
        (
            prop::option::of(addr()),
            prop::collection::vec(addr(), 0..8),
            mapping(),
            prop::option::of(addr()),
        ),
        ("[a-f0-9]{32}", any::<bool>(), any::<u32>(), policy()),
    )
        .prop_map(
            |((call, peer, fp), (public, lan, mapping, port_mapped), (password, controlling, delay_ms, policy))| {
                CallStart {
                    call,
                    peer,
                    fingerprint: Fingerprint(fp),
                    candidates: Candidates {
                        public,
                        lan,
                        mapping,
                        port_mapped,
                    },
                    password,
                    controlling,
                    delay_ms,
                    policy,
                }
            },
        )
}

fn room_member() -> impl Strategy<Value = RoomMember> {
    ("[a-z]{1,32}", any::<[u8; 32]>()).prop_map(|(name, fp)| RoomMember {
        name,
        fingerprint: Fingerprint(fp),
    })
}

fn room_refusal() -> impl Strategy<Value = RoomRefusal> {
    prop_oneof![
        Just(RoomRefusal::InvalidName),
        Just(RoomRefusal::Exists),
        Just(RoomRefusal::NoSuchRoom),
        Just(RoomRefusal::NotInvited),
        Just(RoomRefusal::Full),
        Just(RoomRefusal::TooManyRooms),
        Just(RoomRefusal::PeerRoomLimit),
        Just(RoomRefusal::AlreadyMember),
        Just(RoomRefusal::RateLimited),
    ]
}

fn relay_header() -> impl Strategy<Value = RelayHeader> {
    (any::<u32>(), 0u8..3, any::<u8>()).prop_map(|(call, c, flags)| RelayHeader {
        call,
        class: TrafficClass::ALL[c as usize],
        flags: RelayFlags(flags),
    })
}

/// Decodes every frame in `wire` and every control message in them; returns how many frames
/// decoded, or the first error. Must never panic.
fn decode_all(wire: &[u8]) -> Result<usize, FrameError> {
    let decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    let mut buf = BytesMut::from(wire);
    let mut n = 0;
    while let Some(raw) = decoder.decode(&mut buf)? {
        match raw.parse()? {
            Frame::Control(body) => {
                // Either direction's messages may be thrown at a decoder.
                let a = decode_control::<ClientMsg>(body);
                let b = decode_control::<ServerMsg>(body);
                if a.is_err() && b.is_err() {
                    return Err(a.expect_err("checked"));
                }
            }
            Frame::Hello(_) | Frame::Relay { .. } | Frame::Error(_) => {}
        }
        n += 1;
    }
    Ok(n)
}

fn one_frame(buf: &mut BytesMut) -> natcall_proto::frame::RawFrame {
    FrameDecoder::new(DEFAULT_MAX_FRAME_LEN)
        .decode(buf)
        .expect("valid")
        .expect("whole frame")
}

proptest! {
    #[test]
    fn client_messages_round_trip(msg in client_msg()) {
        let mut wire = BytesMut::new();
        frame::encode_control(&msg, &mut wire).expect("encodes");
        let total = wire.len();
        let raw = one_frame(&mut wire);
        prop_assert_eq!(raw.wire().len(), total);
        let Frame::Control(body) = raw.parse().expect("parses") else { panic!("not control") };
        prop_assert_eq!(decode_control::<ClientMsg>(body).expect("decodes"), msg);
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn server_messages_round_trip(msg in server_msg()) {
        let mut wire = BytesMut::new();
        frame::encode_control(&msg, &mut wire).expect("encodes");
        let raw = one_frame(&mut wire);
        let Frame::Control(body) = raw.parse().expect("parses") else { panic!("not control") };
        prop_assert_eq!(decode_control::<ServerMsg>(body).expect("decodes"), msg);
    }

    #[test]
    fn relay_frames_round_trip(h in relay_header(), payload in prop::collection::vec(any::<u8>(), 0..1500)) {
        let mut wire = BytesMut::new();
        frame::encode_relay(&h, &payload, &mut wire).expect("encodes");
        prop_assert_eq!(wire.len(), 4 + 1 + 6 + payload.len());
        let raw = one_frame(&mut wire);
        let Frame::Relay { header, payload: p } = raw.parse().expect("parses") else { panic!("not relay") };
        prop_assert_eq!(header, h);
        prop_assert_eq!(p, &payload[..]);
    }

    #[test]
    fn error_frames_round_trip(code in 0u16..200, text in "\\PC{0,1200}") {
        let mut wire = BytesMut::new();
        frame::encode_error(ErrorCode::from_u16(code), &text, &mut wire);
        let raw = one_frame(&mut wire);
        let Frame::Error(e) = raw.parse().expect("parses") else { panic!("not error") };
        prop_assert_eq!(e.code.to_u16(), code);
        prop_assert!(e.message.len() <= MAX_ERROR_TEXT);
        prop_assert!(text.starts_with(&e.message));
    }

    #[test]
    fn every_strict_prefix_of_a_frame_asks_for_more(msg in client_msg(), cut in any::<prop::sample::Index>()) {
        let mut wire = BytesMut::new();
        frame::encode_control(&msg, &mut wire).expect("encodes");
        let cut = cut.index(wire.len());
        let mut partial = BytesMut::from(&wire[..cut]);
        prop_assert_eq!(FrameDecoder::new(DEFAULT_MAX_FRAME_LEN).decode(&mut partial), Ok(None));
    }

    #[test]
    fn truncated_control_bodies_are_typed_errors(msg in server_msg(), cut in any::<prop::sample::Index>()) {
        let mut body = BytesMut::new();
        natcall_proto::codec::encode_control_body(&msg, &mut body).expect("encodes");
        let cut = cut.index(body.len());
        let r = decode_control::<ServerMsg>(&body[..cut]);
        prop_assert!(matches!(r, Err(FrameError::Malformed(_))), "{:?}", r);
    }

    #[test]
    fn flipped_bits_never_panic(msg in client_msg(), bit in any::<prop::sample::Index>()) {
        let mut wire = BytesMut::new();
        frame::encode_control(&msg, &mut wire).expect("encodes");
        let bit = bit.index(wire.len() * 8);
        wire[bit / 8] ^= 1 << (bit % 8);
        let _ = decode_all(&wire);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_all(&bytes);
        let _ = stun::parse_binding_request(&bytes);
        let _ = stun::parse_binding_success(&bytes, &[0; 12], None);
        let _ = stun::parse_binding_success(&bytes, &[0; 12], Some("pw"));
        let _ = stun::verify_integrity(&bytes, "pw");
        let _ = stun::classify(&bytes);
    }

    #[test]
    fn random_stun_shaped_bytes_never_panic(tail in prop::collection::vec(any::<u8>(), 0..200), ty in 0u16..0x4000) {
        let mut m = Vec::with_capacity(20 + tail.len());
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&(tail.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        m.extend_from_slice(&[9; 12]);
        m.extend_from_slice(&tail);
        let _ = stun::parse_binding_request(&m);
        let _ = stun::parse_binding_success(&m, &[9; 12], Some("pw"));
    }

    #[test]
    fn stun_binding_round_trips(tid in any::<[u8; 12]>(), mapped in addr(), with_token in any::<bool>()) {
        let token = TokenCredentials { username: "nc1:0123456789abcdef".into(), password: "s3cret".into() };
        let token = with_token.then_some(&token);
        let mut buf = [0u8; 600];
        let n = stun::encode_binding_request(&tid, token, &mut buf).expect("encodes");
        let req = stun::parse_binding_request(&buf[..n]).expect("parses");
        prop_assert_eq!(req.transaction_id, tid);
        prop_assert_eq!(req.username.as_deref(), token.map(|t| t.username.as_str()));
        prop_assert_eq!(req.has_integrity, with_token);
        if let Some(t) = token {
            prop_assert_eq!(stun::verify_integrity(&buf[..n], &t.password), Ok(()));
            prop_assert_eq!(stun::verify_integrity(&buf[..n], "wrong"), Err(StunError::Integrity));
        }
        let password = token.map(|t| t.password.as_str());
        let mut out = [0u8; 600];
        let m = stun::encode_binding_success(&tid, mapped, password, &mut out).expect("encodes");
        prop_assert_eq!(stun::parse_binding_success(&out[..m], &tid, password), Ok(mapped));
        let mut flipped = out;
        flipped[m - 1] ^= 0x10;
        prop_assert!(stun::parse_binding_success(&flipped[..m], &tid, password).is_err());
    }
}

#[test]
fn an_oversized_length_is_refused_before_the_body_arrives() {
    let mut buf = BytesMut::from(&(1_000_000u32).to_be_bytes()[..]);
    assert_eq!(
        FrameDecoder::new(DEFAULT_MAX_FRAME_LEN).decode(&mut buf),
        Err(FrameError::TooLarge {
            len: 1_000_000,
            max: DEFAULT_MAX_FRAME_LEN as usize
        })
    );
    let mut empty = BytesMut::from(&[0u8, 0, 0, 0][..]);
    assert_eq!(
        FrameDecoder::new(DEFAULT_MAX_FRAME_LEN).decode(&mut empty),
        Err(FrameError::Empty)
    );
}

#[test]
fn a_version_mismatch_names_both_versions() {
    let mut wire = BytesMut::new();
    frame::encode_hello(7, &mut wire);
    let raw = one_frame(&mut wire);
    let Frame::Hello(h) = raw.parse().expect("parses") else {
        panic!("not hello")
    };
    assert_eq!(h.version, 7);
    assert_eq!(h.check(7), Ok(()));
    let err = h.check(1).expect_err("mismatch");
    assert_eq!(
        err.to_string(),
        "protocol version mismatch: this side speaks version 1, the other side version 7"
    );
}

#[test]
fn a_hello_without_the_magic_is_refused() {
    let mut wire = BytesMut::from(&[0u8, 0, 0, 10, 0, b'H', b'T', b'T', b'P', b'/', b'1', b'.', 0, 1][..]);
    let raw = one_frame(&mut wire);
    assert_eq!(raw.parse(), Err(FrameError::BadMagic));
}

#[test]
fn unknown_kinds_and_classes_are_typed_errors() {
    let mut wire = BytesMut::from(&[0u8, 0, 0, 1, 0x55][..]);
    assert_eq!(one_frame(&mut wire).parse(), Err(FrameError::UnknownKind(0x55)));
    let mut wire = BytesMut::from(&[0u8, 0, 0, 7, 0x02, 0, 0, 0, 1, 9, 0][..]);
    assert_eq!(one_frame(&mut wire).parse(), Err(FrameError::UnknownClass(9)));
    let mut wire = BytesMut::from(&[0u8, 0, 0, 3, 0x02, 0, 0][..]);
    assert!(matches!(
        one_frame(&mut wire).parse(),
        Err(FrameError::Truncated { .. })
    ));
}

#[test]
fn fingerprints_print_and_parse_as_hex() {
    let fp = Fingerprint([0xab; 32]);
    let text = fp.to_string();
    assert_eq!(text.len(), 64);
    assert_eq!(text.parse::<Fingerprint>(), Ok(fp));
    assert!("abc".parse::<Fingerprint>().is_err());
    assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
}

#[test]
fn policies_parse_and_print() {
    for p in [Policy::Auto, Policy::DirectOnly, Policy::RelayOnly, Policy::LanOnly] {
        assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
    }
    assert_eq!(
        "direct".parse::<Policy>(),
        Err("unknown policy \"direct\": use auto, direct-only, relay-only or lan-only".to_string())
    );
}

#[test]
fn a_call_runs_under_the_stricter_of_both_policies() {
    use Policy::*;
    let all = [Auto, DirectOnly, RelayOnly, LanOnly];
    for p in all {
        assert_eq!(Auto.combine(p), Some(p), "auto yields to {p}");
        assert_eq!(p.combine(Auto), Some(p), "auto yields to {p}");
        assert_eq!(p.combine(p), Some(p), "{p} agrees with itself");
        for q in all {
            assert_eq!(p.combine(q), q.combine(p), "{p} and {q} combine either way");
        }
    }
    assert_eq!(RelayOnly.combine(DirectOnly), None);
    assert_eq!(DirectOnly.combine(LanOnly), None);
    assert_eq!(LanOnly.combine(RelayOnly), None);
}

/// Variants are only appended: the messages of version 6 take the next indices, and the ones
/// before keep theirs (bincode writes the index first, one byte below 251).
#[test]
fn version_6_messages_are_appended_after_the_old_ones() {
    fn index<T: serde::Serialize>(msg: &T) -> u8 {
        let mut wire = BytesMut::new();
        frame::encode_control(msg, &mut wire).expect("encodes");
        let raw = one_frame(&mut wire);
        let Frame::Control(body) = raw.parse().expect("parses") else {
            panic!("not control")
        };
        body[0]
    }
    assert_eq!(index(&ClientMsg::Answer { call: 1, accept: true }), 4);
    assert_eq!(index(&ClientMsg::RoomLeave { room: "r".into() }), 12);
    let reply = ClientMsg::Reply {
        call: 1,
        reply: Reply::Decline(Decline::Busy),
    };
    assert_eq!(index(&reply), 13);
    assert_eq!(
        index(&ServerMsg::CallEnded {
            call: 1,
            reason: String::new()
        }),
        9
    );
    assert_eq!(
        index(&ServerMsg::RoomMemberLeft {
            room: "r".into(),
            name: "n".into(),
            reason: String::new()
        }),
        19
    );
    let declined = ServerMsg::CallDeclined {
        call: 1,
        decline: Decline::Policy {
            allowed: Policy::RelayOnly,
        },
    };
    assert_eq!(index(&declined), 21);
    let replaced = ServerMsg::Replaced {
        by: "192.0.2.7:40000".parse().expect("addr"),
    };
    assert_eq!(index(&replaced), 22);
    for msg in [declined, replaced] {
        let mut wire = BytesMut::new();
        frame::encode_control(&msg, &mut wire).expect("encodes");
        let raw = one_frame(&mut wire);
        let Frame::Control(body) = raw.parse().expect("parses") else {
            panic!("not control")
        };
        assert_eq!(decode_control::<ServerMsg>(body).expect("decodes"), msg);
    }
}

#[test]
fn names_are_checked() {
    use natcall_proto::control::{NameError, validate_name};
    assert_eq!(validate_name("alice-2.home_x"), Ok(()));
    assert_eq!(validate_name(""), Err(NameError::Length(0)));
    assert_eq!(validate_name(&"a".repeat(33)), Err(NameError::Length(33)));
    assert_eq!(validate_name("Alice"), Err(NameError::Character('A')));
    assert_eq!(validate_name("al ice"), Err(NameError::Character(' ')));
}

#[test]
fn datagrams_are_demultiplexed_by_first_byte() {
    use natcall_proto::stun::PacketClass;
    let mut buf = [0u8; 100];
    let n = stun::encode_binding_request(&[1; 12], None, &mut buf).expect("encodes");
    assert_eq!(stun::classify(&buf[..n]), PacketClass::Stun);
    assert_eq!(stun::classify(&[0u8; 10]), PacketClass::Unknown);
    assert_eq!(stun::classify(&[16, 1, 2]), PacketClass::Media);
    assert_eq!(stun::classify(&[63]), PacketClass::Media);
    assert_eq!(stun::classify(&[0x40]), PacketClass::Quic);
    assert_eq!(stun::classify(&[0xc3, 0, 0, 0, 1]), PacketClass::Quic);
    assert_eq!(stun::classify(&[0x80]), PacketClass::Unknown);
    assert_eq!(stun::classify(&[]), PacketClass::Unknown);
}
