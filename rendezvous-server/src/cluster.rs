//! Many rendezvous servers ("nodes") sharing one registry in Redis.
//!
//! A single server needs none of this: it is on only with `--cluster redis://HOST:PORT`
//! (config `[cluster]`). Then:
//! - **name bindings** live in Redis ([`RedisNames`], the cluster's [`NameBackend`]), with
//!   the same quotas and expiry as the embedded store, so a name bound through one node is
//!   refused to another key on every node;
//! - **presence**: each node records `name → node` for the peers registered with it, with a
//!   TTL (`presence_ttl_secs`) it refreshes while they stay ([`Cluster::set_home`]); a node
//!   that dies stops refreshing, and its peers' entries expire;
//! - **nodes**: each node records its id → the address peers and nodes reach it at
//!   (`--advertise`) and its TLS key, also with a TTL ([`Cluster::node`]);
//! - **calls across nodes**: a peer that calls (or resumes a call with) a peer homed on another
//!   node is carried there by its own node, over a TLS connection to that node that speaks for
//!   it (a *visit*, [`visit`]): the call lives on the callee's node exactly as a call between
//!   two of its own peers — ringing, answer, `Start` with both peers' candidates, relay — and
//!   the caller's node passes the frames of that call both ways.
//!
//! All keys share one hash tag (`{nc}`), so every script's keys are in one slot of a Redis
//! Cluster. Every Redis command has a deadline (`timeout_ms`); a node whose Redis is gone keeps
//! its registered peers and the calls in progress (nothing on those paths waits on Redis),
//! refuses new registrations and cross-node calls with a clear error, shows `redis: down` on
//! `/health`, and recovers by itself when Redis is back (the connection manager reconnects).

pub mod visit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use natcall_proto::control::Fingerprint;
use natcall_proto::server_key::ServerKey;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use ring::hmac;
use tracing::{info, warn};

use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::registry::RegisterError;
use crate::registry::backend::{AllowNew, BoxFuture, NameBackend};
use crate::registry::store::Claimed;

/// What the cluster cannot start with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The Redis URL does not parse.
    #[error("the cluster's Redis URL {url:?} is not valid: {source}")]
    Url {
        /// The URL given.
        url: String,
        /// Why.
        source: redis::RedisError,
    },
    /// Redis did not answer at start.
    #[error(
        "cannot reach the cluster's Redis at {url}: {why}; start redis-server there, or run without --cluster for a single server"
    )]
    Unreachable {
        /// The URL given.
        url: String,
        /// What failed.
        why: String,
    },
    /// Another live node has this node's id.
    #[error("node id {0:?} is in use by another live node of the cluster; give each node its own --node-id")]
    NodeIdTaken(String),
}

/// The hash tag every key carries (one Redis Cluster slot).
const TAG: &str = "{nc}";

fn name_key(name: &str) -> String {
    format!("{TAG}:name:{name}")
}
fn names_key() -> String {
    format!("{TAG}:names")
}
fn key_key(fp: &Fingerprint) -> String {
    format!("{TAG}:key:{}", hex(&fp.0))
}
fn home_key(name: &str) -> String {
    format!("{TAG}:home:{name}")
}
fn room_key(name: &str) -> String {
    format!("{TAG}:room:{name}")
}
/// Where the two `Resume`s of one call meet: the key names neither the proof nor the call,
/// only a digest of both names (in order) and the proof.
fn resume_key(proof: &[u8; 32], a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [lo.as_bytes(), hi.as_bytes(), proof] {
        ctx.update(&(part.len() as u32).to_be_bytes());
        ctx.update(part);
    }
    format!("{TAG}:resume:{}", hex(ctx.finish().as_ref()))
}
fn node_key(id: &str) -> String {
    format!("{TAG}:node:{id}")
}
fn nodes_key() -> String {
    format!("{TAG}:nodes")
}
fn secret_key() -> String {
    format!("{TAG}:secret")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Claims a name (see [`RedisNames`]). KEYS: name, all names, the key's names. ARGV: key,
/// now, expiry seconds, max per key, max names, name, bind a new name (1/0). Returns
/// {status, names held}: status `held`, `new`, `free` (new, not bound: ask the source),
/// `taken`, `key_quota`, `full`.
const CLAIM: &str = r"
local now = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - expiry)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - expiry)
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {'taken', redis.call('ZCARD', KEYS[2])} end
if not cur then
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then return {'key_quota', redis.call('ZCARD', KEYS[2])} end
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return {'full', redis.call('ZCARD', KEYS[2])} end
  if ARGV[7] ~= '1' then return {'free', redis.call('ZCARD', KEYS[2])} end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', expiry)
