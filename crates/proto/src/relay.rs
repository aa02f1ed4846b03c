//! The relay frame header: what the server needs to route and prioritise a relayed packet
//! without reading its (end-to-end encrypted) payload.
//!
//! ```text
//! +---------------+-------+-------+-------------------+
//! | call: u32 BE  | class | flags | payload ...       |
//! +---------------+-------+-------+-------------------+
//! ```
//!
//! `call` is the id the server gave the call; the server forwards a relay frame only to the
//! other peer of that call. An id with [`ROOM_ID_BIT`] set names a room instead (see
//! [`crate::control::ServerMsg::RoomJoined`]): the frame goes to every other member. `class` is
//! [`TrafficClass`]; `flags` are [`RelayFlags`].

use bytes::{BufMut, BytesMut};

use crate::frame::FrameError;

/// Set in the ids of rooms, clear in the ids of calls: the two never collide.
pub const ROOM_ID_BIT: u32 = 1 << 31;

/// Bytes of a [`RelayHeader`] on the wire.
pub const RELAY_HEADER_LEN: usize = 6;

/// How the relay treats a frame when a receiver falls behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TrafficClass {
    /// QUIC packets (chat, call control): never dropped by the relay.
    Control = 0,
    /// Audio media: dropped oldest-first once past its deadline.
    Audio = 1,
    /// Video media: dropped as whole frames back to the next key frame.
    Video = 2,
}

impl TrafficClass {
    /// All classes, for metrics.
    pub const ALL: [TrafficClass; 3] = [Self::Control, Self::Audio, Self::Video];

    /// A label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Control => "control",
            Self::Audio => "audio",
            Self::Video => "video",
        }
    }
}

/// Flag bits of a relay header. Unknown bits are preserved and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayFlags(pub u8);

impl RelayFlags {
    /// The packet belongs to a key frame (video).
    pub const KEY_FRAME: u8 = 0x01;
    /// The packet is the first of its media frame.
    pub const FRAME_START: u8 = 0x02;
    /// The packet is the last of its media frame.
    pub const FRAME_END: u8 = 0x04;

    /// Whether all bits of `bit` are set.
    pub fn has(self, bit: u8) -> bool {
        self.0 & bit == bit
    }
}

/// The header in front of every relayed payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayHeader {
    /// The call the frame belongs to.
    pub call: u32,
    /// Its traffic class.
    pub class: TrafficClass,
    /// Its flags.
    pub flags: RelayFlags,
}

impl RelayHeader {
    /// Writes the header.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.call);
        out.put_u8(self.class as u8);
        out.put_u8(self.flags.0);
    }

    /// Reads a header off the front of a relay frame body, returning it and the payload.
    pub fn decode(body: &[u8]) -> Result<(Self, &[u8]), FrameError> {
        let Some((h, payload)) = body.split_first_chunk::<RELAY_HEADER_LEN>() else {
            return Err(FrameError::Truncated {
                what: "relay header",
                need: RELAY_HEADER_LEN,
                got: body.len(),
            });
        };
        let class = match h[4] {
            0 => TrafficClass::Control,
            1 => TrafficClass::Audio,
            2 => TrafficClass::Video,
            c => return Err(FrameError::UnknownClass(c)),
        };
        let header = Self {
            call: u32::from_be_bytes([h[0], h[1], h[2], h[3]]),
            class,
            flags: RelayFlags(h[5]),
        };
        Ok((header, payload))
    }
}
