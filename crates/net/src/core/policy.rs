//! [`PathPolicy`]: the one place a call's `--policy` is interpreted: which candidates are
//! checked, whether the call starts on the relay, and what follows when checks find nothing or
//! a selected path dies (fall back to the relay and retry later with backoff, check again once,
//! or give up with a sentence for the user).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natcall_proto::control::{Candidates, Mapping, Policy};
use natcall_traversal::{Candidate, CandidateKind, RelayReason};

/// First retry of direct after falling back to the relay; doubles up to [`RETRY_MAX`].
pub(crate) const RETRY_FIRST: Duration = Duration::from_secs(5);
/// Longest wait between two attempts at a direct path.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(300);

/// What the call does when it has no direct path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// Carry the call on the relay (a retry of direct may be scheduled: [`PathPolicy::poll_retry`]).
    Relay,
    /// Run the checks again now (the relay is not allowed; a first loss).
    Restart,
    /// End the call; the sentence says why.
    Fail(String),
}

/// A global unicast IPv6 address (2000::/3): reachable across the internet, unlike a private
/// IPv4 or a unique-local IPv6 one.
pub(crate) fn is_global(addr: &SocketAddr) -> bool {
    matches!(addr.ip(), std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xe000 == 0x2000)
}

/// This side's part in birthday traversal (`natcall_traversal::birthday`), when exactly one of
/// the two NATs maps ports per destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Birthday {
    /// Neither or both NATs map per destination, or no direct path is wanted: checks as usual.
    No,
    /// This side's NAT maps per destination: open many ports towards the peer's address.
    Spray { to: SocketAddr },
    /// The peer's NAT does: probe guessed ports at its public IP, after `last_port` in `step`
    /// when its ports come in sequence.
    Probe { at: SocketAddr, step: Option<i32> },
}

impl Birthday {
    /// The plan for a call checking `remote` (what [`PathPolicy::candidates`] gave), with this
    /// peer's mapping `mine` and the peer's `theirs`.
    pub(crate) fn plan(mine: Mapping, theirs: &Candidates, remote: &[Candidate]) -> Self {
        let Some(public) = remote
            .iter()
            .find(|c| c.kind == CandidateKind::ServerReflexive)
            .map(|c| c.addr)
        else {
            return Birthday::No; // no direct path is checked (a LAN or relay policy)
        };
        match (mine, theirs.mapping) {
            (m, Mapping::Independent) if m.is_dependent() => Birthday::Spray { to: public },
            (Mapping::Independent, t) if t.is_dependent() => Birthday::Probe {
                at: public,
                step: t.sequential_step(),
            },
            _ => Birthday::No,
        }
    }

    pub(crate) fn is_on(self) -> bool {
        self != Birthday::No
    }
}

/// The policy state machine of one call.
#[derive(Debug, Clone)]
pub(crate) struct PathPolicy {
    policy: Policy,
    backoff: Duration,
    retry_at: Option<Instant>,
    lost_retries: u32,
}

impl PathPolicy {
    pub(crate) fn new(policy: Policy) -> Self {
        Self {
            policy,
            backoff: RETRY_FIRST,
            retry_at: None,
            lost_retries: 0,
        }
    }

    pub(crate) fn policy(&self) -> Policy {
        self.policy
    }

    /// Whether the relay may carry the call.
    pub(crate) fn relay_allowed(&self) -> bool {
        matches!(self.policy, Policy::Auto | Policy::RelayOnly)
    }

    /// Whether the call is routed over the relay from its start (QUIC connects over it at once,
    /// and moves to a direct path when one is selected).
    pub(crate) fn starts_on_relay(&self) -> bool {
        self.relay_allowed()
    }

    /// Whether connectivity checks run at all.
    pub(crate) fn runs_checks(&self) -> bool {
        self.policy != Policy::RelayOnly
    }

    /// The remote candidates to check, and whether LAN ones go first. `mine` is this peer's
    /// public address as the server saw it: LAN candidates are tried only behind the same
    /// public IP (or under `lan-only`).
    pub(crate) fn candidates(&self, mine: Option<SocketAddr>, theirs: &Candidates) -> (Vec<Candidate>, bool) {
        let same_public = matches!((mine, theirs.public), (Some(a), Some(b)) if a.ip() == b.ip());
        // A peer's global IPv6 addresses are public (no NAT: its host address is the one the
        // world sees): checked wherever a public address is, first (a v6 path needs no mapping).
        let lan = theirs.lan.iter().filter(|a| !is_global(a)).map(|a| Candidate::lan(*a));
        let global = theirs
            .lan
            .iter()
            .filter(|a| is_global(a))
            .map(|a| Candidate::global(*a));
        // The router's mapping next: it is open to anyone, the reflexive address maybe not.
        let mapped = theirs
            .port_mapped
            .filter(|m| Some(*m) != theirs.public && natcall_proto::control::plausible_public(*m))
            .map(Candidate::port_mapped);
        let public = global
            .chain(mapped)
            .chain(theirs.public.map(Candidate::server_reflexive));
        match self.policy {
            Policy::LanOnly => (lan.collect(), true),
            Policy::DirectOnly => (public.collect(), false),
            Policy::Auto if same_public => (lan.chain(public).collect(), true),
            _ => (public.collect(), false),
        }
    }

