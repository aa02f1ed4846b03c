//! `natcall-rendezvous`: flags and config file, logging, signals; everything else is the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use clap::builder::RangedU64ValueParser;
use natcall_proto::frame::MAX_FRAME_LEN;
use natcall_rendezvous::config::check_log_level;
use natcall_rendezvous::{Config, Sockets};
use tracing_subscriber::EnvFilter;

/// The natcall rendezvous server: STUN on UDP and peer control on TCP, on one port number.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; flags given here win over it.
    #[arg(long, short = 'c', env = "NATCALL_RENDEZVOUS_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, TCP and UDP (default 0.0.0.0:3478).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address peers should send STUN to, when it differs from the one they connect to.
    #[arg(long)]
    public_addr: Option<SocketAddr>,
    /// A second UDP STUN port, by which peers learn whether their NAT maps ports per
    /// destination (default: the listen port + 1; 0 turns it off).
    #[arg(long)]
    stun_alt_port: Option<u16>,
    /// A second IP address of this host: STUN is answered on it too (main and second port),
    /// and answers carry RESPONSE-ORIGIN and OTHER-ADDRESS, so clients can run RFC 5780 NAT
    /// behaviour discovery (`natcall netcheck`, coturn's turnutils_natdiscovery). Needs
    /// --listen on one IP address.
    #[arg(long)]
    alternate_ip: Option<std::net::IpAddr>,
    /// Log filter when RUST_LOG is unset: error, warn, info, debug, trace, or a RUST_LOG-style
    /// filter such as "info,natcall_rendezvous=debug".
    #[arg(long, value_parser = log_level)]
    log_level: Option<String>,
    /// Directory keeping name → key bindings across restarts (default: $STATE_DIRECTORY as
    /// systemd sets it, else the user's data directory/natcall-rendezvous).
    #[arg(long, conflicts_with = "ephemeral")]
    state_dir: Option<PathBuf>,
    /// Keep every name binding in memory only: a restart frees every name (demos, tests).
    #[arg(long, conflicts_with = "state_file")]
    ephemeral: bool,
    /// Deprecated: the name file of earlier versions; its directory becomes the state
    /// directory and its bindings are imported once.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Maximum concurrent TCP connections.
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    max_connections: Option<usize>,
    /// Largest frame accepted, in bytes (64 to 65536).
    #[arg(long, value_parser = clap::value_parser!(u32).range(64..=i64::from(MAX_FRAME_LEN)))]
    max_frame_len: Option<u32>,
    /// Close connections silent for this many milliseconds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_ms: Option<u64>,
    /// Ping every peer this often, in milliseconds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    ping_interval_ms: Option<u64>,
    /// A call's Resume waits this long for the other member's, in milliseconds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    resume_timeout_ms: Option<u64>,
    /// Run as one node of a cluster sharing names and presence in this Redis
    /// (redis://HOST:PORT); a single server needs none. Needs --node-id.
    #[arg(long, value_name = "REDIS_URL", requires = "node_id")]
    cluster: Option<String>,
    /// This node's id in the cluster (unique; letters, digits, '-', '_', '.').
    #[arg(long, requires = "cluster")]
    node_id: Option<String>,
    /// Where peers and the other nodes reach this node, IP:PORT (default: --public-addr, else
    /// --listen when it is one address).
    #[arg(long, requires = "cluster")]
    advertise: Option<SocketAddr>,
}

/// `--log-level`: refused at once when it is not a level or a filter.
fn log_level(s: &str) -> Result<String, natcall_rendezvous::config::BadLogLevel> {
    check_log_level(s).map(|()| s.to_owned())
}

