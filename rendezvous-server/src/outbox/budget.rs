//! What a receiver can take, told to the senders that relay to it (an SFU's REMB).
//!
//! The outbox already knows how fast its client drains: the client acknowledges what it reads
//! ([`natcall_proto::control::ClientMsg::RelayAck`]). While that client is the bottleneck —
//! relay frames keep finding it busy, or its buffer had to drop some — the rate it drained over
//! the last interval is what the senders may send it, shared out max-min fairly among the calls
//! that relay to it. Each sender is then told its share
//! ([`natcall_proto::control::ServerMsg::RelayBudget`]) and its rate controller takes the
//! minimum of that and its own estimate, so a slow receiver slows its senders before their
//! frames are dropped here, rather than after.
//!
//! Data flow (all under the outbox's lock, no timers of its own):
//! 1. [`Budget::on_pushed`] for every relay frame in (bytes per call, whether the client was
//!    busy), [`Budget::on_dropped`] for every frame the class policy drops;
//! 2. [`Budget::on_acked`]: the bytes of the frames the client acknowledged (the outbox matches
//!    acknowledgements with the frames written) are what it drained;
//! 3. when an interval has passed, the next push closes it ([`Budget::tick`]): if the client
//!    was limited, each call's budget — from what it drained over the last five intervals, so
//!    one interval in which its TCP connection stalled does not read as its capacity — is
//!    computed and held until that call's sender next sends a frame ([`Budget::take`]), which
//!    is when the server answers it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Budgets are not given below this (bit/s): a budget is a cap, and audio alone needs about
/// this much.
const FLOOR_BPS: u64 = 32_000;
/// A budget leaves this share of the drain rate unused, so the waiting frames can drain.
const HEADROOM: f64 = 0.9;
/// With drops in the interval the buffer is over its bounds: a larger margin.
const HEADROOM_AFTER_DROPS: f64 = 0.8;
/// The drain rate is measured over this many intervals (500 ms at the default 100 ms).
const DRAIN_INTERVALS: usize = 5;

/// One closed interval.
#[derive(Debug, Clone, Copy)]
struct Drained {
    /// Bytes the client acknowledged.
    acked: u64,
    time: Duration,
}

/// One call's traffic into this client during the current interval.
#[derive(Debug, Clone, Copy)]
struct CallInput {
    call: u32,
    bytes: u64,
    dropped: u32,
}

/// A budget waiting for its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The call (its id on this server).
    pub call: u32,
    /// What its sender may send, bit/s.
    pub bps: u64,
    /// Its frames dropped here in the interval.
    pub dropped: u32,
}

/// One client's drain measurement and the budgets derived from it.
#[derive(Debug)]
pub(crate) struct Budget {
    interval: Duration,
    /// Bytes acknowledged since the interval began.
    acked: u64,
    /// What the last intervals took in and drained, newest last.
    drained: VecDeque<Drained>,
    started: Option<Instant>,
    pushes: u32,
    busy_pushes: u32,
    inputs: Vec<CallInput>,
    ready: Vec<Grant>,
}

impl Budget {
    /// `interval` zero turns budgets off.
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            acked: 0,
            drained: VecDeque::new(),
            started: None,
            pushes: 0,
            busy_pushes: 0,
            inputs: Vec::new(),
            ready: Vec::new(),
        }
    }

    /// A relay frame of `call` (`bytes` long; `media`: audio or video) arrived for this client;
    /// `busy`: the client's window was full.
    pub(crate) fn on_pushed(&mut self, now: Instant, call: u32, bytes: usize, busy: bool) {
        if self.interval.is_zero() {
            return;
        }
        self.started.get_or_insert(now);
        self.pushes += 1;
        self.busy_pushes += u32::from(busy);
        self.input(call).bytes += bytes as u64;
    }

    /// The class policy dropped a frame of `call`.
    pub(crate) fn on_dropped(&mut self, call: u32) {
        if !self.interval.is_zero() {
            self.input(call).dropped += 1;
        }
    }

    /// The client acknowledged frames of `bytes` in all.
    pub(crate) fn on_acked(&mut self, bytes: u64) {
        if !self.interval.is_zero() {
            self.acked += bytes;
        }
    }

    /// Closes the interval if it is over: when the client was limited in it, computes each
    /// call's budget.
    pub(crate) fn tick(&mut self, now: Instant) {
        let Some(started) = self.started else { return };
        let elapsed = now.saturating_duration_since(started);
        if elapsed < self.interval {
            return;
        }
        let dropped = self.inputs.iter().any(|c| c.dropped > 0);
        self.drained.push_back(Drained {
            acked: self.acked,
            time: elapsed,
        });
        while self.drained.len() > DRAIN_INTERVALS {
            self.drained.pop_front();
        }
        // Over the last few intervals: a TCP connection that stalls for one interval (a
        // retransmission) drains nothing in it, which is not what the client can take.
        let (bytes, time) = self
            .drained
            .iter()
            .fold((0u64, Duration::ZERO), |(b, t), d| (b + d.acked, t + d.time));
        let limited = dropped || self.busy_pushes * 2 >= self.pushes.max(1);
        if limited && bytes > 0 {
            let drain = bytes as f64 * 8.0 / time.as_secs_f64().max(1e-3);
            let headroom = if dropped { HEADROOM_AFTER_DROPS } else { HEADROOM };
            self.ready = share(drain * headroom, &self.inputs, elapsed);
        }
        self.started = None;
        self.pushes = 0;
        self.busy_pushes = 0;
        self.acked = 0;
        self.inputs.clear();
    }

    /// The budget waiting for `call`'s sender, if any.
    pub(crate) fn take(&mut self, call: u32) -> Option<Grant> {
        let i = self.ready.iter().position(|g| g.call == call)?;
        Some(self.ready.swap_remove(i))
    }

    fn input(&mut self, call: u32) -> &mut CallInput {
        let i = match self.inputs.iter().position(|c| c.call == call) {
            Some(i) => i,
            None => {
                self.inputs.push(CallInput {
                    call,
                    bytes: 0,
                    dropped: 0,
                });
                self.inputs.len() - 1
            }
        };
        &mut self.inputs[i]
    }
}