    fn wanted(&self) -> &'static str {
        match self.policy {
            Policy::LanOnly => "LAN",
            Policy::DirectOnly => "direct",
            _ => "LAN or direct",
        }
    }

    /// A direct path was selected: the backoff starts over.
    pub(crate) fn on_selected(&mut self) {
        self.backoff = RETRY_FIRST;
        self.retry_at = None;
    }

    /// The checks gave up (`reason`).
    pub(crate) fn on_no_path(&mut self, now: Instant, reason: RelayReason, peer: &str) -> Fallback {
        let why = match reason {
            RelayReason::UdpUnusable => "UDP to the rendezvous server is blocked here".to_owned(),
            RelayReason::NoValidPair { after } => {
                format!("no {} path to {peer} answered within {after:?}", self.wanted())
            }
            _ => "no path answered".to_owned(),
        };
        if !self.relay_allowed() {
            return Fallback::Fail(format!("{why}, and the {} policy forbids the relay", self.policy));
        }
        if matches!(reason, RelayReason::NoValidPair { .. }) {
            self.schedule_retry(now);
        }
        Fallback::Relay
    }

    /// The selected direct path stopped answering.
    pub(crate) fn on_path_lost(&mut self, now: Instant, peer: &str) -> Fallback {
        if self.relay_allowed() {
            self.schedule_retry(now);
            return Fallback::Relay;
        }
        if self.lost_retries == 0 {
            self.lost_retries += 1;
            return Fallback::Restart;
        }
        Fallback::Fail(format!(
            "the path to {peer} died and the {} policy forbids the relay",
            self.policy
        ))
    }

    fn schedule_retry(&mut self, now: Instant) {
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    /// When direct is next retried, if it is.
    pub(crate) fn poll_retry(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether a retry is due at `now` (and takes it).
    pub(crate) fn take_retry(&mut self, now: Instant) -> bool {
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands() -> Candidates {
        Candidates {
            public: Some("203.0.113.9:6000".parse().expect("addr")),
            lan: vec!["10.0.0.7:6000".parse().expect("addr")],
            mapping: Mapping::Unknown,
            port_mapped: None,
        }
    }

    #[test]
    fn a_router_mapped_address_is_checked_first_under_auto_and_direct_only_never_lan_only() {
        let mine = Some("198.51.100.1:5000".parse().expect("addr"));
        let mapped: SocketAddr = "203.0.113.9:41000".parse().expect("addr");
        let theirs = Candidates {
            port_mapped: Some(mapped),
            ..cands()
        };
        for policy in [Policy::Auto, Policy::DirectOnly] {
            let (c, _) = PathPolicy::new(policy).candidates(mine, &theirs);
            assert_eq!(
                c,
                vec![
                    Candidate::port_mapped(mapped),
                    Candidate::server_reflexive("203.0.113.9:6000".parse().expect("addr"))
                ],
                "{policy}"
            );
        }
        let (c, _) = PathPolicy::new(Policy::LanOnly).candidates(mine, &theirs);
        assert!(c.iter().all(|c| c.addr != mapped));
        // A mapping equal to the reflexive address (a router that kept the port) is one candidate.
        let same = Candidates {
            port_mapped: Some("203.0.113.9:6000".parse().expect("addr")),
            ..cands()
        };
        assert_eq!(PathPolicy::new(Policy::Auto).candidates(mine, &same).0.len(), 1);
    }

    #[test]
    fn birthday_traversal_runs_only_when_exactly_one_nat_maps_per_destination() {
        let mine = Some("198.51.100.1:5000".parse().expect("addr"));
        let public: SocketAddr = "203.0.113.9:6000".parse().expect("addr");
        let hard = Mapping::Dependent { step: 731 };
        let seq = Mapping::Dependent { step: 2 };
        let with = |m: Mapping| Candidates { mapping: m, ..cands() };
        let auto = PathPolicy::new(Policy::Auto);
        let plan = |mine_m: Mapping, theirs: Candidates| {
            let (remote, _) = auto.candidates(mine, &theirs);
            Birthday::plan(mine_m, &theirs, &remote)
        };
        assert_eq!(plan(hard, with(Mapping::Independent)), Birthday::Spray { to: public });
        assert_eq!(
            plan(Mapping::Independent, with(hard)),
            Birthday::Probe { at: public, step: None }
        );
        assert_eq!(
            plan(Mapping::Independent, with(seq)),
            Birthday::Probe {
                at: public,
                step: Some(2)
            }
        );
        assert_eq!(plan(hard, with(hard)), Birthday::No, "both symmetric: the relay");
        assert_eq!(plan(Mapping::Independent, with(Mapping::Independent)), Birthday::No);
        assert_eq!(
            plan(Mapping::Unknown, with(hard)),
            Birthday::No,
            "unmeasured: as before"
        );
        assert_eq!(plan(hard, with(Mapping::Unknown)), Birthday::No);
        // A policy that checks no public candidate never sprays or probes.
        let lan_only = PathPolicy::new(Policy::LanOnly);
        let theirs = with(hard);
        let (remote, _) = lan_only.candidates(mine, &theirs);
        assert_eq!(Birthday::plan(Mapping::Independent, &theirs, &remote), Birthday::No);
    }

    #[test]
    fn auto_checks_lan_only_behind_the_same_public_ip() {
        let p = PathPolicy::new(Policy::Auto);
        let (c, lan_first) = p.candidates(Some("198.51.100.1:5000".parse().expect("addr")), &cands());
        assert_eq!((c.len(), lan_first), (1, false));
        let (c, lan_first) = p.candidates(Some("203.0.113.9:7000".parse().expect("addr")), &cands());
        assert_eq!((c.len(), lan_first), (2, true));
        assert!(p.starts_on_relay() && p.runs_checks());
    }

    #[test]
    fn each_policy_picks_its_candidates() {
        let mine = Some("203.0.113.9:7000".parse().expect("addr"));
        let lan = PathPolicy::new(Policy::LanOnly).candidates(mine, &cands());
        assert_eq!(lan.0, vec![Candidate::lan("10.0.0.7:6000".parse().expect("addr"))]);
        let direct = PathPolicy::new(Policy::DirectOnly).candidates(mine, &cands());
        assert_eq!(
            direct.0,
            vec![Candidate::server_reflexive("203.0.113.9:6000".parse().expect("addr"))]
        );
        assert!(!PathPolicy::new(Policy::RelayOnly).runs_checks());
        assert!(!PathPolicy::new(Policy::DirectOnly).starts_on_relay());
        assert!(!PathPolicy::new(Policy::LanOnly).relay_allowed());
    }

    #[test]
    fn auto_falls_back_to_the_relay_and_retries_with_doubling_backoff() {
        let t0 = Instant::now();
        let mut p = PathPolicy::new(Policy::Auto);
        let after = Duration::from_secs(5);
        assert_eq!(
            p.on_no_path(t0, RelayReason::NoValidPair { after }, "bob"),
            Fallback::Relay
        );
        assert_eq!(p.poll_retry(), Some(t0 + RETRY_FIRST));
        assert!(!p.take_retry(t0));
        assert!(p.take_retry(t0 + RETRY_FIRST));
        assert_eq!(
            p.on_no_path(t0, RelayReason::NoValidPair { after }, "bob"),
            Fallback::Relay
        );
        assert_eq!(p.poll_retry(), Some(t0 + RETRY_FIRST * 2));
        p.on_selected();
        assert_eq!(p.poll_retry(), None);
        assert_eq!(p.on_path_lost(t0, "bob"), Fallback::Relay);
        assert_eq!(
            p.poll_retry(),
            Some(t0 + RETRY_FIRST),
            "backoff starts over after a selection"
        );
        // Blocked UDP is not retried: nothing will change.
        let mut q = PathPolicy::new(Policy::Auto);
        assert_eq!(q.on_no_path(t0, RelayReason::UdpUnusable, "bob"), Fallback::Relay);
        assert_eq!(q.poll_retry(), None);
    }

    #[test]
    fn direct_only_restarts_once_then_fails_with_a_sentence() {
        let t0 = Instant::now();
        let mut p = PathPolicy::new(Policy::DirectOnly);
        assert_eq!(p.on_path_lost(t0, "bob"), Fallback::Restart);
        match p.on_path_lost(t0, "bob") {
            Fallback::Fail(why) => assert_eq!(why, "the path to bob died and the direct-only policy forbids the relay"),
            other => panic!("expected a failure, got {other:?}"),
        }
        let after = Duration::from_secs(5);
        match PathPolicy::new(Policy::LanOnly).on_no_path(t0, RelayReason::NoValidPair { after }, "bob") {
            Fallback::Fail(why) => {
                assert_eq!(
                    why,
                    "no LAN path to bob answered within 5s, and the lan-only policy forbids the relay"
                )
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
