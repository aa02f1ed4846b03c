//! Server configuration: a TOML file, overridden by command-line flags.
//!
//! ```toml
//! listen = "0.0.0.0:3478"          # TCP control/relay and UDP STUN, same port number
//! public_addr = "203.0.113.5:3478" # what peers are told to send STUN to (optional)
//! stun_alt_port = 3479             # second UDP STUN port (default: listen port + 1; 0: off)
//! alternate_ip = "203.0.113.6"     # a second IP: RFC 5780 NAT discovery (optional)
//! log_level = "info"               # used when RUST_LOG is not set
//! state_dir = "/var/lib/natcall-rendezvous"  # name → key bindings survive restarts
//! tls_cert = "/etc/letsencrypt/live/rv.example.net/fullchain.pem"  # a CA certificate (optional;
//! tls_key = "/etc/letsencrypt/live/rv.example.net/privkey.pem"     # without: the server's own key)
//!
//! [cluster]                        # several servers on one Redis (optional; see docs/deploy.md)
//! redis = "redis://10.0.0.5:6379"
//! node_id = "eu-1"
//! advertise = "203.0.113.5:3478"   # where peers and other nodes reach this one
//!
//! [limits]
//! max_frame_len = 16384
//! max_connections = 100000
//! max_connections_per_ip = 64
//! max_calls_per_peer = 4
//! ring_timeout_ms = 30000
//! resume_timeout_ms = 30000
//! ```
//!
//! Every value is checked when the server starts ([`Config::from_file`], [`Config::validate`]):
//! an unknown key, a value of the wrong type, a `log_level` that is not a level or a filter
//! (see [`check_log_level`]), an address peers cannot use, an empty path, or a limit out of its
//! range is refused with one line naming the key, the value and what it may be.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use natcall_proto::frame::{DEFAULT_MAX_FRAME_LEN, MAX_FRAME_LEN};
use serde::{Deserialize, Deserializer};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

/// The whole server configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address for both the TCP listener and the UDP STUN socket.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// The address peers should send STUN to, when it differs from the one they connected to
    /// (a server behind a 1:1 NAT or load balancer).
    #[serde(deserialize_with = "opt_socket_addr")]
    pub public_addr: Option<SocketAddr>,
    /// A second UDP STUN port on the same IP: a peer compares its public port as seen there
    /// and on the main port to learn whether its NAT maps ports per destination (a symmetric
    /// NAT), which decides how calls punch through it. Unset: the listen port + 1 (any free
    /// port when the listen port is 0), skipped with a warning when taken; 0: off.
    pub stun_alt_port: Option<u16>,
    /// A second IP address of this host (RFC 5780): STUN is answered on it at the main and the
    /// second port, and answers carry RESPONSE-ORIGIN and OTHER-ADDRESS, so clients can tell
    /// how their NAT maps and filters (`natcall netcheck`, `turnutils_natdiscovery`). Needs
    /// `listen` on one IP address of the same family.
    pub alternate_ip: Option<std::net::IpAddr>,
    /// Log filter used when `RUST_LOG` is not set: a level or RUST_LOG-style directives, each
    /// with a level (see [`check_log_level`]).
    pub log_level: String,
    /// The directory where the server keeps what must survive a restart (name → key bindings,
    /// see [`StateDir`]); in memory only when unset (the library default; the binary defaults
    /// to a directory, see `docs/deploy.md`).
    pub state_dir: Option<PathBuf>,
    /// Deprecated: the append-only name file of earlier versions. When set and `state_dir` is
    /// not, its directory becomes the state directory; its bindings are imported once into the
    /// state directory's store (see [`StateDir::legacy_names`]).
    pub state_file: Option<PathBuf>,
    /// Where to serve Prometheus `/metrics` and `/health` over HTTP; off when unset.
    #[serde(deserialize_with = "opt_socket_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// A CA-issued certificate chain (PEM) for the TLS channel, with [`Self::tls_key`];
    /// reloaded on SIGHUP. Without it the server uses its own key (see [`Self::tls_source`]).
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of [`Self::tls_cert`].
    pub tls_key: Option<PathBuf>,
    /// Resource limits.
    pub limits: Limits,
    /// The relay engine.
    pub relay: RelayConfig,
    /// Many servers sharing one registry in Redis; a single server when unset.
    pub cluster: Option<ClusterConfig>,
}

