//! Candidate pairs and their check state (RFC 8445 §6.1.2, simplified: one local
//! candidate, the shared socket, so a pair is identified by its remote address).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::{CandidateKind, Config, PathKind};

/// Retransmission state of one outstanding transaction series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retransmit {
    /// Transmissions so far (first send included).
    pub attempts: u32,
    /// Wait before the next transmission.
    pub rto: Duration,
    /// When the next transmission (or the give-up) is due.
    pub next_at: Instant,
}

impl Retransmit {
    /// State right after the first transmission at `now`.
    pub(crate) fn first(config: &Config, now: Instant) -> Self {
        Self {
            attempts: 1,
            rto: config.rto_initial,
            next_at: now + config.rto_initial,
        }
    }

    /// Records a retransmission at `now`; doubles the timeout up to `rto_max`.
    pub(crate) fn again(&mut self, config: &Config, now: Instant) {
        self.attempts += 1;
        self.rto = (self.rto * 2).min(config.rto_max);
        self.next_at = now + self.rto;
    }
}

/// Check state of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PairState {
    /// Not checked yet; becomes eligible at `CandidatePair::start_at`.
    Waiting,
    /// A check is outstanding.
    InProgress(Retransmit),
    /// A check succeeded: the pair is valid.
    Succeeded,
    /// All attempts went unanswered.
    Failed,
}

/// The local socket paired with one remote candidate.
#[derive(Debug, Clone)]
pub(crate) struct CandidatePair {
    pub remote: SocketAddr,
    pub kind: CandidateKind,
    pub start_at: Instant,
    pub state: PairState,
    /// Round-trip time of the first successful check.
    pub rtt: Option<Duration>,
    /// The controlled side saw USE-CANDIDATE for this pair.
    pub peer_nominated: bool,
    /// Last check we sent on this pair (rate-limits triggered checks).
    pub last_sent: Option<Instant>,
}

impl CandidatePair {
    pub(crate) fn new(remote: SocketAddr, kind: CandidateKind, start_at: Instant) -> Self {
        Self {
            remote,
            kind,
            start_at,
            state: PairState::Waiting,
            rtt: None,
            peer_nominated: false,
            last_sent: None,
        }
    }

    pub(crate) fn path_kind(&self) -> PathKind {
        self.kind.path_kind()
    }

    pub(crate) fn is_valid(&self) -> bool {
        self.state == PairState::Succeeded
    }

    /// Still waiting or being checked.
    pub(crate) fn is_pending(&self) -> bool {
        matches!(self.state, PairState::Waiting | PairState::InProgress(_))
    }

    /// Preference order of valid pairs: LAN before direct, then IPv6 before IPv4 (no NAT
    /// mapping to keep alive), then lower RTT.
    pub(crate) fn rank(&self) -> (PathKind, bool, Duration) {
        (
            self.path_kind(),
            self.remote.is_ipv4(),
            self.rtt.unwrap_or(Duration::MAX),
        )
    }
}

/// All pairs of an agent, in check order.
#[derive(Debug, Clone, Default)]
pub(crate) struct CheckList {
    pairs: Vec<CandidatePair>,
}

impl CheckList {
    /// Pairs every usable remote candidate; LAN ones only when `try_lan`, public ones
    /// `lan_head_start` later when LAN is tried.
    pub(crate) fn new(config: &Config, remotes: &[(SocketAddr, CandidateKind)], try_lan: bool, now: Instant) -> Self {
        let public_start = if try_lan { now + config.lan_head_start } else { now };
        let mut list = Self::default();
        for &(remote, kind) in remotes {
            let start_at = match kind {
                CandidateKind::Lan if !try_lan => continue,
                CandidateKind::Lan => now,
                CandidateKind::ServerReflexive
                | CandidateKind::PeerReflexive
                | CandidateKind::Predicted
                | CandidateKind::PortMapped
                | CandidateKind::Global => public_start,
            };
            if list.find(remote).is_none() {
                list.pairs.push(CandidatePair::new(remote, kind, start_at));
            }
        }
        // Stable: LAN first, then by priority, keeping the caller's order within a kind.
        list.pairs
            .sort_by_key(|p| (p.start_at, std::cmp::Reverse(p.kind.priority())));
        list
    }

