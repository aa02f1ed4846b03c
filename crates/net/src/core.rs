//! [`PeerCore`]: every call of an endpoint in one deterministic object — no socket, clock,
//! task or lock (the quinn-proto `Endpoint` shape).
//!
//! It owns the call table (keyed by a local [`CallId`], which is also the request id of a call
//! placed by this side, so two calls to one name never collide), each call's traversal agent,
//! its [`PathPolicy`], the route from each call's [`FakeAddr`] to its current path (LAN or
//! punched UDP address, or the relay), the keys the server vouched for, STUN routing (a check
//! by its USERNAME, a response by its transaction id, each to exactly one call), the token
//! binding that keeps this peer's public address, the relay's health-check count, and which
//! calls must be re-announced (`Resume`) to a new or restarted server.
//!
//! # Drive contract
//! The core does nothing on its own. After **every** `handle_*` call and every call that acts
//! on a call ([`PeerCore::place_call`], [`PeerCore::accept`], [`PeerCore::release`], …) the
//! caller must:
//! 1. drain [`PeerCore::poll_transmit`] and send each datagram from the UDP socket;
//! 2. drain [`PeerCore::poll_control`] and queue each message on the control connection, in the
//!    lane it names;
//! 3. drain [`PeerCore::poll_event`] and act on it;
//! 4. re-read [`PeerCore::poll_timeout`] and call [`PeerCore::handle_timeout`] then.
//!
//! `now` must never go backwards. What the application may wait for (a call's path, its end)
//! is read with [`PeerCore::call`]; every such change bumps the call's `version` and sets
//! [`PeerCore::poll_changed`].

mod call;
mod fake;
mod policy;
mod server;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natcall_proto::control::{
    CallFailure, CallStart, ClientMsg, Decline, Fingerprint, PathKind as WirePath, Policy, Reply, ServerMsg,
};
use natcall_proto::stun::{self as wire, PacketClass};
use natcall_traversal::{Agent, Credentials, Event as AgentEvent};
use tracing::{debug, info, trace};

pub(crate) use call::{CallEnd, CallView, Phase};
use call::{CallState, Carrier, Resume};
pub use call::{Path, PathChange, Role, TraversalReport};
pub(crate) use fake::{CallId, FakeAddr};
pub(crate) use policy::Fallback;
use policy::{Birthday, PathPolicy};
pub(crate) use server::Registered;
use server::ServerLink;

/// Timings and identity of a [`PeerCore`].
#[derive(Debug, Clone)]
pub(crate) struct CoreConfig {
    /// This peer's name (its check username fragment).
    pub(crate) name: String,
    /// The traversal agents' timings.
    pub(crate) traversal: natcall_traversal::Config,
    /// Seed of the core's PRNG (transaction ids, agents' seeds).
    pub(crate) seed: u64,
    /// How long a placed or accepted call waits for the server's `Start`.
    pub(crate) ring_timeout: Duration,
    /// How long a released call's route stays for its QUIC close.
    pub(crate) linger: Duration,
    /// Longest a hang-up waits for the call's QUIC close to leave first.
    pub(crate) hangup_hold: Duration,
    /// How often the public mapping is refreshed (NAT UDP timeouts are rarely below 30 s).
    pub(crate) stun_refresh: Duration,
    /// Retransmits of the token binding; after the last the UDP path to the server counts as
    /// blocked.
    pub(crate) stun_rto: Vec<Duration>,
}

impl CoreConfig {
    pub(crate) fn new(name: impl Into<String>, traversal: natcall_traversal::Config, seed: u64) -> Self {
        Self {
            name: name.into(),
            traversal,
            seed,
            ring_timeout: Duration::from_secs(40),
            linger: Duration::from_secs(1),
            hangup_hold: Duration::from_millis(50),
            stun_refresh: Duration::from_secs(20),
            stun_rto: vec![
                Duration::from_millis(250),
                Duration::from_millis(500),
                Duration::from_millis(1000),
            ],
        }
    }
}

/// Where packets to a fake address go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Nowhere (no path yet, or the relay with no server): the packet is lost; QUIC retransmits.
    Void,
    /// A real UDP address: LAN or punched.
    Udp(SocketAddr),
    /// Relay frames with this server call id.
    Relay(u32),
}

/// What a datagram from the UDP socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Datagram {
    /// QUIC of this call: hand it to quinn as coming from this address.
    Quic(FakeAddr),
    /// A media packet of this call.
    Media(CallId),
    /// Taken by the core (a check, a response, the server's STUN answer).
    Consumed,
    /// Nobody's: dropped.
    Dropped,
}

/// What a frame from the relay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RelayIn {
    /// The call it belongs to, if it is a live one.
    pub(crate) call: Option<CallId>,
    /// A health check to send now (`RelayAck { frames }`), first in the control lane.
    pub(crate) ack: Option<u32>,
}

/// Which lane of the control connection a message takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Before any relay frame.
    Control,
    /// After the relay frames queued so far (a hang-up following its call's relayed QUIC close,
    /// which the server forwards only while the call is active).
    AfterRelay,
}

/// A datagram to send from the UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transmit {
    pub(crate) destination: SocketAddr,
    pub(crate) contents: Vec<u8>,
}

/// An offer of a call to this peer.
#[derive(Debug, Clone)]
pub(crate) struct Offer {
    pub(crate) call: u32,
    pub(crate) caller: String,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) policy: Policy,
    pub(crate) received: Instant,
}