/// One node of a cluster of servers sharing their registry in Redis (see `crate::cluster`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The Redis server: `redis://[:PASSWORD@]HOST:PORT[/DB]` (or `rediss://` with TLS); a
    /// Redis Cluster: `redis+cluster://HOST:PORT,HOST:PORT,…` (seed nodes); Redis behind
    /// Sentinel: `redis+sentinel://HOST:PORT,HOST:PORT,…/MASTER` (the sentinels, and the
    /// name of the master they monitor).
    pub redis: String,
    /// This node's id, unique in the cluster (letters, digits, `-`, `_`, `.`; at most 64).
    pub node_id: String,
    /// Where peers and other nodes reach this node (its public IP and port). Default: the
    /// listen address, when it is one specific address.
    #[serde(default, deserialize_with = "opt_socket_addr")]
    pub advertise: Option<SocketAddr>,
    /// How long a node's peers stay listed as present on it after its last refresh (seconds;
    /// refreshed every third of it). A node that dies frees its peers' presence this long after.
    #[serde(default = "ClusterConfig::default_presence_ttl")]
    pub presence_ttl_secs: u64,
    /// How long one Redis command, or a visit to another node, may take (milliseconds).
    #[serde(default = "ClusterConfig::default_timeout")]
    pub timeout_ms: u64,
}

impl ClusterConfig {
    /// A node of the cluster on `redis` with id `node_id`, the other values their defaults.
    pub fn new(redis: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            redis: redis.into(),
            node_id: node_id.into(),
            advertise: None,
            presence_ttl_secs: Self::default_presence_ttl(),
            timeout_ms: Self::default_timeout(),
        }
    }

    fn default_presence_ttl() -> u64 {
        30
    }

    fn default_timeout() -> u64 {
        2000
    }

    /// [`Self::presence_ttl_secs`].
    pub fn presence_ttl(&self) -> Duration {
        Duration::from_secs(self.presence_ttl_secs)
    }

    /// [`Self::timeout_ms`].
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let schemes = ["redis://", "rediss://", "redis+cluster://", "redis+sentinel://"];
        if !schemes.iter().any(|s| self.redis.starts_with(s)) {
            return Err(ConfigError::Invalid(format!(
                "cluster.redis = {:?} is not a Redis URL; write redis://HOST:PORT, \
                 redis+cluster://HOST:PORT,HOST:PORT,… or redis+sentinel://HOST:PORT,…/MASTER",
                self.redis
            )));
        }
        let id_ok = !self.node_id.is_empty()
            && self.node_id.len() <= 64
            && self
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !id_ok {
            return Err(ConfigError::Invalid(format!(
                "cluster.node_id = {:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                self.node_id
            )));
        }
        if let Some(a) = self.advertise {
            if a.ip().is_unspecified() || a.port() == 0 {
                return Err(ConfigError::Invalid(format!(
                    "cluster.advertise = \"{a}\" is not an address others can reach; give this node's IP:PORT"
                )));
            }
        }
        if !(3..=3600).contains(&self.presence_ttl_secs) {
            return Err(ConfigError::Invalid(format!(
                "cluster.presence_ttl_secs must be between 3 and 3600, not {}",
                self.presence_ttl_secs
            )));
        }
        if !(10..=60_000).contains(&self.timeout_ms) {
            return Err(ConfigError::Invalid(format!(
                "cluster.timeout_ms must be between 10 and 60000, not {}",
                self.timeout_ms
            )));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3478)),
            public_addr: None,
            stun_alt_port: None,
            alternate_ip: None,
            log_level: "info".into(),
            state_dir: None,
            state_file: None,
            metrics_listen: None,
            tls_cert: None,
            tls_key: None,
            limits: Limits::default(),
            relay: RelayConfig::default(),
            cluster: None,
        }
    }
}

