//! [`Call`]: one connected call, and the driver task that runs its traversal agent and moves
//! its QUIC connection between paths.
//!
//! Setup, after the server's `Start`:
//! 1. the peer's fake address gets a route: the relay at once under `auto` and `relay-only`
//!    (QUIC connects over it immediately), nowhere yet under `direct-only` and `lan-only`;
//! 2. after the server's `delay_ms`, the traversal agent starts checking the candidates the
//!    policy allows;
//! 3. the caller opens QUIC (pinned to the callee's key) once a route exists; the callee
//!    waits for it; the caller opens the chat stream.
//!
//! During the call the driver acts on the agent's events: a selected pair becomes the route
//! (relay → direct with no new handshake); a lost path falls back to the relay (if the policy
//! allows) and direct is retried later with backoff.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use natcall_proto::control::{Candidates, ClientMsg, Fingerprint, PathKind as WirePath, Policy};
use natcall_traversal::{Agent, Candidate, Credentials, Event, PathKind, RelayReason};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info};

use crate::Error;
use crate::endpoint::{Inner, lock};
use crate::identity::CERT_NAME;
use crate::media::{Media, MediaReport};
use crate::socket::{Route, fake_addr};
use crate::tls;
use natcall_media::{Frame, ReceivedFrame, Track};

/// Header line of the chat stream.
const CHAT_HELLO: &str = "natcall-chat/1";
/// Longest chat line accepted.
pub const MAX_CHAT_LINE: usize = 4096;
/// First retry of direct after falling back to the relay; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Longest a hang-up waits for the call's QUIC close to be sent first ([`Call::hangup`]).
const HANGUP_HOLD: Duration = Duration::from_millis(50);

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

/// Why a call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", content = "reason", rename_all = "snake_case")]
pub enum EndReason {
    /// This side hung up.
    Local,
    /// The peer hung up.
    Peer(String),
    /// The server ended the call (the peer left it).
    Server(String),
    /// The connection was lost.
    Lost(String),
    /// The policy's paths failed.
    Failed(String),
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::Local => f.write_str("hung up"),
            EndReason::Peer(r) if r.is_empty() => f.write_str("the peer hung up"),
            EndReason::Peer(r) => write!(f, "the peer hung up: {r}"),
            EndReason::Server(r) | EndReason::Lost(r) | EndReason::Failed(r) => f.write_str(r),
        }
    }
}

/// What the server said to start a call.
#[derive(Debug, Clone)]
pub(crate) struct StartInfo {
    pub(crate) call: u32,
    pub(crate) peer: String,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) candidates: Candidates,
    pub(crate) password: String,
    pub(crate) controlling: bool,
    pub(crate) delay_ms: u32,
    pub(crate) policy: Policy,
}

/// What the endpoint routes to a call's driver.
#[derive(Debug)]
pub(crate) enum CallSignal {
    Stun(SocketAddr, Bytes),
    Ended(String),
}

#[derive(Debug)]
struct Shared {
    /// To report path changes to the server (for its metrics).
    inner: std::sync::Weak<Inner>,
    call: u32,
    t0: Instant,
    path: watch::Sender<Path>,
    changes: Mutex<Vec<PathChange>>,
    failure: watch::Sender<Option<String>>,
    ended: watch::Sender<Option<String>>,
    stop: watch::Sender<bool>,
}

impl Shared {
    fn set_path(&self, to: Path, remote: Option<SocketAddr>) {
        let from = *self.path.borrow();
        if from == to {
            return;
        }
        let at_ms = self.t0.elapsed().as_secs_f64() * 1000.0;
        info!(%from, %to, ?remote, at_ms, "path changed");
        lock(&self.changes).push(PathChange {
            at_ms,
            from,
            to,
            remote,
        });
        self.path.send_replace(to);
        let reported = match to {
            Path::Lan => Some(WirePath::Lan),
            Path::Direct => Some(WirePath::Direct),
            Path::Relay => Some(WirePath::Relay),
            Path::Connecting => None,
        };
        if let (Some(path), Some(inner)) = (reported, self.inner.upgrade()) {
            let _ = inner.send(&ClientMsg::CallPath { call: self.call, path });
        }
    }

    fn fail(&self, why: String) {
        self.failure.send_replace(Some(why));
    }
}

/// A connected call.
#[derive(Debug)]
pub struct Call {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    info: StartInfo,
    role: Role,
    conn: quinn::Connection,
    chat_tx: tokio::sync::Mutex<quinn::SendStream>,
    chat_rx: tokio::sync::Mutex<BufReader<quinn::RecvStream>>,
    connected_after: Duration,
    path_at_connect: Path,
    media: Media,
}

