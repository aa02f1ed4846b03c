//! STUN codec for connectivity checks (RFC 8445 §7 on top of RFC 8489).
//!
//! - A check is a Binding request with USERNAME, ICE-CONTROLLING or ICE-CONTROLLED,
//!   PRIORITY, optionally USE-CANDIDATE, then MESSAGE-INTEGRITY and FINGERPRINT.
//! - A response is a Binding success with XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY and
//!   FINGERPRINT.
//! - [`decode`] accepts only messages whose integrity verifies with the call's key and
//!   whose fingerprint is present and correct; anything else is an [`Error`].

use std::net::SocketAddr;

use stun_rs::attributes::ice::{IceControlled, IceControlling, Priority, UseCandidate};
use stun_rs::attributes::stun::{Fingerprint, MessageIntegrity, UserName, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{
    DecoderContextBuilder, HMACKey, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessage,
    StunMessageBuilder, TransactionId,
};

use crate::Error;
use crate::config::Role;

/// Largest datagram the agent emits; well under the 512-byte media limit.
pub(crate) const MAX_CHECK_LEN: usize = 256;

/// What an outgoing check carries besides its transaction id.
#[derive(Debug, Clone)]
pub(crate) struct CheckRequest<'a> {
    pub username: &'a str,
    pub role: Role,
    pub tie_breaker: u64,
    pub priority: u32,
    pub use_candidate: bool,
}

/// A decoded, authenticated message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// A connectivity check from the peer.
    Request {
        transaction_id: TransactionId,
        username: String,
        use_candidate: bool,
    },
    /// A success response to one of our checks.
    Response {
        transaction_id: TransactionId,
        mapped: SocketAddr,
    },
}

/// RFC 7983 demultiplexing: first byte 0..=3 and the STUN magic cookie.
pub fn looks_like_stun(data: &[u8]) -> bool {
    data.len() >= 20 && data[0] < 4 && data[4..8] == 0x2112_A442u32.to_be_bytes()
}

/// Encodes a Binding request (a connectivity check).
pub(crate) fn encode_request(
    key: &HMACKey,
    transaction_id: TransactionId,
    check: &CheckRequest<'_>,
) -> Result<Vec<u8>, Error> {
    let mut builder = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(transaction_id)
        .with_attribute(UserName::new(check.username).map_err(encode_error)?);
    builder = match check.role {
        Role::Controlling => builder.with_attribute(IceControlling::from(check.tie_breaker)),
        Role::Controlled => builder.with_attribute(IceControlled::from(check.tie_breaker)),
    };
    builder = builder.with_attribute(Priority::from(check.priority));
    if check.use_candidate {
        builder = builder.with_attribute(UseCandidate::default());
    }
    finish(builder, key)
}

/// Encodes a Binding success response telling the requester its observed address.
pub(crate) fn encode_response(
    key: &HMACKey,
    transaction_id: TransactionId,
    mapped: SocketAddr,
) -> Result<Vec<u8>, Error> {
    let builder = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(transaction_id)
        .with_attribute(XorMappedAddress::from(mapped));
    finish(builder, key)
}

fn finish(builder: StunMessageBuilder, key: &HMACKey) -> Result<Vec<u8>, Error> {
    let message = builder
        .with_attribute(MessageIntegrity::new(key.clone()))
        .with_attribute(Fingerprint::default())
        .build();
    let mut buf = [0u8; MAX_CHECK_LEN];
    let len = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, &message)
        .map_err(encode_error)?;
    Ok(buf[..len].to_vec())
}

fn encode_error(e: impl std::fmt::Display) -> Error {
    Error::Encode { reason: e.to_string() }
}

/// Decodes and authenticates `data`. Never panics on any input.
pub(crate) fn decode(key: &HMACKey, data: &[u8]) -> Result<Decoded, Error> {
    if !looks_like_stun(data) {
        return Err(Error::Malformed {
            reason: "not a STUN message".into(),
        });
    }
    let context = DecoderContextBuilder::default()
        .with_key(key.clone())
        .with_validation()
        .build();
    let (message, used) = MessageDecoderBuilder::default()
        .with_context(context)
        .build()
        .decode(data)
        .map_err(|e| Error::Malformed { reason: e.to_string() })?;
    if used != data.len() {
        return Err(Error::Malformed {
            reason: "trailing bytes".into(),
        });
    }
    // The decoder verifies these attributes only when they are present: require them.
    if message.get::<MessageIntegrity>().is_none() || message.get::<Fingerprint>().is_none() {
        return Err(Error::Unauthenticated);
    }
    if message.method() != BINDING {
        return Err(Error::Malformed {
            reason: "not a Binding message".into(),
        });
    }
    match message.class() {
        MessageClass::Request => decode_request(&message),
        MessageClass::SuccessResponse => decode_response(&message),
        class => Err(Error::Malformed {
            reason: format!("unexpected class {class:?}"),
        }),
    }
}

