//! Packet protection: ChaCha20-Poly1305 with per-direction keys, nonces from track and
//! sequence number, and an SRTP-style 64-packet replay window per track.
//!
//! Key schedule:
//! 1. The caller exports 32 bytes from the call's QUIC session (`export_keying_material`)
//!    and hands them to [`derive_keys`] with its [`Role`].
//! 2. HKDF-SHA256 (salt `"natcall media v1"`) expands them with the label
//!    `"natcall media caller→callee"` or `"natcall media callee→caller"` into one key per
//!    [`Direction`]: each side seals with its sending key and opens with the other.
//! 3. The nonce is `track (u32 BE) ‖ 0 (u32) ‖ sequence (u32 BE)`; [`PacketSealer`] owns a
//!    monotonic sequence per track and refuses to wrap it, so a nonce is never reused
//!    within a direction.

use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};

use crate::packet::{HEADER_LEN, Header, MAX_FRAGMENT_PAYLOAD, TAG_LEN};
use crate::{Error, Track};

const HKDF_SALT: &[u8] = b"natcall media v1";
/// The HKDF label of a room sender's key (see [`crate::room`]).
const ROOM_SENDER_LABEL: &str = "natcall room sender";

/// Which end of the call this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The peer that placed the call.
    Caller,
    /// The peer that accepted it.
    Callee,
}

impl Role {
    /// The direction this side sends in.
    pub fn sending(self) -> Direction {
        match self {
            Self::Caller => Direction::CallerToCallee,
            Self::Callee => Direction::CalleeToCaller,
        }
    }

    /// The direction this side receives in.
    pub fn receiving(self) -> Direction {
        match self {
            Self::Caller => Direction::CalleeToCaller,
            Self::Callee => Direction::CallerToCallee,
        }
    }
}

/// One direction of media; each has its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Packets the caller sends.
    CallerToCallee,
    /// Packets the callee sends.
    CalleeToCaller,
}

impl Direction {
    /// The HKDF label of this direction's key.
    pub fn label(self) -> &'static str {
        match self {
            Self::CallerToCallee => "natcall media caller→callee",
            Self::CalleeToCaller => "natcall media callee→caller",
        }
    }

    fn key(self, secret: &[u8; 32]) -> LessSafeKey {
        expand(secret, self.label())
    }
}

fn expand(secret: &[u8; 32], label: &str) -> LessSafeKey {
    let prk = Salt::new(HKDF_SHA256, HKDF_SALT).extract(secret);
    let info = [label.as_bytes()];
    // Invariant: expanding to 32 bytes is far below HKDF-SHA256's 255 × 32 byte limit.
    let okm = prk.expand(&info, &CHACHA20_POLY1305).expect("HKDF output of 32 bytes");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// Derives this side's sealer and opener from the 32-byte secret exported from the call's
/// QUIC session.
pub fn derive_keys(secret: &[u8; 32], role: Role) -> (PacketSealer, PacketOpener) {
    (
        PacketSealer::new(secret, role.sending()),
        PacketOpener::new(secret, role.receiving()),
    )
}

fn nonce(track: Track, sequence: u32) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[..4].copy_from_slice(&u32::from(track.0).to_be_bytes());
    n[8..].copy_from_slice(&sequence.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals packets of one direction; owns the per-track sequence numbers.
pub struct PacketSealer {
    key: LessSafeKey,
    /// The next sequence number per track; `None` once exhausted.
    next: [Option<u32>; Track::COUNT as usize],
}

impl std::fmt::Debug for PacketSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketSealer").finish_non_exhaustive()
    }
}

impl PacketSealer {
    /// A sealer for `direction` (see [`derive_keys`]).
    pub fn new(secret: &[u8; 32], direction: Direction) -> Self {
        Self {
            key: direction.key(secret),
            next: [Some(0); Track::COUNT as usize],
        }
    }

