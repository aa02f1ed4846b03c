//! Prometheus metrics (the `metrics` crate with a per-server `metrics-exporter-prometheus`
//! recorder, no global state), served over HTTP by [`crate::http`].
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `natcall_registered_peers` | gauge | |
//! | `natcall_active_calls` | gauge | `path`: ringing, unknown, lan, direct, relay |
//! | `natcall_relayed_frames_total` | counter | `class`: control, audio, video |
//! | `natcall_relayed_bytes_total` | counter | `class` |
//! | `natcall_relay_dropped_frames_total` | counter | `class`, `reason` |
//! | `natcall_relay_dropped_bytes_total` | counter | `class`, `reason` |
//! | `natcall_relay_queued_frames` | gauge | (frames waiting in all clients' buffers) |
//! | `natcall_disconnects_total` | counter | `reason` |
//! | `natcall_stun_answered_total` | counter | |
//! | `natcall_calls_resumed_total` | counter | |
//! | `natcall_resumes_failed_total` | counter | |
//! | `natcall_pending_resumes` | gauge | (`Resume`s waiting for the other member's) |
//! | `natcall_refused_total` | counter | `reason`: a limit (see [`Refusal`]) |
//! | `natcall_max_connections` | gauge | (the connection limit in force, after the fd cap) |
//! | `natcall_names_bound` | gauge | (name → key bindings held) |
//! | `natcall_names_expired_total` | counter | (bindings freed for being unused too long) |
//! | `natcall_tracked_sources` | gauge | (sources in the per-source rate tables) |
//! | `natcall_rooms` | gauge | (rooms now) |
//! | `natcall_room_members` | gauge | (members of all rooms now) |
//! | `natcall_room_copies_total` | counter | `class`: relay frames a room's fan-out handed to receivers' buffers |

use std::sync::Arc;

use metrics::{Counter, Gauge, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use natcall_proto::relay::TrafficClass;

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Why a relay frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Audio older than its deadline.
    AudioDeadline,
    /// The receiver's buffer was over its bounds.
    Overload,
    /// Video after dropped frames, before the next key frame.
    AwaitingKeyFrame,
    /// The sender is not in an active call with that id.
    NotInCall,
    /// Over the sender's relay rate.
    RateLimit,
    /// Over the sender's rate of frames to rooms (`limits.room_frames_per_sec`).
    RoomRate,
    /// A control-class frame to a room: rooms carry media only (a control frame is never
    /// dropped, so one sender could fill every member's buffer with them).
    RoomControl,
}

impl DropReason {
    const ALL: [DropReason; 7] = [
        Self::AudioDeadline,
        Self::Overload,
        Self::AwaitingKeyFrame,
        Self::NotInCall,
        Self::RateLimit,
        Self::RoomRate,
        Self::RoomControl,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::AudioDeadline => "audio_deadline",
            Self::Overload => "overload",
            Self::AwaitingKeyFrame => "awaiting_key_frame",
            Self::NotInCall => "not_in_call",
            Self::RateLimit => "rate_limit",
            Self::RoomRate => "room_rate",
            Self::RoomControl => "room_control",
        }
    }
}

/// Why a connection ended, when it was not a normal close by the peer (those are not counted):
/// the server closed it, or the peer reset it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// A relay receiver made no progress for `relay.overload_timeout_ms`.
    Stalled,
    /// Over the control frame rate.
    RateLimited,
    /// Silent past the idle or hello timeout.
    Timeout,
    /// A malformed or unexpected frame.
    ProtocolError,
    /// Its queue of server messages overflowed (not reading).
    QueueOverflow,
    /// Registration refused (name taken, bad signature, …).
    Refused,
    /// The server drained for shutdown.
    Drain,
    /// The peer reset the connection (`ECONNRESET`/`EPIPE` on a read or a write).
    Reset,
}

impl Disconnect {
    const ALL: [Disconnect; 8] = [
        Self::Stalled,
        Self::RateLimited,
        Self::Timeout,
        Self::ProtocolError,
        Self::QueueOverflow,
        Self::Refused,
        Self::Drain,
        Self::Reset,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Stalled => "stalled",
            Self::RateLimited => "rate_limited",
            Self::Timeout => "timeout",
            Self::ProtocolError => "protocol_error",
            Self::QueueOverflow => "queue_overflow",
            Self::Refused => "refused",
            Self::Drain => "drain",
            Self::Reset => "reset",
        }
    }
}

