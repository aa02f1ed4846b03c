//! One call's state inside the [`PeerCore`](super::PeerCore), and the public types that
//! describe a call's path.

use std::net::SocketAddr;
use std::time::Instant;

use natcall_proto::control::{CallFailure, CallStart, ClientMsg, Fingerprint, Policy};
use natcall_traversal::{Agent, PathKind};
use serde::Serialize;

use super::policy::PathPolicy;

/// Which side of the call this peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Placed the call (controls nomination, opens QUIC).
    Caller,
    /// Accepted it.
    Callee,
}

/// The path carrying a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// No path yet.
    Connecting,
    /// Private LAN addresses.
    Lan,
    /// Hole-punched public addresses.
    Direct,
    /// The server's TCP relay.
    Relay,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Path::Connecting => "connecting",
            Path::Lan => "lan",
            Path::Direct => "direct",
            Path::Relay => "relay",
        })
    }
}

impl From<PathKind> for Path {
    fn from(k: PathKind) -> Self {
        match k {
            PathKind::Lan => Path::Lan,
            _ => Path::Direct,
        }
    }
}

/// One change of path, timed from when the call was placed or received.
#[derive(Debug, Clone, Serialize)]
pub struct PathChange {
    /// Milliseconds since the call started.
    pub at_ms: f64,
    /// Previous path.
    pub from: Path,
    /// New path.
    pub to: Path,
    /// The peer's address on the new path (none for the relay).
    pub remote: Option<SocketAddr>,
}

/// Where a call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Placed; waiting for the server's `Ringing`, then the callee's answer (`Start`).
    Ringing,
    /// Accepted by this side; waiting for the server's `Start`.
    Accepted,
    /// Started: checks, routes and QUIC run.
    Running,
    /// Released by the application; the route lingers until `until` so the QUIC close and a
    /// held hang-up still find their path.
    Closing { until: Instant },
}

/// Why a call is over (or never began), as the core saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallEnd {
    /// The server placed no call.
    Refused(CallFailure),
    /// The server ended it (declined, hung up, no answer there): its words.
    Ended(String),
    /// This side's ring timer ran out.
    NoAnswer,
    /// The connection to the server was lost before the call started.
    ServerLost(String),
    /// The server's `Start` named another key than the offer did.
    WrongKey,
    /// The policy's paths failed: why.
    NoPath(String),
    /// A relayed call could not be brought back on a server: why.
    NotResumed(String),
    /// The callee declined it as busy (in another call).
    Busy,
    /// Another session of this peer took over its registration: this one is over (why).
    Replaced(String),
}

/// Whether a running call is known to the server that this endpoint is registered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    /// Known (started or resumed there).
    Known,
    /// Not known (the server was lost, or the other member's connection ended): send `Resume`
    /// once registered and the proof is known.
    Wanted,
    /// `Resume` sent with this id; waiting for `Resumed`.
    Sent(u32),
    /// The server said no; the call goes on without it while it has a direct path.
    Failed,
}

/// What the application can read of a call.
#[derive(Debug, Clone)]
pub(crate) struct CallView {
    pub(crate) peer: String,
    pub(crate) role: Role,
    pub(crate) phase: Phase,
    /// When the call was placed or received (path change times count from here).
    pub(crate) t0: Instant,
    /// The server's `Start`, once it came.
    pub(crate) start: Option<CallStart>,
    pub(crate) path: Path,
    pub(crate) changes: Vec<PathChange>,
    pub(crate) end: Option<CallEnd>,
    /// Bumped on every change the application may wait for.
    pub(crate) version: u64,
    /// How the checks went about it.
    pub(crate) traversal: TraversalReport,
}

/// How a call looked for a direct path (its last attempt; probe counts over all attempts).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TraversalReport {
    /// How this side's NAT maps ports, as measured against the server's two STUN ports
    /// ("unknown", "endpoint-independent", "endpoint-dependent (random)", …).
    pub nat_mapping: String,
    /// The same for the peer, as it reported.
    pub peer_nat_mapping: String,
    /// The public address this side's router mapped for it (UPnP-IGD, NAT-PMP, PCP), if any.
    pub port_mapped: Option<std::net::SocketAddr>,
    /// The same for the peer.
    pub peer_port_mapped: Option<std::net::SocketAddr>,
    /// Birthday traversal: "spray" (this side, behind the symmetric NAT, opened many ports),
    /// "probe" (this side probed the peer's guessed ports), or none.
    pub birthday: Option<&'static str>,
    /// Sockets opened for birthday traversal (each sent one packet), over all attempts.
    pub spray_sockets: usize,
    /// Birthday probes sent, over all attempts.
    pub probes_sent: usize,
    /// The remote candidates of the last attempt, counted by kind and family ("srflx-v4",
    /// "host-v6", "prflx-v4", and "predicted-v4": the ports birthday probing aimed at).
    pub candidates: std::collections::BTreeMap<String, usize>,
    /// The kind and family of the candidate the selected direct path runs to, if one was
    /// selected.
    pub won: Option<String>,
}