/// The relay engine's per-receiver buffer (see `docs/relay.md`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// N: a client acknowledges every N relay frames it reads (told to it at registration).
    pub ack_every: u32,
    /// The most relay frames written and not yet acknowledged before the client counts as busy;
    /// the limit in force adapts between `ack_every` and this (see `target_delay_ms`).
    pub idle_limit: u32,
    /// The adaptive limit aims to keep at most this much traffic written but unread (ms).
    pub target_delay_ms: u64,
    /// Most relay frames put into one write.
    pub burst: u32,
    /// Bound on relay frames waiting for one client.
    pub max_frames: usize,
    /// Bound on relay bytes waiting for one client.
    pub max_bytes: usize,
    /// Bound on the age of the oldest droppable (audio/video) frame waiting (ms).
    pub max_age_ms: u64,
    /// Audio waiting longer than this is dropped (ms).
    pub audio_deadline_ms: u64,
    /// A client that makes no progress this long while frames wait is disconnected (ms).
    pub overload_timeout_ms: u64,
    /// `SO_SNDBUF` of peer connections (bytes; the kernel doubles it; 0: the kernel's default).
    pub sndbuf: usize,
    /// `TCP_NOTSENT_LOWAT` of peer connections (bytes): the socket is writable only while less
    /// than this is unsent, so backlog builds in the server's buffer where the policy sees it
    /// (0: not set).
    pub notsent_lowat: u32,
    /// `TCP_THIN_LINEAR_TIMEOUTS` on peer connections (Linux): while fewer than four segments
    /// are in flight, a retransmission timeout does not double for its first six retries, so a
    /// relayed call on a lossy link stalls for one timeout, not 0.2 + 0.4 + 0.8 s.
    pub thin_linear_timeouts: bool,
    /// While a client is the bottleneck, every this many ms the senders relaying to it are told
    /// what it drains (`RelayBudget`); 0 turns budgets off.
    pub budget_interval_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            ack_every: 4,
            idle_limit: 64,
            target_delay_ms: 80,
            burst: 16,
            max_frames: 256,
            max_bytes: 192 * 1024,
            max_age_ms: 400,
            audio_deadline_ms: 150,
            overload_timeout_ms: 5_000,
            sndbuf: 64 * 1024,
            notsent_lowat: 16 * 1024,
            thin_linear_timeouts: true,
            budget_interval_ms: 100,
        }
    }
}

impl RelayConfig {
    /// [`Self::target_delay_ms`] as a duration.
    pub fn target_delay(&self) -> Duration {
        Duration::from_millis(self.target_delay_ms)
    }
    /// [`Self::max_age_ms`] as a duration.
    pub fn max_age(&self) -> Duration {
        Duration::from_millis(self.max_age_ms)
    }
    /// [`Self::audio_deadline_ms`] as a duration.
    pub fn audio_deadline(&self) -> Duration {
        Duration::from_millis(self.audio_deadline_ms)
    }
    /// [`Self::budget_interval_ms`] as a duration (zero: off).
    pub fn budget_interval(&self) -> Duration {
        Duration::from_millis(self.budget_interval_ms)
    }
    /// [`Self::overload_timeout_ms`] as a duration.
    pub fn overload_timeout(&self) -> Duration {
        Duration::from_millis(self.overload_timeout_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("ack_every", u64::from(self.ack_every)),
            ("burst", u64::from(self.burst)),
            ("max_frames", self.max_frames as u64),
            ("max_bytes", self.max_bytes as u64),
            ("max_age_ms", self.max_age_ms),
            ("audio_deadline_ms", self.audio_deadline_ms),
            ("overload_timeout_ms", self.overload_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!(
                    "relay.{name} must be greater than 0, not 0"
                )));
            }
        }
        if u64::from(self.idle_limit) < 2 * u64::from(self.ack_every) {
            return Err(ConfigError::Invalid(format!(
                "relay.idle_limit ({}) must be at least twice relay.ack_every ({}), or the relay would \
                 wait for every acknowledgement; raise idle_limit or lower ack_every",
                self.idle_limit, self.ack_every
            )));
        }
        Ok(())
    }
}

