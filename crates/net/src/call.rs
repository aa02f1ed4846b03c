//! [`Call`]: one connected call — its QUIC connection to the peer (pinned to the key the server
//! vouched for), the chat stream, the media session — over whatever path the peer core routes
//! its fake address to.
//!
//! Setup ([`establish`]), after the core has the call:
//! 1. wait for the server's `Start` (the core routes the fake address: the relay at once under
//!    `auto` and `relay-only`, nowhere yet under `direct-only` and `lan-only`, and starts the
//!    checks after the start delay);
//! 2. the caller opens QUIC (pinned to the callee's key) once a route exists; the callee takes
//!    the connection the acceptor parked in its call; the caller opens the chat stream;
//! 3. the resume proof is derived from the QUIC session, and the media session starts.
//!
//! With contacts ([`crate::contacts`]), the caller checks the callee's key as soon as `Start`
//! vouches for it (before step 2), and both sides record it once QUIC proved it (after step 2).
//!
//! A call whose setup fails is released in the core, which tells the server (hang-up), so the
//! server never counts a call nobody has.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use natcall_proto::control::{CallStart, RESUME_PROOF_LABEL};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tracing::info;

use crate::Error;
use crate::contacts;
use crate::core::{self, CallEnd, CallId, CallView, FakeAddr, Phase};
pub use crate::core::{Path, PathChange, Role};
use crate::driver::Shared;
use crate::endpoint::Inner;
use crate::identity::CERT_NAME;
use crate::media::{Media, MediaNotice, MediaRate, MediaReport};
use crate::tls;
use natcall_media::{Frame, ReceivedFrame, Track};

/// Header line of the chat stream.
const CHAT_HELLO: &str = "natcall-chat/1";
/// Longest chat line accepted.
pub const MAX_CHAT_LINE: usize = 4096;
/// How long setup may take beyond the traversal budget (QUIC's handshake, the chat stream).
const SETUP_SLACK: Duration = Duration::from_secs(15);

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

/// The error a call that ended before it connected gives.
fn setup_error(end: &CallEnd, peer: &str) -> Error {
    match end {
        CallEnd::Refused(f) => core::refusal(*f, peer),
        CallEnd::Ended(r) | CallEnd::NotResumed(r) => Error::Ended(r.clone()),
        CallEnd::NoAnswer => Error::Timeout(format!("{peer} did not answer")),
        CallEnd::ServerLost(r) => Error::ServerLost(r.clone()),
        CallEnd::WrongKey => Error::WrongPeerKey(peer.to_owned()),
        CallEnd::NoPath(w) => Error::NoPath(w.clone()),
        CallEnd::Busy => Error::Busy(peer.to_owned()),
        CallEnd::Replaced(r) => Error::Replaced(r.clone()),
    }
}

/// Releases a call in the core when dropped (setup failed, or the [`Call`] is gone).
#[derive(Debug)]
struct Release {
    shared: Arc<Shared>,
    id: CallId,
    reason: &'static str,
}

impl Drop for Release {
    fn drop(&mut self) {
        let (id, reason) = (self.id, self.reason);
        self.shared.with(|core, now| core.release(now, id, reason));
    }
}

/// Reads call `id`'s view with `f`; `Err` if the core no longer has it.
fn read<T>(shared: &Shared, id: CallId, f: impl FnOnce(&CallView) -> T) -> Result<T, Error> {
    shared
        .lock()
        .call(id)
        .map(f)
        .ok_or_else(|| Error::Ended("the call is gone".into()))
}

/// Waits until call `id` ended (any reason the core knows).
async fn ended_in_core(shared: &Shared, id: CallId) -> CallEnd {
    shared
        .wait(|core| match core.call(id) {
            None => Some(CallEnd::Ended("the call is gone".into())),
            Some(v) => v.end.clone(),
        })
        .await
}

/// Runs `fut` unless call `id` ends first.
async fn or_end<T>(
    shared: &Shared,
    id: CallId,
    peer: &str,
    fut: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::select! {
        r = fut => r,
        e = ended_in_core(shared, id) => Err(setup_error(&e, peer)),
    }
}

type Connected = (quinn::Connection, quinn::SendStream, BufReader<quinn::RecvStream>);

