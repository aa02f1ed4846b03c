//! Control messages on the TCP channel (bincode, see [`crate::codec`]).
//!
//! Variants are only ever appended, so indices stay stable within a protocol version.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::stun::TokenCredentials;

/// The longest peer name.
pub const MAX_NAME_LEN: usize = 32;
/// The most private LAN addresses a peer may report.
pub const MAX_LAN_ADDRS: usize = 8;
/// The largest certificate a peer may present at registration.
pub const MAX_CERT_LEN: usize = 2048;

/// SHA-256 of a peer's certificate (DER): the peer's key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_cert(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut fp = [0u8; 32];
        fp.copy_from_slice(digest.as_ref());
        Self(fp)
    }

    /// The first 8 hex digits, for logs.
    pub fn short(&self) -> String {
        self.0[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.short())
    }
}

/// A fingerprint written as text was not 64 hex digits.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("a key fingerprint is 64 hex digits")]
pub struct BadFingerprint;

impl FromStr for Fingerprint {
    type Err = BadFingerprint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return Err(BadFingerprint);
        }
        let mut fp = [0u8; 32];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let hex = std::str::from_utf8(pair).map_err(|_| BadFingerprint)?;
            fp[i] = u8::from_str_radix(hex, 16).map_err(|_| BadFingerprint)?;
        }
        Ok(Self(fp))
    }
}

/// A name is not acceptable.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// Empty or longer than [`MAX_NAME_LEN`].
    #[error("a name has 1 to {MAX_NAME_LEN} characters, this one has {0}")]
    Length(usize),
    /// A character outside `a-z 0-9 . _ -`.
    #[error("a name uses only lowercase letters, digits, '.', '_' and '-'; {0:?} is not allowed")]
    Character(char),
}

/// Checks that `name` is a valid peer name: 1 to 32 of `a-z 0-9 . _ -`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let len = name.chars().count();
    if len == 0 || len > MAX_NAME_LEN {
        return Err(NameError::Length(len));
    }
    match name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
    {
        Some(c) => Err(NameError::Character(c)),
        None => Ok(()),
    }
}