/// Which limit refused something (a connection, a registration, a call, a lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `limits.max_connections` (possibly capped below the open-file limit).
    ServerFull,
    /// `limits.max_connections_per_ip`.
    PerIpConnections,
    /// The process ran out of file descriptors on accept.
    FdLimit,
    /// `limits.registrations_per_ip_per_min`.
    RegistrationRate,
    /// `limits.new_names_per_ip_per_hour`.
    NewNameRate,
    /// `limits.max_tracked_sources`.
    TooManySources,
    /// `limits.max_names_per_key`.
    KeyQuota,
    /// `limits.max_names`.
    NamesFull,
    /// `limits.rings_per_callee_per_min`.
    RingRate,
    /// A call from the same caller to the same callee is already ringing.
    AlreadyRinging,
    /// `limits.lookups_per_min`.
    LookupRate,
    /// `limits.max_rooms`.
    Rooms,
    /// `limits.max_room_members`.
    RoomFull,
    /// `limits.max_rooms_per_peer`.
    PeerRooms,
    /// `limits.room_joins_per_min`.
    RoomJoinRate,
    /// A join without an invitation or the room's code.
    RoomNotInvited,
}

impl Refusal {
    const ALL: [Refusal; 16] = [
        Self::ServerFull,
        Self::PerIpConnections,
        Self::FdLimit,
        Self::RegistrationRate,
        Self::NewNameRate,
        Self::TooManySources,
        Self::KeyQuota,
        Self::NamesFull,
        Self::RingRate,
        Self::AlreadyRinging,
        Self::LookupRate,
        Self::Rooms,
        Self::RoomFull,
        Self::PeerRooms,
        Self::RoomJoinRate,
        Self::RoomNotInvited,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServerFull => "server_full",
            Self::PerIpConnections => "per_ip_connections",
            Self::FdLimit => "fd_limit",
            Self::RegistrationRate => "registration_rate",
            Self::NewNameRate => "new_name_rate",
            Self::TooManySources => "too_many_sources",
            Self::KeyQuota => "key_quota",
            Self::NamesFull => "names_full",
            Self::RingRate => "ring_rate",
            Self::AlreadyRinging => "already_ringing",
            Self::LookupRate => "lookup_rate",
            Self::Rooms => "rooms",
            Self::RoomFull => "room_full",
            Self::PeerRooms => "peer_rooms",
            Self::RoomJoinRate => "room_join_rate",
            Self::RoomNotInvited => "room_not_invited",
        }
    }
}

/// Call paths as the gauge labels them.
pub const CALL_PATHS: [&str; 5] = ["ringing", "unknown", "lan", "direct", "relay"];

#[derive(Debug)]
struct Inner {
    handle: PrometheusHandle,
    registered: Gauge,
    calls: [Gauge; 5],
    relayed_frames: [Counter; 3],
    relayed_bytes: [Counter; 3],
    dropped_frames: [[Counter; 7]; 3],
    dropped_bytes: [[Counter; 7]; 3],
    queued: Gauge,
    disconnects: [Counter; 8],
    stun: Counter,
    resumed: Counter,
    resumes_failed: Counter,
    pending_resumes: Gauge,
    tls_failed: Counter,
    stun_replays: Counter,
    budgets: Counter,
    refused: [Counter; 16],
    rooms: Gauge,
    room_members: Gauge,
    room_copies: [Counter; 3],
    max_connections: Gauge,
    names_bound: Gauge,
    names_expired: Counter,
    tracked_sources: Gauge,
    redis_up: Gauge,
    redis_errors: Counter,
    visit_links: Gauge,
}

/// The server's metrics. Cheap to clone; every handle is registered once.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, *v)).collect::<Vec<_>>())
}

fn class_index(c: TrafficClass) -> usize {
    c as usize
}

