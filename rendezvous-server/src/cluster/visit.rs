//! Visits: this node speaking for one of its peers on another node of the cluster.
//!
//! When a peer calls (or resumes a call with) a peer homed on another node, its node opens a
//! TLS connection to that node — pinned to the key the node recorded in Redis — and registers
//! there *for* the peer with [`ClientMsg::Visit`] (proven with the cluster's secret, bound to
//! the TLS session). To the other node the link is one more registered peer: the call rings,
//! starts and relays there exactly as between two of its own peers. This node passes the
//! frames of that call both ways, untouched:
//! - from the peer: its messages and relay frames for a call id the link carries go to the link
//!   ([`Visits::route`]);
//! - to the peer: everything the other node sends the link goes into the peer's own outbox
//!   (control frames as they are, relay frames through the relay engine's class policy), but
//!   pings (answered here), relay health checks (acknowledged here, as frames are handed on)
//!   and the link's own registration.
//!
//! One link per (peer connection, node), opened on first need and closed with the peer's
//! connection. A link that ends while the peer is still here tells the peer its calls on it are
//! suspended (`CallSuspended`), so the peer resumes them as after any lost connection.
//!
//! The relay path across nodes is caller → its node → the callee's node → callee: one more
//! server hop than a call within a node (see `docs/deploy.md` for its measured cost).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use natcall_proto::PROTOCOL_VERSION;
use natcall_proto::codec::decode_control;
use natcall_proto::control::{Candidates, ClientMsg, ServerMsg};
use natcall_proto::frame::{self, Frame, FrameDecoder, FrameKind, control_frame};
use natcall_proto::server_key::ServerKey;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Cluster, NodeInfo};
use crate::outbox::Outbox;
use crate::registry::{PeerInfo, RegisterError};

/// Frames waiting for a link's writer at most; past it, frames are dropped (relay) or the link
/// is given up (control: the other node does not keep up).
const LINK_QUEUE: usize = 4096;
/// The most bytes one write of a link takes.
const BATCH: usize = 64 * 1024;
/// The largest frame a link accepts from the other node.
const MAX_FRAME: u32 = 64 * 1024;

type LinkStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Accepts exactly the TLS key a node recorded in Redis.
#[derive(Debug)]
struct PinnedKey {
    key: ServerKey,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let key = ServerKey::of_cert(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if key == self.key {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the node presented key {key}, but it recorded {} in the cluster",
                self.key
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// One peer's link to another node.
#[derive(Debug)]
pub struct Link {
    conn_id: u64,
    node: String,
    tx: mpsc::Sender<Bytes>,
    /// Tells the writer to close the link.
    stop: Arc<tokio::sync::Notify>,
    /// Requests passed on and not answered yet (`Call`, `Resume`, `RoomJoin`): a link with
    /// none, no call and no room is closed.
    pending: std::sync::atomic::AtomicUsize,
    /// The call ids (the other node's) this link carries.
    calls: Mutex<HashSet<u32>>,
}

impl Link {
    /// Queues `frame` for the other node; `false` if the link is gone or full.
    pub fn send(&self, frame: Bytes) -> bool {
        self.tx.try_send(frame).is_ok()
    }

    /// One request passed on (`Call`, `Resume`, `RoomJoin`; counted by [`Visits::link`]) was
    /// answered, or not sent after all.
    pub fn answered(&self) {
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

/// The links of this node's peers.
#[derive(Debug)]
pub struct Visits {
    cluster: Arc<Cluster>,
    /// A link silent this long is given up (the other node pings every visit).
    idle: std::time::Duration,
    links: Mutex<HashMap<(u64, String), Arc<Link>>>,
    /// (peer connection, call or room id on the other node) → the link that carries it.
    calls: Mutex<HashMap<(u64, u32), Arc<Link>>>,
    /// (peer connection, room name) → the link to the node the room is on.
    rooms: Mutex<HashMap<(u64, String), Arc<Link>>>,
    /// Frames passed between nodes (both ways), for the metrics.
    forwarded: AtomicU64,
    metrics: crate::metrics::Metrics,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Visits {
    /// No links yet.
    pub fn new(cluster: Arc<Cluster>, idle: std::time::Duration, metrics: crate::metrics::Metrics) -> Arc<Self> {
        Arc::new(Self {
            cluster,
            idle,
            links: Mutex::default(),
            calls: Mutex::default(),
            rooms: Mutex::default(),
            forwarded: AtomicU64::new(0),
            metrics,
        })
    }

    /// The cluster.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The link that carries call `call` of connection `conn_id`, if another node has it.
    pub fn route(&self, conn_id: u64, call: u32) -> Option<Arc<Link>> {
        lock(&self.calls).get(&(conn_id, call)).cloned()
    }

    /// Passes `frame` of connection `conn_id` for call `call` to the node that has the call;
    /// `false` when no other node has it.
    pub fn forward(&self, conn_id: u64, call: u32, frame: Bytes) -> bool {
        let Some(link) = self.route(conn_id, call) else {
            return false;
        };
        if link.send(frame) {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Call `call` of connection `conn_id` is on `link` from now on (a resume sent there: its
    /// withdrawal goes the same way).
    pub fn track(&self, link: &Arc<Link>, call: u32) {
        lock(&self.calls).insert((link.conn_id, call), link.clone());
        lock(&link.calls).insert(call);
    }

    /// Room `room` of connection `conn_id` is on `link`'s node (a join sent there).
    pub fn track_room(&self, link: &Arc<Link>, room: &str) {
        lock(&self.rooms).insert((link.conn_id, room.to_owned()), link.clone());
    }

    /// The link to the node of room `room` of connection `conn_id`, forgotten (it leaves).
    pub fn untrack_room(&self, conn_id: u64, room: &str) -> Option<Arc<Link>> {
        lock(&self.rooms).remove(&(conn_id, room.to_owned()))
    }

    /// Frames passed between nodes so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Open links.
    pub fn len(&self) -> usize {
        lock(&self.links).len()
    }

    /// Whether no link is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The link of peer `name` (connection `conn_id`, outbox `outbox`, as `info` says) to the
    /// node `node_id`: the open one, or a new one once the node accepted the visit. One request
    /// is counted on it (it stays open until that is answered: [`Link::answered`]).
    pub async fn link(
        self: &Arc<Self>,
        node_id: &str,
        name: &str,
        conn_id: u64,
        info: &PeerInfo,
        outbox: Arc<Outbox>,
    ) -> Result<Arc<Link>, RegisterError> {
        let key = (conn_id, node_id.to_owned());
        if let Some(l) = lock(&self.links).get(&key).filter(|l| !l.tx.is_closed()) {
            l.pending.fetch_add(1, Ordering::Relaxed);
            return Ok(l.clone());
        }
        let node = self
            .cluster
            .node_info(node_id)
            .await?
            .ok_or_else(|| RegisterError::Unavailable(format!("node {node_id} is not live")))?;
        let deadline = self.cluster.timeout();
        let (stream, buf, ack_every) = tokio::time::timeout(deadline, self.open(&node, node_id, name, info))
            .await
            .map_err(|_| {
                RegisterError::Unavailable(format!("node {node_id} did not accept the visit within {deadline:?}"))
            })??;
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let link = Arc::new(Link {
            conn_id,
            node: node_id.to_owned(),
            tx,
            stop: Arc::new(tokio::sync::Notify::new()),
            pending: std::sync::atomic::AtomicUsize::new(1),
            calls: Mutex::default(),
        });
        {
            let mut links = lock(&self.links);
            if let Some(l) = links.get(&key).filter(|l| !l.tx.is_closed()) {
                // Another request of this peer opened one meanwhile: use it, drop ours.
                l.pending.fetch_add(1, Ordering::Relaxed);
                return Ok(l.clone());
            }
            links.insert(key, link.clone());
            self.metrics.set_visit_links(links.len());
        }
        info!(peer = name, node = node_id, addr = %node.advertise, "visit link open");
        let (rd, wr) = tokio::io::split(stream);
        tokio::spawn(write_link(wr, rx, link.stop.clone()));
        tokio::spawn(self.clone().read_link(link.clone(), rd, buf, outbox, ack_every));
        Ok(link)
    }

    /// Connects to `node`, and registers there for `name`. Returns the stream, what was read
    /// past the registration, and the node's relay health-check interval.
    async fn open(
        &self,
        node: &NodeInfo,
        node_id: &str,
        name: &str,
        info: &PeerInfo,
    ) -> Result<(LinkStream, BytesMut, u32), RegisterError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            RegisterError::Unavailable(format!("node {node_id} at {}: {what}: {e}", node.advertise))
        };
        let tcp = TcpStream::connect(node.advertise)
            .await
            .map_err(|e| fail("cannot connect", &e))?;
        tcp.set_nodelay(true).map_err(|e| fail("socket", &e))?;
        // A link relays calls' frames, a thin stream like a client's (see `sockopt`); set as
        // clients set it, whatever `relay.thin_linear_timeouts` (which is the accepting side's),
        // and without it the link works with the default backoff.
        #[cfg(target_os = "linux")]
        let _ = socket2::SockRef::from(&tcp).set_tcp_thin_linear_timeouts(true);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| fail("TLS", &e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedKey {
                key: node.key,
                provider,
            }))
            .with_no_client_auth();
        let server_name = ServerName::try_from(crate::tls::SELF_SIGNED_NAME).map_err(|e| fail("TLS", &e))?;
        let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|e| fail("TLS handshake", &e))?;
        let mut binding = [0u8; 32];
        stream
            .get_ref()
            .1
            .export_keying_material(&mut binding, natcall_proto::REGISTER_BINDING_LABEL, None)
            .map_err(|e| fail("TLS exporter", &e))?;
        let mut out = BytesMut::new();
        frame::encode_hello(PROTOCOL_VERSION, &mut out);
        stream.write_all(&out).await.map_err(|e| fail("write", &e))?;
        let mut buf = BytesMut::new();
        let decoder = FrameDecoder::new(MAX_FRAME);
        let mut welcomed = false;
        loop {
            while let Some(raw) = decoder.decode(&mut buf).map_err(|e| fail("protocol", &e))? {
                match raw.parse().map_err(|e| fail("protocol", &e))? {
                    Frame::Hello(h) => h.check(PROTOCOL_VERSION).map_err(|e| fail("version", &e))?,
                    Frame::Error(e) => return Err(fail("refused the visit", &e.message)),
                    Frame::Control(body) => {
                        match decode_control::<ServerMsg>(body).map_err(|e| fail("protocol", &e))? {
                            ServerMsg::Welcome { .. } if !welcomed => {
                                welcomed = true;
                                let visit = ClientMsg::Visit {
                                    node: self.cluster.node().to_owned(),
                                    name: name.to_owned(),
                                    fingerprint: info.fingerprint,
                                    candidates: Candidates {
                                        public: info.public_udp,
                                        lan: info.lan_addrs.clone(),
                                        mapping: info.mapping,
                                        port_mapped: info.port_mapped,
                                    },
                                    rtt_us: info.rtt.map(|r| r.as_micros() as u64),
                                    proof: self.cluster.visit_proof(
                                        self.cluster.node(),
                                        node_id,
                                        name,
                                        &info.fingerprint,
                                        &binding,
                                    ),
                                };
                                let f = control_frame(&visit).map_err(|e| fail("encode", &e))?;
                                stream.write_all(&f).await.map_err(|e| fail("write", &e))?;
                            }
                            ServerMsg::Registered { relay_ack_every, .. } => return Ok((stream, buf, relay_ack_every)),
                            other => debug!(?other, "message before the visit was accepted; ignored"),
                        }
                    }
                    Frame::Relay { .. } => return Err(fail("protocol", &"relay frame before registration")),
                }
            }
            if stream.read_buf(&mut buf).await.map_err(|e| fail("read", &e))? == 0 {
                return Err(fail("closed", &"the node closed the link during the visit"));
            }
        }
    }

    /// Hands what the other node sends on `link` to the peer's `outbox`, until the link ends;
    /// then tells the peer its calls on it are suspended.
    async fn read_link(
        self: Arc<Self>,
        link: Arc<Link>,
        mut rd: tokio::io::ReadHalf<LinkStream>,
        mut buf: BytesMut,
        outbox: Arc<Outbox>,
        ack_every: u32,
    ) {
        let decoder = FrameDecoder::new(MAX_FRAME);
        // Relay frames arriving here are another node's: one sender id for all of them.
        let from = u64::MAX - link.conn_id;
        let mut unacked = 0u32;
        let why = loop {
            let mut end = None;
            loop {
                let raw = match decoder.decode(&mut buf) {
                    Ok(Some(raw)) => raw,
                    Ok(None) => break,
                    Err(e) => {
                        end = Some(format!("protocol error: {e}"));
                        break;
                    }
                };
                if raw.kind_byte() == FrameKind::Relay as u8 {
                    if let Ok(Frame::Relay { header, .. }) = raw.parse() {
                        self.forwarded.fetch_add(1, Ordering::Relaxed);
                        let _ = outbox.push_relay(from, raw.into_wire(), &header, std::time::Instant::now());
                        unacked += 1;
                    }
                    continue;
                }
                let wire = raw.wire().clone();
                match raw.parse() {
                    Ok(Frame::Control(body)) => match decode_control::<ServerMsg>(body) {
                        Ok(msg) => {
                            if let Some(e) = self.on_control(&link, &outbox, msg, wire) {
                                end = Some(e);
                                break;
                            }
                        }
                        Err(e) => {
                            end = Some(format!("protocol error: {e}"));
                            break;
                        }
                    },
                    Ok(Frame::Error(e)) => {
                        end = Some(format!("the node closed the link: {}", e.message));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        end = Some(format!("protocol error: {e}"));
                        break;
                    }
                }
            }
            if unacked >= ack_every.max(1) || (unacked > 0 && end.is_none()) {
                // Handed on to the peer's own outbox, whose class policy bounds it from here.
                let ack = control_frame(&ClientMsg::RelayAck { frames: unacked }).unwrap_or_default();
                let _ = link.send(ack);
                unacked = 0;
            }
            if let Some(e) = end {
                break e;
            }
            match tokio::time::timeout(self.idle, rd.read_buf(&mut buf)).await {
                Ok(Ok(0)) => break "the node closed the link".to_owned(),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => break format!("read failed: {e}"),
                Err(_) => break format!("the node was silent for {:?}", self.idle),
            }
        };
        self.close_link(&link, &outbox, &why);
    }

    /// One control message from the other node: answered here, or handed to the peer.
    /// Returns why the link ends, if it does.
    fn on_control(&self, link: &Arc<Link>, outbox: &Outbox, msg: ServerMsg, wire: Bytes) -> Option<String> {
        let track = |id: u32, on: bool| {
            let mut calls = lock(&self.calls);
            let mut mine = lock(&link.calls);
            if on {
                calls.insert((link.conn_id, id), link.clone());
                mine.insert(id);
            } else {
                calls.remove(&(link.conn_id, id));
                mine.remove(&id);
            }
        };
        match &msg {
            ServerMsg::Ping { nonce, .. } => {
                let pong = control_frame(&ClientMsg::Pong { nonce: *nonce }).unwrap_or_default();
                link.send(pong);
                return None;
            }
            ServerMsg::Registered { .. } | ServerMsg::Welcome { .. } => return None,
            ServerMsg::GoingAway { reason, .. } => return Some(format!("the node is going away: {reason}")),
            ServerMsg::Replaced { .. } => return Some("the peer registered with that node itself".into()),
            ServerMsg::MoveTo { .. } => return None,
            ServerMsg::Ringing { call, .. } => {
                link.answered();
                track(*call, true);
            }
            ServerMsg::Incoming { call, .. } => track(*call, true),
            ServerMsg::Start(start) | ServerMsg::RoomPeer { start, .. } => track(start.call, true),
            ServerMsg::RoomJoined { id, .. } => {
                link.answered();
                track(*id, true);
            }
            ServerMsg::RoomRefused { room, .. } => {
                link.answered();
                lock(&self.rooms).remove(&(link.conn_id, room.clone()));
            }
            ServerMsg::CallFailed { .. } => link.answered(),
            ServerMsg::Resumed { call, id } => {
                link.answered();
                track(*call, false);
                track(*id, true);
            }
            ServerMsg::ResumeFailed { call, .. } => {
                link.answered();
                track(*call, false);
            }
            ServerMsg::CallEnded { call, .. }
            | ServerMsg::CallDeclined { call, .. }
            | ServerMsg::CallSuspended { call } => track(*call, false),
            _ => {}
        }
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        if !outbox.push_server(wire) {
            return Some("the peer does not read its messages".into());
        }
        self.close_if_idle(link);
        None
    }

    /// Call `call` of connection `conn_id` ended on this side (its peer hung up or declined):
    /// forgotten; the link closes if nothing else is on it.
    pub fn untrack(&self, conn_id: u64, call: u32) {
        let link = lock(&self.calls).remove(&(conn_id, call));
        if let Some(link) = link {
            lock(&link.calls).remove(&call);
            self.close_if_idle(&link);
        }
    }

    /// Closes `link` when it carries no call, no room and no request waiting for its answer:
    /// visits last as long as they are used.
    fn close_if_idle(&self, link: &Arc<Link>) {
        // Under the links' lock: `link` hands out no link meanwhile.
        let mut links = lock(&self.links);
        if link.pending.load(Ordering::Relaxed) > 0 || !lock(&link.calls).is_empty() {
            return;
        }
        if lock(&self.rooms).values().any(|l| Arc::ptr_eq(l, link)) {
            return;
        }
        let key = (link.conn_id, link.node.clone());
        if links.get(&key).is_some_and(|l| Arc::ptr_eq(l, link)) {
            links.remove(&key);
            self.metrics.set_visit_links(links.len());
        }
        drop(links);
        debug!(node = %link.node, conn = link.conn_id, "visit link idle: closed");
        link.stop.notify_one();
    }

    /// Forgets `link`; its calls are suspended for the peer (who resumes them).
    fn close_link(&self, link: &Arc<Link>, outbox: &Outbox, why: &str) {
        {
            let mut links = lock(&self.links);
            let key = (link.conn_id, link.node.clone());
            if links.get(&key).is_some_and(|l| Arc::ptr_eq(l, link)) {
                links.remove(&key);
            }
            self.metrics.set_visit_links(links.len());
        }
        let ids: Vec<u32> = lock(&link.calls).drain().collect();
        {
            let mut calls = lock(&self.calls);
            for id in &ids {
                calls.remove(&(link.conn_id, *id));
            }
        }
        lock(&self.rooms).retain(|_, l| !Arc::ptr_eq(l, link));
        // A room's id is not a call: its sessions are (and end as calls do).
        for call in ids.iter().filter(|id| *id & natcall_proto::relay::ROOM_ID_BIT == 0) {
            if let Ok(f) = control_frame(&ServerMsg::CallSuspended { call: *call }) {
                outbox.push_server(f);
            }
        }
        info!(node = %link.node, conn = link.conn_id, calls = ids.len(), %why, "visit link closed");
    }

    /// Connection `conn_id` ended: its links close (the other nodes suspend its calls there).
    pub fn drop_conn(&self, conn_id: u64) {
        let mut links = lock(&self.links);
        links.retain(|(c, _), l| {
            let keep = *c != conn_id;
            if !keep {
                l.stop.notify_one();
            }
            keep
        });
        self.metrics.set_visit_links(links.len());
        drop(links);
        lock(&self.calls).retain(|(c, _), _| *c != conn_id);
        lock(&self.rooms).retain(|(c, _), _| *c != conn_id);
    }
}

/// Writes what the peer sends the other node, in batches, until the link is stopped (its peer's
/// connection ended); then closes the link's write side.
async fn write_link(
    mut wr: tokio::io::WriteHalf<LinkStream>,
    mut rx: mpsc::Receiver<Bytes>,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut batch = BytesMut::new();
    loop {
        let f = tokio::select! {
            biased;
            f = rx.recv() => match f {
                Some(f) => f,
                None => break,
            },
            () = stop.notified() => {
                // What was queued before the stop (a last hang-up) still goes out.
                while let Ok(f) = rx.try_recv() {
                    batch.extend_from_slice(&f);
                }
                if !batch.is_empty() {
                    let _ = wr.write_all(&batch).await;
                }
                break;
            }
        };
        batch.extend_from_slice(&f);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(f) => batch.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        if let Err(e) = wr.write_all(&batch).await {
            warn!(error = %e, "visit link write failed");
            return;
        }
        batch.clear();
    }
    let _ = wr.shutdown().await;
}