    pub(crate) fn len(&self) -> usize {
        self.pairs.len()
    }

    pub(crate) fn get(&self, index: usize) -> &CandidatePair {
        &self.pairs[index]
    }

    pub(crate) fn get_mut(&mut self, index: usize) -> &mut CandidatePair {
        &mut self.pairs[index]
    }

    pub(crate) fn find(&self, remote: SocketAddr) -> Option<usize> {
        self.pairs.iter().position(|p| p.remote == remote)
    }

    /// Adds a pair (peer-reflexive discovery); returns its index.
    pub(crate) fn push(&mut self, pair: CandidatePair) -> usize {
        self.pairs.push(pair);
        self.pairs.len() - 1
    }

    /// The first waiting pair eligible at `now`.
    pub(crate) fn next_waiting(&self, now: Instant) -> Option<usize> {
        self.pairs
            .iter()
            .position(|p| p.state == PairState::Waiting && p.start_at <= now)
    }

    /// Earliest `start_at` of a waiting pair.
    pub(crate) fn next_start(&self) -> Option<Instant> {
        self.pairs
            .iter()
            .filter(|p| p.state == PairState::Waiting)
            .map(|p| p.start_at)
            .min()
    }

    /// Earliest retransmission deadline of an outstanding check.
    pub(crate) fn next_retransmit(&self) -> Option<Instant> {
        self.pairs
            .iter()
            .filter_map(|p| match p.state {
                PairState::InProgress(r) => Some(r.next_at),
                _ => None,
            })
            .min()
    }

    /// The best valid pair, if any.
    pub(crate) fn best_valid(&self) -> Option<usize> {
        (0..self.pairs.len())
            .filter(|&i| self.pairs[i].is_valid())
            .min_by_key(|&i| self.pairs[i].rank())
    }

    /// Whether a pending pair could still beat the valid pair `best` (by kind, then family).
    pub(crate) fn better_pending(&self, best: usize) -> bool {
        let best = &self.pairs[best];
        let key = |p: &CandidatePair| (p.path_kind(), p.remote.is_ipv4());
        self.pairs.iter().any(|p| p.is_pending() && key(p) <= key(best))
    }

    /// Resets every pair to `Waiting` for a fresh run starting at `now`.
    pub(crate) fn reset(&mut self, config: &Config, try_lan: bool, now: Instant) {
        let public_start = if try_lan { now + config.lan_head_start } else { now };
        for pair in &mut self.pairs {
            let start_at = if pair.kind == CandidateKind::Lan {
                now
            } else {
                public_start
            };
            *pair = CandidatePair::new(pair.remote, pair.kind, start_at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(addr: &str, kind: CandidateKind, rtt_ms: u64, now: Instant) -> CandidatePair {
        let mut p = CandidatePair::new(addr.parse().expect("addr"), kind, now);
        p.state = PairState::Succeeded;
        p.rtt = Some(Duration::from_millis(rtt_ms));
        p
    }

    #[test]
    fn ipv6_beats_a_faster_ipv4_pair_and_lan_beats_both() {
        let now = crate::test_origin();
        let mut list = CheckList::default();
        let v4 = list.push(valid("198.51.100.7:4000", CandidateKind::ServerReflexive, 5, now));
        let v6 = list.push(valid("[2001:db8:1::7]:4000", CandidateKind::Global, 40, now));
        assert_eq!(list.best_valid(), Some(v6), "IPv6 first, whatever the RTT");
        // A pending IPv6 pair may still beat a valid IPv4 one; nothing pending beats IPv6.
        let mut pending = CandidatePair::new(
            "[2001:db8:1::8]:4000".parse().expect("addr"),
            CandidateKind::Global,
            now,
        );
        pending.state = PairState::Waiting;
        let p = list.push(pending);
        assert!(list.better_pending(v4));
        list.pairs[p].state = PairState::Failed;
        assert!(!list.better_pending(v6));
        let lan = list.push(valid("10.0.0.7:4000", CandidateKind::Lan, 90, now));
        assert_eq!(list.best_valid(), Some(lan));
    }
}
