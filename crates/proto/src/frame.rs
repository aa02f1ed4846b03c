//! The TCP frame format: a length prefix, a kind byte, a body.
//!
//! ```text
//! +----------------+------+------------------------------+
//! | length: u32 BE | kind | body (length - 1 bytes)      |
//! +----------------+------+------------------------------+
//! ```
//!
//! `length` counts the kind byte and the body. A decoder is built with a limit
//! (at most [`MAX_FRAME_LEN`]); a larger length is refused before any of the body is read, so a
//! hostile prefix cannot make a reader buffer more than the limit.
//!
//! | kind | frame | body |
//! |------|-------|------|
//! | 0x00 | [`Hello`] | `b"NATCALL"`, version: u16 BE (fixed layout, readable by every version) |
//! | 0x01 | control | one bincode message ([`crate::control`]) |
//! | 0x02 | relay | [`RelayHeader`] + opaque payload |
//! | 0x7f | [`ErrorFrame`] | code: u16 BE, UTF-8 text (fixed layout); the sender closes after it |

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

use crate::codec;
use crate::relay::{RELAY_HEADER_LEN, RelayHeader};

/// The largest frame (kind byte + body) the protocol allows, whatever a decoder is configured to.
pub const MAX_FRAME_LEN: u32 = 64 * 1024;
/// The default per-connection limit.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 16 * 1024;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// The longest text an [`ErrorFrame`] carries; longer text is cut at a character boundary.
pub const MAX_ERROR_TEXT: usize = 1024;

const HELLO_MAGIC: &[u8; 7] = b"NATCALL";

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Version exchange; the first frame in each direction.
    Hello = 0x00,
    /// A bincode control message.
    Control = 0x01,
    /// A relayed packet between the two peers of a call.
    Relay = 0x02,
    /// A terminal error; the sender closes the connection after it.
    Error = 0x7f,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x00 => Self::Hello,
            0x01 => Self::Control,
            0x02 => Self::Relay,
            0x7f => Self::Error,
            _ => return None,
        })
    }
}

/// Everything that can be wrong with a frame or a message inside it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is over the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// A length prefix of zero (no kind byte).
    #[error("empty frame (length 0)")]
    Empty,
    /// An unknown kind byte.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// A hello without the magic bytes: the other side does not speak natcall.
    #[error("not a natcall hello (bad magic)")]
    BadMagic,
    /// A fixed-layout body is shorter than its layout.
    #[error("truncated {what}: need {need} bytes, got {got}")]
    Truncated {
        what: &'static str,
        need: usize,
        got: usize,
    },
    /// A relay header with an unknown traffic class.
    #[error("unknown traffic class {0}")]
    UnknownClass(u8),
    /// A control message that does not decode.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// A frame arrived where the protocol does not allow it.
    #[error("unexpected {got} frame: {expected}")]
    Unexpected { got: &'static str, expected: &'static str },
    /// Both sides speak different protocol versions.
    #[error("protocol version mismatch: this side speaks version {ours}, the other side version {theirs}")]
    VersionMismatch { ours: u16, theirs: u16 },
    /// A message could not be encoded (a bug or an oversized message).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Splits whole frames off a read buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_len: u32,
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `max_len` (clamped to [`MAX_FRAME_LEN`]).
    pub fn new(max_len: u32) -> Self {
        Self {
            max_len: max_len.clamp(RELAY_HEADER_LEN as u32 + 1, MAX_FRAME_LEN),
        }
    }

    /// The limit in force.
    pub fn max_len(&self) -> u32 {
        self.max_len
    }

    /// Takes one whole frame off the front of `buf`, or returns `Ok(None)` if more bytes are
    /// needed (reserving room for them). The frame shares `buf`'s allocation: no copy.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<RawFrame>, FrameError> {
        let Some(prefix) = buf.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len: len as usize,
                max: self.max_len as usize,
            });
        }
        let total = LEN_PREFIX + len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        Ok(Some(RawFrame {
            bytes: buf.split_to(total).freeze(),
        }))
    }
}

