//! One peer's TCP connection: handshake, registration, pings, and a graceful or abortive end.
//!
//! Data flow:
//! 1. the reader (this task) decodes frames off the socket and handles them;
//! 2. control frames count against `limits.frames_per_sec` (over it: shed); relay frames have
//!    their own budget, `limits.relay_frames_per_sec` (over it: dropped), and go to
//!    [`crate::calls`], which forwards them untouched to the other member of an active call;
//! 3. anything to send — replies, pings, messages from other tasks, relay frames — goes into
//!    the connection's [`Outbox`] (the relay engine's per-client buffer); its writer task
//!    ([`crate::outbox::writer`]) takes batches and writes each with one vectored write (no copy
//!    of the frames), and reports how it ended;
//! 4. a relay receiver that makes no progress for `relay.overload_timeout_ms` is shed;
//! 5. the connection ends one of these ways; then its active calls are suspended, its ringing
//!    calls end (with the reason when it was shed as stalled), its waiting resumes are dropped
//!    ([`Calls::leave`]):
//!    - **graceful** (protocol error, timeout, server drain): queue an error or "going away"
//!      frame, let the writer flush it and half-close (`shutdown(Write)`), and keep reading until
//!      the peer closes its side or the drain deadline passes, so nothing either side already
//!      sent is lost to a reset;
//!    - **peer closed**: flush and half-close in turn;
//!    - **reset by the peer** (`ECONNRESET`/`EPIPE` on a read or a write): counted as `reset`;
//!    - **replaced** by a newer registration of the same peer (that connection queued our
//!      `Replaced`, naming its address, and closed our outbox): read until the peer closes, as
//!      after a graceful end;
//!    - **shed** (abusive: flooding, a stalled relay receiver, or still sending after a graceful
//!      close's deadline): `SO_LINGER = 0`, a reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::stream::PeerReader;
use bytes::{Bytes, BytesMut};
use natcall_proto::PROTOCOL_VERSION;
use natcall_proto::auth::verify_registration;
use natcall_proto::codec::decode_control;
use natcall_proto::control::{CallFailure, ClientMsg, Decline, MAX_LAN_ADDRS, Policy, Reply, ServerMsg, validate_name};
use natcall_proto::frame::{self, ErrorCode, Frame, FrameDecoder, FrameError, FrameKind, RawFrame, control_frame};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, trace, warn};

use crate::calls::{Calls, Member};
use crate::config::Config;
use crate::metrics::{Disconnect, DropReason, Metrics};
use crate::outbox::Outbox;
use crate::outbox::writer::{self, Status};
use crate::registry::{RegisterError, Registry};
use crate::sockopt;

/// What every connection of one server shares.
#[derive(Debug)]
pub(crate) struct Context {
    /// The TLS identity every connection is served with.
    pub(crate) tls: crate::tls::ServerTls,
    pub(crate) config: Config,
    pub(crate) registry: Arc<Registry>,
    pub(crate) calls: Arc<Calls>,
    pub(crate) rooms: Arc<crate::rooms::Rooms>,
    pub(crate) metrics: Metrics,
    /// Turns true when the server drains for shutdown.
    pub(crate) drain: watch::Receiver<bool>,
    /// The second STUN port, once bound (0: none).
    pub(crate) stun_alt_port: std::sync::atomic::AtomicU16,
    /// This node's cluster and its peers' links to other nodes (a cluster node only).
    pub(crate) cluster: Option<Arc<crate::cluster::visit::Visits>>,
    /// Where a draining node sends its peers (other live nodes), set when the drain starts.
    pub(crate) move_to: std::sync::Mutex<Vec<SocketAddr>>,
}

impl Context {
    /// The second STUN port peers are told about, if the server has one.
    pub(crate) fn stun_alt_port(&self) -> Option<u16> {
        match self.stun_alt_port.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            p => Some(p),
        }
    }
}

/// How the read loop ended.
#[derive(Debug)]
enum End {
    /// Send this frame (error or going-away), half-close, read until the peer closes.
    Graceful(Bytes),
    /// The peer half-closed or vanished.
    PeerClosed,
    /// The peer reset the connection (counted).
    Reset,
    /// A newer connection of the same peer took over: it already queued our last frame
    /// (`Replaced`) and closed our outbox; read until the peer closes.
    Replaced,
    /// Shed with a reset.
    Shed(Disconnect, &'static str),
}

/// A request that waits on the registry's backend (Redis, in a cluster): the read loop runs it
/// before it decodes the connection's next frame.
enum Pending {
    Register {
        challenge: [u8; 32],
        name: String,
        cert: Vec<u8>,
        signature: Vec<u8>,
        lan_addrs: Vec<SocketAddr>,
    },
    Release(String),
    RoomCreate(String, ClientMsg),
    /// A call to a name not registered here (a cluster node: maybe on another node).
    RemoteCall {
        request: u32,
        callee: String,
        policy: Policy,
    },
    /// A resume with a peer not registered here (a cluster node: maybe on another node).
    RemoteResume {
        call: u32,
        peer: String,
        proof: [u8; 32],
    },
    /// A lookup of a name not registered here (a cluster node).
    Lookup(String),
}

enum Phase {
    AwaitHello,
    AwaitRegister { challenge: [u8; 32] },
    Registered { name: String },
}

struct Conn {
    ctx: Arc<Context>,
    id: u64,
    addr: SocketAddr,
    outbox: Arc<Outbox>,
    phase: Phase,
    /// Waits on the backend: no later frame is handled before it ran.
    pending: Option<Pending>,
    /// Registered by another node speaking for its peer (a visit).
    visitor: bool,
    /// Came from another node's address, so was not counted against
    /// `limits.max_connections_per_ip` when accepted (visits are not one source's): anything but
    /// a visit is counted when it registers, and holds its count here.
    uncounted: bool,
    source_slot: Option<crate::limits::SourceSlot>,
    /// Budget for control (non-relay) frames: over it, the connection is shed.
    control_tokens: TokenBucket,
    /// Budget for relay frames: over it, they are dropped.
    relay_tokens: TokenBucket,
    /// Budget for relay frames to rooms (each is copied to every other member): over it,
    /// they are dropped.
    room_tokens: TokenBucket,
    last_rx: Instant,
    ping: Option<(u64, Instant)>,
    rtt: Option<Duration>,
    /// Has sent a relay frame: its read buffer keeps room for a burst (see `read_loop`).
    relaying: bool,
    /// Exported from this connection's TLS session: the registration signs it.
    binding: [u8; 32],
    /// `Lookup`s in the current minute (`limits.lookups_per_min`).
    lookups: crate::limits::RateWindows<()>,
    /// `RoomCreate`s and `RoomJoin`s in the current minute (`limits.room_joins_per_min`).
    room_joins: crate::limits::RateWindows<()>,
}

/// Sealed TLS records waiting for the socket at most (bytes).
const TLS_BUFFER: usize = 32 * 1024;

/// Free room a relaying connection's read buffer keeps before each read.
const RELAY_READ_ROOM: usize = 4096;

/// A token bucket refilled at `rate` per second, holding at most one second's worth.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last_refill: Instant,
}

