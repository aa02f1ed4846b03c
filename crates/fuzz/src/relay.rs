//! `relay_header`: the header the server reads off every relay frame to route it.
//!
//! Invariants: a header decodes exactly when there are six bytes and the class is known; a
//! decoded header and its payload re-encode to the input.

use bytes::BytesMut;
use natcall_proto::relay::{RELAY_HEADER_LEN, RelayHeader};

/// The `relay_header` target.
pub fn relay_header(body: &[u8]) {
    match RelayHeader::decode(body) {
        Ok((header, payload)) => {
            let mut out = BytesMut::new();
            header.encode(&mut out);
            assert_eq!(out.len(), RELAY_HEADER_LEN);
            out.extend_from_slice(payload);
            assert_eq!(&out[..], body, "relay header does not round-trip");
            let _ = header.class.as_str();
        }
        Err(e) => {
            assert!(
                body.len() < RELAY_HEADER_LEN || body[4] > 2,
                "a valid header was refused: {e}"
            );
        }
    }
}