/// One whole frame as it was on the wire (length prefix included), so a relay can forward it
/// without re-encoding.
#[derive(Clone, PartialEq, Eq)]
pub struct RawFrame {
    bytes: Bytes,
}

impl fmt::Debug for RawFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawFrame")
            .field("kind", &self.bytes[LEN_PREFIX])
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl RawFrame {
    /// The kind byte.
    pub fn kind_byte(&self) -> u8 {
        self.bytes[LEN_PREFIX]
    }

    /// The body after the kind byte.
    pub fn body(&self) -> &[u8] {
        &self.bytes[LEN_PREFIX + 1..]
    }

    /// The whole frame, length prefix included.
    pub fn wire(&self) -> &Bytes {
        &self.bytes
    }

    /// Gives up the whole frame's bytes.
    pub fn into_wire(self) -> Bytes {
        self.bytes
    }

    /// A typed view of the frame.
    pub fn parse(&self) -> Result<Frame<'_>, FrameError> {
        let body = self.body();
        match FrameKind::from_u8(self.kind_byte()) {
            Some(FrameKind::Hello) => Hello::decode(body).map(Frame::Hello),
            Some(FrameKind::Control) => Ok(Frame::Control(body)),
            Some(FrameKind::Relay) => {
                let (header, payload) = RelayHeader::decode(body)?;
                Ok(Frame::Relay { header, payload })
            }
            Some(FrameKind::Error) => ErrorFrame::decode(body).map(Frame::Error),
            None => Err(FrameError::UnknownKind(self.kind_byte())),
        }
    }
}

/// A parsed frame borrowing from its [`RawFrame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Version exchange.
    Hello(Hello),
    /// A control message body; decode it with [`codec::decode_control`].
    Control(&'a [u8]),
    /// A relay frame.
    Relay { header: RelayHeader, payload: &'a [u8] },
    /// A terminal error.
    Error(ErrorFrame),
}

impl Frame<'_> {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Control(_) => "control",
            Frame::Relay { .. } => "relay",
            Frame::Error(_) => "error",
        }
    }
}

/// The version exchange. Its layout never changes, so any two versions can read each other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The sender's protocol version.
    pub version: u16,
}

impl Hello {
    const LEN: usize = HELLO_MAGIC.len() + 2;

    fn decode(body: &[u8]) -> Result<Self, FrameError> {
        if body.len() < Self::LEN {
            return Err(FrameError::Truncated {
                what: "hello",
                need: Self::LEN,
                got: body.len(),
            });
        }
        if &body[..HELLO_MAGIC.len()] != HELLO_MAGIC {
            return Err(FrameError::BadMagic);
        }
        let v = &body[HELLO_MAGIC.len()..Self::LEN];
        // Bytes after the version are reserved for later versions and ignored.
        Ok(Self {
            version: u16::from_be_bytes([v[0], v[1]]),
        })
    }

    /// Checks the other side's version against `ours`.
    pub fn check(&self, ours: u16) -> Result<(), FrameError> {
        if self.version == ours {
            Ok(())
        } else {
            Err(FrameError::VersionMismatch {
                ours,
                theirs: self.version,
            })
        }
    }
}

