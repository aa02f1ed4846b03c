//! The TCP control connection to the rendezvous server: hello and registration
//! ([`connect`]), then a reader task (pings answered, relay frames to the peer core and on to
//! quinn or the call's media, control messages to the core) and a writer task with **two
//! lanes**: control (health checks, pongs, hang-ups, signalling) always before relay frames, so
//! a busy relay upload never delays or drops what the server counts on.
//!
//! The lanes outlive connections: each new connection's writer takes them over
//! ([`LaneReceivers`]), dropping what was queued for the old one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use natcall_proto::PROTOCOL_VERSION;
use natcall_proto::codec::decode_control;
use natcall_proto::control::{ClientMsg, ServerMsg};
use natcall_proto::frame::{self, ErrorFrame, Frame, FrameDecoder, LEN_PREFIX, MAX_FRAME_LEN};
use natcall_proto::relay::{RELAY_HEADER_LEN, ROOM_ID_BIT, TrafficClass};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::server_trust::{self, ServerTrust, Verifier};

/// The TLS channel to the server.
type Stream = TlsStream<TcpStream>;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, trace};

use crate::Error;
use crate::core::{FakeAddr, Registered};
use crate::driver::Shared;
use crate::identity::Identity;

/// Control frames queued towards the server at most (a full lane means a stuck connection).
const CONTROL_QUEUE: usize = 1024;
/// Relay frames queued towards the server before new ones are dropped (congestion).
const RELAY_QUEUE: usize = 4096;
/// How long connecting and registering may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes written in one batch at most.
const BATCH: usize = 64 * 1024;

/// What goes to the writer's control lane.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// An encoded frame.
    Frame(Bytes),
    /// Answer once everything queued before it is written.
    Flush(oneshot::Sender<()>),
    /// Write what is queued, then half-close (FIN): the server answers by closing its side.
    Close,
    /// The connection is stuck: drop it (the endpoint reconnects).
    Abort,
}

/// The senders of the two lanes.
#[derive(Debug, Clone)]
pub(crate) struct Lanes {
    pub(crate) control: mpsc::Sender<Outgoing>,
    pub(crate) relay: mpsc::Sender<Bytes>,
}

/// The receivers of the two lanes, taken by the current connection's writer.
#[derive(Debug)]
pub(crate) struct LaneReceivers {
    control: mpsc::Receiver<Outgoing>,
    relay: mpsc::Receiver<Bytes>,
}

/// Both lanes.
pub(crate) fn lanes() -> (Lanes, LaneReceivers) {
    let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (relay, relay_rx) = mpsc::channel(RELAY_QUEUE);
    (
        Lanes { control, relay },
        LaneReceivers {
            control: control_rx,
            relay: relay_rx,
        },
    )
}

/// The TLS channel to a rendezvous server, for tools that speak the control protocol
/// themselves (benchmarks, protocol tests).
pub type ServerStream = Stream;

/// Opens the TLS channel to the server at `addr`, checking its key as an endpoint does, and
/// returns it with the channel binding a registration signs ([`natcall_proto::auth`]).
pub async fn connect_tls(addr: SocketAddr, trust: ServerTrust) -> Result<(ServerStream, [u8; 32]), Error> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|cause| Error::Unreachable { addr, cause })?;
    tune(&tcp)?;
    let stream = Tls::new(trust)?.handshake(tcp, addr).await?;
    let binding = binding(&stream)?;
    Ok((stream, binding))
}

fn binding(stream: &Stream) -> Result<[u8; 32], Error> {
    let mut binding = [0u8; 32];
    stream
        .get_ref()
        .1
        .export_keying_material(&mut binding, natcall_proto::REGISTER_BINDING_LABEL, None)
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(binding)
}

/// Who this peer registers as, and where.
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    /// The server registered with (or tried) now.
    pub(crate) server: SocketAddr,
    pub(crate) identity: Identity,
    pub(crate) name: String,
    pub(crate) lan_addrs: Vec<SocketAddr>,
    pub(crate) tls: Tls,
    /// The other servers of its cluster, in the order they are tried after `server`.
    pub(crate) others: Vec<(SocketAddr, Tls)>,
}

