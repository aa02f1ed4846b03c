//! The sender's rate controller: one target bitrate per call, from the receiver's transport
//! feedback ([`crate::Feedback`]), in the family of WebRTC's Google Congestion Control
//! (draft-ietf-rmcat-gcc-02).
//!
//! Why GCC's shape rather than SCReAM or NADA: SCReAM is window-based and wants per-packet
//! acknowledgements with an RTP-style sequence space and a sender-side queue it can hold
//! back, while natcall's audio is never held back; NADA needs a one-way-delay measure with
//! synchronised behaviour of the receiver and is little deployed. GCC's delay-gradient detector
//! works on arrival times alone (no clock synchronisation), tolerates thinned feedback, and its
//! behaviour on real links is the best known. What natcall changes: packets are named by
//! (track, sequence) and mapped to a transport-wide send order here, so the header stays 18
//! bytes; rates count the path's per-packet overhead; a call probes the link at its start; loss
//! counts only packets sent within its window; a queue another flow keeps full is left to
//! loss; and the relay's per-receiver budget caps the target (an SFU's REMB).
//!
//! The parts:
//! - **Send history** (`history`): every packet's transport-wide index, send time, wire size
//!   and probe cluster, bounded ([`RateConfig::history`] packets, 5 s).
//! - **Delay gradient** (`trendline`): acknowledged packets in send order form groups sent
//!   within 5 ms; between groups, `d = Δarrival − Δsend`. The accumulated `d`, smoothed (0.9),
//!   over the last 20 groups (8 at least) gives a trend (least-squares slope);
//!   `trend × min(groups, 60) × 4` against an adaptive threshold (6–600, starting at 12.5; up
//!   0.0087, down 0.039 per ms) says overuse (for more than 10 ms and still rising), underuse,
//!   or normal.
//! - **AIMD**: overuse → the target drops to 0.9 × the rate that reached the receiver (at most
//!   halving it, at most once per 2 RTT, 200 ms at least: the queue a decrease drains takes that
//!   long to show), and that rate feeds the link-capacity estimate; underuse → hold (queues
//!   drain); normal → grow: additively (one packet per response time, 5 % a second at least)
//!   within the capacity estimate's band, multiplicatively ([`RateConfig::probe_growth`] per
//!   second) outside it or with none. Growth never takes the target above 1.5 × what the
//!   receiver got plus 10 kbit/s.
//! - **Probes** (`probe`): at the call's start, clusters at twice the target (media topped up
//!   with padding) find the link's capacity in a few round trips; a cluster that left a queue
//!   behind found no room. Off through the relay ([`RateController::set_probing`]).
//! - **Loss**: over the last second, of packets sent within it, loss above 10 % cuts the target
//!   by half the loss (at most every 300 ms); between 5 % and 10 % it may not grow; below 5 %
//!   loss says nothing (GCC holds from 2 %, but then a link with 2 % random loss, which no rate
//!   cures, would never let the call grow: congestion on a bottleneck shows as delay first).
//! - **Stalls** (on a path that delivers in bursts, [`RateController::set_bursty_path`]): the
//!   receiver getting nothing for [`STALL_GAP`] and a round trip while media was being sent
//!   is the transport
//!   stalling (the relay's TCP connection waiting out a retransmission timeout), not a rate
//!   too high. The relay drops what its buffer cannot hold meanwhile, and skips video until the
//!   next key frame: for [`STALL_QUIET`] after a stall, loss does not cut the target (it still
//!   holds its growth; the relay's budget and the delay detector still bound it). The packets the stall held arrive late
//!   all at once: the delay detector skips them and starts its groups afresh after them. The
//!   receiver reports only what arrives, so a stall silences the feedback: there silence
//!   halves the target only after [`BURSTY_SILENCE`], and a stall that outlasted even that
//!   takes the halving back when it shows.
//! - **Competing flows** (`queue`): a queue above 50 ms for 2 s although the target came down by
//!   a fifth is another flow's; delay is then ignored and loss alone bounds the target.
//! - **Budget**: a cap the path gives (the relay's drain rate for this receiver) bounds the
//!   target while it is fresh ([`RateConfig::budget_lifetime`]).
//! - **Silence**: no feedback for [`RateConfig::feedback_timeout`] while sending halves the
//!   target, once per timeout ([`BURSTY_SILENCE`] on a bursty path: see "Stalls").

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::debug;

