//! `control_client` and `control_server`: a control frame's body as the client
//! ([`ServerMsg`]) and the server ([`ClientMsg`]) decode it.
//!
//! Invariants: a body that decodes re-encodes to a frame within [`MAX_FRAME_LEN`], no longer
//! than the body it came from (bincode's varints are written shortest), which decodes to the
//! same message. A [`ClientMsg::Register`] then goes through the server's checks: the name, and
//! the certificate and signature (webpki parses the certificate).

use std::fmt::Debug;

use bytes::BytesMut;
use natcall_proto::auth::verify_registration;
use natcall_proto::codec::{decode_control, encode_control_body};
use natcall_proto::control::{ClientMsg, ServerMsg, validate_name};
use natcall_proto::frame::{self, FrameDecoder, MAX_FRAME_LEN};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The `control_client` target: what a peer decodes.
pub fn control_client(body: &[u8]) {
    round_trip::<ServerMsg>(body);
}

/// The `control_server` target: what the server decodes.
pub fn control_server(body: &[u8]) {
    if let Some(ClientMsg::Register {
        name, cert, signature, ..
    }) = round_trip::<ClientMsg>(body)
    {
        if validate_name(&name).is_ok() {
            let _ = verify_registration(&cert, &signature, &[0; 32], &[0; 32], &name);
        }
    }
}

/// Decodes `body` as a `T`; on success, checks the round trip and returns the message.
pub(crate) fn round_trip<T>(body: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let msg = decode_control::<T>(body).ok()?;
    let mut reencoded = BytesMut::new();
    encode_control_body(&msg, &mut reencoded).expect("a decoded message re-encodes");
    assert!(
        reencoded.len() <= body.len(),
        "{msg:?} re-encodes to {} bytes, decoded from {}",
        reencoded.len(),
        body.len()
    );
    let mut wire = BytesMut::from(&frame::control_frame(&msg).expect("a decoded message fits a frame")[..]);
    let raw = FrameDecoder::new(MAX_FRAME_LEN)
        .decode(&mut wire)
        .expect("our own frame decodes")
        .expect("our own frame is whole");
    let again = decode_control::<T>(raw.body()).expect("our own encoding decodes");
    assert_eq!(again, msg, "control message does not round-trip");
    Some(msg)
}
