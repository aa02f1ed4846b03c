//! What a receiver can take, told to the senders that relay to it (an SFU's REMB).
//!
//! The outbox already knows how fast its client drains: the client acknowledges what it reads
//! ([`natcall_proto::control::ClientMsg::RelayAck`]). While that client is the bottleneck —
//! relay frames keep finding it busy (drops alone do not count: see `tick`) — the rate it drained over
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
//!    one short interval does not read as its capacity — is computed and held until that
//!    call's sender next sends a frame ([`Budget::take`]), which is when the server answers it.
//!
//! A client whose TCP connection stalls (a retransmission timeout on a lossy link: 200 ms and
//! more in which nothing is delivered, then everything at once) drains nothing for a while and
//! then a burst, neither of which is what it can take. An acknowledgement later than twice the
//! round trip plus `STALL_SLACK` (100 ms) after it could have come is a stall. While one is
//! overdue by that measure no budget is given (the senders keep the last one, and their own
//! controllers see the loss and the delay); when it comes, the measurement starts over, and
//! the next budget is from at least `MIN_INTERVALS` intervals of draining after the stall.

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
/// A budget is from at least this many intervals of draining (after a start or a stall).
const MIN_INTERVALS: usize = 3;
/// An acknowledgement later than twice the round trip plus this marks a stall.
const STALL_SLACK: Duration = Duration::from_millis(100);

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
    /// When the last acknowledgement came.
    last_ack: Option<Instant>,
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
            last_ack: None,
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

    /// The client acknowledged, at `now`, frames of `bytes` in all, the last of them written
    /// at `written`; `rtt`: the client's round trip so far. When this acknowledgement ends a
    /// stall, returns how long the client was stalled (beyond a round trip).
    pub(crate) fn on_acked(
        &mut self,
        now: Instant,
        bytes: u64,
        written: Option<Instant>,
        rtt: Option<Duration>,
    ) -> Option<Duration> {
        if self.interval.is_zero() {
            return None;
        }
        self.acked += bytes;
        // The acknowledgement was due a round trip after the later of the last one and the
        // write of the frame that completed it (the client acknowledges every few frames).
        let due_from = match (self.last_ack, written) {
            (Some(a), Some(w)) => Some(a.max(w)),
            (a, w) => a.or(w),
        };
        self.last_ack = Some(now);
        let (from, rtt) = (due_from?, rtt?);
        let waited = now.saturating_duration_since(from);
        if waited <= rtt * 2 + STALL_SLACK {
            return None;
        }
        // What was drained before the stall and the burst that ends it say nothing of what
        // the client can take: measure again from here.
        self.drained.clear();
        self.acked = 0;
        self.started = Some(now);
        Some(waited - rtt)
    }

    /// Whether the client is stalled now: the acknowledgement of the frame written at
    /// `pending` (the one that completes the client's next acknowledgement, if written) is
    /// overdue by the measure of [`Budget::on_acked`].
    fn overdue(&self, now: Instant, pending: Option<Instant>, rtt: Option<Duration>) -> bool {
        let (Some(pending), Some(rtt)) = (pending, rtt) else {
            return false;
        };
        let from = self.last_ack.map_or(pending, |a| a.max(pending));
        now.saturating_duration_since(from) > rtt * 2 + STALL_SLACK
    }

    /// Closes the interval if it is over: when the client was limited in it and is not
    /// stalled now, computes each call's budget. `pending`: when the frame that completes the
    /// client's next acknowledgement was written, if it was; `rtt`: the client's round trip.
    pub(crate) fn tick(&mut self, now: Instant, pending: Option<Instant>, rtt: Option<Duration>) {
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
        // Over the last few intervals, so that one short interval is not read as capacity.
        let (bytes, time) = self
            .drained
            .iter()
            .fold((0u64, Duration::ZERO), |(b, t), d| (b + d.acked, t + d.time));
        // Limited: relay frames kept finding the client busy. Drops alone are not enough: a
        // client that mostly keeps up drains what its senders send, and a budget from that
        // would hold them there, lower at each drop, down to the floor (a call beside a
        // download through the relay once fell to 23 % of the link that way).
        let limited = self.busy_pushes * 2 >= self.pushes.max(1);
        // Stalled now: how long is not known until it ends, so the drain rate is not either.
        let measured = self.drained.len() >= MIN_INTERVALS;
        let stalled_now = self.overdue(now, pending, rtt);
        if limited && measured && !stalled_now && bytes > 0 {
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
                b.on_acked(now, 500, None, None);
            }
        }
        b.tick(t0 + MS * 100, None, None);
    }

    /// `MIN_INTERVALS - 1` intervals of [`interval`] from `t0` (nothing to give yet); returns
    /// when the next one starts.
    fn warm_up(b: &mut Budget, t0: Instant, senders: &[(u32, u64)], drain_bps: u64) -> Instant {
        let mut t = t0;
        for _ in 1..MIN_INTERVALS {
            interval(b, t, senders, drain_bps);
            for &(call, _) in senders {
                assert_eq!(b.take(call), None, "a budget from less than {MIN_INTERVALS} intervals");
            }
            t += MS * 100;
        }
        t
    }

    #[test]
    fn a_limited_client_gives_its_sender_the_rate_it_drains() {
        let mut b = Budget::new(100 * MS);
        let t = warm_up(&mut b, Instant::now(), &[(7, 2_000_000)], 400_000);
        interval(&mut b, t, &[(7, 2_000_000)], 400_000);
        let g = b.take(7).expect("a budget for call 7");
        assert!((340_000..=380_000).contains(&g.bps), "{g:?}");
        assert_eq!(b.take(7), None, "given once");
    }

    #[test]
    fn a_client_that_keeps_up_gives_no_budget() {
        let mut b = Budget::new(100 * MS);
        let t0 = Instant::now();
        for ms in 0..401u32 {
            b.on_pushed(t0 + MS * ms, 7, 500, false);
            b.on_acked(t0 + MS * ms, 500, None, None);
            b.tick(t0 + MS * ms, None, None);
            assert_eq!(b.take(7), None);
        }
    }

    #[test]
    fn drops_lower_the_budget_and_are_reported() {
        let mut b = Budget::new(100 * MS);
        let t = warm_up(&mut b, Instant::now(), &[(7, 1_000_000)], 400_000);
        b.on_dropped(7);
        b.on_dropped(7);
        interval(&mut b, t, &[(7, 1_000_000)], 400_000);
        let g = b.take(7).unwrap();
        assert_eq!(g.dropped, 2);
        assert!((300_000..=340_000).contains(&g.bps), "{g:?}");
    }

    #[test]
    fn a_small_sender_is_not_capped_below_its_fair_share() {
        let mut b = Budget::new(100 * MS);
        let senders = [(1, 2_000_000), (2, 80_000)];
        let t = warm_up(&mut b, Instant::now(), &senders, 400_000);
        interval(&mut b, t, &senders, 400_000);
        let (big, small) = (b.take(1).unwrap(), b.take(2).unwrap());
        // 360 kbit/s to share: the small sender keeps room up to half, the big one gets the rest.
        assert!((170_000..=190_000).contains(&small.bps), "{small:?}");
        assert!((270_000..=300_000).contains(&big.bps), "{big:?}");
    }

    /// A client that drains 2 Mbit/s, acknowledging every 4 ms what was written 10 ms before,
    /// stalls for `stall_ms` from 300 ms (a retransmission timeout), then catches up; its
    /// sender pushes 2.4 Mbit/s into the buffer, which drops what does not fit. Returns the
    /// budgets given after the stall began.
    fn stalled_client(stall_ms: u64) -> Vec<Grant> {
        let mut b = Budget::new(100 * MS);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + MS * ms as u32;
        let rtt = Some(10 * MS);
        let mut grants = Vec::new();
        let (stall_from, stall_to) = (300, 300 + stall_ms);
        for ms in 0..1_500u64 {
            let now = at(ms);
            let stalled = (stall_from..stall_to).contains(&ms);
            b.on_pushed(now, 7, 300, stalled);
            if stalled {
                b.on_dropped(7);
            }
            if ms % 4 == 0 && !stalled {
                // 1 kB per 4 ms; the first acknowledgement after the stall brings what waited.
                let bytes = if ms == stall_to.next_multiple_of(4) {
                    30_000
                } else {
                    1_000
                };
                let written = at(ms.min(stall_from + 4).saturating_sub(10));
                b.on_acked(now, bytes, Some(written), rtt);
            }
            // The frame completing the next acknowledgement: written 6 ms ago, or, while the
            // client is stalled, just before the stall (the window is full since).
            let pending = at(if stalled { stall_from } else { ms }.saturating_sub(6));
            b.tick(now, Some(pending), rtt);
            if ms >= stall_from {
                grants.extend(b.take(7));
            }
        }
        grants
    }

    #[test]
    fn a_stall_is_not_read_as_the_clients_capacity() {
        for stall in [250, 400, 700] {
            let grants = stalled_client(stall);
            assert!(!grants.is_empty(), "the client was limited while it stalled");
            let low = grants.iter().map(|g| g.bps).min().unwrap();
            // Its drain rate is 2 Mbit/s; 80 % of that with drops. Until a stall is known
            // (an acknowledgement overdue by 2 round trips + 100 ms) some of it counts; all of
            // it would give a fifth or less of that, the burst after it far more.
            assert!(low >= 1_200_000, "{stall} ms stall: lowest budget {low} in {grants:?}");
            let high = grants.iter().map(|g| g.bps).max().unwrap();
            assert!(
                high <= 1_800_000,
                "{stall} ms stall: highest budget {high} in {grants:?}"
            );
        }
    }

    #[test]
    fn no_budget_while_an_acknowledgement_is_overdue() {
        let grants = stalled_client(2_000);
        // The stall lasts past the end: after the interval in which it is first noticed,
        // none.
        assert!(grants.len() <= 2, "{grants:?}");
    }

    #[test]
    fn the_stall_is_reported_and_a_client_that_only_stalls_gets_no_budget() {
        let mut b = Budget::new(100 * MS);
        let t0 = Instant::now();
        let rtt = Some(10 * MS);
        assert_eq!(b.on_acked(t0, 500, Some(t0 - MS * 10), rtt), None, "on time");
        for ms in 0..100u32 {
            b.on_pushed(t0 + MS * (700 + ms), 7, 500, true);
        }
        let stall = b.on_acked(t0 + MS * 800, 500, Some(t0), rtt);
        assert_eq!(stall, Some(790 * MS), "800 ms late, less the round trip");
        b.tick(t0 + MS * 800, None, rtt);
        assert_eq!(
            b.take(7),
            None,
            "measured again from the end of the stall: no budget yet"
        );
    }

    #[test]
    fn zero_interval_turns_budgets_off() {
        let mut b = Budget::new(Duration::ZERO);
        interval(&mut b, Instant::now(), &[(7, 2_000_000)], 400_000);
        assert_eq!(b.take(7), None);
        assert_eq!(b.acked, 0, "nothing counted");
    }
}