use crate::Track;
use crate::feedback::Feedback;

mod history;
mod probe;
mod queue;
#[cfg(test)]
mod tests;
mod trendline;

use history::{History, Sent};
pub use probe::ProbeRequest;
use probe::{PROBE_FACTOR, ProbeResult, Prober};
use queue::QueueDelay;
use trendline::Trendline;

/// Controller settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RateConfig {
    /// The target before any feedback, bit/s.
    pub start_bps: u64,
    /// The target never goes below this, bit/s.
    pub min_bps: u64,
    /// Nor above this (what the application allows), bit/s.
    pub max_bps: u64,
    /// Multiplicative growth per second while probing (1.0 doubles every second).
    pub probe_growth: f64,
    /// On overuse the target becomes this fraction of the rate the receiver got.
    pub decrease_factor: f64,
    /// No feedback for this long while sending halves the target.
    pub feedback_timeout: Duration,
    /// Packets remembered for matching feedback.
    pub history: usize,
    /// A budget from the path is obeyed for this long after it was given.
    pub budget_lifetime: Duration,
}

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            start_bps: 300_000,
            min_bps: 100_000,
            max_bps: 2_000_000,
            probe_growth: 1.0,
            decrease_factor: 0.9,
            feedback_timeout: Duration::from_secs(1),
            history: 16_384,
            budget_lifetime: Duration::from_millis(500),
        }
    }
}

/// Why the target last changed (for the `rate` events a user sees).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateReason {
    /// The initial target.
    Start,
    /// Delay was growing: a queue was building on the path.
    Delay,
    /// Packets were being lost.
    Loss,
    /// No congestion: growing.
    Probe,
    /// The path's budget (the relay's drain rate for the receiver) caps it.
    Budget,
    /// No feedback arrived.
    Silence,
    /// The application set it.
    Set,
}

/// The delay detector's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Usage {
    /// Queues are stable.
    Normal,
    /// A queue is building: the path is over-used.
    Over,
    /// A queue is draining.
    Under,
}

/// What the controller knows, for reports and charts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RateState {
    /// The target, bit/s.
    pub target_bps: u64,
    /// The rate that reached the receiver over the last half second, bit/s (`None` before
    /// two feedbacks).
    pub acked_bps: Option<u64>,
    /// Loss over the last second, 0.0–1.0.
    pub loss: f64,
    /// The delay detector's verdict.
    pub usage: Usage,
    /// Why the target last changed.
    pub reason: RateReason,
    /// The path's budget (the relay's, for this receiver) while it applies, bit/s.
    pub budget_bps: Option<u64>,
    /// The queue on the path: one-way delay above its base, ms (smoothed).
    pub queue_delay_ms: f64,
    /// Another flow (a download) keeps the queue full: only loss bounds the target.
    pub competing: bool,
    /// Stalls of a bursty path seen so far (each quiets the loss rule for [`STALL_QUIET`]).
    pub stalls: u64,
}

/// Loss over the last second from which the target may not grow.
const LOSS_HOLD: f64 = 0.05;
/// Loss over the last second above which the target is cut by half the loss.
const LOSS_CUT: f64 = 0.10;
/// Additive growth is at least this share of the target a second.
const ADDITIVE_MIN: f64 = 0.05;
/// Loss is measured over this long (of packets sent within it).
const LOSS_WINDOW: Duration = Duration::from_secs(1);
/// One decrease takes the target to no less than this share of itself.
const MAX_CUT: f64 = 0.5;
/// On a bursty path, nothing arriving for this long and a round trip (beyond the gap in
/// sending) is a stall of the transport. A TCP retransmission timeout is 200 ms and a round
/// trip's variation at least; the relay's own jitter is milliseconds.
pub const STALL_GAP: Duration = Duration::from_millis(150);
/// Loss is not heard for this long after a stall: the relay's drops during it show within a
/// second, and the video it skips until a key frame (every 2 s from natcall's sources, sooner
/// when the relay's drop report asks for one) when that key frame arrives.
pub const STALL_QUIET: Duration = Duration::from_secs(3);
/// On a bursty path feedback silence halves the target only after this long: a TCP
/// connection's retransmission timeouts back off 200, 400, 800 ms …, and the receiver reports
/// only what arrives, so a shorter silence is such a stall.
pub const BURSTY_SILENCE: Duration = Duration::from_secs(3);

