//! The delay-gradient detector of the rate controller (GCC's trendline filter with an adaptive
//! threshold): acknowledged packets, in send order, form groups sent within 5 ms, and on a path
//! that delivers in bursts (the relay's TCP connection) a packet that arrives in a burst with
//! its group (within 5 ms of it, sooner than it was sent after it, the burst under 100 ms)
//! joins it — what a stalled transport (TCP retransmitting) delivers at once is one group, not a
//! queue that grew and drained (on UDP the same rule hides a queue building behind a shaper:
//! it stays off there); between
//! groups `d = Δarrival − Δsend`; the accumulated `d`, smoothed, over the last 20 groups gives a
//! trend (least-squares slope); `trend × min(groups, 60) × 4` against an adaptive threshold
//! (6–600, starting at 12.5; up 0.0087, down 0.039 per ms) says overuse (for more than 10 ms
//! and still rising), underuse, or normal.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Usage;

/// Packets sent within one burst, as acknowledged.
#[derive(Debug, Clone, Copy)]
struct Group {
    first_send: Instant,
    last_send: Instant,
    first_arrival_us: u64,
    last_arrival_us: u64,
}

impl Group {
    fn new(sent: Instant, arrival_us: u64) -> Self {
        Self {
            first_send: sent,
            last_send: sent,
            first_arrival_us: arrival_us,
            last_arrival_us: arrival_us,
        }
    }

    /// A packet sent at `sent` that arrived at `arrival_us` came in a burst with this group:
    /// close behind its last packet, and sooner after it than it was sent (GCC's inter-arrival
    /// burst rule).
    fn in_burst(&self, sent: Instant, arrival_us: u64) -> bool {
        let arrival_delta = arrival_us as f64 - self.last_arrival_us as f64;
        let send_delta = sent.saturating_duration_since(self.last_send).as_secs_f64() * 1e6;
        arrival_delta - send_delta < 0.0
            && arrival_delta <= BURST_DELTA_US
            && arrival_us.saturating_sub(self.first_arrival_us) < MAX_BURST_US
    }
}

const GROUP_SPAN: Duration = Duration::from_millis(5);
/// A packet arriving within this of its group's last (µs) may belong to its burst.
const BURST_DELTA_US: f64 = 5_000.0;
/// A burst spans at most this (µs, arrival).
const MAX_BURST_US: u64 = 100_000;
const TREND_WINDOW: usize = 20;
const TREND_MIN_POINTS: usize = 8;
const TREND_SMOOTHING: f64 = 0.9;
const TREND_GAIN: f64 = 4.0;
const OVERUSE_TIME_MS: f64 = 10.0;
const K_UP: f64 = 0.0087;
const K_DOWN: f64 = 0.039;

/// The delay-gradient detector (trendline filter + adaptive threshold).
#[derive(Debug)]
pub(super) struct Trendline {
    window: VecDeque<(f64, f64)>,
    accumulated: f64,
    smoothed: f64,
    first_arrival_ms: Option<f64>,
    deltas: u32,
    pub(super) threshold: f64,
    last_threshold_ms: Option<f64>,
    prev_trend: f64,
    overusing_ms: f64,
    overuse_count: u32,
    pub(super) usage: Usage,
    /// Packets sent within one burst, as acknowledged: the group being filled and the last
    /// complete one.
    group: Option<Group>,
    prev_group: Option<Group>,
    /// Packets arriving in a burst join their group (a path that delivers in bursts).
    pub(super) merge_bursts: bool,
}

impl Trendline {
    pub(super) fn new() -> Self {
        Self {
            window: VecDeque::with_capacity(TREND_WINDOW + 1),
            accumulated: 0.0,
            smoothed: 0.0,
            first_arrival_ms: None,
            deltas: 0,
            threshold: 12.5,
            last_threshold_ms: None,
            prev_trend: 0.0,
            overusing_ms: -1.0,
            overuse_count: 0,
            usage: Usage::Normal,
            group: None,
            prev_group: None,
            merge_bursts: false,
        }
    }

    /// Forgets the groups in progress: the next packet starts a new one, and no delta spans
    /// what came before (a transport's stall, whose held packets say nothing of a queue).
    /// The verdict goes back to normal: what it said before the stall is no guide after it.
    pub(super) fn restart_groups(&mut self) {
        self.group = None;
        self.prev_group = None;
        self.usage = Usage::Normal;
        self.overusing_ms = -1.0;
        self.overuse_count = 0;
    }

