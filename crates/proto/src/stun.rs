//! STUN helpers (RFC 8489) built on `stun-rs`, and the first-byte demultiplexing of the peer's
//! one UDP socket (RFC 7983 / RFC 9443).
//!
//! The rendezvous server answers Binding requests with XOR-MAPPED-ADDRESS and FINGERPRINT.
//! A request whose USERNAME is a registration token ([`TokenCredentials`], handed out in
//! [`crate::control::ServerMsg::Registered`]) must carry a valid MESSAGE-INTEGRITY keyed with
//! the token's password; the server then records the request's source address as that peer's
//! public address and signs its answer with the same key.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use stun_rs::attributes::discovery::{ChangeRequest, ChangeRequestFlags, OtherAddress, ResponseOrigin};
use stun_rs::attributes::stun::{ErrorCode, Fingerprint, MessageIntegrity, UserName, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{
    DecoderContextBuilder, HMACKey, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessage,
    StunMessageBuilder, TransactionId,
};

/// The largest STUN message the server accepts: a datagram that fits the 576-byte IPv4
/// minimum reassembly size with IP and UDP headers.
pub const MAX_STUN_MESSAGE: usize = 548;
/// STUN header length.
pub const STUN_HEADER_LEN: usize = 20;
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// What a datagram on the peer's socket is, by its first byte (RFC 9443).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketClass {
    /// 0–3, with the STUN magic cookie.
    Stun,
    /// 16–63: natcall media packets.
    Media,
    /// 64–127 and 192–255: QUIC (the fixed bit is always set: `grease_quic_bit(false)`).
    Quic,
    /// Anything else: dropped.
    Unknown,
}

/// Classifies a datagram by its first byte.
pub fn classify(data: &[u8]) -> PacketClass {
    match data.first() {
        Some(0..=3) if looks_like_stun(data) => PacketClass::Stun,
        Some(16..=63) => PacketClass::Media,
        Some(64..=127 | 192..=255) => PacketClass::Quic,
        _ => PacketClass::Unknown,
    }
}

/// A STUN header: first byte 0–3, length a multiple of 4 matching the datagram, magic cookie.
pub fn looks_like_stun(data: &[u8]) -> bool {
    data.len() >= STUN_HEADER_LEN
        && data[0] < 4
        && data[4..8] == MAGIC_COOKIE
        && usize::from(u16::from_be_bytes([data[2], data[3]])) == data.len() - STUN_HEADER_LEN
}

/// What routing needs of a STUN message, read without checking its integrity (the receiver of
/// the message does that): its class, transaction id and USERNAME.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunPeek<'a> {
    /// A request (class bits 00); otherwise a response or an indication.
    pub request: bool,
    /// The transaction id.
    pub transaction_id: [u8; 12],
    /// The USERNAME attribute, when present and UTF-8.
    pub username: Option<&'a str>,
}

/// Reads the header and the USERNAME attribute of a STUN message; `None` if it is not one.
/// Never panics: every attribute length is checked against the message.
pub fn peek(data: &[u8]) -> Option<StunPeek<'_>> {
    if !looks_like_stun(data) {
        return None;
    }
    let message_type = u16::from_be_bytes([data[0], data[1]]);
    // Class bits are 0x0110 of the message type: 00 is a request.
    let request = message_type & 0x0110 == 0;
    let mut transaction_id = [0u8; 12];
    transaction_id.copy_from_slice(&data[8..STUN_HEADER_LEN]);
    let mut username = None;
    let mut at = STUN_HEADER_LEN;
    while at + 4 <= data.len() {
        let kind = u16::from_be_bytes([data[at], data[at + 1]]);
        let len = usize::from(u16::from_be_bytes([data[at + 2], data[at + 3]]));
        let value = data.get(at + 4..at + 4 + len)?;
        if kind == 0x0006 {
            username = std::str::from_utf8(value).ok();
            break;
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    Some(StunPeek {
        request,
        transaction_id,
        username,
    })
}

/// What went wrong with a STUN message.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StunError {
    /// Not a STUN message at all.
    #[error("not a STUN message")]
    NotStun,
    /// Over [`MAX_STUN_MESSAGE`].
    #[error("STUN message of {0} bytes is over the limit of {MAX_STUN_MESSAGE}")]
    TooLarge(usize),
    /// A STUN message that does not decode or whose FINGERPRINT is wrong.
    #[error("malformed STUN message: {0}")]
    Malformed(String),
    /// Not what was expected (e.g. a response where a request was expected).
    #[error("unexpected STUN message: {0}")]
    Unexpected(&'static str),
    /// MESSAGE-INTEGRITY missing or wrong.
    #[error("STUN message integrity check failed")]
    Integrity,
    /// A response without XOR-MAPPED-ADDRESS.
    #[error("STUN response has no XOR-MAPPED-ADDRESS")]
    NoMappedAddress,
    /// A message could not be encoded.
    #[error("cannot encode STUN message: {0}")]
    Encode(String),
    /// An error response, with its code (e.g. 420: the server cannot honour a CHANGE-REQUEST).
    #[error("STUN error response {0}")]
    Refused(u16),
}

/// A registration token: USERNAME and short-term password for authenticated Binding requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenCredentials {
    /// Sent as USERNAME.
    pub username: String,
    /// Keys MESSAGE-INTEGRITY (short-term credential).
    pub password: String,
}

