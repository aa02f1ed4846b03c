//! [`Endpoint`]: one registered peer — its UDP socket, its control connection to the server,
//! its QUIC endpoint — and the background tasks that route what arrives.
//!
//! Tasks, each started by [`Endpoint::bind`]:
//! - **dispatcher**: control messages from the server → waiting calls, incoming offers;
//! - **STUN router**: STUN datagrams from the server's address → the public-address probe;
//!   from anyone else → the traversal agents of the active calls;
//! - **STUN keeper**: a token binding to the server every 20 s, which records and keeps alive
//!   this peer's public address (its NAT mapping);
//! - **QUIC acceptor**: incoming QUIC connections → the call waiting for that fake address.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use natcall_proto::control::{CallFailure, ClientMsg, Fingerprint, Policy, ServerMsg};
use natcall_proto::stun as wire;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, trace, warn};

use crate::Error;
use crate::call::{self, Call, CallSignal, Role, StartInfo};
use crate::control::{self, Outgoing, Registration, ServerEvent};
use crate::identity::Identity;
use crate::socket::MuxSocket;
use crate::tls;

/// How often the public mapping is refreshed (NAT UDP timeouts are rarely below 30 s).
const STUN_REFRESH: Duration = Duration::from_secs(20);
/// Retransmits of the server probe: after these the UDP path to the server counts as blocked.
const STUN_RTO: [u64; 3] = [250, 500, 1000];
/// How long a call may ring before the caller gives up waiting for an answer.
const RING_TIMEOUT: Duration = Duration::from_secs(40);

/// How to set up an [`Endpoint`].
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The rendezvous server (TCP and UDP on the same port).
    pub server: SocketAddr,
    /// This peer's name.
    pub name: String,
    /// This peer's identity.
    pub identity: Identity,
    /// Local UDP address to bind (default `0.0.0.0:0`).
    pub bind: SocketAddr,
    /// Traversal timings (checks, budget, liveness).
    pub traversal: natcall_traversal::Config,
}

impl EndpointConfig {
    /// Defaults for everything but the server, the name and the identity.
    pub fn new(server: SocketAddr, name: impl Into<String>, identity: Identity) -> Self {
        let mut traversal = natcall_traversal::Config::default();
        // QUIC keeps the path busy (1 s keepalives), so silence means a dead path: notice in
        // about 3 s rather than the agent's idle-path default.
        traversal.liveness_timeout = Duration::from_millis(2500);
        Self {
            server,
            name: name.into(),
            identity,
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            traversal,
        }
    }
}

/// An offer of a call to this peer; accept or reject it.
#[derive(Debug)]
pub struct IncomingCall {
    endpoint: Endpoint,
    call: u32,
    caller: String,
    fingerprint: Fingerprint,
    policy: Policy,
    received: std::time::Instant,
}

impl IncomingCall {
    /// Who calls.
    pub fn caller(&self) -> &str {
        &self.caller
    }

    /// The policy the caller asked for.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Accepts and connects; returns when the call is connected.
    pub async fn accept(self) -> Result<Call, Error> {
        let inner = self.endpoint.inner.clone();
        let (tx, rx) = oneshot::channel();
        lock(&inner.pending_start).insert(self.call, tx);
        inner.send(&ClientMsg::Answer {
            call: self.call,
            accept: true,
        })?;
        let start = wait_start(rx, &self.caller).await?;
        if start.fingerprint != self.fingerprint {
            return Err(Error::WrongPeerKey(self.caller));
        }
        call::start(inner, start, Role::Callee, self.received).await
    }

    /// Declines the call.
    pub fn reject(self) -> Result<(), Error> {
        self.endpoint.inner.send(&ClientMsg::Answer {
            call: self.call,
            accept: false,
        })
    }
}

async fn wait_start(rx: oneshot::Receiver<Result<StartInfo, Error>>, peer: &str) -> Result<StartInfo, Error> {
    match tokio::time::timeout(RING_TIMEOUT, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(Error::ServerLost("the endpoint closed".into())),
        Err(_) => Err(Error::Timeout(format!("{peer} did not answer"))),
    }
}

/// An outgoing call waiting for the server: first its id (ringing), then its start.
type Ringing = (
    oneshot::Sender<Result<u32, Error>>,
    oneshot::Sender<Result<StartInfo, Error>>,
);