impl Credentials {
    /// Moves on to the next server (the current one goes last); `false` with only one.
    pub(crate) fn rotate(&mut self) -> bool {
        if self.others.is_empty() {
            return false;
        }
        let (server, tls) = self.others.remove(0);
        let old = (
            std::mem::replace(&mut self.server, server),
            std::mem::replace(&mut self.tls, tls),
        );
        self.others.push(old);
        true
    }

    /// Makes `addr` the next server tried (a draining server's `MoveTo`), adding it, trusted as
    /// `template` trusts a server met first, when it is not known yet.
    pub(crate) fn prefer(&mut self, addr: SocketAddr, template: &ServerTrust) -> Result<(), Error> {
        if addr == self.server {
            return Ok(());
        }
        let entry = match self.others.iter().position(|(a, _)| *a == addr) {
            Some(i) => self.others.remove(i),
            None => {
                let trust = ServerTrust {
                    pinned: None,
                    ..ServerTrust::first_use(addr.to_string())
                };
                let trust = ServerTrust {
                    known_servers: template.known_servers.clone(),
                    ca_roots: template.ca_roots.clone(),
                    ..trust
                };
                (addr, Tls::new(trust)?)
            }
        };
        self.others.insert(0, entry);
        Ok(())
    }

    /// Whether other servers are known.
    pub(crate) fn has_others(&self) -> bool {
        !self.others.is_empty()
    }

    /// How the current server's key is checked.
    pub(crate) fn trust(&self) -> &ServerTrust {
        &self.tls.trust
    }
}

/// The TLS client side of the server connections: one configuration and one verifier for the
/// endpoint's life, so a key met first is required on every reconnection.
#[derive(Clone)]
pub(crate) struct Tls {
    trust: ServerTrust,
    connector: tokio_rustls::TlsConnector,
    verifier: Arc<Verifier>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

impl Tls {
    pub(crate) fn new(trust: ServerTrust) -> Result<Self, Error> {
        let (config, verifier) = server_trust::client_config(trust.clone())?;
        Ok(Self {
            trust,
            connector: tokio_rustls::TlsConnector::from(config),
            verifier,
        })
    }

