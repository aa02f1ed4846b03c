//! Probing: how the rate controller learns that the path carries more than it sends, without
//! sending more for long (GCC's probe clusters, as libwebrtc's probe controller does).
//!
//! A probe is a short cluster of packets (about 30 ms, at least 10 packets) sent at twice the
//! target: media that is waiting, topped up with padding ([`crate::Track::PADDING`]). The
//! receiver's feedback gives every packet's arrival time, so the cluster's delivered rate is
//! the bytes between its first and last acknowledged packet over the time between their
//! arrivals (and likewise for their send times); the smaller of the two is what the path
//! carried. A path that delivered the whole probe rate has room: the target jumps to 80 % of
//! it (at most 1.5 times itself) and the next probe follows at once (so a link that grew is
//! found in a few round trips);
//! a path that held the probe back has about that capacity (the target goes to 90 % of it).
//!
//! A probe that went beyond the link's rate leaves its excess in a queue: its last packet, and
//! the first one sent after it, arrive later (in transit) than its fastest packet did. Such a
//! probe found no room, whatever its rate measured — a token-bucket shaper lets a few kilobytes
//! through at line rate, so clusters are at least 10 packets, more than such a burst, and the
//! queue behind the burst shows. Nor did a probe find room whose
//! packets themselves waited (their fastest transit above the path's base): the path was
//! queued already, or released a backlog at once (a relay's TCP connection catching up), which
//! says nothing of its rate.

use std::time::{Duration, Instant};

use super::history::{History, Sent};

/// A probe the sender should send: `bytes` (with the path's overhead) at `rate_bps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRequest {
    /// The cluster's id, given back with each packet ([`super::RateController::on_sent`]).
    pub id: u32,
    /// The rate to send it at, bit/s.
    pub rate_bps: u64,
    /// How many bytes it holds.
    pub bytes: usize,
}

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum ProbeResult {
    /// The path carried the cluster at its rate and no queue was left: at least this much
    /// (bit/s) fits, maybe more.
    Room(f64),
    /// The path delivered the cluster slower than it was sent, and no queue was left: about
    /// its capacity, bit/s.
    Capacity(f64),
    /// The cluster left a queue behind: no room beyond what is sent now.
    Queued,
}

/// How long a cluster lasts at its rate.
const CLUSTER_TIME: Duration = Duration::from_millis(30);
/// A cluster has at least this many full-size packets: more than a small shaper's burst
/// (a token bucket lets a few kilobytes through at line rate, whatever its rate).
const CLUSTER_PACKETS: usize = 10;
/// Probes are sent at this multiple of the target.
pub(super) const PROBE_FACTOR: f64 = 2.0;
/// A cluster whose feedback has not come within this long gives what it has (or nothing).
const RESULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Fewer acknowledged packets than this say nothing.
const MIN_ACKED: u32 = 4;
/// A cluster's last packet, or the first packet sent after it, arriving this much later (in
/// transit) than the cluster's fastest packet: the cluster built a queue.
const QUEUE_LEFT_US: i64 = 5_000;

#[derive(Debug)]
struct Cluster {
    id: u32,
    started: Instant,
    sent_all: bool,
    /// When its last byte was sent.
    ended: Option<Instant>,
    /// The smallest `arrival − send` of its packets, µs (the clocks differ: only differences
    /// of these mean something).
    fastest: Option<i64>,
    /// The `arrival − send` of the first packet sent after it, µs.
    after: Option<i64>,
    first: Option<u64>,
    last: Option<u64>,
    /// The acknowledged packets with the lowest and highest index: (index, sent, arrival µs).
    lo: Option<(u64, Instant, u64)>,
    hi: Option<(u64, Instant, u64)>,
    acked: u32,
}

/// The controller's probing state: at most one cluster at a time.
#[derive(Debug)]
pub(super) struct Prober {
    /// The origin of send times in `arrival − send`.
    epoch: Instant,
    next_id: u32,
    pending: Option<ProbeRequest>,
    active: Option<Cluster>,
    /// When the last probe was asked for.
    pub(super) last: Option<Instant>,
    /// The last probe found room: probe again as soon as it is done.
    pub(super) chain: bool,
}