type Pending<K, T> = Mutex<HashMap<K, oneshot::Sender<Result<T, Error>>>>;

/// Shared state of an endpoint and its calls.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) identity: Identity,
    pub(crate) socket: Arc<MuxSocket>,
    pub(crate) quic: quinn::Endpoint,
    pub(crate) traversal: natcall_traversal::Config,
    pub(crate) allowed: Arc<RwLock<HashSet<Fingerprint>>>,
    pub(crate) calls: Mutex<HashMap<u32, mpsc::Sender<CallSignal>>>,
    pub(crate) quic_waiters: Mutex<HashMap<SocketAddr, oneshot::Sender<quinn::Connection>>>,
    /// Media packets of each call (by call id), to its media session.
    pub(crate) media_routes: Mutex<HashMap<u32, mpsc::Sender<Bytes>>>,
    pub(crate) udp_ok: AtomicBool,
    pub(crate) public: Mutex<Option<SocketAddr>>,
    pub(crate) seed: AtomicU64,
    control: mpsc::Sender<Outgoing>,
    reg: Registration,
    ringing: Mutex<HashMap<String, Ringing>>,
    pending_start: Pending<u32, StartInfo>,
    stun_pending: Mutex<HashMap<[u8; 12], oneshot::Sender<Bytes>>>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<IncomingCall>>,
    server_lost: watch::Sender<Option<String>>,
    /// [`Endpoint::close`] was called: the control connection's end is expected.
    closing: AtomicBool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections are single map operations: a panic cannot leave them inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    pub(crate) fn send(&self, msg: &ClientMsg) -> Result<(), Error> {
        let frame = control::control_frame(msg)?;
        self.control
            .try_send(Outgoing::Frame(frame))
            .map_err(|_| Error::ServerLost("the control connection is closed or stuck".into()))
    }

    pub(crate) fn server_lost(&self) -> watch::Receiver<Option<String>> {
        self.server_lost.subscribe()
    }

    pub(crate) fn end_call(&self, call: u32) {
        lock(&self.calls).remove(&call);
    }
}

/// A peer registered with a rendezvous server, able to place and receive calls.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

/// The private addresses of this host's interfaces, with `port`. Loopback is included only when
/// the server itself is on loopback (a single-host setup).
fn lan_addresses(port: u16, server: SocketAddr) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.is_loopback())
        .filter_map(|i| match i.ip() {
            IpAddr::V4(v4) if v4.is_private() || v4.is_link_local() || is_shared(v4) => {
                Some(SocketAddr::new(IpAddr::V4(v4), port))
            }
            _ => None,
        })
        .take(natcall_proto::control::MAX_LAN_ADDRS)
        .collect();
    if out.is_empty() && server.ip().is_loopback() {
        out.push(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    out
}

/// 100.64.0.0/10, carrier-grade NAT space: private to the carrier's customers.
fn is_shared(ip: std::net::Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 100 && (64..128).contains(&o[1])
}

/// Socket buffers asked for the peer's UDP socket (the kernel caps them at `net.core.rmem_max`
/// / `wmem_max`): media at hundreds of Mbit/s outruns the 208 KiB default during a scheduling
/// hiccup of a few milliseconds.
const UDP_BUFFER: usize = 4 << 20;

/// Binds the peer's one UDP socket with large buffers.
fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, Error> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(UdpSocket::from_std(socket.into())?)
}

