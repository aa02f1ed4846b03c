//! Per-track statistics and the estimators behind them (jitter, delay, bitrate).

use std::time::{Duration, Instant};

use serde::Serialize;

/// What the receiver saw on one track. Counters are cumulative since the call started.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Authenticated, non-duplicate packets (late ones included).
    pub packets_received: u64,
    /// Packets never received: the span of sequence numbers seen minus `packets_received`.
    pub packets_lost: u64,
    /// Packets that arrived after their frame was played out or given up.
    pub packets_late: u64,
    /// Packets that arrived after a packet sent later than them (reordered on the way); the
    /// jitter buffer puts their frames back in order.
    pub packets_reordered: u64,
    /// Packets whose sequence number was already received: network duplicates and replays.
    pub packets_duplicated: u64,
    /// Packets more than 64 sequence numbers behind the newest (dropped by the replay window).
    pub packets_too_old: u64,
    /// Packets that failed authentication (forged, corrupted or under another key).
    pub packets_auth_failed: u64,
    /// Bytes of received packets, headers and tags included.
    pub bytes_received: u64,
    /// Frames delivered by `poll_frame`.
    pub frames_complete: u64,
    /// Frames never delivered: fragments missing when a later frame played out, evicted
    /// stale or for memory, or (frame ids never seen) lost entirely.
    pub frames_incomplete: u64,
    /// Frames that completed only after their playout time (the jitter buffer was too short).
    pub frames_late: u64,
    /// Interarrival jitter (RFC 3550 §6.4.1) over the first packet of each frame, in ms.
    pub jitter_ms: f64,
    /// One-way delay estimate in ms, relative: smoothed `arrival − timestamp` minus its
    /// minimum (the clocks are not synchronised, so this is queueing delay above the best seen).
    pub delay_ms: f64,
    /// Received bitrate over the last second, in bit/s.
    pub bitrate_bps: u64,
    /// How long the jitter buffer currently holds frames beyond the fastest transit, in ms:
    /// the configured target, raised to cover the delay spread seen (up to the maximum).
    pub target_delay_ms: f64,
    /// The median of every packet's relative one-way delay (as `delay_ms`, unsmoothed) since
    /// the call started, in ms (5 ms resolution).
    pub delay_p50_ms: f64,
    /// Its 95th percentile, in ms (5 ms resolution; 1 s or more counts as 1 s).
    pub delay_p95_ms: f64,
}

/// What the sender did on one track.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SendStats {
    /// Packets handed out by `poll_transmit`.
    pub packets_sent: u64,
    /// Bytes of those packets.
    pub bytes_sent: u64,
    /// Frames whose last packet was sent.
    pub frames_sent: u64,
    /// Frames dropped before sending (congestion, queue limits, waiting for a key frame).
    pub frames_dropped: u64,
    /// Frames waiting in the queue now (the one being sent included).
    pub frames_queued: u64,
    /// Bytes waiting in the queue now.
    pub bytes_queued: u64,
}

/// Bytes over a sliding window, in ten buckets.
#[derive(Debug, Clone)]
pub(crate) struct RateMeter {
    epoch: Instant,
    bucket: Duration,
    /// Index (since `epoch`) of the newest bucket.
    head: u64,
    bytes: [u64; 10],
}

impl RateMeter {
    pub(crate) fn new(epoch: Instant, window: Duration) -> Self {
        Self {
            epoch,
            bucket: (window / 10).max(Duration::from_millis(1)),
            head: 0,
            bytes: [0; 10],
        }
    }

    fn advance(&mut self, now: Instant) {
        let index = (now.saturating_duration_since(self.epoch).as_nanos() / self.bucket.as_nanos()) as u64;
        if index <= self.head {
            return;
        }
        let clear = (index - self.head).min(10);
        for i in 1..=clear {
            self.bytes[((self.head + i) % 10) as usize] = 0;
        }
        self.head = index;
    }

    pub(crate) fn add(&mut self, now: Instant, bytes: usize) {
        self.advance(now);
        self.bytes[(self.head % 10) as usize] += bytes as u64;
    }

    /// Bits per second over the window ending at `now`.
    pub(crate) fn rate_bps(&self, now: Instant) -> u64 {
        let mut meter = self.clone();
        meter.advance(now);
        let window = meter.bucket * 10;
        (meter.bytes.iter().sum::<u64>() as f64 * 8.0 / window.as_secs_f64()) as u64
    }
}

/// RFC 3550 interarrival jitter and the relative one-way delay, in microseconds.
#[derive(Debug, Clone, Default)]
pub(crate) struct DelayEstimator {
    last_transit: Option<i64>,
    jitter_us: f64,
    /// Minimum transit of the current and previous window (a windowed minimum follows
    /// clock drift).
    min_current: Option<i64>,
    min_previous: Option<i64>,
    /// Largest transit above the minimum, in the current and previous window: the delay
    /// spread the jitter buffer must cover.
    spread_current: i64,
    spread_previous: i64,
    window_start_us: i64,
    smoothed_us: Option<f64>,
    /// Every packet's relative delay, in [`HIST_BUCKET_US`] buckets (the last one: beyond).
    histogram: Histogram,
}

/// How often the minimum transit starts afresh (two windows are kept).
const MIN_WINDOW_US: i64 = 10_000_000;
/// Width of a delay histogram bucket.
const HIST_BUCKET_US: i64 = 5_000;
/// Buckets: 0–1 s in 5 ms steps, then one for everything beyond.
const HIST_BUCKETS: usize = 201;

/// Counts of relative delays, for percentiles (fixed memory: 804 bytes a track).
#[derive(Debug, Clone)]
struct Histogram([u32; HIST_BUCKETS]);