fn relay_allowed(policy: Policy) -> bool {
    matches!(policy, Policy::Auto | Policy::RelayOnly)
}

/// Sets up the call the server started; returns when QUIC is connected and the chat stream open.
pub(crate) async fn start(inner: Arc<Inner>, info: StartInfo, role: Role, t0: Instant) -> Result<Call, Error> {
    let fake = fake_addr(info.call);
    if let Ok(mut a) = inner.allowed.write() {
        a.insert(info.fingerprint);
    }
    let (sig_tx, sig_rx) = mpsc::channel(256);
    lock(&inner.calls).insert(info.call, sig_tx);
    // Media may arrive as soon as the peer is connected: route it from now on.
    let (media_tx, media_rx) = mpsc::channel(1024);
    lock(&inner.media_routes).insert(info.call, media_tx);
    let waiter = (role == Role::Callee).then(|| {
        let (tx, rx) = oneshot::channel();
        lock(&inner.quic_waiters).insert(fake, tx);
        rx
    });
    let shared = Arc::new(Shared {
        inner: Arc::downgrade(&inner),
        call: info.call,
        t0,
        path: watch::channel(Path::Connecting).0,
        changes: Mutex::default(),
        failure: watch::channel(None).0,
        ended: watch::channel(None).0,
        stop: watch::channel(false).0,
    });
    if relay_allowed(info.policy) {
        inner.socket.set_route(fake, Route::Relay(info.call));
        shared.set_path(Path::Relay, None);
    } else {
        inner.socket.set_route(fake, Route::Void);
    }
    tokio::spawn(drive(inner.clone(), shared.clone(), sig_rx, info.clone()));
    let budget = inner.traversal.budget + Duration::from_secs(15);
    let connected = tokio::time::timeout(budget, connect(&inner, &shared, &info, role, waiter)).await;
    let (conn, chat_tx, chat_rx) = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            cleanup(&inner, &shared, &info, None);
            return Err(e);
        }
        Err(_) => {
            cleanup(&inner, &shared, &info, None);
            return Err(Error::Timeout(format!("the call to {} did not connect", info.peer)));
        }
    };
    let media = match Media::start(
        &conn,
        role == Role::Caller,
        info.call,
        inner.socket.clone(),
        fake,
        media_rx,
    ) {
        Ok(m) => m,
        Err(e) => {
            conn.close(1u32.into(), b"media setup failed");
            cleanup(&inner, &shared, &info, None);
            return Err(e);
        }
    };
    let connected_after = t0.elapsed();
    let path_at_connect = *shared.path.borrow();
    info!(peer = %info.peer, path = %path_at_connect, ?connected_after, "call connected");
    Ok(Call {
        inner,
        shared,
        info,
        role,
        conn,
        chat_tx: tokio::sync::Mutex::new(chat_tx),
        chat_rx: tokio::sync::Mutex::new(chat_rx),
        connected_after,
        path_at_connect,
        media,
    })
}

/// Releases what a call holds. Its route stays until `conn` (if any) has closed, so the
/// CONNECTION_CLOSE that tells the peer still finds its path.
fn cleanup(inner: &Arc<Inner>, shared: &Shared, info: &StartInfo, conn: Option<quinn::Connection>) {
    shared.stop.send_replace(true);
    inner.end_call(info.call);
    lock(&inner.media_routes).remove(&info.call);
    let fake = fake_addr(info.call);
    lock(&inner.quic_waiters).remove(&fake);
    if let Ok(mut a) = inner.allowed.write() {
        a.remove(&info.fingerprint);
    }
    match (conn, tokio::runtime::Handle::try_current()) {
        (Some(conn), Ok(rt)) => {
            let inner = inner.clone();
            rt.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                // A new call may have reused the id only if the server reissued it: check.
                if !lock(&inner.calls).contains_key(&crate::socket::call_of(fake)) {
                    inner.socket.remove(fake);
                }
            });
        }
        _ => inner.socket.remove(fake),
    }
}

/// Waits for `fut` unless the call fails or is ended first.
async fn or_failure<T>(shared: &Shared, fut: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    let mut failure = shared.failure.subscribe();
    let mut ended = shared.ended.subscribe();
    tokio::select! {
        r = fut => r,
        f = failure.wait_for(|f| f.is_some()) => Err(Error::NoPath(f.ok().and_then(|f| f.clone()).unwrap_or_default())),
        e = ended.wait_for(|e| e.is_some()) => Err(Error::Ended(e.ok().and_then(|e| e.clone()).unwrap_or_default())),
    }
}