impl Endpoint {
    /// Binds the UDP socket, registers with the server, learns the public address, and starts
    /// the endpoint's tasks.
    pub async fn bind(config: EndpointConfig) -> Result<Self, Error> {
        let udp = Arc::new(bind_udp(config.bind)?);
        let port = udp.local_addr()?.port();
        let lan = lan_addresses(port, config.server);
        let (relay_tx, relay_rx) = mpsc::channel(4096);
        let (media_tx, media_rx) = mpsc::channel(4096);
        let inbound = control::Inbound {
            quic: relay_tx,
            media: media_tx.clone(),
        };
        let (events_tx, events_rx) = mpsc::channel(256);
        let (control, reg) = control::connect(
            config.server,
            &config.identity,
            &config.name,
            lan.clone(),
            inbound,
            events_tx,
        )
        .await?;
        let (stun_tx, stun_rx) = mpsc::channel(1024);
        let socket = Arc::new(MuxSocket::new(
            udp,
            reg.stun_addr,
            relay_rx,
            control.clone(),
            stun_tx,
            media_tx,
        ));
        let allowed = Arc::new(RwLock::new(HashSet::new()));
        let mut ep_config = quinn::EndpointConfig::default();
        ep_config.grease_quic_bit(false); // the fixed bit is our demultiplexer
        let quic = quinn::Endpoint::new_with_abstract_socket(
            ep_config,
            Some(tls::server_config(&config.identity, allowed.clone())?),
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )?;
        let (incoming_tx, incoming_rx) = mpsc::channel(16);
        let seed = u64::from_be_bytes(reg.fingerprint.0[..8].try_into().unwrap_or_default()) ^ u64::from(port);
        let inner = Arc::new(Inner {
            name: config.name.clone(),
            identity: config.identity,
            socket,
            quic,
            traversal: config.traversal,
            allowed,
            calls: Mutex::default(),
            quic_waiters: Mutex::default(),
            media_routes: Mutex::default(),
            udp_ok: AtomicBool::new(true),
            public: Mutex::new(None),
            seed: AtomicU64::new(seed),
            control,
            reg,
            ringing: Mutex::default(),
            pending_start: Mutex::default(),
            stun_pending: Mutex::default(),
            incoming: tokio::sync::Mutex::new(incoming_rx),
            server_lost: watch::channel(None).0,
            closing: AtomicBool::new(false),
        });
        let ep = Self { inner };
        tokio::spawn(stun_router(Arc::downgrade(&ep.inner), stun_rx));
        tokio::spawn(media_router(Arc::downgrade(&ep.inner), media_rx));
        tokio::spawn(dispatch(ep.clone(), events_rx, incoming_tx));
        tokio::spawn(quic_acceptor(Arc::downgrade(&ep.inner), ep.inner.quic.clone()));
        ep.probe_public().await;
        tokio::spawn(stun_keeper(Arc::downgrade(&ep.inner)));
        info!(name = %config.name, public = ?ep.public_addr(), lan = ?lan, "registered");
        Ok(ep)
    }

    /// Sends token bindings to the server until one is answered; records the public address,
    /// or that UDP to the server is blocked.
    async fn probe_public(&self) {
        let ok = probe_once(&self.inner).await;
        self.inner.udp_ok.store(ok.is_some(), Ordering::Relaxed);
        match ok {
            Some(addr) => *lock(&self.inner.public) = Some(addr),
            None => {
                warn!("no STUN answer from the rendezvous server over UDP: UDP looks blocked; calls will use the relay")
            }
        }
    }

    /// This peer's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// This peer's key.
    pub fn fingerprint(&self) -> Fingerprint {
        self.inner.identity.fingerprint()
    }

    /// The public address the server observed for this peer's UDP socket, if UDP works.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        *lock(&self.inner.public)
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.inner.socket.udp().local_addr()?)
    }

    /// Test hook: drop all UDP to and from everyone but the server, as if the direct path died.
    #[doc(hidden)]
    pub fn simulate_dead_udp(&self, dead: bool) {
        self.inner.socket.set_blackhole(dead);
    }

    /// Resolves when the connection to the server is lost, with the reason.
    pub async fn server_lost(&self) -> String {
        let mut rx = self.inner.server_lost();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return "the endpoint closed".into();
            }
        }
    }

    /// Closes every call, then the connection to the server, gracefully: waits (up to a
    /// second) until the peers have been told and the server has every message queued for it,
    /// half-closes the control connection and waits for the server to close its side. Call
    /// before exiting the process (or dropping the endpoint).
    pub async fn close(&self) {
        self.inner.closing.store(true, Ordering::Relaxed);
        self.inner.quic.close(0u32.into(), b"endpoint closed");
        let mut lost = self.inner.server_lost();
        let (done, flushed) = oneshot::channel();
        let control = async {
            if self.inner.control.send(Outgoing::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
            if self.inner.control.send(Outgoing::Close).await.is_ok() {
                let _ = lost.wait_for(Option::is_some).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            tokio::join!(self.inner.quic.wait_idle(), control);
        })
        .await;
    }

    /// Calls `callee` with `policy`; returns when the call is connected.
    pub async fn call(&self, callee: &str, policy: Policy) -> Result<Call, Error> {
        let started = std::time::Instant::now();
        let (ring_tx, ring_rx) = oneshot::channel();
        let (start_tx, start_rx) = oneshot::channel();
        lock(&self.inner.ringing).insert(callee.to_owned(), (ring_tx, start_tx));
        self.inner.send(&ClientMsg::Call {
            callee: callee.to_owned(),
            policy,
        })?;
        let call_id = match tokio::time::timeout(Duration::from_secs(10), ring_rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(Error::ServerLost("the endpoint closed".into())),
            Err(_) => return Err(Error::Timeout("the server did not answer the call request".into())),
        };
        debug!(callee, call = call_id, "ringing");
        let start = wait_start(start_rx, callee).await?;
        call::start(self.inner.clone(), start, Role::Caller, started).await
    }

    /// The next incoming call offer.
    pub async fn accept(&self) -> Result<IncomingCall, Error> {
        let mut rx = self.inner.incoming.lock().await;
        let mut lost = self.inner.server_lost();
        tokio::select! {
            c = rx.recv() => c.ok_or_else(|| Error::ServerLost("the endpoint closed".into())),
            r = lost.wait_for(|r| r.is_some()) => {
                let reason = r.ok().and_then(|r| r.clone()).unwrap_or_default();
                Err(Error::ServerLost(reason))
            }
        }
    }
}