fn key(password: &str) -> Result<HMACKey, StunError> {
    HMACKey::new_short_term(password).map_err(|e| StunError::Encode(e.to_string()))
}

/// A Binding request as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingRequest {
    /// Its transaction id.
    pub transaction_id: [u8; 12],
    /// USERNAME, if present (a registration token's username).
    pub username: Option<String>,
    /// Whether it carries MESSAGE-INTEGRITY (to be checked with [`verify_integrity`]).
    pub has_integrity: bool,
    /// CHANGE-REQUEST (RFC 5780): answer from the other IP and/or port.
    pub change: Change,
    /// Whether it carries FINGERPRINT.
    pub has_fingerprint: bool,
}

/// What a CHANGE-REQUEST asks for (RFC 5780 §7.2): the answer to come from the server's other
/// IP address, its other port, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    /// From the alternate IP address.
    pub ip: bool,
    /// From the alternate port.
    pub port: bool,
}

/// The RFC 5780 attributes of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Origin {
    /// RESPONSE-ORIGIN: the address the answer is sent from.
    pub response_origin: Option<SocketAddr>,
    /// OTHER-ADDRESS: the server's alternate IP and port.
    pub other_address: Option<SocketAddr>,
}

/// A Binding success response as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingAnswer {
    /// XOR-MAPPED-ADDRESS: the client's address as the server saw it.
    pub mapped: SocketAddr,
    /// RESPONSE-ORIGIN and OTHER-ADDRESS, when the server sent them.
    pub origin: Origin,
}

fn check_size(data: &[u8]) -> Result<(), StunError> {
    if data.len() > MAX_STUN_MESSAGE {
        return Err(StunError::TooLarge(data.len()));
    }
    if !looks_like_stun(data) {
        return Err(StunError::NotStun);
    }
    Ok(())
}

fn decode(data: &[u8], validate_key: Option<HMACKey>, validate: bool) -> Result<StunMessage, StunError> {
    let mut ctx = DecoderContextBuilder::default();
    if let Some(k) = validate_key {
        ctx = ctx.with_key(k);
    }
    if validate {
        ctx = ctx.with_validation();
    }
    let decoder = MessageDecoderBuilder::default().with_context(ctx.build()).build();
    decoder
        .decode(data)
        .map(|(m, _)| m)
        .map_err(|e| StunError::Malformed(e.to_string()))
}

/// Parses a Binding request, checking FINGERPRINT when present. MESSAGE-INTEGRITY, when
/// present, is not checked here: look up the password by [`BindingRequest::username`] and call
/// [`verify_integrity`].
pub fn parse_binding_request(data: &[u8]) -> Result<BindingRequest, StunError> {
    check_size(data)?;
    // Fast path: validation with no key passes for any request without MESSAGE-INTEGRITY and
    // checks its FINGERPRINT. A request with MESSAGE-INTEGRITY fails it and is decoded plainly.
    let msg = match decode(data, None, true) {
        Ok(m) => m,
        Err(e) => {
            let m = decode(data, None, false)?;
            if m.get::<MessageIntegrity>().is_none() {
                return Err(e);
            }
            m
        }
    };
    if msg.method() != BINDING || msg.class() != MessageClass::Request {
        return Err(StunError::Unexpected("not a Binding request"));
    }
    let username = msg
        .get::<UserName>()
        .and_then(|a| a.as_user_name().ok())
        .map(|u| u.as_str().to_owned());
    let mut transaction_id = [0u8; 12];
    transaction_id.copy_from_slice(msg.transaction_id().as_ref());
    let change = msg
        .get::<ChangeRequest>()
        .and_then(|a| a.as_change_request().ok())
        .map(|c| Change {
            ip: c.flags().contains(ChangeRequestFlags::ChangeIp),
            port: c.flags().contains(ChangeRequestFlags::ChangePort),
        })
        .unwrap_or_default();
    Ok(BindingRequest {
        transaction_id,
        username,
        has_integrity: msg.get::<MessageIntegrity>().is_some(),
        change,
        has_fingerprint: msg.get::<Fingerprint>().is_some(),
    })
}