/// Messages from a peer to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClientMsg {
    /// Claim `name` for the key of `cert`, proven by `signature` over the server's challenge
    /// (see [`crate::auth`]), and report the peer's private LAN addresses.
    Register {
        name: String,
        cert: Vec<u8>,
        signature: Vec<u8>,
        lan_addrs: Vec<SocketAddr>,
    },
    /// Is `name` online? Answered by [`ServerMsg::Presence`].
    Lookup { name: String },
    /// Answer to [`ServerMsg::Ping`].
    Pong { nonce: u64 },
    /// Call `callee`. `request` is the caller's own id for this attempt (any value, unique
    /// among its attempts in flight), so two calls to one name are told apart. Answered by
    /// [`ServerMsg::Ringing`] or [`ServerMsg::CallFailed`] with the same `request`.
    Call {
        request: u32,
        callee: String,
        policy: Policy,
    },
    /// Accept or decline the incoming call `call` (the form of version 5 and before: the same
    /// as [`ClientMsg::Reply`] with [`Reply::Accept`] under [`Policy::Auto`], or with
    /// [`Decline::Declined`]).
    Answer { call: u32, accept: bool },
    /// End call `call` (or withdraw it while it rings); with no call `call`, withdraw this
    /// peer's waiting [`ClientMsg::Resume`] of `call`, if any.
    Hangup { call: u32, reason: String },
    /// Health check of the relay: this peer has read `frames` more relay frames (sent after
    /// every `relay_ack_every` frames, see [`ServerMsg::Registered`]).
    RelayAck { frames: u32 },
    /// The path call `call` runs on now, as this peer sees it (for the server's metrics).
    CallPath { call: u32, path: PathKind },
    /// Re-announce call `call` (its id on the server that last knew it) with `peer`, after this
    /// peer registered again (a new or restarted server, or the other member's connection
    /// ended: [`ServerMsg::CallSuspended`]). `proof` is a secret both members derive from their
    /// authenticated QUIC session ([`RESUME_PROOF_LABEL`]); the server never saw it before and
    /// re-creates the call once both members, registered under the names each gave, sent the
    /// same proof. Answered by [`ServerMsg::Resumed`] or [`ServerMsg::ResumeFailed`].
    Resume { call: u32, peer: String, proof: [u8; 32] },
    /// Free the name this connection registered: its binding to this peer's key is forgotten
    /// (anyone may register it next) and the peer is offline. Answered by
    /// [`ServerMsg::NameReleased`], after which the server closes the connection.
    ReleaseName,
    /// Create room `room` (a name like a peer's) and join it; `invite`: the names that may join
    /// besides the creator (at most `limits.max_room_members`). Answered by
    /// [`ServerMsg::RoomJoined`], with the room's join code, or [`ServerMsg::RoomRefused`].
    RoomCreate { room: String, invite: Vec<String> },
    /// Join room `room`: allowed to its creator, to the names it invited, and to anyone who
    /// gives its join `code`. Answered by [`ServerMsg::RoomJoined`] or
    /// [`ServerMsg::RoomRefused`]; the members already in it get [`ServerMsg::RoomMemberJoined`].
    RoomJoin { room: String, code: Option<String> },
    /// Leave room `room`; the other members get [`ServerMsg::RoomMemberLeft`], and the pairwise
    /// sessions with them end. A room whose last member left is gone.
    RoomLeave { room: String },
    /// Answer the incoming call `call` (version 6): accept it under the callee's own policy
    /// (the call runs under the stricter of it and the caller's, [`Policy::combine`]), or
    /// decline it, saying why. The caller learns a decline from [`ServerMsg::CallDeclined`].
    Reply { call: u32, reply: Reply },
    /// How this peer's NAT maps its UDP socket (version 7), learned by comparing the server's
    /// answers on its STUN port and on `stun_alt_port` ([`ServerMsg::Registered`]), and the
    /// public address its router mapped to that socket on request (UPnP-IGD, NAT-PMP or PCP),
    /// if any. Sent again whenever either changes. The server hands both to the peers this one
    /// calls, in [`Candidates::mapping`] and [`Candidates::port_mapped`].
    NatMapping {
        mapping: Mapping,
        port_mapped: Option<SocketAddr>,
    },
    /// From another node of the server's cluster (version 8), never from a peer: it speaks for
    /// its registered peer `name` (key `fingerprint`, reachable at `candidates`, `rtt_us` from
    /// that node), who calls or resumes a call with a peer of this node. `node` is the sending
    /// node's id; `proof` is HMAC-SHA256 under the cluster's secret of the node ids, the name,
    /// the key and this TLS session's exporter, so nobody without the
    /// secret can speak for a peer, nor replay a visit on another connection (the exporter is
    /// the one a `Register` signs, [`crate::REGISTER_BINDING_LABEL`]). Answered as
    /// [`ClientMsg::Register`] is; the connection then carries that peer's calls with this
    /// node's peers, their signalling and relay frames unchanged.
    Visit {
        node: String,
        name: String,
        fingerprint: Fingerprint,
        candidates: Candidates,
        rtt_us: Option<u64>,
        proof: [u8; 32],
    },
}

/// How a peer's NAT maps one UDP socket to public ports (RFC 4787 §4.1), as the peer measured
/// it from two server ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Mapping {
    /// Not measured (the server has no second port, or it did not answer).
    #[default]
    Unknown,
    /// One public port towards both ports of the server (endpoint-independent mapping, or no
    /// NAT; a NAT that maps per destination *address* only also looks so, since both ports are
    /// on one IP): the server-reflexive address is the one peers reach.
    Independent,
    /// A new public port per destination (endpoint- or address-dependent: a symmetric NAT).
    /// `step` is the second port minus the first: a small step means ports are handed out in
    /// sequence and the next ones can be predicted; anything else counts as random.
    Dependent { step: i32 },
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self, self.sequential_step()) {
            (Mapping::Unknown, _) => f.write_str("unknown"),
            (Mapping::Independent, _) => f.write_str("endpoint-independent"),
            (Mapping::Dependent { .. }, Some(step)) => write!(f, "endpoint-dependent (sequential, step {step})"),
            (Mapping::Dependent { .. }, None) => f.write_str("endpoint-dependent (random)"),
        }
    }
}

impl Mapping {
    /// The largest |step| taken as sequential allocation.
    pub const MAX_SEQUENTIAL_STEP: i32 = 16;

    /// Whether the NAT maps per destination.
    pub fn is_dependent(self) -> bool {
        matches!(self, Mapping::Dependent { .. })
    }

    /// The step of sequential allocation, if the ports looked sequential.
    pub fn sequential_step(self) -> Option<i32> {
        match self {
            Mapping::Dependent { step }
                if step != 0 && step.unsigned_abs() <= Self::MAX_SEQUENTIAL_STEP.unsigned_abs() =>
            {
                Some(step)
            }
            _ => None,
        }
    }