impl Metrics {
    /// A fresh set of metrics with its own recorder.
    pub fn new() -> Self {
        let rec = PrometheusBuilder::new().build_recorder();
        let counter = |name, labels: &[(&'static str, &'static str)]| rec.register_counter(&key(name, labels), &META);
        let gauge = |name, labels: &[(&'static str, &'static str)]| rec.register_gauge(&key(name, labels), &META);
        let classes = TrafficClass::ALL.map(|c| c.as_str());
        let per_class = |name| classes.map(|c| counter(name, &[("class", c)]));
        let per_class_reason =
            |name| classes.map(|c| DropReason::ALL.map(|r| counter(name, &[("class", c), ("reason", r.as_str())])));
        describe(&rec);
        let inner = Inner {
            registered: gauge("natcall_registered_peers", &[]),
            calls: CALL_PATHS.map(|p| gauge("natcall_active_calls", &[("path", p)])),
            relayed_frames: per_class("natcall_relayed_frames_total"),
            relayed_bytes: per_class("natcall_relayed_bytes_total"),
            dropped_frames: per_class_reason("natcall_relay_dropped_frames_total"),
            dropped_bytes: per_class_reason("natcall_relay_dropped_bytes_total"),
            queued: gauge("natcall_relay_queued_frames", &[]),
            disconnects: Disconnect::ALL.map(|d| counter("natcall_disconnects_total", &[("reason", d.as_str())])),
            stun: counter("natcall_stun_answered_total", &[]),
            resumed: counter("natcall_calls_resumed_total", &[]),
            resumes_failed: counter("natcall_resumes_failed_total", &[]),
            pending_resumes: gauge("natcall_pending_resumes", &[]),
            tls_failed: counter("natcall_tls_handshakes_failed_total", &[]),
            stun_replays: counter("natcall_stun_replays_total", &[]),
            budgets: counter("natcall_relay_budgets_total", &[]),
            refused: Refusal::ALL.map(|r| counter("natcall_refused_total", &[("reason", r.as_str())])),
            max_connections: gauge("natcall_max_connections", &[]),
            names_bound: gauge("natcall_names_bound", &[]),
            names_expired: counter("natcall_names_expired_total", &[]),
            tracked_sources: gauge("natcall_tracked_sources", &[]),
            redis_up: gauge("natcall_cluster_redis_up", &[]),
            redis_errors: counter("natcall_cluster_redis_errors_total", &[]),
            visit_links: gauge("natcall_cluster_visit_links", &[]),
            rooms: gauge("natcall_rooms", &[]),
            room_members: gauge("natcall_room_members", &[]),
            room_copies: per_class("natcall_room_copies_total"),
            handle: rec.handle(),
        };
        Self { inner: Arc::new(inner) }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.inner.handle.render()
    }

    pub(crate) fn relayed(&self, class: TrafficClass, bytes: usize) {
        self.inner.relayed_frames[class_index(class)].increment(1);
        self.inner.relayed_bytes[class_index(class)].increment(bytes as u64);
    }

    pub(crate) fn dropped(&self, class: TrafficClass, reason: DropReason, frames: u64, bytes: usize) {
        let r = DropReason::ALL.iter().position(|x| *x == reason).unwrap_or(0);
        self.inner.dropped_frames[class_index(class)][r].increment(frames);
        self.inner.dropped_bytes[class_index(class)][r].increment(bytes as u64);
    }

    pub(crate) fn queued(&self, frames: usize) {
        self.inner.queued.increment(frames as f64);
    }

    pub(crate) fn dequeued(&self, frames: usize) {
        if frames > 0 {
            self.inner.queued.decrement(frames as f64);
        }
    }

    pub(crate) fn disconnect(&self, why: Disconnect) {
        let i = Disconnect::ALL.iter().position(|x| *x == why).unwrap_or(0);
        self.inner.disconnects[i].increment(1);
    }

    pub(crate) fn set_registered(&self, n: usize) {
        self.inner.registered.set(n as f64);
    }

    pub(crate) fn set_calls(&self, counts: [usize; 5]) {
        for (g, n) in self.inner.calls.iter().zip(counts) {
            g.set(n as f64);
        }
    }

    pub(crate) fn stun_answered(&self) {
        self.inner.stun.increment(1);
    }

    pub(crate) fn call_resumed(&self) {
        self.inner.resumed.increment(1);
    }

    pub(crate) fn resume_failed(&self) {
        self.inner.resumes_failed.increment(1);
    }

    pub(crate) fn set_pending_resumes(&self, n: usize) {
        self.inner.pending_resumes.set(n as f64);
    }

    pub(crate) fn tls_handshake_failed(&self) {
        self.inner.tls_failed.increment(1);
    }

    pub(crate) fn stun_replayed(&self) {
        self.inner.stun_replays.increment(1);
    }

    pub(crate) fn set_rooms(&self, rooms: usize, members: usize) {
        self.inner.rooms.set(rooms as f64);
        self.inner.room_members.set(members as f64);
    }

    pub(crate) fn room_copies(&self, class: TrafficClass, copies: u64) {
        self.inner.room_copies[class_index(class)].increment(copies);
    }

