//! The server: accept loop, connection limit, STUN responder, and the graceful drain.
//!
//! Drain on shutdown:
//! 1. stop accepting (the listener is dropped);
//! 2. every connection queues a "going away" frame, flushes, half-closes, and reads until its
//!    peer closes or `limits.drain_timeout_ms` passes;
//! 3. `run` returns when every connection has ended.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use bytes::BytesMut;
use natcall_proto::frame::{self, ErrorCode};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::calls::Calls;
use crate::config::Config;
use crate::conn::{self, Context};
use crate::http;
use crate::limits::SourceSlot;
use crate::limits::{self, FdReserve};
use crate::metrics::{Metrics, Refusal};
use crate::registry::Registry;
use crate::rooms::Rooms;
use crate::sockopt::{self, Sockets};
use crate::stun;
use crate::tls::{ServerTls, TlsSource};
use natcall_proto::server_key::ServerKey;

/// What the server cannot start with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The state directory (name bindings) cannot be created, read or written.
    #[error("cannot use the state directory {}: {source}; {}", dir.display(), state_hint(source.kind()))]
    State {
        /// The directory.
        dir: PathBuf,
        /// What failed (naming the file, when it was one in the directory).
        source: std::io::Error,
    },
    /// The metrics endpoint cannot listen.
    #[error("cannot serve metrics: {0}")]
    Metrics(std::io::Error),
    /// The TLS certificate or key cannot be loaded or created.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A socket operation failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The cluster (Redis) cannot be joined.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A cluster node was started without [`Server::open`], or with no address to advertise.
    #[error("{0}")]
    ClusterSetup(String),
}

/// What an operator can do about a state directory that cannot be used.
fn state_hint(kind: std::io::ErrorKind) -> &'static str {
    use std::io::ErrorKind::*;
    match kind {
        PermissionDenied | ReadOnlyFilesystem => {
            "let the server's user create and write it (owner, mode, a read-only mount), or choose \
             another with --state-dir DIR (state_dir in the config), or run with --ephemeral"
        }
        InvalidData => "restore the file from a backup, or move it away to start without the names it held",
        _ => {
            "check the path, or choose another with --state-dir DIR (state_dir in the config), or run with --ephemeral"
        }
    }
}

/// A rendezvous server. Cheap to clone; clones share one registry and call table.
#[derive(Debug, Clone)]
pub struct Server {
    ctx: Arc<Context>,
    drain_tx: Arc<watch::Sender<bool>>,
}

impl Server {
    /// A server with `config`; loads the name bindings from its state directory, if any, and
    /// caps `limits.max_connections` below the open-file limit.
    pub fn new(mut config: Config) -> Result<Self, ServerError> {
        config.validate()?;
        if config.cluster.is_some() {
            return Err(ServerError::ClusterSetup(
                "a cluster node joins its Redis when it starts: use Server::open".into(),
            ));
        }
        let metrics = Metrics::new();
        cap_to_open_files(&mut config);
        metrics.set_max_connections(config.limits.max_connections);
        let state = config.state_dir();
        let registry =
            Registry::new(state.as_ref(), &config.limits, metrics.clone()).map_err(|source| ServerError::State {
                dir: state.as_ref().map(|d| d.path().to_owned()).unwrap_or_default(),
                source,
            })?;
        let tls = ServerTls::load(config.tls_source())?;
        Ok(Self::build(config, metrics, registry, tls, None))
    }