/// Shares `capacity` (bit/s) max-min fairly among the calls' input rates over `elapsed`: a
/// call that sends less than an equal share is not capped below that share; the others split
/// what is left.
fn share(capacity: f64, inputs: &[CallInput], elapsed: Duration) -> Vec<Grant> {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mut demands: Vec<(usize, f64)> = inputs
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.bytes as f64 * 8.0 / secs))
        .collect();
    demands.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut left = capacity;
    let mut out = vec![0.0; inputs.len()];
    let n = demands.len();
    for (k, (i, demand)) in demands.into_iter().enumerate() {
        let fair = left / (n - k) as f64;
        // Below its fair share a call is not the problem: it may grow up to that share.
        out[i] = fair.max(0.0);
        left -= demand.min(fair);
    }
    inputs
        .iter()
        .zip(out)
        .map(|(c, bps)| Grant {
            call: c.call,
            bps: (bps as u64).max(FLOOR_BPS),
            dropped: c.dropped,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A client that drains `drain_bps` while `senders` push their rates (bit/s) in 500-byte
    /// frames for one interval, busy whenever something waits.
    fn interval(b: &mut Budget, t0: Instant, senders: &[(u32, u64)], drain_bps: u64) {
        for &(call, _) in senders {
            b.on_pushed(t0, call, 0, true); // the interval starts at t0
        }
        for ms in 0..100u64 {
            let now = t0 + MS * ms as u32;
            for &(call, bps) in senders {
                // bps / 8 / 1000 bytes a millisecond, in whole 500-byte frames.
                let due = (bps * (ms + 1) / 8_000 / 500) - (bps * ms / 8_000 / 500);
                for _ in 0..due {
                    b.on_pushed(now, call, 500, true);
                }
            }
            let drained = (drain_bps * (ms + 1) / 8_000 / 500) - (drain_bps * ms / 8_000 / 500);
            for _ in 0..drained {
                b.on_acked(500);
            }
        }
        b.tick(t0 + MS * 100);
    }

    #[test]
    fn a_limited_client_gives_its_sender_the_rate_it_drains() {
        let mut b = Budget::new(100 * MS);
        interval(&mut b, Instant::now(), &[(7, 2_000_000)], 400_000);
        let g = b.take(7).expect("a budget for call 7");
        assert!((340_000..=380_000).contains(&g.bps), "{g:?}");
        assert_eq!(b.take(7), None, "given once");
    }

    #[test]
    fn a_client_that_keeps_up_gives_no_budget() {
        let mut b = Budget::new(100 * MS);
        let t0 = Instant::now();
        for ms in 0..101u32 {
            b.on_pushed(t0 + MS * ms, 7, 500, false);
            b.on_acked(500);
        }
        assert_eq!(b.take(7), None);
    }

    #[test]
    fn drops_lower_the_budget_and_are_reported() {
        let mut b = Budget::new(100 * MS);
        let t0 = Instant::now();
        b.on_dropped(7);
        b.on_dropped(7);
        interval(&mut b, t0, &[(7, 1_000_000)], 400_000);
        let g = b.take(7).unwrap();
        assert_eq!(g.dropped, 2);
        assert!((300_000..=340_000).contains(&g.bps), "{g:?}");
    }

    #[test]
    fn a_small_sender_is_not_capped_below_its_fair_share() {
        let mut b = Budget::new(100 * MS);
        interval(&mut b, Instant::now(), &[(1, 2_000_000), (2, 80_000)], 400_000);
        let (big, small) = (b.take(1).unwrap(), b.take(2).unwrap());
        // 360 kbit/s to share: the small sender keeps room up to half, the big one gets the rest.
        assert!((170_000..=190_000).contains(&small.bps), "{small:?}");
        assert!((270_000..=300_000).contains(&big.bps), "{big:?}");
    }

    #[test]
    fn zero_interval_turns_budgets_off() {
        let mut b = Budget::new(Duration::ZERO);
        interval(&mut b, Instant::now(), &[(7, 2_000_000)], 400_000);
        assert_eq!(b.take(7), None);
        assert_eq!(b.acked, 0, "nothing counted");
    }
}