/// The link capacity seen at decreases: a mean (bit/s) and a variance (kbit/s, normalised by
/// the mean).
#[derive(Debug, Clone, Copy)]
struct LinkEstimate {
    mean: f64,
    var: f64,
}

impl LinkEstimate {
    fn new(sample: f64) -> Self {
        Self { mean: sample, var: 0.4 }
    }

    fn update(this: &mut Option<Self>, sample: f64) {
        let e = this.get_or_insert(LinkEstimate::new(sample));
        let alpha = 0.05;
        e.mean = (1.0 - alpha) * e.mean + alpha * sample;
        // As GCC, in kbit/s: the variance is normalised by the mean.
        let (mean_k, sample_k) = (e.mean / 1e3, sample / 1e3);
        e.var = ((1.0 - alpha) * e.var + alpha * (mean_k - sample_k).powi(2) / mean_k.max(1.0)).clamp(0.4, 2.5);
    }

    /// Three standard deviations around the mean, in bit/s.
    fn band(&self) -> f64 {
        3.0 * (self.var * self.mean / 1e3).sqrt() * 1e3
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aimd {
    Hold,
    Increase,
    Decrease,
}

/// Per-track counts at the previous feedback.
#[derive(Debug, Clone, Copy)]
struct LastCount {
    track: Track,
    highest: u32,
    received: u32,
}

/// The rate controller. Sans-IO: time comes in as `now`.
#[derive(Debug)]
pub struct RateController {
    config: RateConfig,
    target: f64,
    reason: RateReason,
    history: History,
    /// Highest transport index already used for a group (later feedback of older packets is
    /// ignored).
    processed: Option<u64>,
    trend: Trendline,
    queue: QueueDelay,
    prober: Prober,
    /// When the delay detector last said overuse.
    last_overuse: Option<Instant>,
    aimd: Aimd,
    link: Option<LinkEstimate>,
    last_update: Option<Instant>,
    last_decrease: Option<Instant>,
    last_loss_cut: Option<Instant>,
    /// Recent feedback's cumulative counts.
    acked: VecDeque<Acked>,
    counts: Vec<LastCount>,
    /// Per feedback over the last second, counting only packets sent within it.
    losses: VecDeque<LossSample>,
    budget: Option<(u64, Instant)>,
    last_seq: Option<u16>,
    last_feedback: Option<Instant>,
    last_sent: Option<Instant>,
    rtt: Duration,
    avg_packet: f64,
    /// Bytes the path adds to each packet.
    overhead: f64,
    /// Probes may be sent on this path.
    probing: bool,
    /// The path delivers in bursts: arrival gaps are the transport's stalls.
    bursty: bool,
    /// The acknowledged packet that arrived last so far: (index, sent, arrival µs on the
    /// receiver's clock).
    last_arrival: Option<(u64, Instant, u64)>,
    /// When the last stall was seen (bursty paths).
    stall_at: Option<Instant>,
    /// Packets sent up to this were held by the last stall: the delay detector skips them.
    stall_held: Option<Instant>,
    /// Stalls seen (for reports).
    stalls: u64,
    /// The target before feedback fell silent, while it is silent: a stall that explains
    /// the silence gives it back.
    before_silence: Option<f64>,
}

/// What one feedback said was lost.
#[derive(Debug, Clone, Copy)]
struct LossSample {
    at: Instant,
    expected: f64,
    lost: f64,
    /// Reported after a stall ([`STALL_QUIET`]): holds growth, never cuts.
    quiet: bool,
}

/// What one feedback said had reached the receiver so far.
#[derive(Debug, Clone, Copy)]
struct Acked {
    /// When (receiver clock, µs).
    at_us: u64,
    /// Media bytes received.
    bytes: u64,
    /// Packets received, all tracks (wrapping).
    packets: u32,
}

impl RateController {
    /// A controller starting at `config.start_bps` (within min and max).
    pub fn new(config: RateConfig, now: Instant) -> Self {
        let history = History::new(config.history.max(64));
        let mut c = Self {
            target: config.start_bps as f64,
            config,
            reason: RateReason::Start,
            history,
            processed: None,
            trend: Trendline::new(),
            queue: QueueDelay::new(now),
            prober: Prober::new(now),
            last_overuse: None,
            aimd: Aimd::Increase,
            link: None,
            last_update: Some(now),
            last_decrease: None,
            last_loss_cut: None,
            acked: VecDeque::new(),
            counts: Vec::new(),
            losses: VecDeque::new(),
            budget: None,
            last_seq: None,
            last_feedback: None,
            last_sent: None,
            rtt: Duration::from_millis(100),
            avg_packet: 500.0,
            overhead: 0.0,
            probing: true,
            bursty: false,
            last_arrival: None,
            stall_at: None,
            stall_held: None,
            stalls: 0,
            before_silence: None,
        };
        c.clamp();
        c
    }

    /// The target bitrate, bit/s.
    pub fn target_bps(&self) -> u64 {
        self.target as u64
    }

    /// What the controller knows now.
    pub fn state(&self) -> RateState {
        RateState {
            target_bps: self.target_bps(),
            acked_bps: self.acked_bps().map(|r| r as u64),
            loss: self.loss().unwrap_or(0.0),
            usage: self.trend.usage,
            reason: self.reason,
            budget_bps: self.budget.map(|(bps, _)| bps),
            queue_delay_ms: self.queue.queue_ms(),
            competing: self.queue.competing(),
            stalls: self.stalls,
        }
    }

    /// Sets the ceiling of the target (the application's choice, e.g. `--media-kbps`); a
    /// target above it comes down to it, one below it keeps adapting.
    pub fn set_max(&mut self, bps: u64) {
        self.config.max_bps = bps.max(1);
        if self.target > self.config.max_bps as f64 {
            self.target = self.config.max_bps as f64;
            self.reason = RateReason::Set;
        }
        self.clamp();
    }

    /// Sets the ceiling and the target itself: the controller adapts from there (and forgets
    /// what it knew of the link).
    pub fn set_rate(&mut self, bps: u64) {
        self.config.max_bps = bps.max(1);
        self.target = bps as f64;
        self.reason = RateReason::Set;
        self.link = None;
        self.clamp();
    }

    /// The path's round-trip time (the response time of additive growth).
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = rtt.clamp(Duration::from_millis(1), Duration::from_secs(5));
    }

    /// A cap the path gives (the relay's drain rate for the receiver), valid for
    /// [`RateConfig::budget_lifetime`].
    pub fn handle_budget(&mut self, now: Instant, bps: u64) {
        self.budget = Some((bps, now));
        if self.target > bps as f64 {
            self.target = bps as f64;
            self.reason = RateReason::Budget;
            self.clamp();
        }
    }

    /// Bytes the path adds to every packet (IP and UDP headers, a relay's framing): rates are
    /// counted as the network carries them, so a target fits a link's capacity.
    pub fn set_overhead(&mut self, bytes: usize) {
        self.overhead = bytes as f64;
    }

    /// Records a packet of `size` bytes (without the path's overhead) handed to the path, as
    /// part of probe cluster `probe` if it is one of its packets.
    pub fn on_sent(&mut self, now: Instant, track: Track, sequence: u32, size: usize, probe: Option<u32>) {
        let wire = size as f64 + self.overhead;
        let index = self.history.push(Sent {
            track,
            sequence,
            at: now,
            size: wire as u32,
            probe,
        });
        if let Some(id) = probe {
            self.prober.on_sent(index, id);
        }
        self.avg_packet = 0.95 * self.avg_packet + 0.05 * wire;
        self.last_sent = Some(now);
    }

    /// A probe the sender should send now: a cluster of packets at a higher rate (media that
    /// waits, topped up with padding), each reported with its id to
    /// [`on_sent`](Self::on_sent); then [`probe_sent`](Self::probe_sent).
    pub fn poll_probe(&mut self, now: Instant) -> Option<ProbeRequest> {
        self.prober.poll(now)
    }

    /// Turns probing on or off (on by default). A path that buffers and batches what it
    /// carries (a relay's TCP connection) delivers a probe's packets in bursts that say nothing
    /// of its rate: there the target grows by feedback alone, and the relay's budget says
    /// when to stop.
    pub fn set_probing(&mut self, on: bool) {
        self.probing = on;
    }

    /// Whether the path delivers in bursts (off by default): a reliable, in-order transport
    /// such as the relay's TCP connection holds everything behind a lost segment and then
    /// delivers it at once. There the delay detector takes such a burst as one group of
    /// packets rather than as a queue that grew and drained (GCC's burst rule).
    /// It also tells stalls from congestion there (see the module's "Stalls").
    pub fn set_bursty_path(&mut self, on: bool) {
        self.trend.merge_bursts = on;
        self.bursty = on;
        if !on {
            self.stall_at = None;
        }
    }

    /// Media moved to another path (direct to relay, one server's relay to another's): the
    /// last arrival on the old one, and a stall or a silence seen there, say nothing of the
    /// new one.
    pub fn path_changed(&mut self) {
        self.last_arrival = None;
        self.stall_at = None;
        self.stall_held = None;
        self.before_silence = None;
    }

    /// Whether a probe waits for [`poll_probe`](Self::poll_probe).
    pub fn probe_pending(&self) -> bool {
        self.prober.pending()
    }

    /// The sender sent every byte of probe `id`.
    pub fn probe_sent(&mut self, now: Instant, id: u32) {
        self.prober.sent_all(now, id);
    }

    /// Advances time: halves the target when feedback stopped while media was being sent.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self
            .budget
            .is_some_and(|(_, at)| now.saturating_duration_since(at) > self.config.budget_lifetime)
        {
            self.budget = None;
        }
        let timeout = if self.bursty {
            self.config.feedback_timeout.max(BURSTY_SILENCE)
        } else {
            self.config.feedback_timeout
        };
        let since = self.last_feedback.or(self.last_update).unwrap_or(now);
        let sending = self
            .last_sent
            .is_some_and(|t| now.saturating_duration_since(t) < timeout);
        if sending && now.saturating_duration_since(since) >= timeout {
            self.before_silence.get_or_insert(self.target);
            self.target *= 0.5;
            self.reason = RateReason::Silence;
            self.aimd = Aimd::Hold;
            // Once per timeout.
            self.last_feedback = Some(now);
            self.clamp();
        }
    }

