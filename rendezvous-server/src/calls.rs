//! Calls between registered peers: signalling (call, ring, answer, hang up, resume) and relay
//! routing.
//!
//! Call flow:
//! 1. the caller sends `Call { request, callee, policy }`; the server refuses it with
//!    `CallFailed` (offline, self-call, already ringing that callee, busy, the callee rung
//!    more than `limits.rings_per_callee_per_min`) or creates a **ringing** call with a fresh nonzero
//!    id and sends `Ringing` to the caller and `Incoming` to the callee;
//! 2. the callee sends `Reply` (or the older `Answer`): a decline ends the call (`CallDeclined`
//!    to the caller, saying whether the callee declined, is busy, or allows only another
//!    policy); an accept makes it **active** under the stricter of both sides' policies
//!    (`Policy::combine`; two that cannot both hold decline it as a policy conflict) and sends
//!    `Start` to both, back to back, each with the other's key, candidates, one shared password
//!    and a start delay ([`start_delays`]);
//! 3. while active, relay frames carrying the call id are forwarded, bytes untouched, from one
//!    member's connection into the other's [`Outbox`] (the relay engine's per-client buffer);
//! 4. the call ends on `Hangup` from either member (`CallEnded` with the reason to the other),
//!    or when a ringing call is not answered within `limits.ring_timeout_ms` (to both);
//! 5. when a member's connection ends without a hang-up, or its registration is replaced, the
//!    server forgets the call: the other member of an active call gets `CallSuspended` (the
//!    peers' own session may well go on), of a ringing one `CallEnded`;
//! 6. both members may then `Resume` it ([`resume`]): once both did, with the same proof, it is
//!    active again under a fresh id.
//!
//! Members are identified by connection id, not by name: a peer that re-registers from a new
//! connection is not a member of the old connection's calls (they are suspended or end).
//!
//! One lock guards the whole table (calls, the per-connection index, waiting resumes), so every
//! change keeps them consistent and the per-peer limit counts both kinds. The table arms its
//! own timers (ring and resume timeouts).
//!
//! Relay forwarding never blocks: the receiver's [`Outbox`] queues the frame and applies the
//! class policy (see `outbox.rs` and `docs/relay.md`).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use natcall_proto::control::{CallFailure, CallStart, Candidates, Decline, PathKind, Policy, Reply, ServerMsg};
use natcall_proto::frame::control_frame;
use natcall_proto::relay::RelayHeader;
use ring::rand::{SecureRandom, SystemRandom};
use tracing::{debug, info, warn};

use crate::config::Limits;
use crate::limits::{RateWindows, Verdict};
use crate::metrics::{DropReason, Metrics, Refusal};
use crate::outbox::Outbox;
use crate::registry::{PeerInfo, Registry};

pub(crate) mod resume;

/// The longest hang-up reason passed on to the other peer (bytes; longer ones are cut).
pub const MAX_REASON_LEN: usize = 256;

/// One side of a call: a registered peer on one connection.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) name: String,
    pub(crate) conn_id: u64,
    pub(crate) outbox: Arc<Outbox>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ringing,
    Active,
}

#[derive(Debug)]
struct Call {
    caller: Member,
    callee: Member,
    state: State,
    /// The caller's policy while it rings; the one the call runs under once accepted.
    policy: Policy,
    /// Distinguishes this call from a later one that reuses its id (for the ring timer).
    serial: u64,
    /// The path the members last reported.
    path: Option<PathKind>,
    /// The room whose two members this pairwise session joins (see [`Calls::start_pair`]).
    room: Option<u32>,
}

impl Call {
    /// The member on `conn_id` and the other one.
    fn sides(&self, conn_id: u64) -> Option<(&Member, &Member)> {
        if self.caller.conn_id == conn_id {
            Some((&self.caller, &self.callee))
        } else if self.callee.conn_id == conn_id {
            Some((&self.callee, &self.caller))
        } else {
            None
        }
    }
}

#[derive(Debug)]
struct Table {
    calls: HashMap<u32, Call>,
    /// connection id → ids of the calls it is a member of.
    by_conn: HashMap<u64, Vec<u32>>,
    /// `Resume`s waiting for the other member's.
    resumes: resume::Pending,
    next_serial: u64,
    /// Rings per callee name and minute (`limits.rings_per_callee_per_min`).
    rings: RateWindows<String>,
}