type Connected = (quinn::Connection, quinn::SendStream, BufReader<quinn::RecvStream>);

async fn connect(
    inner: &Inner,
    shared: &Shared,
    info: &StartInfo,
    role: Role,
    waiter: Option<oneshot::Receiver<quinn::Connection>>,
) -> Result<Connected, Error> {
    let fake = fake_addr(info.call);
    let conn = match (role, waiter) {
        (Role::Callee, Some(waiter)) => {
            or_failure(shared, async {
                waiter.await.map_err(|_| Error::Quic("the endpoint closed".into()))
            })
            .await?
        }
        _ => {
            // No route yet (direct-only, lan-only): wait for the first selected path.
            let mut path = shared.path.subscribe();
            or_failure(shared, async {
                path.wait_for(|p| *p != Path::Connecting)
                    .await
                    .map_err(|_| Error::Quic("call ended".into()))?;
                Ok(())
            })
            .await?;
            let config = tls::client_config(&inner.identity, info.fingerprint)?;
            let connecting = inner
                .quic
                .connect_with(config, fake, CERT_NAME)
                .map_err(|e| Error::Quic(e.to_string()))?;
            or_failure(shared, async { connecting.await.map_err(Error::from) }).await?
        }
    };
    if tls::peer_fingerprint(&conn) != Some(info.fingerprint) {
        conn.close(1u32.into(), b"wrong key");
        return Err(Error::WrongPeerKey(info.peer.clone()));
    }
    let (tx, rx) = match role {
        Role::Caller => {
            let (mut tx, rx) = conn.open_bi().await?;
            tx.write_all(format!("{CHAT_HELLO}\n").as_bytes())
                .await
                .map_err(|e| Error::Quic(e.to_string()))?;
            (tx, BufReader::new(rx))
        }
        Role::Callee => {
            let (tx, rx) = or_failure(shared, async { conn.accept_bi().await.map_err(Error::from) }).await?;
            let mut rx = BufReader::new(rx);
            let mut hello = String::new();
            rx.read_line(&mut hello).await.map_err(|e| Error::Quic(e.to_string()))?;
            if hello.trim_end() != CHAT_HELLO {
                return Err(Error::Protocol(format!("unexpected chat stream header {hello:?}")));
            }
            // Keep the reader: it may already hold the first chat lines.
            (tx, rx)
        }
    };
    Ok((conn, tx, rx))
}

/// The candidates the policy allows, and whether LAN is tried first.
fn candidates(inner: &Inner, info: &StartInfo) -> (Vec<Candidate>, bool) {
    let mine = *lock(&inner.public);
    let same_public = matches!((mine, info.candidates.public), (Some(a), Some(b)) if a.ip() == b.ip());
    let lan = info.candidates.lan.iter().map(|a| Candidate::lan(*a));
    let public = info.candidates.public.map(Candidate::server_reflexive);
    match info.policy {
        Policy::LanOnly => (lan.collect(), true),
        Policy::DirectOnly => (public.into_iter().collect(), false),
        Policy::Auto if same_public => (lan.chain(public).collect(), true),
        _ => (public.into_iter().collect(), false),
    }
}

fn new_agent(inner: &Inner, info: &StartInfo) -> Result<Agent, Error> {
    let credentials = Credentials::new(&info.password, inner.name.clone(), info.peer.clone())
        .map_err(|e| Error::Protocol(e.to_string()))?;
    let (remote, try_lan) = candidates(inner, info);
    let mut config = inner.traversal.clone();
    config.rng_seed = inner
        .seed
        .fetch_add(0x9e37_79b9_7f4a_7c15, std::sync::atomic::Ordering::Relaxed);
    let role = if info.controlling {
        natcall_traversal::Role::Controlling
    } else {
        natcall_traversal::Role::Controlled
    };
    debug!(peer = %info.peer, ?remote, try_lan, "starting connectivity checks");
    Ok(Agent::new(config, role, credentials, remote, try_lan, Instant::now()))
}

/// The per-call driver state.
struct Driver {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    info: StartInfo,
    fake: SocketAddr,
    selected: Option<SocketAddr>,
    last_activity: Option<Instant>,
    restart_at: Option<Instant>,
    backoff: Duration,
    lost_retries: u32,
}

