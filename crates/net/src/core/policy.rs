//! [`PathPolicy`]: the one place a call's `--policy` is interpreted: which candidates are
//! checked, whether the call starts on the relay, and what follows when checks find nothing or
//! a selected path dies (fall back to the relay and retry later with backoff, check again once,
//! or give up with a sentence for the user).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natcall_proto::control::{Candidates, Policy};
use natcall_traversal::{Candidate, RelayReason};

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
        let lan = theirs.lan.iter().map(|a| Candidate::lan(*a));
        let public = theirs.public.map(Candidate::server_reflexive);
        match self.policy {
            Policy::LanOnly => (lan.collect(), true),
            Policy::DirectOnly => (public.into_iter().collect(), false),
            Policy::Auto if same_public => (lan.chain(public).collect(), true),
            _ => (public.into_iter().collect(), false),
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
        }
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