async fn probe_once(inner: &Inner) -> Option<SocketAddr> {
    for rto in STUN_RTO {
        let tid = random_tid();
        let mut buf = [0u8; 256];
        let n = wire::encode_binding_request(&tid, Some(&inner.reg.token), &mut buf).ok()?;
        let (tx, rx) = oneshot::channel();
        lock(&inner.stun_pending).insert(tid, tx);
        if let Err(e) = inner.socket.send_to(&buf[..n], inner.reg.stun_addr).await {
            debug!(error = %e, "STUN send failed");
        }
        let answer = tokio::time::timeout(Duration::from_millis(rto), rx).await;
        lock(&inner.stun_pending).remove(&tid);
        if let Ok(Ok(resp)) = answer {
            match wire::parse_binding_success(&resp, &tid, Some(&inner.reg.token.password)) {
                Ok(addr) => return Some(addr),
                Err(e) => debug!(error = %e, "bad STUN answer from the server"),
            }
        }
    }
    None
}

fn random_tid() -> [u8; 12] {
    let mut tid = [0u8; 12];
    // Without OS randomness the id is zeros: still unique enough per probe, never a crash.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tid);
    tid
}

async fn stun_keeper(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(STUN_REFRESH).await;
        let Some(inner) = inner.upgrade() else { return };
        let got = probe_once(&inner).await;
        inner.udp_ok.store(got.is_some(), Ordering::Relaxed);
        if let Some(addr) = got {
            let old = lock(&inner.public).replace(addr);
            if old != Some(addr) {
                info!(?old, new = %addr, "public address changed");
            }
        }
    }
}

/// Routes media packets (from the socket or the relay) to their call's media session.
async fn media_router(inner: std::sync::Weak<Inner>, mut rx: mpsc::Receiver<(SocketAddr, Bytes)>) {
    while let Some((fake, pkt)) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let route = lock(&inner.media_routes).get(&crate::socket::call_of(fake)).cloned();
        if let Some(tx) = route {
            // A session that cannot keep up loses packets, like a congested link.
            let _ = tx.try_send(pkt);
        }
    }
}

async fn stun_router(inner: std::sync::Weak<Inner>, mut rx: mpsc::Receiver<(SocketAddr, Bytes)>) {
    while let Some((src, pkt)) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        if src == inner.reg.stun_addr && pkt.len() >= 20 {
            let mut tid = [0u8; 12];
            tid.copy_from_slice(&pkt[8..20]);
            if let Some(tx) = lock(&inner.stun_pending).remove(&tid) {
                let _ = tx.send(pkt);
                continue;
            }
        }
        let calls: Vec<mpsc::Sender<CallSignal>> = lock(&inner.calls).values().cloned().collect();
        if calls.is_empty() {
            trace!(%src, "STUN with no call to take it");
        }
        for c in calls {
            let _ = c.try_send(CallSignal::Stun(src, pkt.clone()));
        }
    }
}

