//! Configuration and the plain data types the agent is built from.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use stun_rs::HMACKey;

use crate::Error;

/// Tuning knobs of an [`Agent`](crate::Agent). `Config::default()` suits a call.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Pacing: at most one new connectivity check every `ta` (RFC 8445 Ta).
    pub ta: Duration,
    /// First retransmission timeout of a check; doubles on every retransmit.
    pub rto_initial: Duration,
    /// Cap of the doubling retransmission timeout.
    pub rto_max: Duration,
    /// Transmissions of one check (first send included) before the pair fails.
    pub max_attempts: u32,
    /// When LAN candidates are tried, public pairs start this long after the LAN pairs.
    pub lan_head_start: Duration,
    /// Without a selected pair this long after start, give up and use the relay.
    pub budget: Duration,
    /// After its first valid pair, how long the controlling side waits for a better one
    /// before nominating (skipped when the best pair is LAN or nothing else is pending).
    pub nomination_delay: Duration,
    /// After selection, send a keepalive when the path was idle this long.
    pub keepalive_interval: Duration,
    /// After selection, a path silent this long is probed.
    pub liveness_timeout: Duration,
    /// Probes sent (spaced by the doubling `rto_initial`) before a silent path is lost.
    pub liveness_probes: u32,
    /// Seed of the agent's PRNG (transaction ids, tie-breaker). Vary it per agent.
    pub rng_seed: u64,
    /// Birthday traversal (see [`crate::birthday`]): sockets the side behind a symmetric NAT
    /// opens towards the peer (0 turns birthday traversal off).
    pub birthday_sockets: usize,
    /// Birthday traversal: probes the other side sends per attempt.
    pub birthday_probes: usize,
    /// Birthday traversal: one probe every this long (2 048 × 4 ms ≈ 8.2 s per attempt).
    pub probe_interval: Duration,
    /// Birthday traversal: the budget of an attempt (instead of `budget`), on both sides.
    pub birthday_budget: Duration,
    /// Birthday traversal starts this long after the checks, and only if no pair was validated
    /// by then (a peer on a public address answers ordinary checks first).
    pub birthday_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ta: Duration::from_millis(20),
            rto_initial: Duration::from_millis(100),
            rto_max: Duration::from_millis(1600),
            max_attempts: 7,
            lan_head_start: Duration::from_millis(50),
            budget: Duration::from_secs(5),
            nomination_delay: Duration::from_millis(100),
            keepalive_interval: Duration::from_secs(15),
            liveness_timeout: Duration::from_secs(20),
            liveness_probes: 3,
            rng_seed: 0,
            birthday_sockets: 256,
            birthday_probes: 2048,
            probe_interval: Duration::from_millis(4),
            birthday_budget: Duration::from_secs(10),
            birthday_delay: Duration::from_millis(500),
        }
    }
}

/// Which side nominates (RFC 8445 roles, assigned by the rendezvous server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Picks the pair and nominates it with USE-CANDIDATE.
    Controlling,
    /// Follows the controlling side's nomination.
    Controlled,
}

/// Where a remote candidate address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CandidateKind {
    /// A private address the peer reported (only useful behind the same NAT).
    Lan,
    /// The peer's public address as the rendezvous server observed it.
    ServerReflexive,
    /// Learned from the source of an authenticated check (e.g. a symmetric NAT's port).
    PeerReflexive,
    /// A peer-reflexive address that is one of the ports birthday probing guessed
    /// ([`crate::Agent::probe`]): a symmetric NAT's port found by probing.
    Predicted,
    /// A public address the peer's router mapped to its socket on request (UPnP-IGD, NAT-PMP,
    /// PCP): open to anyone.
    PortMapped,
    /// A global address of the peer's own (IPv6, no NAT): its host address is also the one the
    /// world sees, behind at most a stateful firewall that simultaneous checks open.
    Global,
}

impl CandidateKind {
    /// The path a pair to this candidate gives.
    pub fn path_kind(self) -> PathKind {
        match self {
            Self::Lan => PathKind::Lan,
            Self::ServerReflexive | Self::PeerReflexive | Self::Predicted | Self::PortMapped | Self::Global => {
                PathKind::Direct
            }
        }
    }

