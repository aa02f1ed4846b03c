//! One peer's TCP connection: handshake, registration, pings, and a graceful or abortive end.
//!
//! Data flow:
//! 1. the reader (this task) decodes frames off the socket and handles them;
//! 2. control frames count against `limits.frames_per_sec` (over it: shed); relay frames have
//!    their own budget, `limits.relay_frames_per_sec` (over it: dropped), and go to
//!    [`crate::calls`], which forwards them untouched to the other member of an active call;
//! 3. anything to send — replies, pings, messages from other tasks — goes through the
//!    connection's bounded [`Outbound`] queue to its writer task, which batches whatever is
//!    ready into one write;
//! 4. the connection ends one of three ways (and its calls with it):
//!    - **graceful** (protocol error, timeout, server drain): queue an error or "going away"
//!      frame, let the writer flush it and half-close (`shutdown(Write)`), and keep reading until
//!      the peer closes its side or the drain deadline passes, so nothing either side already
//!      sent is lost to a reset;
//!    - **peer closed**: flush and half-close in turn;
//!    - **shed** (abusive: flooding, or still sending after a graceful close's deadline):
//!      `SO_LINGER = 0`, a reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use natcall_proto::PROTOCOL_VERSION;
use natcall_proto::auth::verify_registration;
use natcall_proto::codec::decode_control;
use natcall_proto::control::{ClientMsg, MAX_LAN_ADDRS, ServerMsg, validate_name};
use natcall_proto::frame::{self, ErrorCode, Frame, FrameDecoder, FrameError, FrameKind, RawFrame};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, trace, warn};

use crate::calls::{self, Member};
use crate::registry::RegisterError;
use crate::server::Shared;
use crate::sockopt;

/// Most frames the writer puts into one write.
const MAX_BATCH: usize = 64;

/// What a connection's writer task is asked to do.
#[derive(Debug)]
pub enum Outbound {
    /// Write this encoded frame.
    Frame(Bytes),
    /// Flush what is queued, then half-close (`reset: false`) or reset (`reset: true`).
    Close { reset: bool },
}