async fn drive(inner: Arc<Inner>, shared: Arc<Shared>, mut sig: mpsc::Receiver<CallSignal>, info: StartInfo) {
    let mut stop = shared.stop.subscribe();
    let fake = fake_addr(info.call);
    let mut d = Driver {
        inner,
        shared,
        info,
        fake,
        selected: None,
        last_activity: None,
        restart_at: None,
        backoff: RETRY_FIRST,
        lost_retries: 0,
    };
    tokio::time::sleep(Duration::from_millis(u64::from(d.info.delay_ms))).await;
    let mut agent = match d.info.policy {
        Policy::RelayOnly => None,
        _ => match new_agent(&d.inner, &d.info) {
            Ok(a) => Some(a),
            Err(e) => {
                d.shared.fail(e.to_string());
                return;
            }
        },
    };
    if let Some(a) = agent.as_mut() {
        if !d.inner.udp_ok.load(std::sync::atomic::Ordering::Relaxed) {
            a.handle_udp_unusable(Instant::now());
        }
    }
    loop {
        if let Some(a) = agent.as_mut() {
            d.flush(a).await;
        }
        let now = Instant::now();
        let mut next = now + Duration::from_secs(1);
        if let Some(t) = agent.as_ref().and_then(|a| a.poll_timeout()) {
            next = next.min(t);
        }
        if let Some(t) = d.restart_at {
            next = next.min(t);
        }
        tokio::select! {
            s = sig.recv() => match s {
                Some(CallSignal::Stun(src, pkt)) => {
                    if let Some(a) = agent.as_mut() {
                        a.handle_input(Instant::now(), src, &pkt);
                    }
                }
                Some(CallSignal::Ended(reason)) => {
                    d.shared.ended.send_replace(Some(reason));
                    break;
                }
                None => break,
            },
            _ = tokio::time::sleep_until(next.into()) => {
                if let Some(a) = agent.as_mut() {
                    d.tick(a);
                }
            }
            _ = stop.changed() => break,
        }
    }
}

impl Driver {
    fn tick(&mut self, agent: &mut Agent) {
        let now = Instant::now();
        if let Some(remote) = self.selected {
            if let Some(t) = self.inner.socket.last_rx(remote) {
                if self.last_activity != Some(t) {
                    agent.handle_activity(t, remote);
                    self.last_activity = Some(t);
                }
            }
        }
        agent.handle_timeout(now);
        if self.restart_at.is_some_and(|t| now >= t) {
            self.restart_at = None;
            debug!(peer = %self.info.peer, "retrying a direct path");
            agent.restart(now);
        }
    }

    async fn flush(&mut self, agent: &mut Agent) {
        while let Some(t) = agent.poll_transmit() {
            if let Err(e) = self.inner.socket.send_to(&t.contents, t.destination).await {
                debug!(to = %t.destination, error = %e, "check not sent");
            }
        }
        while let Some(ev) = agent.poll_event() {
            self.handle_event(agent, ev);
        }
    }

    fn handle_event(&mut self, agent: &mut Agent, ev: Event) {
        let socket = &self.inner.socket;
        let relay_ok = relay_allowed(self.info.policy);
        match ev {
            Event::PairValidated { remote, .. } => {
                socket.allow_remote(remote, self.fake);
                if socket.route(self.fake) == Some(Route::Void) {
                    socket.set_route(self.fake, Route::Udp(remote)); // so QUIC can answer at once
                }
            }
            Event::Selected { remote, kind, rtt } => {
                debug!(peer = %self.info.peer, %remote, ?kind, ?rtt, "pair selected");
                socket.allow_remote(remote, self.fake);
                socket.set_route(self.fake, Route::Udp(remote));
                self.selected = Some(remote);
                self.backoff = RETRY_FIRST;
                self.shared.set_path(kind.into(), Some(remote));
            }
            Event::PathLost { remote } => {
                info!(peer = %self.info.peer, %remote, "direct path lost");
                self.selected = None;
                if relay_ok {
                    socket.set_route(self.fake, Route::Relay(self.info.call));
                    self.shared.set_path(Path::Relay, None);
                    self.schedule_retry();
                } else if self.lost_retries == 0 {
                    self.lost_retries += 1;
                    agent.restart(Instant::now());
                } else {
                    self.shared.fail(format!(
                        "the path to {} died and the {} policy forbids the relay",
                        self.info.peer, self.info.policy
                    ));
                }
            }
            Event::UseRelay { reason } => self.use_relay(reason, relay_ok),
            _ => {}
        }
    }

