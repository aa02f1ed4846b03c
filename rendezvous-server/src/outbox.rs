//! The relay engine's per-client buffer (the seed's "one Buffer object per client").
//!
//! Every connection has one [`Outbox`]. Everything the server sends to that client goes through
//! it: the server's own messages (replies, pings, call signalling) and relay frames from the
//! other members of its calls. Senders only push (never block); the connection's writer task
//! pulls batches.
//!
//! Flow control, per the seed:
//! - every relay frame written to the client increments its `idle_count`;
//! - the client sends a health check ([`natcall_proto::control::ClientMsg::RelayAck`]) after
//!   every `ack_every` relay frames it has read; the server then subtracts that many;
//! - while `idle_count` is at its limit the client is **busy**: relay frames wait here, where
//!   the class policy can see them, instead of in kernel buffers;
//! - the limit adapts: the acks measure the rate the client actually drains, and the limit is
//!   that rate × `target_delay` (between `ack_every` and `idle_limit`), so what is written
//!   but unread never holds more than about `target_delay` of traffic — on a slow link audio
//!   does not wait behind seconds of video, on a fast one throughput is not capped;
//! - when it frees up, waiting frames go first, at most `burst` per write, control first, then
//!   audio, then video; video never takes the last quarter of the window, which stays free for
//!   audio and control.
//!
//! Emptying the buffer by class when it passes its bounds (frames, bytes, age):
//! - **control** (QUIC packets, the server's own messages) is never dropped;
//! - **audio** older than `audio_deadline` is dropped oldest-first (always: late audio is
//!   useless), and oldest-first again if the buffer is still over its bounds;
//! - **video** is dropped as whole frames, from the oldest frame up to the next key frame; with no
//!   key frame waiting, all waiting video goes and later video is dropped until a key frame
//!   starts. A frame whose first packet was already written is never cut: its remaining packets
//!   stay.
//!
//! A client that makes no progress (busy with frames waiting, or a write blocked) for
//! `overload_timeout` is **stalled**: the connection is closed with a reason.
//!
//! The connection's [`writer`] task is the one consumer: it takes batches and writes them.
//!
//! While the client is the bottleneck, [`budget`] turns the rate it drains into a budget for
//! each call that relays to it, which [`Outbox::push_relay`] hands back to the sender's side.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use natcall_proto::relay::{ROOM_ID_BIT, RelayFlags, RelayHeader, TrafficClass};
use tokio::sync::Notify;
use tracing::debug;

use crate::config::RelayConfig;
use crate::metrics::{DropReason, Metrics};

pub(crate) mod budget;
pub(crate) mod writer;

use budget::Budget;
pub use budget::Grant;

/// Control frames may hold up to this many times `max_bytes` before the client is disconnected.
const CONTROL_CAP_FACTOR: usize = 4;
/// The drain rate is sampled over at least this long…
const DRAIN_SAMPLE: Duration = Duration::from_millis(50);
/// …and a sample spanning more than this (the client was not sent anything) is dropped.
const DRAIN_IDLE: Duration = Duration::from_millis(500);
/// The least round trip is forgotten after this long (the path may have changed).
const RTT_MIN_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Item {
    wire: Bytes,
    at: Instant,
    flags: RelayFlags,
    call: u32,
    /// The sender's connection: video frames are whole per sender (a room's senders share
    /// one id, and their frames interleave here).
    from: u64,
}

#[derive(Debug)]
struct State {
    server: VecDeque<Bytes>,
    control: VecDeque<Item>,
    audio: VecDeque<Item>,
    video: VecDeque<Item>,
    /// Bytes of relay frames waiting.
    relay_bytes: usize,
    /// Bytes of control-class relay frames waiting (never dropped; capped by disconnecting).
    control_bytes: usize,
    /// Relay frames written and not yet acknowledged.
    idle_count: u32,
    /// The current limit on `idle_count`.
    window: u32,
    /// Frames per second the client drains (from its acks), smoothed.
    drain_rate: f64,
    /// Bytes per second the client drains (from its acks), smoothed.
    drain_bytes_rate: f64,
    /// Frames acknowledged since `drain_since`, for the next drain sample.
    drain_frames: u32,
    /// Bytes of the frames acknowledged since `drain_since`.
    drain_bytes: u64,
    drain_since: Option<Instant>,
    /// Relay frames written and not yet acknowledged: their sizes and when they were written
    /// (at most `idle_limit`).
    unacked: VecDeque<(u32, Instant)>,
    /// Bytes of the `unacked` frames.
    unacked_bytes: u64,
    /// Smoothed round trip from writing a frame to its acknowledgement.
    rtt: Option<Duration>,
    /// The least round trip seen lately, and when: the path without the queue that builds on
    /// it (the smoothed round trip grows with that queue).
    rtt_min: Option<(Duration, Instant)>,
    /// Senders whose video is being dropped until their next key frame starts.
    video_skip: Vec<u64>,
    /// Senders of which the writer has sent the start of a video frame but not its end.
    video_mid_frame: Vec<u64>,
    /// Since when the client has made no progress while frames wait.
    stalled_since: Option<Instant>,
    /// A close was asked for: `Some(reset)`.
    close: Option<bool>,
    /// The drain measurement behind the senders' budgets.
    budget: Budget,
    /// Relay frames dropped for this client (from its buffer, or on arrival while its video
    /// from a sender waits for a key frame), audio and video; all its calls and rooms.
    dropped: [u64; 2],
}

impl State {
    fn relay_len(&self) -> usize {
        self.control.len() + self.audio.len() + self.video.len()
    }

    fn oldest_droppable(&self) -> Option<Instant> {
        match (self.audio.front(), self.video.front()) {
            (Some(a), Some(v)) => Some(a.at.min(v.at)),
            (Some(a), None) => Some(a.at),
            (None, Some(v)) => Some(v.at),
            (None, None) => None,
        }
    }
}

