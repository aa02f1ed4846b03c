//! The server: accept loop, connection limit, STUN responder, and the graceful drain.
//!
//! Drain on shutdown:
//! 1. stop accepting (the listener is dropped);
//! 2. every connection queues a "going away" frame, flushes, half-closes, and reads until its
//!    peer closes or `limits.drain_timeout_ms` passes;
//! 3. `run` returns when every connection has ended.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use natcall_proto::frame::{self, ErrorCode};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::calls::Calls;
use crate::config::Config;
use crate::conn::{self, Context};
use crate::http;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::sockopt::Sockets;
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
    /// The name state file cannot be opened or read.
    #[error("cannot open the state file: {0}")]
    State(std::io::Error),
    /// The metrics endpoint cannot listen.
    #[error("cannot serve metrics: {0}")]
    Metrics(std::io::Error),
    /// The TLS certificate or key cannot be loaded or created.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A socket operation failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// A rendezvous server. Cheap to clone; clones share one registry and call table.
#[derive(Debug, Clone)]
pub struct Server {
    ctx: Arc<Context>,
    drain_tx: Arc<watch::Sender<bool>>,
}

impl Server {
    /// A server with `config`; loads the name bindings from its state file, if any.
    pub fn new(config: Config) -> Result<Self, ServerError> {
        config.validate()?;
        let registry =
            Registry::new(config.state_file.as_deref(), config.limits.max_names).map_err(ServerError::State)?;
        let (drain_tx, drain) = watch::channel(false);
        let metrics = Metrics::new();
        let calls = Calls::new(&config.limits, metrics.clone());
        let tls = ServerTls::load(config.tls_source())?;
        Ok(Self {
            ctx: Arc::new(Context {
                tls,
                config,
                registry: Arc::new(registry),
                calls,
                metrics,
                drain,
            }),
            drain_tx: Arc::new(drain_tx),
        })
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
        format!(
            "{{\"status\":\"ok\",\"registered_peers\":{},\"calls\":{}}}\n",
            self.ctx.registry.online_count(),
            self.ctx.calls.len()
        )
    }

    /// Serves on `sockets` until `shutdown` completes, then drains every connection.
    pub async fn run(&self, sockets: Sockets, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Sockets { tcp, udp } = sockets;
        let local = tcp.local_addr()?;
        match self.ctx.tls.source() {
            TlsSource::Files { cert, .. } => {
                info!(%local, cert = %cert.display(), key = %self.key(), "rendezvous server listening (TLS control/relay, UDP STUN)");
            }
            TlsSource::SelfSigned { .. } => {
                info!(%local, key = %self.key(), "rendezvous server listening (TLS control/relay, UDP STUN); peers pin this key");
            }
        }
        let stun_task = tokio::spawn(stun::respond(
            Arc::new(udp),
            self.ctx.registry.clone(),
            self.ctx.metrics.clone(),
        ));
        let metrics_task = match self.ctx.config.metrics_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr).await.map_err(ServerError::Metrics)?;
                let me = self.clone();
                Some(tokio::spawn(http::serve(
                    listener,
                    self.ctx.metrics.clone(),
                    move || me.health(),
                )))
            }
            None => None,
        };
        let permits = Arc::new(Semaphore::new(self.ctx.config.limits.max_connections));
        let next_id = AtomicU64::new(1);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = tcp.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        match permits.clone().try_acquire_owned() {
                            Ok(permit) => {
                                let ctx = self.ctx.clone();
                                conns.spawn(async move {
                                    conn::serve(ctx, stream, addr, id).await;
                                    drop(permit);
                                });
                            }
                            Err(_) => {
                                conns.spawn(refuse_full(self.ctx.clone(), stream, addr));
                            }
                        }
                    }
                    // Per-connection failures (e.g. the peer reset before accept) and fd
                    // exhaustion are transient: log, yield, go on.
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(tcp);
        info!(connections = conns.len(), "shutting down: draining connections");
        self.drain_tx.send_replace(true);
        while conns.join_next().await.is_some() {}
        stun_task.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        info!("drained; bye");
        Ok(())
    }
}

/// Tells a connection over the limit why (inside TLS, so the client can read it and knows it
/// is the server speaking), and closes it gracefully. The handshake is bounded by a short
/// deadline: a refusal never holds resources for long.
async fn refuse_full(ctx: Arc<Context>, stream: TcpStream, addr: SocketAddr) {
    debug!(%addr, "connection limit reached; refusing");
    let refuse = async {
        let mut tls = ctx.tls.acceptor().accept(stream).await.ok()?;
        let mut b = BytesMut::new();
        frame::encode_error(
            ErrorCode::ServerFull,
            "the server is at its connection limit; try again later",
            &mut b,
        );
        tls.write_all(&b).await.ok()?;
        tls.shutdown().await.ok()
    };
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, refuse).await;
}

/// How long a refused connection may take for its handshake and error frame.
const REFUSAL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves with `config` on `sockets` until `shutdown` completes (mini-redis style entry point).
pub async fn run(sockets: Sockets, config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Server::new(config)?.run(sockets, shutdown).await
}
