//! The sending side: per-track queues, packetization, sealing, pacing and priorities.
//!
//! Data flow:
//! 1. [`Sender::handle_frame`] queues a frame on its track (video frames may be dropped here
//!    while the sender waits for a key frame or when the queue is too deep).
//! 2. [`Sender::poll_transmit`] picks the highest-priority track with data (audio, then video,
//!    then data tracks by number), cuts the next fragment of its current frame, seals it, and
//!    charges the token bucket. Audio is never held back by the bucket.
//! 3. [`Sender::handle_feedback`] feeds the receiver's transport feedback to the call's
//!    [`RateController`]; its target is the pacing rate. When the rate drops, video queued
//!    for longer than [`SenderConfig::max_video_queue_delay`] at the new rate is dropped whole,
//!    up to the newest key frame.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::crypto::PacketSealer;
use crate::feedback::Feedback;
use crate::packet::{
    Flags, HEADER_LEN, MAX_FRAGMENT_PAYLOAD, MAX_FRAME, TAG_LEN, fragment_count, fragment_header, fragment_range,
};
use crate::rate::{RateConfig, RateController, RateState};
use crate::stats::RateMeter;
use crate::stats::SendStats;
use crate::{Error, Track};

/// Sender settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SenderConfig {
    /// The ceiling of the target bitrate (what the application allows), in bit/s.
    pub rate_bps: u64,
    /// The target before any feedback (at most `rate_bps`), in bit/s.
    pub start_rate_bps: u64,
    /// Feedback never lowers the target below this.
    pub min_rate_bps: u64,
    /// The token bucket holds this much sending time at the current rate (at least one packet).
    pub burst: Duration,
    /// Video queued for longer than this (at the current rate) is dropped up to a key frame.
    pub max_video_queue_delay: Duration,
    /// Bytes queued per track; beyond, video drops frames and data tracks refuse them.
    pub max_queue_bytes: usize,
    /// Audio frames queued; the oldest is dropped beyond (only if `poll_transmit` is not drained).
    pub max_audio_frames: usize,
    /// [`Sender::has_room`] keeps a track's backlog within this much sending time: enough to
    /// keep the pacer busy, short enough that queuing is not mistaken for a growing path delay
    /// (frame timestamps are taken when frames are queued).
    pub stream_backlog: Duration,
    /// [`Sender::video_budget_bps`] asks for frames small enough to send the queued video
    /// within this time.
    pub backlog_drain: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            rate_bps: 2_000_000,
            start_rate_bps: 300_000,
            min_rate_bps: 100_000,
            burst: Duration::from_millis(20),
            max_video_queue_delay: Duration::from_millis(400),
            max_queue_bytes: MAX_FRAME + MAX_FRAME / 2,
            max_audio_frames: 50,
            stream_backlog: Duration::from_millis(20),
            backlog_drain: Duration::from_millis(500),
        }
    }
}

/// A frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Media clock in ms (the receiver's jitter buffer restores the spacing of timestamps).
    pub timestamp: u32,
    /// A frame that decodes on its own (video); the sender resumes at key frames.
    pub key_frame: bool,
    /// Up to [`MAX_FRAME`] bytes.
    pub data: Vec<u8>,
}

impl Frame {
    /// A frame that depends on earlier ones (or an audio/data frame).
    pub fn new(timestamp: u32, data: Vec<u8>) -> Self {
        Self {
            timestamp,
            key_frame: false,
            data,
        }
    }

    /// A key frame.
    pub fn key(timestamp: u32, data: Vec<u8>) -> Self {
        Self {
            timestamp,
            key_frame: true,
            data,
        }
    }
}

/// A sealed media packet for the caller to send on the current path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Its track (audio and video map to the relay's traffic classes).
    pub track: Track,
    /// Its flags, bit-compatible with the relay header's flags.
    pub flags: Flags,
    /// Its sequence number on the track (what the receiver's feedback names it by).
    pub sequence: u32,
    /// The whole UDP payload, at most [`crate::MAX_PACKET`] bytes.
    pub contents: Vec<u8>,
}

/// The sending half of a call's media.
///
/// # Drive contract
/// After every [`handle_frame`](Self::handle_frame), [`handle_feedback`](Self::handle_feedback),
/// [`handle_budget`](Self::handle_budget), [`set_rate`](Self::set_rate) and
/// [`set_max_rate`](Self::set_max_rate), and whenever
/// [`poll_timeout`](Self::poll_timeout) passes, drain [`poll_transmit`](Self::poll_transmit)
/// with the current time until it returns `None`, then re-read `poll_timeout`. Call
/// [`handle_timeout`](Self::handle_timeout) every few tens of ms (the controller notices
/// silent feedback there).
#[derive(Debug)]
pub struct Sender {
    config: SenderConfig,
    sealer: PacketSealer,
    rate_bps: u64,
    rate: RateController,
    /// Audio bytes sent over the last second (with the path's overhead): the share of the
    /// target video may not take.
    audio_meter: RateMeter,
    /// Bytes the path adds to every packet, counted in the target and the pace.
    overhead: usize,
    /// The rate probe being sent, if any.
    probe: Option<ProbeRun>,
    /// Frame ids of padding packets.
    padding_frames: u32,
    tokens: f64,
    last_refill: Instant,
    tracks: BTreeMap<Track, SendTrack>,
}