/// Limits that bound what one client, or all of them, can make the server hold or do.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted on a connection (bytes, at most 65536).
    pub max_frame_len: u32,
    /// Concurrent TCP connections.
    pub max_connections: usize,
    /// Concurrent TCP connections from one source (an IPv4 address or an IPv6 /64); over it
    /// a new connection is answered "server full" and closed.
    pub max_connections_per_ip: usize,
    /// Distinct names bound to keys.
    pub max_names: usize,
    /// Names one key may hold at once.
    pub max_names_per_key: usize,
    /// Names bound for the first time per source and hour (a rolling window).
    pub new_names_per_ip_per_hour: u32,
    /// Registrations (of any name, new or not) per source and minute.
    pub registrations_per_ip_per_min: u32,
    /// Sources tracked at once for the per-source rate limits; when all are in use, a
    /// registration from an untracked source is refused "server full".
    pub max_tracked_sources: usize,
    /// A binding whose name was not registered for this many days expires: anyone may take
    /// the name again.
    pub name_expiry_days: u32,
    /// `Call`s one callee may be rung with per minute, from all callers together.
    pub rings_per_callee_per_min: u32,
    /// `Lookup`s one connection may make per minute; over it they are answered with
    /// `LookupFailed`.
    pub lookups_per_min: u32,
    /// Control (non-relay) frames per second one connection may send (burst = one second's
    /// worth); a connection over it is shed.
    pub frames_per_sec: u32,
    /// Relay frames per second one connection may send (burst = one second's worth); frames
    /// over it are dropped, the connection is not shed.
    pub relay_frames_per_sec: u32,
    /// Frames queued towards one connection before it counts as stuck. Relay frames may fill
    /// all but an eighth of it; beyond that they are dropped.
    pub outbound_queue: usize,
    /// Calls (ringing, active, or waiting to be resumed) one peer may be in at once.
    pub max_calls_per_peer: usize,
    /// Rooms on the server at once.
    pub max_rooms: usize,
    /// Members of one room at once (the creator included; at least 2).
    pub max_room_members: usize,
    /// Rooms one peer may be in at once.
    pub max_rooms_per_peer: usize,
    /// Relay frames per second one connection may send to rooms (burst = one second's worth;
    /// each is copied to every other member, so this bounds what one sender makes the server
    /// do); frames over it are dropped. Counted within `relay_frames_per_sec` too.
    pub room_frames_per_sec: u32,
    /// `RoomCreate`s and `RoomJoin`s one connection may make per minute (join codes cannot be
    /// guessed by trying); over it they are refused.
    pub room_joins_per_min: u32,
    /// A call not answered within this is ended with "no answer" (ms).
    pub ring_timeout_ms: u64,
    /// A `Resume` the other member does not match within this fails (ms).
    pub resume_timeout_ms: u64,
    /// Time a new connection has to say hello and register (ms).
    pub hello_timeout_ms: u64,
    /// A connection silent this long is closed (ms).
    pub idle_timeout_ms: u64,
    /// How often the server pings each peer (ms).
    pub ping_interval_ms: u64,
    /// How long a closing connection is read for the peer's own close before it is dropped (ms).
    pub drain_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_connections: 100_000,
            max_connections_per_ip: 64,
            max_names: 1_000_000,
            max_names_per_key: 8,
            new_names_per_ip_per_hour: 20,
            registrations_per_ip_per_min: 60,
            max_tracked_sources: 100_000,
            name_expiry_days: 180,
            rings_per_callee_per_min: 20,
            lookups_per_min: 60,
            frames_per_sec: 200,
            relay_frames_per_sec: 20_000,
            outbound_queue: 1024,
            max_calls_per_peer: 4,
            max_rooms: 10_000,
            max_room_members: 16,
            max_rooms_per_peer: 4,
            room_joins_per_min: 30,
            room_frames_per_sec: 2_000,
            ring_timeout_ms: 30_000,
            resume_timeout_ms: 30_000,
            hello_timeout_ms: 10_000,
            idle_timeout_ms: 45_000,
            ping_interval_ms: 15_000,
            drain_timeout_ms: 5_000,
        }
    }
}

