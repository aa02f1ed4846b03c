//! `stun_server`: a UDP datagram at the rendezvous server's STUN responder, and the STUN
//! helpers of `natcall-proto` both sides use.
//!
//! The first input byte picks the source address (bit 0: IPv4 or IPv6) and the mode (bit 7):
//! - **raw**: the rest is the datagram. Whatever the responder answers is a Binding success
//!   for the request's transaction that tells the source its address, signed when the request
//!   authenticated with the registered token, and at most [`AMPLIFICATION_LIMIT`] times the
//!   request's size when not.
//! - **token**: the next 12 bytes are a transaction id; the target encodes a Binding request
//!   authenticated with the registered peer's token (whose password is random per process, so
//!   no corpus could carry it), then applies the rest as `(offset, xor)` byte pairs. Unchanged,
//!   it must be answered, signed, and record the source as the peer's public address.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use natcall_proto::stun::{self, BindingRequest, MAX_STUN_MESSAGE};
use natcall_rendezvous::stun::{AMPLIFICATION_LIMIT, FuzzResponder};

use crate::input::Input;

/// The address a `stun_server` input's first byte selects.
pub fn source(selector: u8) -> SocketAddr {
    if selector & 1 == 0 {
        SocketAddr::from((Ipv4Addr::new(203, 0, 113, 7), 40_001))
    } else {
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7), 65_535))
    }
}

/// The mode bit of a `stun_server` input's first byte: a token request.
pub const TOKEN_MODE: u8 = 0x80;

fn responder() -> &'static FuzzResponder {
    static RESPONDER: OnceLock<FuzzResponder> = OnceLock::new();
    RESPONDER.get_or_init(|| FuzzResponder::new().expect("an empty in-memory registry takes one peer"))
}

/// The `stun_server` target.
pub fn stun_server(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let src = source(first);
    if first & TOKEN_MODE == 0 {
        check_helpers(rest);
        answer(rest, src);
    } else {
        token_request(rest, src);
    }
}

/// Runs the responder on `req` and checks its answer; returns whether it answered signed.
fn answer(req: &[u8], src: SocketAddr) -> Option<bool> {
    answer_by(responder(), req, src)
}

fn answer_by(responder: &FuzzResponder, req: &[u8], src: SocketAddr) -> Option<bool> {
    let mut out = [0u8; 256];
    let len = responder.answer(req, src, &mut out)?;
    let response = &out[..len];
    let parsed = stun::parse_binding_request(req).expect("only a Binding request is answered");
    let token = responder.token();
    let signed = parsed.has_integrity && parsed.username.as_deref() == Some(token.username.as_str());
    let password = signed.then_some(token.password.as_str());
    if !signed && (parsed.change.ip || parsed.change.port) {
        // The fuzz responder has one STUN socket: a change it cannot make is refused (420).
        assert_eq!(
            stun::parse_binding_answer(response, &parsed.transaction_id),
            Err(stun::StunError::Refused(420)),
            "an impossible CHANGE-REQUEST is not refused"
        );
        assert!(
            len <= AMPLIFICATION_LIMIT * req.len(),
            "{len}-byte refusal to {} bytes",
            req.len()
        );
        return Some(false);
    }
    let mapped = stun::parse_binding_success(response, &parsed.transaction_id, password);
    assert_eq!(mapped, Ok(src), "the answer does not tell the source its address");
    if signed {
        assert_eq!(
            responder.public_udp(),
            Some(src),
            "an authenticated binding was not recorded"
        );
    } else {
        assert!(
            len <= AMPLIFICATION_LIMIT * req.len(),
            "{len}-byte answer to {} bytes",
            req.len()
        );
    }
    Some(signed)
}

fn token_request(rest: &[u8], src: SocketAddr) {
    let mut input = Input::new(rest);
    let transaction_id = input.array::<12>();
    // A fresh registry per input: a token binding is accepted only when its sequence number
    // (the transaction id's first 8 bytes) is newer than the last accepted, here none (0).
    let fresh = FuzzResponder::new().expect("an empty in-memory registry takes one peer");
    let mut req = [0u8; 256];
    let len =
        stun::encode_binding_request(&transaction_id, Some(fresh.token()), &mut req).expect("a token request encodes");
    let mut req = req[..len].to_vec();
    let mut changed = false;
    while !input.is_empty() {
        let (at, xor) = (usize::from(input.u8()), input.u8());
        if let Some(b) = req.get_mut(at) {
            *b ^= xor;
            changed |= xor != 0;
        }
    }
    check_helpers(&req);
    let signed = answer_by(&fresh, &req, src);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&transaction_id[..8]);
    let seq = u64::from_be_bytes(seq);
    if !changed {
        let expected = (seq > 0).then_some(true);
        assert_eq!(signed, expected, "a valid token binding with sequence {seq}");
    }
    // The same bytes again from elsewhere: a replay, never answered, the address stays.
    if signed == Some(true) {
        let elsewhere = SocketAddr::from(([203, 0, 113, 9], src.port().wrapping_add(1)));
        assert_eq!(
            answer_by(&fresh, &req, elsewhere),
            None,
            "a replayed binding was answered"
        );
        assert_eq!(fresh.public_udp(), Some(src), "a replay moved the recorded address");
    }
}

/// The proto-level parsers on any datagram: no panics, and they agree with each other.
fn check_helpers(data: &[u8]) {
    let _ = stun::classify(data);
    let peek = stun::peek(data);
    if peek.is_some() {
        assert!(stun::looks_like_stun(data));
    }
    let request = stun::parse_binding_request(data);
    if let Ok(BindingRequest { transaction_id, .. }) = &request {
        assert!(data.len() <= MAX_STUN_MESSAGE);
        let peek = peek.expect("a Binding request peeks");
        assert!(peek.request);
        assert_eq!(&peek.transaction_id, transaction_id);
    }
    let transaction_id = peek.map_or([0; 12], |p| p.transaction_id);
    if stun::parse_binding_success(data, &transaction_id, None).is_ok() {
        assert!(request.is_err(), "a message is both a request and a response");
    }
    let _ = stun::parse_binding_success(data, &transaction_id, Some("fuzz-password"));
    let _ = stun::verify_integrity(data, "fuzz-password");
}