/// Sets up call `id` (placed or accepted in the core); returns when QUIC is connected and the
/// chat stream open.
pub(crate) async fn establish(inner: Arc<Inner>, id: CallId, role: Role) -> Result<Call, Error> {
    let shared = inner.shared.clone();
    let mut release = Release {
        shared: shared.clone(),
        id,
        reason: "call setup failed",
    };
    let peer = read(&shared, id, |v| v.peer.clone())?;
    let start = shared
        .wait(|core| match core.call(id) {
            None => Some(Err(Error::Ended("the call is gone".into()))),
            Some(v) => match (&v.end, &v.start) {
                (Some(end), _) => Some(Err(setup_error(end, &v.peer))),
                (None, Some(s)) if v.phase == Phase::Running => Some(Ok(s.clone())),
                _ => None,
            },
        })
        .await?;
    if role == Role::Caller {
        // The callee's key was checked when this side accepted.
        if let Err(e) = contacts::screen(inner.contacts.as_ref(), &peer, start.fingerprint).await {
            release.reason = "the callee's key was refused";
            return Err(e);
        }
    }
    // Media may arrive as soon as the peer is connected: take it from now on.
    let (media_tx, media_rx) = tokio::sync::mpsc::channel(1024);
    if let Some(link) = shared.lock().link_mut(id) {
        link.media = Some(media_tx);
    }
    let budget = inner.traversal_budget + SETUP_SLACK;
    let (conn, chat_tx, chat_rx) = tokio::time::timeout(budget, connect(&inner, id, &peer, &start, role))
        .await
        .map_err(|_| Error::Timeout(format!("the call to {peer} did not connect")))??;
    if let Err(e) = contacts::remember(inner.contacts.as_ref(), &peer, start.fingerprint).await {
        conn.close(1u32.into(), b"key refused");
        return Err(e);
    }
    let mut proof = [0u8; 32];
    conn.export_keying_material(&mut proof, RESUME_PROOF_LABEL, &start.call.to_be_bytes())
        .map_err(|_| Error::Quic("cannot export the resume proof from the QUIC session".into()))?;
    let fake = FakeAddr::of(id);
    shared.with(|core, _| core.set_proof(id, proof));
    let media = Media::start(&conn, role == Role::Caller, start.call, shared.clone(), fake, media_rx)?;
    let (connected_after, path_at_connect) = read(&shared, id, |v| (v.t0.elapsed(), v.path))?;
    info!(%peer, path = %path_at_connect, ?connected_after, "call connected");
    release.reason = "hung up";
    Ok(Call {
        release,
        start,
        role,
        conn,
        chat_tx: tokio::sync::Mutex::new(chat_tx),
        chat_rx: tokio::sync::Mutex::new(chat_rx),
        connected_after,
        path_at_connect,
        media,
    })
}