impl Limits {
    /// [`Self::hello_timeout_ms`] as a duration.
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }
    /// [`Self::idle_timeout_ms`] as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    /// [`Self::ping_interval_ms`] as a duration.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    /// [`Self::ring_timeout_ms`] as a duration.
    pub fn ring_timeout(&self) -> Duration {
        Duration::from_millis(self.ring_timeout_ms)
    }
    /// [`Self::resume_timeout_ms`] as a duration.
    pub fn resume_timeout(&self) -> Duration {
        Duration::from_millis(self.resume_timeout_ms)
    }
    /// [`Self::drain_timeout_ms`] as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
    /// [`Self::name_expiry_days`] as a duration.
    pub fn name_expiry(&self) -> Duration {
        Duration::from_secs(u64::from(self.name_expiry_days) * 86_400)
    }
}

/// The directory of the server's durable state. Files in it:
///
/// - `names.v2` (snapshot) and `names.v2.journal`: the name → key bindings
///   ([`crate::registry::store`]);
/// - other components may keep their own files here (e.g. the server's TLS key) through
///   [`StateDir::file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    path: PathBuf,
    legacy_names: Option<PathBuf>,
}

impl StateDir {
    /// A state directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            legacy_names: None,
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file `name` in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// An earlier version's append-only name file to import when the directory has no
    /// bindings yet (from the deprecated `state_file`).
    pub fn legacy_names(&self) -> Option<&Path> {
        self.legacy_names.as_deref()
    }

    /// Creates the directory (and its parents) if missing, readable by its owner only.
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
    }
}

/// A configuration that cannot be used. Each is one line naming the key, the value and what it
/// may be.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not TOML for this configuration: bad syntax, an unknown key, a value of the
    /// wrong type (`path` is empty for [`Config::from_toml`]).
    #[error("config{}: {message}", in_file(path))]
    Parse { path: PathBuf, message: String },
    /// A value in the file is out of range.
    #[error("config {path}: {message}")]
    Value { path: PathBuf, message: String },
    /// A value is out of range (the file and the flags together).
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// ` PATH` for a file, nothing for text that came from no file.
fn in_file(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!(" {}", path.display())
    }
}

/// What `log_level` (or `--log-level`) may be, for the message refusing one.
pub const LOG_LEVEL_CHOICES: &str =
    "use one of error, warn, info, debug, trace (or a RUST_LOG-style filter such as \"info,natcall_rendezvous=debug\")";

/// A `log_level` that is neither a level nor a filter whose directives each end in a level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a log level; {LOG_LEVEL_CHOICES}")]
pub struct BadLogLevel {
    /// The value refused.
    pub value: String,
}

/// Checks a log filter as `log_level` takes it: a level (`info`), or RUST_LOG-style directives
/// that each end in one (`info,natcall_rendezvous=debug`). `EnvFilter` reads a bare word that is
/// not a level (`verbose`) as a target name and would then log nothing else, so it is refused.
pub fn check_log_level(filter: &str) -> Result<(), BadLogLevel> {
    let mut directives = filter.split(',').map(str::trim).filter(|d| !d.is_empty()).peekable();
    let has_one = directives.peek().is_some();
    let each_has_a_level = directives.all(|d| {
        let level = d.rsplit_once('=').map_or(d, |(_, level)| level);
        level.parse::<LevelFilter>().is_ok()
    });
    if has_one && each_has_a_level && EnvFilter::builder().parse(filter).is_ok() {
        Ok(())
    } else {
        Err(BadLogLevel { value: filter.into() })
    }
}