impl Prober {
    pub(super) fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            next_id: 0,
            pending: None,
            active: None,
            last: None,
            chain: false,
        }
    }

    /// Whether no probe is asked for or in flight.
    pub(super) fn idle(&self) -> bool {
        self.pending.is_none() && self.active.is_none()
    }

    /// Asks for a probe at `rate_bps` (packets of about `packet` wire bytes).
    pub(super) fn request(&mut self, now: Instant, rate_bps: f64, packet: f64) {
        let bytes = (rate_bps / 8.0 * CLUSTER_TIME.as_secs_f64()).max(CLUSTER_PACKETS as f64 * packet);
        self.next_id = self.next_id.wrapping_add(1);
        self.pending = Some(ProbeRequest {
            id: self.next_id,
            rate_bps: rate_bps as u64,
            bytes: bytes as usize,
        });
        self.last = Some(now);
        self.chain = false;
    }

    /// Whether a probe waits for the sender.
    pub(super) fn pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The probe the sender should start now, if any.
    pub(super) fn poll(&mut self, now: Instant) -> Option<ProbeRequest> {
        let p = self.pending.take()?;
        self.active = Some(Cluster {
            id: p.id,
            started: now,
            sent_all: false,
            ended: None,
            fastest: None,
            after: None,
            first: None,
            last: None,
            lo: None,
            hi: None,
            acked: 0,
        });
        Some(p)
    }

    /// Packet `index` was sent as part of cluster `id`.
    pub(super) fn on_sent(&mut self, index: u64, id: u32) {
        if let Some(c) = self.active.as_mut().filter(|c| c.id == id && !c.sent_all) {
            c.first.get_or_insert(index);
            c.last = Some(index);
        }
    }

    /// The sender sent all of cluster `id`.
    pub(super) fn sent_all(&mut self, now: Instant, id: u32) {
        if let Some(c) = self.active.as_mut().filter(|c| c.id == id) {
            c.sent_all = true;
            c.ended = Some(now);
        }
    }

    /// Packet `index` arrived at `arrival_us` (acknowledged packets in index order).
    pub(super) fn on_acked(&mut self, index: u64, sent: &Sent, arrival_us: u64) {
        let sent_us = sent.at.saturating_duration_since(self.epoch).as_micros() as i64;
        let transit = arrival_us as i64 - sent_us;
        let Some(c) = self.active.as_mut() else { return };
        if sent.probe == Some(c.id) {
            let point = (index, sent.at, arrival_us);
            if c.lo.is_none_or(|(i, _, _)| index < i) {
                c.lo = Some(point);
            }
            if c.hi.is_none_or(|(i, _, _)| index > i) {
                c.hi = Some(point);
            }
            c.acked += 1;
            c.fastest = Some(c.fastest.map_or(transit, |f| f.min(transit)));
        } else if c.ended.is_some_and(|end| sent.at >= end) && c.after.is_none() {
            c.after = Some(transit);
        }
    }

    /// The finished cluster's result, once its feedback is in (or it timed out); `base` is the
    /// path's base transit ([`super::queue::QueueDelay::base`]).
    pub(super) fn result(&mut self, now: Instant, history: &History, base: Option<i64>) -> Option<ProbeResult> {
        let c = self.active.as_ref()?;
        let timed_out = now.saturating_duration_since(c.started) >= RESULT_TIMEOUT;
        if c.after.is_none() && !timed_out {
            return None;
        }
        let c = self.active.take()?;
        let ((lo, lo_sent, lo_at), (hi, hi_sent, hi_at)) = (c.lo?, c.hi?);
        if c.acked < MIN_ACKED || hi <= lo {
            return None;
        }
        // A queue left behind, or one the cluster itself waited in (the path was queued
        // already, or released a backlog at once: a burst that says nothing of its rate).
        let base = base?;
        let fastest = c.fastest?;
        let last = hi_at as i64 - hi_sent.saturating_duration_since(self.epoch).as_micros() as i64;
        if last.max(c.after?) - fastest > QUEUE_LEFT_US || fastest - base > QUEUE_LEFT_US {
            return Some(ProbeResult::Queued);
        }
        // The first packet's bytes went before the span began.
        let bits = history.bytes(lo + 1..=hi) as f64 * 8.0;
        let recv_s = hi_at.checked_sub(lo_at)? as f64 / 1e6;
        let send_s = hi_sent.saturating_duration_since(lo_sent).as_secs_f64();
        if recv_s < 0.002 || send_s < 0.002 {
            return None;
        }
        let (recv, send) = (bits / recv_s, bits / send_s);
        Some(if recv < 0.9 * send {
            ProbeResult::Capacity(recv)
        } else {
            ProbeResult::Room(send.min(recv))
        })
    }
}