    fn use_relay(&mut self, reason: RelayReason, relay_ok: bool) {
        let why = match reason {
            RelayReason::UdpUnusable => "UDP to the rendezvous server is blocked here".to_owned(),
            RelayReason::NoValidPair { after } => {
                format!(
                    "no {} path to {} answered within {after:?}",
                    self.wanted(),
                    self.info.peer
                )
            }
            _ => "no path answered".to_owned(),
        };
        if relay_ok {
            debug!(peer = %self.info.peer, %why, "staying on the relay");
            if matches!(reason, RelayReason::NoValidPair { .. }) {
                self.schedule_retry();
            }
        } else {
            self.shared
                .fail(format!("{why}, and the {} policy forbids the relay", self.info.policy));
        }
    }

    fn wanted(&self) -> &'static str {
        match self.info.policy {
            Policy::LanOnly => "LAN",
            Policy::DirectOnly => "direct",
            _ => "LAN or direct",
        }
    }

    fn schedule_retry(&mut self) {
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }
}

/// Statistics and history of a call, for reports.
#[derive(Debug, Clone, Serialize)]
pub struct CallReport {
    /// The other peer.
    pub peer: String,
    /// This side's role.
    pub role: Role,
    /// The policy in force.
    pub policy: String,
    /// The server's id of the call.
    pub call_id: u32,
    /// From placing (or receiving) the call to QUIC connected with the chat stream open.
    pub time_to_connected_ms: f64,
    /// The path when the call connected.
    pub path_at_connect: Path,
    /// The path now.
    pub path: Path,
    /// Every path change.
    pub path_changes: Vec<PathChange>,
    /// Smoothed round-trip time.
    pub rtt_ms: f64,
    /// UDP payload bytes QUIC sent / received (over any path).
    pub bytes_sent: u64,
    /// See `bytes_sent`.
    pub bytes_received: u64,
    /// Media statistics per track (updated every 500 ms).
    pub media: MediaReport,
}

impl Call {
    /// The other peer's name.
    pub fn peer(&self) -> &str {
        &self.info.peer
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The current path.
    pub fn path(&self) -> Path {
        *self.shared.path.borrow()
    }

    /// Changes of path as they happen.
    pub fn watch_path(&self) -> watch::Receiver<Path> {
        self.shared.path.subscribe()
    }

    /// Round-trip time as QUIC measures it.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// The call's statistics and path history.
    pub fn report(&self) -> CallReport {
        let stats = self.conn.stats();
        CallReport {
            peer: self.info.peer.clone(),
            role: self.role,
            policy: self.info.policy.to_string(),
            call_id: self.info.call,
            time_to_connected_ms: self.connected_after.as_secs_f64() * 1000.0,
            path_at_connect: self.path_at_connect,
            path: self.path(),
            path_changes: lock(&self.shared.changes).clone(),
            rtt_ms: self.conn.rtt().as_secs_f64() * 1000.0,
            bytes_sent: stats.udp_tx.bytes,
            bytes_received: stats.udp_rx.bytes,
            media: self.media.report(),
        }
    }

    /// Queues a media frame on `track` (sealed, cut into packets of at most 512 bytes, paced,
    /// audio first; under congestion whole video frames are dropped until a key frame).
    pub async fn send_frame(&self, track: Track, frame: Frame) -> Result<(), Error> {
        self.media.send(track, frame).await
    }

    /// Sends a piece of a byte stream that must not lose data (a file, a pipe) as one frame on
    /// `track`, which becomes lossless: the sender never drops its frames (congestion only
    /// slows it) and takes each piece only when it has room, so a fast source is slowed to the
    /// path's pace instead of being cut — this returns once the piece is handed over (up to 64
    /// pieces wait ahead of the sender). The frame is a key frame stamped when the sender takes
    /// it. Loss on the path itself is not repaired (media is not retransmitted), and through the
    /// relay audio older than its deadline may still be dropped by the server.
    pub async fn send_stream(&self, track: Track, data: Vec<u8>) -> Result<(), Error> {
        self.media.send_stream(track, data).await
    }

    /// Waits until every media frame and stream piece queued so far has been sent (or dropped)
    /// — handed to the socket or the relay, not yet received.
    pub async fn flush_media(&self) -> Result<(), Error> {
        self.media.flush().await
    }

    /// Sets the media sender's pacing rate, and the ceiling its congestion control may raise it
    /// back to, in bit/s (default 2 Mbit/s).
    pub async fn set_media_rate(&self, bps: u64) -> Result<(), Error> {
        self.media.set_rate(bps).await
    }

    /// The next complete media frame from the peer (after the jitter buffer), or `None` when the
    /// call's media ended.
    pub async fn recv_frame(&self) -> Option<ReceivedFrame> {
        self.media.recv().await
    }

    /// Media statistics so far.
    pub fn media_report(&self) -> MediaReport {
        self.media.report()
    }

    /// Sends one chat line (no newline inside).
    pub async fn send_chat(&self, line: &str) -> Result<(), Error> {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.len() > MAX_CHAT_LINE || line.contains('\n') {
            return Err(Error::Protocol(format!(
                "a chat line is one line of at most {MAX_CHAT_LINE} bytes"
            )));
        }
        let mut tx = self.chat_tx.lock().await;
        tx.write_all(line.as_bytes())
            .await
            .map_err(|e| Error::Quic(e.to_string()))?;
        tx.write_all(b"\n").await.map_err(|e| Error::Quic(e.to_string()))
    }

    /// The next chat line from the peer; `None` when the peer finished its chat stream.
    pub async fn recv_chat(&self) -> Result<Option<String>, Error> {
        let mut rx = self.chat_rx.lock().await;
        let mut buf = Vec::new();
        let n = (&mut *rx)
            .take(MAX_CHAT_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| Error::Quic(e.to_string()))?;
        if n == 0 {
            return Ok(None);
        }
        if buf.last() != Some(&b'\n') && n > MAX_CHAT_LINE {
            return Err(Error::Protocol(format!(
                "the peer sent a chat line over {MAX_CHAT_LINE} bytes"
            )));
        }
        Ok(Some(
            String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_owned(),
        ))
    }

    /// Ends this side's chat stream and waits until the peer has every line.
    pub async fn finish_chat(&self) -> Result<(), Error> {
        let mut tx = self.chat_tx.lock().await;
        tx.finish().map_err(|e| Error::Quic(e.to_string()))?;
        match tokio::time::timeout(Duration::from_secs(10), tx.stopped()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::Quic(e.to_string())),
            Err(_) => Err(Error::Timeout("the peer did not acknowledge the chat".into())),
        }
    }