    /// A server with `config` listening on `local`: a single server as [`Server::new`]
    /// makes, or a node of the cluster `config.cluster` names — its Redis joined (an error when
    /// it does not answer), its name bindings there, and its address (`advertise`, else
    /// `public_addr`, else `local` when it is one specific address) recorded for the others.
    pub async fn open(mut config: Config, local: SocketAddr) -> Result<Self, ServerError> {
        let Some(cc) = config.cluster.clone() else {
            return Self::new(config);
        };
        config.validate()?;
        let metrics = Metrics::new();
        cap_to_open_files(&mut config);
        metrics.set_max_connections(config.limits.max_connections);
        let tls = ServerTls::load(config.tls_source())?;
        let advertise = cc
            .advertise
            .or(config.public_addr)
            .or(Some(local).filter(|a| !a.ip().is_unspecified()))
            .ok_or_else(|| {
                ServerError::ClusterSetup(format!(
                    "a cluster node listening on {local} needs --advertise IP:PORT: the address peers and \
                     other nodes reach it at"
                ))
            })?;
        let cluster = crate::cluster::Cluster::connect(&cc, advertise, tls.key(), metrics.clone()).await?;
        let l = &config.limits;
        let names = crate::cluster::RedisNames::new(
            cluster.clone(),
            l.max_names,
            l.max_names_per_key,
            l.name_expiry().as_secs(),
        );
        let registry = Registry::with_backend(Arc::new(names), &config.limits, metrics.clone());
        let visits = crate::cluster::visit::Visits::new(cluster, config.limits.idle_timeout(), metrics.clone());
        Ok(Self::build(config, metrics, registry, tls, Some(visits)))
    }

    fn build(
        config: Config,
        metrics: Metrics,
        registry: Registry,
        tls: ServerTls,
        cluster: Option<Arc<crate::cluster::visit::Visits>>,
    ) -> Self {
        let (drain_tx, drain) = watch::channel(false);
        let calls = Calls::new(&config.limits, metrics.clone());
        let rooms = Rooms::new(&config.limits, metrics.clone());
        Self {
            ctx: Arc::new(Context {
                tls,
                config,
                registry: Arc::new(registry),
                calls,
                rooms,
                metrics,
                drain,
                stun_alt_port: AtomicU16::new(0),
                cluster,
                move_to: std::sync::Mutex::default(),
            }),
            drain_tx: Arc::new(drain_tx),
        }
    }