    /// The mapping seen from a first and a second binding of one socket.
    pub fn from_ports(first: SocketAddr, second: SocketAddr) -> Self {
        if first == second {
            Mapping::Independent
        } else {
            Mapping::Dependent {
                step: i32::from(second.port()) - i32::from(first.port()),
            }
        }
    }
}

/// A callee's answer to a ringing call ([`ClientMsg::Reply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Accept; `policy` is the callee's own. When it and the caller's cannot both hold, the
    /// server declines the call for it ([`Decline::Policy`]).
    Accept { policy: Policy },
    /// Decline.
    Decline(Decline),
}

/// Why a callee declined a call ([`Reply::Decline`], [`ServerMsg::CallDeclined`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decline {
    /// The callee (its user, or its rules) said no.
    Declined,
    /// The callee is in another call.
    Busy,
    /// The callee takes only calls under `allowed`, which the caller's policy excludes.
    Policy { allowed: Policy },
}

/// The TLS exporter label of a call's resume proof ([`ClientMsg::Resume`]); the context is
/// the call's id on the server that started it, big-endian.
pub const RESUME_PROOF_LABEL: &[u8] = b"EXPORTER-natcall-resume";

/// A call's path, as peers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathKind {
    /// Private LAN addresses.
    Lan,
    /// Hole-punched public addresses.
    Direct,
    /// The server's relay.
    Relay,
}

impl PathKind {
    /// A label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lan => "lan",
            Self::Direct => "direct",
            Self::Relay => "relay",
        }
    }
}

/// Which paths a call may use. Honoured by both peers; the relay is used only when allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Policy {
    /// LAN, then direct, with the relay as fallback (and carrying the call until a direct
    /// path validates).
    #[default]
    Auto,
    /// Hole-punched public addresses only: fails rather than relay.
    DirectOnly,
    /// The relay only: no connectivity checks.
    RelayOnly,
    /// Private LAN addresses only.
    LanOnly,
}

impl Policy {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::DirectOnly => "direct-only",
            Self::RelayOnly => "relay-only",
            Self::LanOnly => "lan-only",
        }
    }
}

impl Policy {
    /// The policy a call runs under when one side asks for `self` and the other for `other`:
    /// the stricter of the two. `auto` yields to any other policy and equal policies agree;
    /// two different restrictions (say `relay-only` and `direct-only`) cannot both hold: `None`.
    pub fn combine(self, other: Policy) -> Option<Policy> {
        match (self, other) {
            (Self::Auto, p) | (p, Self::Auto) => Some(p),
            (a, b) if a == b => Some(a),
            _ => None,
        }
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => Self::Auto,
            "direct-only" => Self::DirectOnly,
            "relay-only" => Self::RelayOnly,
            "lan-only" => Self::LanOnly,
            other => {
                return Err(format!(
                    "unknown policy {other:?}: use auto, direct-only, relay-only or lan-only"
                ));
            }
        })
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallFailure {
    /// Nobody is registered under that name right now.
    Offline,
    /// A peer cannot call itself.
    SelfCall,
    /// The callee has as many calls as the server allows. (A callee that says it is busy
    /// declines the ringing call instead: [`Decline::Busy`].)
    Busy,
    /// A call from this caller to this callee is already ringing.
    AlreadyRinging,
    /// The callee was rung as often as the server allows for now (`rings_per_callee_per_min`).
    RateLimited,
    /// The callee's server (another node of the cluster), or the cluster's registry, cannot be
    /// reached now (version 8).
    Unavailable,
}

/// The addresses a peer can be reached at, as the server knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Candidates {
    /// Its public UDP address as the server observed it (from a token STUN binding), if known.
    pub public: Option<SocketAddr>,
    /// The private LAN addresses it reported.
    pub lan: Vec<SocketAddr>,
    /// How its NAT maps ports, as it reported ([`ClientMsg::NatMapping`]).
    pub mapping: Mapping,
    /// The public address its router mapped to its socket on request (UPnP-IGD, NAT-PMP,
    /// PCP), as it reported ([`ClientMsg::NatMapping`]).
    pub port_mapped: Option<SocketAddr>,
}

/// Whether `addr` could be a public address a router mapped: not unspecified, loopback,
/// private, link-local, multicast or broadcast, and not port 0. (Documentation and benchmarking
/// ranges pass: labs use them.) A peer that names another address would only have others check
/// it; this keeps those checks off their own hosts and LANs.
pub fn plausible_public(addr: SocketAddr) -> bool {
    if addr.port() == 0 {
        return false;
    }
    match addr.ip() {
        std::net::IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast())
        }
        std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xe000 == 0x2000,
    }
}

