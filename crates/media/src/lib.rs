//! Sans-IO media transport for natcall: frames of any size become sealed packets of at most
//! 512 bytes, paced with audio first at the target of a rate controller; the receiver
//! authenticates, reassembles, buffers against jitter, keeps per-track statistics and sends the
//! sender transport feedback.
//!
//! # Main types
//! - [`Sender`] ([`SenderConfig`], [`Frame`], [`Transmit`]): queues, packetizes, seals, paces.
//! - [`Receiver`] ([`ReceiverConfig`], [`ReceivedFrame`]): opens, reassembles, plays out in order.
//! - [`Feedback`]: what the receiver got (arrival times, counts), every 40 ms, for the sender.
//! - [`RateController`] ([`RateConfig`], [`RateState`]): the sender's target bitrate from the
//!   feedback (GCC's delay gradient, loss limits, probes), a path's budget and its overhead.
//! - [`derive_keys`] ([`Role`], [`PacketSealer`], [`PacketOpener`]): per-direction keys.
//! - [`Stats`], [`SendStats`]: what happened per track.
//! - [`Header`], [`packetize`]: the packet format itself.
//!
//! # Packet layout
//! ```text
//!  0        1               5               9               13      15      17     18
//! +--------+---------------+---------------+---------------+-------+-------+------+-----------------+----------+
//! | 16+trk | sequence u32  | timestamp u32 | frame id u32  | index | count | flags| ciphertext ≤ 478| tag (16) |
//! +--------+---------------+---------------+---------------+-------+-------+------+-----------------+----------+
//!  \_______________________ clear header: AEAD associated data ________________/
//! ```
//! The whole packet (the UDP payload, or a relay frame's payload) is at most [`MAX_PACKET`] = 512
//! bytes, so a fragment carries at most [`MAX_FRAGMENT_PAYLOAD`] = 478 bytes and a frame at
//! most [`MAX_FRAME`] = 16 MiB (35 099 fragments; the count is a u16). The first byte, 16..=63,
//! is what the peer's socket demultiplexer routes to media; track 0 is audio, 1 video, 2..=47
//! data (47 is [`Track::PADDING`]: a rate probe's padding, counted, never delivered). Flags:
//! [`Flags::KEY_FRAME`], [`Flags::FRAME_START`], [`Flags::FRAME_END`], with the same bits as the
//! relay header's, so the relay can see them while the payload stays sealed.
//!
//! # Keys
//! ChaCha20-Poly1305 (ring). The caller exports 32 bytes from the call's QUIC session
//! (`export_keying_material`); HKDF-SHA256 derives one key per direction (labels
//! `"natcall media caller→callee"` and `"natcall media callee→caller"`). The nonce is the track
//! and the sequence number; the sealer owns one monotonic sequence per track and stops a track
//! rather than wrap it, so nonces never repeat under a key. The receiver keeps a 64-packet
//! replay window per track (as SRTP) and updates it only after authentication.
//!
//! # Rate control
//! The sender's [`RateController`] sets the target from the receiver's [`Feedback`]
//! ([`Sender::handle_feedback`]), a path's budget ([`Sender::handle_budget`]: the relay's, for a
//! receiver it is the bottleneck of) and time ([`Sender::handle_timeout`]); the application sets
//! the ceiling ([`Sender::set_max_rate`]) and the path's per-packet overhead
//! ([`Sender::set_overhead`]). An encoder sizes its frames to [`Sender::video_budget_bps`]. See
//! the [`rate`] module for the algorithm.
//!
//! # Pacing and priorities
//! A token bucket paces packets to the target (faster while a rate probe runs, topped up with
//! padding). Tracks are served by number: audio, then video, then data.
//! Audio is never held back: it is sent even when the bucket is empty, and its bytes are
//! charged to the bucket, so video waits instead. Under congestion the sender lowers the rate
//! and drops whole queued video frames up to the newest key frame (or all of them, then every
//! new video frame until a key frame: see [`Sender::needs_key_frame`]); a frame already being
//! sent is finished. Too deep a video queue triggers the same drop.
//!
//! A source that must not lose data (a file, a pipe) asks [`Sender::has_room`] before queuing
//! each frame (the pacer has budget and the backlog stays within
//! [`SenderConfig::stream_backlog`]) and, when there is none, waits until
//! [`Sender::budget_at`]: it is slowed to the pace instead of being cut.
//!
//! # Jitter buffer
//! Frames play at `timestamp + min(arrival − timestamp) + target`, in frame-id order per track.
//! The target adapts: [`ReceiverConfig::target_delay`] at least, raised to the delay spread seen
//! in the last 10–20 s (+ 5 ms), at most [`ReceiverConfig::max_target_delay`].
//!
//! # Statistics
//! [`Stats`] per track at the receiver: packets received / lost (gaps in sequence numbers) /
//! late (after their frame was played or given up) / duplicated (replays included) / too old /
//! auth-failed, bytes, frames complete / incomplete / late (completed after their playout time),
//! RFC 3550 interarrival jitter, a relative one-way delay (arrival − timestamp above its
//! minimum: queueing delay, since the clocks are not synchronised) and the bitrate over the
//! last second; also packets reordered and the jitter buffer's current target. [`SendStats`] per track at the sender: packets, bytes, frames sent and dropped,
//! what is queued. Both are `serde::Serialize` for the CLI's JSON report.
//!
//! # Architecture invariant
//! No socket, clock, thread or OS randomness: time comes in as `now: Instant` and packets go
//! out through [`Sender::poll_transmit`]. A `.clippy.toml` bans `Instant::now` and friends.
//!
//! # Drive loop
//! Sender: after each `handle_*`, and when [`Sender::poll_timeout`] passes, drain
//! [`Sender::poll_transmit`]; call [`Sender::handle_timeout`] every few tens of ms. Receiver:
//! after each `handle_*`, drain [`Receiver::poll_frame`] and send what
//! [`Receiver::poll_feedback`] gives to the peer (which feeds it to
//! [`Sender::handle_feedback`]), then wait for a packet or [`Receiver::poll_timeout`].
//!
//! # Example
//! ```
//! use std::time::{Duration, Instant};
//! use natcall_media::{derive_keys, Frame, Receiver, ReceiverConfig, Role, Sender, SenderConfig, Track};
//!
//! let secret = [42u8; 32]; // from the QUIC session's export_keying_material
//! # let start = Instant::now();
//! let (sealer, _) = derive_keys(&secret, Role::Caller);
//! let (_, opener) = derive_keys(&secret, Role::Callee);
//! let mut sender = Sender::new(SenderConfig::default(), sealer, start);
//! let mut receiver = Receiver::new(ReceiverConfig::default(), opener, start);
//!
//! sender.handle_frame(Track::AUDIO, Frame::new(0, vec![1; 80])).unwrap();
//! sender.handle_frame(Track::VIDEO, Frame::key(0, vec![2; 5000])).unwrap();
//! let mut now = start;
//! let mut frames = Vec::new();
//! while frames.len() < 2 {
//!     while let Some(transmit) = sender.poll_transmit(now) {
//!         assert!(transmit.contents.len() <= natcall_media::MAX_PACKET);
//!         receiver.handle_packet(now + Duration::from_millis(30), &transmit.contents).unwrap();
//!     }
//!     now += Duration::from_millis(10);
//!     receiver.handle_timeout(now);
//!     frames.extend(std::iter::from_fn(|| receiver.poll_frame()));
//! }
//! assert_eq!(frames[0].track, Track::AUDIO); // audio went first
//! assert_eq!(frames[1].data, vec![2; 5000]);
//! let stats = receiver.stats(Track::VIDEO, now).unwrap();
//! assert_eq!((stats.frames_complete, stats.packets_lost), (1, 0));
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod crypto;
mod feedback;
mod packet;
pub mod rate;
mod receiver;
pub mod room;
mod sender;
mod stats;

