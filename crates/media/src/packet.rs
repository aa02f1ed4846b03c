//! The media packet: an 18-byte clear header (the AEAD's associated data) and the sealed
//! fragment of one frame. Every packet is at most [`MAX_PACKET`] bytes.
//!
//! ```text
//!  0        1               5               9               13      15      17     18
//! +--------+---------------+---------------+---------------+-------+-------+------+---------------------+----------+
//! | 16+trk | sequence u32  | timestamp u32 | frame id u32  | index | count | flags| ciphertext (≤ 478)  | tag (16) |
//! +--------+---------------+---------------+---------------+-------+-------+------+---------------------+----------+
//! ```
//!
//! All integers are big-endian. The first byte is `16 + track` (so 16..=63, the media range of
//! the peer's socket demultiplexer; this layout is version 1 of the format).
//!
//! Data flow on the sending side:
//! 1. [`packetize`] cuts a frame into [`fragment_count`] fragments of at most
//!    [`MAX_FRAGMENT_PAYLOAD`] bytes (an empty frame is one empty fragment).
//! 2. [`crate::PacketSealer::seal`] assigns the sequence number and seals each fragment.

use std::ops::Range;

use crate::{Error, Track};

/// The largest media packet, header and tag included: the whole UDP payload.
pub const MAX_PACKET: usize = 512;
/// Bytes of the clear header.
pub const HEADER_LEN: usize = 18;
/// Bytes of the AEAD tag at the end of every packet.
pub const TAG_LEN: usize = 16;
/// The largest fragment of frame data in one packet.
pub const MAX_FRAGMENT_PAYLOAD: usize = MAX_PACKET - HEADER_LEN - TAG_LEN;
/// The largest frame: 16 MiB (35 099 fragments, well within the u16 fragment count).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// The most fragments a frame can have.
pub const MAX_FRAGMENTS: u16 = {
    let n = MAX_FRAME.div_ceil(MAX_FRAGMENT_PAYLOAD);
    assert!(n <= u16::MAX as usize, "MAX_FRAME must fit a u16 fragment count");
    n as u16
};

/// The lowest first byte of a media packet.
pub const FIRST_BYTE_BASE: u8 = 16;

/// Flag bits of a packet. The bits match `natcall_proto::relay::RelayFlags`, so the caller can
/// copy them into a relay header. Unknown bits are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Flags(pub u8);

impl Flags {
    /// The packet belongs to a key frame.
    pub const KEY_FRAME: u8 = 0x01;
    /// The packet is the first fragment of its frame.
    pub const FRAME_START: u8 = 0x02;
    /// The packet is the last fragment of its frame.
    pub const FRAME_END: u8 = 0x04;

    /// Whether all bits of `bit` are set.
    pub fn has(self, bit: u8) -> bool {
        self.0 & bit == bit
    }
}

/// The clear header of a media packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// The track the frame belongs to.
    pub track: Track,
    /// Per-direction, per-track packet counter; also the AEAD nonce.
    pub sequence: u32,
    /// Media clock of the frame, in milliseconds.
    pub timestamp: u32,
    /// Per-track frame counter, consecutive for sent frames.
    pub frame_id: u32,
    /// Which fragment of the frame this is.
    pub fragment_index: u16,
    /// How many fragments the frame has (at least 1).
    pub fragment_count: u16,
    /// Flags ([`Flags::KEY_FRAME`], ...).
    pub flags: Flags,
}

impl Header {
    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = FIRST_BYTE_BASE + self.track.0;
        out[1..5].copy_from_slice(&self.sequence.to_be_bytes());
        out[5..9].copy_from_slice(&self.timestamp.to_be_bytes());
        out[9..13].copy_from_slice(&self.frame_id.to_be_bytes());
        out[13..15].copy_from_slice(&self.fragment_index.to_be_bytes());
        out[15..17].copy_from_slice(&self.fragment_count.to_be_bytes());
        out[17] = self.flags.0;
        out
    }

    /// Reads and checks the header of a whole packet; returns it and the sealed rest
    /// (ciphertext and tag). Never panics on any input.
    pub fn decode(packet: &[u8]) -> Result<(Self, &[u8]), Error> {
        if packet.len() > MAX_PACKET {
            return Err(Error::Malformed("packet longer than 512 bytes"));
        }
        if packet.len() < HEADER_LEN + TAG_LEN {
            return Err(Error::Malformed("packet shorter than header and tag"));
        }
        let (h, sealed) = packet.split_at(HEADER_LEN);
        let track = h[0]
            .checked_sub(FIRST_BYTE_BASE)
            .and_then(Track::new)
            .ok_or(Error::Malformed("first byte outside the media range 16..=63"))?;
        let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let header = Self {
            track,
            sequence: u32_at(1),
            timestamp: u32_at(5),
            frame_id: u32_at(9),
            fragment_index: u16::from_be_bytes([h[13], h[14]]),
            fragment_count: u16::from_be_bytes([h[15], h[16]]),
            flags: Flags(h[17]),
        };
        header.check()?;
        Ok((header, sealed))
    }

    fn check(&self) -> Result<(), Error> {
        if self.fragment_count == 0 || self.fragment_count > MAX_FRAGMENTS {
            return Err(Error::Malformed("fragment count out of range"));
        }
        if self.fragment_index >= self.fragment_count {
            return Err(Error::Malformed("fragment index beyond fragment count"));
        }
        if self.flags.has(Flags::FRAME_START) != (self.fragment_index == 0) {
            return Err(Error::Malformed("FRAME_START flag does not match fragment index"));
        }
        if self.flags.has(Flags::FRAME_END) != (self.fragment_index + 1 == self.fragment_count) {
            return Err(Error::Malformed("FRAME_END flag does not match fragment index"));
        }
        Ok(())
    }
}