    /// A sender was told a receiver's budget (`RelayBudget`).
    pub(crate) fn budget_sent(&self) {
        self.inner.budgets.increment(1);
    }

    pub(crate) fn refused(&self, why: Refusal) {
        let i = Refusal::ALL.iter().position(|x| *x == why).unwrap_or(0);
        self.inner.refused[i].increment(1);
    }

    pub(crate) fn set_max_connections(&self, n: usize) {
        self.inner.max_connections.set(n as f64);
    }

    /// Publishes the number of bindings and the expired total (a running count from the store).
    pub(crate) fn set_names(&self, bound: usize, expired_total: u64) {
        self.inner.names_bound.set(bound as f64);
        self.inner.names_expired.absolute(expired_total);
    }

    pub(crate) fn set_tracked_sources(&self, n: usize) {
        self.inner.tracked_sources.set(n as f64);
    }

    /// Whether the cluster's Redis answered the last command (a cluster node only).
    pub(crate) fn set_redis_up(&self, up: bool) {
        self.inner.redis_up.set(if up { 1.0 } else { 0.0 });
    }

    pub(crate) fn redis_error(&self) {
        self.inner.redis_errors.increment(1);
    }

    pub(crate) fn set_visit_links(&self, n: usize) {
        self.inner.visit_links.set(n as f64);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn describe(rec: &PrometheusRecorder) {
    for (name, help) in [
        ("natcall_registered_peers", "Peers registered now"),
        (
            "natcall_active_calls",
            "Calls now, by the path the peers report (ringing: not answered yet)",
        ),
        (
            "natcall_relayed_frames_total",
            "Relay frames written to receivers, by traffic class",
        ),
        (
            "natcall_relayed_bytes_total",
            "Relay bytes written to receivers, by traffic class",
        ),
        (
            "natcall_relay_dropped_frames_total",
            "Relay frames dropped, by class and reason",
        ),
        (
            "natcall_relay_dropped_bytes_total",
            "Relay bytes dropped, by class and reason",
        ),
        (
            "natcall_relay_queued_frames",
            "Relay frames waiting in receivers' buffers",
        ),
        (
            "natcall_disconnects_total",
            "Connections that ended other than by the peer's close, by reason (closed by the server, or reset by the peer)",
        ),
        ("natcall_stun_answered_total", "STUN Binding requests answered"),
        (
            "natcall_calls_resumed_total",
            "Calls made active again by both members' Resume",
        ),
        (
            "natcall_resumes_failed_total",
            "Resumes answered with ResumeFailed (not matched in time, over the call limit, bad name)",
        ),
        ("natcall_pending_resumes", "Resumes waiting for the other member's"),
        ("natcall_rooms", "Rooms now"),
        ("natcall_room_members", "Members of all rooms now"),
        (
            "natcall_room_copies_total",
            "Relay frames a room's fan-out handed to its receivers' buffers, by class (one per receiver)",
        ),
        (
            "natcall_tls_handshakes_failed_total",
            "TCP connections whose TLS handshake failed or did not finish within the hello deadline",
        ),
        (
            "natcall_stun_replays_total",
            "Token bindings dropped as replays (a transaction id not newer than the last accepted)",
        ),
        (
            "natcall_relay_budgets_total",
            "RelayBudget messages sent: a receiver was the bottleneck and a sender was told what it drains",
        ),
        (
            "natcall_refused_total",
            "Connections, registrations, calls and lookups refused by a limit, by reason",
        ),
        (
            "natcall_max_connections",
            "The connection limit in force (limits.max_connections, capped below the open-file limit)",
        ),
        ("natcall_names_bound", "Name to key bindings held"),
        (
            "natcall_cluster_redis_up",
            "1 while the cluster's Redis answers, 0 while it does not (cluster nodes only)",
        ),
        (
            "natcall_cluster_redis_errors_total",
            "Redis commands that failed or missed their deadline (cluster.timeout_ms)",
        ),
        (
            "natcall_cluster_visit_links",
            "Open links speaking for this node's peers on other nodes (cross-node calls)",
        ),
        (
            "natcall_names_expired_total",
            "Name bindings freed because the name was not registered for limits.name_expiry_days",
        ),
        (
            "natcall_tracked_sources",
            "Source addresses in the per-source rate tables (at most limits.max_tracked_sources)",
        ),
    ] {
        rec.describe_counter(name.into(), None, help.into());
    }
}