/// What the application acts on.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// Someone calls.
    Incoming(Offer),
    /// The server asked us to leave: close the control connection now, come back after `after`.
    GoingAway { reason: String, after: Duration },
    /// News of a room this peer asked for or is in (`RoomJoined`, `RoomRefused`,
    /// `RoomMemberJoined`, `RoomMemberLeft`).
    Room(ServerMsg),
    /// Birthday traversal, this side behind the symmetric NAT: open `sockets` UDP sockets and
    /// send one packet from each to `to` (the peer's public address); what comes back on one
    /// of them from `to` is input like any other, and traffic to `to` leaves from that socket
    /// from then on. The sockets belong to call `id` (closed with it, or replaced by the next
    /// `Spray` of the call).
    Spray { id: CallId, to: SocketAddr, sockets: usize },
    /// The server set up a pairwise session with `peer`, another member of `room`: call `id`
    /// (already accepted, connecting) in `role`.
    RoomPeer {
        room: String,
        peer: String,
        id: CallId,
        role: Role,
    },
}

/// Every call of an endpoint; see the module docs for the drive contract. `L` is what the async
/// layer keeps per call (its media queue, an accepted QUIC connection); the core only stores it
/// and drops it with the call.
#[derive(Debug)]
pub(crate) struct PeerCore<L> {
    config: CoreConfig,
    rng: u64,
    next_id: u32,
    calls: HashMap<CallId, CallState<L>>,
    by_server: HashMap<u32, CallId>,
    /// The servers a draining server named (`MoveTo`), until the next registration takes them.
    move_to: Vec<SocketAddr>,
    by_username: HashMap<String, CallId>,
    by_real: HashMap<SocketAddr, CallId>,
    /// Transactions of the checks agents sent: their responses carry no USERNAME.
    by_tid: HashMap<[u8; 12], (CallId, Instant)>,
    server: ServerLink,
    transmits: VecDeque<Transmit>,
    control: VecDeque<(ClientMsg, Lane)>,
    events: VecDeque<Event>,
    changed: bool,
}

/// Check transactions remembered at most (older ones are forgotten first).
const MAX_TRANSACTIONS: usize = 1024;

impl<L: Default> PeerCore<L> {
    pub(crate) fn new(config: CoreConfig) -> Self {
        let server = ServerLink::new(config.stun_rto.clone(), config.stun_refresh);
        Self {
            rng: config.seed,
            config,
            next_id: 0,
            calls: HashMap::new(),
            by_server: HashMap::new(),
            move_to: Vec::new(),
            by_username: HashMap::new(),
            by_real: HashMap::new(),
            by_tid: HashMap::new(),
            server,
            transmits: VecDeque::new(),
            control: VecDeque::new(),
            events: VecDeque::new(),
            changed: false,
        }
    }