impl Args {
    fn into_config(self) -> Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.public_addr {
            c.public_addr = Some(v);
        }
        if let Some(v) = self.stun_alt_port {
            c.stun_alt_port = Some(v);
        }
        if let Some(v) = self.alternate_ip {
            c.alternate_ip = Some(v);
        }
        if let Some(v) = self.log_level {
            c.log_level = v;
        }
        if let Some(v) = self.state_file {
            c.state_file = Some(v);
        }
        if let Some(v) = self.state_dir {
            c.state_dir = Some(v);
        }
        if self.ephemeral {
            c.state_dir = None;
            c.state_file = None;
        } else if c.state_dir.is_none() && c.state_file.is_none() {
            c.state_dir = Some(default_state_dir()?);
        }
        if let Some(v) = self.max_connections {
            c.limits.max_connections = v;
        }
        if let Some(v) = self.max_frame_len {
            c.limits.max_frame_len = v;
        }
        if let Some(v) = self.idle_timeout_ms {
            c.limits.idle_timeout_ms = v;
        }
        if let Some(v) = self.ping_interval_ms {
            c.limits.ping_interval_ms = v;
        }
        if let Some(v) = self.resume_timeout_ms {
            c.limits.resume_timeout_ms = v;
        }
        if let (Some(redis), Some(node_id)) = (self.cluster, self.node_id) {
            let mut cluster = c
                .cluster
                .take()
                .unwrap_or_else(|| natcall_rendezvous::ClusterConfig::new(redis.clone(), node_id.clone()));
            cluster.redis = redis;
            cluster.node_id = node_id;
            c.cluster = Some(cluster);
        }
        if let (Some(cluster), Some(v)) = (c.cluster.as_mut(), self.advertise) {
            cluster.advertise = Some(v);
        }
        c.validate()?;
        Ok(c)
    }
}

/// The binary's durable state directory when none is configured: systemd's
/// `$STATE_DIRECTORY` (its first entry), else the user's data directory.
fn default_state_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY") {
        if let Some(first) = std::env::split_paths(&dir).next().filter(|p| !p.as_os_str().is_empty()) {
            return Ok(first);
        }
    }
    dirs::data_dir()
        .map(|d| d.join("natcall-rendezvous"))
        .context("no state directory: set --state-dir DIR (or state_dir in the config), or run with --ephemeral")
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: a signal that comes once the port is open must already drain.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = signals else {
            // Without signal handlers the server still runs; it just cannot drain on a signal.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// Exits 1 on an error, told as one line on stderr (what failed, why, what to do).
fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause the message already tells.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[tokio::main]
async fn run() -> Result<()> {
    let config = Args::parse().into_config()?;
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&config.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    tracing::debug!(?config, "effective configuration");
    match config.state_dir() {
        Some(dir) => tracing::info!(state_dir = %dir.path().display(), "name bindings are durable"),
        None => tracing::warn!("--ephemeral: name bindings are in memory only; a restart frees every name"),
    }
    // One descriptor per peer: allow as many as the hard limit permits.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    let shutdown = shutdown_signal();
    let sockets =
        Sockets::bind_rfc5780(config.listen, config.stun_alt_port, config.alternate_ip).with_context(|| {
            let alt = match config.stun_alt_port {
                Some(p) if p != 0 => format!(" and UDP port {p}"),
                _ => String::new(),
            };
            let ip = config
                .alternate_ip
                .map(|ip| format!(" and on {ip}"))
                .unwrap_or_default();
            format!("cannot listen on {} (TCP and UDP){alt}{ip}", config.listen)
        })?;
    let local = sockets.tcp.local_addr().context("the listener has no address")?;
    let server = natcall_rendezvous::Server::open(config, local)
        .await
        .context("cannot start the server")?;
    reload_on_sighup(server.clone());
    server.run(sockets, shutdown).await.context("server failed")?;
    Ok(())
}

/// Re-reads the TLS certificate files on every SIGHUP (a certbot renewal hook, `systemctl
/// reload`); a file that does not load is logged and the current certificate kept.
fn reload_on_sighup(server: natcall_rendezvous::Server) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot handle SIGHUP: the TLS certificate is reloaded only by a restart");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match server.reload_tls() {
                Ok(key) => tracing::info!(%key, "SIGHUP: TLS certificate reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: TLS certificate not reloaded; the current one stays"),
            }
        }
    });
}