/// The form addresses take, for messages.
const ADDR_FORM: &str = "use IP:PORT, such as \"0.0.0.0:3478\" or \"[::]:3478\"";

fn parse_addr<E: serde::de::Error>(s: &str) -> Result<SocketAddr, E> {
    s.parse()
        .map_err(|_| E::custom(format!("{s:?} is not an address; {ADDR_FORM}")))
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    parse_addr(&String::deserialize(d)?)
}

fn opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    parse_addr(&String::deserialize(d)?).map(Some)
}

/// One line for a TOML error: where it is, the line itself, and what is wrong with it.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim().replace('\n', " ");
    // serde says "field"; the file says "key".
    let what = match what.strip_prefix("unknown field ") {
        Some(rest) => format!(
            "unknown key {}",
            rest.replacen(", expected one of ", "; valid keys: ", 1)
        ),
        None => what,
    };
    let Some(start) = e.span().map(|s| s.start) else {
        return what;
    };
    let before = text.get(..start).unwrap_or(text);
    let line_no = before.matches('\n').count() + 1;
    let line: String = text
        .lines()
        .nth(line_no - 1)
        .unwrap_or("")
        .trim()
        .chars()
        .take(80)
        .collect();
    if line.is_empty() {
        format!("line {line_no}: {what}")
    } else {
        format!("line {line_no}: `{line}`: {what}")
    }
}

impl Config {
    /// Reads a TOML configuration file and checks it ([`Self::validate`]).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ConfigError::Invalid(message) => ConfigError::Value {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses a TOML configuration and checks it ([`Self::validate`]).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: parse_message(text, &e),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The resolved state directory: `state_dir`, else the directory of the deprecated
    /// `state_file` (whose bindings are then imported); `None` keeps state in memory.
    pub fn state_dir(&self) -> Option<StateDir> {
        match (&self.state_dir, &self.state_file) {
            (Some(dir), legacy) => Some(StateDir {
                path: dir.clone(),
                legacy_names: legacy.clone(),
            }),
            (None, Some(file)) => Some(StateDir {
                path: file.parent().map_or_else(|| PathBuf::from("."), Path::to_owned),
                legacy_names: Some(file.clone()),
            }),
            (None, None) => None,
        }
    }