redis.call('ZADD', KEYS[2], now, ARGV[6])
redis.call('ZADD', KEYS[3], now, ARGV[6])
redis.call('EXPIRE', KEYS[3], expiry)
if cur then return {'held', redis.call('ZCARD', KEYS[2])} end
return {'new', redis.call('ZCARD', KEYS[2])}
";

/// Frees a name its key holds. KEYS: name, all names, the key's names. ARGV: key, name.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
";

/// Sets KEYS[1] to ARGV[1] for ARGV[2] seconds unless another value is there; returns what
/// is there then (a room's node, where a call's resumes meet).
const CLAIM_ROOM: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
";

/// Deletes KEYS[1] if it holds ARGV[1].
const DELETE_IF: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Renews each KEYS[i] that holds ARGV[1], or sets it when it is gone (Redis lost its data),
/// for ARGV[2] seconds; another node's entry is left alone. Returns how many it wrote.
const RENEW_IF: &str = r"
local n = 0
for _, k in ipairs(KEYS) do
  local cur = redis.call('GET', k)
  if (not cur) or cur == ARGV[1] then redis.call('SET', k, ARGV[1], 'EX', ARGV[2]); n = n + 1 end
end
return n
";

/// Sets KEYS[1] to ARGV[2] for ARGV[3] seconds unless another node's entry (not starting
/// with ARGV[1]) is there, and adds ARGV[4] to the set of nodes KEYS[2]. Returns 1 when set.
const CLAIM_NODE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, string.len(ARGV[1])) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return 1
";

/// One connection to the cluster's Redis, whichever way it is deployed (`cluster.redis`):
/// - `redis://HOST:PORT` (or `rediss://`): one Redis, through a connection manager that
///   reconnects by itself;
/// - `redis+cluster://H1:P1,H2:P2,…`: a Redis Cluster, from these seed nodes (every key of
///   ours is in one slot: the scripts run there);
/// - `redis+sentinel://S1:P1,S2:P2,…/MASTER`: the master Sentinel names `MASTER`, asked again
///   after a connection error or an exchange left unanswered (a failover moves it; a master
///   whose host died answers nothing at all). Connecting and each answer are bounded by
///   `cluster.timeout_ms`.
#[derive(Clone)]
enum RedisConn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    Sentinel(Arc<SentinelConn>),
}

struct SentinelConn {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    /// The master's connection, with the number it was made under: an exchange forgets only
    /// the connection it used, not a newer one another task made meanwhile.
    conn: std::sync::Mutex<(u64, Option<redis::aio::MultiplexedConnection>)>,
    /// Connecting to the master, and each command's answer (`cluster.timeout_ms`).
    timeout: Duration,
}