impl Table {
    fn new(limits: &Limits) -> Self {
        Self {
            calls: HashMap::new(),
            by_conn: HashMap::new(),
            resumes: resume::Pending::default(),
            next_serial: 0,
            rings: RateWindows::new(
                limits.rings_per_callee_per_min,
                Duration::from_secs(60),
                limits.max_tracked_sources,
            ),
        }
    }

    /// Whether `caller` (on `conn_id`) already rings `callee`.
    fn rings_already(&self, conn_id: u64, caller: &str, callee: &str) -> bool {
        self.by_conn.get(&conn_id).into_iter().flatten().any(|id| {
            self.calls
                .get(id)
                .is_some_and(|c| c.state == State::Ringing && c.caller.name == caller && c.callee.name == callee)
        })
    }

    /// Calls of connection `conn_id` and its waiting resumes (at most `max_per_peer`); a
    /// room's pairwise sessions are bounded by the room limits instead.
    fn count(&self, conn_id: u64) -> usize {
        let calls = self.by_conn.get(&conn_id).into_iter().flatten();
        calls
            .filter(|id| self.calls.get(id).is_some_and(|c| c.room.is_none()))
            .count()
            + self.resumes.count(conn_id)
    }

    fn insert(&mut self, id: u32, call: Call) {
        for conn in [call.caller.conn_id, call.callee.conn_id] {
            self.by_conn.entry(conn).or_default().push(id);
        }
        self.calls.insert(id, call);
    }

    fn remove(&mut self, id: u32) -> Option<Call> {
        let call = self.calls.remove(&id)?;
        for conn in [call.caller.conn_id, call.callee.conn_id] {
            if let Entry::Occupied(mut e) = self.by_conn.entry(conn) {
                e.get_mut().retain(|c| *c != id);
                if e.get().is_empty() {
                    e.remove();
                }
            }
        }
        Some(call)
    }
}

/// Relay counters since the server started.
#[derive(Debug, Default)]
pub struct RelayStats {
    forwarded: AtomicU64,
    dropped_not_in_call: AtomicU64,
    dropped_rate: AtomicU64,
}

/// A snapshot of [`RelayStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayCounts {
    /// Frames handed to the other member's buffer (which may still drop them by class).
    pub forwarded: u64,
    /// Frames for a call the sender is not a member of, or that is not active.
    pub dropped_not_in_call: u64,
    /// Frames over the sender's `limits.relay_frames_per_sec`.
    pub dropped_rate: u64,
}

impl RelayStats {
    /// The counters now.
    pub fn counts(&self) -> RelayCounts {
        RelayCounts {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            dropped_not_in_call: self.dropped_not_in_call.load(Ordering::Relaxed),
            dropped_rate: self.dropped_rate.load(Ordering::Relaxed),
        }
    }

    /// Counts a frame dropped for exceeding the sender's relay rate.
    pub(crate) fn count_rate_drop(&self) {
        self.dropped_rate.fetch_add(1, Ordering::Relaxed);
    }
}

/// The call table. It arms its own timers (ring and resume timeouts), which hold it weakly:
/// they do nothing once the table is gone.
#[derive(Debug)]
pub struct Calls {
    table: RwLock<Table>,
    max_per_peer: usize,
    ring_timeout: Duration,
    resume_timeout: Duration,
    rng: SystemRandom,
    stats: RelayStats,
    metrics: Metrics,
    /// This table, for its timers.
    me: Weak<Calls>,
}

fn read(t: &RwLock<Table>) -> RwLockReadGuard<'_, Table> {
    // Every update keeps `calls` and `by_conn` consistent before it can panic (inserts and
    // removes are single steps), so a poisoned lock is still usable.
    t.read().unwrap_or_else(|p| p.into_inner())
}

fn write(t: &RwLock<Table>) -> RwLockWriteGuard<'_, Table> {
    t.write().unwrap_or_else(|p| p.into_inner())
}

/// Queues a control message to a member; a full or closed queue drops it (logged).
fn deliver(to: &Member, msg: &ServerMsg) {
    let frame = match control_frame(msg) {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, "cannot encode a call message");
            return;
        }
    };
    if !to.outbox.push_server(frame) {
        debug!(peer = %to.name, "call message not queued: the peer is not reading");
    }
}

fn ended(to: &Member, call: u32, reason: String) {
    deliver(to, &ServerMsg::CallEnded { call, reason });
}

/// The registry entry of `m`, if it is still registered on the same connection.
fn current(registry: &Registry, m: &Member) -> Option<PeerInfo> {
    registry.peer(&m.name).filter(|p| p.conn_id == m.conn_id)
}