use serde::Serialize;

pub use crypto::{Direction, PacketOpener, PacketSealer, ReplayWindow, Role, derive_keys};
pub use feedback::{Arrival, Feedback, MAX_ARRIVALS, MAX_FEEDBACK_LEN, TrackCount};
pub use packet::{
    FIRST_BYTE_BASE, Flags, HEADER_LEN, Header, MAX_FRAGMENT_PAYLOAD, MAX_FRAGMENTS, MAX_FRAME, MAX_PACKET, TAG_LEN,
    fragment_count, fragment_range, packetize,
};
pub use rate::{ProbeRequest, RateConfig, RateController, RateReason, RateState, Usage};
pub use receiver::{Playout, ReceivedFrame, Receiver, ReceiverConfig};
pub use room::{RoomReceiver, SenderKey};
pub use sender::{Frame, Sender, SenderConfig, Transmit};
pub use stats::{SendStats, Stats};

/// A media track: 0 audio, 1 video, 2..=46 data, 47 padding. Lower numbers are sent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Track(u8);

impl Track {
    /// Audio: small frames, highest priority.
    pub const AUDIO: Track = Track(0);
    /// Video: key frames marked, dropped whole under congestion.
    pub const VIDEO: Track = Track(1);
    /// Padding the sender adds to a rate probe: sealed like media, counted in the receiver's
    /// feedback, never delivered to the application.
    pub const PADDING: Track = Track(47);
    /// How many tracks the first byte can encode (16 + 47 = 63).
    pub const COUNT: u8 = 48;

    /// Track `number`, if below [`Track::COUNT`].
    pub fn new(number: u8) -> Option<Track> {
        (number < Self::COUNT).then_some(Track(number))
    }

    /// Data track `index` (track `2 + index`, at most 46), if it fits.
    pub fn data(index: u8) -> Option<Track> {
        index
            .checked_add(2)
            .filter(|&n| n < Self::PADDING.0)
            .and_then(Self::new)
    }

    /// The track number.
    pub fn number(self) -> u8 {
        self.0
    }

    /// A label for logs and reports.
    pub fn as_str(self) -> &'static str {
        match self.0 {
            0 => "audio",
            1 => "video",
            47 => "padding",
            _ => "data",
        }
    }
}

/// Errors of this crate's API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A frame exceeds what fits in one frame's packets.
    #[error("frame of {len} bytes is larger than the maximum of {max} bytes")]
    FrameTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A packet or report is not well-formed.
    #[error("malformed media packet: {0}")]
    Malformed(&'static str),
    /// A packet failed AEAD authentication.
    #[error("media packet failed authentication")]
    AuthenticationFailed,
    /// A packet's sequence number was already received (duplicate or replay).
    #[error("media packet {sequence} was already received")]
    Replayed {
        /// Its sequence number.
        sequence: u32,
    },
    /// A packet is behind the replay window.
    #[error("media packet {sequence} is too old for the replay window")]
    TooOld {
        /// Its sequence number.
        sequence: u32,
    },
    /// A track used all 2³² sequence numbers of this key; the call must rekey.
    #[error("track {} used up its sequence numbers; the call must rekey", .0.0)]
    SequenceExhausted(Track),
    /// A data track's send queue is full; retry after draining `poll_transmit`.
    #[error("send queue of track {} is full", .0.0)]
    QueueFull(Track),
}

/// The origin of virtual time in unit tests (the one permitted clock read).
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
pub(crate) fn test_origin() -> std::time::Instant {
    std::time::Instant::now()
}