/// What [`Outbox::take`] hands the writer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// Frames were appended to the batch: write them.
    Frames,
    /// Nothing to write now: wait for [`Outbox::wait`].
    Idle,
    /// Everything queued is written: close (`true`: with a reset).
    Close(bool),
}

/// One client's outbound buffer.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    config: RelayConfig,
    metrics: Metrics,
    server_queue_max: usize,
    overflowed: AtomicBool,
}

impl Outbox {
    /// An empty outbox.
    pub(crate) fn new(config: RelayConfig, metrics: Metrics, server_queue_max: usize) -> Self {
        // Start small; the first acknowledgements measure the client and open the window.
        let state = State {
            server: VecDeque::new(),
            control: VecDeque::new(),
            audio: VecDeque::new(),
            video: VecDeque::new(),
            relay_bytes: 0,
            control_bytes: 0,
            idle_count: 0,
            window: (2 * config.ack_every).min(config.idle_limit),
            drain_rate: 0.0,
            drain_bytes_rate: 0.0,
            drain_frames: 0,
            drain_bytes: 0,
            drain_since: None,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            rtt: None,
            rtt_min: None,
            video_skip: Vec::new(),
            video_mid_frame: Vec::new(),
            stalled_since: None,
            close: None,
            budget: Budget::new(config.budget_interval()),
            dropped: [0; 2],
        };
        Self {
            state: Mutex::new(state),
            notify: Notify::new(),
            config,
            metrics,
            server_queue_max,
            overflowed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update leaves the queues consistent before anything can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one of the server's own frames (never dropped). Returns `false` when the client
    /// has let `server_queue_max` of them pile up: it is not reading and should be shed.
    pub fn push_server(&self, frame: Bytes) -> bool {
        let mut s = self.lock();
        if s.close.is_some() {
            return true; // closing: late messages are moot
        }
        if s.server.len() >= self.server_queue_max {
            self.overflowed.store(true, Ordering::Relaxed);
            return false;
        }
        s.server.push_back(frame);
        drop(s);
        self.notify.notify_one();
        true
    }

    /// Whether the client let the server's messages or control-class relay frames pile up
    /// past their caps: it cannot keep up and must be disconnected.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// Asks the writer to flush what is queued and then close.
    pub fn close(&self, reset: bool) {
        let mut s = self.lock();
        if s.close.is_none() {
            s.close = Some(reset);
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Queues a relay frame (`wire` is the whole frame as received) and empties the buffer by
    /// class if it is over its bounds. Returns the budget waiting for this call's sender, if
    /// the client is the bottleneck (see [`budget`]).
    /// `from`: the sender's connection (each sender's video is dropped and resumed on its own).
    pub fn push_relay(&self, from: u64, wire: Bytes, header: &RelayHeader, now: Instant) -> Option<Grant> {
        let class = header.class;
        let mut s = self.lock();
        if s.close.is_some() {
            return None;
        }
        let len = wire.len();
        // Busy: the window is full. For a room's fan-out also when video waits because what is
        // in flight is all the video the client drains in time: a fan-out sender hears nothing
        // else from its receivers (a 1:1 sender's own controller sees that queue in the
        // receiver's feedback, and a budget on top of it starves the call beside a download).
        let video_held =
            header.call & ROOM_ID_BIT != 0 && !s.video.is_empty() && s.unacked_bytes >= self.video_bytes_room(&s);
        let busy = s.idle_count >= s.window || video_held;
        s.budget.on_pushed(now, header.call, len, busy);
        let pending = s
            .unacked
            .get((self.config.ack_every as usize).saturating_sub(1))
            .map(|&(_, at)| at);
        let rtt = s.rtt;
        s.budget.tick(now, pending, rtt);
        let grant = s.budget.take(header.call);
        if class == TrafficClass::Video && s.video_skip.contains(&from) {
            if header.flags.has(RelayFlags::KEY_FRAME | RelayFlags::FRAME_START) {
                s.video_skip.retain(|f| *f != from);
            } else {
                s.dropped[1] += 1;
                self.metrics.dropped(class, DropReason::AwaitingKeyFrame, 1, wire.len());
                s.budget.on_dropped(header.call);
                return grant;
            }
        }
        if class == TrafficClass::Control && s.control_bytes + len > self.config.max_bytes * CONTROL_CAP_FACTOR {
            // Control is never dropped, so a client that cannot even take it is overloaded:
            // the connection is closed (the writer sees the flag), memory stays bounded.
            self.overflowed.store(true, Ordering::Relaxed);
            drop(s);
            self.notify.notify_one();
            return grant;
        }
        let item = Item {
            wire,
            at: now,
            flags: header.flags,
            call: header.call,
            from,
        };
        match class {
            TrafficClass::Control => {
                s.control_bytes += len;
                s.control.push_back(item);
            }
            TrafficClass::Audio => s.audio.push_back(item),
            TrafficClass::Video => s.video.push_back(item),
        }
        s.relay_bytes += len;
        self.metrics.queued(1);
        self.enforce(&mut s, now);
        if s.idle_count >= s.window && s.stalled_since.is_none() {
            s.stalled_since = Some(now);
        }
        drop(s);
        self.notify.notify_one();
        grant
    }

    /// The bytes of video that may be in flight: a least round trip of what the client drains
    /// (the path without a queue: in flight whatever the link), plus three quarters of
    /// `target_delay` of it (the queue video may build); unbounded until measured. More in
    /// flight than what is drained per round trip lets the drain rate grow to the link's.
    fn video_bytes_room(&self, s: &State) -> u64 {
        if s.drain_bytes_rate > 0.0 {
            let rtt = s.rtt_min.map(|(r, _)| r).unwrap_or_default().as_secs_f64();
            let queue = self.config.target_delay().as_secs_f64() * 0.75;
            (s.drain_bytes_rate * (rtt + queue)) as u64
        } else {
            u64::MAX
        }
    }

    fn over_bounds(&self, s: &State, now: Instant) -> bool {
        let c = &self.config;
        s.relay_len() > c.max_frames
            || s.relay_bytes > c.max_bytes
            || s.oldest_droppable()
                .is_some_and(|t| now.duration_since(t) > c.max_age())
    }

    /// Drops what the class policy says must go.
    fn enforce(&self, s: &mut State, now: Instant) {
        self.drop_late_audio(s, now);
        while self.over_bounds(s, now) {
            let c = &self.config;
            let size_over = s.relay_len() > c.max_frames || s.relay_bytes > c.max_bytes;
            // Over its size, any sender's video may go; over its age only, only the video of
            // senders whose own oldest waiting packet is too old (a slow frame of one sender
            // does not black out the others).
            let cutoff = if size_over { None } else { now.checked_sub(c.max_age()) };
            if self.drop_video_frames(s, cutoff, false) {
                continue;
            }
            // What waits is the rest of frames already started. Over the size bounds they are
            // cut (a sender that never ends its frame cannot grow the buffer); audio goes only
            // then, or when audio itself is too old — never because a started frame is old.
            if size_over && self.drop_video_frames(s, None, true) {
                continue;
            }
            let audio_over = size_over || s.audio.front().is_some_and(|a| now.duration_since(a.at) > c.max_age());
            if !audio_over {
                break;
            }
            let Some(a) = s.audio.pop_front() else { break };
            self.forget(s, &a, TrafficClass::Audio, DropReason::Overload);
        }
    }

    fn forget(&self, s: &mut State, item: &Item, class: TrafficClass, reason: DropReason) {
        match class {
            TrafficClass::Audio => s.dropped[0] += 1,
            TrafficClass::Video => s.dropped[1] += 1,
            TrafficClass::Control => {}
        }
        s.relay_bytes -= item.wire.len();
        s.budget.on_dropped(item.call);
        self.metrics.dequeued(1);
        self.metrics.dropped(class, reason, 1, item.wire.len());
    }

    fn drop_late_audio(&self, s: &mut State, now: Instant) {
        let deadline = self.config.audio_deadline();
        while let Some(a) = s.audio.front() {
            if now.duration_since(a.at) <= deadline {
                break;
            }
            if let Some(a) = s.audio.pop_front() {
                self.forget(s, &a, TrafficClass::Audio, DropReason::AudioDeadline);
            }
        }
    }

    /// Drops whole video frames of the sender with the most video waiting (the oldest's on a
    /// tie), from its oldest up to its next key frame; other senders' frames stay. A sender
    /// whose waiting video is all of a frame the client is already receiving is passed over
    /// for the next one. Returns whether anything was dropped.
    /// `older_than`: only senders whose oldest waiting packet came before it. `cut`: frames
    /// already started go too (all of the sender's waiting video).
    fn drop_video_frames(&self, s: &mut State, older_than: Option<Instant>, cut: bool) -> bool {
        // (sender, packets waiting, whether its oldest is old enough), in order of each
        // sender's oldest packet.
        let mut counts: Vec<(u64, usize, bool)> = Vec::new();
        for i in &s.video {
            match counts.iter_mut().find(|(f, _, _)| *f == i.from) {
                Some((_, n, _)) => *n += 1,
                None => counts.push((i.from, 1, older_than.is_none_or(|t| i.at < t))),
            }
        }
        let mut counts: Vec<(u64, usize)> = counts.into_iter().filter(|c| c.2).map(|(f, n, _)| (f, n)).collect();
        // `counts` is in order of each sender's oldest packet: a stable sort by count, most
        // first, keeps the oldest first among equals.
        counts.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        counts.iter().any(|&(from, _)| self.drop_video_frames_of(s, from, cut))
    }

    /// Drops `from`'s waiting video from its oldest frame not yet started up to its next key
    /// frame (with `cut`, from its oldest packet, a frame already started included); returns
    /// whether anything was dropped.
    fn drop_video_frames_of(&self, s: &mut State, from: u64, cut: bool) -> bool {
        // This sender's packets, by position in the queue.
        let mine: Vec<usize> = s
            .video
            .iter()
            .enumerate()
            .filter(|(_, i)| i.from == from)
            .map(|(n, _)| n)
            .collect();
        // Packets of a frame the client is already receiving must all go out (unless cut).
        let mut start = 0;
        if s.video_mid_frame.contains(&from) {
            match mine.iter().position(|&n| s.video[n].flags.has(RelayFlags::FRAME_END)) {
                _ if cut => s.video_mid_frame.retain(|f| *f != from),
                Some(end) => start = end + 1,
                None => return false,
            }
        }
        if start >= mine.len() {
            return false;
        }
        // The next key frame after its oldest waiting frame, if any, survives with what follows.
        let next_key = (start + 1..mine.len()).find(|&k| {
            s.video[mine[k]]
                .flags
                .has(RelayFlags::KEY_FRAME | RelayFlags::FRAME_START)
        });
        let end = next_key.unwrap_or(mine.len());
        let gone: Vec<usize> = mine[start..end].to_vec();
        let mut dropped = Vec::with_capacity(gone.len());
        // From the back, so the positions before stay valid.
        for &n in gone.iter().rev() {
            if let Some(item) = s.video.remove(n) {
                dropped.push(item);
            }
        }
        for item in &dropped {
            self.forget(s, item, TrafficClass::Video, DropReason::Overload);
        }
        if next_key.is_none() && !s.video_skip.contains(&from) {
            // The next video of this sender that can be shown starts at a key frame.
            s.video_skip.push(from);
        }
        !dropped.is_empty()
    }

    /// The client read `frames` more relay frames.
    pub fn ack(&self, frames: u32, now: Instant) {
        let mut s = self.lock();
        s.idle_count = s.idle_count.saturating_sub(frames);
        s.stalled_since = None;
        let (mut bytes, mut written) = (0u64, None);
        for _ in 0..frames {
            let Some((len, at)) = s.unacked.pop_front() else { break };
            bytes += u64::from(len);
            written = Some(at);
        }
        s.unacked_bytes = s.unacked_bytes.saturating_sub(bytes);
        let rtt = s.rtt;
        if let Some(stall) = s.budget.on_acked(now, bytes, written, rtt) {
            debug!(
                stall_ms = stall.as_millis() as u64,
                "relay client stalled (its TCP connection retransmitting?); not counted as its drain rate"
            );
        }
        if let Some(at) = written {
            // The round trip of the frame that completed this acknowledgement.
            let sample = now.saturating_duration_since(at);
            s.rtt = Some(s.rtt.map_or(sample, |r| (r * 7 + sample) / 8));
            if s.rtt_min
                .is_none_or(|(min, since)| sample <= min || now.duration_since(since) > RTT_MIN_WINDOW)
            {
                s.rtt_min = Some((sample, now));
            }
        }
        // The drain rate from what was acknowledged over at least `DRAIN_SAMPLE`: a client
        // reads in bursts (TCP hands over what arrived together), and one burst's
        // acknowledgements back to back are no rate.
        let since = *s.drain_since.get_or_insert(now);
        s.drain_frames += frames;
        s.drain_bytes += bytes;
        let elapsed = now.saturating_duration_since(since);
        if elapsed > DRAIN_IDLE {
            // A quiet spell measures nothing: start over.
            s.drain_since = Some(now);
            s.drain_frames = 0;
            s.drain_bytes = 0;
        } else if elapsed >= DRAIN_SAMPLE {
            let smooth = |old: f64, new: f64| if old == 0.0 { new } else { 0.7 * old + 0.3 * new };
            let secs = elapsed.as_secs_f64();
            s.drain_rate = smooth(s.drain_rate, f64::from(s.drain_frames) / secs);
            s.drain_bytes_rate = smooth(s.drain_bytes_rate, s.drain_bytes as f64 / secs);
            s.drain_since = Some(now);
            s.drain_frames = 0;
            s.drain_bytes = 0;
            let c = &self.config;
            // A round trip's worth of what it drains is in flight however the link is; on top
            // of that, `target_delay` of it may wait in the network. (A window of only
            // `target_delay` would, with a longer round trip, hold the client below what it
            // can take, and shrink at each acknowledgement until it was at its floor.)
            let span = s.rtt.unwrap_or_default() + c.target_delay();
            let target = (s.drain_rate * span.as_secs_f64()) as u32;
            // At least `ack_every`, or the client would never have enough to acknowledge.
            s.window = target.clamp(c.ack_every, c.idle_limit);
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Moves the next batch into `out` (whole frames, at most `burst` relay frames while the
    /// client is not busy, all waiting server frames).
    pub(crate) fn take(&self, now: Instant, out: &mut Vec<Bytes>) -> Take {
        let mut s = self.lock();
        let before = out.len();
        while let Some(f) = s.server.pop_front() {
            out.push(f);
        }
        self.drop_late_audio(&mut s, now);
        let room = s.window.saturating_sub(s.idle_count).min(self.config.burst);
        // Video never fills the last quarter of the window: it stays free for audio and control,
        // which then wait for the link, not for an acknowledgement behind video. The window
        // counts frames, and video packets are several times the size of audio ones: video is
        // also held to three quarters of what the client drains in bytes over the same span,
        // so the bytes in flight ahead of an audio frame stay about `target_delay` of the link.
        let video_room = (s.window - s.window / 4).saturating_sub(s.idle_count);
        let video_bytes_room = self.video_bytes_room(&s);
        let mut taken = 0;
        let mut video_taken = 0;
        while taken < room {
            let (item, class) = if let Some(i) = s.control.pop_front() {
                s.control_bytes -= i.wire.len();
                (i, TrafficClass::Control)
            } else if let Some(i) = s.audio.pop_front() {
                (i, TrafficClass::Audio)
            } else if video_taken >= video_room
                || s.video.front().is_some_and(|i| {
                    // A frame already started goes on (it is committed); one packet always goes
                    // when nothing is in flight.
                    // Rooms only: a 1:1 sender's own controller reads the queue from its
                    // receiver's feedback, and video held here would hide it (its target then
                    // ran over a slow link's cap).
                    let room = i.call & ROOM_ID_BIT != 0;
                    let started = !i.flags.has(RelayFlags::FRAME_START) && s.video_mid_frame.contains(&i.from);
                    // Never held while fewer frames are in flight than one acknowledgement
                    // needs (the client could not acknowledge, and the rate not be measured).
                    room && !started
                        && s.idle_count + taken >= self.config.ack_every
                        && s.unacked_bytes + i.wire.len() as u64 > video_bytes_room
                })
            {
                break;
            } else if let Some(i) = s.video.pop_front() {
                video_taken += 1;
                if i.flags.has(RelayFlags::FRAME_START) && !s.video_mid_frame.contains(&i.from) {
                    s.video_mid_frame.push(i.from);
                }
                if i.flags.has(RelayFlags::FRAME_END) {
                    s.video_mid_frame.retain(|f| *f != i.from);
                }
                (i, TrafficClass::Video)
            } else {
                break;
            };
            s.relay_bytes -= item.wire.len();
            self.metrics.relayed(class, item.wire.len());
            s.unacked
                .push_back((u32::try_from(item.wire.len()).unwrap_or(u32::MAX), now));
            s.unacked_bytes += item.wire.len() as u64;
            out.push(item.wire);
            taken += 1;
        }
        self.metrics.dequeued(taken as usize);
        s.idle_count += taken;
        if s.idle_count < s.window || s.relay_len() == 0 {
            s.stalled_since = None;
        } else if s.stalled_since.is_none() {
            s.stalled_since = Some(now);
        }
        if out.len() > before {
            Take::Frames
        } else if let Some(reset) = s.close {
            Take::Close(reset)
        } else {
            Take::Idle
        }
    }

    /// How long the client has made no progress while relay frames wait for it.
    pub fn stalled_for(&self, now: Instant) -> Option<Duration> {
        self.lock().stalled_since.map(|t| now.duration_since(t))
    }

    /// Waits until something may have changed.
    pub(crate) async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Relay frames dropped from this client's buffer so far: (audio, video).
    pub fn dropped_frames(&self) -> (u64, u64) {
        let s = self.lock();
        (s.dropped[0], s.dropped[1])
    }

    /// Relay frames waiting, for tests and metrics.
    pub fn waiting(&self) -> usize {
        self.lock().relay_len()
    }

    /// Current `idle_count`.
    pub fn idle_count(&self) -> u32 {
        self.lock().idle_count
    }

    /// Current limit on `idle_count`.
    pub fn window(&self) -> u32 {
        self.lock().window
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        self.metrics.dequeued(s.relay_len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALL: u32 = 7;

    fn config() -> RelayConfig {
        RelayConfig {
            idle_limit: 4,
            ack_every: 2,
            burst: 4,
            max_frames: 10,
            ..RelayConfig::default()
        }
    }

    #[test]
    fn the_window_follows_the_rate_the_client_drains() {
        let c = RelayConfig {
            idle_limit: 64,
            ack_every: 4,
            target_delay_ms: 100,
            ..RelayConfig::default()
        };
        let o = Outbox::new(c, Metrics::new(), 16);
        let t0 = Instant::now();
        assert_eq!(o.window(), 8, "small until measured");
        // A slow client: 4 frames every 50 ms = 80 frames/s → 8 frames per 100 ms.
        for i in 0..30 {
            o.ack(4, t0 + Duration::from_millis(50 * i));
        }
        assert_eq!(o.window(), 8);
        // Slower still: the floor is one acknowledgement's worth.
        let t2 = t0 + Duration::from_secs(5);
        for i in 0..30 {
            o.ack(4, t2 + Duration::from_millis(400 * i));
        }
        assert_eq!(o.window(), 4);
        // A fast one: 4 frames every 5 ms = 800 frames/s → 80, capped at 64.
        let t1 = t2 + Duration::from_secs(13);
        for i in 0..60 {
            o.ack(4, t1 + Duration::from_millis(5 * i));
        }
        assert_eq!(o.window(), 64);
        // Acknowledgements that come in a burst (TCP hands over what arrived together) are
        // not a rate: 16 at once after 50 ms of nothing is 64 frames in 50 ms, not 64 in 0.
        let t3 = t1 + Duration::from_secs(2);
        for i in 0..20u64 {
            for _ in 0..4 {
                o.ack(1, t3 + Duration::from_millis(50 * i));
            }
        }
        assert!(o.window() <= 12, "{}", o.window());
    }

    #[test]
    fn a_long_round_trip_keeps_a_round_trip_of_frames_in_flight() {
        // A client that drains 100 frames/s over a path with a 150 ms round trip (a queue of
        // other traffic before it): one round trip's worth plus 80 ms stays in flight, so the
        // window does not shrink to its floor and hold the client below its rate.
        let c = RelayConfig {
            idle_limit: 64,
            ack_every: 4,
            target_delay_ms: 80,
            burst: 64,
            max_frames: 1000,
            ..RelayConfig::default()
        };
        let o = Outbox::new(c, Metrics::new(), 16);
        let t0 = Instant::now();
        let mut batch = Vec::new();
        for i in 0..400u32 {
            let now = t0 + Duration::from_millis(10 * u64::from(i));
            o.push_relay(1, wire(1), &header(TrafficClass::Control, START | END), now);
            o.take(now, &mut batch);
            // Every 40 ms the client acknowledges the 4 frames it read, written 150 ms ago.
            if i % 4 == 3 && i >= 18 {
                o.ack(4, now);
            }
        }
        let w = o.window();
        assert!((18..=26).contains(&w), "window {w}, rtt {:?}", o.lock().rtt);
        assert!(o.lock().rtt.is_some_and(|r| r >= Duration::from_millis(100)));
    }

    fn outbox() -> Outbox {
        Outbox::new(config(), Metrics::new(), 16)
    }

    #[test]
    fn a_frame_that_never_ends_is_cut_at_the_size_bound_and_the_buffer_stays_bounded() {
        let o = outbox();
        let t0 = Instant::now();
        // A sender starts a frame (its first packet is written) and then never ends it.
        o.push_relay(1, wire(1), &header(TrafficClass::Video, START), t0);
        let mut batch = Vec::new();
        assert_eq!(o.take(t0, &mut batch), Take::Frames);
        for _ in 0..1000 {
            o.push_relay(1, wire(1), &header(TrafficClass::Video, 0), t0);
        }
        assert!(o.lock().relay_len() <= config().max_frames, "{}", o.lock().relay_len());
        // Its next video waits for a key frame; audio still goes.
        o.push_relay(2, wire(7), &header(TrafficClass::Audio, START | END), t0);
        o.ack(1, t0);
        assert!(drain(&o, t0).contains(&7));
    }

    #[test]
    fn one_senders_old_started_frame_does_not_drop_anothers_fresh_video() {
        let c = RelayConfig {
            max_frames: 100,
            ..config()
        };
        let o = Outbox::new(c, Metrics::new(), 16);
        let t0 = Instant::now();
        // Sender 1's frame started and its rest waits (the window is full of it).
        o.push_relay(1, wire(1), &header(TrafficClass::Video, START | KEY), t0);
        for _ in 0..3 {
            o.push_relay(1, wire(1), &header(TrafficClass::Video, KEY), t0);
        }
        let mut batch = Vec::new();
        o.take(t0, &mut batch);
        o.push_relay(1, wire(1), &header(TrafficClass::Video, KEY), t0);
        // Half a second later (past max_age for sender 1's waiting packet), sender 2's fresh
        // frames are kept: only the old sender's video is over the age bound.
        let later = t0 + Duration::from_millis(500);
        video_frame_from(&o, 2, 2, 2, true, later);
        video_frame_from(&o, 2, 2, 2, false, later);
        assert_eq!(o.dropped_frames(), (0, 0));
    }

    #[test]
    fn a_rooms_video_in_flight_is_held_to_the_bytes_the_client_drains_and_audio_passes_it() {
        // A client draining 10 kB/s over a 20 ms round trip, target delay 80 ms: about
        // 0.75 × 10 kB/s × 100 ms = 750 bytes of video may be in flight. Video packets are 100
        // bytes here; audio ones 20.
        let c = RelayConfig {
            idle_limit: 64,
            ack_every: 1,
            target_delay_ms: 80,
            burst: 64,
            max_frames: 1000,
            max_bytes: 1 << 20,
            max_age_ms: 10_000,
            audio_deadline_ms: 10_000,
            ..RelayConfig::default()
        };
        let o = Outbox::new(c, Metrics::new(), 16);
        let t0 = Instant::now();
        let mut batch = Vec::new();
        // Measure the client: 20-byte control frames, one every 2 ms (10 kB/s, 500 frames/s:
        // a window of 50 frames), each acknowledged 20 ms after it was written.
        for i in 0..500u64 {
            let now = t0 + Duration::from_millis(2 * i);
            o.push_relay(
                1,
                Bytes::from(vec![1u8; 20]),
                &header(TrafficClass::Control, START | END),
                now,
            );
            o.take(now, &mut batch);
            if i >= 10 {
                o.ack(1, now);
            }
        }
        let now = t0 + Duration::from_millis(1000);
        o.ack(10, now);
        assert!(
            o.window() >= 40,
            "the window in frames is not what holds video: {}",
            o.window()
        );
        batch.clear();
        // Twenty one-packet video frames wait; the window in frames would let many more out.
        // A room's video (1:1 video is not held this way: its sender reads the queue itself).
        let room = RelayHeader {
            call: ROOM_ID_BIT | CALL,
            class: TrafficClass::Video,
            flags: RelayFlags(START | END),
        };
        for _ in 0..20 {
            o.push_relay(1, wire(9), &room, now);
        }
        assert_eq!(o.take(now, &mut batch), Take::Frames);
        let video = batch.len();
        assert!((6..=9).contains(&video), "{video} video packets of 100 bytes in flight");
        // Audio is not held behind the video that waits.
        o.push_relay(
            2,
            Bytes::from(vec![5u8; 20]),
            &header(TrafficClass::Audio, START | END),
            now,
        );
        batch.clear();
        assert_eq!(o.take(now, &mut batch), Take::Frames);
        assert_eq!(batch.iter().map(|b| b[0]).collect::<Vec<_>>(), [5]);
        // As the client acknowledges, video goes on.
        o.ack(4, now + Duration::from_millis(40));
        batch.clear();
        o.take(now + Duration::from_millis(40), &mut batch);
        assert!(!batch.is_empty() && batch.iter().all(|b| b[0] == 9));
    }

    #[test]
    fn old_packets_of_a_started_frame_do_not_make_audio_go() {
        let o = outbox();
        let t0 = Instant::now();
        // The client starts receiving a frame of 3 packets: the first is written, the rest wait
        // (the window is full).
        o.push_relay(1, wire(1), &header(TrafficClass::Video, START | KEY), t0);
        o.push_relay(1, wire(2), &header(TrafficClass::Video, KEY), t0);
        let mut batch = Vec::new();
        o.take(t0, &mut batch);
        let written = batch.len() as u32;
        assert_eq!(written, 2);
        o.push_relay(1, wire(3), &header(TrafficClass::Video, END), t0);
        // Long after (the rest of that frame is older than max_age), audio comes: it stays.
        let later = t0 + Duration::from_secs(1);
        o.push_relay(2, wire(7), &header(TrafficClass::Audio, START | END), later);
        assert_eq!(o.dropped_frames().0, 0, "no audio dropped");
        o.ack(written, later);
        assert!(drain(&o, later).contains(&7));
    }

    #[test]
    fn a_sender_mid_frame_is_passed_over_for_another_whose_video_can_go() {
        let o = outbox();
        let t0 = Instant::now();
        // Sender 1's frame has started: its first packet is written, the rest (no end yet)
        // wait.
        o.push_relay(1, wire(1), &header(TrafficClass::Video, START | KEY), t0);
        let mut batch = Vec::new();
        assert_eq!(o.take(t0, &mut batch), Take::Frames);
        for _ in 0..6 {
            o.push_relay(1, wire(1), &header(TrafficClass::Video, 0), t0);
        }
        // Sender 2's frames can go; over the bound (10 frames) they do, not audio, though
        // sender 1 has more waiting.
        video_frame_from(&o, 2, 2, 2, true, t0);
        video_frame_from(&o, 2, 2, 2, false, t0);
        o.push_relay(3, wire(7), &header(TrafficClass::Audio, START | END), t0);
        assert_eq!(o.dropped_frames(), (0, 4), "sender 2's four packets, no audio");
        o.ack(1, t0);
        let out = drain(&o, t0);
        assert_eq!(out.iter().filter(|t| **t == 1).count(), 6, "sender 1's frame whole");
        assert!(out.contains(&7));
    }

    fn header(class: TrafficClass, flags: u8) -> RelayHeader {
        RelayHeader {
            call: CALL,
            class,
            flags: RelayFlags(flags),
        }
    }

    /// A frame whose bytes are `tag` (for identification) and whose length is 100.
    fn wire(tag: u8) -> Bytes {
        Bytes::from(vec![tag; 100])
    }

    const START: u8 = RelayFlags::FRAME_START;
    const END: u8 = RelayFlags::FRAME_END;
    const KEY: u8 = RelayFlags::KEY_FRAME;

    /// Pushes a video frame of `packets` packets, all tagged `tag`.
    fn video_frame(o: &Outbox, tag: u8, packets: usize, key: bool, now: Instant) {
        video_frame_from(o, 1, tag, packets, key, now);
    }

    /// Pushes a video frame of `packets` packets from sender `from`, all tagged `tag`.
    fn video_frame_from(o: &Outbox, from: u64, tag: u8, packets: usize, key: bool, now: Instant) {
        for i in 0..packets {
            let mut flags = if key { KEY } else { 0 };
            if i == 0 {
                flags |= START;
            }
            if i + 1 == packets {
                flags |= END;
            }
            o.push_relay(from, wire(tag), &header(TrafficClass::Video, flags), now);
        }
    }

    /// Takes everything the outbox will hand out, acknowledging as a client would.
    fn drain(o: &Outbox, now: Instant) -> Vec<u8> {
        let mut tags = Vec::new();
        let mut batch = Vec::new();
        for _ in 0..1000 {
            match o.take(now, &mut batch) {
                Take::Frames => {
                    let n = batch.len() as u32;
                    tags.extend(batch.drain(..).map(|b| b[0]));
                    o.ack(n, now);
                }
                _ => break,
            }
        }
        tags
    }

    #[test]
    fn a_busy_client_gets_nothing_until_it_acknowledges() {
        let o = outbox();
        let now = Instant::now();
        for i in 0..6 {
            o.push_relay(1, wire(i), &header(TrafficClass::Control, START | END), now);
        }
        let mut batch = Vec::new();
        assert_eq!(o.take(now, &mut batch), Take::Frames);
        assert_eq!(batch.len(), 4, "at most idle_limit frames unacknowledged");
        assert_eq!(o.idle_count(), 4);
        batch.clear();
        assert_eq!(o.take(now, &mut batch), Take::Idle, "busy: the rest waits here");
        o.ack(2, now);
        assert_eq!(o.take(now, &mut batch), Take::Frames);
        assert_eq!(batch.iter().map(|b| b[0]).collect::<Vec<_>>(), vec![4, 5]);
    }

    #[test]
    fn server_messages_go_first_and_are_never_held_back() {
        let o = outbox();
        let now = Instant::now();
        for i in 0..4 {
            o.push_relay(1, wire(i), &header(TrafficClass::Control, START | END), now);
        }
        let mut batch = Vec::new();
        o.take(now, &mut batch);
        batch.clear();
        assert!(o.push_server(Bytes::from_static(b"ping")));
        assert_eq!(
            o.take(now, &mut batch),
            Take::Frames,
            "busy for relay, not for the server"
        );
        assert_eq!(batch, vec![Bytes::from_static(b"ping")]);
    }

    #[test]
    fn audio_goes_before_video_and_control_before_both() {
        let o = outbox();
        let now = Instant::now();
        video_frame(&o, 30, 1, true, now);
        o.push_relay(1, wire(20), &header(TrafficClass::Audio, START | END), now);
        o.push_relay(1, wire(10), &header(TrafficClass::Control, 0), now);
        assert_eq!(drain(&o, now), vec![10, 20, 30]);
    }

    #[test]
    fn late_audio_is_dropped_oldest_first() {
        let o = outbox();
        let t0 = Instant::now();
        o.push_relay(1, wire(1), &header(TrafficClass::Audio, START | END), t0);
        o.push_relay(
            1,
            wire(2),
            &header(TrafficClass::Audio, START | END),
            t0 + Duration::from_millis(100),
        );
        let later = t0 + config().audio_deadline() + Duration::from_millis(1);
        assert_eq!(drain(&o, later), vec![2]);
    }

    #[test]
    fn video_over_the_bound_is_dropped_whole_frames_back_to_the_next_key_frame() {
        let o = outbox();
        let now = Instant::now();
        // Fill the client's window so everything waits here.
        for i in 0..4 {
            o.push_relay(1, wire(i), &header(TrafficClass::Control, START | END), now);
        }
        let mut batch = Vec::new();
        o.take(now, &mut batch);
        // delta 40, delta 41, key 50, delta 51: 3+3+3+3 packets > max_frames (10)
        video_frame(&o, 40, 3, false, now);
        video_frame(&o, 41, 3, false, now);
        video_frame(&o, 50, 3, true, now);
        video_frame(&o, 51, 3, false, now);
        o.ack(4, now);
        let got = drain(&o, now);
        assert_eq!(
            got,
            vec![50, 50, 50, 51, 51, 51],
            "the two deltas before the key frame went, whole"
        );
    }

    #[test]
    fn each_senders_video_is_dropped_and_resumed_on_its_own() {
        // A room: two senders' video interleaves in one receiver's buffer under one id.
        let o = outbox();
        let now = Instant::now();
        for i in 0..4 {
            o.push_relay(1, wire(i), &header(TrafficClass::Control, START | END), now);
        }
        let mut batch = Vec::new();
        o.take(now, &mut batch);
        // Sender 1's deltas (10..14, 2 packets each) fill the buffer past its bound (10):
        // sender 1 has the most waiting, so its frames are dropped and it waits for a key
        // frame. Sender 2's frames are not touched, and its key frame does not end sender 1's
        // wait.
        video_frame_from(&o, 2, 20, 2, true, now);
        for tag in 10..15 {
            video_frame_from(&o, 1, tag, 2, false, now);
        }
        video_frame_from(&o, 2, 21, 2, false, now);
        video_frame_from(&o, 2, 22, 2, true, now);
        video_frame_from(&o, 1, 15, 2, false, now); // sender 1 still waits: dropped
        video_frame_from(&o, 1, 30, 2, true, now); // its key frame: kept
        o.ack(4, now);
        let got = drain(&o, now);
        assert!(!got.contains(&15), "sender 1's delta before its key frame: {got:?}");
        assert!(got.contains(&30), "sender 1 resumes at its key frame: {got:?}");
        for tag in [20, 21, 22] {
            assert!(got.contains(&tag), "sender 2's frame {tag} stays: {got:?}");
        }
        for tag in got.iter().copied().collect::<std::collections::BTreeSet<_>>() {
            let n = got.iter().filter(|t| **t == tag).count();
            assert_eq!(n, 2, "frame {tag} arrived whole: {got:?}");
        }
    }

    #[test]
    fn with_no_key_frame_waiting_video_resumes_at_the_next_one() {
        let o = outbox();
        let now = Instant::now();
        for i in 0..4 {
            o.push_relay(1, wire(i), &header(TrafficClass::Control, START | END), now);
        }
        let mut batch = Vec::new();
        o.take(now, &mut batch);
        for tag in 60..64 {
            video_frame(&o, tag, 3, false, now); // 12 packets: over the bound, no key frame
        }
        video_frame(&o, 64, 2, false, now); // arrives while skipping: dropped
        video_frame(&o, 70, 2, true, now); // the key frame: kept, and what follows
        video_frame(&o, 71, 2, false, now);
        o.ack(4, now);
        let got = drain(&o, now);
        assert!(
            got.starts_with(&[70, 70, 71, 71]) || got.iter().all(|t| *t >= 62),
            "{got:?}"
        );
        assert!(
            !got.contains(&64),
            "no delta frame between the drop and the key frame: {got:?}"
        );
        // Every frame that arrives arrives whole.
        for tag in got.iter().copied().collect::<std::collections::BTreeSet<_>>() {
            let n = got.iter().filter(|t| **t == tag).count();
            assert!(n == 3 || n == 2, "frame {tag} arrived with {n} packets: {got:?}");
        }
    }

    #[test]
    fn a_frame_already_started_is_never_cut() {
        let o = Outbox::new(
            RelayConfig {
                idle_limit: 2,
                ack_every: 1,
                burst: 2,
                max_frames: 4,
                ..config()
            },
            Metrics::new(),
            16,
        );
        let now = Instant::now();
        video_frame(&o, 80, 4, false, now); // at the bound, not over
        let mut batch = Vec::new();
        o.take(now, &mut batch); // the first 2 packets of frame 80 are out
        assert_eq!(batch.len(), 2);
        video_frame(&o, 81, 3, false, now); // over the bound: 81 must go, 80's tail must stay
        o.ack(2, now);
        let got = drain(&o, now);
        assert_eq!(got, vec![80, 80], "{got:?}");
    }

    #[test]
    fn control_is_never_dropped_even_far_over_the_bound() {
        let o = outbox();
        let now = Instant::now();
        for i in 0..100 {
            o.push_relay(1, wire(i), &header(TrafficClass::Control, 0), now);
        }
        assert_eq!(drain(&o, now).len(), 100);
    }

    #[test]
    fn a_client_that_stops_acknowledging_is_stalled() {
        let o = outbox();
        let t0 = Instant::now();
        for i in 0..8 {
            o.push_relay(1, wire(i), &header(TrafficClass::Control, 0), t0);
        }
        let mut batch = Vec::new();
        o.take(t0, &mut batch);
        o.take(t0, &mut batch);
        let later = t0 + Duration::from_secs(3);
        assert!(o.stalled_for(later).is_some_and(|d| d >= Duration::from_secs(3)));
        o.ack(4, later);
        assert_eq!(o.stalled_for(later), None, "progress clears it");
    }

    #[test]
    fn control_past_its_cap_marks_the_client_overloaded_instead_of_growing() {
        let o = Outbox::new(
            RelayConfig {
                max_bytes: 1000,
                ..config()
            },
            Metrics::new(),
            16,
        );
        let now = Instant::now();
        for i in 0..50 {
            o.push_relay(1, wire(i), &header(TrafficClass::Control, 0), now); // 100 bytes each
        }
        assert!(o.overflowed());
        assert_eq!(o.waiting(), 40, "capped at 4 × max_bytes");
    }

    #[test]
    fn too_many_server_messages_mean_the_client_is_not_reading() {
        let o = Outbox::new(config(), Metrics::new(), 2);
        assert!(o.push_server(Bytes::from_static(b"a")));
        assert!(o.push_server(Bytes::from_static(b"b")));
        assert!(!o.push_server(Bytes::from_static(b"c")));
        assert!(o.overflowed());
    }

    #[test]
    fn close_comes_after_everything_queued() {
        let o = outbox();
        let now = Instant::now();
        o.push_server(Bytes::from_static(b"bye"));
        o.close(false);
        let mut batch = Vec::new();
        assert_eq!(o.take(now, &mut batch), Take::Frames);
        batch.clear();
        assert_eq!(o.take(now, &mut batch), Take::Close(false));
    }
}