/// How the read loop ended.
#[derive(Debug)]
enum End {
    /// Send this frame (error or going-away), half-close, read until the peer closes.
    Graceful(Bytes),
    /// The peer half-closed or vanished.
    PeerClosed,
    /// Shed with a reset.
    Shed(&'static str),
}

enum Phase {
    AwaitHello,
    AwaitRegister { challenge: [u8; 32] },
    Registered { name: String },
}

struct Conn {
    shared: Arc<Shared>,
    id: u64,
    addr: SocketAddr,
    tx: mpsc::Sender<Outbound>,
    phase: Phase,
    /// Budget for control (non-relay) frames: over it, the connection is shed.
    control_tokens: TokenBucket,
    /// Budget for relay frames: over it, they are dropped.
    relay_tokens: TokenBucket,
    last_rx: Instant,
    ping: Option<(u64, Instant)>,
    rtt: Option<Duration>,
}

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

pub(crate) fn control_frame(msg: &ServerMsg) -> Result<Bytes, FrameError> {
    let mut b = BytesMut::new();
    frame::encode_control(msg, &mut b)?;
    Ok(b.freeze())
}

/// Serves one accepted connection until it ends.
pub(crate) async fn serve(shared: Arc<Shared>, stream: TcpStream, addr: SocketAddr, id: u64) {
    if let Err(e) = sockopt::configure_peer(&stream) {
        warn!(%addr, error = %e, "cannot set socket options; closing");
        return;
    }
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(shared.config.limits.outbound_queue);
    let writer = tokio::spawn(write_loop(wr, rx));
    let now = Instant::now();
    let limits = &shared.config.limits;
    let mut conn = Conn {
        control_tokens: TokenBucket::new(limits.frames_per_sec, now),
        relay_tokens: TokenBucket::new(limits.relay_frames_per_sec, now),
        shared,
        id,
        addr,
        tx,
        phase: Phase::AwaitHello,
        last_rx: now,
        ping: None,
        rtt: None,
    };
    let mut drain = conn.shared.drain.clone();
    let (rd, end) = conn.read_loop(rd, &mut drain).await;
    if let Phase::Registered { name } = &conn.phase {
        conn.shared.registry.unregister(name, id);
        conn.shared.calls.end_all(id);
        info!(peer = %name, %addr, "peer left");
    }
    conn.finish(rd, end).await;
    let _ = writer.await;
}

impl Conn {
    async fn read_loop(&mut self, mut rd: OwnedReadHalf, drain: &mut watch::Receiver<bool>) -> (OwnedReadHalf, End) {
        let limits = self.shared.config.limits.clone();
        let decoder = FrameDecoder::new(limits.max_frame_len);
        let mut buf = BytesMut::with_capacity(256);
        let mut next_ping = Instant::now() + limits.ping_interval();
        loop {
            let deadline = match self.phase {
                Phase::Registered { .. } => self.last_rx + limits.idle_timeout(),
                _ => self.last_rx + limits.hello_timeout(),
            };
            let registered = matches!(self.phase, Phase::Registered { .. });
            let end = tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) => Some(End::PeerClosed),
                    Ok(_) => self.handle_bytes(&decoder, &mut buf),
                    Err(e) => {
                        debug!(addr = %self.addr, error = %e, "read failed");
                        Some(End::PeerClosed)
                    }
                },
                _ = sleep_until(next_ping), if registered => {
                    next_ping += limits.ping_interval();
                    self.send_ping()
                }
                _ = sleep_until(deadline) => {
                    let what = if registered { "no message" } else { "no hello and registration" };
                    let secs = if registered { limits.idle_timeout() } else { limits.hello_timeout() };
                    Some(End::Graceful(error_frame(ErrorCode::Timeout, &format!("{what} within {secs:?}; closing"))))
                }
                _ = drain.wait_for(|d| *d) => Some(End::Graceful(going_away("server is shutting down"))),
            };
            if let Some(end) = end {
                return (rd, end);
            }
            if buf.is_empty() && buf.capacity() > 64 * 1024 {
                buf = BytesMut::with_capacity(256); // give back a burst's worth of memory
            }
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
            } else if !self.control_tokens.take(self.last_rx) {
                warn!(addr = %self.addr, "peer exceeds its frame rate; shedding");
                let _ = self
                    .tx
                    .try_send(Outbound::Frame(error_frame(ErrorCode::RateLimited, "too many frames")));
                return Some(End::Shed("frame rate"));
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

    /// A relay frame: forwarded within an active call, dropped (and counted) otherwise; it
    /// closes the connection only if malformed or before registration.
    fn handle_relay(&mut self, raw: RawFrame) -> Option<End> {
        let call = match raw.parse() {
            Ok(Frame::Relay { header, .. }) => header.call,
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
            self.shared.calls.relay_stats().count_rate_drop();
            trace!(addr = %self.addr, call, "relay frame over the relay rate dropped");
            return None;
        }
        self.shared.calls.relay(self.id, call, raw.into_wire());
        None
    }

    fn protocol_error(&self, e: &FrameError) -> End {
        debug!(addr = %self.addr, error = %e, "protocol error; closing");
        End::Graceful(error_frame(ErrorCode::from(e), &e.to_string()))
    }

    fn handle_frame(&mut self, frame: Frame<'_>) -> Option<End> {
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
                Ok(msg) => self.handle_msg(msg),
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
                        self.shared.registry.record_rtt(name, self.id, rtt);
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
                let peer = self.shared.registry.peer(&name);
                let online = peer.is_some();
                self.send_msg(&ServerMsg::Presence {
                    name,
                    online,
                    fingerprint: peer.map(|p| p.fingerprint),
                })
            }
            (Phase::Registered { name }, ClientMsg::Call { callee, policy }) => {
                let me = Member {
                    name: name.clone(),
                    conn_id: self.id,
                    tx: self.tx.clone(),
                };
                calls::handle_call(&self.shared, me, &callee, policy);
                None
            }
            (Phase::Registered { .. }, ClientMsg::Answer { call, accept }) => {
                self.shared.calls.answer(&self.shared.registry, self.id, call, accept);
                None
            }
            (Phase::Registered { .. }, ClientMsg::Hangup { call, reason }) => {
                self.shared.calls.hangup(self.id, call, &reason);
                None
            }
            (Phase::Registered { .. }, ClientMsg::Register { .. }) => Some(End::Graceful(error_frame(
                ErrorCode::Unexpected,
                "this connection is already registered",
            ))),
            (_, _) => Some(End::Graceful(error_frame(ErrorCode::NotRegistered, "register first"))),
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
        let fingerprint = match verify_registration(cert, signature, &challenge, &name) {
            Ok(fp) => fp,
            Err(e) => return Some(End::Graceful(error_frame(ErrorCode::BadSignature, &e.to_string()))),
        };
        let reg =
            match self
                .shared
                .registry
                .register(&name, fingerprint, lan_addrs, self.addr, self.id, self.tx.clone())
            {
                Ok(reg) => reg,
                Err(RegisterError::NameTaken(n)) => {
                    let msg = format!("the name {n:?} is taken: it is registered to another key");
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
            };
        if let Some(old) = reg.replaced {
            info!(peer = %name, old_conn = old.conn_id, "registration replaced by a newer connection");
            let _ = old.tx.try_send(Outbound::Frame(going_away(
                "replaced by a newer connection of the same peer",
            )));
            let _ = old.tx.try_send(Outbound::Close { reset: false });
            self.shared.calls.end_all(old.conn_id);
        }
        info!(peer = %name, addr = %self.addr, key = %fingerprint.short(), "peer registered");
        self.phase = Phase::Registered { name: name.clone() };
        let stun_addr = self.shared.config.public_addr;
        self.send_msg(&ServerMsg::Registered {
            name,
            fingerprint,
            token: reg.token,
            stun_addr,
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

    /// Queues a frame; a peer whose queue is full is not reading and is shed.
    fn send(&self, frame: Bytes) -> Option<End> {
        match self.tx.try_send(Outbound::Frame(frame)) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => Some(End::Shed("outbound queue full")),
            Err(mpsc::error::TrySendError::Closed(_)) => Some(End::PeerClosed),
        }
    }

    /// Ends the connection as `end` says.
    async fn finish(&self, mut rd: OwnedReadHalf, end: End) {
        match end {
            End::PeerClosed => {
                let _ = self.tx.send(Outbound::Close { reset: false }).await;
            }
            End::Shed(why) => {
                warn!(addr = %self.addr, why, "shedding connection with a reset");
                let _ = sockopt::arm_reset(rd.as_ref());
                let _ = self.tx.send(Outbound::Close { reset: true }).await;
            }
            End::Graceful(last) => {
                let _ = self.tx.send(Outbound::Frame(last)).await;
                let _ = self.tx.send(Outbound::Close { reset: false }).await;
                // Read (and drop) until the peer closes its side, so our close never meets
                // unread data, which would turn it into a reset that can destroy what we sent.
                let deadline = Instant::now() + self.shared.config.limits.drain_timeout();
                let mut sink = vec![0u8; 4096]; // on the heap: idle connections should not carry it
                loop {
                    match tokio::time::timeout_at(deadline, rd.read(&mut sink)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(_)) => continue,
                        Err(_) => {
                            debug!(addr = %self.addr, "peer did not close in time; resetting");
                            let _ = sockopt::arm_reset(rd.as_ref());
                            break;
                        }
                    }
                }
            }
        }
    }
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

/// Writes queued frames, batching whatever is ready into one write.
async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Outbound>) {
    let mut batch = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut close = None;
        let mut next = Some(first);
        let mut n = 0;
        while let Some(out) = next.take() {
            match out {
                Outbound::Frame(f) => batch.extend_from_slice(&f),
                Outbound::Close { reset } => {
                    close = Some(reset);
                    break;
                }
            }
            n += 1;
            if n < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            if let Err(e) = wr.write_all(&batch).await {
                debug!(error = %e, "write failed");
                return;
            }
            batch.clear();
        }
        match close {
            Some(true) => {
                let _ = sockopt::arm_reset(wr.as_ref());
                wr.forget(); // no FIN: the socket closes with a reset when the reader drops
                return;
            }
            Some(false) => {
                let _ = wr.shutdown().await;
                return;
            }
            None => {}
        }
    }
}