    /// This node's cluster, if it is one.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.ctx.cluster.as_ref().map(|v| v.cluster())
    }

    /// Where the server keeps durable state (`None`: in memory), for other components' files.
    pub fn state_dir(&self) -> Option<crate::config::StateDir> {
        self.ctx.config.state_dir()
    }

    /// The registry of online peers.
    pub fn registry(&self) -> &Registry {
        &self.ctx.registry
    }

    /// The key peers pin (the SHA-256 of the TLS certificate's public key).
    pub fn key(&self) -> ServerKey {
        self.ctx.tls.key()
    }

    /// Re-reads the TLS certificate files (on SIGHUP); the current certificate stays on error.
    pub fn reload_tls(&self) -> Result<ServerKey, crate::tls::TlsError> {
        self.ctx.tls.reload()
    }

    /// The room table.
    pub fn rooms(&self) -> &Rooms {
        &self.ctx.rooms
    }

    /// The call table (ringing and active calls, relay counters).
    pub fn calls(&self) -> &Calls {
        &self.ctx.calls
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.ctx.metrics
    }

    /// The `/health` document: status and a few counts.
    pub fn health(&self) -> String {
        // A node whose Redis is gone still serves its peers and their calls: degraded, not down.
        let cluster = match self.cluster() {
            Some(c) if c.redis_up() => format!(",\"node\":\"{}\",\"redis\":\"up\"", c.node()),
            Some(c) => format!(",\"node\":\"{}\",\"redis\":\"down\"", c.node()),
            None => String::new(),
        };
        let status = match self.cluster() {
            Some(c) if !c.redis_up() => "degraded",
            _ => "ok",
        };
        format!(
            "{{\"status\":\"{status}\",\"registered_peers\":{},\"calls\":{},\"rooms\":{}{cluster}}}\n",
            self.ctx.registry.online_count(),
            self.ctx.calls.len(),
            self.ctx.rooms.len()
        )
    }

    /// Serves on `sockets` until `shutdown` completes, then drains every connection.
    pub async fn run(&self, sockets: Sockets, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Sockets {
            tcp,
            udp,
            udp_alt,
            udp_other,
        } = sockets;
        let local = tcp.local_addr()?;
        match self.ctx.tls.source() {
            TlsSource::Files { cert, .. } => {
                info!(%local, cert = %cert.display(), key = %self.key(), "rendezvous server listening (TLS control/relay, UDP STUN)");
            }
            TlsSource::SelfSigned { .. } => {
                info!(%local, key = %self.key(), "rendezvous server listening (TLS control/relay, UDP STUN); peers pin this key");
            }
        }
        let (other_ip, other_both) = match udp_other {
            Some((a, b)) => (Some(a), Some(b)),
            None => (None, None),
        };
        let sockets = [Some(udp), udp_alt, other_ip, other_both].map(|s| s.map(Arc::new));
        let mut layout = stun::Layout::default();
        for (i, s) in sockets.iter().enumerate() {
            layout.addrs[i] = s.as_ref().and_then(|s| s.local_addr().ok()).map(sockopt::canonical);
        }
        if let Some(alt) = layout.addrs[1] {
            self.ctx.stun_alt_port.store(alt.port(), Ordering::Relaxed);
            info!(port = alt.port(), "second STUN port (NAT mapping tests)");
        }
        if layout.rfc5780() {
            info!(addrs = ?layout.addrs, "RFC 5780 NAT behaviour discovery on four STUN sockets");
        }
        let stun_task = tokio::spawn(stun::respond(
            sockets,
            layout,
            self.ctx.registry.clone(),
            self.ctx.metrics.clone(),
        ));
        let metrics_task = match self.ctx.config.metrics_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr).await.map_err(ServerError::Metrics)?;
                let me = self.clone();
                let rooms = self.ctx.rooms.clone();
                Some(tokio::spawn(http::serve(
                    listener,
                    self.ctx.metrics.clone(),
                    move || me.health(),
                    move || rooms.status_json(),
                )))
            }
            None => None,
        };
        let refresh_task = self.ctx.cluster.as_ref().map(|visits| {
            let (cluster, registry) = (visits.cluster().clone(), self.ctx.registry.clone());
            let rooms = self.ctx.rooms.clone();
            tokio::spawn(async move {
                let mut hosted: Vec<String> = Vec::new();
                loop {
                    // Every third of the TTL (every second while Redis does not answer), and at
                    // once when Redis is back after an outage (it may have lost what this node
                    // wrote).
                    let every = match cluster.redis_up() {
                        true => cluster.refresh_interval(),
                        false => cluster.refresh_interval().min(std::time::Duration::from_secs(1)),
                    };
                    tokio::select! {
                        () = tokio::time::sleep(every) => {}
                        () = cluster.recovered() => {}
                    }
                    // Failures are counted and logged by the cluster; the next tick tries again.
                    let now_hosted = rooms.names();
                    let _ = cluster.refresh(&registry.homed_names(), &now_hosted).await;
                    // Rooms closed since the last time are no longer this node's.
                    for gone in hosted.iter().filter(|r| !now_hosted.contains(r)) {
                        let _ = cluster.release_room(gone).await;
                    }
                    hosted = now_hosted;
                }
            })
        });
        let permits = Arc::new(Semaphore::new(self.ctx.config.limits.max_connections));
        let mut reserve = FdReserve::new();
        let next_id = AtomicU64::new(1);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = tcp.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let addr = crate::sockopt::canonical(addr);
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        match self.admit(&permits, addr) {
                            Ok(admitted) => {
                                let ctx = self.ctx.clone();
                                let uncounted = admitted.1.is_none();
                                conns.spawn(async move {
                                    conn::serve(ctx, stream, addr, id, uncounted).await;
                                    drop(admitted);
                                });
                            }
                            Err((why, message)) => {
                                self.ctx.metrics.refused(why);
                                conns.spawn(refuse_full(self.ctx.clone(), stream, addr, message));
                            }
                        }
                    }
                    Err(e) if limits::is_out_of_fds(&e) => {
                        self.out_of_fds(&tcp, &mut reserve, &mut conns).await;
                    }
                    // Per-connection failures (e.g. the peer reset before accept) are
                    // transient: log, yield, go on.
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(tcp);
        if let Some(visits) = &self.ctx.cluster {
            // Peers are sent to the other live nodes: they keep their names there.
            match visits.cluster().other_nodes().await {
                Ok(nodes) => {
                    info!(?nodes, "draining: peers are sent to the other nodes");
                    if let Ok(mut m) = self.ctx.move_to.lock() {
                        *m = nodes;
                    }
                }
                Err(e) => warn!(error = %e, "draining without other nodes to send peers to"),
            }
        }
        info!(connections = conns.len(), "shutting down: draining connections");
        self.drain_tx.send_replace(true);
        while conns.join_next().await.is_some() {}
        if let Some(t) = refresh_task {
            t.abort();
        }
        if let Some(visits) = &self.ctx.cluster {
            visits.cluster().leave().await;
        }
        stun_task.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        info!("drained; bye");
        Ok(())
    }
}