    /// The TLS handshake over `tcp`; a refused server key is reported as such.
    async fn handshake(&self, tcp: TcpStream, addr: SocketAddr) -> Result<Stream, Error> {
        let name = server_trust::server_name(&self.trust, addr);
        self.connector.connect(name, tcp).await.map_err(|e| {
            self.verifier.take_refusal().unwrap_or_else(|| Error::NotAServer {
                server: self.trust.label.clone(),
                why: format!("the TLS handshake failed ({e}); an HTTP or other server may hold the port"),
            })
        })
    }
}

/// A registered connection, before its tasks start.
#[derive(Debug)]
pub(crate) struct Connected {
    stream: Stream,
    buf: BytesMut,
    pub(crate) registered: Registered,
}

struct Handshake {
    stream: Stream,
    buf: BytesMut,
}

impl Handshake {
    async fn next(&mut self) -> Result<ServerMsg, Error> {
        let decoder = FrameDecoder::new(MAX_FRAME_LEN);
        loop {
            if let Some(raw) = decoder
                .decode(&mut self.buf)
                .map_err(|e| Error::Protocol(e.to_string()))?
            {
                match raw.parse().map_err(|e| Error::Protocol(e.to_string()))? {
                    Frame::Hello(h) => {
                        h.check(PROTOCOL_VERSION).map_err(|e| Error::Protocol(e.to_string()))?;
                        continue;
                    }
                    Frame::Control(body) => return decode_control(body).map_err(|e| Error::Protocol(e.to_string())),
                    Frame::Error(e) => return Err(refused(&e)),
                    Frame::Relay { .. } => return Err(Error::Protocol("relay frame during registration".into())),
                }
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(Error::Protocol(
                    "the server closed the connection during registration".into(),
                ));
            }
        }
    }
}

fn refused(e: &ErrorFrame) -> Error {
    Error::Refused {
        code: e.code,
        message: e.message.clone(),
    }
}

fn encode(msg: &ClientMsg) -> Result<Bytes, Error> {
    frame::control_frame(msg).map_err(|e| Error::Protocol(e.to_string()))
}

/// Options of the connection to the server: no Nagle (control and relay frames are small and
/// latency-bound), and on Linux linear retransmission timeouts while the stream is thin
/// (`TCP_THIN_LINEAR_TIMEOUTS`): what a call relays upstream is a thin stream, and a lost
/// retransmission's exponential backoff would stall it for 0.6 s or more.
fn tune(tcp: &TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    // Without it (an older kernel, a sandbox) the connection works with the default backoff.
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(tcp).set_tcp_thin_linear_timeouts(true);
    Ok(())
}

/// Connects to the server and registers.
pub(crate) async fn connect(who: &Credentials) -> Result<Connected, Error> {
    let server = who.server;
    let fut = async {
        let tcp = TcpStream::connect(server)
            .await
            .map_err(|cause| Error::Unreachable { addr: server, cause })?;
        tune(&tcp)?;
        let stream = who.tls.handshake(tcp, server).await?;
        let binding = binding(&stream)?;
        let mut conn = Handshake {
            stream,
            buf: BytesMut::new(),
        };
        let mut out = BytesMut::new();
        frame::encode_hello(PROTOCOL_VERSION, &mut out);
        conn.stream.write_all(&out).await?;
        conn.stream.flush().await?;
        let ServerMsg::Welcome { challenge, .. } = conn.next().await? else {
            return Err(Error::Protocol("expected a welcome from the server".into()));
        };
        let signature = who.identity.sign_registration(&challenge, &binding, &who.name)?;
        let register = ClientMsg::Register {
            name: who.name.clone(),
            cert: who.identity.cert_der().to_vec(),
            signature,
            lan_addrs: who.lan_addrs.clone(),
        };
        conn.stream.write_all(&encode(&register)?).await?;
        conn.stream.flush().await?;
        match conn.next().await? {
            ServerMsg::Registered {
                token,
                stun_addr,
                relay_ack_every,
                stun_alt_port,
                ..
            } => {
                let stun_addr = stun_addr.unwrap_or(server);
                let registered = Registered {
                    stun_addr,
                    token,
                    relay_ack_every,
                    stun_alt: stun_alt_port.map(|p| SocketAddr::new(stun_addr.ip(), p)),
                };
                Ok(Connected {
                    stream: conn.stream,
                    buf: conn.buf,
                    registered,
                })
            }
            other => Err(Error::Protocol(format!("expected registration, got {other:?}"))),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| Error::NotAServer {
            server: server.to_string(),
            why: format!(
                "it accepted the connection but did not complete the handshake within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            ),
        })?
}

impl Connected {
    /// Frees the name this connection registered (`ReleaseName`); returns it once the server
    /// confirmed (`NameReleased`). The connection ends with it.
    pub(crate) async fn release_name(self) -> Result<String, Error> {
        let mut conn = Handshake {
            stream: self.stream,
            buf: self.buf,
        };
        conn.stream.write_all(&encode(&ClientMsg::ReleaseName)?).await?;
        conn.stream.flush().await?;
        let fut = async {
            loop {
                match conn.next().await? {
                    ServerMsg::NameReleased { name } => return Ok::<_, Error>(name),
                    ServerMsg::Ping { nonce, .. } => {
                        conn.stream.write_all(&encode(&ClientMsg::Pong { nonce })?).await?;
                        conn.stream.flush().await?;
                    }
                    _ => {} // presence or call traffic that raced the release
                }
            }
        };
        let name = tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
            .await
            .map_err(|_| Error::Protocol("the server did not confirm the release in time".into()))??;
        let _ = conn.stream.shutdown().await;
        Ok(name)
    }
}

/// Starts the reader and writer of a registered connection and tells the core. The returned
/// handle ends with the reason the connection ended.
pub(crate) fn start(
    shared: &Arc<Shared>,
    lanes: Arc<tokio::sync::Mutex<LaneReceivers>>,
    conn: Connected,
) -> tokio::task::JoinHandle<String> {
    let Connected {
        stream,
        buf,
        registered,
    } = conn;
    let (rd, wr) = tokio::io::split(stream);
    let (stop_tx, stop_rx) = oneshot::channel();
    // The writer takes the lanes only after the old writer let them go; what was queued for
    // the old connection (stale acks, relay frames for old call ids) is dropped first — here,
    // before the core hears of the registration: what it queues from then on (its NAT
    // mapping, a call, its resumes) is this connection's. (Dropped in the writer task, it was
    // lost whenever the task ran after the core had queued it: a call placed right after
    // registering never reached the server.) The old writer has ended by now (the old reader
    // waits for it), so the lanes are free; if not, the new writer waits for them.
    let writer = match lanes.clone().try_lock_owned() {
        Ok(mut rx) => {
            while rx.control.try_recv().is_ok() {}
            while rx.relay.try_recv().is_ok() {}
            tokio::spawn(async move {
                let mut rx = rx;
                write_loop(wr, &mut rx, stop_rx).await;
            })
        }
        Err(_) => tokio::spawn(async move {
            let mut rx = lanes.lock_owned().await;
            while rx.control.try_recv().is_ok() {}
            while rx.relay.try_recv().is_ok() {}
            write_loop(wr, &mut rx, stop_rx).await;
        }),
    };
    shared.with(|core, now| core.handle_registered(now, registered));
    let shared = shared.clone();
    tokio::spawn(async move {
        let reason = read_loop(rd, buf, &shared).await;
        let _ = stop_tx.send(());
        let _ = writer.await;
        debug!(%reason, "control connection ended");
        reason
    })
}

async fn read_loop(mut rd: ReadHalf<Stream>, mut buf: BytesMut, shared: &Shared) -> String {
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    loop {
        match decoder.decode(&mut buf) {
            Ok(Some(raw)) => match raw.parse() {
                Ok(Frame::Relay { header, .. }) => {
                    let payload = raw.into_wire().slice(LEN_PREFIX + 1 + RELAY_HEADER_LEN..);
                    let (into, ack) = {
                        let mut core = shared.lock();
                        let r = core.handle_relay(header.call);
                        if let (Some(id), false) = (r.call, header.class == TrafficClass::Control) {
                            Shared::deliver_media(&mut core, id, &payload);
                        }
                        (r.call.filter(|_| header.class == TrafficClass::Control), r.ack)
                    };
                    if let Some(frames) = ack {
                        // The relay's health check: never dropped, first in the control lane.
                        if let Ok(f) = encode(&ClientMsg::RelayAck { frames }) {
                            if shared.lanes.control.send(Outgoing::Frame(f)).await.is_err() {
                                return "the endpoint closed".into();
                            }
                        }
                    }
                    if header.call & ROOM_ID_BIT != 0 && header.class != TrafficClass::Control {
                        shared.deliver_room(header.call, payload.clone());
                    }
                    // QUIC travels as control class; a full queue is a congested link.
                    if let Some(id) = into {
                        if shared.relay_quic.try_send((FakeAddr::of(id), payload)).is_err() {
                            trace!(call = header.call, "relay inbound queue full: packet dropped");
                        }
                    }
                }
                Ok(Frame::Control(body)) => match decode_control::<ServerMsg>(body) {
                    Ok(ServerMsg::Ping { nonce, .. }) => {
                        if let Ok(f) = encode(&ClientMsg::Pong { nonce }) {
                            if shared.lanes.control.send(Outgoing::Frame(f)).await.is_err() {
                                return "the endpoint closed".into();
                            }
                        }
                    }
                    Ok(ServerMsg::Replaced { by }) => {
                        // Final: the core ends every call and the endpoint does not register
                        // again; this connection is over (the server closes it next).
                        return shared.with(|core, now| core.handle_replaced(now, by));
                    }
                    Ok(ServerMsg::RelayBudget { call, bps, .. }) if call & ROOM_ID_BIT != 0 => {
                        // A room's: what its members that take the most drain from this one.
                        shared.deliver_room_budget(call, bps);
                    }
                    Ok(ServerMsg::RelayBudget { call, bps, dropped }) => {
                        // For the call's media session, not the core's state.
                        shared.deliver_budget(call, bps, dropped);
                    }
                    Ok(msg) => {
                        shared.with(|core, now| core.handle_server_msg(now, msg));
                    }
                    Err(e) => return format!("the server sent a malformed message: {e}"),
                },
                Ok(Frame::Error(e)) => return format!("the server closed the connection: {}", e.message),
                Ok(Frame::Hello(_)) => {}
                Err(e) => return format!("the server sent a bad frame: {e}"),
            },
            Ok(None) => match rd.read_buf(&mut buf).await {
                Ok(0) => return "the server closed the connection".to_owned(),
                Ok(_) => {}
                // A server that stops (killed, restarted) closes TCP without TLS's goodbye:
                // rustls calls that an unexpected EOF, with a link to its manual.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return "the server closed the connection".to_owned();
                }
                Err(e) => return format!("lost the connection to the server: {e}"),
            },
            Err(e) => return format!("the server sent a bad frame: {e}"),
        }
    }
}

/// Writes batches, the control lane's frames first in each, until the connection fails, is
/// closed, or `stop` fires. A flush or close also writes every relay frame queued before it
/// (a relayed QUIC close and the hang-up behind it go out before the connection half-closes).
async fn write_loop(mut wr: WriteHalf<Stream>, rx: &mut LaneReceivers, mut stop: oneshot::Receiver<()>) {
    let mut batch = BytesMut::new();
    let mut flushed = Vec::new();
    loop {
        let mut end = None;
        tokio::select! {
            biased;
            _ = &mut stop => return,
            c = rx.control.recv() => match c {
                Some(out) => end = take(out, &mut batch, &mut flushed),
                None => return,
            },
            r = rx.relay.recv() => match r {
                Some(f) => batch.extend_from_slice(&f),
                None => return,
            },
        }
        // Everything the control lane holds goes first, then relay frames up to the batch size.
        while batch.len() < BATCH && end.is_none() {
            match rx.control.try_recv() {
                Ok(out) => end = take(out, &mut batch, &mut flushed),
                Err(_) => break,
            }
        }
        while batch.len() < BATCH && end.is_none() {
            match rx.relay.try_recv() {
                Ok(f) => batch.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        if end == Some(End::Abort) {
            return;
        }
        if end == Some(End::Close) || !flushed.is_empty() {
            // Bounded: the relay lane holds at most RELAY_QUEUE frames, and nothing new is
            // taken from the control lane meanwhile.
            while let Ok(f) = rx.relay.try_recv() {
                batch.extend_from_slice(&f);
                if batch.len() >= BATCH && !write_batch(&mut wr, &mut batch, &mut stop).await {
                    return;
                }
            }
        }
        if !write_batch(&mut wr, &mut batch, &mut stop).await {
            return;
        }
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
        if end == Some(End::Close) {
            let _ = wr.shutdown().await;
            // Keep the lanes until the reader sees the server's close.
            let _ = stop.await;
            return;
        }
    }
}

/// Writes and clears `batch`; false when the connection failed or `stop` fired.
async fn write_batch(wr: &mut WriteHalf<Stream>, batch: &mut BytesMut, stop: &mut oneshot::Receiver<()>) -> bool {
    if batch.is_empty() {
        return true;
    }
    let started = Instant::now();
    let ok = tokio::select! {
        r = async { wr.write_all(batch).await?; wr.flush().await } => r.is_ok(),
        _ = stop => false,
    };
    trace!(bytes = batch.len(), took = ?started.elapsed(), "control batch written");
    batch.clear();
    ok
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Close,
    Abort,
}

/// Adds `out` to the batch; says whether the connection is to end after it.
fn take(out: Outgoing, batch: &mut BytesMut, flushed: &mut Vec<oneshot::Sender<()>>) -> Option<End> {
    match out {
        Outgoing::Frame(f) => batch.extend_from_slice(&f),
        Outgoing::Flush(done) => flushed.push(done),
        Outgoing::Close => return Some(End::Close),
        Outgoing::Abort => return Some(End::Abort),
    }
    None
}
