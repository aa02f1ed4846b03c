//! The rate controller against simulated links.

use super::*;
use crate::feedback::{Arrival, TrackCount};

/// A bottleneck: `capacity` bit/s, a FIFO of at most `queue` bytes (tail drop), `delay` one
/// way, random loss with probability `loss`.
struct Link {
    capacity: f64,
    queue_limit: usize,
    delay: Duration,
    loss: f64,
    busy_until: Instant,
    queued: VecDeque<(Instant, usize)>,
    /// Nothing is delivered before this (a reliable transport retransmitting a lost segment
    /// holds everything behind it, then delivers it at once).
    hold_until: Option<Instant>,
    rng: u64,
}

impl Link {
    fn new(capacity: f64, now: Instant) -> Self {
        Self {
            capacity,
            queue_limit: 30_000,
            delay: Duration::from_millis(20),
            loss: 0.0,
            busy_until: now,
            queued: VecDeque::new(),
            hold_until: None,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn random(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// When the packet arrives, or `None` if dropped.
    fn send(&mut self, now: Instant, size: usize) -> Option<Instant> {
        while self.queued.front().is_some_and(|&(done, _)| done <= now) {
            self.queued.pop_front();
        }
        if self.random() < self.loss {
            return None;
        }
        let backlog: usize = self.queued.iter().map(|&(_, s)| s).sum();
        if backlog + size > self.queue_limit {
            return None;
        }
        let start = self.busy_until.max(now);
        let done = start + Duration::from_secs_f64(size as f64 * 8.0 / self.capacity);
        self.busy_until = done;
        self.queued.push_back((done, size));
        Some((done + self.delay).max(self.hold_until.unwrap_or(now)))
    }
}

/// Runs a source that sends what the controller allows (500-byte packets, paced at the
/// target, 20 ms audio packets on top) through `link` for `secs`, with feedback every
/// 40 ms; `change(t, link)` may alter the link. Returns the target every 100 ms.
fn simulate(secs: f64, link: &mut Link, change: impl FnMut(f64, &mut Link)) -> Vec<(f64, u64)> {
    simulate_on(secs, link, false, change)
}

/// [`simulate`] on a path that delivers in bursts (`bursty`: the relay) or not.
fn simulate_on(secs: f64, link: &mut Link, bursty: bool, change: impl FnMut(f64, &mut Link)) -> Vec<(f64, u64)> {
    simulate_rtt(secs, link, bursty, Duration::from_millis(40), change)
}

/// [`simulate_on`] with the controller told the round trip is `rtt`.
fn simulate_rtt(
    secs: f64,
    link: &mut Link,
    bursty: bool,
    rtt: Duration,
    change: impl FnMut(f64, &mut Link),
) -> Vec<(f64, u64)> {
    simulate_full(secs, link, bursty, rtt, change, |_, _| {}).0
}

/// [`simulate_rtt`] with `control(t, controller)` called every millisecond; also returns the
/// controller.
fn simulate_full(
    secs: f64,
    link: &mut Link,
    bursty: bool,
    rtt: Duration,
    mut change: impl FnMut(f64, &mut Link),
    mut control: impl FnMut(f64, &mut RateController),
) -> (Vec<(f64, u64)>, RateController) {
    let t0 = crate::test_origin();
    let mut c = RateController::new(RateConfig::default(), t0);
    c.set_bursty_path(bursty);
    c.set_rtt(rtt);
    let step = Duration::from_millis(1);
    let mut pending: VecDeque<(Instant, Track, u32, usize)> = VecDeque::new();
    let (mut seq_a, mut seq_v) = (0u32, 0u32);
    let mut credit = 0.0;
    let (mut counts, mut bytes, mut arrivals) = (Vec::<TrackCount>::new(), 0u64, Vec::<Arrival>::new());
    let mut fb_seq = 0u16;
    let mut out = Vec::new();
    let mut now = t0;
    let mut ms = 0u64;
    // A probe being sent: (id, rate, bytes left). The source always has data, so a probe is
    // the same packets sent faster.
    let mut probe: Option<(u32, f64, f64)> = None;
    while (ms as f64) < secs * 1000.0 {
        change(ms as f64 / 1000.0, link);
        control(ms as f64 / 1000.0, &mut c);
        if probe.is_none()
            && let Some(p) = c.poll_probe(now)
        {
            probe = Some((p.id, p.rate_bps as f64, p.bytes as f64));
        }
        let pace = probe.map_or(0.0, |p| p.1).max(c.target_bps() as f64);
        credit += pace / 8.0 / 1000.0;
        let mut sends = Vec::new();
        if ms % 20 == 0 {
            sends.push((Track::AUDIO, seq_a, 120));
            seq_a += 1;
            credit -= 120.0;
        }
        while credit >= 500.0 {
            sends.push((Track::VIDEO, seq_v, 500));
            seq_v += 1;
            credit -= 500.0;
        }
        credit = credit.min(1_000.0);
        for (track, seq, size) in sends {
            c.on_sent(now, track, seq, size, probe.map(|p| p.0));
            if let Some((id, _, left)) = probe.as_mut() {
                *left -= size as f64;
                if *left <= 0.0 {
                    c.probe_sent(now, *id);
                    probe = None;
                }
            }
            if let Some(at) = link.send(now, size) {
                pending.push_back((at, track, seq, size));
            }
        }
        while pending.front().is_some_and(|p| p.0 <= now) {
            let (at, track, seq, size) = pending.pop_front().unwrap();
            bytes += size as u64;
            let at_us = at.duration_since(t0).as_micros() as u64;
            match counts.iter_mut().find(|c| c.track == track) {
                Some(c) => {
                    c.highest = c.highest.max(seq);
                    c.received += 1;
                }
                None => counts.push(TrackCount {
                    track,
                    highest: seq,
                    received: 1,
                }),
            }
            arrivals.push(Arrival {
                track,
                sequence: seq,
                at_us,
            });
        }
        // As the receiver does, feedback only when something arrived since the last.
        if ms % 40 == 0 && !arrivals.is_empty() {
            // Feedback takes the link's delay back (uncongested reverse path).
            let f = Feedback {
                seq: fb_seq,
                received_bytes: bytes,
                at_us: now.duration_since(t0).as_micros() as u64,
                counts: counts.clone(),
                arrivals: std::mem::take(&mut arrivals)
                    .into_iter()
                    .rev()
                    .take(crate::feedback::MAX_ARRIVALS)
                    .rev()
                    .collect(),
            };
            fb_seq = fb_seq.wrapping_add(1);
            c.handle_feedback(now + link.delay, &f);
        }
        c.handle_timeout(now);
        if ms % 100 == 0 {
            out.push((ms as f64 / 1000.0, c.target_bps()));
        }
        ms += 1;
        now += step;
    }
    (out, c)
}

fn target_at(trace: &[(f64, u64)], t: f64) -> u64 {
    trace.iter().rev().find(|(at, _)| *at <= t).map_or(0, |(_, r)| *r)
}

/// The lowest target in `from..to` (seconds).
fn lowest(trace: &[(f64, u64)], from: f64, to: f64) -> f64 {
    trace
        .iter()
        .filter(|&&(t, _)| (from..to).contains(&t))
        .map(|&(_, r)| r)
        .min()
        .expect("targets in the window") as f64
}

#[test]
fn the_target_settles_under_a_400_kbit_bottleneck_within_5_s() {
    let t0 = crate::test_origin();
    let mut link = Link::new(400_000.0, t0);
    let trace = simulate(15.0, &mut link, |_, _| {});
    // Probing near the estimate goes up to 10 % over before the queue says so: this link's
    // FIFO holds 600 ms, so a slow overshoot grows the delay slowly (the simulated link
    // counts payload bytes only; on a real one headers take ~8 % more, and the lab's
    // tests hold the target under the cap).
    for (t, r) in trace.iter().filter(|(t, _)| *t >= 5.0) {
        assert!((240_000..=440_000).contains(r), "target {r} at {t} s: {trace:?}");
    }
}

#[test]
fn the_target_follows_a_cap_that_drops_and_comes_back() {
    let t0 = crate::test_origin();
    let mut link = Link::new(2_000_000.0, t0);
    let trace = simulate(24.0, &mut link, |t, l| {
        l.capacity = if (8.0..16.0).contains(&t) {
            300_000.0
        } else {
            2_000_000.0
        };
    });
    let before = target_at(&trace, 7.9);
    assert!(before >= 1_200_000, "before the drop: {before}: {trace:?}");
    let low = target_at(&trace, 13.0);
    assert!(
        (180_000..=300_000).contains(&low),
        "5 s after the drop: {low}: {trace:?}"
    );
    let back = target_at(&trace, 21.0);
    assert!(back >= 1_200_000, "5 s after the cap lifted: {back}: {trace:?}");
}

#[test]
fn two_percent_random_loss_does_not_collapse_the_target() {
    let t0 = crate::test_origin();
    let mut clean = Link::new(1e9, t0);
    let reference = target_at(&simulate(10.0, &mut clean, |_, _| {}), 9.9);
    let mut lossy = Link::new(1e9, t0);
    lossy.loss = 0.02;
    let trace = simulate(10.0, &mut lossy, |_, _| {});
    for t in [5.0, 7.0, 9.9] {
        let r = target_at(&trace, t);
        assert!(
            r as f64 >= 0.8 * reference as f64,
            "{r} vs {reference} at {t} s: {trace:?}"
        );
    }
}

#[test]
fn a_reliable_transports_stalls_do_not_cut_the_target() {
    // The relay path is TCP: a lost segment holds everything behind it for a retransmission
    // timeout (200 ms), then it all arrives at once. That is no queue of ours to drain: the
    // burst is one group for the delay detector. (Read as a queue that grew and drained, each
    // stall cut the target by 11 %, and it took a second to grow back.)
    let t0 = crate::test_origin();
    let stalls = |t: f64, l: &mut Link| {
        let ms = (t * 1000.0).round() as u64;
        if ms > 0 && ms % 1500 == 0 {
            l.hold_until = Some(t0 + Duration::from_millis(ms + 200));
        }
    };
    // The lowest target from 2 s on against the highest before it.
    let dip = |trace: &[(f64, u64)]| {
        let mut highest = 0u64;
        let mut worst = f64::INFINITY;
        for &(t, r) in trace {
            if t >= 2.0 {
                worst = worst.min(r as f64 / highest as f64);
            }
            highest = highest.max(r);
        }
        worst
    };
    let relay = simulate_on(10.0, &mut Link::new(1e9, t0), true, stalls);
    assert!(dip(&relay) >= 0.95, "{relay:?}");
    // On UDP the rule stays off (it would hide a queue building behind a shaper): the same
    // stalls read as queues there.
    let udp = simulate_on(10.0, &mut Link::new(1e9, t0), false, stalls);
    assert!(dip(&udp) < 0.95, "the rule is off on UDP: {udp:?}");
}

#[test]
fn a_relay_stall_and_the_drops_behind_it_do_not_cut_the_target() {
    // The relay's TCP connection to the receiver waits out retransmission timeouts (200 +
    // 400 ms): nothing arrives for 650 ms, then the frames the relay held arrive at once; those
    // that came after its buffer filled were dropped, and video stays skipped until a key frame
    // (here: most packets for 800 ms after the stall). Seen in CI: read as congestion, those
    // losses cut the target to a quarter of what the link carried and it took seconds to
    // return. The rate was never the cause.
    let t0 = crate::test_origin();
    let stall = |t: f64, l: &mut Link| {
        if (5.0..5.001).contains(&t) {
            l.hold_until = Some(t0 + Duration::from_millis(5650));
        }
        l.loss = if (5.1..5.65).contains(&t) {
            1.0
        } else if (5.65..6.45).contains(&t) {
            0.8
        } else {
            0.0
        };
    };
    // The lowest target from `from` on against the target before the stall.
    let low_after = |trace: &[(f64, u64)], from: f64| lowest(trace, from, 9.0) / target_at(trace, 4.9) as f64;
    let relay = simulate_on(9.0, &mut Link::new(1e9, t0), true, stall);
    assert!(low_after(&relay, 5.0) >= 0.9, "{relay:?}");
    // Without a stall before them, the same losses are congestion's (a UDP path that lost
    // most of its packets for a second), and cut.
    let udp = simulate_on(9.0, &mut Link::new(1e9, t0), false, stall);
    assert!(low_after(&udp, 5.0) < 0.7, "{udp:?}");
    // A stall of 1.5 s (timeouts of 200, 400 and 800 ms) after which the relay had dropped
    // everything sent during it (audio past its deadline, video to a key frame): the first
    // packet to arrive was sent at its end. The receiver, with nothing arriving, sends no
    // feedback: on UDP that silence would halve the target after a second; on a bursty path
    // silence shorter than 3 s is the transport's.
    let dropped_all = |t: f64, l: &mut Link| l.loss = if (5.0..6.5).contains(&t) { 1.0 } else { 0.0 };
    let relay_dropped = simulate_on(9.0, &mut Link::new(1e9, t0), true, dropped_all);
    assert!(low_after(&relay_dropped, 5.0) >= 0.9, "{relay_dropped:?}");
    // Longer, and silence halves the target (at 8 s); the stall, once it shows, gives it back.
    let dead = |t: f64, l: &mut Link| l.loss = if (5.0..8.5).contains(&t) { 1.0 } else { 0.0 };
    let relay_dead = simulate_on(10.0, &mut Link::new(1e9, t0), true, dead);
    let before = target_at(&relay_dead, 4.9) as f64;
    assert!((target_at(&relay_dead, 8.2) as f64) < 0.75 * before, "{relay_dead:?}");
    assert!(target_at(&relay_dead, 9.0) as f64 >= 0.9 * before, "{relay_dead:?}");
    // And on the bursty path, loss with no stall still cuts.
    let lossy = |t: f64, l: &mut Link| l.loss = if (5.0..6.0).contains(&t) { 0.8 } else { 0.0 };
    let relay_loss = simulate_on(9.0, &mut Link::new(1e9, t0), true, lossy);
    assert!(low_after(&relay_loss, 5.0) < 0.7, "{relay_loss:?}");
}

#[test]
fn a_window_per_round_trip_on_a_long_relay_path_is_no_stall() {
    // A flow held to a window on a 300 ms path arrives once per round trip: gaps of 250 ms
    // between bursts. Those are not stalls, so loss there (the relay dropping for a slow
    // receiver) still cuts the target.
    let t0 = crate::test_origin();
    let windows = |t: f64, l: &mut Link| {
        let next = ((t / 0.25).floor() + 1.0) * 250.0;
        l.hold_until = Some(t0 + Duration::from_millis(next as u64));
        l.loss = if (5.0..6.0).contains(&t) { 0.3 } else { 0.0 };
    };
    let trace = simulate_rtt(8.0, &mut Link::new(1e9, t0), true, Duration::from_millis(300), windows);
    let before = target_at(&trace, 4.9) as f64;
    let low = lowest(&trace, 5.0, 8.0);
    assert!(low < 0.85 * before, "{low} after {before}: {trace:?}");
}

#[test]
fn moving_from_a_dead_direct_path_to_the_relay_is_no_stall() {
    // The direct path dies at 5 s (silence halves the target at 6 and 7 s); at 7.5 s media
    // moves to the relay. The last arrival on the direct path, 2.5 s before the first on the
    // relay, is no stall of the relay's: the halvings stay, loss is heard.
    let t0 = crate::test_origin();
    let dead = |t: f64, l: &mut Link| l.loss = if (5.0..7.5).contains(&t) { 1.0 } else { 0.0 };
    let (trace, c) = simulate_full(
        9.0,
        &mut Link::new(1e9, t0),
        false,
        Duration::from_millis(40),
        dead,
        |t, c| {
            if (7.5..7.501).contains(&t) {
                c.set_bursty_path(true);
                c.path_changed();
            }
        },
    );
    assert_eq!(c.state().stalls, 0, "{trace:?}");
    let halved = target_at(&trace, 7.4) as f64;
    assert!(halved < 0.5 * target_at(&trace, 4.9) as f64, "{trace:?}");
    assert!((target_at(&trace, 7.7) as f64) < 1.2 * halved, "{trace:?}");
}

#[test]
fn one_burst_of_loss_cuts_the_target_once() {
    let t0 = crate::test_origin();
    let mut link = Link::new(1e9, t0);
    // 60 % loss for 300 ms at 5 s (a wireless hiccup), none otherwise.
    let trace = simulate(7.0, &mut link, |t, l| {
        l.loss = if (5.0..5.3).contains(&t) { 0.6 } else { 0.0 };
    });
    let before = target_at(&trace, 4.9) as f64;
    let low = lowest(&trace, 5.0, 7.0);
    // The burst is 18 % of the second's packets: cut to about 80 % (82 % measured). Cutting
    // again every 300 ms while the burst is in the last second's loss took it to 72 %.
    assert!(low >= 0.77 * before, "{low} after {before}: {trace:?}");
    assert!(
        low <= 0.95 * before,
        "the burst cut the target: {low} after {before}: {trace:?}"
    );
}

#[test]
fn heavy_loss_cuts_the_target_and_silence_halves_it() {
    let t0 = crate::test_origin();
    let mut link = Link::new(1e9, t0);
    link.loss = 0.3;
    let trace = simulate(3.0, &mut link, |_, _| {});
    assert!(target_at(&trace, 2.9) < 500_000, "{trace:?}");

    let mut c = RateController::new(RateConfig::default(), t0);
    let start = c.target_bps();
    c.on_sent(t0 + Duration::from_millis(900), Track::AUDIO, 0, 100, None);
    c.handle_timeout(t0 + Duration::from_millis(999));
    assert_eq!(c.target_bps(), start, "not silent yet");
    c.handle_timeout(t0 + Duration::from_millis(1000));
    assert_eq!(c.target_bps(), start / 2);
    assert_eq!(c.state().reason, RateReason::Silence);
    c.handle_timeout(t0 + Duration::from_millis(1500));
    assert_eq!(c.target_bps(), start / 2, "once per timeout");
}

#[test]
fn a_budget_caps_the_target_while_it_is_fresh() {
    let t0 = crate::test_origin();
    let mut c = RateController::new(RateConfig::default(), t0);
    c.handle_budget(t0, 200_000);
    assert_eq!(c.target_bps(), 200_000);
    assert_eq!(c.state().reason, RateReason::Budget);
    c.set_rate(5_000_000);
    assert_eq!(
        c.target_bps(),
        5_000_000,
        "the application's choice replaces the target"
    );
    c.handle_feedback(t0 + Duration::from_millis(10), &Feedback::default());
    assert_eq!(c.target_bps(), 200_000, "the fresh budget still caps it");
    c.handle_feedback(
        t0 + Duration::from_millis(2_100),
        &Feedback {
            seq: 1,
            ..Feedback::default()
        },
    );
    c.handle_feedback(
        t0 + Duration::from_millis(2_200),
        &Feedback {
            seq: 2,
            ..Feedback::default()
        },
    );
    assert!(
        c.target_bps() > 200_000,
        "an old budget no longer caps it: {:?}",
        c.state()
    );
}