/// Error codes carried by an [`ErrorFrame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Protocol versions differ.
    VersionMismatch,
    /// A frame or message could not be decoded.
    Malformed,
    /// A frame over the size limit.
    FrameTooLarge,
    /// A frame the protocol does not allow at this point.
    Unexpected,
    /// The name is bound to another key.
    NameTaken,
    /// The name is not acceptable.
    BadName,
    /// The registration signature or certificate did not verify.
    BadSignature,
    /// A request that needs registration came first.
    NotRegistered,
    /// The server is at a configured limit (connections, peers).
    ServerFull,
    /// The peer sent too much too fast.
    RateLimited,
    /// The peer was silent past the timeout.
    Timeout,
    /// The server failed.
    Internal,
    /// A quota of names is used up (names per key, new names per source and hour).
    QuotaExceeded,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::VersionMismatch => 1,
            Self::Malformed => 2,
            Self::FrameTooLarge => 3,
            Self::Unexpected => 4,
            Self::NameTaken => 5,
            Self::BadName => 6,
            Self::BadSignature => 7,
            Self::NotRegistered => 8,
            Self::ServerFull => 9,
            Self::RateLimited => 10,
            Self::Timeout => 11,
            Self::Internal => 99,
            Self::QuotaExceeded => 12,
            Self::Other(c) => c,
        }
    }

    /// From the wire value.
    pub fn from_u16(c: u16) -> Self {
        match c {
            1 => Self::VersionMismatch,
            2 => Self::Malformed,
            3 => Self::FrameTooLarge,
            4 => Self::Unexpected,
            5 => Self::NameTaken,
            6 => Self::BadName,
            7 => Self::BadSignature,
            8 => Self::NotRegistered,
            9 => Self::ServerFull,
            10 => Self::RateLimited,
            11 => Self::Timeout,
            99 => Self::Internal,
            12 => Self::QuotaExceeded,
            c => Self::Other(c),
        }
    }
}

impl From<&FrameError> for ErrorCode {
    fn from(e: &FrameError) -> Self {
        match e {
            FrameError::TooLarge { .. } => Self::FrameTooLarge,
            FrameError::VersionMismatch { .. } => Self::VersionMismatch,
            FrameError::Unexpected { .. } => Self::Unexpected,
            _ => Self::Malformed,
        }
    }
}

/// A terminal error: the sender closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// What kind of error.
    pub code: ErrorCode,
    /// A sentence for a person.
    pub message: String,
}

impl ErrorFrame {
    fn decode(body: &[u8]) -> Result<Self, FrameError> {
        let [hi, lo, text @ ..] = body else {
            return Err(FrameError::Truncated {
                what: "error frame",
                need: 2,
                got: body.len(),
            });
        };
        Ok(Self {
            code: ErrorCode::from_u16(u16::from_be_bytes([*hi, *lo])),
            message: String::from_utf8_lossy(text).into_owned(),
        })
    }
}

impl fmt::Display for ErrorFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Writes the length prefix and kind, runs `body`, then patches the length.
fn encode_with<F>(kind: FrameKind, out: &mut BytesMut, body: F) -> Result<(), FrameError>
where
    F: FnOnce(&mut BytesMut) -> Result<(), FrameError>,
{
    let start = out.len();
    out.put_u32(0);
    out.put_u8(kind as u8);
    if let Err(e) = body(out) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - LEN_PREFIX;
    if len > MAX_FRAME_LEN as usize {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN as usize,
        });
    }
    out[start..start + LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Appends a hello frame.
pub fn encode_hello(version: u16, out: &mut BytesMut) {
    out.put_u32(Hello::LEN as u32 + 1);
    out.put_u8(FrameKind::Hello as u8);
    out.put_slice(HELLO_MAGIC);
    out.put_u16(version);
}

/// Appends a control frame holding `msg`.
pub fn encode_control<T: Serialize>(msg: &T, out: &mut BytesMut) -> Result<(), FrameError> {
    encode_with(FrameKind::Control, out, |o| codec::encode_control_body(msg, o))
}

/// A control message as one whole frame (both sides' writers queue frames like this).
pub fn control_frame<T: Serialize>(msg: &T) -> Result<Bytes, FrameError> {
    let mut out = BytesMut::new();
    encode_control(msg, &mut out)?;
    Ok(out.freeze())
}

/// Appends a relay frame.
pub fn encode_relay(header: &RelayHeader, payload: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
    encode_with(FrameKind::Relay, out, |o| {
        header.encode(o);
        o.put_slice(payload);
        Ok(())
    })
}

/// Appends an error frame; `message` is cut to [`MAX_ERROR_TEXT`] bytes.
pub fn encode_error(code: ErrorCode, message: &str, out: &mut BytesMut) {
    let mut end = message.len().min(MAX_ERROR_TEXT);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u32(1 + 2 + end as u32);
    out.put_u8(FrameKind::Error as u8);
    out.put_u16(code.to_u16());
    out.put_slice(&message.as_bytes()[..end]);
}