    /// Feeds one transport feedback.
    pub fn handle_feedback(&mut self, now: Instant, feedback: &Feedback) {
        if let Some(last) = self.last_seq
            && feedback.seq.wrapping_sub(last).wrapping_sub(1) >= u16::MAX / 2
        {
            return; // reordered or repeated: older than one already used
        }
        self.last_seq = Some(feedback.seq);
        self.last_feedback = Some(now);
        self.observe_acked(feedback);
        // Arrivals first: a stall they show makes the losses reported with it say nothing.
        let usage = self.observe_delay(now, feedback);
        // Feedback is back: a silence the arrivals did not explain as a stall stays answered.
        self.before_silence = None;
        self.observe_loss(now, feedback);
        if let Some(result) = self.prober.result(now, &self.history, self.queue.base()) {
            self.on_probe(result);
        }
        self.update(now, usage);
    }

    /// A probe's result: room on the path moves the target up to what it carried (80 % of it,
    /// at most 1.5 times the target, when that was all the probe sent; 90 % of the capacity it
    /// ran into).
    fn on_probe(&mut self, r: ProbeResult) {
        debug!(result = ?r, target = self.target as u64, "probe result");
        let target = match r {
            ProbeResult::Queued => return,
            ProbeResult::Room(bps) | ProbeResult::Capacity(bps) if bps <= 1.1 * self.target => return,
            ProbeResult::Room(bps) => {
                // It carried all of it: there may be more; probe again at once. Room is
                // taken at 80 %: a shaper's burst may have carried the end of a cluster that
                // went a little beyond the link.
                // At most 1.5 times itself: a cluster only a little beyond the link can pass
                // whole through a shaper's burst.
                self.link = None;
                self.prober.chain = true;
                (0.8 * bps).min(1.5 * self.target)
            }
            ProbeResult::Capacity(bps) => {
                self.link = Some(LinkEstimate::new(bps));
                0.9 * bps
            }
        };
        self.target = target;
        self.reason = RateReason::Probe;
        self.clamp();
    }

