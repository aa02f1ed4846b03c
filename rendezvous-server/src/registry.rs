//! Who is online: registered peers by name, their STUN tokens, and name → key bindings.
//!
//! A name is bound to the first key (certificate fingerprint) that registers it and stays bound
//! until its owner releases it or does not register it for `limits.name_expiry_days`
//! ([`store::NameStore`], durable in the state directory when one is configured). A key holds
//! at most `limits.max_names_per_key` names; a source binds at most
//! `limits.new_names_per_ip_per_hour` new ones and registers at most
//! `limits.registrations_per_ip_per_min` times ([`crate::limits`]). A peer that registers a
//! name it already holds from a new connection replaces the old registration.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::config::{Limits, StateDir};
use crate::limits::{SourceLimits, SourceRefusal};
use crate::metrics::{Metrics, Refusal};
use crate::outbox::Outbox;
use backend::{Embedded, NameBackend};
use store::{NameStore, StoreLimits};

pub mod backend;
pub mod store;
use natcall_proto::control::{Fingerprint, Mapping};
use natcall_proto::frame::ErrorCode;
use natcall_proto::stun::TokenCredentials;
use ring::rand::{SecureRandom, SystemRandom};

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// Another key holds the name.
    #[error("the name {0:?} is registered to another key")]
    NameTaken(String),
    /// The server holds as many names as it is configured to.
    #[error("the server holds its maximum of {0} names")]
    Full(usize),
    /// The key holds as many names as one key may.
    #[error("this key already holds {0} names, the most one key may; release one first")]
    KeyQuota(usize),
    /// The source bound as many new names this hour as it may.
    #[error("too many new names from your address: at most {0} an hour; try later")]
    SourceQuota(u32),
    /// The source registered as often this minute as it may.
    #[error("too many registrations from your address: at most {0} a minute; try later")]
    RegistrationRate(u32),
    /// The server tracks as many sources as it may.
    #[error("server full: too many addresses registering right now; try later")]
    TooManySources,
    /// The state directory could not be written.
    #[error("cannot record the name binding: {0}")]
    Io(#[from] io::Error),
    /// The cluster's shared registry (Redis) did not answer.
    #[error("the cluster's registry is unreachable ({0}); try later")]
    Unavailable(String),
}

/// A registered, online peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The connection that registered it.
    pub conn_id: u64,
    /// Its key.
    pub fingerprint: Fingerprint,
    /// Private addresses it reported.
    pub lan_addrs: Vec<SocketAddr>,
    /// Source address of its TCP connection as the server sees it.
    pub tcp_addr: SocketAddr,
    /// Source address of its last authenticated STUN binding: its public UDP address.
    pub public_udp: Option<SocketAddr>,
    /// How its NAT maps ports, as it last reported (`NatMapping`).
    pub mapping: Mapping,
    /// The address its router mapped for it, as it last reported (`NatMapping`).
    pub port_mapped: Option<SocketAddr>,
    /// Last RTT measured by ping/pong on its TCP connection.
    pub rtt: Option<Duration>,
    /// The buffer towards its connection.
    pub outbox: Arc<Outbox>,
    /// Registered by another node of the cluster speaking for it (a visit, see
    /// `crate::cluster::visit`): its home is elsewhere.
    pub visitor: bool,
    token: TokenCredentials,
    /// The sequence number of the last token binding accepted (the first 8 bytes of its
    /// transaction id, big-endian): only a newer one may move `public_udp`.
    stun_seq: u64,
}

/// What a token binding did to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// A fresh binding: `public_udp` of this peer is now its source.
    Recorded(String),
    /// A retransmission of the last accepted binding, from the same source: answered again,
    /// nothing changes.
    Repeated(String),
    /// A transaction id not newer than the last accepted (from elsewhere): a replay, dropped.
    Replayed(String),
}

#[derive(Debug, Default)]
struct Online {
    peers: HashMap<String, PeerInfo>,
    /// token username → peer name
    tokens: HashMap<String, String>,
}

/// The registry of online peers.
#[derive(Debug)]
pub struct Registry {
    online: Mutex<Online>,
    names: Arc<dyn NameBackend>,
    sources: Arc<SourceLimits>,
    limits: Limits,
    metrics: Metrics,
    rng: SystemRandom,
}