/// Messages from the server to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ServerMsg {
    /// Sent right after the hello: the challenge to sign, and the TCP source address the server
    /// sees for this connection.
    Welcome { challenge: [u8; 32], observed: SocketAddr },
    /// Registration accepted. `token` authenticates STUN binding requests that record the
    /// peer's public UDP address. STUN goes to `stun_addr`, or, when it is `None`, to the address
    /// the peer connected to (UDP, same port number). Relay frames sent to this peer are
    /// acknowledged with [`ClientMsg::RelayAck`] every `relay_ack_every` frames read. The server
    /// also answers STUN on `stun_alt_port` at the same IP, when it names one, so the peer can
    /// tell how its NAT maps ports ([`ClientMsg::NatMapping`]).
    Registered {
        name: String,
        fingerprint: Fingerprint,
        token: TokenCredentials,
        stun_addr: Option<SocketAddr>,
        relay_ack_every: u32,
        stun_alt_port: Option<u16>,
    },
    /// Answer to [`ClientMsg::Lookup`].
    Presence {
        name: String,
        online: bool,
        fingerprint: Option<Fingerprint>,
    },
    /// Liveness and RTT probe; `rtt_us` is the last RTT the server measured, if any.
    Ping { nonce: u64, rtt_us: Option<u64> },
    /// The server is shutting down: finish, close, reconnect after `reconnect_after_ms`. (A
    /// registration taken over by a newer connection gets [`ServerMsg::Replaced`] instead.)
    GoingAway { reason: String, reconnect_after_ms: u32 },
    /// Your call request `request` rings; the call has id `call`.
    Ringing { request: u32, call: u32 },
    /// Your call request `request` (to `callee`) could not be placed.
    CallFailed {
        request: u32,
        callee: String,
        failure: CallFailure,
    },
    /// `caller` (key `fingerprint`) calls you with `policy`; answer with [`ClientMsg::Answer`].
    Incoming {
        call: u32,
        caller: String,
        fingerprint: Fingerprint,
        policy: Policy,
    },
    /// A call is accepted: see [`CallStart`]. Relay frames for its id are forwarded from now on.
    Start(CallStart),
    /// Call `call` ended (hung up, not answered, a member left; declined by a version 5 callee).
    CallEnded { call: u32, reason: String },
    /// The other member of call `call` lost its connection to this server without hanging up:
    /// the server has forgotten the call (no relay for it). The peers may still reach each
    /// other directly; to get the call back (and its relay) send [`ClientMsg::Resume`].
    CallSuspended { call: u32 },
    /// Call `call` (the id given in [`ClientMsg::Resume`]) is active again on this server with
    /// id `id`: relay frames use `id` from now on.
    Resumed { call: u32, id: u32 },
    /// Call `call` could not be resumed here (the other member did not resume it in time, or
    /// the names or proofs do not match); the reason is for a person.
    ResumeFailed { call: u32, reason: String },
    /// Answer to [`ClientMsg::ReleaseName`]: `name` is free; the server closes the connection.
    NameReleased { name: String },
    /// A [`ClientMsg::Lookup`] of `name` was not answered (over `lookups_per_min`); the reason
    /// is for a person.
    LookupFailed { name: String, reason: String },
    /// The relay's budget for what this peer sends in call `call`: the rate (bit/s) the other
    /// member drains from its buffer, less what the server's other traffic to it takes, while
    /// that buffer is the bottleneck. `dropped` counts this call's frames the buffer dropped
    /// since the previous budget. Sent every `relay.budget_interval_ms` while the receiver is
    /// limited; a sender obeys it for a few seconds after the last one (an SFU's REMB).
    RelayBudget { call: u32, bps: u64, dropped: u32 },
    /// This peer is in room `room` now (answer to [`ClientMsg::RoomCreate`] or
    /// [`ClientMsg::RoomJoin`]). Relay frames sent with call id `id` go to every other member
    /// (fan-out). `code` (to the creator only) lets others join without an invitation;
    /// `members`: the others in the room now.
    RoomJoined {
        room: String,
        id: u32,
        code: Option<String>,
        members: Vec<RoomMember>,
    },
    /// A [`ClientMsg::RoomCreate`] or [`ClientMsg::RoomJoin`] of `room` was refused; the
    /// reason is for a person.
    RoomRefused {
        room: String,
        refusal: RoomRefusal,
        reason: String,
    },
    /// `member` joined room `room`.
    RoomMemberJoined { room: String, member: RoomMember },
    /// `name` left room `room` (it left, or its connection ended: `reason`).
    RoomMemberLeft { room: String, name: String, reason: String },
    /// A pairwise session with another member of room `room`, set up by the server when one of
    /// the two joined (nobody rings): connect as for [`ServerMsg::Start`] (the joiner
    /// controls). The members hand each other their media keys over it, and send mesh media
    /// on it. It ends with [`ServerMsg::CallEnded`] when either leaves the room.
    RoomPeer { room: String, start: CallStart },
    /// To the caller (version 6): the callee declined ringing call `call`, for `decline`; the
    /// call is gone.
    CallDeclined { call: u32, decline: Decline },
    /// A newer connection registered this peer's name with the same key (from `by`, the TCP
    /// source address the server sees for it) and took over the registration (version 6). This
    /// connection is no longer registered: its calls are treated as on a lost connection and
    /// the server closes it next. Do not register again: that would take the name back from
    /// the newer session, which would take it back in turn.
    Replaced { by: SocketAddr },
    /// This server is going away (version 8): register with one of `servers` (other nodes of
    /// its cluster, best first) instead. Sent before [`ServerMsg::GoingAway`] when the server
    /// drains and knows other nodes.
    MoveTo { servers: Vec<SocketAddr> },
}