    /// Checks every value the server relies on: the log filter, addresses, paths and the
    /// ranges of the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_log_level(&self.log_level).map_err(|e| ConfigError::Invalid(format!("log_level = {e}")))?;
        if let Some(a) = self.public_addr {
            if a.ip().is_unspecified() || a.port() == 0 {
                return Err(ConfigError::Invalid(format!(
                    "public_addr = \"{a}\" is not an address peers can send to; use the server's public \
                     IP:PORT, such as \"203.0.113.5:3478\", or leave it unset"
                )));
            }
        }
        if let Some(ip) = self.alternate_ip {
            let listen = self.listen.ip();
            if listen.is_unspecified() || ip.is_ipv4() != listen.is_ipv4() || ip == listen || ip.is_unspecified() {
                return Err(ConfigError::Invalid(format!(
                    "alternate_ip = \"{ip}\" needs listen on one address of the same family, other than it \
                     (listen = \"{}\"), such as listen = \"203.0.113.5:3478\" with alternate_ip = \"203.0.113.6\"",
                    self.listen
                )));
            }
            if self.stun_alt_port == Some(0) {
                return Err(ConfigError::Invalid(
                    "alternate_ip needs the second STUN port: leave stun_alt_port unset or give a port".into(),
                ));
            }
            if self.public_addr.is_some() {
                return Err(ConfigError::Invalid(
                    "alternate_ip and public_addr do not go together: behind a NAT the addresses RFC 5780 \
                     answers name would be private; run NAT discovery on a host with its public IPs"
                        .into(),
                ));
            }
        }
        for (name, path) in [
            ("state_dir", &self.state_dir),
            ("state_file", &self.state_file),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(ConfigError::Invalid(format!(
                    "{name} = \"\" is not a path; give one, or leave it unset"
                )));
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert and tls_key go together: set both (a CA certificate) or neither (the server's own key)"
                    .into(),
            ));
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        self.limits.validate()?;
        self.relay.validate()
    }
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        let l = self;
        if !(64..=MAX_FRAME_LEN).contains(&l.max_frame_len) {
            return Err(ConfigError::Invalid(format!(
                "limits.max_frame_len must be between 64 and {MAX_FRAME_LEN}, not {}",
                l.max_frame_len
            )));
        }
        for (name, v) in [
            ("max_connections", l.max_connections as u64),
            ("max_connections_per_ip", l.max_connections_per_ip as u64),
            ("max_names", l.max_names as u64),
            ("max_names_per_key", l.max_names_per_key as u64),
            ("new_names_per_ip_per_hour", u64::from(l.new_names_per_ip_per_hour)),
            (
                "registrations_per_ip_per_min",
                u64::from(l.registrations_per_ip_per_min),
            ),
            ("max_tracked_sources", l.max_tracked_sources as u64),
            ("name_expiry_days", u64::from(l.name_expiry_days)),
            ("rings_per_callee_per_min", u64::from(l.rings_per_callee_per_min)),
            ("lookups_per_min", u64::from(l.lookups_per_min)),
            ("frames_per_sec", u64::from(l.frames_per_sec)),
            ("relay_frames_per_sec", u64::from(l.relay_frames_per_sec)),
            ("outbound_queue", l.outbound_queue as u64),
            ("max_calls_per_peer", l.max_calls_per_peer as u64),
            ("max_rooms", l.max_rooms as u64),
            ("max_rooms_per_peer", l.max_rooms_per_peer as u64),
            ("room_joins_per_min", u64::from(l.room_joins_per_min)),
            ("room_frames_per_sec", u64::from(l.room_frames_per_sec)),
            ("ring_timeout_ms", l.ring_timeout_ms),
            ("resume_timeout_ms", l.resume_timeout_ms),
            ("ping_interval_ms", l.ping_interval_ms),
            ("idle_timeout_ms", l.idle_timeout_ms),
            ("hello_timeout_ms", l.hello_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be greater than 0, not 0"
                )));
            }
        }
        if l.max_room_members < 2 {
            return Err(ConfigError::Invalid(format!(
                "limits.max_room_members must be at least 2, not {}",
                l.max_room_members
            )));
        }
        if l.idle_timeout_ms <= l.ping_interval_ms {
            return Err(ConfigError::Invalid(format!(
                "limits.idle_timeout_ms ({}) must be longer than limits.ping_interval_ms ({}); raise \
                 idle_timeout_ms or lower ping_interval_ms",
                l.idle_timeout_ms, l.ping_interval_ms
            )));
        }
        Ok(())
    }
}