fn decode_request(message: &StunMessage) -> Result<Decoded, Error> {
    let username = message
        .get::<UserName>()
        .and_then(|attr| attr.as_user_name().ok())
        .ok_or_else(|| Error::Malformed {
            reason: "check without USERNAME".into(),
        })?;
    Ok(Decoded::Request {
        transaction_id: *message.transaction_id(),
        username: AsRef::<str>::as_ref(username).to_owned(),
        use_candidate: message.get::<UseCandidate>().is_some(),
    })
}

fn decode_response(message: &StunMessage) -> Result<Decoded, Error> {
    let mapped = message
        .get::<XorMappedAddress>()
        .and_then(|attr| attr.as_xor_mapped_address().ok())
        .ok_or_else(|| Error::Malformed {
            reason: "response without XOR-MAPPED-ADDRESS".into(),
        })?;
    Ok(Decoded::Response {
        transaction_id: *message.transaction_id(),
        mapped: *mapped.socket_address(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(password: &str) -> HMACKey {
        HMACKey::new_short_term(password).unwrap()
    }

    fn request(use_candidate: bool) -> Vec<u8> {
        let check = CheckRequest {
            username: "bob-ufrag:alice-ufrag",
            role: Role::Controlling,
            tie_breaker: u64::MAX,
            priority: u32::MAX,
            use_candidate,
        };
        encode_request(&key("pw"), TransactionId::from([7; 12]), &check).unwrap()
    }

    #[test]
    fn request_round_trips_and_is_small() {
        let bytes = request(true);
        assert!(bytes.len() < 128, "{} bytes", bytes.len());
        assert!(looks_like_stun(&bytes));
        let decoded = decode(&key("pw"), &bytes).unwrap();
        assert_eq!(
            decoded,
            Decoded::Request {
                transaction_id: TransactionId::from([7; 12]),
                username: "bob-ufrag:alice-ufrag".into(),
                use_candidate: true,
            }
        );
    }

    #[test]
    fn response_round_trips_ipv4_and_ipv6() {
        for mapped in ["203.0.113.9:40001", "[2001:db8::1]:65535"] {
            let mapped: SocketAddr = mapped.parse().unwrap();
            let bytes = encode_response(&key("pw"), TransactionId::from([1; 12]), mapped).unwrap();
            assert!(bytes.len() < 128);
            let decoded = decode(&key("pw"), &bytes).unwrap();
            let expected = Decoded::Response {
                transaction_id: TransactionId::from([1; 12]),
                mapped,
            };
            assert_eq!(decoded, expected);
        }
    }

    #[test]
    fn wrong_password_is_rejected() {
        assert!(decode(&key("other"), &request(false)).is_err());
    }

    #[test]
    fn message_without_integrity_is_rejected() {
        let message = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(TransactionId::from([1; 12]))
            .with_attribute(XorMappedAddress::from("192.0.2.1:1".parse::<SocketAddr>().unwrap()))
            .with_attribute(Fingerprint::default())
            .build();
        let mut buf = [0u8; 128];
        let len = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &message)
            .unwrap();
        assert!(matches!(decode(&key("pw"), &buf[..len]), Err(Error::Unauthenticated)));
    }

    proptest! {
        #[test]
        fn random_bytes_never_decode(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert!(decode(&key("pw"), &data).is_err());
        }

        #[test]
        fn truncated_checks_never_decode(cut in 0usize..200) {
            let bytes = request(true);
            prop_assume!(cut < bytes.len());
            prop_assert!(decode(&key("pw"), &bytes[..cut]).is_err());
        }

        #[test]
        fn bit_flipped_checks_never_decode(bit in 0usize..(8 * 100)) {
            let mut bytes = request(false);
            prop_assume!(bit / 8 < bytes.len());
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&key("pw"), &bytes).is_err());
        }
    }
}
