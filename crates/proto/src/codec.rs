//! The one place that calls `bincode`. Control messages are encoded with bincode 2's standard
//! configuration (varint integers) and decoded with a size limit, so a hostile length prefix
//! inside a message cannot make the decoder allocate more than a frame can hold.

use bytes::{BufMut, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

use crate::frame::{FrameError, MAX_FRAME_LEN};

/// bincode configuration shared by both directions. The limit bounds every allocation the
/// decoder makes to the largest frame the protocol allows.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_FRAME_LEN as usize }>()
}

/// Appends the bincode encoding of `msg` to `out`.
pub fn encode_control_body<T: Serialize>(msg: &T, out: &mut BytesMut) -> Result<(), FrameError> {
    let mut writer = out.writer();
    bincode::serde::encode_into_std_write(msg, &mut writer, config())
        .map(|_| ())
        .map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decodes one control message; the whole body must be consumed.
pub fn decode_control<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, used): (T, usize) =
        bincode::serde::decode_from_slice(body, config()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after control message",
            body.len() - used
        )));
    }
    Ok(msg)
}