impl Default for Histogram {
    fn default() -> Self {
        Self([0; HIST_BUCKETS])
    }
}

impl Histogram {
    fn add(&mut self, us: i64) {
        let i = usize::try_from(us.max(0) / HIST_BUCKET_US).unwrap_or(usize::MAX);
        let slot = &mut self.0[i.min(HIST_BUCKETS - 1)];
        *slot = slot.saturating_add(1);
    }

    /// The `q` quantile (0–1) in ms: the upper edge of its bucket.
    fn quantile_ms(&self, q: f64) -> f64 {
        let total: u64 = self.0.iter().map(|&n| u64::from(n)).sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &n) in self.0.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                return ((i as i64 + 1).min(HIST_BUCKETS as i64 - 1) * HIST_BUCKET_US) as f64 / 1000.0;
            }
        }
        ((HIST_BUCKETS - 1) as i64 * HIST_BUCKET_US) as f64 / 1000.0
    }
}

impl DelayEstimator {
    /// A packet arrived at `arrival_us` (receiver clock) with media time `timestamp_us`.
    pub(crate) fn on_packet(&mut self, arrival_us: i64, timestamp_us: i64, first_of_frame: bool) {
        let transit = arrival_us - timestamp_us;
        if arrival_us - self.window_start_us >= MIN_WINDOW_US {
            self.min_previous = self.min_current.take();
            self.spread_previous = std::mem::take(&mut self.spread_current);
            self.window_start_us = arrival_us;
        }
        self.min_current = Some(self.min_current.map_or(transit, |m| m.min(transit)));
        let relative_us = transit - self.min_transit().unwrap_or(transit);
        self.spread_current = self.spread_current.max(relative_us);
        self.histogram.add(relative_us);
        let relative = relative_us as f64;
        self.smoothed_us = Some(match self.smoothed_us {
            None => relative,
            Some(s) => s + (relative - s) / 16.0,
        });
        if first_of_frame {
            if let Some(last) = self.last_transit {
                let d = (transit - last).abs() as f64;
                self.jitter_us += (d - self.jitter_us) / 16.0;
            }
            self.last_transit = Some(transit);
        }
    }

    /// The smallest `arrival − timestamp` seen recently.
    pub(crate) fn min_transit(&self) -> Option<i64> {
        match (self.min_current, self.min_previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The largest transit above the minimum seen recently (10–20 s), in µs.
    pub(crate) fn spread_us(&self) -> i64 {
        self.spread_current.max(self.spread_previous)
    }

    pub(crate) fn jitter_ms(&self) -> f64 {
        self.jitter_us / 1000.0
    }

    pub(crate) fn delay_ms(&self) -> f64 {
        self.smoothed_us.unwrap_or(0.0) / 1000.0
    }

    /// The `q` quantile (0–1) of every packet's relative delay so far, in ms.
    pub(crate) fn delay_quantile_ms(&self, q: f64) -> f64 {
        self.histogram.quantile_ms(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_meter_forgets_after_the_window() {
        let t0 = crate::test_origin();
        let mut m = RateMeter::new(t0, Duration::from_secs(1));
        for i in 0..10 {
            m.add(t0 + Duration::from_millis(i * 100), 12_500);
        }
        let r = m.rate_bps(t0 + Duration::from_millis(950));
        assert_eq!(r, 1_000_000);
        assert_eq!(m.rate_bps(t0 + Duration::from_secs(3)), 0);
    }

    #[test]
    fn constant_transit_has_no_jitter_and_delay_tracks_queueing() {
        let mut d = DelayEstimator::default();
        for i in 0..100 {
            d.on_packet(5_000 + i * 20_000, i * 20_000, true);
        }
        assert_eq!(d.jitter_ms(), 0.0);
        assert_eq!(d.delay_ms(), 0.0);
        for i in 100..200 {
            d.on_packet(45_000 + i * 20_000, i * 20_000, true);
        }
        assert!((d.delay_ms() - 40.0).abs() < 0.5, "{}", d.delay_ms());
    }

    #[test]
    fn the_spread_is_the_largest_transit_above_the_minimum_and_is_forgotten() {
        let mut d = DelayEstimator::default();
        for i in 0..100 {
            let extra = [0, 70_000, 10_000, 35_000][i as usize % 4];
            d.on_packet(extra + i * 20_000, i * 20_000, true);
        }
        assert_eq!(d.spread_us(), 70_000);
        // Two quiet windows later the spread is gone.
        for i in 100..1200 {
            d.on_packet(i * 20_000, i * 20_000, true);
        }
        assert_eq!(d.spread_us(), 0);
    }

    #[test]
    fn delay_percentiles_come_from_every_packet() {
        let mut d = DelayEstimator::default();
        // 90 packets at the minimum, 10 queued 52 ms behind it.
        for i in 0..100 {
            let extra = if i % 10 == 9 { 52_000 } else { 0 };
            d.on_packet(extra + i * 20_000, i * 20_000, true);
        }
        assert_eq!(d.delay_quantile_ms(0.5), 5.0, "the median sits in the first bucket");
        assert_eq!(d.delay_quantile_ms(0.95), 55.0);
        assert_eq!(DelayEstimator::default().delay_quantile_ms(0.95), 0.0);
    }

    #[test]
    fn alternating_transit_gives_jitter() {
        let mut d = DelayEstimator::default();
        for i in 0..500 {
            let extra = if i % 2 == 0 { 0 } else { 10_000 };
            d.on_packet(extra + i * 20_000, i * 20_000, true);
        }
        assert!((d.jitter_ms() - 10.0).abs() < 0.5, "{}", d.jitter_ms());
    }
}