/// Checks a message's MESSAGE-INTEGRITY (and FINGERPRINT) with `password`.
pub fn verify_integrity(data: &[u8], password: &str) -> Result<(), StunError> {
    check_size(data)?;
    let msg = decode(data, Some(key(password)?), true).map_err(|_| StunError::Integrity)?;
    if msg.get::<MessageIntegrity>().is_none() {
        return Err(StunError::Integrity);
    }
    Ok(())
}

fn encode(msg: &StunMessage, out: &mut [u8]) -> Result<usize, StunError> {
    MessageEncoderBuilder::default()
        .build()
        .encode(out, msg)
        .map_err(|e| StunError::Encode(e.to_string()))
}

/// Encodes a Binding success response telling the client `mapped`, signed with `password` when
/// the request was authenticated. Returns the length written to `out`.
pub fn encode_binding_success(
    transaction_id: &[u8; 12],
    mapped: SocketAddr,
    password: Option<&str>,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let mut b = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(TransactionId::from(*transaction_id))
        .with_attribute(XorMappedAddress::from(mapped));
    if let Some(p) = password {
        b = b.with_attribute(MessageIntegrity::new(key(p)?));
    }
    encode(&b.with_attribute(Fingerprint::default()).build(), out)
}

/// Encodes a plain Binding success response with the RFC 5780 attributes of `origin`;
/// FINGERPRINT only when `fingerprint`. Returns the length written to `out`.
pub fn encode_binding_success_with(
    transaction_id: &[u8; 12],
    mapped: SocketAddr,
    origin: &Origin,
    fingerprint: bool,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let mut b = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(TransactionId::from(*transaction_id))
        .with_attribute(XorMappedAddress::from(mapped));
    if let Some(a) = origin.response_origin {
        b = b.with_attribute(ResponseOrigin::from(a));
    }
    if let Some(a) = origin.other_address {
        b = b.with_attribute(OtherAddress::from(a));
    }
    if fingerprint {
        b = b.with_attribute(Fingerprint::default());
    }
    encode(&b.build(), out)
}

/// Encodes a Binding error response (e.g. 420 for a CHANGE-REQUEST the server cannot honour).
pub fn encode_binding_error(
    transaction_id: &[u8; 12],
    code: u16,
    reason: &str,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let code = stun_rs::ErrorCode::new(code, reason).map_err(|e| StunError::Encode(e.to_string()))?;
    let msg = StunMessageBuilder::new(BINDING, MessageClass::ErrorResponse)
        .with_transaction_id(TransactionId::from(*transaction_id))
        .with_attribute(ErrorCode::from(code))
        .with_attribute(Fingerprint::default())
        .build();
    encode(&msg, out)
}

/// Encodes a plain Binding request with CHANGE-REQUEST `change` (RFC 5780 tests; none when both
/// flags are off) and FINGERPRINT.
pub fn encode_change_request(transaction_id: &[u8; 12], change: Change, out: &mut [u8]) -> Result<usize, StunError> {
    let mut b = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from(*transaction_id));
    if change.ip || change.port {
        let mut flags = enumflags2::BitFlags::empty();
        if change.ip {
            flags |= ChangeRequestFlags::ChangeIp;
        }
        if change.port {
            flags |= ChangeRequestFlags::ChangePort;
        }
        b = b.with_attribute(ChangeRequest::new(Some(flags)));
    }
    encode(&b.with_attribute(Fingerprint::default()).build(), out)
}