impl Config {
    /// Where the TLS identity comes from: the certificate files, else the server's own key kept
    /// in the state directory (in memory when there is none).
    pub fn tls_source(&self) -> crate::tls::TlsSource {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => crate::tls::TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => crate::tls::TlsSource::SelfSigned {
                dir: self.state_dir().map(|d| d.path().to_owned()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let c = Config::from_toml(
            r#"
            listen = "127.0.0.1:4000"
            public_addr = "203.0.113.5:3478"
            log_level = "debug"
            [limits]
            max_frame_len = 4096
            idle_timeout_ms = 2000
            ping_interval_ms = 500
            "#,
        )
        .expect("parses");
        assert_eq!(c.listen, "127.0.0.1:4000".parse().expect("addr"));
        assert_eq!(c.public_addr, Some("203.0.113.5:3478".parse().expect("addr")));
        assert_eq!(c.limits.max_frame_len, 4096);
        assert_eq!(c.limits.max_connections, Limits::default().max_connections);
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c = Config::from_toml(include_str!("../dist/rendezvous.toml")).expect("the example parses");
        assert_eq!(c.limits, Limits::default(), "the example documents the defaults");
        assert_eq!(
            c.relay,
            RelayConfig::default(),
            "the example documents the relay defaults"
        );
        assert_eq!(c.listen, Config::default().listen);
    }

    /// The error `text` is refused with, as the user reads it.
    fn refused(text: &str) -> String {
        let e = Config::from_toml(text).expect_err("refused").to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let e = refused("listen = \"127.0.0.1:5\"\nlisen = \"1.2.3.4:5\"");
        assert!(
            e.starts_with("config: line 2: `lisen = \"1.2.3.4:5\"`: unknown key `lisen`"),
            "{e}"
        );
        assert!(e.contains("valid keys: `listen`, `public_addr`"), "{e}");
        let e = refused("[limits]\nmax_frame_len = 10");
        assert!(e.contains("max_frame_len must be between 64"), "{e}");
        let e = refused("[limits]\nidle_timeout_ms = 10\nping_interval_ms = 20");
        assert!(e.contains("must be longer than"), "{e}");
        let e = refused("[relay]\nburst = 0");
        assert!(e.contains("relay.burst must be greater than 0, not 0"), "{e}");
        let e = refused("[limits]\nmax_names = 0");
        assert!(e.contains("limits.max_names must be greater than 0, not 0"), "{e}");
    }

    #[test]
    fn a_log_level_that_is_not_a_level_or_filter_is_refused() {
        let e = refused("log_level = \"verbose\"");
        assert_eq!(
            e,
            "invalid configuration: log_level = \"verbose\" is not a log level; use one of error, warn, \
             info, debug, trace (or a RUST_LOG-style filter such as \"info,natcall_rendezvous=debug\")"
        );
        for bad in [
            "",
            " , ",
            "info,verbose",
            "natcall_rendezvous",
            "natcall_rendezvous=loud",
            "info=debug=x",
        ] {
            assert!(check_log_level(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "info",
            "WARN",
            "off",
            "info,natcall_rendezvous=debug",
            "natcall_rendezvous::stun=trace",
        ] {
            assert_eq!(check_log_level(good), Ok(()), "{good:?} refused");
        }
    }

    #[test]
    fn addresses_and_paths_peers_or_the_server_cannot_use_are_refused() {
        let e = refused("listen = \"1.2.3.4\"");
        assert_eq!(
            e,
            "config: line 1: `listen = \"1.2.3.4\"`: \"1.2.3.4\" is not an address; use IP:PORT, such as \
             \"0.0.0.0:3478\" or \"[::]:3478\""
        );
        let e = refused("metrics_listen = \"localhost:9478\"");
        assert!(e.contains("\"localhost:9478\" is not an address"), "{e}");
        let e = refused("public_addr = \"0.0.0.0:3478\"");
        assert!(
            e.contains("public_addr = \"0.0.0.0:3478\" is not an address peers can send to"),
            "{e}"
        );
        let e = refused("state_dir = \"\"");
        assert!(e.contains("state_dir = \"\" is not a path"), "{e}");
    }

    #[test]
    fn a_bad_value_in_a_file_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rendezvous.toml");
        std::fs::write(&path, "log_level = \"verbose\"\n").expect("writes");
        let e = Config::from_file(&path).expect_err("refused").to_string();
        assert!(
            e.starts_with(&format!(
                "config {}: log_level = \"verbose\" is not a log level;",
                path.display()
            )),
            "{e}"
        );
        std::fs::write(&path, "[limits]\nmax_rooms = \"many\"\n").expect("writes");
        let e = Config::from_file(&path).expect_err("refused").to_string();
        assert!(
            e.starts_with(&format!(
                "config {}: line 2: `max_rooms = \"many\"`: invalid type",
                path.display()
            )),
            "{e}"
        );
    }
}