impl TokenBucket {
    fn new(rate: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last_refill: now,
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.last_refill).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last_refill = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn error_frame(code: ErrorCode, message: &str) -> Bytes {
    let mut b = BytesMut::new();
    frame::encode_error(code, message, &mut b);
    b.freeze()
}

/// Serves one accepted connection until it ends. `uncounted`: it came from another node's
/// address and was not counted against the per-address limit (see `Conn::uncounted`).
pub(crate) async fn serve(ctx: Arc<Context>, stream: TcpStream, addr: SocketAddr, id: u64, uncounted: bool) {
    if let Err(e) = sockopt::configure_peer(&stream, &ctx.config.relay) {
        warn!(%addr, error = %e, "cannot set socket options; closing");
        return;
    }
    // The handshake counts against the hello deadline: a client that stalls it is dropped.
    let handshake = tokio::time::timeout(ctx.config.limits.hello_timeout(), ctx.tls.acceptor().accept(stream));
    let mut tls = match handshake.await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%addr, error = %e, "TLS handshake failed");
            ctx.metrics.tls_handshake_failed();
            return;
        }
        Err(_) => {
            debug!(%addr, "TLS handshake timed out");
            ctx.metrics.tls_handshake_failed();
            return;
        }
    };
    let mut binding = [0u8; 32];
    if let Err(e) = tls
        .get_ref()
        .1
        .export_keying_material(&mut binding, natcall_proto::REGISTER_BINDING_LABEL, None)
    {
        warn!(%addr, error = %e, "TLS exporter failed; closing");
        return;
    }
    // TLS buffers sealed records only up to what one batch fills: the backlog stays in the
    // outbox, where the class policy sees it (see docs/relay.md).
    tls.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
    let (rd, wr) = crate::tls::stream::split(tls);
    let outbox = Arc::new(Outbox::new(
        ctx.config.relay.clone(),
        ctx.metrics.clone(),
        ctx.config.limits.outbound_queue,
    ));
    let (status_tx, status) = watch::channel(Status::Writing);
    let writer = tokio::spawn(writer::run(
        wr,
        outbox.clone(),
        ctx.config.relay.overload_timeout(),
        status_tx,
    ));
    let now = Instant::now();
    let limits = &ctx.config.limits;
    let mut conn = Conn {
        control_tokens: TokenBucket::new(limits.frames_per_sec, now),
        relay_tokens: TokenBucket::new(limits.relay_frames_per_sec, now),
        room_tokens: TokenBucket::new(limits.room_frames_per_sec, now),
        lookups: crate::limits::RateWindows::new(limits.lookups_per_min, Duration::from_secs(60), 1),
        room_joins: crate::limits::RateWindows::new(limits.room_joins_per_min, Duration::from_secs(60), 1),
        ctx,
        id,
        addr,
        outbox,
        phase: Phase::AwaitHello,
        pending: None,
        visitor: false,
        uncounted,
        source_slot: None,
        last_rx: now,
        ping: None,
        rtt: None,
        relaying: false,
        binding,
    };
    let mut drain = conn.ctx.drain.clone();
    let (rd, end) = conn.read_loop(rd, &mut drain, status).await;
    if let Phase::Registered { name } = &conn.phase {
        let removed = conn.ctx.registry.unregister(name, id);
        conn.ctx.metrics.set_registered(conn.ctx.registry.online_count());
        if let Some(visits) = &conn.ctx.cluster {
            visits.drop_conn(id);
            if removed && !conn.visitor && conn.ctx.registry.peer(name).is_none() {
                if let Err(e) = visits.cluster().clear_home(name).await {
                    debug!(peer = %name, error = %e, "presence not cleared (it expires)");
                }
                // Registered here again meanwhile: its presence stays.
                if conn.ctx.registry.peer(name).is_some_and(|p| !p.visitor) {
                    let _ = visits.cluster().set_home(name).await;
                }
            }
        }
        let why = matches!(end, End::Shed(Disconnect::Stalled, _))
            .then(|| format!("{name}'s connection could not keep up with the relay and was closed"));
        conn.ctx.calls.leave(id, why);
        conn.ctx.rooms.leave_all(id);
        info!(peer = %name, %addr, "peer left");
    }
    let (rd, reset) = conn.finish(rd, end).await;
    // The writer hands its half back when it ends; a connection ended with a reset is put
    // together again to set `SO_LINGER` 0 on its socket before it closes.
    if let Ok(wr) = writer.await {
        if reset {
            let stream = rd.unsplit(wr);
            let _ = sockopt::arm_reset(stream.get_ref().0);
        }
    }
}