/// Parses a plain Binding success response for `transaction_id`: XOR-MAPPED-ADDRESS and the
/// RFC 5780 attributes. An error response is [`StunError::Refused`].
pub fn parse_binding_answer(data: &[u8], transaction_id: &[u8; 12]) -> Result<BindingAnswer, StunError> {
    check_size(data)?;
    let msg = decode(data, None, true)?;
    if msg.transaction_id().as_ref() != transaction_id {
        return Err(StunError::Unexpected("transaction id does not match"));
    }
    if msg.method() != BINDING {
        return Err(StunError::Unexpected("not a Binding response"));
    }
    if msg.class() == MessageClass::ErrorResponse {
        let code = msg
            .get::<ErrorCode>()
            .and_then(|a| a.as_error_code().ok())
            .map_or(0, |e| e.error_code().error_code());
        return Err(StunError::Refused(code));
    }
    if msg.class() != MessageClass::SuccessResponse {
        return Err(StunError::Unexpected("not a Binding response"));
    }
    let xma = msg.get::<XorMappedAddress>().ok_or(StunError::NoMappedAddress)?;
    let mapped = *xma
        .as_xor_mapped_address()
        .map_err(|e| StunError::Malformed(e.to_string()))?
        .socket_address();
    let response_origin = msg
        .get::<ResponseOrigin>()
        .and_then(|a| a.as_response_origin().ok())
        .map(|a| *a.socket_address());
    let other_address = msg
        .get::<OtherAddress>()
        .and_then(|a| a.as_other_address().ok())
        .map(|a| *a.socket_address());
    Ok(BindingAnswer {
        mapped,
        origin: Origin {
            response_origin,
            other_address,
        },
    })
}

/// Encodes a Binding request, authenticated with a registration token if one is given.
pub fn encode_binding_request(
    transaction_id: &[u8; 12],
    token: Option<&TokenCredentials>,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let mut b = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from(*transaction_id));
    if let Some(t) = token {
        let user = UserName::new(t.username.as_str()).map_err(|e| StunError::Encode(e.to_string()))?;
        b = b
            .with_attribute(user)
            .with_attribute(MessageIntegrity::new(key(&t.password)?));
    }
    encode(&b.with_attribute(Fingerprint::default()).build(), out)
}

/// Parses a Binding success response for `transaction_id` and returns XOR-MAPPED-ADDRESS.
/// With a `password`, the response must carry a valid MESSAGE-INTEGRITY.
pub fn parse_binding_success(
    data: &[u8],
    transaction_id: &[u8; 12],
    password: Option<&str>,
) -> Result<SocketAddr, StunError> {
    check_size(data)?;
    let msg = match password {
        Some(p) => decode(data, Some(key(p)?), true).map_err(|_| StunError::Integrity)?,
        None => decode(data, None, true)?,
    };
    if password.is_some() && msg.get::<MessageIntegrity>().is_none() {
        return Err(StunError::Integrity);
    }
    if msg.method() != BINDING || msg.class() != MessageClass::SuccessResponse {
        return Err(StunError::Unexpected("not a Binding success response"));
    }
    if msg.transaction_id().as_ref() != transaction_id {
        return Err(StunError::Unexpected("transaction id does not match"));
    }
    let xma = msg.get::<XorMappedAddress>().ok_or(StunError::NoMappedAddress)?;
    let xma = xma
        .as_xor_mapped_address()
        .map_err(|e| StunError::Malformed(e.to_string()))?;
    Ok(*xma.socket_address())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_reads_class_transaction_and_username() {
        let token = TokenCredentials {
            username: "tok-alice".into(),
            password: "secret".into(),
        };
        let tid = [7u8; 12];
        let mut buf = [0u8; 256];
        let n = encode_binding_request(&tid, Some(&token), &mut buf).expect("encodes");
        let p = peek(&buf[..n]).expect("a STUN message");
        assert!(p.request);
        assert_eq!(p.transaction_id, tid);
        assert_eq!(p.username, Some("tok-alice"));
        let mut answer = [0u8; 256];
        let m = encode_binding_success(&tid, "192.0.2.1:5".parse().expect("addr"), Some("secret"), &mut answer)
            .expect("encodes");
        let r = peek(&answer[..m]).expect("a STUN message");
        assert!(!r.request);
        assert_eq!(r.username, None);
        for cut in 0..n {
            let _ = peek(&buf[..cut]); // never panics
        }
        let mut flipped = buf;
        flipped[22] ^= 0xff; // the first attribute's length
        let _ = peek(&flipped[..n]);
    }
}