    /// A sealer for a room sender's media, keyed by its sender key's `secret`
    /// ([`crate::room::SenderKey`]).
    pub fn for_room(secret: &[u8; 32]) -> Self {
        Self {
            key: expand(secret, ROOM_SENDER_LABEL),
            next: [Some(0); Track::COUNT as usize],
        }
    }

    /// Seals from now on with a room sender key's new `secret`. Sequence numbers go on from
    /// where they are: a receiver's replay window stays valid, and no nonce repeats under
    /// either key.
    pub fn rekey_room(&mut self, secret: &[u8; 32]) {
        self.key = expand(secret, ROOM_SENDER_LABEL);
    }

    /// Assigns the next sequence number of `header.track` and returns the whole packet.
    /// Fails once the track's 2³² sequence numbers are used up (the call must rekey).
    pub fn seal(&mut self, mut header: Header, payload: &[u8]) -> Result<Vec<u8>, Error> {
        if payload.len() > MAX_FRAGMENT_PAYLOAD {
            return Err(Error::FrameTooLarge {
                len: payload.len(),
                max: MAX_FRAGMENT_PAYLOAD,
            });
        }
        let slot = &mut self.next[usize::from(header.track.0)];
        let sequence = slot.ok_or(Error::SequenceExhausted(header.track))?;
        *slot = sequence.checked_add(1);
        header.sequence = sequence;
        let aad = header.encode();
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
        out.extend_from_slice(&aad);
        out.extend_from_slice(payload);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(header.track, sequence), Aad::from(aad), &mut out[HEADER_LEN..])
            .map_err(|_| Error::Malformed("payload too large for the AEAD"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// The sequence number the next packet of `track` gets (`None` once exhausted).
    pub fn next_sequence(&self, track: Track) -> Option<u32> {
        self.next[usize::from(track.0)]
    }

    #[cfg(test)]
    pub(crate) fn set_next_sequence(&mut self, track: Track, sequence: u32) {
        self.next[usize::from(track.0)] = Some(sequence);
    }
}

/// Opens packets of one direction. Stateless: the replay window lives with the receiver.
pub struct PacketOpener {
    key: LessSafeKey,
}

impl std::fmt::Debug for PacketOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketOpener").finish_non_exhaustive()
    }
}

impl PacketOpener {
    /// An opener for `direction` (see [`derive_keys`]).
    pub fn new(secret: &[u8; 32], direction: Direction) -> Self {
        Self {
            key: direction.key(secret),
        }
    }

    /// An opener for a room sender's media sealed with [`PacketSealer::for_room`].
    pub fn for_room(secret: &[u8; 32]) -> Self {
        Self {
            key: expand(secret, ROOM_SENDER_LABEL),
        }
    }

    /// Authenticates and decrypts a packet whose header was already decoded from it.
    pub fn open(&self, packet: &[u8]) -> Result<(Header, Vec<u8>), Error> {
        let (header, sealed) = Header::decode(packet)?;
        let mut buf = sealed.to_vec();
        let aad = Aad::from(&packet[..HEADER_LEN]);
        let len = self
            .key
            .open_in_place(nonce(header.track, header.sequence), aad, &mut buf)
            .map_err(|_| Error::AuthenticationFailed)?
            .len();
        buf.truncate(len);
        Ok((header, buf))
    }
}

/// An SRTP-style (RFC 3711 §3.3.2) sliding window over the last 64 sequence numbers.
///
/// [`check`](Self::check) before decrypting, [`accept`](Self::accept) only after the packet
/// authenticated, so forged packets cannot move the window.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    /// The highest accepted sequence number.
    highest: Option<u32>,
    /// Bit `i` set: `highest - i` was accepted.
    seen: u64,
}

impl ReplayWindow {
    /// Packets behind the highest accepted one that are still accepted.
    pub const SIZE: u32 = 64;

    /// Whether `sequence` is new and inside the window.
    pub fn check(&self, sequence: u32) -> Result<(), Error> {
        let Some(highest) = self.highest else { return Ok(()) };
        if sequence > highest {
            return Ok(());
        }
        let behind = highest - sequence;
        if behind >= Self::SIZE {
            Err(Error::TooOld { sequence })
        } else if self.seen & (1 << behind) != 0 {
            Err(Error::Replayed { sequence })
        } else {
            Ok(())
        }
    }