    fn alloc(&mut self) -> CallId {
        loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            let id = CallId(self.next_id);
            if !self.calls.contains_key(&id) {
                return id;
            }
        }
    }

    /// Calls `callee` with `policy`; the returned id is also the request id the server echoes.
    pub(crate) fn place_call(&mut self, now: Instant, callee: &str, policy: Policy) -> CallId {
        let id = self.alloc();
        let mut call = CallState::new(callee.to_owned(), Role::Caller, Phase::Ringing, policy, now);
        call.ring_deadline = Some(now + self.config.ring_timeout);
        if let Some(end) = self.unavailable() {
            call.end(end);
        } else {
            self.send(ClientMsg::Call {
                request: id.0,
                callee: callee.to_owned(),
                policy,
            });
        }
        self.calls.insert(id, call);
        self.changed = true;
        id
    }

    /// Why no call can be placed or accepted now, if none can.
    fn unavailable(&self) -> Option<CallEnd> {
        if let Some(reason) = self.server.replaced() {
            return Some(CallEnd::Replaced(reason.to_owned()));
        }
        self.server
            .lost_reason()
            .map(|reason| CallEnd::ServerLost(reason.to_owned()))
    }

    /// Accepts `offer` under this side's `policy` (the server runs the call under the stricter
    /// of it and the caller's, and says which in `Start`): answers the server and waits for its
    /// `Start`.
    pub(crate) fn accept(&mut self, now: Instant, offer: &Offer, policy: Policy) -> CallId {
        let id = self.alloc();
        let mut call = CallState::new(
            offer.caller.clone(),
            Role::Callee,
            Phase::Accepted,
            offer.policy,
            offer.received,
        );
        call.offered_key = Some(offer.fingerprint);
        call.server_id = Some(offer.call);
        call.last_server_id = Some(offer.call);
        call.ring_deadline = Some(now + self.config.ring_timeout);
        if let Some(end) = self.unavailable() {
            call.end(end);
        } else {
            self.by_server.insert(offer.call, id);
            self.send(ClientMsg::Reply {
                call: offer.call,
                reply: Reply::Accept { policy },
            });
        }
        self.calls.insert(id, call);
        self.changed = true;
        id
    }

    /// Declines `offer`, saying why; the caller is told at once.
    pub(crate) fn decline(&mut self, offer: &Offer, decline: Decline) {
        debug!(caller = %offer.caller, ?decline, "declining a call");
        self.send(ClientMsg::Reply {
            call: offer.call,
            reply: Reply::Decline(decline),
        });
    }

    /// The application is done with call `id` (hung up, or its setup failed): the server is
    /// told (a running call's hang-up follows its QUIC close, see [`Lane::AfterRelay`]) and the
    /// call is forgotten once its route has lingered for the close.
    pub(crate) fn release(&mut self, now: Instant, id: CallId, reason: &str) {
        let linger = self.config.linger;
        let hold = self.config.hangup_hold;
        let up = self.server.is_up();
        let Some(call) = self.calls.get_mut(&id) else { return };
        if matches!(call.view.phase, Phase::Closing { .. }) {
            return;
        }
        let running = call.view.phase == Phase::Running;
        let hangup = call
            .server_id
            .filter(|_| up && !matches!(call.view.end, Some(CallEnd::Ended(_) | CallEnd::Refused(_))))
            .map(|server| ClientMsg::Hangup {
                call: server,
                reason: reason.to_owned(),
            });
        if running {
            call.held = hangup.map(|m| (m, now + hold));
            call.view.phase = Phase::Closing { until: now + linger };
            call.agent = None;
            call.checks_at = None;
            call.touch();
            if let Some(u) = call.username.take() {
                self.by_username.remove(&u);
            }
            debug!(call = %id, "released; route lingers for the close");
        } else {
            if let Some(m) = hangup {
                self.send(m);
            }
            self.forget(id);
        }
        self.changed = true;
    }

    /// Removes call `id` from every index.
    fn forget(&mut self, id: CallId) {
        let Some(call) = self.calls.remove(&id) else { return };
        if let Some(s) = call.server_id {
            if self.by_server.get(&s) == Some(&id) {
                self.by_server.remove(&s);
            }
        }
        if let Some(u) = call.username {
            self.by_username.remove(&u);
        }
        self.by_real.retain(|_, c| *c != id);
        self.by_tid.retain(|_, (c, _)| *c != id);
        if let Some((m, _)) = call.held {
            self.send(m);
        }
        trace!(call = %id, "forgotten");
    }

    /// The QUIC session's resume proof for call `id` ([`ClientMsg::Resume`]).
    pub(crate) fn set_proof(&mut self, id: CallId, proof: [u8; 32]) {
        if let Some(call) = self.calls.get_mut(&id) {
            call.proof = Some(proof);
        }
        self.send_resumes();
    }

    // ---- inputs from the server ----

    /// Registered with a server (the first time, or again after losing one).
    pub(crate) fn handle_registered(&mut self, now: Instant, reg: Registered) {
        info!(stun = %reg.stun_addr, "registered with the rendezvous server");
        let tid = self.tid();
        let mut out = Vec::new();
        self.server.up(now, reg, tid, &mut out);
        self.transmits.extend(out);
        self.send_resumes();
        self.changed = true;
    }

    /// The control connection ended. Calls not started yet fail; running calls go on (a direct
    /// call never needed the server; a relayed one waits to be resumed).
    pub(crate) fn handle_server_lost(&mut self, _now: Instant, reason: &str) {
        self.server.down(reason.to_owned());
        self.by_server.clear();
        for call in self.calls.values_mut() {
            if call.is_ringing() {
                call.end(CallEnd::ServerLost(reason.to_owned()));
            } else if call.view.phase == Phase::Running && call.resume != Resume::Failed {
                call.server_id = None;
                call.resume = Resume::Wanted;
            } else {
                call.server_id = None;
            }
        }
        self.control.clear();
        self.changed = true;
    }

    /// A control message from the server.
    pub(crate) fn handle_server_msg(&mut self, now: Instant, msg: ServerMsg) {
        match msg {
            ServerMsg::Ringing { request, call } => self.on_ringing(CallId(request), call),
            ServerMsg::CallFailed { request, failure, .. } => {
                if let Some(c) = self
                    .calls
                    .get_mut(&CallId(request))
                    .filter(|c| c.view.phase == Phase::Ringing)
                {
                    c.end(CallEnd::Refused(failure));
                }
            }
            ServerMsg::Incoming {
                call,
                caller,
                fingerprint,
                policy,
            } => self.events.push_back(Event::Incoming(Offer {
                call,
                caller,
                fingerprint,
                policy,
                received: now,
            })),
            ServerMsg::Start(start) => self.on_start(now, start),
            ServerMsg::RoomPeer { room, start } => self.on_room_peer(now, room, start),
            msg @ (ServerMsg::RoomJoined { .. }
            | ServerMsg::RoomRefused { .. }
            | ServerMsg::RoomMemberJoined { .. }
            | ServerMsg::RoomMemberLeft { .. }) => self.events.push_back(Event::Room(msg)),
            ServerMsg::CallEnded { call, reason } => {
                if let Some(c) = self.by_server.get(&call).and_then(|id| self.calls.get_mut(id)) {
                    c.end(CallEnd::Ended(reason));
                }
            }
            ServerMsg::CallDeclined { call, decline } => self.on_declined(call, decline),
            ServerMsg::Replaced { by } => {
                self.handle_replaced(now, by);
            }
            ServerMsg::CallSuspended { call } => {
                if let Some(id) = self.by_server.remove(&call) {
                    if let Some(c) = self.calls.get_mut(&id) {
                        debug!(call = %id, "the peer left the server: the call will be resumed");
                        c.server_id = None;
                        c.resume = Resume::Wanted;
                    }
                }
                self.send_resumes();
            }
            ServerMsg::Resumed { call, id: new } => self.on_resumed(call, new),
            ServerMsg::ResumeFailed { call, reason } => self.on_resume_failed(call, &reason),
            // Kept here, not passed as an event: the supervisor reads it as soon as the
            // connection ends, which may be before the driver ran.
            ServerMsg::MoveTo { servers } => self.move_to = servers,
            ServerMsg::GoingAway {
                reason,
                reconnect_after_ms,
            } => self.events.push_back(Event::GoingAway {
                reason,
                after: Duration::from_millis(u64::from(reconnect_after_ms)),
            }),
            other => trace!(?other, "server message not for the core"),
        }
        self.changed = true;
    }

    /// The callee declined ringing call `server` (this side placed it).
    fn on_declined(&mut self, server: u32, decline: Decline) {
        let Some(call) = self
            .by_server
            .get(&server)
            .and_then(|id| self.calls.get_mut(id))
            .filter(|c| c.view.role == Role::Caller && c.view.phase == Phase::Ringing)
        else {
            return;
        };
        let peer = &call.view.peer;
        let end = match decline {
            Decline::Declined => CallEnd::Ended(format!("{peer} declined")),
            Decline::Busy => CallEnd::Busy,
            Decline::Policy { allowed } => CallEnd::NoPath(format!(
                "{peer} allows only {allowed} calls, and this call asked for {}",
                call.policy.policy()
            )),
        };
        debug!(%peer, server, ?decline, "declined");
        call.end(end);
    }

    /// Another session of this peer registered with the server and took over its registration
    /// (from `by`): the server is gone for good (no new registration: it would take the name
    /// back, and the other session would in turn), and every call ends. Returns the reason.
    pub(crate) fn handle_replaced(&mut self, now: Instant, by: SocketAddr) -> String {
        let reason = format!(
            "another natcall session registered as {} (from {by}) and replaced this one",
            self.config.name
        );
        info!(%by, "replaced by another session of this peer");
        for call in self.calls.values_mut() {
            if !matches!(call.view.phase, Phase::Closing { .. }) {
                call.end(CallEnd::Replaced(reason.clone()));
            }
        }
        self.handle_server_lost(now, &reason);
        self.server.replace(reason.clone());
        reason
    }

    /// The servers a draining server named since the last call (emptied).
    pub(crate) fn take_move_to(&mut self) -> Vec<SocketAddr> {
        std::mem::take(&mut self.move_to)
    }

    /// Why the server is gone for good, when another session of this peer replaced this one.
    pub(crate) fn replaced(&self) -> Option<&str> {
        self.server.replaced()
    }

    fn on_ringing(&mut self, id: CallId, server: u32) {
        let Some(call) = self
            .calls
            .get_mut(&id)
            .filter(|c| c.view.phase == Phase::Ringing && c.view.end.is_none())
        else {
            // A call we gave up on meanwhile: withdraw it so the callee stops ringing.
            self.send(ClientMsg::Hangup {
                call: server,
                reason: "withdrawn".into(),
            });
            return;
        };
        debug!(call = %id, server, "ringing");
        call.server_id = Some(server);
        call.last_server_id = Some(server);
        self.by_server.insert(server, id);
    }

    fn on_start(&mut self, now: Instant, start: CallStart) {
        let Some(&id) = self.by_server.get(&start.call) else {
            // Nobody here waits for it (released, or never ours): the server must not count it.
            self.send(ClientMsg::Hangup {
                call: start.call,
                reason: "not waiting for this call".into(),
            });
            return;
        };
        let name = self.config.name.clone();
        let Some(call) = self
            .calls
            .get_mut(&id)
            .filter(|c| c.is_ringing() && c.view.end.is_none())
        else {
            return;
        };
        if call.offered_key.is_some_and(|k| k != start.fingerprint) {
            call.end(CallEnd::WrongKey);
            return;
        }
        call.policy = PathPolicy::new(start.policy);
        call.view.phase = Phase::Running;
        call.ring_deadline = None;
        if call.policy.runs_checks() {
            call.checks_at = Some(now + Duration::from_millis(u64::from(start.delay_ms)));
            let username = format!("{name}~{}:{}~{}", start.call, start.peer, start.call);
            self.by_username.insert(username.clone(), id);
            call.username = Some(username);
        }
        call.view.start = Some(start);
        call.touch();
        if call.policy.starts_on_relay() {
            call.carrier = Carrier::Relay;
            call.set_path(now, Path::Relay, None);
        }
        self.report_path(id);
    }

    /// A room's pairwise session: a call nobody rings, accepted by joining the room, which
    /// starts at once (the member that joined controls).
    fn on_room_peer(&mut self, now: Instant, room: String, start: CallStart) {
        let id = self.alloc();
        let role = if start.controlling { Role::Caller } else { Role::Callee };
        let mut call = CallState::new(start.peer.clone(), role, Phase::Accepted, start.policy, now);
        call.offered_key = Some(start.fingerprint);
        call.server_id = Some(start.call);
        call.last_server_id = Some(start.call);
        self.by_server.insert(start.call, id);
        self.calls.insert(id, call);
        let peer = start.peer.clone();
        debug!(call = %id, %room, %peer, "room session");
        self.on_start(now, start);
        self.events.push_back(Event::RoomPeer { room, peer, id, role });
    }

    /// Asks the server for a room (`RoomCreate`, `RoomJoin`, `RoomLeave`); the answer comes as
    /// [`Event::Room`].
    pub(crate) fn room_request(&mut self, msg: ClientMsg) {
        self.send(msg);
    }

    fn on_resumed(&mut self, old: u32, new: u32) {
        let Some((&id, call)) = self.calls.iter_mut().find(|(_, c)| c.resume == Resume::Sent(old)) else {
            return;
        };
        info!(call = %id, old, new, "call resumed on the server");
        call.resume = Resume::Known;
        call.server_id = Some(new);
        call.last_server_id = Some(new);
        call.touch();
        self.by_server.insert(new, id);
        self.report_path(id);
    }

    fn on_resume_failed(&mut self, old: u32, reason: &str) {
        let Some(call) = self.calls.values_mut().find(|c| c.resume == Resume::Sent(old)) else {
            return;
        };
        info!(%reason, "the server did not resume the call");
        call.resume = Resume::Failed;
        if call.carrier == Carrier::Relay {
            call.end(CallEnd::NotResumed(format!(
                "the relay to {} could not be restored: {reason}",
                call.view.peer
            )));
        }
    }

    /// Sends `Resume` for every running call the server does not know, once registered.
    fn send_resumes(&mut self) {
        if !self.server.is_up() {
            return;
        }
        let mut out = Vec::new();
        for call in self.calls.values_mut() {
            let (Resume::Wanted, Some(proof), Some(last)) = (call.resume, call.proof, call.last_server_id) else {
                continue;
            };
            if call.view.phase != Phase::Running || call.view.end.is_some() {
                continue;
            }
            call.resume = Resume::Sent(last);
            out.push(ClientMsg::Resume {
                call: last,
                peer: call.view.peer.clone(),
                proof,
            });
        }
        for m in out {
            self.send(m);
        }
    }

    /// A relay frame for server call `server_call` was read.
    pub(crate) fn handle_relay(&mut self, server_call: u32) -> RelayIn {
        let ack = self.server.relay_frame_read();
        RelayIn {
            call: self.call_of_server(server_call),
            ack,
        }
    }

    /// The live (not ringing) call the server knows as `server_call`.
    pub(crate) fn call_of_server(&self, server_call: u32) -> Option<CallId> {
        self.by_server
            .get(&server_call)
            .copied()
            .filter(|id| self.calls.get(id).is_some_and(|c| !c.is_ringing()))
    }

    // ---- inputs from the UDP socket ----

    /// A datagram arrived from `src`.
    pub(crate) fn handle_datagram(&mut self, now: Instant, src: SocketAddr, data: &[u8]) -> Datagram {
        match wire::classify(data) {
            PacketClass::Stun => self.handle_stun(now, src, data),
            PacketClass::Quic => {
                let Some(&id) = self.by_real.get(&src) else {
                    trace!(%src, "QUIC from an unvalidated address dropped");
                    return Datagram::Dropped;
                };
                if let Some(call) = self.calls.get_mut(&id) {
                    if call.selected == Some(src) {
                        if let Some(agent) = call.agent.as_mut() {
                            agent.handle_activity(now, src);
                        }
                    }
                }
                Datagram::Quic(FakeAddr::of(id))
            }
            PacketClass::Media => match self.by_real.get(&src) {
                Some(&id) => Datagram::Media(id),
                None => {
                    trace!(%src, "media from an unvalidated address dropped");
                    Datagram::Dropped
                }
            },
            PacketClass::Unknown => Datagram::Dropped,
        }
    }

    fn handle_stun(&mut self, now: Instant, src: SocketAddr, data: &[u8]) -> Datagram {
        let Some(peek) = wire::peek(data) else {
            return Datagram::Dropped;
        };
        if !peek.request && self.server.handle_answer(now, src, &peek.transaction_id, data) {
            self.changed = true;
            self.report_mapping();
            return Datagram::Consumed;
        }
        let id = if peek.request {
            peek.username.and_then(|u| self.by_username.get(u)).copied()
        } else {
            self.by_tid.get(&peek.transaction_id).map(|(id, _)| *id)
        };
        let Some(id) = id else {
            trace!(%src, request = peek.request, "STUN for no call dropped");
            return Datagram::Dropped;
        };
        let consumed = self
            .calls
            .get_mut(&id)
            .and_then(|c| c.agent.as_mut())
            .is_some_and(|a| a.handle_input(now, src, data));
        self.drive(now, id);
        if consumed {
            Datagram::Consumed
        } else {
            Datagram::Dropped
        }
    }

    // ---- routes ----

    /// Where QUIC's next packet to `fake` goes. A hang-up held for this call is released behind
    /// it.
    pub(crate) fn route_quic(&mut self, fake: FakeAddr) -> Route {
        let route = self.route(fake);
        if let Some(call) = self.calls.get_mut(&fake.call()) {
            if let Some((msg, _)) = call.held.take() {
                let lane = if matches!(route, Route::Relay(_)) {
                    Lane::AfterRelay
                } else {
                    Lane::Control
                };
                self.control.push_back((msg, lane));
                self.changed = true;
            }
        }
        route
    }

    /// Whether a hang-up still waits for its call's QUIC close.
    pub(crate) fn has_held(&self) -> bool {
        self.calls.values().any(|c| c.held.is_some())
    }

    /// Sends every held hang-up now, behind the relay frames queued so far (the endpoint is
    /// closing: its QUIC closes have gone out or never will).
    pub(crate) fn release_held(&mut self) {
        for call in self.calls.values_mut() {
            if let Some((msg, _)) = call.held.take() {
                self.control.push_back((msg, Lane::AfterRelay));
                self.changed = true;
            }
        }
    }

    /// Where packets to `fake` go now.
    pub(crate) fn route(&self, fake: FakeAddr) -> Route {
        let Some(call) = self.calls.get(&fake.call()) else {
            return Route::Void;
        };
        match call.carrier {
            Carrier::Void => Route::Void,
            Carrier::Udp(real) => Route::Udp(real),
            Carrier::Relay => match call.server_id {
                Some(s) if self.server.is_up() => Route::Relay(s),
                _ => Route::Void,
            },
        }
    }

    /// Whether an incoming QUIC connection from `fake` is expected (a started call this side
    /// accepted).
    pub(crate) fn expects_quic(&self, fake: FakeAddr) -> bool {
        self.calls
            .get(&fake.call())
            .is_some_and(|c| c.view.role == Role::Callee && c.view.phase == Phase::Running)
    }

    /// Whether a QUIC client presenting `key` may connect: the peer of a started call this side
    /// accepted.
    pub(crate) fn is_pinned(&self, key: &Fingerprint) -> bool {
        self.calls.values().any(|c| {
            c.view.role == Role::Callee
                && c.view.phase == Phase::Running
                && c.view.start.as_ref().is_some_and(|s| s.fingerprint == *key)
        })
    }

    // ---- timers ----

    /// Runs every timer due at `now`.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let tid = self.tid();
        let mut out = Vec::new();
        self.server.handle_timeout(now, tid, &mut out);
        self.transmits.extend(out);
        self.report_mapping();
        let ids: Vec<CallId> = self.calls.keys().copied().collect();
        for id in ids {
            self.call_timeout(now, id);
        }
        let horizon = self.config.traversal.rto_max * 2;
        self.by_tid
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < horizon);
    }

    fn call_timeout(&mut self, now: Instant, id: CallId) {
        let Some(call) = self.calls.get_mut(&id) else { return };
        if let Phase::Closing { until } = call.view.phase {
            if let Some((m, at)) = call.held.take_if(|(_, at)| now >= *at) {
                let _ = at;
                self.control.push_back((m, Lane::Control));
            }
            if now >= until {
                self.forget(id);
                self.changed = true;
            }
            return;
        }
        if call.is_ringing() && call.ring_deadline.is_some_and(|t| now >= t) && call.view.end.is_none() {
            call.end(CallEnd::NoAnswer);
            self.changed = true;
            return;
        }
        if call.checks_at.is_some_and(|t| now >= t) {
            call.checks_at = None;
            self.start_checks(now, id);
            return;
        }
        let retry = call.policy.take_retry(now);
        let birthday_delay = self.config.traversal.birthday_delay;
        let Some(agent) = call.agent.as_mut() else { return };
        if retry {
            debug!(peer = %call.view.peer, "retrying a direct path");
            call.probes_before += agent.probes_sent();
            agent.restart(now);
            if let Some((_, at)) = &mut call.spray
                && call.sprays < natcall_traversal::MAX_PROBE_RUNS
            {
                *at = Some(now + birthday_delay);
            }
        }
        if let Some((to, at)) = &mut call.spray
            && at.is_some_and(|t| now >= t)
        {
            *at = None;
            if agent.is_searching() {
                let sockets = self.config.traversal.birthday_sockets;
                debug!(peer = %call.view.peer, %to, sockets, "opening ports for birthday traversal");
                call.view.traversal.spray_sockets += sockets;
                call.sprays += 1;
                self.events.push_back(Event::Spray { id, to: *to, sockets });
            }
        }
        if agent.poll_timeout().is_some_and(|t| now >= t) {
            agent.handle_timeout(now);
        }
        self.drive(now, id);
    }

    fn start_checks(&mut self, now: Instant, id: CallId) {
        let public = self.server.public();
        let udp_ok = self.server.udp_ok();
        let seed = self.next_random();
        let probe_seed = self.next_random();
        let mapping = self.server.mapping();
        let port_mapped = self.server.port_mapped();
        let name = self.config.name.clone();
        let mut config = self.config.traversal.clone();
        config.rng_seed = seed;
        let Some(call) = self.calls.get_mut(&id) else { return };
        let Some(start) = &call.view.start else { return };
        let (remote, try_lan) = call.policy.candidates(public, &start.candidates);
        let birthday = if config.birthday_sockets == 0 || config.birthday_probes == 0 {
            Birthday::No
        } else {
            Birthday::plan(mapping, &start.candidates, &remote)
        };
        if birthday.is_on() {
            config.budget = config.budget.max(config.birthday_budget);
        }
        let credentials = Credentials::new(
            &start.password,
            format!("{name}~{}", start.call),
            format!("{}~{}", start.peer, start.call),
        );
        let credentials = match credentials {
            Ok(c) => c,
            Err(e) => {
                call.end(CallEnd::NoPath(format!(
                    "the server's call credentials are unusable: {e}"
                )));
                self.changed = true;
                return;
            }
        };
        let role = if start.controlling {
            natcall_traversal::Role::Controlling
        } else {
            natcall_traversal::Role::Controlled
        };
        debug!(peer = %call.view.peer, ?remote, try_lan, ?birthday, "starting connectivity checks");
        let (delay, probes, interval) = (config.birthday_delay, config.birthday_probes, config.probe_interval);
        let mut agent = Agent::new(config, role, credentials, remote, try_lan, now);
        let report = &mut call.view.traversal;
        report.nat_mapping = mapping.to_string();
        report.peer_nat_mapping = start.candidates.mapping.to_string();
        report.port_mapped = port_mapped;
        report.peer_port_mapped = start.candidates.port_mapped;
        report.candidates.clear();
        for c in agent.candidates() {
            *report.candidates.entry(TraversalReport::label(&c)).or_default() += 1;
        }
        match birthday {
            Birthday::Probe { at, step } => {
                let targets = natcall_traversal::birthday::targets(at.ip(), at.port(), step, probes, probe_seed);
                let family = if at.is_ipv4() { "v4" } else { "v6" };
                report.candidates.insert(format!("predicted-{family}"), targets.len());
                report.birthday = Some("probe");
                agent.probe(now, targets, interval, delay);
            }
            Birthday::Spray { to } => {
                report.birthday = Some("spray");
                call.spray = Some((to, Some(now + delay)));
            }
            Birthday::No => report.birthday = None,
        }
        if !udp_ok {
            agent.handle_udp_unusable(now);
        }
        call.agent = Some(agent);
        self.drive(now, id);
    }

    /// The earliest instant [`PeerCore::handle_timeout`] must run at.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.server.poll_timeout();
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for call in self.calls.values() {
            match call.view.phase {
                Phase::Closing { until } => {
                    at(Some(until));
                    at(call.held.as_ref().map(|(_, t)| *t));
                }
                Phase::Ringing | Phase::Accepted => at(call.ring_deadline.filter(|_| call.view.end.is_none())),
                Phase::Running => {
                    at(call.checks_at);
                    at(call.agent.as_ref().and_then(Agent::poll_timeout));
                    at(call.spray.and_then(|(_, t)| t));
                    at(call.policy.poll_retry().filter(|_| call.agent.is_some()));
                }
            }
        }
        if let Some((_, sent)) = self.by_tid.values().min_by_key(|(_, t)| *t) {
            at(Some(*sent + self.config.traversal.rto_max * 2));
        }
        next
    }

    // ---- the agent's outputs ----

    /// Drains call `id`'s agent (its drive contract) and acts on its events.
    fn drive(&mut self, now: Instant, id: CallId) {
        let Some(mut agent) = self.calls.get_mut(&id).and_then(|c| c.agent.take()) else {
            return;
        };
        while let Some(t) = agent.poll_transmit() {
            if let Some(p) = wire::peek(&t.contents).filter(|p| p.request && !t.probe) {
                if self.by_tid.len() >= MAX_TRANSACTIONS {
                    if let Some(oldest) = self.by_tid.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                        self.by_tid.remove(&oldest);
                    }
                }
                self.by_tid.insert(p.transaction_id, (id, now));
            }
            self.transmits.push_back(Transmit {
                destination: t.destination,
                contents: t.contents,
            });
        }
        let mut restart = false;
        let mut selected = false;
        while let Some(ev) = agent.poll_event() {
            selected |= matches!(ev, AgentEvent::Selected { .. });
            restart |= self.on_agent_event(now, id, ev);
        }
        if let Some(call) = self.calls.get_mut(&id) {
            let report = &mut call.view.traversal;
            report.probes_sent = call.probes_before + agent.probes_sent();
            if selected && let Some(c) = agent.selected() {
                report.won = Some(TraversalReport::label(&c));
                for c in agent
                    .candidates()
                    .iter()
                    .filter(|c| c.kind == natcall_traversal::CandidateKind::PeerReflexive)
                {
                    report.candidates.entry(TraversalReport::label(c)).or_insert(1);
                }
            }
        }
        if restart {
            let delay = self.config.traversal.birthday_delay;
            if let Some(call) = self.calls.get_mut(&id) {
                call.probes_before += agent.probes_sent();
                if let Some((_, at)) = call.spray.as_mut()
                    && call.sprays < natcall_traversal::MAX_PROBE_RUNS
                {
                    *at = Some(now + delay);
                }
            }
            agent.restart(now);
        }
        if let Some(call) = self.calls.get_mut(&id) {
            if call.view.phase == Phase::Running {
                call.agent = Some(agent);
                if restart {
                    self.drive(now, id);
                }
            }
        }
    }

    /// Acts on one agent event; returns whether the agent must run its checks again.
    fn on_agent_event(&mut self, now: Instant, id: CallId, ev: AgentEvent) -> bool {
        // Which call owns the real address this event is about: QUIC and media from an address
        // reach one call only, so two calls between the same two sockets cannot both use it.
        let (owns, taken) = match ev {
            AgentEvent::PairValidated { remote, .. } | AgentEvent::Selected { remote, .. } => {
                match self.by_real.get(&remote).copied() {
                    None => (true, false),
                    Some(owner) if owner == id => (true, false),
                    Some(owner) => {
                        let selected = self.calls.get(&owner).is_some_and(|c| c.selected == Some(remote));
                        (false, selected)
                    }
                }
            }
            _ => (true, false),
        };
        let Some(call) = self.calls.get_mut(&id) else {
            return false;
        };
        let peer = call.view.peer.clone();
        match ev {
            AgentEvent::PairValidated { remote, .. } if owns => {
                self.by_real.insert(remote, id);
                if call.carrier == Carrier::Void {
                    call.carrier = Carrier::Udp(remote); // so QUIC can answer at once
                }
            }
            AgentEvent::Selected { remote, kind, rtt } => {
                debug!(%peer, %remote, ?kind, ?rtt, "pair selected");
                if taken {
                    // Another call with this peer already runs on these addresses.
                    let why = format!("another call with {peer} already runs on the same addresses ({remote})");
                    match call
                        .policy
                        .on_no_path(now, natcall_traversal::RelayReason::UdpUnusable, &peer)
                    {
                        Fallback::Relay => {
                            debug!(%peer, %why, "staying on the relay");
                            call.carrier = Carrier::Relay;
                            call.set_path(now, Path::Relay, None);
                            self.report_path(id);
                        }
                        _ => call.end(CallEnd::NoPath(format!(
                            "{why}, and the {} policy forbids the relay",
                            call.policy.policy()
                        ))),
                    }
                    self.changed = true;
                    return false;
                }
                self.by_real.insert(remote, id);
                call.carrier = Carrier::Udp(remote);
                call.selected = Some(remote);
                call.policy.on_selected();
                call.set_path(now, kind.into(), Some(remote));
                self.report_path(id);
            }
            AgentEvent::PathLost { remote } => {
                info!(%peer, %remote, "direct path lost");
                call.selected = None;
                match call.policy.on_path_lost(now, &peer) {
                    Fallback::Relay => {
                        call.carrier = Carrier::Relay;
                        call.set_path(now, Path::Relay, None);
                        self.report_path(id);
                    }
                    Fallback::Restart => return true,
                    Fallback::Fail(why) => call.end(CallEnd::NoPath(why)),
                }
            }
            AgentEvent::UseRelay { reason } => match call.policy.on_no_path(now, reason, &peer) {
                Fallback::Relay => {
                    debug!(%peer, ?reason, "staying on the relay");
                    if call.carrier != Carrier::Relay && call.selected.is_none() {
                        call.carrier = Carrier::Relay;
                        call.set_path(now, Path::Relay, None);
                        self.report_path(id);
                    }
                }
                Fallback::Restart => return true,
                Fallback::Fail(why) => call.end(CallEnd::NoPath(why)),
            },
            _ => {}
        }
        self.changed = true;
        false
    }

    /// Tells the server the call's path (for its metrics).
    fn report_path(&mut self, id: CallId) {
        let Some(call) = self.calls.get(&id) else { return };
        let path = match call.view.path {
            Path::Lan => WirePath::Lan,
            Path::Direct => WirePath::Direct,
            Path::Relay => WirePath::Relay,
            Path::Connecting => return,
        };
        if let Some(server) = call.server_id {
            self.send(ClientMsg::CallPath { call: server, path });
        }
    }

    // ---- outputs ----

    fn send(&mut self, msg: ClientMsg) {
        if self.server.is_up() {
            self.control.push_back((msg, Lane::Control));
        } else {
            trace!(?msg, "no server: message not sent");
        }
    }

    /// The next datagram to send.
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next control message for the server, and its lane.
    pub(crate) fn poll_control(&mut self) -> Option<(ClientMsg, Lane)> {
        self.control.pop_front()
    }

    /// Whether control messages wait to be drained.
    pub(crate) fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    /// The next event for the application.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether anything the application may wait for changed since the last call.
    pub(crate) fn poll_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    // ---- what the application reads ----

    /// Call `id`, if the core still has it.
    pub(crate) fn call(&self, id: CallId) -> Option<&CallView> {
        self.calls.get(&id).map(|c| &c.view)
    }

    /// The async layer's handles of call `id`.
    pub(crate) fn link_mut(&mut self, id: CallId) -> Option<&mut L> {
        self.calls.get_mut(&id).map(|c| &mut c.link)
    }

    /// How many calls the core holds (closing ones included).
    pub(crate) fn len(&self) -> usize {
        self.calls.len()
    }

    /// How long a birthday traversal socket nobody answered stays open: the attempt's budget
    /// and a little more.
    pub(crate) fn spray_lifetime(&self) -> Duration {
        self.config.traversal.birthday_budget + Duration::from_secs(2)
    }

    /// Tells the server how this peer's NAT maps ports, once it is measured.
    fn report_mapping(&mut self) {
        if let Some((mapping, port_mapped)) = self.server.poll_mapping() {
            self.control
                .push_back((ClientMsg::NatMapping { mapping, port_mapped }, Lane::Control));
        }
    }

    /// The router mapped this peer's socket to `addr` (UPnP-IGD, NAT-PMP, PCP), or the mapping
    /// is gone: the server and later calls learn it.
    pub(crate) fn set_port_mapped(&mut self, addr: Option<SocketAddr>) {
        self.server.set_port_mapped(addr);
        self.report_mapping();
    }

    /// The router's port mapping for this peer's socket, if any.
    pub(crate) fn port_mapped(&self) -> Option<SocketAddr> {
        self.server.port_mapped()
    }

    /// How this peer's NAT maps ports, as measured against the server's two ports.
    pub(crate) fn mapping(&self) -> natcall_proto::control::Mapping {
        self.server.mapping()
    }

    /// This peer's public address as the server observed it.
    pub(crate) fn public_addr(&self) -> Option<SocketAddr> {
        self.server.public()
    }

    /// Whether the first token binding after registering has been answered or given up.
    pub(crate) fn probed(&self) -> bool {
        self.server.probed()
    }

    /// Whether the server is known to have a route for call `id` (it is not waiting to be
    /// resumed).
    pub(crate) fn server_knows(&self, id: CallId) -> bool {
        self.calls.get(&id).is_some_and(|c| c.server_id.is_some())
    }

    fn next_random(&mut self) -> u64 {
        // SplitMix64: the seed comes from the async layer's random source.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn tid(&mut self) -> [u8; 12] {
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.next_random().to_be_bytes());
        tid[8..].copy_from_slice(&self.next_random().to_be_bytes()[..4]);
        tid
    }
}

/// The refusal a server's [`CallFailure`] means, as a sentence.
pub(crate) fn refusal(failure: CallFailure, callee: &str) -> crate::Error {
    match failure {
        CallFailure::Offline => crate::Error::Offline(callee.to_owned()),
        CallFailure::SelfCall => crate::Error::SelfCall,
        CallFailure::Busy => crate::Error::Busy(callee.to_owned()),
        CallFailure::AlreadyRinging => crate::Error::CallRefused(format!("you are already calling {callee}")),
        CallFailure::RateLimited => {
            crate::Error::CallRefused(format!("{callee} was called too often just now; try again later"))
        }
        CallFailure::Unavailable => crate::Error::CallRefused(format!(
            "{callee}'s server cannot be reached from yours right now; try again later"
        )),
    }
}