impl Server {
    /// Admits a connection from `addr` within the per-source and total connection limits, or
    /// says which refused it and the sentence to tell the client.
    fn admit(
        &self,
        permits: &Arc<Semaphore>,
        addr: SocketAddr,
    ) -> Result<(OwnedSemaphorePermit, Option<SourceSlot>), (Refusal, String)> {
        let limits = &self.ctx.config.limits;
        // Another node of the cluster opens one visit per peer of its calling here: those are
        // not one source's connections (the total limit still holds). A connection from a
        // node's address that registers as a peer is counted then (`conn::serve`).
        if self.cluster().is_some_and(|c| c.is_node(addr.ip())) {
            return match permits.clone().try_acquire_owned() {
                Ok(permit) => Ok((permit, None)),
                Err(_) => Err((
                    Refusal::ServerFull,
                    "server full: the server is at its connection limit; try later".to_owned(),
                )),
            };
        }
        let Some(slot) = self.ctx.registry.sources().admit(addr.ip()) else {
            let n = limits.max_connections_per_ip;
            let msg =
                format!("server full for your address: it has {n} connections, the most one address may; try later");
            return Err((Refusal::PerIpConnections, msg));
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => Ok((permit, Some(slot))),
            Err(_) => Err((
                Refusal::ServerFull,
                "server full: the server is at its connection limit; try later".to_owned(),
            )),
        }
    }

    /// The process is out of descriptors (`EMFILE`/`ENFILE`): the waiting connection would
    /// keep the listener readable, so the accept loop would spin. Frees the reserve to accept
    /// it and answer "server full"; without a reserve, backs off 10 ms and tries to take one.
    async fn out_of_fds(&self, tcp: &TcpListener, reserve: &mut FdReserve, conns: &mut JoinSet<()>) {
        self.ctx.metrics.refused(Refusal::FdLimit);
        if reserve.release() {
            let accepted = tokio::time::timeout(std::time::Duration::from_millis(1), tcp.accept()).await;
            if let Ok(Ok((stream, addr))) = accepted {
                warn!(%addr, "out of file descriptors: answering \"server full\" (raise LimitNOFILE or lower limits.max_connections)");
                let msg = "server full: the server is out of file descriptors; try later";
                conns.spawn(refuse_full(self.ctx.clone(), stream, addr, msg.to_owned()));
                return;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        reserve.restore();
    }
}

/// Caps `limits.max_connections` below the open-file limit (logged when it does).
fn cap_to_open_files(config: &mut Config) {
    let Some(nofile) = limits::nofile_limit() else {
        return;
    };
    let configured = config.limits.max_connections;
    let (n, capped) = limits::cap_connections(configured, nofile);
    if capped {
        warn!(
            configured,
            open_file_limit = nofile,
            max_connections = n,
            "limits.max_connections capped below the open-file limit (raise LimitNOFILE to allow more)"
        );
        config.limits.max_connections = n;
    }
}

/// Tells a connection over a limit why ("server full … try later") inside TLS, so the client
/// can read it and knows it is the server speaking, and closes it gracefully. The handshake is
/// bounded by a short deadline: a refusal never holds resources for long.
async fn refuse_full(ctx: Arc<Context>, stream: TcpStream, addr: SocketAddr, message: String) {
    debug!(%addr, %message, "refusing a connection");
    let refuse = async {
        let mut tls = ctx.tls.acceptor().accept(stream).await.ok()?;
        let mut b = BytesMut::new();
        frame::encode_error(ErrorCode::ServerFull, &message, &mut b);
        tls.write_all(&b).await.ok()?;
        tls.shutdown().await.ok()
    };
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, refuse).await;
}

/// How long a refused connection may take for its handshake and error frame.
const REFUSAL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves with `config` on `sockets` until `shutdown` completes (mini-redis style entry point).
pub async fn run(sockets: Sockets, config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let local = sockets.tcp.local_addr()?;
    Server::open(config, local).await?.run(sockets, shutdown).await
}