impl SentinelConn {
    fn cached(&self) -> (u64, Option<redis::aio::MultiplexedConnection>) {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The master's connection and its number: the cached one, else a new one from the
    /// Sentinels (one task asks; those waiting behind it take what it made).
    async fn get(&self) -> redis::RedisResult<(u64, redis::aio::MultiplexedConnection)> {
        if let (n, Some(c)) = self.cached() {
            return Ok((n, c));
        }
        let mut client = self.client.lock().await;
        if let (n, Some(c)) = self.cached() {
            return Ok((n, c));
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let c = tokio::time::timeout(self.timeout, client.get_async_connection_with_config(&config))
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no master from the Sentinels in time",
                ))
            })??;
        let mut cache = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        cache.0 += 1;
        cache.1 = Some(c.clone());
        Ok((cache.0, c))
    }

    /// Forgets connection number `n` (if it is still the cached one): the next command asks
    /// the Sentinels for the master again.
    fn forget(&self, n: u64) {
        let mut cache = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 == n {
            cache.1 = None;
        }
    }

    /// Runs `exchange` on the master's connection. After an error that is not Redis answering,
    /// the connection is forgotten; so it is when the caller's deadline drops the exchange
    /// unanswered (a master that went silent, its host gone or stopped, gives no error at
    /// all), and the next command asks the Sentinels again instead of waiting on it.
    async fn exchange<'a, T>(
        &'a self,
        exchange: impl FnOnce(redis::aio::MultiplexedConnection) -> redis::RedisFuture<'a, T>,
    ) -> redis::RedisResult<T> {
        struct Unanswered<'s>(Option<(&'s SentinelConn, u64)>);
        impl Drop for Unanswered<'_> {
            fn drop(&mut self) {
                if let Some((s, n)) = self.0 {
                    s.forget(n);
                }
            }
        }
        let (n, c) = self.get().await?;
        let mut unanswered = Unanswered(Some((self, n)));
        let r = exchange(c).await;
        unanswered.0 = None;
        if let Err(e) = &r
            && (e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout())
        {
            self.forget(n);
        }
        r
    }
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(s) => Box::pin(async move {
                s.exchange(|mut c| Box::pin(async move { c.req_packed_command(cmd).await }))
                    .await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Self::Sentinel(s) => Box::pin(async move {
                s.exchange(|mut c| Box::pin(async move { c.req_packed_commands(cmd, offset, count).await }))
                    .await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
            Self::Sentinel(_) => 0,
        }
    }
}

/// The seed addresses of a `redis+cluster://` or `redis+sentinel://` URL (`rest`: what follows
/// the scheme), as `redis://` URLs, and the path after them.
fn split_hosts(rest: &str) -> (Vec<String>, String) {
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let urls = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{h}"))
        .collect();
    (urls, path.to_owned())
}

/// Opens the connection `url` names (see [`RedisConn`]) within `timeout`.
async fn open(url: &str, timeout: Duration) -> Result<RedisConn, String> {
    let fut = async {
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let (seeds, _) = split_hosts(rest);
            let client = redis::cluster::ClusterClientBuilder::new(seeds)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()
                .map_err(|e| e.to_string())?;
            let c = client.get_async_connection().await.map_err(|e| e.to_string())?;
            Ok(RedisConn::Cluster(c))
        } else if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (sentinels, master) = split_hosts(rest);
            if master.is_empty() {
                return Err("a redis+sentinel:// URL ends with /MASTER, the name Sentinel monitors".to_owned());
            }
            let client = redis::sentinel::SentinelClient::build(
                sentinels,
                master,
                None,
                redis::sentinel::SentinelServerType::Master,
            )
            .map_err(|e| e.to_string())?;
            let s = Arc::new(SentinelConn {
                client: tokio::sync::Mutex::new(client),
                conn: std::sync::Mutex::new((0, None)),
                timeout,
            });
            s.get().await.map_err(|e| e.to_string())?;
            Ok(RedisConn::Sentinel(s))
        } else {
            let client = redis::Client::open(url).map_err(|e| e.to_string())?;
            let manager_config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1);
            let c = ConnectionManager::new_with_config(client, manager_config)
                .await
                .map_err(|e| e.to_string())?;
            Ok(RedisConn::Single(c))
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// Another node, as it recorded itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Where peers and nodes reach it.
    pub advertise: SocketAddr,
    /// Its TLS key.
    pub key: ServerKey,
}