    /// An acknowledged packet, in send order: sent at `sent`, arrived at `arrival_us`
    /// (receiver clock). Packets sent within [`GROUP_SPAN`] form a group; each completed group
    /// gives one delay delta to the detector. Returns the verdict so far.
    pub(super) fn on_acked(&mut self, sent: Instant, arrival_us: u64) -> Usage {
        let Some(g) = self.group.as_mut() else {
            self.group = Some(Group::new(sent, arrival_us));
            return self.usage;
        };
        if sent.saturating_duration_since(g.first_send) <= GROUP_SPAN
            || (self.merge_bursts && g.in_burst(sent, arrival_us))
        {
            g.last_send = g.last_send.max(sent);
            g.last_arrival_us = g.last_arrival_us.max(arrival_us);
            return self.usage;
        }
        let done = *g;
        self.group = Some(Group::new(sent, arrival_us));
        let Some(prev) = self.prev_group.replace(done) else {
            return self.usage;
        };
        let send_ms = done.last_send.saturating_duration_since(prev.last_send).as_secs_f64() * 1e3;
        let arrival_ms = (done.last_arrival_us as f64 - prev.last_arrival_us as f64) / 1e3;
        if arrival_ms < 0.0 {
            // Reordered groups: no gradient to read.
            self.prev_group = Some(prev);
            return self.usage;
        }
        self.update(arrival_ms - send_ms, send_ms, done.last_arrival_us as f64 / 1e3)
    }

    /// One group delta: `delay_ms` = Δarrival − Δsend, at `arrival_ms` (receiver clock).
    fn update(&mut self, delay_ms: f64, send_delta_ms: f64, arrival_ms: f64) -> Usage {
        self.deltas = (self.deltas + 1).min(1000);
        self.accumulated += delay_ms;
        self.smoothed = TREND_SMOOTHING * self.smoothed + (1.0 - TREND_SMOOTHING) * self.accumulated;
        let origin = *self.first_arrival_ms.get_or_insert(arrival_ms);
        self.window.push_back((arrival_ms - origin, self.smoothed));
        if self.window.len() > TREND_WINDOW {
            self.window.pop_front();
        }
        // A trend from 8 groups on: at low rates 20 groups take a third of a second to come.
        let trend = if self.window.len() >= TREND_MIN_POINTS {
            slope(&self.window).unwrap_or(self.prev_trend)
        } else {
            self.prev_trend
        };
        self.detect(trend, send_delta_ms, arrival_ms)
    }

    fn detect(&mut self, trend: f64, send_delta_ms: f64, now_ms: f64) -> Usage {
        let modified = f64::from(self.deltas.min(60)) * trend * TREND_GAIN;
        if modified > self.threshold {
            if self.overusing_ms < 0.0 {
                self.overusing_ms = send_delta_ms / 2.0;
            } else {
                self.overusing_ms += send_delta_ms;
            }
            self.overuse_count += 1;
            if self.overusing_ms > OVERUSE_TIME_MS && self.overuse_count > 1 && trend >= self.prev_trend {
                self.overusing_ms = 0.0;
                self.overuse_count = 0;
                self.usage = Usage::Over;
            }
        } else if modified < -self.threshold {
            self.overusing_ms = -1.0;
            self.overuse_count = 0;
            self.usage = Usage::Under;
        } else {
            self.overusing_ms = -1.0;
            self.overuse_count = 0;
            self.usage = Usage::Normal;
        }
        self.prev_trend = trend;
        self.adapt_threshold(modified, now_ms);
        self.usage
    }

    fn adapt_threshold(&mut self, modified: f64, now_ms: f64) {
        let last = *self.last_threshold_ms.get_or_insert(now_ms);
        if modified.abs() > self.threshold + 15.0 {
            // A sudden spike (a route change, a burst): not a reason to move the threshold.
            self.last_threshold_ms = Some(now_ms);
            return;
        }
        let k = if modified.abs() < self.threshold { K_DOWN } else { K_UP };
        let dt = (now_ms - last).clamp(0.0, 100.0);
        self.threshold = (self.threshold + k * (modified.abs() - self.threshold) * dt).clamp(6.0, 600.0);
        self.last_threshold_ms = Some(now_ms);
    }
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &VecDeque<(f64, f64)>) -> Option<f64> {
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in points {
        num += (x - mx) * (y - my);
        den += (x - mx) * (x - mx);
    }
    (den > 0.0).then(|| num / den)
}