    /// Records an authenticated `sequence` (which passed [`check`](Self::check)).
    pub fn accept(&mut self, sequence: u32) {
        match self.highest {
            Some(highest) if sequence <= highest => {
                let behind = highest - sequence;
                if behind < Self::SIZE {
                    self.seen |= 1 << behind;
                }
            }
            Some(highest) => {
                let ahead = sequence - highest;
                self.seen = if ahead >= Self::SIZE { 0 } else { self.seen << ahead };
                self.seen |= 1;
                self.highest = Some(sequence);
            }
            None => {
                self.seen = 1;
                self.highest = Some(sequence);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Flags, packetize};

    const SECRET: [u8; 32] = [7; 32];

    fn header() -> Header {
        packetize(Track::AUDIO, 0, 0, false, &[]).unwrap().next().unwrap().0
    }

    #[test]
    fn sealed_by_one_side_opens_on_the_other() {
        let (mut caller_seal, caller_open) = derive_keys(&SECRET, Role::Caller);
        let (mut callee_seal, callee_open) = derive_keys(&SECRET, Role::Callee);
        let packet = caller_seal.seal(header(), b"hello").unwrap();
        assert_eq!(callee_open.open(&packet).unwrap().1, b"hello");
        // the reverse direction has another key
        assert!(matches!(caller_open.open(&packet), Err(Error::AuthenticationFailed)));
        let back = callee_seal.seal(header(), b"hi").unwrap();
        assert_eq!(caller_open.open(&back).unwrap().1, b"hi");
    }

    #[test]
    fn sequence_numbers_are_per_track_and_monotonic() {
        let (mut seal, open) = derive_keys(&SECRET, Role::Caller);
        let (_, other_open) = derive_keys(&SECRET, Role::Callee);
        let _ = open;
        let seqs: Vec<u32> = (0..3)
            .map(|_| other_open.open(&seal.seal(header(), b"x").unwrap()).unwrap().0.sequence)
            .collect();
        assert_eq!(seqs, [0, 1, 2]);
        let mut video = header();
        video.track = Track::VIDEO;
        assert_eq!(other_open.open(&seal.seal(video, b"x").unwrap()).unwrap().0.sequence, 0);
    }

    #[test]
    fn sealer_refuses_to_wrap_the_sequence() {
        let (mut seal, _) = derive_keys(&SECRET, Role::Caller);
        seal.set_next_sequence(Track::AUDIO, u32::MAX);
        assert!(seal.seal(header(), b"last").is_ok());
        assert!(matches!(
            seal.seal(header(), b"x"),
            Err(Error::SequenceExhausted(Track::AUDIO))
        ));
    }

    #[test]
    fn any_bit_flip_fails_authentication() {
        let (mut seal, _) = derive_keys(&SECRET, Role::Caller);
        let (_, open) = derive_keys(&SECRET, Role::Callee);
        let mut h = header();
        h.flags = Flags(h.flags.0 | Flags::KEY_FRAME);
        let packet = seal.seal(h, b"payload").unwrap();
        for bit in 0..packet.len() * 8 {
            let mut bad = packet.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(open.open(&bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn replay_window_accepts_reordering_and_rejects_repeats() {
        let mut w = ReplayWindow::default();
        for s in [5, 3, 4, 10, 6] {
            w.check(s).unwrap();
            w.accept(s);
        }
        for s in [5, 3, 4, 10, 6] {
            assert!(matches!(w.check(s), Err(Error::Replayed { .. })));
        }
        w.check(7).unwrap();
        w.accept(200);
        assert!(matches!(w.check(100), Err(Error::TooOld { .. })));
        w.check(137).unwrap();
        assert!(matches!(w.check(136), Err(Error::TooOld { .. })));
        w.check(201).unwrap();
    }
}