/// How many packets a frame of `len` bytes needs (an empty frame needs one).
pub fn fragment_count(len: usize) -> Result<u16, Error> {
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge { len, max: MAX_FRAME });
    }
    // MAX_FRAME's count fits u16 (checked in MAX_FRAGMENTS), so this cannot fail.
    u16::try_from(len.div_ceil(MAX_FRAGMENT_PAYLOAD).max(1)).map_err(|_| Error::FrameTooLarge { len, max: MAX_FRAME })
}

/// The byte range of fragment `index` in a frame of `len` bytes.
pub fn fragment_range(len: usize, index: u16) -> Range<usize> {
    let start = (usize::from(index) * MAX_FRAGMENT_PAYLOAD).min(len);
    start..(start + MAX_FRAGMENT_PAYLOAD).min(len)
}

/// The headers (with `sequence` 0, assigned when sealing) and fragments of one frame, in order.
pub fn packetize<'a>(
    track: Track,
    frame_id: u32,
    timestamp: u32,
    key_frame: bool,
    data: &'a [u8],
) -> Result<impl ExactSizeIterator<Item = (Header, &'a [u8])> + 'a, Error> {
    let count = fragment_count(data.len())?;
    Ok((0..count).map(move |index| {
        let header = fragment_header(track, frame_id, timestamp, key_frame, index, count);
        (header, &data[fragment_range(data.len(), index)])
    }))
}

/// The header of fragment `index` of `count` (sequence 0).
pub(crate) fn fragment_header(
    track: Track,
    frame_id: u32,
    timestamp: u32,
    key_frame: bool,
    index: u16,
    count: u16,
) -> Header {
    let mut flags = 0;
    if key_frame {
        flags |= Flags::KEY_FRAME;
    }
    if index == 0 {
        flags |= Flags::FRAME_START;
    }
    if index + 1 == count {
        flags |= Flags::FRAME_END;
    }
    Header {
        track,
        sequence: 0,
        timestamp,
        frame_id,
        fragment_index: index,
        fragment_count: count,
        flags: Flags(flags),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn max_frame_fits_the_fragment_count() {
        assert_eq!(MAX_FRAGMENT_PAYLOAD, 478);
        assert_eq!(fragment_count(MAX_FRAME).unwrap(), MAX_FRAGMENTS);
        assert!(matches!(
            fragment_count(MAX_FRAME + 1),
            Err(Error::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn empty_frame_is_one_empty_fragment() {
        let parts: Vec<_> = packetize(Track::AUDIO, 3, 7, false, &[]).unwrap().collect();
        assert_eq!(parts.len(), 1);
        let (h, data) = parts[0];
        assert!(data.is_empty());
        assert!(h.flags.has(Flags::FRAME_START | Flags::FRAME_END));
    }

    #[test]
    fn first_byte_is_in_the_media_range() {
        for t in 0..Track::COUNT {
            let h = fragment_header(Track::new(t).unwrap(), 0, 0, false, 0, 1);
            assert!((16..=63).contains(&h.encode()[0]));
        }
        assert!(Track::new(Track::COUNT).is_none());
    }

    #[test]
    fn decode_rejects_inconsistent_flags() {
        let mut h = fragment_header(Track::VIDEO, 1, 2, true, 1, 3);
        h.flags = Flags(Flags::FRAME_START);
        let mut packet = h.encode().to_vec();
        packet.extend_from_slice(&[0; TAG_LEN]);
        assert!(matches!(Header::decode(&packet), Err(Error::Malformed(_))));
    }

    proptest! {
        #[test]
        fn header_round_trips(track in 0..Track::COUNT, seq: u32, ts: u32, id: u32, count in 1..=MAX_FRAGMENTS,
                              index: u16, key: bool) {
            let index = index % count;
            let mut h = fragment_header(Track::new(track).unwrap(), id, ts, key, index, count);
            h.sequence = seq;
            let mut packet = h.encode().to_vec();
            packet.extend_from_slice(&[9; TAG_LEN]);
            let (back, rest) = Header::decode(&packet).unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(rest.len(), TAG_LEN);
        }

        #[test]
        fn fragments_cover_the_frame(len in 0usize..20_000) {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let parts: Vec<_> = packetize(Track::VIDEO, 1, 2, false, &data).unwrap().collect();
            let joined: Vec<u8> = parts.iter().flat_map(|(_, d)| d.iter().copied()).collect();
            prop_assert_eq!(&joined, &data);
            for (h, d) in &parts {
                prop_assert!(HEADER_LEN + d.len() + TAG_LEN <= MAX_PACKET);
                prop_assert_eq!(usize::from(h.fragment_count), parts.len());
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Header::decode(&bytes);
        }
    }
}