impl TraversalReport {
    /// The report's name of a candidate: kind and family.
    pub(crate) fn label(c: &natcall_traversal::Candidate) -> String {
        let family = if c.addr.is_ipv4() { "v4" } else { "v6" };
        format!("{}-{family}", c.kind.name())
    }
}

/// Where the call's packets go, as the core keeps it (see [`super::Route`] for what senders get).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carrier {
    Void,
    Udp(SocketAddr),
    Relay,
}

/// One call, with everything the core knows of it.
#[derive(Debug)]
pub(crate) struct CallState<L> {
    pub(crate) view: CallView,
    pub(crate) policy: PathPolicy,
    /// The key the callee was offered (checked against `Start`).
    pub(crate) offered_key: Option<Fingerprint>,
    /// The call's id at the server that knows it now.
    pub(crate) server_id: Option<u32>,
    /// The id the call had last at any server (what `Resume` names).
    pub(crate) last_server_id: Option<u32>,
    pub(crate) agent: Option<Agent>,
    /// When the connectivity checks start (`Start` + its delay).
    pub(crate) checks_at: Option<Instant>,
    pub(crate) carrier: Carrier,
    pub(crate) selected: Option<SocketAddr>,
    /// The USERNAME the peer's checks carry.
    pub(crate) username: Option<String>,
    pub(crate) proof: Option<[u8; 32]>,
    pub(crate) resume: Resume,
    /// A hang-up waiting for the call's QUIC close to leave, and the latest it waits.
    pub(crate) held: Option<(ClientMsg, Instant)>,
    /// While ringing or accepted: when this side gives up.
    pub(crate) ring_deadline: Option<Instant>,
    /// Birthday traversal with this side behind the symmetric NAT: where the sockets go, and
    /// when they are opened next (each attempt at a direct path opens them again).
    pub(crate) spray: Option<(SocketAddr, Option<Instant>)>,
    /// Birthday probes sent by the agent's earlier attempts.
    pub(crate) probes_before: usize,
    /// Sprays done for this call (at most `natcall_traversal::MAX_PROBE_RUNS`, as probing).
    pub(crate) sprays: u32,
    /// The async layer's handles for this call (its media queue, an accepted connection).
    pub(crate) link: L,
}

impl<L: Default> CallState<L> {
    pub(crate) fn new(peer: String, role: Role, phase: Phase, policy: Policy, now: Instant) -> Self {
        Self {
            view: CallView {
                peer,
                role,
                phase,
                t0: now,
                start: None,
                path: Path::Connecting,
                changes: Vec::new(),
                end: None,
                version: 0,
                traversal: TraversalReport::default(),
            },
            policy: PathPolicy::new(policy),
            offered_key: None,
            server_id: None,
            last_server_id: None,
            agent: None,
            checks_at: None,
            carrier: Carrier::Void,
            selected: None,
            username: None,
            proof: None,
            resume: Resume::Known,
            held: None,
            ring_deadline: None,
            spray: None,
            probes_before: 0,
            sprays: 0,
            link: L::default(),
        }
    }
}

impl<L> CallState<L> {
    /// Marks a change the application may be waiting for.
    pub(crate) fn touch(&mut self) {
        self.view.version += 1;
    }

    /// Ends the call with `end` unless it already ended.
    pub(crate) fn end(&mut self, end: CallEnd) {
        if self.view.end.is_none() {
            self.view.end = Some(end);
            self.touch();
        }
    }

    pub(crate) fn is_ringing(&self) -> bool {
        matches!(self.view.phase, Phase::Ringing | Phase::Accepted)
    }

    /// Records a path change at `now`; returns whether the path changed.
    pub(crate) fn set_path(&mut self, now: Instant, to: Path, remote: Option<SocketAddr>) -> bool {
        let from = self.view.path;
        if from == to {
            return false;
        }
        let at_ms = now.saturating_duration_since(self.view.t0).as_secs_f64() * 1000.0;
        tracing::info!(peer = %self.view.peer, %from, %to, ?remote, at_ms, "path changed");
        self.view.changes.push(PathChange {
            at_ms,
            from,
            to,
            remote,
        });
        self.view.path = to;
        self.touch();
        true
    }
}