/// A rate probe being sent: its packets go at `rate_bps` until `bytes_left` are out.
#[derive(Debug, Clone, Copy)]
struct ProbeRun {
    id: u32,
    rate_bps: u64,
    bytes_left: i64,
}

#[derive(Debug, Default)]
struct SendTrack {
    queue: VecDeque<Frame>,
    /// Frame bytes of the queue and the unsent part of the current frame.
    queued_bytes: usize,
    current: Option<Current>,
    next_frame_id: u32,
    waiting_for_key: bool,
    /// The path dropped frames: the next key frame is wanted (frames are not dropped here).
    key_requested: bool,
    exhausted: bool,
    /// Fed by a source that waits for room: never dropped for congestion or depth.
    lossless: bool,
    stats: SendStats,
}

#[derive(Debug)]
struct Current {
    frame: Frame,
    id: u32,
    next: u16,
    count: u16,
}

/// Approximate wire bytes of a frame: data plus, per packet, the media header and tag and the
/// path's `overhead`.
fn wire_bytes(len: usize, overhead: usize) -> usize {
    len + usize::from(fragment_count(len).unwrap_or(u16::MAX)) * (HEADER_LEN + TAG_LEN + overhead)
}

impl Sender {
    /// A sender sealing with `sealer` (from [`crate::derive_keys`]).
    pub fn new(config: SenderConfig, sealer: PacketSealer, now: Instant) -> Self {
        let max = config.rate_bps.max(config.min_rate_bps).max(1);
        let rate = RateController::new(
            RateConfig {
                start_bps: config.start_rate_bps.min(max),
                min_bps: config.min_rate_bps,
                max_bps: max,
                ..RateConfig::default()
            },
            now,
        );
        let mut sender = Self {
            config,
            sealer,
            rate_bps: rate.target_bps().max(1),
            rate,
            audio_meter: RateMeter::new(now, Duration::from_secs(1)),
            overhead: 0,
            probe: None,
            padding_frames: 0,
            tokens: 0.0,
            last_refill: now,
            tracks: BTreeMap::new(),
        };
        sender.tokens = sender.burst_bytes();
        sender
    }

    /// Seals from now on with a room sender key's new `secret` ([`PacketSealer::rekey_room`]).
    pub fn rekey_room(&mut self, secret: &[u8; 32]) {
        self.sealer.rekey_room(secret);
    }

    /// Queues a frame on `track`. Video frames may be dropped (and counted) instead; a data
    /// track whose queue is full refuses the frame with [`Error::QueueFull`].
    pub fn handle_frame(&mut self, track: Track, frame: Frame) -> Result<(), Error> {
        if frame.data.len() > MAX_FRAME {
            return Err(Error::FrameTooLarge {
                len: frame.data.len(),
                max: MAX_FRAME,
            });
        }
        let (max_bytes, max_audio) = (self.config.max_queue_bytes, self.config.max_audio_frames.max(1));
        let t = self.tracks.entry(track).or_default();
        if t.exhausted {
            return Err(Error::SequenceExhausted(track));
        }
        if track == Track::AUDIO {
            t.push(frame);
            while t.queue.len() > max_audio {
                t.drop_front();
            }
        } else if track == Track::VIDEO && !t.lossless {
            if t.waiting_for_key && !frame.key_frame {
                t.stats.frames_dropped += 1;
                return Ok(());
            }
            t.waiting_for_key = false;
            t.key_requested &= !frame.key_frame;
            t.push(frame);
            let delay_s = wire_bytes(t.queued_bytes, self.overhead) as f64 * 8.0 / self.rate_bps as f64;
            if t.queued_bytes > max_bytes || delay_s > self.config.max_video_queue_delay.as_secs_f64() {
                debug!(
                    queued = t.queued_bytes,
                    frames = t.queue.len(),
                    rate = self.rate_bps,
                    tokens = self.tokens,
                    "video queue too deep, dropping to a key frame"
                );
                t.drop_until_key();
            }
        } else {
            if t.queued_bytes + frame.data.len() > max_bytes {
                return Err(Error::QueueFull(track));
            }
            t.push(frame);
        }
        Ok(())
    }

    /// Feeds the receiver's transport feedback to the rate controller and paces at its target.
    pub fn handle_feedback(&mut self, now: Instant, feedback: &Feedback) {
        self.refill(now);
        self.rate.handle_feedback(now, feedback);
        self.follow_target();
    }