/// A member of a room, as the others are told of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMember {
    /// Its name.
    pub name: String,
    /// Its key (the other members pin it for their pairwise sessions).
    pub fingerprint: Fingerprint,
}

/// Why a room could not be created or joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoomRefusal {
    /// The room's name is not a valid name, or an invited name is not.
    InvalidName,
    /// A room of that name exists.
    Exists,
    /// No room of that name exists.
    NoSuchRoom,
    /// Neither invited nor holding the room's join code.
    NotInvited,
    /// The room has `limits.max_room_members` members.
    Full,
    /// The server has `limits.max_rooms` rooms.
    TooManyRooms,
    /// This peer is in `limits.max_rooms_per_peer` rooms.
    PeerRoomLimit,
    /// This peer is in the room already.
    AlreadyMember,
    /// Over `limits.room_joins_per_min` attempts from this connection.
    RateLimited,
}

/// What the server sends both members when a call is accepted: connect to `peer` (key
/// `fingerprint`) at `candidates`, checks authenticated with `password`; the controlling side
/// nominates. Begin after `delay_ms`, so both sides start within a fraction of an RTT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallStart {
    /// The call's id on this server.
    pub call: u32,
    /// The other member's name.
    pub peer: String,
    /// The other member's key.
    pub fingerprint: Fingerprint,
    /// Where the other member may be reached.
    pub candidates: Candidates,
    /// The password of the connectivity checks (the same for both members).
    pub password: String,
    /// Whether this member nominates (the caller).
    pub controlling: bool,
    /// How long to wait before the first check.
    pub delay_ms: u32,
    /// The policy the call runs under: the stricter of the caller's and the callee's
    /// ([`Policy::combine`]; the caller's alone for a callee that answered with
    /// [`ClientMsg::Answer`], and `auto` for a room's session).
    pub policy: Policy,
}

#[cfg(test)]
mod reach_tests {
    use super::*;

    #[test]
    fn any_step_a_peer_reports_is_classified_without_overflow() {
        assert_eq!(Mapping::Dependent { step: i32::MIN }.sequential_step(), None);
        assert_eq!(Mapping::Dependent { step: i32::MAX }.sequential_step(), None);
        assert_eq!(Mapping::Dependent { step: -16 }.sequential_step(), Some(-16));
        assert_eq!(Mapping::Dependent { step: 0 }.sequential_step(), None);
        assert_eq!(
            Mapping::Dependent { step: i32::MIN }.to_string(),
            "endpoint-dependent (random)"
        );
    }

    #[test]
    fn only_addresses_that_could_be_public_pass_as_router_mappings() {
        let ok = |s: &str| plausible_public(s.parse().expect("addr"));
        assert!(ok("11.0.0.1:4000") && ok("198.18.0.9:4000") && ok("[2001:db8::1]:4000"));
        for bad in [
            "127.0.0.1:53",
            "192.168.1.1:80",
            "10.0.0.1:4000",
            "0.0.0.0:1",
            "224.0.0.1:9",
            "11.0.0.1:0",
            "[fd00::1]:4000",
            "[::1]:4000",
            "[fe80::1]:4000",
        ] {
            assert!(!ok(bad), "{bad}");
        }
    }
}