async fn connect(inner: &Inner, id: CallId, peer: &str, start: &CallStart, role: Role) -> Result<Connected, Error> {
    let shared = &inner.shared;
    let conn = match role {
        Role::Callee => {
            or_end(shared, id, peer, async {
                Ok(shared
                    .wait(|core| core.link_mut(id).and_then(|l| l.accepted.take()))
                    .await)
            })
            .await?
        }
        Role::Caller => {
            // No route yet (direct-only, lan-only): wait for the first selected path.
            or_end(shared, id, peer, async {
                shared
                    .wait(|core| core.call(id).filter(|v| v.path != Path::Connecting).map(|_| ()))
                    .await;
                Ok(())
            })
            .await?;
            let config = tls::client_config(&inner.identity, start.fingerprint)?;
            let connecting = inner
                .quic
                .connect_with(config, FakeAddr::of(id).socket(), CERT_NAME)
                .map_err(|e| Error::Quic(e.to_string()))?;
            or_end(shared, id, peer, async { connecting.await.map_err(Error::from) }).await?
        }
    };
    if tls::peer_fingerprint(&conn) != Some(start.fingerprint) {
        conn.close(1u32.into(), b"wrong key");
        return Err(Error::WrongPeerKey(peer.to_owned()));
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
            let (tx, rx) = or_end(shared, id, peer, async { conn.accept_bi().await.map_err(Error::from) }).await?;
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

/// A connected call.
#[derive(Debug)]
pub struct Call {
    release: Release,
    start: CallStart,
    role: Role,
    conn: quinn::Connection,
    chat_tx: tokio::sync::Mutex<quinn::SendStream>,
    chat_rx: tokio::sync::Mutex<BufReader<quinn::RecvStream>>,
    connected_after: Duration,
    path_at_connect: Path,
    media: Media,
}

/// Changes of a call's path as they happen ([`Call::watch_path`]).
#[derive(Debug)]
pub struct PathWatch {
    shared: Arc<Shared>,
    id: CallId,
    seen: usize,
}

impl PathWatch {
    /// The next path change (the path it changed to); `None` once the call is gone.
    pub async fn changed(&mut self) -> Option<Path> {
        let (id, seen) = (self.id, self.seen);
        let next = self
            .shared
            .wait(|core| match core.call(id) {
                None => Some(None),
                Some(v) => v.changes.get(seen).map(|c| Some(c.to)),
            })
            .await;
        self.seen += 1;
        next
    }

    /// Waits until the path satisfies `f` (now or after a change); `None` if the call is gone.
    pub async fn wait_for(&mut self, f: impl Fn(&Path) -> bool) -> Option<Path> {
        let id = self.id;
        let path = self
            .shared
            .wait(|core| match core.call(id) {
                None => Some(None),
                Some(v) => f(&v.path).then_some(Some(v.path)),
            })
            .await;
        self.seen = read(&self.shared, id, |v| v.changes.len()).unwrap_or(self.seen);
        path
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
    /// How the direct path was looked for: NAT mappings, candidates, birthday traversal, and
    /// which candidate won.
    pub traversal: crate::core::TraversalReport,
    /// QUIC's own view of the path: its congestion window and the losses it saw.
    pub quic: QuicReport,
}

/// QUIC's congestion state for the call (chat, files and media datagrams all pass its window).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QuicReport {
    /// The congestion window now, bytes.
    pub cwnd: u64,
    /// Times the congestion controller cut its window.
    pub congestion_events: u64,
    /// Packets QUIC sent, and those it declared lost.
    pub packets_sent: u64,
    /// See `packets_sent`.
    pub packets_lost: u64,
}

impl Call {
    fn id(&self) -> CallId {
        self.release.id
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.release.shared
    }

    /// The other peer's name.
    pub(crate) fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The peer's name.
    pub fn peer(&self) -> &str {
        &self.start.peer
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The current path.
    pub fn path(&self) -> Path {
        read(self.shared(), self.id(), |v| v.path).unwrap_or(Path::Connecting)
    }

    /// Changes of path as they happen, from now on.
    pub fn watch_path(&self) -> PathWatch {
        PathWatch {
            shared: self.shared().clone(),
            id: self.id(),
            seen: read(self.shared(), self.id(), |v| v.changes.len()).unwrap_or(0),
        }
    }

    /// The peer's address on the current path (`None` on the relay).
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        read(self.shared(), self.id(), |v| v.changes.last().and_then(|c| c.remote))
            .ok()
            .flatten()
    }

    /// Whether the server that this endpoint is registered with knows the call now (`false`
    /// while the server is down, or until the call is resumed on a new one).
    pub fn server_knows(&self) -> bool {
        self.shared().lock().server_knows(self.id())
    }

    /// Round-trip time as QUIC measures it.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// The call's statistics and path history.
    pub fn report(&self) -> CallReport {
        let stats = self.conn.stats();
        let (path, path_changes, traversal) = read(self.shared(), self.id(), |v| {
            (v.path, v.changes.clone(), v.traversal.clone())
        })
        .unwrap_or((Path::Connecting, Vec::new(), Default::default()));
        CallReport {
            peer: self.start.peer.clone(),
            role: self.role,
            policy: self.start.policy.to_string(),
            call_id: self.start.call,
            time_to_connected_ms: self.connected_after.as_secs_f64() * 1000.0,
            path_at_connect: self.path_at_connect,
            path,
            path_changes,
            rtt_ms: self.conn.rtt().as_secs_f64() * 1000.0,
            bytes_sent: stats.udp_tx.bytes,
            bytes_received: stats.udp_rx.bytes,
            media: self.media.report(),
            traversal,
            quic: QuicReport {
                cwnd: stats.path.cwnd,
                congestion_events: stats.path.congestion_events,
                packets_sent: stats.path.sent_packets,
                packets_lost: stats.path.lost_packets,
            },
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

    /// Tells the peer whether this side sends finite media inputs (files, pipes) that will end
    /// (`finite`), or none (a live source, the test source, nothing), on a unidirectional
    /// stream of the call; [`InputsSignal::ended`] later says they ended. With
    /// [`Call::peer_inputs_done`] on the other side, a call with inputs on both sides ends when
    /// both have ended, not when the first does. For 1:1 calls (a room's sessions carry keys on
    /// their unidirectional streams).
    pub async fn announce_inputs(&self, finite: bool) -> Result<InputsSignal, Error> {
        let mut tx = self.conn.open_uni().await.map_err(|e| Error::Quic(e.to_string()))?;
        let first = if finite { INPUTS_RUNNING } else { INPUTS_NONE };
        tx.write_all(&[first]).await.map_err(|e| Error::Quic(e.to_string()))?;
        if !finite {
            let _ = tx.finish();
        }
        Ok(InputsSignal { tx })
    }

    /// Resolves once the peer has nothing more to send that this side should wait for: it
    /// announced no finite inputs, or said its inputs ended, or its signal stream ended.
    pub async fn peer_inputs_done(&self) -> Result<(), Error> {
        let mut rx = self.conn.accept_uni().await.map_err(|e| Error::Quic(e.to_string()))?;
        let mut byte = [0u8; 1];
        loop {
            match rx.read(&mut byte).await {
                Ok(Some(1)) if byte[0] == INPUTS_RUNNING => continue,
                Ok(Some(1)) => return Ok(()),
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Error::Quic(e.to_string())),
            }
        }
    }

    /// Waits until every media frame and stream piece queued so far has been sent (or dropped)
    /// — handed to the socket or the relay, not yet received.
    pub async fn flush_media(&self) -> Result<(), Error> {
        self.media.flush().await
    }

    /// Sets the media rate and the ceiling the rate controller may raise it to, in bit/s
    /// (default 2 Mbit/s; the controller starts at 300 kbit/s and adapts from there).
    pub async fn set_media_rate(&self, bps: u64) -> Result<(), Error> {
        self.media.set_rate(bps).await
    }

    /// The media rate the sender's controller sets, as it changes: the target for everything
    /// this side sends, and what video may use of it. A source follows it (an encoder sizes its
    /// frames to `video_bps`).
    pub fn watch_rate(&self) -> tokio::sync::watch::Receiver<MediaRate> {
        self.media.watch_rate()
    }

    /// The next thing the media session has to tell the application (once each): e.g. a
    /// stream faster than the path. `None` when the call's media ended.
    pub async fn media_notice(&self) -> Option<MediaNotice> {
        self.media.notice().await
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
        let closed = |e: quinn::ConnectionError| match e {
            quinn::ConnectionError::ApplicationClosed(c) => {
                EndReason::Peer(String::from_utf8_lossy(&c.reason).into_owned())
            }
            quinn::ConnectionError::LocallyClosed => EndReason::Local,
            quinn::ConnectionError::TimedOut => {
                EndReason::Lost(format!("nothing heard from {} for 15 s", self.start.peer))
            }
            other => EndReason::Lost(other.to_string()),
        };
        let server_reason = tokio::select! {
            // The core first: when this session was replaced, the core ended the call before the
            // endpoint closed its QUIC connections, and the reason is the core's.
            biased;
            e = ended_in_core(self.shared(), self.id()) => match e {
                CallEnd::NoPath(why) => return EndReason::Failed(why),
                CallEnd::NotResumed(why) => return EndReason::Lost(why),
                CallEnd::Ended(reason) => reason,
                other => return EndReason::Lost(setup_error(&other, &self.start.peer).to_string()),
            },
            e = self.conn.closed() => return closed(e),
        };
        // The peer's own close usually follows on the call's path: prefer its words.
        match tokio::time::timeout(Duration::from_millis(300), self.conn.closed()).await {
            Ok(e) => closed(e),
            Err(_) => EndReason::Server(server_reason),
        }
    }

    /// Hangs up: closes the QUIC connection (the peer hears `reason`) and releases the call.
    ///
    /// The server hears of it just after the QUIC close has left (at most 50 ms later): on the
    /// relay, a hang-up that overtook the close would end the call at the server first, the
    /// server would drop the close, and the peer would wait for it in vain.
    pub fn hangup(&self, reason: &str) {
        self.conn.close(0u32.into(), reason.as_bytes());
        let id = self.id();
        self.shared().with(|core, now| core.release(now, id, reason));
    }
}

/// The peer has media inputs that will end (see [`Call::announce_inputs`]).
const INPUTS_RUNNING: u8 = b'I';
/// The peer has no inputs that end.
const INPUTS_NONE: u8 = b'N';
/// The peer's inputs ended.
const INPUTS_ENDED: u8 = b'E';

/// This side's inputs signal to the peer ([`Call::announce_inputs`]).
#[derive(Debug)]
pub struct InputsSignal {
    tx: quinn::SendStream,
}

impl InputsSignal {
    /// Tells the peer this side's inputs ended (everything was sent).
    pub async fn ended(mut self) -> Result<(), Error> {
        self.tx
            .write_all(&[INPUTS_ENDED])
            .await
            .map_err(|e| Error::Quic(e.to_string()))?;
        self.tx.finish().map_err(|e| Error::Quic(e.to_string()))
    }
}
