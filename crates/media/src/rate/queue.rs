//! The queue on the path, from one-way transit times, and whether a loss-based flow keeps it
//! full.
//!
//! A packet's transit is `arrival − send`, on two clocks: only differences mean something. The
//! path's base transit is the smallest seen over the last 10–20 s (two windows, so clock
//! drift and route changes are followed); the queue delay is a packet's transit above it,
//! smoothed.
//!
//! A delay-based controller shares a link badly with a loss-based flow (a TCP download): the
//! download fills the bottleneck's buffer whatever the call does, the call reads the standing
//! queue as its own overuse and backs off until it starves. So when the queue stays above
//! [`COMPETING_QUEUE`] for [`COMPETING_AFTER`] although the call backed off by a fifth or more
//! in that time (a queue of its own would have drained), the queue is someone else's: the
//! controller stops reacting to delay and is bounded by loss alone (as TCP is), until the queue
//! falls below [`CLEAR_QUEUE`] (SCReAM and NADA switch modes the same way).

use std::time::{Duration, Instant};

/// The base transit is the minimum over windows of this length (two kept).
const BASE_WINDOW: Duration = Duration::from_secs(10);
/// A standing queue this deep…
const COMPETING_QUEUE: f64 = 50_000.0;
/// …for this long, despite a decrease to [`BACKED_OFF`] of the target within it, is another
/// flow's.
const COMPETING_AFTER: Duration = Duration::from_secs(2);
const BACKED_OFF: f64 = 0.8;
/// Below this queue the path is ours again.
const CLEAR_QUEUE: f64 = 20_000.0;

/// The path's queue delay and the competing-flow verdict.
#[derive(Debug)]
pub(super) struct QueueDelay {
    /// The origin of send times.
    epoch: Instant,
    base: [Option<i64>; 2],
    window_start: Option<Instant>,
    /// Smoothed queue delay, µs.
    smoothed: f64,
    /// Since when the queue has been above [`COMPETING_QUEUE`], and the target then.
    deep_since: Option<(Instant, f64)>,
    competing: bool,
}

impl QueueDelay {
    pub(super) fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            base: [None, None],
            window_start: None,
            smoothed: 0.0,
            deep_since: None,
            competing: false,
        }
    }

    /// A packet's transit, µs (arrival on the receiver's clock less send time on ours).
    pub(super) fn transit(&self, sent: Instant, arrival_us: u64) -> i64 {
        arrival_us as i64 - sent.saturating_duration_since(self.epoch).as_micros() as i64
    }

    /// A packet sent at `sent` arrived at `arrival_us`.
    pub(super) fn on_acked(&mut self, sent: Instant, arrival_us: u64) {
        let transit = self.transit(sent, arrival_us);
        let start = *self.window_start.get_or_insert(sent);
        if sent.saturating_duration_since(start) >= BASE_WINDOW {
            self.base = [None, self.base[0]];
            self.window_start = Some(sent);
        }
        self.base[0] = Some(self.base[0].map_or(transit, |b| b.min(transit)));
        let queue = self.base().map_or(0, |b| transit - b) as f64;
        self.smoothed += (queue - self.smoothed) / 16.0;
    }

    /// The path's base transit, µs.
    pub(super) fn base(&self) -> Option<i64> {
        self.base.iter().flatten().copied().min()
    }

    /// The smoothed queue delay, ms.
    pub(super) fn queue_ms(&self) -> f64 {
        self.smoothed / 1000.0
    }

    /// Updates the competing-flow verdict at `now`, with the controller's `target`.
    pub(super) fn update(&mut self, now: Instant, target: f64) -> bool {
        if self.smoothed < CLEAR_QUEUE {
            self.deep_since = None;
            self.competing = false;
        } else if self.smoothed > COMPETING_QUEUE {
            let (since, then) = *self.deep_since.get_or_insert((now, target));
            if now.saturating_duration_since(since) >= COMPETING_AFTER && target <= BACKED_OFF * then {
                self.competing = true;
            }
        }
        self.competing
    }

    /// Whether a loss-based flow keeps the queue full.
    pub(super) fn competing(&self) -> bool {
        self.competing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_standing_queue_that_survives_a_decrease_is_another_flows() {
        let t0 = crate::test_origin();
        let mut q = QueueDelay::new(t0);
        // 1 s at the base transit (5 ms), then a 120 ms standing queue.
        for ms in 0..1000u32 {
            q.on_acked(t0 + MS * ms, u64::from(ms) * 1000 + 5_000);
        }
        assert!(q.queue_ms() < 1.0);
        let mut competing_at = None;
        for ms in 1000..5000u32 {
            let now = t0 + MS * ms;
            q.on_acked(now, u64::from(ms) * 1000 + 125_000);
            // The controller backs off to 70 % at 2 s.
            let target = if ms >= 2000 { 700_000.0 } else { 1_000_000.0 };
            if q.update(now, target) && competing_at.is_none() {
                competing_at = Some(ms);
            }
        }
        let at = competing_at.expect("competing");
        assert!((3000..3200).contains(&at), "{at}");
        // The queue goes: ours again.
        for ms in 5000..6000u32 {
            q.on_acked(t0 + MS * ms, u64::from(ms) * 1000 + 5_000);
        }
        assert!(!q.update(t0 + MS * 6000, 700_000.0));
    }

    #[test]
    fn a_queue_that_was_not_backed_off_from_is_not_called_competing() {
        let t0 = crate::test_origin();
        let mut q = QueueDelay::new(t0);
        q.on_acked(t0, 5_000);
        for ms in 1..4000u32 {
            let now = t0 + MS * ms;
            q.on_acked(now, u64::from(ms) * 1000 + 105_000);
            // Backed off by only a tenth: a queue of its own could still be draining.
            let target = if ms >= 1000 { 900_000.0 } else { 1_000_000.0 };
            assert!(!q.update(now, target), "at {ms} ms");
        }
    }
}