impl RegisterError {
    /// The error code a client is told.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NameTaken(_) => ErrorCode::NameTaken,
            Self::Full(_) | Self::TooManySources => ErrorCode::ServerFull,
            Self::KeyQuota(_) | Self::SourceQuota(_) => ErrorCode::QuotaExceeded,
            Self::RegistrationRate(_) => ErrorCode::RateLimited,
            Self::Io(_) | Self::Unavailable(_) => ErrorCode::Internal,
        }
    }
}

impl From<SourceRefusal> for RegisterError {
    fn from(r: SourceRefusal) -> Self {
        match r {
            SourceRefusal::Registrations(n) => Self::RegistrationRate(n),
            SourceRefusal::NewNames(n) => Self::SourceQuota(n),
            SourceRefusal::Untracked => Self::TooManySources,
        }
    }
}

/// Wall-clock time in Unix seconds (name bindings outlive the process, so not `Instant`).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a registration produced.
#[derive(Debug)]
pub struct Registration {
    /// The STUN token for the peer.
    pub token: TokenCredentials,
    /// The registration it replaced (same name and key, older connection).
    pub replaced: Option<PeerInfo>,
}

/// `bytes` random bytes from `rng`, as lowercase hex (tokens, passwords).
pub(crate) fn random_hex(rng: &SystemRandom, bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    // SystemRandom only fails when the OS has no randomness at all.
    rng.fill(&mut b).expect("the OS random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated in a way later
    // readers could trip over (every update is a single insert/remove), so poison is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// A registry whose name bindings are kept in `state` (loaded now) or in memory, with the
    /// name and per-source limits of `limits`.
    pub fn new(state: Option<&StateDir>, limits: &Limits, metrics: Metrics) -> io::Result<Self> {
        let store_limits = StoreLimits {
            max: limits.max_names,
            max_per_key: limits.max_names_per_key,
            expiry_secs: limits.name_expiry().as_secs(),
        };
        let names = NameStore::open(state, store_limits, unix_now())?;
        Ok(Self::with_backend(Arc::new(Embedded::new(names)), limits, metrics))
    }

    /// A registry whose name bindings are kept by `names` (a cluster's shared registry).
    pub fn with_backend(names: Arc<dyn NameBackend>, limits: &Limits, metrics: Metrics) -> Self {
        let (held, expired) = names.counts();
        metrics.set_names(held, expired);
        Self {
            online: Mutex::default(),
            names,
            sources: SourceLimits::new(limits, metrics.clone()),
            limits: limits.clone(),
            metrics,
            rng: SystemRandom::new(),
        }
    }

    /// The per-source limits (connections, registrations, new names).
    pub fn sources(&self) -> &Arc<SourceLimits> {
        &self.sources
    }

    /// Registers `name` for `fingerprint` on connection `conn_id`.
    pub async fn register(
        &self,
        name: &str,
        fingerprint: Fingerprint,
        lan_addrs: Vec<SocketAddr>,
        tcp_addr: SocketAddr,
        conn_id: u64,
        outbox: Arc<Outbox>,
    ) -> Result<Registration, RegisterError> {
        let now = tokio::time::Instant::now().into_std();
        let (ip, l) = (tcp_addr.ip(), &self.limits);
        self.sources.registration(ip, now, l.registrations_per_ip_per_min)?;
        {
            let sources = &self.sources;
            let per_hour = l.new_names_per_ip_per_hour;
            let allow_new = move || Ok(sources.new_name(ip, now, per_hour)?);
            let claimed = self.names.claim(name, fingerprint, unix_now(), &allow_new).await;
            let (held, expired) = self.names.counts();
            self.metrics.set_names(held, expired);
            match &claimed {
                Err(RegisterError::KeyQuota(_)) => self.metrics.refused(Refusal::KeyQuota),
                Err(RegisterError::Full(_)) => self.metrics.refused(Refusal::NamesFull),
                _ => {}
            }
            claimed?;
        }
        let token = self.fresh_token();
        let info = PeerInfo {
            conn_id,
            fingerprint,
            lan_addrs,
            tcp_addr,
            public_udp: None,
            mapping: Mapping::Unknown,
            port_mapped: None,
            stun_seq: 0,
            rtt: None,
            outbox,
            visitor: false,
            token: token.clone(),
        };
        Ok(self.insert(name, info))
    }

    /// Registers `name` (key `fingerprint`, `candidates`, `rtt` from its home) for the node
    /// that speaks for it on connection `conn_id` (a visit): no name is claimed (its home did
    /// that), and it is not this node's to announce.
    #[allow(clippy::too_many_arguments)]
    pub fn visit(
        &self,
        name: &str,
        fingerprint: Fingerprint,
        candidates: natcall_proto::control::Candidates,
        rtt: Option<Duration>,
        tcp_addr: SocketAddr,
        conn_id: u64,
        outbox: Arc<Outbox>,
    ) -> Registration {
        let token = self.fresh_token();
        let info = PeerInfo {
            conn_id,
            fingerprint,
            lan_addrs: candidates.lan,
            tcp_addr,
            public_udp: candidates.public,
            mapping: candidates.mapping,
            port_mapped: candidates.port_mapped,
            stun_seq: 0,
            rtt,
            outbox,
            visitor: true,
            token,
        };
        self.insert(name, info)
    }

    /// A new STUN token: a random username and password.
    fn fresh_token(&self) -> TokenCredentials {
        TokenCredentials {
            username: format!("nc1:{}", random_hex(&self.rng, 8)),
            password: random_hex(&self.rng, 16),
        }
    }

    fn insert(&self, name: &str, info: PeerInfo) -> Registration {
        let token = info.token.clone();
        let mut online = lock(&self.online);
        online.tokens.insert(token.username.clone(), name.to_owned());
        let replaced = online.peers.insert(name.to_owned(), info);
        if let Some(old) = &replaced {
            online.tokens.remove(&old.token.username);
        }
        Registration { token, replaced }
    }

    /// Removes `name` if connection `conn_id` still holds it; returns whether it did.
    pub fn unregister(&self, name: &str, conn_id: u64) -> bool {
        let mut online = lock(&self.online);
        if online.peers.get(name).is_some_and(|p| p.conn_id == conn_id) {
            if let Some(p) = online.peers.remove(name) {
                online.tokens.remove(&p.token.username);
                return true;
            }
        }
        false
    }

    /// The names registered here for their home (not visitors).
    pub fn homed_names(&self) -> Vec<String> {
        lock(&self.online)
            .peers
            .iter()
            .filter(|(_, p)| !p.visitor)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Frees `name` if connection `conn_id` registered it: the binding is gone (durably) and
    /// the peer is offline. Returns whether it was freed.
    pub async fn release(&self, name: &str, conn_id: u64) -> Result<bool, RegisterError> {
        let Some(peer) = self.peer(name).filter(|p| p.conn_id == conn_id) else {
            return Ok(false);
        };
        let freed = self.names.release(name, peer.fingerprint).await?;
        let (held, expired) = self.names.counts();
        self.metrics.set_names(held, expired);
        self.unregister(name, conn_id);
        Ok(freed)
    }

    /// The key `name` is bound to, if any (expired or not).
    pub async fn owner(&self, name: &str) -> Result<Option<Fingerprint>, RegisterError> {
        self.names.owner(name).await
    }

    /// The online peer called `name`.
    pub fn peer(&self, name: &str) -> Option<PeerInfo> {
        lock(&self.online).peers.get(name).cloned()
    }

    /// The password of a STUN token.
    pub fn token_password(&self, username: &str) -> Option<String> {
        let online = lock(&self.online);
        let name = online.tokens.get(username)?;
        online.peers.get(name).map(|p| p.token.password.clone())
    }

    /// Records `addr` as the public UDP address of the peer holding token `username`, if the
    /// binding's transaction id `tid` is newer than the last one accepted (a captured binding
    /// replayed from another address moves nothing).
    pub fn record_public_udp(&self, username: &str, addr: SocketAddr, tid: &[u8; 12]) -> Option<Binding> {
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&tid[..8]);
        let seq = u64::from_be_bytes(seq);
        let mut online = lock(&self.online);
        let name = online.tokens.get(username)?.clone();
        let peer = online.peers.get_mut(&name)?;
        Some(if seq > peer.stun_seq {
            peer.stun_seq = seq;
            peer.public_udp = Some(addr);
            Binding::Recorded(name)
        } else if seq == peer.stun_seq && peer.public_udp == Some(addr) {
            Binding::Repeated(name)
        } else {
            Binding::Replayed(name)
        })
    }

    /// Records how `name`'s NAT maps ports, as its connection `conn_id` reported.
    pub fn record_mapping(&self, name: &str, conn_id: u64, mapping: Mapping, port_mapped: Option<SocketAddr>) {
        if let Some(p) = lock(&self.online).peers.get_mut(name).filter(|p| p.conn_id == conn_id) {
            p.mapping = mapping;
            p.port_mapped = port_mapped;
        }
    }

    /// Records the RTT measured on connection `conn_id` of `name`.
    pub fn record_rtt(&self, name: &str, conn_id: u64, rtt: Duration) {
        if let Some(p) = lock(&self.online).peers.get_mut(name).filter(|p| p.conn_id == conn_id) {
            p.rtt = Some(rtt);
        }
    }

    /// Number of online peers.
    pub fn online_count(&self) -> usize {
        lock(&self.online).peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(state: Option<&StateDir>, max_names: usize) -> io::Result<Registry> {
        let limits = Limits {
            max_names,
            ..Limits::default()
        };
        Registry::new(state, &limits, Metrics::new())
    }

    fn tx() -> Arc<Outbox> {
        Arc::new(Outbox::new(
            crate::config::RelayConfig::default(),
            crate::metrics::Metrics::new(),
            8,
        ))
    }

    #[tokio::test]
    async fn a_name_belongs_to_its_first_key_and_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path());
        let addr: SocketAddr = "192.0.2.1:1000".parse().expect("addr");
        let r = registry(Some(&state), 10).expect("opens");
        r.register("alice", Fingerprint([1; 32]), vec![], addr, 1, tx())
            .await
            .expect("first key");
        assert!(matches!(
            r.register("alice", Fingerprint([2; 32]), vec![], addr, 2, tx()).await,
            Err(RegisterError::NameTaken(_))
        ));
        drop(r);
        let r = registry(Some(&state), 10).expect("reopens");
        assert_eq!(r.online_count(), 0);
        assert!(matches!(
            r.register("alice", Fingerprint([2; 32]), vec![], addr, 3, tx()).await,
            Err(RegisterError::NameTaken(_))
        ));
        r.register("alice", Fingerprint([1; 32]), vec![], addr, 4, tx())
            .await
            .expect("owner again");
    }

    #[tokio::test]
    async fn re_registering_replaces_the_old_connection_and_its_token() {
        let addr: SocketAddr = "192.0.2.1:1000".parse().expect("addr");
        let r = registry(None, 10).expect("opens");
        let first = r
            .register("bob", Fingerprint([1; 32]), vec![], addr, 1, tx())
            .await
            .expect("registers");
        let second = r
            .register("bob", Fingerprint([1; 32]), vec![], addr, 2, tx())
            .await
            .expect("registers");
        assert_eq!(second.replaced.map(|p| p.conn_id), Some(1));
        assert_eq!(r.token_password(&first.token.username), None);
        assert_eq!(
            r.token_password(&second.token.username),
            Some(second.token.password.clone())
        );
        r.unregister("bob", 1); // the old connection closing must not remove the new one
        assert_eq!(r.peer("bob").map(|p| p.conn_id), Some(2));
        r.unregister("bob", 2);
        assert!(r.peer("bob").is_none());
        assert_eq!(r.token_password(&second.token.username), None);
    }

    #[tokio::test]
    async fn the_name_limit_holds() {
        let addr: SocketAddr = "192.0.2.1:1000".parse().expect("addr");
        let r = registry(None, 1).expect("opens");
        r.register("a", Fingerprint([1; 32]), vec![], addr, 1, tx())
            .await
            .expect("registers");
        assert!(matches!(
            r.register("b", Fingerprint([1; 32]), vec![], addr, 2, tx()).await,
            Err(RegisterError::Full(1))
        ));
    }
}