    /// Resolves when the call ends for any reason but a local hang-up.
    pub async fn ended(&self) -> EndReason {
        let mut failure = self.shared.failure.subscribe();
        let mut ended = self.shared.ended.subscribe();
        let closed = |e: quinn::ConnectionError| match e {
            quinn::ConnectionError::ApplicationClosed(c) => {
                EndReason::Peer(String::from_utf8_lossy(&c.reason).into_owned())
            }
            quinn::ConnectionError::LocallyClosed => EndReason::Local,
            quinn::ConnectionError::TimedOut => {
                EndReason::Lost(format!("nothing heard from {} for 15 s", self.info.peer))
            }
            other => EndReason::Lost(other.to_string()),
        };
        let server_reason = tokio::select! {
            e = self.conn.closed() => return closed(e),
            f = failure.wait_for(|f| f.is_some()) => {
                return EndReason::Failed(f.ok().and_then(|f| f.clone()).unwrap_or_default());
            }
            e = ended.wait_for(|e| e.is_some()) => e.ok().and_then(|e| e.clone()).unwrap_or_default(),
        };
        // The peer's own close usually follows on the call's path: prefer its words.
        match tokio::time::timeout(Duration::from_millis(300), self.conn.closed()).await {
            Ok(e) => closed(e),
            Err(_) => EndReason::Server(server_reason),
        }
    }

    /// Hangs up: tells the server and the peer, and releases the call's resources.
    ///
    /// The server hears of it just after the QUIC close has left (at most 50 ms
    /// later): on the relay, a hang-up that overtook the close would end the call at the server
    /// first, the server would drop the close, and the peer would wait for it in vain.
    pub fn hangup(&self, reason: &str) {
        self.conn.close(0u32.into(), reason.as_bytes());
        let hangup = ClientMsg::Hangup {
            call: self.info.call,
            reason: reason.to_owned(),
        };
        if let Ok(frame) = crate::control::control_frame(&hangup) {
            self.inner.socket.hold(fake_addr(self.info.call), frame, HANGUP_HOLD);
        }
        cleanup(&self.inner, &self.shared, &self.info, Some(self.conn.clone()));
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        cleanup(&self.inner, &self.shared, &self.info, Some(self.conn.clone()));
    }
}