    /// A cap from the path (the relay's drain rate for the receiver), in bit/s.
    pub fn handle_budget(&mut self, now: Instant, bps: u64) {
        self.refill(now);
        self.rate.handle_budget(now, bps);
        self.follow_target();
    }

    /// The path dropped frames of this call (the relay emptying its buffer for the receiver):
    /// video may be skipped there until a key frame, so ask the encoder for one
    /// ([`needs_key_frame`](Self::needs_key_frame)), as a receiver's picture loss indication would.
    pub fn handle_path_drops(&mut self, dropped: u32) {
        if dropped > 0
            && let Some(video) = self.tracks.get_mut(&Track::VIDEO).filter(|v| !v.lossless)
        {
            video.key_requested = true;
        }
    }

    /// Advances the controller's clock (silent feedback halves the target).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.refill(now);
        self.rate.handle_timeout(now);
        self.follow_target();
    }

    /// Bytes the current path adds to each packet (28 for UDP over IPv4, 48 over IPv6, more
    /// through a relay): the target, the pace and the video budget count them, so the target
    /// is what the network carries.
    pub fn set_overhead(&mut self, bytes: usize) {
        self.overhead = bytes;
        self.rate.set_overhead(bytes);
    }

    /// Whether the current path may be probed ([`RateController::set_probing`]: not through a
    /// relay).
    pub fn set_probing(&mut self, on: bool) {
        self.rate.set_probing(on);
    }

    /// Whether the current path delivers in bursts ([`RateController::set_bursty_path`]: a
    /// relay).
    pub fn set_bursty_path(&mut self, on: bool) {
        self.rate.set_bursty_path(on);
    }

    /// Media moved to another path ([`RateController::path_changed`]).
    pub fn path_changed(&mut self) {
        self.rate.path_changed();
    }

    /// The path's round-trip time, for the controller's response time.
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rate.set_rtt(rtt);
    }

    /// Sets the ceiling of the target (what the application allows the call to use); the
    /// controller keeps adapting below it.
    pub fn set_max_rate(&mut self, now: Instant, bps: u64) {
        self.refill(now);
        self.rate.set_max(bps);
        self.follow_target();
    }

    /// Sets the target and its ceiling at once: a fixed rate from now, which feedback then
    /// adapts.
    pub fn set_rate(&mut self, now: Instant, bps: u64) {
        self.refill(now);
        self.rate.set_rate(bps);
        self.follow_target();
    }

    /// The current pacing rate (the controller's target) in bit/s.
    pub fn rate_bps(&self) -> u64 {
        self.rate_bps
    }

    /// What the rate controller knows.
    pub fn rate_state(&self) -> RateState {
        self.rate.state()
    }

    /// What video may use of the target: the target less what audio took over the last second
    /// (audio first: it is never starved to make room for video).
    ///
    /// In frame bytes (what an encoder produces): the packets' own header and tag (34 of every
    /// 512 bytes) and the path's overhead are taken off.
    /// Video already queued counts against it, spread over [`SenderConfig::backlog_drain`], as
    /// an encoder's rate control does: a backlog left by a drop in the target is worked off by
    /// smaller frames instead of lingering as delay.
    pub fn video_budget_bps(&self, now: Instant) -> u64 {
        let wire = self.rate_bps.saturating_sub(self.audio_meter.rate_bps(now));
        let frames = wire * MAX_FRAGMENT_PAYLOAD as u64 / (crate::MAX_PACKET + self.overhead) as u64;
        let queued = self.tracks.get(&Track::VIDEO).map_or(0, |t| t.queued_bytes) as f64;
        let drain = (queued * 8.0 / self.config.backlog_drain.as_secs_f64().max(1e-3)) as u64;
        frames.saturating_sub(drain)
    }

    fn follow_target(&mut self) {
        let target = self.rate.target_bps().max(1);
        let lower = target < self.rate_bps;
        self.rate_bps = target;
        if lower {
            // Video queued for too long at the new rate goes, whole frames up to a key frame.
            let limit = self.config.max_video_queue_delay.as_secs_f64();
            if let Some(video) = self.tracks.get_mut(&Track::VIDEO).filter(|v| !v.lossless) {
                let delay_s = wire_bytes(video.queued_bytes, self.overhead) as f64 * 8.0 / target as f64;
                if delay_s > limit {
                    debug!(
                        target,
                        queued = video.queued_bytes,
                        "video queue too deep for the new rate"
                    );
                    video.drop_until_key();
                }
            }
        }
    }

    /// The next packet to send now, if the pacer allows one. Audio always goes first and is
    /// never held back; other tracks wait for tokens.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if self.probe.is_none()
            && let Some(p) = self.rate.poll_probe(now)
        {
            self.refill(now);
            self.probe = Some(ProbeRun {
                id: p.id,
                rate_bps: p.rate_bps,
                bytes_left: p.bytes as i64,
            });
        }
        self.refill(now);
        let tracks: Vec<Track> = self.tracks.keys().copied().collect();
        for track in tracks {
            let Some(t) = self.tracks.get_mut(&track) else { continue };
            if t.current.is_none() && t.queue.is_empty() {
                continue;
            }
            if track != Track::AUDIO && self.tokens <= 0.0 {
                return None;
            }
            match t.next_packet(track, &mut self.sealer) {
                Ok(transmit) => {
                    self.account(now, &transmit);
                    return Some(transmit);
                }
                Err(e) => {
                    warn!(track = track.0, error = %e, "media track stopped");
                    t.exhausted = true;
                    t.current = None;
                    while !t.queue.is_empty() {
                        t.drop_front();
                    }
                    t.queued_bytes = 0;
                }
            }
        }
        // A probe with no media waiting is topped up with padding.
        if self.probe.is_some() && self.tokens > 0.0 {
            let transmit = self.padding_packet()?;
            self.account(now, &transmit);
            return Some(transmit);
        }
        None
    }

    /// Charges a packet handed out to the pacer, the controller and a running probe.
    fn account(&mut self, now: Instant, transmit: &Transmit) {
        let len = transmit.contents.len();
        let wire = len + self.overhead;
        self.tokens = (self.tokens - wire as f64).max(-self.burst_bytes());
        self.rate
            .on_sent(now, transmit.track, transmit.sequence, len, self.probe.map(|p| p.id));
        if transmit.track == Track::AUDIO {
            self.audio_meter.add(now, wire);
        }
        if let Some(p) = self.probe.as_mut() {
            p.bytes_left -= wire as i64;
            if p.bytes_left <= 0 {
                self.rate.probe_sent(now, p.id);
                self.probe = None;
            }
        }
    }

    /// A full-size packet of padding (track [`Track::PADDING`]), `None` once that track's
    /// sequence numbers are used up (then probes carry only media).
    fn padding_packet(&mut self) -> Option<Transmit> {
        let header = fragment_header(Track::PADDING, self.padding_frames, 0, false, 0, 1);
        let sequence = self.sealer.next_sequence(Track::PADDING)?;
        let contents = self.sealer.seal(header, &[0; MAX_FRAGMENT_PAYLOAD]).ok()?;
        self.padding_frames = self.padding_frames.wrapping_add(1);
        Some(Transmit {
            track: Track::PADDING,
            flags: header.flags,
            sequence,
            contents,
        })
    }

    /// The pacer's rate: the target, or a running probe's rate.
    fn pace_bps(&self) -> u64 {
        self.probe.map_or(self.rate_bps, |p| p.rate_bps.max(self.rate_bps))
    }

    /// When [`poll_transmit`](Self::poll_transmit) will next have a packet, if anything is queued.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let pending = |t: &SendTrack| t.current.is_some() || !t.queue.is_empty();
        if self.rate.probe_pending() || self.tracks.get(&Track::AUDIO).is_some_and(pending) {
            return Some(self.last_refill);
        }
        let waiting = self.probe.is_some() || self.tracks.values().any(pending);
        if !waiting {
            return None;
        }
        if self.tokens > 0.0 {
            return Some(self.last_refill);
        }
        let wait_s = (1.0 - self.tokens) * 8.0 / self.pace_bps() as f64;
        Some(self.last_refill + Duration::from_secs_f64(wait_s.max(0.0)))
    }

    /// Whether a frame of `len` bytes queued on `track` now would be sent without dropping
    /// anything: with it, the track's backlog stays within `stream_backlog` at the current rate
    /// and within `max_queue_bytes` (an empty track always has room). A source that
    /// must not lose data (a file, a pipe) waits for room instead of queuing, so it is slowed to
    /// the path's pace rather than cut.
    pub fn has_room(&self, track: Track, len: usize) -> bool {
        // Audio is never held back by the pacer once queued: a stream waits here instead.
        if self.tokens <= 0.0 {
            return false;
        }
        let Some(t) = self.tracks.get(&track) else {
            return true;
        };
        if t.current.is_none() && t.queue.is_empty() {
            return true;
        }
        let queued = t.queued_bytes + len;
        let delay_s = wire_bytes(queued, self.overhead) as f64 * 8.0 / self.rate_bps as f64;
        let audio_ok = track != Track::AUDIO || t.queue.len() < self.config.max_audio_frames;
        let limit = self
            .config
            .stream_backlog
            .min(self.config.max_video_queue_delay / 2)
            .as_secs_f64();
        audio_ok && queued <= self.config.max_queue_bytes && delay_s <= limit
    }

    /// When the pacer will have sending budget again (now if it has some): when a source
    /// waiting for [`has_room`](Self::has_room) should ask again.
    pub fn budget_at(&self) -> Instant {
        if self.tokens > 0.0 {
            return self.last_refill;
        }
        let wait_s = (1.0 - self.tokens) * 8.0 / self.pace_bps() as f64;
        self.last_refill + Duration::from_secs_f64(wait_s)
    }

    /// Makes `track` lossless: its frames are never dropped for congestion or queue depth (a
    /// lower rate only slows it). For tracks fed by a source that waits for
    /// [`has_room`](Self::has_room) — a file, a pipe — whose every byte matters.
    pub fn set_lossless(&mut self, track: Track) {
        self.tracks.entry(track).or_default().lossless = true;
    }

    /// Whether nothing is queued on any track: everything handed over has been sent (or dropped).
    pub fn is_idle(&self) -> bool {
        self.tracks.values().all(|t| t.current.is_none() && t.queue.is_empty())
    }

    /// Statistics of `track`, if a frame was ever queued on it.
    pub fn stats(&self, track: Track) -> Option<SendStats> {
        self.tracks.get(&track).map(|t| SendStats {
            frames_queued: (t.queue.len() + usize::from(t.current.is_some())) as u64,
            bytes_queued: t.queued_bytes as u64,
            ..t.stats.clone()
        })
    }

    /// Whether video frames are being dropped until a key frame, here or on the path
    /// ([`handle_path_drops`](Self::handle_path_drops)): ask the encoder for one.
    pub fn needs_key_frame(&self, track: Track) -> bool {
        self.tracks
            .get(&track)
            .is_some_and(|t| t.waiting_for_key || t.key_requested)
    }

    fn burst_bytes(&self) -> f64 {
        (self.pace_bps() as f64 / 8.0 * self.config.burst.as_secs_f64()).max(crate::MAX_PACKET as f64)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.pace_bps() as f64 / 8.0).min(self.burst_bytes());
        self.last_refill = self.last_refill.max(now);
    }
}