    fn observe_acked(&mut self, f: &Feedback) {
        if self.acked.back().is_some_and(|a| f.at_us <= a.at_us) {
            return;
        }
        // Packets received so far, all tracks (each count wraps; their sum is only ever
        // differenced).
        let packets = f.counts.iter().fold(0u32, |n, c| n.wrapping_add(c.received));
        self.acked.push_back(Acked {
            at_us: f.at_us,
            bytes: f.received_bytes,
            packets,
        });
        while self.acked.len() > 2 && self.acked[1].at_us + 500_000 <= f.at_us {
            self.acked.pop_front();
        }
    }

    /// The rate that reached the receiver over (about) the last half second, with the path's
    /// overhead.
    fn acked_bps(&self) -> Option<f64> {
        let (first, last) = (self.acked.front()?, self.acked.back()?);
        let span = last.at_us.checked_sub(first.at_us).filter(|&s| s >= 100_000)?;
        let packets = f64::from(last.packets.wrapping_sub(first.packets));
        let bytes = last.bytes.saturating_sub(first.bytes) as f64 + packets * self.overhead;
        Some(bytes * 8.0 * 1e6 / span as f64)
    }

    fn observe_loss(&mut self, now: Instant, f: &Feedback) {
        let (mut expected, mut lost) = (0.0, 0.0);
        for c in &f.counts {
            let Some(last) = self.counts.iter_mut().find(|l| l.track == c.track) else {
                self.counts.push(LastCount {
                    track: c.track,
                    highest: c.highest,
                    received: c.received,
                });
                continue;
            };
            let e = c.highest.wrapping_sub(last.highest);
            let r = c.received.wrapping_sub(last.received);
            if e >= u32::MAX / 2 || r >= u32::MAX / 2 {
                continue; // reordered feedback, or counts from before a restart
            }
            let (first, end) = (last.highest.wrapping_add(1), c.highest);
            last.highest = c.highest;
            last.received = c.received;
            // A gap can show long after its packets were sent (the next packet of a track the
            // relay skipped until a key frame): only what was sent within the loss window
            // counts, as a share of the range assuming its losses are spread evenly.
            let share = self.recent_share(now, c.track, first, end);
            expected += f64::from(e) * share;
            lost += f64::from(e.saturating_sub(r)) * share;
        }
        let quiet = self.quiet_after_stall(now);
        self.losses.push_back(LossSample {
            at: now,
            expected,
            lost,
            quiet,
        });
        while self
            .losses
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > LOSS_WINDOW)
        {
            self.losses.pop_front();
        }
    }

    /// The share of `track`'s packets `first..=end` sent within the loss window (1 when their
    /// send times are unknown).
    fn recent_share(&self, now: Instant, track: Track, first: u32, end: u32) -> f64 {
        let Some((_, last)) = self.history.get(track, end) else {
            return 1.0;
        };
        let start = self.history.get(track, first).map_or(last.at, |(_, p)| p.at);
        let span = last.at.saturating_duration_since(start).as_secs_f64();
        let since = now.checked_sub(LOSS_WINDOW).map_or(start, |t| t.max(start));
        if span <= 0.0 {
            return if last.at >= since { 1.0 } else { 0.0 };
        }
        (last.at.saturating_duration_since(since).as_secs_f64() / span).clamp(0.0, 1.0)
    }

    /// Loss over the last second, if enough packets were expected to tell (a stall's
    /// included: it holds growth).
    fn loss(&self) -> Option<f64> {
        self.loss_of(|_| true)
    }

    /// Loss reported over the last second and after `since`, outside a stall's quiet, if
    /// enough packets were expected to tell (what may cut the target).
    fn loss_since(&self, since: Option<Instant>) -> Option<f64> {
        self.loss_of(|s| !s.quiet && since.is_none_or(|t| s.at > t))
    }

    fn loss_of(&self, keep: impl Fn(&LossSample) -> bool) -> Option<f64> {
        let (e, l) = self
            .losses
            .iter()
            .filter(|s| keep(s))
            .fold((0.0, 0.0), |(e, l), s| (e + s.expected, l + s.lost));
        (e >= 20.0).then(|| (l / e).clamp(0.0, 1.0))
    }

    /// Whether loss is not heard now: a stall was seen within [`STALL_QUIET`].
    fn quiet_after_stall(&self, now: Instant) -> bool {
        self.bursty
            && self
                .stall_at
                .is_some_and(|t| now.saturating_duration_since(t) < STALL_QUIET)
    }

    /// On a bursty path: the latest arrival so far came [`STALL_GAP`] or more before this one
    /// although the packet sent after it should have arrived that much sooner — the path held
    /// or dropped everything in between: a stall.
    fn observe_stall(&mut self, now: Instant, index: u64, sent: Instant, arrival_us: u64) {
        let Some((last_index, last_sent, last_arrival)) = self.last_arrival else {
            self.last_arrival = Some((index, sent, arrival_us));
            return;
        };
        if arrival_us <= last_arrival {
            return;
        }
        self.last_arrival = Some((index, sent, arrival_us));
        if !self.bursty {
            return;
        }
        let gap = Duration::from_micros(arrival_us - last_arrival);
        let Some(next) = self.history.at(last_index + 1) else {
            return;
        };
        // Sent that long after the last arrival's packet, it was due that long after it. A
        // round trip more is allowed: a flow held to a window (the relay's, TCP's) on a long
        // path arrives a window per round trip, which is no stall.
        let due_after = next.at.saturating_duration_since(last_sent);
        if gap.saturating_sub(due_after) < STALL_GAP + self.rtt || !self.sent_throughout(last_index, index) {
            return;
        }
        debug!(
            gap_ms = gap.as_millis() as u64,
            "the path stalled (nothing arrived, then a burst): its losses are no congestion"
        );
        if !self.quiet_after_stall(now) {
            self.stalls += 1;
        }
        self.stall_at = Some(now);
        // The last second's losses are the stall's as well (the relay's buffer was full).
        for s in &mut self.losses {
            s.quiet = true;
        }
        // What was sent before the path came back was held (or dropped): it arrives with the
        // stall's delay, which is no queue of ours.
        self.stall_held = Some(last_sent + gap);
        self.trend.restart_groups();
        // The receiver sends feedback when something arrives: a long stall silenced it, and
        // the halving that answered that silence was the stall's too.
        if let Some(before) = self.before_silence.take()
            && before > self.target
        {
            self.target = before;
            self.reason = RateReason::Probe;
        }
    }

    /// Whether the packets sent from `from` to `to` (indices) leave no pause in sending of
    /// half [`STALL_GAP`] or more: a sender that paused (and a packet that arrived unreported,
    /// feedback keeping a sample) is not a path that stalled.
    fn sent_throughout(&self, from: u64, to: u64) -> bool {
        let mut last = None;
        for i in from..=to {
            let Some(p) = self.history.at(i) else {
                return false;
            };
            if last.is_some_and(|l: Instant| p.at.saturating_duration_since(l) >= STALL_GAP / 2) {
                return false;
            }
            last = Some(p.at);
        }
        true
    }

    fn observe_delay(&mut self, now: Instant, f: &Feedback) -> Usage {
        let mut acked: Vec<(u64, Sent, u64)> = f
            .arrivals
            .iter()
            .filter_map(|a| {
                let (i, sent) = self.history.get(a.track, a.sequence)?;
                Some((i, sent, a.at_us))
            })
            .filter(|(i, _, _)| self.processed.is_none_or(|p| *i > p))
            .collect();
        acked.sort_by_key(|(i, _, _)| *i);
        acked.dedup_by_key(|(i, _, _)| *i);
        for (i, sent, arrival) in acked {
            self.processed = Some(i);
            self.observe_stall(now, i, sent.at, arrival);
            if self.stall_held.is_some_and(|t| sent.at <= t) {
                continue;
            }
            self.prober.on_acked(i, &sent, arrival);
            self.queue.on_acked(sent.at, arrival);
            self.trend.on_acked(sent.at, arrival);
        }
        // The verdict now: a stall in this feedback set it back to normal.
        self.trend.usage
    }

    fn update(&mut self, now: Instant, usage: Usage) {
        let dt = self
            .last_update
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64().min(1.0));
        self.last_update = Some(now);
        let acked = self.acked_bps();
        // A queue another flow keeps full is not ours to drain: only loss bounds the target
        // then (see `queue`).
        let usage = if self.queue.update(now, self.target) && usage == Usage::Over {
            Usage::Normal
        } else {
            usage
        };
        if usage == Usage::Over {
            self.last_overuse = Some(now);
        }
        self.aimd = match (usage, self.aimd) {
            (Usage::Over, _) => Aimd::Decrease,
            (Usage::Under, _) => Aimd::Hold,
            (Usage::Normal, Aimd::Hold) => Aimd::Increase,
            (Usage::Normal, state) => state,
        };
        let loss = self.loss();
        self.maybe_probe(now, loss);
        match self.aimd {
            Aimd::Decrease => {
                // The queue a decrease drains, and the rate measured after it, show only a
                // feedback round later: decreasing again before that cuts twice for one queue.
                let settle = (self.rtt * 2).max(Duration::from_millis(200));
                if self
                    .last_decrease
                    .is_none_or(|t| now.saturating_duration_since(t) >= settle)
                {
                    // At most halving per step: a transport that stalls for a moment (a relay's
                    // TCP connection retransmitting) delivers next to nothing for that moment,
                    // which says nothing about what the link carries.
                    let base = acked.unwrap_or(self.target).max(MAX_CUT * self.target);
                    let lower = (self.config.decrease_factor * base).min(self.target);
                    // Only a path that delivers less than is sent says what the link carries:
                    // delivering more (a queue draining in a burst, a transport catching up) is
                    // no overuse of ours.
                    if lower < self.target {
                        if self.link.is_some_and(|l| base < l.mean - l.band()) {
                            // Far below what the link carried before: it changed.
                            self.link = None;
                        }
                        LinkEstimate::update(&mut self.link, base);
                        debug!(
                            from = self.target as u64,
                            to = lower as u64,
                            acked = base as u64,
                            threshold = self.trend.threshold,
                            "queue building on the path: rate lowered"
                        );
                        self.target = lower;
                        self.reason = RateReason::Delay;
                    }
                    self.last_decrease = Some(now);
                }
                self.aimd = Aimd::Hold;
            }
            Aimd::Increase if loss.is_none_or(|l| l < LOSS_HOLD) => self.increase(dt, acked),
            Aimd::Increase | Aimd::Hold => {}
        }
        // A cut answers the losses reported since the last one: one burst cuts once (it stays
        // in the last second's loss, which holds the target, until it ages out).
        let recent_loss = self.loss_since(self.last_loss_cut);
        if let Some(l) = recent_loss.filter(|&l| l > LOSS_CUT)
            && self
                .last_loss_cut
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_millis(300))
        {
            debug!(from = self.target as u64, loss = l, "loss on the path: rate lowered");
            self.target *= 1.0 - 0.5 * l;
            self.reason = RateReason::Loss;
            self.last_loss_cut = Some(now);
        }
        if let Some((budget, at)) = self.budget {
            if now.saturating_duration_since(at) > self.config.budget_lifetime {
                self.budget = None;
            } else if self.target > budget as f64 {
                self.target = budget as f64;
                self.reason = RateReason::Budget;
            }
        }
        self.clamp();
    }

    /// Grows the target as GCC does: multiplicatively with no estimate of the link or outside
    /// its band (well below it: recovering what the link carried before; well above it: the
    /// link has changed), additively within it.
    fn increase(&mut self, dt: f64, acked: Option<f64>) {
        // Outside the estimate's band the link changed (or was never measured); a queue another
        // flow keeps full says nothing of it: grow gently then.
        let outside = !self.queue.competing() && self.link.is_none_or(|l| (self.target - l.mean).abs() > l.band());
        let grown = if outside {
            self.target * (1.0 + self.config.probe_growth).powf(dt)
        } else {
            // One packet per response time (GCC), and at least 5 % a second: at megabits one
            // packet a round trip would take tens of seconds to cross the estimate's band.
            let response = (self.rtt + Duration::from_millis(100)).as_secs_f64();
            let step = (self.avg_packet * 8.0 / response).max(ADDITIVE_MIN * self.target);
            self.target + step * dt
        };
        let cap = acked.map_or(f64::INFINITY, |a| 1.5 * a + 10_000.0);
        let next = grown.min(cap.max(self.target));
        if next > self.target {
            self.target = next;
            self.reason = RateReason::Probe;
        }
    }

    /// Asks for a probe at the call's start, and again at once while probes find room: the
    /// link's capacity is found in a few round trips. Later growth is feedback's (see
    /// [`increase`](Self::increase)): on a link the call already fills, a short cluster tells
    /// room from a shaper's full token bucket no better than a guess.
    fn maybe_probe(&mut self, now: Instant, loss: Option<f64>) {
        if !self.probing
            || self.queue.competing()
            || self.aimd != Aimd::Increase
            || loss.is_some_and(|l| l >= LOSS_HOLD)
            || self.target >= self.config.max_bps as f64
            || !self.prober.idle()
        {
            return;
        }
        // At the start, and again at once while probes keep finding room.
        if self.prober.chain || self.prober.last.is_none() {
            let rate = (PROBE_FACTOR * self.target).min(self.config.max_bps as f64);
            debug!(rate = rate as u64, target = self.target as u64, "probing the path");
            self.prober.request(now, rate, self.avg_packet.max(500.0));
        }
    }

    fn clamp(&mut self) {
        let (min, max) = (self.config.min_bps.min(self.config.max_bps), self.config.max_bps.max(1));
        self.target = self.target.clamp(min as f64, max as f64);
    }
}
