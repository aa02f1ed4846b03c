//! Transport feedback: what the receiver got, sent back to the peer's sender every
//! [`crate::ReceiverConfig::feedback_interval`] (40 ms by default) and fed to its rate controller
//! ([`crate::Sender::handle_feedback`]).
//!
//! A packet is named by its track and per-track sequence number, both in the clear header: the
//! sender maps that pair to its own transport-wide send order and send time (see
//! [`crate::rate`]), so the 18-byte header needs no extra field and the relay's view of a packet
//! is unchanged.
//!
//! Wire form (big-endian; at most [`MAX_FEEDBACK_LEN`] bytes, one QUIC datagram):
//!
//! ```text
//! | 2 | seq u16 | bytes u64 | at µs u64 | n u8 | n × (track u8, highest seq u32, received u32)
//!   | m u8 | base µs u64 | m × (track u8, seq u32, arrival − base in 100 µs u16) |
//! ```
//!
//! - `bytes`: every media byte received so far (all tracks, cumulative); `at`: when this
//!   feedback was made, on the receiver's clock (µs since its start). Two feedbacks give the rate
//!   that reached the receiver, timed by the receiver.
//! - per track: the highest sequence number seen and how many packets arrived (cumulative,
//!   wrapping): the sender derives loss over any span of feedbacks, and a lost feedback loses
//!   nothing.
//! - arrivals: packets that arrived since the previous feedback with their arrival time. When
//!   more than [`MAX_ARRIVALS`] arrive in one interval the receiver keeps an even sample (every
//!   second, fourth, … packet): the delay detector works on groups, not on every packet.

use crate::{Error, Track};

/// Arrivals one feedback carries at most.
pub const MAX_ARRIVALS: usize = 48;
/// Tracks one feedback counts at most (audio, video and the first data tracks seen).
pub const MAX_TRACKS: usize = 8;
/// The longest encoded feedback.
pub const MAX_FEEDBACK_LEN: usize = 1 + 2 + 8 + 8 + 1 + MAX_TRACKS * 9 + 1 + 8 + MAX_ARRIVALS * 7;
const VERSION: u8 = 2;
/// Arrival offsets are in units of this many µs.
const OFFSET_UNIT_US: u64 = 100;

/// One packet's arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Its track.
    pub track: Track,
    /// Its sequence number on the track.
    pub sequence: u32,
    /// When it arrived, µs on the receiver's clock (100 µs resolution on the wire).
    pub at_us: u64,
}

/// Cumulative counts of one track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackCount {
    /// The track.
    pub track: Track,
    /// The highest sequence number received.
    pub highest: u32,
    /// Packets received so far (wrapping).
    pub received: u32,
}

/// One transport feedback message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Feedback {
    /// Feedback number (wrapping): the sender ignores reordered, older ones.
    pub seq: u16,
    /// Media bytes received so far, all tracks.
    pub received_bytes: u64,
    /// When this feedback was made, µs on the receiver's clock.
    pub at_us: u64,
    /// Per-track counts (at most 8 tracks).
    pub counts: Vec<TrackCount>,
    /// Arrivals since the previous feedback, oldest first (at most [`MAX_ARRIVALS`]).
    pub arrivals: Vec<Arrival>,
}

impl Feedback {
    /// The wire form. Counts and arrivals past the limits are left out; arrivals more than
    /// 6.5 s after the first are too (they belong in the next feedback).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_FEEDBACK_LEN);
        out.push(VERSION);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.received_bytes.to_be_bytes());
        out.extend_from_slice(&self.at_us.to_be_bytes());
        let counts = &self.counts[..self.counts.len().min(MAX_TRACKS)];
        out.push(counts.len() as u8);
        for c in counts {
            out.push(c.track.0);
            out.extend_from_slice(&c.highest.to_be_bytes());
            out.extend_from_slice(&c.received.to_be_bytes());
        }
        let base = self.arrivals.first().map_or(0, |a| a.at_us);
        let fits = |a: &&Arrival| a.at_us >= base && (a.at_us - base) / OFFSET_UNIT_US <= u64::from(u16::MAX);
        let arrivals: Vec<&Arrival> = self.arrivals.iter().filter(fits).take(MAX_ARRIVALS).collect();
        out.push(arrivals.len() as u8);
        out.extend_from_slice(&base.to_be_bytes());
        for a in arrivals {
            out.push(a.track.0);
            out.extend_from_slice(&a.sequence.to_be_bytes());
            out.extend_from_slice(&(((a.at_us - base) / OFFSET_UNIT_US) as u16).to_be_bytes());
        }
        out
    }

    /// Reads the wire form; never panics. Trailing bytes (a later version's fields) are ignored.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = Reader(bytes);
        if r.u8()? != VERSION {
            return Err(Error::Malformed("unknown feedback version"));
        }
        let seq = r.u16()?;
        let received_bytes = r.u64()?;
        let at_us = r.u64()?;
        let n = usize::from(r.u8()?);
        if n > MAX_TRACKS {
            return Err(Error::Malformed("feedback counts too many tracks"));
        }
        let mut counts = Vec::with_capacity(n);
        for _ in 0..n {
            counts.push(TrackCount {
                track: r.track()?,
                highest: r.u32()?,
                received: r.u32()?,
            });
        }
        let m = usize::from(r.u8()?);
        if m > MAX_ARRIVALS {
            return Err(Error::Malformed("feedback carries too many arrivals"));
        }
        let base = r.u64()?;
        let mut arrivals = Vec::with_capacity(m);
        for _ in 0..m {
            let track = r.track()?;
            let sequence = r.u32()?;
            let offset = u64::from(r.u16()?) * OFFSET_UNIT_US;
            arrivals.push(Arrival {
                track,
                sequence,
                at_us: base.saturating_add(offset),
            });
        }
        Ok(Self {
            seq,
            received_bytes,
            at_us,
            counts,
            arrivals,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(Error::Malformed("feedback cut short"))?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_be_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_be_bytes(self.take()?))
    }
    fn track(&mut self) -> Result<Track, Error> {
        let n = self.u8()?;
        if n >= Track::COUNT {
            return Err(Error::Malformed("feedback names a track above 47"));
        }
        Ok(Track(n))
    }
}