/// How long an incoming QUIC connection waits for its call to be set up locally: the peer may
/// start QUIC (over the relay) a moment before this side has processed the server's `Start`.
const QUIC_WAITER_GRACE: Duration = Duration::from_secs(2);

async fn quic_acceptor(inner: std::sync::Weak<Inner>, quic: quinn::Endpoint) {
    while let Some(incoming) = quic.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let fake = incoming.remote_address();
            let deadline = tokio::time::Instant::now() + QUIC_WAITER_GRACE;
            let waiter = loop {
                let Some(strong) = inner.upgrade() else { return };
                if let Some(w) = lock(&strong.quic_waiters).remove(&fake) {
                    break w;
                }
                drop(strong);
                if tokio::time::Instant::now() >= deadline {
                    debug!(%fake, "QUIC connection for no waiting call refused");
                    incoming.refuse();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            match incoming.await {
                Ok(conn) => {
                    let _ = waiter.send(conn);
                }
                Err(e) => debug!(error = %e, "incoming QUIC handshake failed"),
            }
        });
    }
}

async fn dispatch(ep: Endpoint, mut events: mpsc::Receiver<ServerEvent>, incoming: mpsc::Sender<IncomingCall>) {
    while let Some(ev) = events.recv().await {
        let inner = &ep.inner;
        match ev {
            ServerEvent::Msg(ServerMsg::Ringing { call, callee }) => {
                if let Some((ring, start)) = lock(&inner.ringing).remove(&callee) {
                    lock(&inner.pending_start).insert(call, start);
                    let _ = ring.send(Ok(call));
                }
            }
            ServerEvent::Msg(ServerMsg::CallFailed { callee, failure }) => {
                if let Some((ring, _)) = lock(&inner.ringing).remove(&callee) {
                    let _ = ring.send(Err(match failure {
                        CallFailure::Offline => Error::Offline(callee),
                        CallFailure::SelfCall => Error::SelfCall,
                        CallFailure::Busy => Error::Busy(callee),
                    }));
                }
            }
            ServerEvent::Msg(ServerMsg::Incoming {
                call,
                caller,
                fingerprint,
                policy,
            }) => {
                let offer = IncomingCall {
                    endpoint: ep.clone(),
                    call,
                    caller,
                    fingerprint,
                    policy,
                    received: std::time::Instant::now(),
                };
                if incoming.try_send(offer).is_err() {
                    let _ = inner.send(&ClientMsg::Answer { call, accept: false });
                }
            }
            ServerEvent::Msg(ServerMsg::Start {
                call,
                peer,
                fingerprint,
                candidates,
                password,
                controlling,
                delay_ms,
                policy,
            }) => {
                let info = StartInfo {
                    call,
                    peer,
                    fingerprint,
                    candidates,
                    password,
                    controlling,
                    delay_ms,
                    policy,
                };
                if let Some(tx) = lock(&inner.pending_start).remove(&call) {
                    let _ = tx.send(Ok(info));
                }
            }
            ServerEvent::Msg(ServerMsg::CallEnded { call, reason }) => {
                if let Some(tx) = lock(&inner.pending_start).remove(&call) {
                    let _ = tx.send(Err(Error::Ended(reason)));
                } else if let Some(c) = lock(&inner.calls).get(&call) {
                    let _ = c.try_send(CallSignal::Ended(reason));
                }
            }
            ServerEvent::Msg(ServerMsg::GoingAway { reason, .. }) => {
                info!(%reason, "the rendezvous server is going away");
            }
            ServerEvent::Msg(other) => trace!(?other, "unhandled server message"),
            ServerEvent::Closed(reason) => {
                if inner.closing.load(Ordering::Relaxed) {
                    debug!(%reason, "control connection closed (endpoint closing)");
                } else {
                    warn!(%reason, "control connection closed");
                }
                for (_, (ring, _)) in lock(&inner.ringing).drain() {
                    let _ = ring.send(Err(Error::ServerLost(reason.clone())));
                }
                for (_, tx) in lock(&inner.pending_start).drain() {
                    let _ = tx.send(Err(Error::ServerLost(reason.clone())));
                }
                inner.server_lost.send_replace(Some(reason));
            }
        }
    }
}