impl SendTrack {
    fn push(&mut self, frame: Frame) {
        self.queued_bytes += frame.data.len();
        self.queue.push_back(frame);
    }

    fn drop_front(&mut self) {
        if let Some(frame) = self.queue.pop_front() {
            self.queued_bytes -= frame.data.len();
            self.stats.frames_dropped += 1;
        }
    }

    /// Drops queued (unstarted) frames before the newest queued key frame; without one, drops
    /// them all and waits for the next key frame.
    fn drop_until_key(&mut self) {
        match self.queue.iter().rposition(|f| f.key_frame) {
            Some(key) => (0..key).for_each(|_| self.drop_front()),
            None if !self.queue.is_empty() => {
                while !self.queue.is_empty() {
                    self.drop_front();
                }
                self.waiting_for_key = true;
            }
            None => {}
        }
    }

    fn next_packet(&mut self, track: Track, sealer: &mut PacketSealer) -> Result<Transmit, Error> {
        if self.current.is_none() {
            let frame = self.queue.pop_front().ok_or(Error::Malformed("empty send queue"))?;
            let count = fragment_count(frame.data.len())?;
            self.current = Some(Current {
                frame,
                id: self.next_frame_id,
                next: 0,
                count,
            });
            self.next_frame_id = self.next_frame_id.wrapping_add(1);
        }
        let Some(c) = self.current.as_mut() else {
            return Err(Error::Malformed("no current frame"));
        };
        let header = fragment_header(track, c.id, c.frame.timestamp, c.frame.key_frame, c.next, c.count);
        let range = fragment_range(c.frame.data.len(), c.next);
        let payload_len = range.len();
        let sequence = sealer.next_sequence(track).ok_or(Error::SequenceExhausted(track))?;
        let contents = sealer.seal(header, &c.frame.data[range])?;
        c.next += 1;
        self.queued_bytes -= payload_len;
        if c.next == c.count {
            self.current = None;
            self.stats.frames_sent += 1;
        }
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += contents.len() as u64;
        Ok(Transmit {
            track,
            flags: header.flags,
            sequence,
            contents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Role, derive_keys};
    use crate::packet::{Header, MAX_PACKET};

    const MS: Duration = Duration::from_millis(1);

    fn sender(rate_bps: u64) -> (Sender, Instant) {
        let t0 = crate::test_origin();
        let (sealer, _) = derive_keys(&[1; 32], Role::Caller);
        let config = SenderConfig {
            rate_bps,
            start_rate_bps: rate_bps,
            min_rate_bps: 10_000,
            ..SenderConfig::default()
        };
        (Sender::new(config, sealer, t0), t0)
    }

    fn drain(s: &mut Sender, now: Instant) -> Vec<Transmit> {
        std::iter::from_fn(|| s.poll_transmit(now)).collect()
    }

    fn frame_ids(packets: &[Transmit]) -> Vec<u32> {
        let mut ids: Vec<u32> = packets
            .iter()
            .map(|t| Header::decode(&t.contents).unwrap().0.frame_id)
            .collect();
        ids.dedup();
        ids
    }

    #[test]
    fn a_source_that_waits_for_room_loses_nothing_and_is_paced() {
        let (mut s, t0) = sender(1_000_000);
        let (mut offered, mut sent_bytes) = (0usize, 0usize);
        let mut now = t0;
        // 2 s of a source that would produce far more than 1 Mbit/s: 1316-byte key frames
        // queued only when there is room.
        for tick in 0..2000u32 {
            now = t0 + MS * tick;
            while offered < 2_000_000 && s.has_room(Track::VIDEO, 1316) {
                s.handle_frame(Track::VIDEO, Frame::key(tick, vec![7; 1316])).unwrap();
                offered += 1316;
            }
            sent_bytes += drain(&mut s, now).iter().map(|t| t.contents.len()).sum::<usize>();
        }
        let stats = s.stats(Track::VIDEO).unwrap();
        assert_eq!(stats.frames_dropped, 0, "{stats:?}");
        let rate = sent_bytes as f64 * 8.0 / (now - t0).as_secs_f64();
        assert!((800_000.0..1_100_000.0).contains(&rate), "paced at {rate:.0} bit/s");
        // The backlog stays within 20 ms at the rate (one frame is always let in).
        assert!(stats.bytes_queued <= 1_000_000 / 8 / 50 + 1316, "{stats:?}");
        for tick in 2000..4000u32 {
            drain(&mut s, t0 + MS * tick);
        }
        assert!(s.is_idle());
        assert!(s.has_room(Track::VIDEO, 4 << 20), "an empty track takes any frame");
    }

    #[test]
    fn congestion_slows_a_lossless_track_but_drops_nothing() {
        let (mut s, t0) = sender(1_000_000);
        s.set_lossless(Track::VIDEO);
        for i in 0..4 {
            s.handle_frame(Track::VIDEO, Frame::key(i, vec![1; 1434])).unwrap();
        }
        s.handle_budget(t0, 300_000);
        assert_eq!(s.rate_bps(), 300_000);
        let mut n = 0;
        for tick in 0..1000u32 {
            n += drain(&mut s, t0 + MS * tick).len();
        }
        let stats = s.stats(Track::VIDEO).unwrap();
        assert_eq!((stats.frames_dropped, stats.frames_sent, n), (0, 4, 12));
    }

    #[test]
    fn an_audio_stream_that_waits_for_room_is_paced_too() {
        // Audio is never held back once queued, so a file on the audio track must wait for
        // the pacer's budget before queuing.
        let (mut s, t0) = sender(64_000);
        let mut sent_bytes = 0usize;
        let mut now = t0;
        for tick in 0..2000u32 {
            now = t0 + MS * tick;
            // As the session's driver does: send what is due (which refills the budget), then
            // ask for room.
            sent_bytes += drain(&mut s, now).iter().map(|t| t.contents.len()).sum::<usize>();
            while s.has_room(Track::AUDIO, 400) {
                s.handle_frame(Track::AUDIO, Frame::new(tick, vec![1; 400])).unwrap();
                sent_bytes += drain(&mut s, now).iter().map(|t| t.contents.len()).sum::<usize>();
            }
            assert!(s.budget_at() > now || s.has_room(Track::AUDIO, 400));
        }
        let rate = sent_bytes as f64 * 8.0 / (now - t0).as_secs_f64();
        assert!((50_000.0..75_000.0).contains(&rate), "audio stream at {rate:.0} bit/s");
        assert_eq!(s.stats(Track::AUDIO).unwrap().frames_dropped, 0);
    }

    #[test]
    fn audio_is_never_delayed_by_video_under_a_low_rate() {
        let (mut s, t0) = sender(64_000);
        for i in 0..50 {
            s.handle_frame(Track::VIDEO, Frame::key(i * 33, vec![0; 20_000]))
                .unwrap();
        }
        let mut video_bytes = 0;
        for tick in 0..2000u32 {
            let now = t0 + MS * tick;
            if tick % 20 == 0 {
                s.handle_frame(Track::AUDIO, Frame::new(tick, vec![1; 80])).unwrap();
                let first = s.poll_transmit(now).expect("audio goes out at once");
                assert_eq!(first.track, Track::AUDIO, "tick {tick}");
            }
            for t in drain(&mut s, now) {
                assert_ne!(t.track, Track::AUDIO);
                assert!(t.contents.len() <= MAX_PACKET);
                video_bytes += t.contents.len();
            }
        }
        assert_eq!(s.stats(Track::AUDIO).unwrap().frames_sent, 100);
        // video got roughly what audio (100 × 114 bytes) left of 2 s at 64 kbit/s (16 kB)
        assert!((2_000..8_000).contains(&video_bytes), "{video_bytes}");
    }

    #[test]
    fn pacing_follows_the_rate() {
        let (mut s, t0) = sender(1_000_000);
        for i in 0..10 {
            s.handle_frame(Track::data(0).unwrap(), Frame::new(i, vec![0; 50_000]))
                .unwrap();
        }
        let mut bytes = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(1) {
            bytes += drain(&mut s, now).iter().map(|t| t.contents.len()).sum::<usize>();
            now = s.poll_timeout().unwrap().max(now + MS / 10);
        }
        assert!((125_000..=125_000 + 2_500 + MAX_PACKET).contains(&bytes), "{bytes}");
    }

    #[test]
    fn poll_timeout_is_none_when_idle() {
        let (mut s, t0) = sender(1_000_000);
        assert_eq!(s.poll_timeout(), None);
        s.handle_frame(Track::AUDIO, Frame::new(0, vec![])).unwrap();
        assert_eq!(s.poll_timeout(), Some(t0));
        assert_eq!(drain(&mut s, t0).len(), 1);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn a_lower_rate_drops_video_queued_too_long_to_the_newest_key_frame() {
        let (mut s, t0) = sender(1_000_000);
        s.handle_frame(Track::VIDEO, Frame::key(0, vec![0; 2000])).unwrap();
        let sent = drain(&mut s, t0); // the key frame goes out within the burst
        assert_eq!(frame_ids(&sent), [0]);
        for (i, key) in [false, false, true, false].into_iter().enumerate() {
            let ts = 33 * (i as u32 + 1);
            let f = if key {
                Frame::key(ts, vec![0; 3000])
            } else {
                Frame::new(ts, vec![0; 3000])
            };
            s.handle_frame(Track::VIDEO, f).unwrap();
        }
        // 12 kB queued is 96 ms at 1 Mbit/s (kept), 960 ms at 100 kbit/s (over 400 ms).
        s.handle_budget(t0, 500_000);
        assert_eq!(s.stats(Track::VIDEO).unwrap().frames_dropped, 0);
        s.handle_budget(t0, 100_000);
        assert_eq!(s.rate_bps(), 100_000);
        assert_eq!(s.stats(Track::VIDEO).unwrap().frames_dropped, 2);
        s.set_rate(t0, 1_000_000);
        let mut later = Vec::new();
        for ms in 1..500 {
            later.extend(drain(&mut s, t0 + MS * ms));
        }
        // frame ids are given when a frame starts: the key frame is id 1, its successor 2
        assert_eq!(frame_ids(&later), [1, 2]);
        assert!(
            Header::decode(&later[0].contents)
                .unwrap()
                .0
                .flags
                .has(Flags::KEY_FRAME)
        );
    }

    #[test]
    fn without_a_queued_key_frame_video_waits_for_the_next_one() {
        let (mut s, t0) = sender(1_000_000);
        s.handle_frame(Track::VIDEO, Frame::new(0, vec![0; 40_000])).unwrap();
        s.handle_frame(Track::VIDEO, Frame::new(33, vec![0; 1000])).unwrap();
        let _ = drain(&mut s, t0); // starts frame 0, which will be finished
        s.handle_budget(t0, 10_000);
        assert!(s.needs_key_frame(Track::VIDEO));
        s.set_rate(t0, 1_000_000);
        s.handle_frame(Track::VIDEO, Frame::new(66, vec![0; 1000])).unwrap();
        assert_eq!(s.stats(Track::VIDEO).unwrap().frames_dropped, 2);
        s.handle_frame(Track::VIDEO, Frame::key(99, vec![0; 1000])).unwrap();
        assert!(!s.needs_key_frame(Track::VIDEO));
        let mut packets = Vec::new();
        for ms in 0..10_000 {
            packets.extend(drain(&mut s, t0 + MS * ms));
        }
        assert_eq!(frame_ids(&packets), [0, 1]);
        assert_eq!(s.stats(Track::VIDEO).unwrap().frames_sent, 2);
    }

    #[test]
    fn deep_video_queues_drop_to_a_key_frame() {
        let (mut s, _) = sender(100_000);
        // 400 ms at 100 kbit/s is 5 kB: the third 3 kB frame overflows
        s.handle_frame(Track::VIDEO, Frame::new(0, vec![0; 3000])).unwrap();
        s.handle_frame(Track::VIDEO, Frame::new(1, vec![0; 3000])).unwrap();
        assert!(s.needs_key_frame(Track::VIDEO));
        assert_eq!(s.stats(Track::VIDEO).unwrap().frames_dropped, 2);
        assert_eq!(s.stats(Track::VIDEO).unwrap().bytes_queued, 0);
    }

    #[test]
    fn the_pace_is_the_controllers_target_and_set_rate_replaces_it() {
        let t0 = crate::test_origin();
        let (sealer, _) = derive_keys(&[1; 32], Role::Caller);
        let config = SenderConfig {
            rate_bps: 5_000_000,
            ..SenderConfig::default()
        };
        let mut s = Sender::new(config, sealer, t0);
        assert_eq!(s.rate_bps(), 300_000, "starts below the ceiling");
        s.set_rate(t0, 3_000_000);
        assert_eq!(s.rate_bps(), 3_000_000);
        assert_eq!(s.rate_state().reason, crate::RateReason::Set);
    }

    /// The sender, a 300 kbit/s bottleneck (FIFO of 20 kB, 20 ms), the real receiver and its
    /// feedback every 40 ms: a video source sized to the sender's video budget (30 frames/s)
    /// with 32 kbit/s of audio. The target settles under the cap, no audio is lost and video
    /// frames all arrive.
    #[test]
    fn feedback_from_the_receiver_brings_the_sender_under_a_bottleneck() {
        use crate::receiver::{Receiver, ReceiverConfig};
        let t0 = crate::test_origin();
        let (sealer, _) = derive_keys(&[1; 32], Role::Caller);
        let (_, opener) = derive_keys(&[1; 32], Role::Callee);
        let mut s = Sender::new(SenderConfig::default(), sealer, t0);
        let mut r = Receiver::new(ReceiverConfig::default(), opener, t0);
        let (capacity, limit) = (300_000.0, 20_000usize);
        let mut busy_until = t0;
        let mut in_flight: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        let mut feedback: VecDeque<(Instant, Feedback)> = VecDeque::new();
        let mut late_targets = Vec::new();
        let mut frames = 0u32;
        for tick in 0..10_000u32 {
            let now = t0 + MS * tick;
            if tick % 20 == 0 {
                s.handle_frame(Track::AUDIO, Frame::new(tick, vec![1; 80])).unwrap();
            }
            if tick % 33 == 0 {
                let bytes = (s.video_budget_bps(now) / 8 / 30) as usize;
                let data = vec![2; bytes];
                let f = if frames % 60 == 0 {
                    Frame::key(tick, data)
                } else {
                    Frame::new(tick, data)
                };
                frames += 1;
                s.handle_frame(Track::VIDEO, f).unwrap();
            }
            for t in drain(&mut s, now) {
                let backlog = busy_until.saturating_duration_since(now).as_secs_f64() * capacity / 8.0;
                if backlog as usize + t.contents.len() > limit {
                    continue; // tail drop
                }
                busy_until = busy_until.max(now) + Duration::from_secs_f64(t.contents.len() as f64 * 8.0 / capacity);
                in_flight.push_back((busy_until + 20 * MS, t.contents));
            }
            while in_flight.front().is_some_and(|(at, _)| *at <= now) {
                let (_, p) = in_flight.pop_front().unwrap();
                let _ = r.handle_packet(now, &p);
            }
            r.handle_timeout(now);
            while r.poll_frame().is_some() {}
            if let Some(f) = r.poll_feedback(now) {
                feedback.push_back((now + 20 * MS, f));
            }
            while feedback.front().is_some_and(|(at, _)| *at <= now) {
                let (_, f) = feedback.pop_front().unwrap();
                s.handle_feedback(now, &f);
            }
            s.handle_timeout(now);
            if tick >= 5_000 && tick % 100 == 0 {
                late_targets.push(s.rate_bps());
            }
        }
        let end = t0 + MS * 10_000;
        let (lo, hi) = (late_targets.iter().min().unwrap(), late_targets.iter().max().unwrap());
        assert!(*lo >= 150_000 && *hi <= 330_000, "targets after 5 s: {late_targets:?}");
        let audio = r.stats(Track::AUDIO, end).unwrap();
        assert!(audio.packets_lost <= 5, "audio lost: {audio:?}");
        let video_sent = s.stats(Track::VIDEO).unwrap().frames_sent;
        let video = r.stats(Track::VIDEO, end).unwrap();
        assert!(
            video.frames_complete - video.frames_late >= video_sent * 9 / 10,
            "video: {video:?}, sent {video_sent}"
        );
    }

    #[test]
    fn limits_are_errors_not_panics() {
        let (mut s, _) = sender(1_000_000);
        let huge = Frame::new(0, vec![0; MAX_FRAME + 1]);
        assert!(matches!(
            s.handle_frame(Track::VIDEO, huge),
            Err(Error::FrameTooLarge { .. })
        ));
        let data = Track::data(3).unwrap();
        s.handle_frame(data, Frame::new(0, vec![0; MAX_FRAME])).unwrap();
        s.handle_frame(data, Frame::new(0, vec![0; MAX_FRAME / 2])).unwrap();
        assert_eq!(
            s.handle_frame(data, Frame::new(0, vec![0; 1])),
            Err(Error::QueueFull(data))
        );
    }

    #[test]
    fn an_exhausted_track_stops_instead_of_reusing_nonces() {
        let (mut s, t0) = sender(1_000_000);
        s.sealer.set_next_sequence(Track::AUDIO, u32::MAX);
        s.handle_frame(Track::AUDIO, Frame::new(0, vec![0; 1000])).unwrap();
        assert_eq!(drain(&mut s, t0).len(), 1);
        assert_eq!(
            s.handle_frame(Track::AUDIO, Frame::new(0, vec![])),
            Err(Error::SequenceExhausted(Track::AUDIO))
        );
    }
}