/// The receiver's side: records arrivals and makes feedback messages.
#[derive(Debug, Clone, Default)]
pub(crate) struct FeedbackBuilder {
    seq: u16,
    received_bytes: u64,
    counts: Vec<TrackCount>,
    arrivals: Vec<Arrival>,
    /// Every `stride`-th packet is kept in `arrivals` this interval (doubles when it fills).
    stride: u32,
    seen: u32,
    /// Anything new since the last feedback.
    fresh: bool,
}

impl FeedbackBuilder {
    /// Records an authenticated packet.
    pub(crate) fn record(&mut self, track: Track, sequence: u32, len: usize, at_us: u64) {
        self.fresh = true;
        self.received_bytes += len as u64;
        let full = self.counts.len() >= MAX_TRACKS;
        match self.counts.iter_mut().find(|c| c.track == track) {
            Some(c) => {
                c.received = c.received.wrapping_add(1);
                if sequence.wrapping_sub(c.highest) < u32::MAX / 2 {
                    c.highest = sequence;
                }
            }
            None if !full => self.counts.push(TrackCount {
                track,
                highest: sequence,
                received: 1,
            }),
            None => {}
        }
        let stride = self.stride.max(1);
        self.seen = self.seen.wrapping_add(1);
        if self.seen % stride != 0 {
            return;
        }
        if self.arrivals.len() == MAX_ARRIVALS {
            // Keep every other one: an even sample of the interval, at half the density.
            let mut i = 0;
            self.arrivals.retain(|_| {
                i += 1;
                i % 2 == 0
            });
            self.stride = stride * 2;
            if self.seen % self.stride != 0 {
                return;
            }
        }
        self.arrivals.push(Arrival { track, sequence, at_us });
    }

    /// Whether anything arrived since the last [`take`](Self::take).
    pub(crate) fn fresh(&self) -> bool {
        self.fresh
    }

    /// The feedback covering everything since the previous one.
    pub(crate) fn take(&mut self, at_us: u64) -> Feedback {
        let feedback = Feedback {
            seq: self.seq,
            received_bytes: self.received_bytes,
            at_us,
            counts: self.counts.clone(),
            arrivals: std::mem::take(&mut self.arrivals),
        };
        self.seq = self.seq.wrapping_add(1);
        self.stride = 1;
        self.seen = 0;
        self.fresh = false;
        feedback
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_feedback_round_trips_and_fits_its_bound() {
        let mut b = FeedbackBuilder::default();
        for i in 0..500u32 {
            b.record(Track::VIDEO, i, 500, 1_000_000 + u64::from(i) * 100);
            if i % 10 == 0 {
                b.record(Track::AUDIO, i / 10, 120, 1_000_000 + u64::from(i) * 100);
            }
        }
        let f = b.take(1_060_000);
        assert!(
            f.arrivals.len() <= MAX_ARRIVALS && f.arrivals.len() >= MAX_ARRIVALS / 2,
            "{}",
            f.arrivals.len()
        );
        // An even sample: spread over the whole interval, not only its start.
        assert!(f.arrivals.last().unwrap().at_us > 1_040_000, "{:?}", f.arrivals.last());
        let wire = f.encode();
        assert!(wire.len() <= MAX_FEEDBACK_LEN, "{} bytes", wire.len());
        let back = Feedback::decode(&wire).unwrap();
        assert_eq!(back.counts, f.counts);
        assert_eq!(back.received_bytes, 500 * 500 + 50 * 120);
        assert_eq!(back.arrivals.len(), f.arrivals.len());
        for (a, b) in back.arrivals.iter().zip(&f.arrivals) {
            assert_eq!((a.track, a.sequence), (b.track, b.sequence));
            assert!(b.at_us - a.at_us < OFFSET_UNIT_US, "{a:?} {b:?}");
        }
        let video = back.counts.iter().find(|c| c.track == Track::VIDEO).unwrap();
        assert_eq!((video.highest, video.received), (499, 500));
        // The next interval starts empty, with the cumulative counts kept.
        assert!(!b.fresh());
        let next = b.take(1_100_000);
        assert!(next.arrivals.is_empty());
        assert_eq!(next.seq, f.seq.wrapping_add(1));
        assert_eq!(next.received_bytes, back.received_bytes);
    }

    #[test]
    fn truncated_or_foreign_feedback_is_refused() {
        let wire = FeedbackBuilder::default().take(5).encode();
        for cut in 0..wire.len() {
            assert!(Feedback::decode(&wire[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = wire.clone();
        bad[0] = 1;
        assert!(Feedback::decode(&bad).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Feedback::decode(&bytes);
        }

        #[test]
        fn encoding_is_stable(seqs in proptest::collection::vec((0u8..3, any::<u32>(), 0u64..5_000_000), 0..200)) {
            let mut b = FeedbackBuilder::default();
            for (t, s, at) in seqs {
                b.record(Track(t), s, 100, at);
            }
            let once = Feedback::decode(&b.take(7).encode()).unwrap();
            prop_assert_eq!(Feedback::decode(&once.encode()).unwrap(), once);
        }
    }
}
