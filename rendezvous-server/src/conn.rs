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
use natcall_proto::control::{ClientMsg, Decline, MAX_LAN_ADDRS, Policy, Reply, ServerMsg, validate_name};
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

/// Serves one accepted connection until it ends.
pub(crate) async fn serve(ctx: Arc<Context>, stream: TcpStream, addr: SocketAddr, id: u64) {
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
        last_rx: now,
        ping: None,
        rtt: None,
        relaying: false,
        binding,
    };
    let mut drain = conn.ctx.drain.clone();
    let (rd, end) = conn.read_loop(rd, &mut drain, status).await;
    if let Phase::Registered { name } = &conn.phase {
        conn.ctx.registry.unregister(name, id);
        conn.ctx.metrics.set_registered(conn.ctx.registry.online_count());
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
        let ping = sleep_until(next_ping);
        let idle = sleep_until(self.last_rx + idle_after(&self.phase));
        let drained = drain.wait_for(|d| *d);
        let written = writer.wait_for(|s| *s != Status::Writing);
        tokio::pin!(ping, idle, drained, written);
        let mut was_registered = false;
        loop {
            let registered = matches!(self.phase, Phase::Registered { .. });
            if registered != was_registered {
                was_registered = registered;
                idle.as_mut().reset(self.last_rx + idle_after(&self.phase));
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
                    let deadline = self.last_rx + idle_after(&self.phase);
                    if Instant::now() < deadline {
                        idle.as_mut().reset(deadline);
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
                    Some(End::Graceful(going_away("server is shutting down")))
                }
                status = &mut written => {
                    // The sender is dropped only if the writer panicked: a failed write.
                    let status = status.map_or(Status::Failed, |s| *s);
                    Some(self.writer_ended(status))
                }
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
    fn release_name(&mut self, name: String) -> End {
        match self.ctx.registry.release(&name, self.id) {
            Ok(_) => {
                info!(peer = %name, addr = %self.addr, "name released");
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

    /// Handles every whole frame in `buf`.
    fn handle_bytes(&mut self, decoder: &FrameDecoder, buf: &mut BytesMut) -> Option<End> {
        loop {
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
        match (&self.phase, msg) {
            (_, ClientMsg::Pong { nonce }) => {
                if let Some((n, sent)) = self.ping.filter(|(n, _)| *n == nonce) {
                    let rtt = sent.elapsed();
                    self.rtt = Some(rtt);
                    self.ping = None;
                    if let Phase::Registered { name } = &self.phase {
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
                let challenge = *challenge;
                self.register(challenge, name, &cert, &signature, lan_addrs)
            }
            (Phase::Registered { .. }, ClientMsg::Lookup { name }) => {
                if let Some(refusal) = self.lookup_limited(&name) {
                    return self.send_msg(&refusal);
                }
                let peer = self.ctx.registry.peer(&name);
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
                let me = self.member(name);
                self.ctx.calls.place(&self.ctx.registry, me, request, &callee, policy);
                None
            }
            (Phase::Registered { name }, ClientMsg::Resume { call, peer, proof }) => {
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
            (Phase::Registered { name }, msg @ (ClientMsg::RoomCreate { .. } | ClientMsg::RoomJoin { .. })) => {
                let name = name.clone();
                self.room_request(&name, msg);
                None
            }
            (Phase::Registered { .. }, ClientMsg::RoomLeave { room }) => {
                if let Some(id) = self.ctx.rooms.leave(self.id, &room) {
                    self.ctx.calls.end_pairs(self.id, id);
                }
                None
            }
            (Phase::Registered { name }, ClientMsg::ReleaseName) => {
                let name = name.clone();
                Some(self.release_name(name))
            }
            (Phase::Registered { .. }, ClientMsg::Register { .. }) => Some(End::Graceful(error_frame(
                ErrorCode::Unexpected,
                "this connection is already registered",
            ))),
            (_, _) => Some(End::Graceful(error_frame(ErrorCode::NotRegistered, "register first"))),
        }
    }

    /// This connection as a member of a room, with its key; `None` if its registration was
    /// taken over by a newer connection (whose own messages count).
    fn room_member(&self, name: &str) -> Option<(Member, natcall_proto::control::Fingerprint)> {
        let peer = self.ctx.registry.peer(name).filter(|p| p.conn_id == self.id)?;
        Some((self.member(name), peer.fingerprint))
    }

    /// `RoomCreate` or `RoomJoin` from `name`: refused over `limits.room_joins_per_min`, else
    /// handed to the rooms; a join sets up the joiner's session with each member already in.
    fn room_request(&mut self, name: &str, msg: ClientMsg) {
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
        match msg {
            ClientMsg::RoomCreate { invite, .. } => {
                self.ctx
                    .rooms
                    .create(&self.ctx.registry, me, fingerprint, &room, invite);
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

    fn register(
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
        let reg =
            match self
                .ctx
                .registry
                .register(&name, fingerprint, lan_addrs, self.addr, self.id, self.outbox.clone())
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