/// This node's handle on the cluster: its Redis connection and identity.
pub struct Cluster {
    node: String,
    advertise: SocketAddr,
    key: ServerKey,
    redis: RedisConn,
    /// The cluster's secret (re-read from Redis every refresh: a Redis that lost its data gets
    /// it back from the live nodes, or a new one they all adopt).
    secret: std::sync::RwLock<(hmac::Key, String)>,
    timeout: Duration,
    presence_ttl: Duration,
    up: AtomicBool,
    /// Woken when Redis answers again after it did not: presence is written again at once.
    recovered: tokio::sync::Notify,
    errors: AtomicU64,
    metrics: Metrics,
    /// The instance token in this node's entry: tells this process's entry from another
    /// process's with the same id.
    instance: String,
    /// The other live nodes' addresses, as last read (their visits are not counted against
    /// the per-source connection limit).
    node_ips: std::sync::RwLock<std::collections::HashSet<std::net::IpAddr>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .field("advertise", &self.advertise)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects to the cluster's Redis (an error when it does not answer within the
    /// deadline), takes the shared secret for node links (creating it if this is the first
    /// node), and records this node (an error when a live node has its id).
    pub async fn connect(
        config: &ClusterConfig,
        advertise: SocketAddr,
        key: ServerKey,
        metrics: Metrics,
    ) -> Result<Arc<Self>, ClusterError> {
        let url = config.redis.clone();
        if !(url.starts_with("redis+cluster://") || url.starts_with("redis+sentinel://")) {
            redis::Client::open(url.as_str()).map_err(|source| ClusterError::Url {
                url: url.clone(),
                source,
            })?;
        }
        let timeout = config.timeout();
        let unreachable = |why: String| ClusterError::Unreachable { url: url.clone(), why };
        let mut redis = open(&url, timeout).await.map_err(unreachable)?;
        // The first node makes the secret; every later one reads it.
        let mut fresh = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh)
            .map_err(|_| unreachable("the OS has no random source".into()))?;
        let _: bool = redis
            .set_nx(secret_key(), hex(&fresh))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let secret: String = redis.get(secret_key()).await.map_err(|e| unreachable(e.to_string()))?;
        let secret =
            unhex32(&secret).ok_or_else(|| unreachable("the cluster secret in Redis is not 64 hex digits".into()))?;
        let mut instance = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut instance)
            .map_err(|_| unreachable("the OS has no random source".into()))?;
        let cluster = Arc::new(Self {
            node: config.node_id.clone(),
            advertise,
            key,
            redis,
            secret: std::sync::RwLock::new((hmac::Key::new(hmac::HMAC_SHA256, &secret), hex(&secret))),
            timeout,
            presence_ttl: config.presence_ttl(),
            up: AtomicBool::new(true),
            recovered: tokio::sync::Notify::new(),
            errors: AtomicU64::new(0),
            metrics,
            instance: hex(&instance),
            node_ips: std::sync::RwLock::default(),
        });
        if !cluster.record_node().await.map_err(|e| unreachable(e.to_string()))? {
            return Err(ClusterError::NodeIdTaken(config.node_id.clone()));
        }
        cluster.metrics.set_redis_up(true);
        let _ = cluster.other_nodes().await;
        info!(node = %cluster.node, advertise = %cluster.advertise, "joined the cluster");
        Ok(cluster)
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether Redis answered the last command.
    pub fn redis_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Runs one Redis exchange under the deadline; records whether Redis answered.
    async fn run<T, F>(&self, what: &str, f: F) -> Result<T, RegisterError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let outcome = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        };
        let up = outcome.is_ok();
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                info!("the cluster's Redis answers again");
                self.recovered.notify_one();
            } else {
                warn!(error = ?outcome.as_ref().err(), "the cluster's Redis does not answer: registered peers and calls go on; new registrations and cross-node calls are refused until it is back");
            }
            self.metrics.set_redis_up(up);
        }
        outcome.map_err(|e| {
            self.errors.fetch_add(1, Ordering::Relaxed);
            self.metrics.redis_error();
            RegisterError::Unavailable(format!("{what}: {e}"))
        })
    }

    /// Records this node's address and key for `node_ttl`; `false` when another live process
    /// holds the id.
    async fn record_node(&self) -> redis::RedisResult<bool> {
        let value = format!("{} {} {}", self.instance, self.advertise, hex(&self.key.0));
        let ttl = self.presence_ttl.as_secs().max(1);
        let mut conn = self.redis.clone();
        let set: i64 = Script::new(CLAIM_NODE)
            .key(node_key(&self.node))
            .key(nodes_key())
            .arg(&self.instance)
            .arg(value)
            .arg(ttl)
            .arg(&self.node)
            .invoke_async(&mut conn)
            .await?;
        Ok(set == 1)
    }

    /// Another node's address and key, if it is live.
    pub async fn node_info(&self, id: &str) -> Result<Option<NodeInfo>, RegisterError> {
        let mut conn = self.redis.clone();
        let value: Option<String> = self.run("node lookup", conn.get(node_key(id))).await?;
        Ok(value.and_then(|v| {
            let mut parts = v.split(' ');
            let _instance = parts.next()?;
            let advertise = parts.next()?.parse().ok()?;
            let key = ServerKey(unhex32(parts.next()?)?);
            Some(NodeInfo { advertise, key })
        }))
    }

    /// The live nodes other than this one (for a draining node's `MoveTo`); their addresses
    /// are remembered for [`Cluster::is_node`].
    pub async fn other_nodes(&self) -> Result<Vec<SocketAddr>, RegisterError> {
        let mut conn = self.redis.clone();
        let ids: Vec<String> = self.run("node list", conn.smembers(nodes_key())).await?;
        let mut out = Vec::new();
        for id in ids.iter().filter(|id| **id != self.node) {
            match self.node_info(id).await? {
                Some(info) => out.push(info.advertise),
                None => {
                    // Gone (its entry expired): forget it.
                    let _: redis::RedisResult<i64> = conn.srem(nodes_key(), id).await;
                }
            }
        }
        out.sort();
        *self.node_ips.write().unwrap_or_else(|p| p.into_inner()) = out.iter().map(|a| a.ip()).collect();
        Ok(out)
    }

    /// Whether `ip` is another live node's (as last read): its connections are visits.
    pub fn is_node(&self, ip: std::net::IpAddr) -> bool {
        self.node_ips.read().unwrap_or_else(|p| p.into_inner()).contains(&ip)
    }

    /// Records that `name` is homed on this node (until the TTL lapses unrefreshed).
    pub async fn set_home(&self, name: &str) -> Result<(), RegisterError> {
        let mut conn = self.redis.clone();
        let ttl = self.presence_ttl.as_secs().max(1);
        self.run("presence", conn.set_ex::<_, _, ()>(home_key(name), &self.node, ttl))
            .await
    }

    /// Forgets that `name` is homed here (if another node has not taken it since).
    pub async fn clear_home(&self, name: &str) -> Result<(), RegisterError> {
        let mut conn = self.redis.clone();
        let script = Script::new(DELETE_IF);
        let mut invocation = script.key(home_key(name));
        invocation.arg(&self.node);
        self.run("presence", invocation.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// The node `name` is homed on, if it is online anywhere.
    pub async fn home(&self, name: &str) -> Result<Option<String>, RegisterError> {
        let mut conn = self.redis.clone();
        self.run("presence lookup", conn.get(home_key(name))).await
    }

    /// Records room `room` as on this node unless another node holds it; returns the node
    /// that holds it then (this one's id when it is now this node's). A holder that is no
    /// longer live loses it.
    pub async fn claim_room(&self, room: &str) -> Result<String, RegisterError> {
        let ttl = self.presence_ttl.as_secs().max(1);
        let claim = || async {
            let mut conn = self.redis.clone();
            let script = Script::new(CLAIM_ROOM);
            let mut invocation = script.key(room_key(room));
            invocation.arg(&self.node).arg(ttl);
            self.run("room record", invocation.invoke_async::<String>(&mut conn))
                .await
        };
        let holder = claim().await?;
        if holder != self.node && self.node_info(&holder).await?.is_none() {
            let mut conn = self.redis.clone();
            let script = Script::new(DELETE_IF);
            let mut invocation = script.key(room_key(room));
            invocation.arg(&holder);
            self.run("room record", invocation.invoke_async::<i64>(&mut conn))
                .await?;
            return claim().await;
        }
        Ok(holder)
    }

    /// Where a call's two `Resume`s meet (`proof`, sent by `me` naming `peer`): the node whose
    /// `Resume` came first — this one if none did yet (it is recorded for `ttl`).
    pub async fn claim_resume(
        &self,
        proof: &[u8; 32],
        me: &str,
        peer: &str,
        ttl: Duration,
    ) -> Result<String, RegisterError> {
        let mut conn = self.redis.clone();
        let script = Script::new(CLAIM_ROOM);
        let mut invocation = script.key(resume_key(proof, me, peer));
        invocation.arg(&self.node).arg(ttl.as_secs().max(1));
        self.run("resume record", invocation.invoke_async::<String>(&mut conn))
            .await
    }

    /// Makes this node where a call's `Resume`s meet (the node recorded before does not
    /// answer).
    pub async fn take_resume(
        &self,
        proof: &[u8; 32],
        me: &str,
        peer: &str,
        ttl: Duration,
    ) -> Result<(), RegisterError> {
        let mut conn = self.redis.clone();
        let key = resume_key(proof, me, peer);
        self.run(
            "resume record",
            conn.set_ex::<_, _, ()>(key, &self.node, ttl.as_secs().max(1)),
        )
        .await
    }

    /// The node room `room` is on, if any.
    pub async fn room_home(&self, room: &str) -> Result<Option<String>, RegisterError> {
        let mut conn = self.redis.clone();
        self.run("room lookup", conn.get(room_key(room))).await
    }

    /// Forgets room `room` if it is recorded as this node's.
    pub async fn release_room(&self, room: &str) -> Result<(), RegisterError> {
        let mut conn = self.redis.clone();
        let script = Script::new(DELETE_IF);
        let mut invocation = script.key(room_key(room));
        invocation.arg(&self.node);
        self.run("room record", invocation.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// Renews this node's entry, the presence of `names` (its registered peers) and the
    /// records of `rooms` (its rooms), writing them again if Redis lost them; run every third
    /// of the TTL.
    pub async fn refresh(&self, names: &[String], rooms: &[String]) -> Result<(), RegisterError> {
        // A Redis that restarted without its data gets the secret back from the live nodes
        // (the first to write wins; the others adopt what is there).
        let mut conn = self.redis.clone();
        let mine = self.secret.read().unwrap_or_else(|p| p.into_inner()).1.clone();
        self.run("cluster secret", conn.set_nx::<_, _, bool>(secret_key(), &mine))
            .await?;
        let stored: Option<String> = self.run("cluster secret", conn.get(secret_key())).await?;
        if let Some(bytes) = stored.as_deref().filter(|s| *s != mine).and_then(unhex32) {
            warn!("the cluster's secret in Redis changed (Redis lost its data?): adopting it");
            *self.secret.write().unwrap_or_else(|p| p.into_inner()) =
                (hmac::Key::new(hmac::HMAC_SHA256, &bytes), hex(&bytes));
        }
        let recorded = self.run("node record", self.record_node()).await?;
        if !recorded {
            warn!(node = %self.node, "another process took this node's id in the cluster");
        }
        self.other_nodes().await?;
        let ttl = self.presence_ttl.as_secs().max(1);
        let keys: Vec<String> = names
            .iter()
            .map(|n| home_key(n))
            .chain(rooms.iter().map(|r| room_key(r)))
            .collect();
        for chunk in keys.chunks(500) {
            let mut conn = self.redis.clone();
            let script = Script::new(RENEW_IF);
            let mut invocation = script.prepare_invoke();
            for k in chunk {
                invocation.key(k);
            }
            invocation.arg(&self.node).arg(ttl);
            self.run("presence refresh", invocation.invoke_async::<i64>(&mut conn))
                .await?;
        }
        Ok(())
    }

    /// Removes this node's entry (a clean stop).
    pub async fn leave(&self) {
        let mut conn = self.redis.clone();
        let script = Script::new(DELETE_IF);
        let value = format!("{} {} {}", self.instance, self.advertise, hex(&self.key.0));
        let mut invocation = script.key(node_key(&self.node));
        invocation.arg(value);
        let _ = self
            .run("node removal", invocation.invoke_async::<i64>(&mut conn))
            .await;
    }

    /// The proof a visit from node `from` to node `to` for peer `name` (key `fingerprint`)
    /// carries on a TLS session with exporter `binding`.
    pub fn visit_proof(
        &self,
        from: &str,
        to: &str,
        name: &str,
        fingerprint: &Fingerprint,
        binding: &[u8; 32],
    ) -> [u8; 32] {
        let key = self.secret.read().unwrap_or_else(|p| p.into_inner()).0.clone();
        let tag = hmac::sign(&key, &visit_message(from, to, name, fingerprint, binding));
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `proof` is a visit proof for this node (compared in constant time).
    pub fn check_visit(
        &self,
        from: &str,
        name: &str,
        fingerprint: &Fingerprint,
        binding: &[u8; 32],
        proof: &[u8; 32],
    ) -> bool {
        let msg = visit_message(from, &self.node, name, fingerprint, binding);
        let key = self.secret.read().unwrap_or_else(|p| p.into_inner()).0.clone();
        hmac::verify(&key, &msg, proof).is_ok()
    }

    /// How long a command may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How often presence is renewed.
    pub fn refresh_interval(&self) -> Duration {
        self.presence_ttl / 3
    }

    /// Completes when Redis answers again after it did not.
    pub async fn recovered(&self) {
        self.recovered.notified().await;
    }
}

/// What a visit proof signs: each part with its length, so no two tuples sign alike.
fn visit_message(from: &str, to: &str, name: &str, fingerprint: &Fingerprint, binding: &[u8; 32]) -> Vec<u8> {
    let mut msg = b"natcall visit v1".to_vec();
    for part in [from.as_bytes(), to.as_bytes(), name.as_bytes(), &fingerprint.0, binding] {
        msg.extend_from_slice(&(part.len() as u32).to_be_bytes());
        msg.extend_from_slice(part);
    }
    msg
}

/// Name bindings in the cluster's Redis: [`NameBackend`] for a cluster node.
#[derive(Debug)]
pub struct RedisNames {
    cluster: Arc<Cluster>,
    max: usize,
    max_per_key: usize,
    expiry_secs: u64,
    held: AtomicU64,
}

impl RedisNames {
    /// The bindings of `cluster`, under the given quotas and expiry.
    pub fn new(cluster: Arc<Cluster>, max: usize, max_per_key: usize, expiry_secs: u64) -> Self {
        Self {
            cluster,
            max,
            max_per_key,
            expiry_secs: expiry_secs.max(1),
            held: AtomicU64::new(0),
        }
    }

    async fn claim_once(
        &self,
        name: &str,
        fingerprint: Fingerprint,
        now: u64,
        bind_new: bool,
    ) -> Result<String, RegisterError> {
        let mut conn = self.cluster.redis.clone();
        let script = Script::new(CLAIM);
        let mut invocation = script.key(name_key(name));
        invocation
            .key(names_key())
            .key(key_key(&fingerprint))
            .arg(hex(&fingerprint.0))
            .arg(now)
            .arg(self.expiry_secs)
            .arg(self.max_per_key)
            .arg(self.max)
            .arg(name)
            .arg(if bind_new { "1" } else { "0" });
        let (status, held): (String, u64) = self
            .cluster
            .run("name binding", invocation.invoke_async(&mut conn))
            .await?;
        self.held.store(held, Ordering::Relaxed);
        Ok(status)
    }
}

impl NameBackend for RedisNames {
    fn claim<'a>(
        &'a self,
        name: &'a str,
        fingerprint: Fingerprint,
        now: u64,
        allow_new: AllowNew<'a>,
    ) -> BoxFuture<'a, Result<Claimed, RegisterError>> {
        Box::pin(async move {
            let mut status = self.claim_once(name, fingerprint, now, false).await?;
            if status == "free" {
                // New: the source's hourly quota decides, then the binding is made (unless
                // another key took the name meanwhile).
                allow_new()?;
                status = self.claim_once(name, fingerprint, now, true).await?;
            }
            match status.as_str() {
                "held" => Ok(Claimed::Held),
                "new" => Ok(Claimed::New),
                "taken" => Err(RegisterError::NameTaken(name.to_owned())),
                "key_quota" => Err(RegisterError::KeyQuota(self.max_per_key)),
                "full" => Err(RegisterError::Full(self.max)),
                other => Err(RegisterError::Unavailable(format!(
                    "unexpected answer {other:?} from the name script"
                ))),
            }
        })
    }

    fn release<'a>(&'a self, name: &'a str, fingerprint: Fingerprint) -> BoxFuture<'a, Result<bool, RegisterError>> {
        Box::pin(async move {
            let mut conn = self.cluster.redis.clone();
            let script = Script::new(RELEASE);
            let mut invocation = script.key(name_key(name));
            invocation
                .key(names_key())
                .key(key_key(&fingerprint))
                .arg(hex(&fingerprint.0))
                .arg(name);
            let freed: i64 = self
                .cluster
                .run("name release", invocation.invoke_async(&mut conn))
                .await?;
            Ok(freed == 1)
        })
    }

    fn owner<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Fingerprint>, RegisterError>> {
        Box::pin(async move {
            let mut conn = self.cluster.redis.clone();
            let fp: Option<String> = self.cluster.run("name lookup", conn.get(name_key(name))).await?;
            Ok(fp.and_then(|f| unhex32(&f)).map(Fingerprint))
        })
    }

    fn counts(&self) -> (usize, u64) {
        // Expiry is Redis's (key TTLs): this node does not see it happen.
        (self.held.load(Ordering::Relaxed) as usize, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_reads_back() {
        let b = [0x01, 0xab, 0xff, 0x00].repeat(8);
        let mut a = [0u8; 32];
        a.copy_from_slice(&b);
        assert_eq!(unhex32(&hex(&a)), Some(a));
        assert_eq!(unhex32("zz"), None);
        assert_eq!(unhex32(&"g".repeat(64)), None);
    }

    #[test]
    fn both_resumes_of_a_call_meet_at_one_key() {
        let p = [9; 32];
        assert_eq!(resume_key(&p, "alice", "bob"), resume_key(&p, "bob", "alice"));
        assert_ne!(resume_key(&p, "alice", "bob"), resume_key(&[8; 32], "alice", "bob"));
        assert_ne!(resume_key(&p, "alice", "bob"), resume_key(&p, "alice", "carol"));
    }

    #[test]
    fn every_key_is_in_one_cluster_slot() {
        let fp = Fingerprint([7; 32]);
        for k in [
            name_key("a"),
            names_key(),
            key_key(&fp),
            home_key("a"),
            node_key("n1"),
            nodes_key(),
            secret_key(),
        ] {
            assert!(k.starts_with("{nc}:"), "{k}");
        }
    }
}