    /// RFC 8445 §5.1.2 priority with one local candidate and component 1.
    pub(crate) fn priority(self) -> u32 {
        let type_preference: u32 = match self {
            Self::Lan => 126,
            Self::PeerReflexive | Self::Predicted => 110,
            Self::PortMapped => 105,
            Self::Global => 120,
            Self::ServerReflexive => 100,
        };
        (type_preference << 24) | (65_535 << 8) | 255
    }
}

impl CandidateKind {
    /// The name reports use (ICE's short names: host, srflx, prflx; and predicted).
    pub fn name(self) -> &'static str {
        match self {
            Self::Lan => "host",
            Self::ServerReflexive => "srflx",
            Self::PeerReflexive => "prflx",
            Self::Predicted => "predicted",
            Self::PortMapped => "mapped",
            Self::Global => "global",
        }
    }
}

/// A remote transport address to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The address checks are sent to.
    pub addr: SocketAddr,
    /// Where it came from.
    pub kind: CandidateKind,
}

impl Candidate {
    /// A private LAN address of the peer.
    pub fn lan(addr: SocketAddr) -> Self {
        Self {
            addr,
            kind: CandidateKind::Lan,
        }
    }

    /// The peer's server-observed public address.
    pub fn server_reflexive(addr: SocketAddr) -> Self {
        Self {
            addr,
            kind: CandidateKind::ServerReflexive,
        }
    }

    /// A global (IPv6) address of the peer's own.
    pub fn global(addr: SocketAddr) -> Self {
        Self {
            addr,
            kind: CandidateKind::Global,
        }
    }

    /// The public address the peer's router mapped for it.
    pub fn port_mapped(addr: SocketAddr) -> Self {
        Self {
            addr,
            kind: CandidateKind::PortMapped,
        }
    }
}

/// The kind of a validated path, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathKind {
    /// Both peers behind the same NAT, talking over private addresses.
    Lan,
    /// Through the NATs, over public (or peer-reflexive) addresses.
    Direct,
}

/// Per-call credentials handed out by the rendezvous server.
///
/// Checks we send carry USERNAME `remote_ufrag:local_ufrag`; checks we accept must
/// carry `local_ufrag:remote_ufrag`. Both directions are keyed with the one password.
#[derive(Clone)]
pub struct Credentials {
    pub(crate) local_ufrag: String,
    pub(crate) remote_ufrag: String,
    pub(crate) key: HMACKey,
}

impl Credentials {
    /// Builds the credentials; fails if the password is not valid OpaqueString (SASLprep).
    pub fn new(password: &str, local_ufrag: impl Into<String>, remote_ufrag: impl Into<String>) -> Result<Self, Error> {
        let key = HMACKey::new_short_term(password).map_err(|e| Error::InvalidCredentials { reason: e.to_string() })?;
        let (local_ufrag, remote_ufrag) = (local_ufrag.into(), remote_ufrag.into());
        for ufrag in [&local_ufrag, &remote_ufrag] {
            if ufrag.is_empty() || ufrag.len() > 64 || ufrag.contains(':') {
                return Err(Error::InvalidCredentials {
                    reason: format!("username fragment {ufrag:?} must be 1..=64 bytes without ':'"),
                });
            }
        }
        Ok(Self {
            local_ufrag,
            remote_ufrag,
            key,
        })
    }

    /// USERNAME on the checks we send.
    pub(crate) fn outgoing_username(&self) -> String {
        format!("{}:{}", self.remote_ufrag, self.local_ufrag)
    }

    /// USERNAME the checks we accept must carry.
    pub(crate) fn incoming_username(&self) -> String {
        format!("{}:{}", self.local_ufrag, self.remote_ufrag)
    }
}

impl fmt::Debug for Credentials {
    // Never print the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("local_ufrag", &self.local_ufrag)
            .field("remote_ufrag", &self.remote_ufrag)
            .finish_non_exhaustive()
    }
}