/// How long each side waits after receiving `Start` so both begin at the same moment.
///
/// `Start` reaches each side half its RTT after the server sends it; the side with the shorter
/// RTT waits half the difference. A missing RTT counts as 0. Returns (delay of a, delay of b)
/// in whole milliseconds.
pub fn start_delays(rtt_a: Option<Duration>, rtt_b: Option<Duration>) -> (u32, u32) {
    let (a, b) = (rtt_a.unwrap_or_default(), rtt_b.unwrap_or_default());
    let longest = a.max(b);
    let ms = |own: Duration| u32::try_from(((longest - own) / 2).as_millis()).unwrap_or(u32::MAX);
    (ms(a), ms(b))
}

impl Calls {
    /// An empty table with the call limits of `limits` (`max_calls_per_peer`,
    /// `ring_timeout_ms`, `resume_timeout_ms`).
    pub fn new(limits: &Limits, metrics: Metrics) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            table: RwLock::new(Table::new(limits)),
            max_per_peer: limits.max_calls_per_peer,
            ring_timeout: limits.ring_timeout(),
            resume_timeout: limits.resume_timeout(),
            rng: SystemRandom::new(),
            stats: RelayStats::default(),
            metrics,
            me: me.clone(),
        })
    }

    /// Runs `then` on this table after `after`, if the table still exists. Needs a tokio
    /// runtime (every caller runs on one).
    fn arm(&self, after: Duration, then: impl FnOnce(&Calls) + Send + 'static) {
        let me = self.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(calls) = me.upgrade() {
                then(&calls);
            }
        });
    }

    /// Publishes the number of calls by path, and of waiting resumes.
    fn publish(&self, table: &Table) {
        self.metrics.set_pending_resumes(table.resumes.len());
        let mut counts = [0usize; 5];
        for call in table.calls.values() {
            let i = match (call.state, call.path) {
                (State::Ringing, _) => 0,
                (State::Active, None) => 1,
                (State::Active, Some(PathKind::Lan)) => 2,
                (State::Active, Some(PathKind::Direct)) => 3,
                (State::Active, Some(PathKind::Relay)) => 4,
            };
            counts[i] += 1;
        }
        self.metrics.set_calls(counts);
    }

    /// Records the path a member of call `id` reports.
    pub(crate) fn set_path(&self, conn_id: u64, id: u32, path: PathKind) {
        let mut table = write(&self.table);
        if let Some(call) = table.calls.get_mut(&id).filter(|c| c.sides(conn_id).is_some()) {
            call.path = Some(path);
            self.publish(&table);
        }
    }

    /// Relay counters.
    pub fn relay_stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Number of calls, ringing or active.
    pub fn len(&self) -> usize {
        read(&self.table).calls.len()
    }

    /// Whether there are no calls.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of `Resume`s waiting for the other member's.
    pub fn waiting_resumes(&self) -> usize {
        read(&self.table).resumes.len()
    }

    fn random_u32(&self) -> u32 {
        let mut b = [0u8; 4];
        // SystemRandom only fails when the OS has no randomness at all.
        self.rng.fill(&mut b).expect("the OS random source works");
        u32::from_be_bytes(b)
    }

    /// A nonzero id no live call has.
    fn fresh_id(&self, table: &Table) -> u32 {
        loop {
            // Rooms' ids have the top bit set: a call's never does.
            let id = self.random_u32() & !natcall_proto::relay::ROOM_ID_BIT;
            if id != 0 && !table.calls.contains_key(&id) {
                return id;
            }
        }
    }

    /// Handles `Call { request, callee, policy }` from `caller`: refuses it, or rings and arms
    /// the ring timer.
    pub(crate) fn place(&self, registry: &Registry, caller: Member, request: u32, callee: &str, policy: Policy) {
        if let Some((id, serial)) = self.ring(registry, caller, request, callee, policy) {
            self.arm(self.ring_timeout, move |calls| calls.expire(id, serial));
        }
    }

    /// Refuses a call (`CallFailed`) or creates it ringing. Returns its id and serial.
    fn ring(
        &self,
        registry: &Registry,
        caller: Member,
        request: u32,
        callee: &str,
        policy: Policy,
    ) -> Option<(u32, u64)> {
        let fail = |failure| {
            debug!(peer = %caller.name, %callee, request, ?failure, "call refused");
            deliver(
                &caller,
                &ServerMsg::CallFailed {
                    request,
                    callee: callee.to_owned(),
                    failure,
                },
            );
            None
        };
        if callee == caller.name {
            return fail(CallFailure::SelfCall);
        }
        // The registry is read under the table's lock, so a callee that leaves meanwhile either
        // is seen offline here or finds this call when its calls are ended.
        let mut table = write(&self.table);
        let Some(callee_info) = registry.peer(callee) else {
            return fail(CallFailure::Offline);
        };
        let Some(caller_info) = current(registry, &caller) else {
            return None; // replaced meanwhile: its calls are being ended
        };
        if table.rings_already(caller.conn_id, &caller.name, callee) {
            self.metrics.refused(Refusal::AlreadyRinging);
            return fail(CallFailure::AlreadyRinging);
        }
        if table.count(caller.conn_id) >= self.max_per_peer || table.count(callee_info.conn_id) >= self.max_per_peer {
            return fail(CallFailure::Busy);
        }
        // Counted only for calls that would ring: a refused call does not use the callee's rate.
        if table
            .rings
            .check(&callee.to_owned(), tokio::time::Instant::now().into_std())
            != Verdict::Allowed
        {
            self.metrics.refused(Refusal::RingRate);
            return fail(CallFailure::RateLimited);
        }
        let id = self.fresh_id(&table);
        table.next_serial += 1;
        let serial = table.next_serial;
        let callee = Member {
            name: callee.to_owned(),
            conn_id: callee_info.conn_id,
            outbox: callee_info.outbox,
        };
        deliver(&caller, &ServerMsg::Ringing { request, call: id });
        deliver(
            &callee,
            &ServerMsg::Incoming {
                call: id,
                caller: caller.name.clone(),
                fingerprint: caller_info.fingerprint,
                policy,
            },
        );
        info!(call = id, caller = %caller.name, callee = %callee.name, %policy, "call ringing");
        let call = Call {
            caller,
            callee,
            state: State::Ringing,
            policy,
            serial,
            path: None,
            room: None,
        };
        table.insert(id, call);
        self.publish(&table);
        Some((id, serial))
    }

    /// Handles `Reply { call, reply }` (or the older `Answer`) from connection `conn_id`.
    pub(crate) fn answer(&self, registry: &Registry, conn_id: u64, id: u32, reply: Reply) {
        let mut table = write(&self.table);
        let ringing_for_me = table
            .calls
            .get(&id)
            .is_some_and(|c| c.callee.conn_id == conn_id && c.state == State::Ringing);
        if !ringing_for_me {
            debug!(
                call = id,
                conn = conn_id,
                "answer for no call ringing at this peer; ignored"
            );
            return;
        }
        let policy = match reply {
            Reply::Accept { policy } => policy,
            Reply::Decline(decline) => return self.decline(&mut table, id, decline),
        };
        let Some(call) = table.calls.get_mut(&id) else {
            return;
        };
        let Some(policy) = call.policy.combine(policy) else {
            // The callee did not check the caller's policy against its own: decline for it.
            let why = format!(
                "{}'s call asks for {}, and you allow only {policy}",
                call.caller.name, call.policy
            );
            ended(&call.callee, id, why);
            return self.decline(&mut table, id, Decline::Policy { allowed: policy });
        };
        call.policy = policy;
        let (Some(caller), Some(callee)) = (current(registry, &call.caller), current(registry, &call.callee)) else {
            // A member left and its calls are about to be ended; let that say so.
            return;
        };
        call.state = State::Active;
        let (to_caller, to_callee) = self.starts(id, call.policy, (&call.caller, &caller), (&call.callee, &callee));
        let delays = (to_caller.delay_ms, to_callee.delay_ms);
        deliver(&call.caller, &ServerMsg::Start(to_caller));
        deliver(&call.callee, &ServerMsg::Start(to_callee));
        info!(call = id, caller = %call.caller.name, callee = %call.callee.name, ?delays, "call active");
        self.publish(&table);
    }

    /// Ends ringing call `id`, telling the caller why the callee declined it.
    fn decline(&self, table: &mut Table, id: u32, decline: Decline) {
        if let Some(call) = table.remove(id) {
            info!(call = id, callee = %call.callee.name, ?decline, "call declined");
            deliver(&call.caller, &ServerMsg::CallDeclined { call: id, decline });
        }
        self.publish(table);
    }

    /// Handles `Hangup { call, reason }` from connection `conn_id`: ends its call `id`, or else
    /// withdraws its waiting `Resume` of call `id`.
    pub(crate) fn hangup(&self, conn_id: u64, id: u32, reason: &str) {
        let mut table = write(&self.table);
        if table.calls.get(&id).and_then(|c| c.sides(conn_id)).is_none() {
            if let Some(w) = table.resumes.remove_call(conn_id, id) {
                info!(call = id, peer = %w.member().name, "resume withdrawn");
                self.publish(&table);
                return;
            }
            debug!(
                call = id,
                conn = conn_id,
                "hangup for a call this peer is not in; ignored"
            );
            return;
        }
        let Some(call) = table.remove(id) else {
            return;
        };
        let Some((me, other)) = call.sides(conn_id) else {
            return;
        };
        let reason = truncate(reason.trim(), MAX_REASON_LEN);
        info!(call = id, peer = %me.name, %reason, "call hung up");
        let text = if reason.is_empty() {
            format!("{} hung up", me.name)
        } else {
            format!("{} hung up: {reason}", me.name)
        };
        ended(other, id, text);
        self.publish(&table);
    }

    /// Connection `conn_id` ended or was replaced. The other member of each of its active calls
    /// gets `CallSuspended`, of each ringing one `CallEnded` with `why`, or "<name> left"; its
    /// waiting resumes are dropped.
    pub(crate) fn leave(&self, conn_id: u64, why: Option<String>) {
        let mut table = write(&self.table);
        let ids = table.by_conn.get(&conn_id).cloned().unwrap_or_default();
        for id in ids {
            let Some(call) = table.remove(id) else {
                continue;
            };
            let Some((me, other)) = call.sides(conn_id) else {
                continue;
            };
            match call.state {
                State::Active if call.room.is_some() => {
                    // Its connection ended, so it left the room: the session ends with it.
                    info!(call = id, peer = %me.name, other = %other.name, "room session ended: member left");
                    ended(other, id, format!("{} left the room", me.name));
                }
                State::Active => {
                    info!(call = id, peer = %me.name, other = %other.name, "call suspended: member left");
                    deliver(other, &ServerMsg::CallSuspended { call: id });
                }
                State::Ringing => {
                    info!(call = id, peer = %me.name, "call ended: member left while it rang");
                    ended(other, id, why.clone().unwrap_or_else(|| format!("{} left", me.name)));
                }
            }
        }
        let dropped = table.resumes.remove_conn(conn_id).len();
        if dropped > 0 {
            debug!(
                conn = conn_id,
                dropped, "waiting resumes dropped: their connection ended"
            );
        }
        self.publish(&table);
    }

    /// Sets up the pairwise session of `joiner`, who just joined room `room_name` (id
    /// `room`), and `other`, a member already in it: an active call (its relay frames are
    /// forwarded as any call's) announced to both with `RoomPeer`; the joiner controls.
    pub(crate) fn start_pair(&self, registry: &Registry, room_name: &str, room: u32, joiner: Member, other: Member) {
        let (Some(j), Some(o)) = (current(registry, &joiner), current(registry, &other)) else {
            // One of them left; its room membership ends with it.
            return;
        };
        let mut table = write(&self.table);
        let id = self.fresh_id(&table);
        table.next_serial += 1;
        let (to_joiner, to_other) = self.starts(id, Policy::Auto, (&joiner, &j), (&other, &o));
        let peer_msg = |start| ServerMsg::RoomPeer {
            room: room_name.to_owned(),
            start,
        };
        deliver(&joiner, &peer_msg(to_joiner));
        deliver(&other, &peer_msg(to_other));
        debug!(call = id, room = room_name, joiner = %joiner.name, other = %other.name, "room session started");
        let call = Call {
            caller: joiner,
            callee: other,
            state: State::Active,
            policy: Policy::Auto,
            serial: table.next_serial,
            path: None,
            room: Some(room),
        };
        table.insert(id, call);
        self.publish(&table);
    }

    /// Connection `conn_id` left room `room`: its pairwise sessions in that room end, the
    /// other member of each told why.
    pub(crate) fn end_pairs(&self, conn_id: u64, room: u32) {
        let mut table = write(&self.table);
        let ids = table.by_conn.get(&conn_id).cloned().unwrap_or_default();
        for id in ids {
            if table.calls.get(&id).is_none_or(|c| c.room != Some(room)) {
                continue;
            }
            let Some(call) = table.remove(id) else { continue };
            if let Some((me, other)) = call.sides(conn_id) {
                ended(other, id, format!("{} left the room", me.name));
                ended(me, id, "you left the room".into());
            }
        }
        self.publish(&table);
    }

    /// The `CallStart`s of call `id` for its controlling member `a` and for `b` (each with the
    /// other's key and candidates, one password, the start delays of their RTTs).
    fn starts(
        &self,
        id: u32,
        policy: Policy,
        a: (&Member, &PeerInfo),
        b: (&Member, &PeerInfo),
    ) -> (CallStart, CallStart) {
        let (a_delay, b_delay) = start_delays(a.1.rtt, b.1.rtt);
        let password = crate::registry::random_hex(&self.rng, 16);
        let start = |peer: &Member, info: &PeerInfo, controlling, delay_ms| CallStart {
            call: id,
            peer: peer.name.clone(),
            fingerprint: info.fingerprint,
            candidates: candidates(info),
            password: password.clone(),
            controlling,
            delay_ms,
            policy,
        };
        (start(b.0, b.1, true, a_delay), start(a.0, a.1, false, b_delay))
    }

    /// Ends call `id` if it is the same call (`serial`) and still ringing.
    fn expire(&self, id: u32, serial: u64) {
        let mut table = write(&self.table);
        let ringing = table
            .calls
            .get(&id)
            .is_some_and(|c| c.serial == serial && c.state == State::Ringing);
        if !ringing {
            return;
        }
        if let Some(call) = table.remove(id) {
            info!(call = id, caller = %call.caller.name, callee = %call.callee.name, "call not answered in time");
            ended(&call.caller, id, "no answer".into());
            ended(&call.callee, id, "no answer".into());
        }
        self.publish(&table);
    }

    /// Forwards relay frame `wire` (the whole frame as received, with its parsed `header`) from
    /// connection `conn_id` into the buffer of the other member of the active call; drops and
    /// counts it otherwise. Never blocks: the receiver's buffer applies the class policy.
    pub(crate) fn relay(&self, conn_id: u64, header: &RelayHeader, wire: Bytes, now: Instant) {
        let table = read(&self.table);
        let sides = match table.calls.get(&header.call) {
            Some(call) if call.state == State::Active => call.sides(conn_id).map(|(_, other)| other.outbox.clone()),
            _ => None,
        };
        drop(table);
        let Some(other) = sides else {
            self.stats.dropped_not_in_call.fetch_add(1, Ordering::Relaxed);
            self.metrics.dropped(header.class, DropReason::NotInCall, 1, wire.len());
            debug!(
                call = header.call,
                conn = conn_id,
                "relay frame outside an active call of this peer dropped"
            );
            return;
        };
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        if let Some(g) = other.push_relay(conn_id, wire, header, now) {
            // The receiver is the bottleneck: tell this sender what it may send it (rare: at
            // most once per budget interval, so the table is looked up again only then).
            let table = read(&self.table);
            if let Some((me, _)) = table.calls.get(&header.call).and_then(|c| c.sides(conn_id)) {
                self.metrics.budget_sent();
                let msg = ServerMsg::RelayBudget {
                    call: header.call,
                    bps: g.bps,
                    dropped: g.dropped,
                };
                deliver(me, &msg);
            }
        }
    }
}

fn candidates(info: &PeerInfo) -> Candidates {
    Candidates {
        public: info.public_udp,
        lan: info.lan_addrs.clone(),
        mapping: info.mapping,
        port_mapped: info.port_mapped,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Option<Duration> {
        Some(Duration::from_millis(v))
    }

    #[test]
    fn the_side_with_the_shorter_rtt_waits_half_the_difference() {
        assert_eq!(start_delays(ms(20), ms(100)), (40, 0));
        assert_eq!(start_delays(ms(100), ms(20)), (0, 40));
        assert_eq!(start_delays(ms(30), ms(30)), (0, 0));
    }

    #[test]
    fn a_missing_rtt_counts_as_zero() {
        assert_eq!(start_delays(None, ms(80)), (40, 0));
        assert_eq!(start_delays(ms(80), None), (0, 40));
        assert_eq!(start_delays(None, None), (0, 0));
    }

    #[test]
    fn delays_are_whole_milliseconds_rounded_down() {
        assert_eq!(
            start_delays(Some(Duration::from_micros(500)), Some(Duration::from_micros(3_900))),
            (1, 0)
        );
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("hello", 10), "hello");
    }
}