impl Conn {
    async fn read_loop(
        &mut self,
        mut rd: PeerReader,
        drain: &mut watch::Receiver<bool>,
        mut writer: watch::Receiver<Status>,
    ) -> (PeerReader, End) {
        let limits = self.ctx.config.limits.clone();
        let decoder = FrameDecoder::new(limits.max_frame_len);
        let mut buf = BytesMut::with_capacity(256);
        let mut next_ping = Instant::now() + limits.ping_interval();
        // The timers and watches live across iterations: re-creating them for every read cost a
        // timer registration and two watch subscriptions per relayed frame. The idle timer is
        // reset lazily: when it fires before the (moving) deadline, it is set to the deadline.
        let idle_after = |phase: &Phase| match phase {
            Phase::Registered { .. } => limits.idle_timeout(),
            _ => limits.hello_timeout(),
        };
        // Registered: silence ends the connection. Before: `hello_timeout` from now, whatever
        // arrives meanwhile (an unsolicited `Pong` kept an unregistered connection open).
        let opened = Instant::now();
        let deadline = |phase: &Phase, last_rx: Instant| match phase {
            Phase::Registered { .. } => last_rx + limits.idle_timeout(),
            _ => opened + limits.hello_timeout(),
        };
        let ping = sleep_until(next_ping);
        let idle = sleep_until(deadline(&self.phase, self.last_rx));
        let drained = drain.wait_for(|d| *d);
        let written = writer.wait_for(|s| *s != Status::Writing);
        tokio::pin!(ping, idle, drained, written);
        let mut was_registered = false;
        loop {
            let registered = matches!(self.phase, Phase::Registered { .. });
            if registered != was_registered {
                was_registered = registered;
                idle.as_mut().reset(deadline(&self.phase, self.last_rx));
            }
            // A read that fills the buffer's free room leaves the socket marked readable, and the
            // next read only finds it empty (EAGAIN): with 256 B of room a 518-byte relay frame
            // took three reads. A connection that relays keeps room for a burst, so one read
            // usually takes what is there; idle peers keep their small buffer.
            if self.relaying && buf.capacity() - buf.len() < RELAY_READ_ROOM / 2 {
                buf.reserve(RELAY_READ_ROOM);
            }
            let end = tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) => Some(End::PeerClosed),
                    Ok(_) => self.handle_bytes(&decoder, &mut buf),
                    Err(e) => {
                        debug!(addr = %self.addr, error = %e, "read failed");
                        Some(self.peer_gone(sockopt::is_reset(&e)))
                    }
                },
                () = &mut ping, if registered => {
                    next_ping += limits.ping_interval();
                    ping.as_mut().reset(next_ping);
                    self.send_ping()
                }
                () = &mut idle => {
                    let due = deadline(&self.phase, self.last_rx);
                    if Instant::now() < due {
                        idle.as_mut().reset(due);
                        None
                    } else {
                        let what = if registered { "no message" } else { "no hello and registration" };
                        let secs = idle_after(&self.phase);
                        self.ctx.metrics.disconnect(Disconnect::Timeout);
                        Some(End::Graceful(error_frame(ErrorCode::Timeout, &format!("{what} within {secs:?}; closing"))))
                    }
                }
                _ = &mut drained => {
                    self.ctx.metrics.disconnect(Disconnect::Drain);
                    let mut servers = self.ctx.move_to.lock().map(|m| m.clone()).unwrap_or_default();
                    if !servers.is_empty() && !self.visitor {
                        // Each peer gets the list from another node on: they spread out.
                        let n = servers.len();
                        servers.rotate_left((self.id % n as u64) as usize);
                        if let Ok(f) = control_frame(&ServerMsg::MoveTo { servers }) {
                            self.outbox.push_server(f);
                        }
                    }
                    Some(End::Graceful(going_away("server is shutting down")))
                }
                status = &mut written => {
                    // The sender is dropped only if the writer panicked: a failed write.
                    let status = status.map_or(Status::Failed, |s| *s);
                    Some(self.writer_ended(status))
                }
            };
            let end = match end {
                Some(end) => Some(end),
                None => self.run_pending(&decoder, &mut buf).await,
            };
            if let Some(end) = end {
                return (rd, end);
            }
            if buf.is_empty() && buf.capacity() > 64 * 1024 {
                buf = BytesMut::with_capacity(256); // give back a burst's worth of memory
            }
        }
    }

    /// `Some(LookupFailed)` when this connection is over `limits.lookups_per_min`.
    fn lookup_limited(&mut self, name: &str) -> Option<ServerMsg> {
        if self.lookups.check(&(), self.last_rx.into_std()) == crate::limits::Verdict::Allowed {
            return None;
        }
        self.ctx.metrics.refused(crate::metrics::Refusal::LookupRate);
        let per_min = self.ctx.config.limits.lookups_per_min;
        Some(ServerMsg::LookupFailed {
            name: name.to_owned(),
            reason: format!("too many lookups: at most {per_min} a minute; try later"),
        })
    }

    /// `ReleaseName`: frees the name, answers `NameReleased` and ends the connection
    /// gracefully (it is no longer registered).
    async fn release_name(&mut self, name: String) -> End {
        match self.ctx.registry.release(&name, self.id).await {
            Ok(_) => {
                info!(peer = %name, addr = %self.addr, "name released");
                if let Some(visits) = &self.ctx.cluster {
                    visits.drop_conn(self.id);
                    if let Err(e) = visits.cluster().clear_home(&name).await {
                        debug!(peer = %name, error = %e, "presence not cleared (it expires)");
                    }
                }
                self.ctx.metrics.set_registered(self.ctx.registry.online_count());
                self.ctx.calls.leave(self.id, None);
                self.ctx.rooms.leave_all(self.id);
                self.phase = Phase::AwaitHello; // nothing is left to unregister
                let frame = control_frame(&ServerMsg::NameReleased { name }).unwrap_or_default();
                End::Graceful(frame)
            }
            Err(e) => {
                warn!(error = %e, "cannot record a name release");
                End::Graceful(error_frame(ErrorCode::Internal, "the server cannot record the release"))
            }
        }
    }

    /// The peer is gone: it reset the connection (counted), or closed or vanished.
    fn peer_gone(&self, reset: bool) -> End {
        if reset {
            self.ctx.metrics.disconnect(Disconnect::Reset);
            End::Reset
        } else {
            End::PeerClosed
        }
    }

    /// The writer stopped writing (see [`Status`]).
    fn writer_ended(&self, status: Status) -> End {
        match status {
            Status::Stalled => {
                let msg = format!(
                    "relay receiver made no progress for {:?}: it cannot keep up; closing",
                    self.ctx.config.relay.overload_timeout()
                );
                self.outbox.push_server(error_frame(ErrorCode::RateLimited, &msg));
                End::Shed(Disconnect::Stalled, "relay receiver stalled")
            }
            Status::Reset => self.peer_gone(true),
            Status::Failed | Status::Writing => self.peer_gone(false),
            // Only another connection closes our outbox while we read: a newer registration.
            Status::Closed => End::Replaced,
        }
    }

    /// Runs the request waiting on the backend, then handles the frames that came behind it,
    /// until none waits.
    async fn run_pending(&mut self, decoder: &FrameDecoder, buf: &mut BytesMut) -> Option<End> {
        while let Some(pending) = self.pending.take() {
            let end = match pending {
                Pending::Register {
                    challenge,
                    name,
                    cert,
                    signature,
                    lan_addrs,
                } => self.register(challenge, name, &cert, &signature, lan_addrs).await,
                Pending::Release(name) => Some(self.release_name(name).await),
                Pending::RoomCreate(name, msg) => {
                    self.room_request(&name, msg).await;
                    None
                }
                Pending::RemoteCall {
                    request,
                    callee,
                    policy,
                } => self.remote_call(request, callee, policy).await,
                Pending::RemoteResume { call, peer, proof } => self.remote_resume(call, peer, proof).await,
                Pending::Lookup(name) => self.remote_lookup(name).await,
            };
            if end.is_some() {
                return end;
            }
            if let Some(end) = self.handle_bytes(decoder, buf) {
                return Some(end);
            }
        }
        None
    }

    /// Handles every whole frame in `buf`, up to one that waits on the backend.
    fn handle_bytes(&mut self, decoder: &FrameDecoder, buf: &mut BytesMut) -> Option<End> {
        loop {
            if self.pending.is_some() {
                return None;
            }
            let raw = match decoder.decode(buf) {
                Ok(Some(raw)) => raw,
                Ok(None) => return None,
                Err(e) => return Some(self.protocol_error(&e)),
            };
            self.last_rx = Instant::now();
            let end = if raw.kind_byte() == FrameKind::Relay as u8 {
                self.handle_relay(raw)
            } else {
                match raw.parse() {
                    Ok(frame) => self.handle_frame(frame),
                    Err(e) => Some(self.protocol_error(&e)),
                }
            };
            if end.is_some() {
                return end;
            }
        }
    }

    /// Takes a control-rate token; a peer over its rate is shed. Relay health checks are not
    /// charged (see `handle_frame`): they are bounded by the relay frames the peer receives.
    fn charge(&mut self) -> Option<End> {
        if self.control_tokens.take(self.last_rx) {
            return None;
        }
        warn!(addr = %self.addr, "peer exceeds its frame rate; shedding");
        self.outbox
            .push_server(error_frame(ErrorCode::RateLimited, "too many frames"));
        Some(End::Shed(Disconnect::RateLimited, "frame rate"))
    }

    /// A relay frame: forwarded within an active call, dropped (and counted) otherwise; it
    /// closes the connection only if malformed or before registration.
    fn handle_relay(&mut self, raw: RawFrame) -> Option<End> {
        let header = match raw.parse() {
            Ok(Frame::Relay { header, .. }) => header,
            Ok(_) => return None, // a relay kind byte always parses as a relay frame
            Err(e) => return Some(self.protocol_error(&e)),
        };
        match self.phase {
            Phase::Registered { .. } => {}
            Phase::AwaitHello => {
                return Some(self.protocol_error(&FrameError::Unexpected {
                    got: "relay",
                    expected: "expected hello first",
                }));
            }
            Phase::AwaitRegister { .. } => {
                return Some(End::Graceful(error_frame(ErrorCode::NotRegistered, "register first")));
            }
        }
        if !self.relay_tokens.take(self.last_rx) {
            self.ctx.calls.relay_stats().count_rate_drop();
            let len = raw.wire().len();
            self.ctx.metrics.dropped(header.class, DropReason::RateLimit, 1, len);
            trace!(addr = %self.addr, call = header.call, "relay frame over the relay rate dropped");
            return None;
        }
        if let Some(link) = self.ctx.cluster.as_ref().and_then(|v| v.route(self.id, header.call)) {
            // The call is on another node: this peer's link there carries it.
            if !link.send(raw.into_wire()) {
                self.ctx.metrics.dropped(header.class, DropReason::Overload, 1, 0);
            }
            self.relaying = true;
            return None;
        }
        let now = self.last_rx.into_std();
        if header.call & natcall_proto::relay::ROOM_ID_BIT != 0 {
            if !self.room_tokens.take(self.last_rx) {
                self.ctx
                    .metrics
                    .dropped(header.class, DropReason::RoomRate, 1, raw.wire().len());
                trace!(addr = %self.addr, room = header.call, "room frame over the room rate dropped");
                return None;
            }
            self.ctx.rooms.relay(self.id, &header, raw.into_wire(), now);
        } else {
            self.ctx.calls.relay(self.id, &header, raw.into_wire(), now);
        }
        self.relaying = true;
        None
    }

    fn protocol_error(&self, e: &FrameError) -> End {
        debug!(addr = %self.addr, error = %e, "protocol error; closing");
        self.ctx.metrics.disconnect(Disconnect::ProtocolError);
        End::Graceful(error_frame(ErrorCode::from(e), &e.to_string()))
    }

    fn handle_frame(&mut self, frame: Frame<'_>) -> Option<End> {
        // Control messages are charged once decoded (health checks are free).
        if !matches!(frame, Frame::Control(_)) {
            if let Some(end) = self.charge() {
                return Some(end);
            }
        }
        match (&self.phase, frame) {
            (Phase::AwaitHello, Frame::Hello(h)) => {
                if let Err(e) = h.check(PROTOCOL_VERSION) {
                    return Some(self.protocol_error(&e));
                }
                let mut out = BytesMut::new();
                frame::encode_hello(PROTOCOL_VERSION, &mut out);
                let challenge = random_challenge();
                self.phase = Phase::AwaitRegister { challenge };
                let welcome = ServerMsg::Welcome {
                    challenge,
                    observed: self.addr,
                };
                self.send(out.freeze()).or_else(|| self.send_msg(&welcome))
            }
            (_, Frame::Error(e)) => {
                debug!(addr = %self.addr, code = ?e.code, message = %e.message, "peer reported an error");
                Some(End::PeerClosed)
            }
            (Phase::AwaitHello, f) => Some(self.protocol_error(&FrameError::Unexpected {
                got: f.name(),
                expected: "expected hello first",
            })),
            (_, Frame::Control(body)) => match decode_control::<ClientMsg>(body) {
                Ok(ClientMsg::RelayAck { frames }) if matches!(self.phase, Phase::Registered { .. }) => {
                    self.outbox.ack(frames, self.last_rx.into_std());
                    None
                }
                Ok(msg) => self.charge().or_else(|| self.handle_msg(msg)),
                Err(e) => Some(self.protocol_error(&e)),
            },
            (_, f) => Some(self.protocol_error(&FrameError::Unexpected {
                got: f.name(),
                expected: "not allowed after the handshake",
            })),
        }
    }

    fn handle_msg(&mut self, msg: ClientMsg) -> Option<End> {
        trace!(addr = %self.addr, ?msg, "control message");
        if let Some(end) = self.forward_to_node(&msg) {
            return end;
        }
        if self.visitor
            && matches!(
                msg,
                ClientMsg::ReleaseName | ClientMsg::RoomCreate { .. } | ClientMsg::NatMapping { .. }
            )
        {
            // A visit speaks for a peer's calls and room joins, nothing else.
            return Some(End::Graceful(error_frame(
                ErrorCode::Unexpected,
                "not allowed on a visit",
            )));
        }
        let cluster = self.ctx.cluster.is_some() && !self.visitor;
        match (&self.phase, msg) {
            (_, ClientMsg::Pong { nonce }) => {
                if let Some((n, sent)) = self.ping.filter(|(n, _)| *n == nonce) {
                    let rtt = sent.elapsed();
                    self.rtt = Some(rtt);
                    self.ping = None;
                    // A visit's RTT is its node's, not its peer's: the peer's came with the visit.
                    if let (Phase::Registered { name }, false) = (&self.phase, self.visitor) {
                        self.ctx.registry.record_rtt(name, self.id, rtt);
                    }
                    trace!(addr = %self.addr, nonce = n, ?rtt, "pong");
                }
                None
            }
            (
                Phase::AwaitRegister { challenge },
                ClientMsg::Register {
                    name,
                    cert,
                    signature,
                    lan_addrs,
                },
            ) => {
                // From a node's address, but a peer's registration: counted as any source's.
                if self.uncounted {
                    match self.ctx.registry.sources().admit(self.addr.ip()) {
                        Some(slot) => {
                            self.source_slot = Some(slot);
                            self.uncounted = false;
                        }
                        None => {
                            self.ctx.metrics.refused(crate::metrics::Refusal::PerIpConnections);
                            let n = self.ctx.config.limits.max_connections_per_ip;
                            let msg = format!(
                                "server full for your address: it has {n} connections, the most one address may; try later"
                            );
                            return Some(End::Graceful(error_frame(ErrorCode::ServerFull, &msg)));
                        }
                    }
                }
                self.pending = Some(Pending::Register {
                    challenge: *challenge,
                    name,
                    cert,
                    signature,
                    lan_addrs,
                });
                None
            }
            (
                Phase::AwaitRegister { .. },
                ClientMsg::Visit {
                    node,
                    name,
                    fingerprint,
                    candidates,
                    rtt_us,
                    proof,
                },
            ) => self.accept_visit(&node, name, fingerprint, candidates, rtt_us, &proof),
            (Phase::Registered { .. }, ClientMsg::Lookup { name }) => {
                if let Some(refusal) = self.lookup_limited(&name) {
                    return self.send_msg(&refusal);
                }
                let peer = self.ctx.registry.peer(&name);
                if peer.is_none() && cluster {
                    self.pending = Some(Pending::Lookup(name));
                    return None;
                }
                let online = peer.is_some();
                self.send_msg(&ServerMsg::Presence {
                    name,
                    online,
                    fingerprint: peer.map(|p| p.fingerprint),
                })
            }
            (
                Phase::Registered { name },
                ClientMsg::Call {
                    request,
                    callee,
                    policy,
                },
            ) => {
                if cluster && callee != *name && self.ctx.registry.peer(&callee).is_none() {
                    // Each asks Redis where the callee is: counted as a lookup.
                    if self.lookup_limited(&callee).is_some() {
                        return self.send_msg(&ServerMsg::CallFailed {
                            request,
                            callee,
                            failure: CallFailure::RateLimited,
                        });
                    }
                    self.pending = Some(Pending::RemoteCall {
                        request,
                        callee,
                        policy,
                    });
                    return None;
                }
                let me = self.member(name);
                self.ctx.calls.place(&self.ctx.registry, me, request, &callee, policy);
                None
            }
            (Phase::Registered { name }, ClientMsg::Resume { call, peer, proof }) => {
                if cluster && peer != *name && self.ctx.registry.peer(&peer).is_none() {
                    self.pending = Some(Pending::RemoteResume { call, peer, proof });
                    return None;
                }
                let me = self.member(name);
                self.ctx.calls.resume(&self.ctx.registry, me, call, &peer, proof);
                None
            }
            (Phase::Registered { .. }, ClientMsg::Answer { call, accept }) => {
                let reply = if accept {
                    Reply::Accept { policy: Policy::Auto }
                } else {
                    Reply::Decline(Decline::Declined)
                };
                self.ctx.calls.answer(&self.ctx.registry, self.id, call, reply);
                None
            }
            (Phase::Registered { .. }, ClientMsg::Reply { call, reply }) => {
                self.ctx.calls.answer(&self.ctx.registry, self.id, call, reply);
                None
            }
            (Phase::Registered { .. }, ClientMsg::Hangup { call, reason }) => {
                self.ctx.calls.hangup(self.id, call, &reason);
                None
            }
            (Phase::Registered { .. }, ClientMsg::CallPath { call, path }) => {
                self.ctx.calls.set_path(self.id, call, path);
                None
            }
            (Phase::Registered { name }, ClientMsg::NatMapping { mapping, port_mapped }) => {
                debug!(peer = %name, ?mapping, ?port_mapped, "NAT mapping reported");
                // Only an address that could be public is passed on to callers.
                let port_mapped = port_mapped
                    .map(sockopt::canonical)
                    .filter(|a| natcall_proto::control::plausible_public(*a));
                self.ctx.registry.record_mapping(name, self.id, mapping, port_mapped);
                None
            }
            (Phase::Registered { name }, msg @ (ClientMsg::RoomCreate { .. } | ClientMsg::RoomJoin { .. })) => {
                // A creation looks up the invited names' keys in the backend.
                self.pending = Some(Pending::RoomCreate(name.clone(), msg));
                None
            }
            (Phase::Registered { .. }, ClientMsg::RoomLeave { room }) => {
                let remote = self.ctx.cluster.as_ref().and_then(|v| v.untrack_room(self.id, &room));
                if let Some(link) = remote {
                    let leave = ClientMsg::RoomLeave { room };
                    if !control_frame(&leave).is_ok_and(|f| link.send(f)) {
                        debug!("the link to the room's node is full or gone; leave dropped");
                    }
                    return None;
                }
                if let Some(id) = self.ctx.rooms.leave(self.id, &room) {
                    self.ctx.calls.end_pairs(self.id, id);
                }
                None
            }
            (Phase::Registered { name }, ClientMsg::ReleaseName) => {
                self.pending = Some(Pending::Release(name.clone()));
                None
            }
            (Phase::Registered { .. }, ClientMsg::Register { .. }) => Some(End::Graceful(error_frame(
                ErrorCode::Unexpected,
                "this connection is already registered",
            ))),
            (_, _) => Some(End::Graceful(error_frame(ErrorCode::NotRegistered, "register first"))),
        }
    }

    /// A message about a call another node has (this peer's visit there carries it): passed
    /// on to that node. `None` when it is not such a message.
    fn forward_to_node(&self, msg: &ClientMsg) -> Option<Option<End>> {
        let visits = self.ctx.cluster.as_ref()?;
        if !matches!(self.phase, Phase::Registered { .. }) {
            return None;
        }
        let call = match msg {
            ClientMsg::Reply { call, .. }
            | ClientMsg::Answer { call, .. }
            | ClientMsg::Hangup { call, .. }
            | ClientMsg::CallPath { call, .. } => *call,
            _ => return None,
        };
        let link = visits.route(self.id, call)?;
        match control_frame(msg) {
            Ok(f) => {
                if !link.send(f) {
                    debug!(call, "the link to the call's node is full or gone; message dropped");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode a message for another node"),
        }
        // The other node tells this peer nothing more of a call it ended or declined.
        let ended = match msg {
            ClientMsg::Hangup { .. } => true,
            ClientMsg::Reply { reply, .. } => matches!(reply, Reply::Decline(_)),
            ClientMsg::Answer { accept, .. } => !accept,
            _ => false,
        };
        if ended {
            visits.untrack(self.id, call);
        }
        Some(None)
    }

    /// This peer's link to the node `other` (a peer's name) is homed on, if another node.
    async fn link_to_home(&self, me: &str, other: &str) -> Result<Option<Arc<crate::cluster::visit::Link>>, String> {
        let Some(visits) = self.ctx.cluster.clone() else {
            return Ok(None);
        };
        let home = visits.cluster().home(other).await.map_err(|e| e.to_string())?;
        self.link_to_node(me, home).await
    }

    /// This peer's link to node `node`, if it is another node.
    async fn link_to_node(
        &self,
        me: &str,
        node: Option<String>,
    ) -> Result<Option<Arc<crate::cluster::visit::Link>>, String> {
        let Some(visits) = self.ctx.cluster.clone() else {
            return Ok(None);
        };
        let Some(node) = node.filter(|n| n != visits.cluster().node()) else {
            return Ok(None);
        };
        let Some(info) = self.ctx.registry.peer(me).filter(|p| p.conn_id == self.id) else {
            return Ok(None); // replaced meanwhile
        };
        visits
            .link(&node, me, self.id, &info, self.outbox.clone())
            .await
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// `Call` to `callee`, who is not registered here: passed to its home node, or refused.
    async fn remote_call(&mut self, request: u32, callee: String, policy: Policy) -> Option<End> {
        let Phase::Registered { name } = &self.phase else {
            return None;
        };
        let name = name.clone();
        if self.ctx.registry.peer(&callee).is_some() {
            // Registered here meanwhile.
            let me = self.member(&name);
            self.ctx.calls.place(&self.ctx.registry, me, request, &callee, policy);
            return None;
        }
        let failure = match self.link_to_home(&name, &callee).await {
            Ok(Some(link)) => {
                let msg = ClientMsg::Call {
                    request,
                    callee: callee.clone(),
                    policy,
                };
                if control_frame(&msg).is_ok_and(|f| link.send(f)) {
                    debug!(peer = %name, %callee, "call passed to the callee's node");
                    return None;
                }
                link.answered();
                CallFailure::Unavailable
            }
            Ok(None) => CallFailure::Offline,
            Err(e) => {
                warn!(peer = %name, %callee, error = %e, "cannot reach the callee's node");
                CallFailure::Unavailable
            }
        };
        self.send_msg(&ServerMsg::CallFailed {
            request,
            callee,
            failure,
        })
    }

    /// `Resume` with `peer`, who is not registered here. The call's two `Resume`s meet on the
    /// node whose `Resume` came first (recorded in Redis under a digest of the names and the
    /// proof): this one waits here if it is first, else it goes to that node over this peer's
    /// visit. Without Redis, or when that node does not answer, it waits here.
    async fn remote_resume(&mut self, call: u32, peer: String, proof: [u8; 32]) -> Option<End> {
        let Phase::Registered { name } = &self.phase else {
            return None;
        };
        let name = name.clone();
        if let (Some(visits), None) = (self.ctx.cluster.clone(), self.ctx.registry.peer(&peer)) {
            let ttl = self.ctx.config.limits.resume_timeout();
            let meet = visits.cluster().claim_resume(&proof, &name, &peer, ttl).await;
            match meet {
                Ok(node) => match self.link_to_node(&name, Some(node)).await {
                    Ok(Some(link)) => {
                        let msg = ClientMsg::Resume {
                            call,
                            peer: peer.clone(),
                            proof,
                        };
                        if control_frame(&msg).is_ok_and(|f| link.send(f)) {
                            visits.track(&link, call);
                            debug!(peer = %name, other = %peer, "resume passed to the node where the call's resumes meet");
                            return None;
                        }
                        link.answered();
                    }
                    Ok(None) => {} // this node: wait here
                    Err(e) => {
                        debug!(peer = %name, other = %peer, error = %e, "the node where the resumes meet does not answer; they meet here now");
                        let _ = visits.cluster().take_resume(&proof, &name, &peer, ttl).await;
                    }
                },
                Err(e) => {
                    debug!(peer = %name, other = %peer, error = %e, "no resume rendezvous without Redis; the resume waits here")
                }
            }
        }
        let me = self.member(&name);
        self.ctx.calls.resume(&self.ctx.registry, me, call, &peer, proof);
        None
    }

    /// `Lookup` of a name not registered here: its key, and whether it is online anywhere.
    async fn remote_lookup(&mut self, name: String) -> Option<End> {
        let visits = self.ctx.cluster.clone()?;
        let found = async {
            let home = visits.cluster().home(&name).await?;
            let key = self.ctx.registry.owner(&name).await?;
            Ok::<_, RegisterError>((home.is_some(), key))
        };
        match found.await {
            Ok((online, fingerprint)) => self.send_msg(&ServerMsg::Presence {
                name,
                online,
                fingerprint: fingerprint.filter(|_| online),
            }),
            Err(e) => self.send_msg(&ServerMsg::LookupFailed {
                name,
                reason: e.to_string(),
            }),
        }
    }

    /// `Visit` from another node of the cluster, for its peer `name`.
    fn accept_visit(
        &mut self,
        node: &str,
        name: String,
        fingerprint: natcall_proto::control::Fingerprint,
        candidates: natcall_proto::control::Candidates,
        rtt_us: Option<u64>,
        proof: &[u8; 32],
    ) -> Option<End> {
        let Some(visits) = self.ctx.cluster.clone() else {
            return Some(End::Graceful(error_frame(
                ErrorCode::Unexpected,
                "this server is not a node of a cluster",
            )));
        };
        let cluster = visits.cluster();
        if node == cluster.node() || !cluster.check_visit(node, &name, &fingerprint, &self.binding, proof) {
            warn!(addr = %self.addr, %node, peer = %name, "visit with a wrong proof refused");
            return Some(End::Graceful(error_frame(
                ErrorCode::BadSignature,
                "the visit's proof does not verify",
            )));
        }
        if let Err(e) = validate_name(&name) {
            return Some(End::Graceful(error_frame(ErrorCode::BadName, &e.to_string())));
        }
        if candidates.lan.len() > MAX_LAN_ADDRS {
            return Some(End::Graceful(error_frame(
                ErrorCode::Malformed,
                "too many LAN addresses",
            )));
        }
        if self.ctx.registry.peer(&name).is_some_and(|p| !p.visitor) {
            return Some(End::Graceful(error_frame(
                ErrorCode::NameTaken,
                "that peer is registered with this node itself",
            )));
        }
        let rtt = rtt_us.map(Duration::from_micros);
        let reg = self.ctx.registry.visit(
            &name,
            fingerprint,
            candidates,
            rtt,
            self.addr,
            self.id,
            self.outbox.clone(),
        );
        if let Some(old) = reg.replaced {
            let replaced = control_frame(&ServerMsg::Replaced { by: self.addr }).unwrap_or_default();
            old.outbox.push_server(replaced);
            old.outbox.close(false);
            self.ctx.calls.leave(old.conn_id, None);
            self.ctx.rooms.leave_all(old.conn_id);
        }
        info!(peer = %name, %node, addr = %self.addr, "visit from another node");
        self.visitor = true;
        self.ctx.metrics.set_registered(self.ctx.registry.online_count());
        self.phase = Phase::Registered { name: name.clone() };
        self.send_msg(&ServerMsg::Registered {
            name,
            fingerprint,
            token: reg.token,
            stun_addr: self.ctx.config.public_addr,
            relay_ack_every: self.ctx.config.relay.ack_every,
            stun_alt_port: self.ctx.stun_alt_port(),
        })
    }

    /// This connection as a member of a room, with its key; `None` if its registration was
    /// taken over by a newer connection (whose own messages count).
    fn room_member(&self, name: &str) -> Option<(Member, natcall_proto::control::Fingerprint)> {
        let peer = self.ctx.registry.peer(name).filter(|p| p.conn_id == self.id)?;
        Some((self.member(name), peer.fingerprint))
    }

    /// `RoomCreate` or `RoomJoin` from `name`: refused over `limits.room_joins_per_min`, else
    /// handed to the rooms; a join sets up the joiner's session with each member already in.
    async fn room_request(&mut self, name: &str, msg: ClientMsg) {
        let Some((me, fingerprint)) = self.room_member(name) else {
            return;
        };
        let room = match &msg {
            ClientMsg::RoomCreate { room, .. } | ClientMsg::RoomJoin { room, .. } => room.clone(),
            _ => return,
        };
        if self.room_join_limited() {
            let per_min = self.ctx.config.limits.room_joins_per_min;
            self.ctx.rooms.refuse_rate(&me, &room, per_min);
            return;
        }
        // A name the room table refuses is not looked up or recorded in the cluster.
        let cluster = self
            .ctx
            .cluster
            .clone()
            .filter(|_| !self.visitor && validate_name(&room).is_ok());
        if let (Some(visits), ClientMsg::RoomJoin { .. }) = (&cluster, &msg) {
            if !self.ctx.rooms.contains(&room) {
                // A room on another node of the cluster: the join goes there, over this
                // peer's visit.
                match visits.cluster().room_home(&room).await {
                    Ok(home) => match self.link_to_node(name, home).await {
                        Ok(Some(link)) => {
                            if control_frame(&msg).is_ok_and(|f| link.send(f)) {
                                visits.track_room(&link, &room);
                                return;
                            }
                            link.answered();
                        }
                        Ok(None) => {}
                        Err(e) => warn!(%room, error = %e, "cannot reach the room's node"),
                    },
                    Err(e) => warn!(%room, error = %e, "cannot look the room up in the cluster"),
                }
            }
        }
        if let (Some(visits), ClientMsg::RoomCreate { .. }) = (&cluster, &msg) {
            match visits.cluster().claim_room(&room).await {
                Ok(holder) if holder != visits.cluster().node() => {
                    self.ctx.rooms.refuse_elsewhere(&me, &room);
                    return;
                }
                Ok(_) => {}
                // Without Redis the room is this node's alone; its name is recorded when Redis
                // is back (the refresher writes this node's rooms).
                Err(e) => warn!(%room, error = %e, "room not recorded in the cluster"),
            }
        }
        match msg {
            ClientMsg::RoomCreate { mut invite, .. } => {
                invite.sort();
                invite.dedup();
                invite.retain(|n| *n != me.name);
                // Past the room's size the creation is refused: no name is looked up then.
                let look_up = invite.len() <= self.ctx.rooms.max_members();
                let mut invited = Vec::with_capacity(invite.len());
                for n in invite {
                    // A name the backend cannot look up now is invited without a key: the
                    // server vouches for whichever key registers it when it joins.
                    let key = match look_up && validate_name(&n).is_ok() {
                        true => self.ctx.registry.owner(&n).await.unwrap_or_else(|e| {
                            warn!(name = %n, error = %e, "cannot look up an invited name's key");
                            None
                        }),
                        false => None,
                    };
                    invited.push((n, key));
                }
                self.ctx.rooms.create(me, fingerprint, &room, invited);
            }
            ClientMsg::RoomJoin { code, .. } => {
                let Some((id, others)) = self.ctx.rooms.join(me.clone(), fingerprint, &room, code.as_deref()) else {
                    return;
                };
                for other in others {
                    self.ctx
                        .calls
                        .start_pair(&self.ctx.registry, &room, id, me.clone(), other);
                }
            }
            _ => {}
        }
    }

    /// Whether this connection is over `limits.room_joins_per_min`.
    fn room_join_limited(&mut self) -> bool {
        self.room_joins.check(&(), self.last_rx.into_std()) != crate::limits::Verdict::Allowed
    }

    /// This connection as a member of a call.
    fn member(&self, name: &str) -> Member {
        Member {
            name: name.to_owned(),
            conn_id: self.id,
            outbox: self.outbox.clone(),
        }
    }

    async fn register(
        &mut self,
        challenge: [u8; 32],
        name: String,
        cert: &[u8],
        signature: &[u8],
        lan_addrs: Vec<SocketAddr>,
    ) -> Option<End> {
        if let Err(e) = validate_name(&name) {
            return Some(End::Graceful(error_frame(ErrorCode::BadName, &e.to_string())));
        }
        if lan_addrs.len() > MAX_LAN_ADDRS {
            let msg = format!(
                "{} LAN addresses; at most {MAX_LAN_ADDRS} are accepted",
                lan_addrs.len()
            );
            return Some(End::Graceful(error_frame(ErrorCode::Malformed, &msg)));
        }
        let fingerprint = match verify_registration(cert, signature, &challenge, &self.binding, &name) {
            Ok(fp) => fp,
            Err(e) => return Some(End::Graceful(error_frame(ErrorCode::BadSignature, &e.to_string()))),
        };
        let reg = match self
            .ctx
            .registry
            .register(&name, fingerprint, lan_addrs, self.addr, self.id, self.outbox.clone())
            .await
        {
            Ok(reg) => reg,
            Err(RegisterError::NameTaken(n)) => {
                let msg = name_taken(&n);
                return Some(End::Graceful(error_frame(ErrorCode::NameTaken, &msg)));
            }
            Err(RegisterError::Full(max)) => {
                let msg = format!("the server holds its maximum of {max} names");
                return Some(End::Graceful(error_frame(ErrorCode::ServerFull, &msg)));
            }
            Err(RegisterError::Io(e)) => {
                warn!(error = %e, "cannot record a name binding");
                return Some(End::Graceful(error_frame(
                    ErrorCode::Internal,
                    "the server cannot record the name",
                )));
            }
            Err(e) => {
                debug!(peer = %name, addr = %self.addr, error = %e, "registration refused by a limit");
                return Some(End::Graceful(error_frame(e.code(), &e.to_string())));
            }
        };
        if let Some(old) = reg.replaced {
            info!(peer = %name, old_conn = old.conn_id, by = %self.addr, "registration replaced by a newer connection");
            // Final for the old connection: told who took over, it does not register again (a
            // `GoingAway` would have it come back and take the name in turn, forever).
            let replaced = control_frame(&ServerMsg::Replaced { by: self.addr }).unwrap_or_default();
            old.outbox.push_server(replaced);
            old.outbox.close(false);
            self.ctx.calls.leave(old.conn_id, None);
            self.ctx.rooms.leave_all(old.conn_id);
        }
        if let Some(visits) = &self.ctx.cluster {
            if let Err(e) = visits.cluster().set_home(&name).await {
                warn!(peer = %name, error = %e, "presence not recorded in the cluster");
            }
        }
        info!(peer = %name, addr = %self.addr, key = %fingerprint.short(), "peer registered");
        self.ctx.metrics.set_registered(self.ctx.registry.online_count());
        self.phase = Phase::Registered { name: name.clone() };
        let stun_addr = self.ctx.config.public_addr;
        self.send_msg(&ServerMsg::Registered {
            name,
            fingerprint,
            token: reg.token,
            stun_addr,
            relay_ack_every: self.ctx.config.relay.ack_every,
            stun_alt_port: self.ctx.stun_alt_port(),
        })
    }

    fn send_ping(&mut self) -> Option<End> {
        let nonce = u64::from_be_bytes(random_challenge()[..8].try_into().unwrap_or_default());
        self.ping = Some((nonce, Instant::now()));
        let rtt_us = self.rtt.map(|r| r.as_micros() as u64);
        self.send_msg(&ServerMsg::Ping { nonce, rtt_us })
    }

    fn send_msg(&self, msg: &ServerMsg) -> Option<End> {
        match control_frame(msg) {
            Ok(b) => self.send(b),
            Err(e) => {
                warn!(error = %e, "cannot encode a server message");
                Some(End::Graceful(error_frame(ErrorCode::Internal, "internal error")))
            }
        }
    }

    /// Queues a frame; a peer that lets the server's messages pile up is not reading: shed.
    fn send(&self, frame: Bytes) -> Option<End> {
        if self.outbox.push_server(frame) {
            None
        } else {
            Some(End::Shed(Disconnect::QueueOverflow, "outbound queue full"))
        }
    }

    /// Ends the connection as `end` says; returns the read half and whether the connection is
    /// to close with a reset.
    async fn finish(&self, rd: PeerReader, end: End) -> (PeerReader, bool) {
        match end {
            End::PeerClosed | End::Reset => {
                self.outbox.close(false);
                (rd, false)
            }
            End::Shed(kind, why) => {
                warn!(addr = %self.addr, why, "shedding connection with a reset");
                self.ctx.metrics.disconnect(kind);
                self.outbox.close(true);
                (rd, true)
            }
            End::Graceful(last) => {
                self.outbox.push_server(last);
                self.outbox.close(false);
                self.read_until_closed(rd).await
            }
            End::Replaced => self.read_until_closed(rd).await,
        }
    }

    /// Reads (and drops) until the peer closes its side or the drain deadline passes, so our
    /// close never meets unread data, which would turn it into a reset that can destroy what we
    /// sent. Past the deadline the connection is reset.
    async fn read_until_closed(&self, mut rd: PeerReader) -> (PeerReader, bool) {
        let deadline = Instant::now() + self.ctx.config.limits.drain_timeout();
        let mut sink = vec![0u8; 4096]; // on the heap: idle connections should not carry it
        loop {
            match tokio::time::timeout_at(deadline, rd.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (rd, false),
                Ok(Ok(_)) => continue,
                Err(_) => {
                    debug!(addr = %self.addr, "peer did not close in time; resetting");
                    return (rd, true);
                }
            }
        }
    }
}

/// The refusal of a name bound to another key, with what to do about it.
fn name_taken(name: &str) -> String {
    format!(
        "the name {name:?} is taken: it is registered to another key; if it is yours, run with the \
         --home (identity) that registered it; otherwise choose another --name"
    )
}

fn going_away(reason: &str) -> Bytes {
    let msg = ServerMsg::GoingAway {
        reason: reason.to_owned(),
        reconnect_after_ms: 1000,
    };
    // A GoingAway is a few dozen bytes: it always encodes.
    control_frame(&msg).unwrap_or_default()
}

fn random_challenge() -> [u8; 32] {
    let mut c = [0u8; 32];
    // SystemRandom only fails when the OS has no randomness at all.
    SystemRandom::new().fill(&mut c).expect("the OS random source works");
    c
}
