//! [`Endpoint`]: one registered peer — its UDP socket, its control connection to the server,
//! its QUIC endpoint, its [`PeerCore`](crate::core::PeerCore) — and the tasks that move bytes
//! and time for the core.
//!
//! Tasks, each started by [`Endpoint::bind`]:
//! - **driver** ([`crate::driver::drive`]): the core's timers and outputs;
//! - **control reader and writer** ([`crate::control`]), one pair per connection;
//! - **supervisor**: when the connection to the server ends, registers again (200 ms, doubling
//!   to 1 s, with jitter; after a `GoingAway`, from when the server asked), and the core
//!   re-announces the calls in progress (`Resume`), so calls outlive the server — unless
//!   another session of this peer replaced this one (`Replaced`): then it never registers
//!   again, and the calls end;
//! - **QUIC acceptor**: an incoming QUIC connection is accepted only for a started call this
//!   side accepted, and parked in that call until it takes it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use natcall_proto::control::{ClientMsg, Decline, Fingerprint, Policy};

use crate::server_trust::ServerTrust;
use natcall_proto::frame::ErrorCode;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::Error;
use crate::call::{self, Call};
use crate::contacts::{self, Contacts};
use crate::control::{self, LaneReceivers};
use crate::core::{CallId, CoreConfig, FakeAddr, Offer, PeerCore, Role};
use crate::driver::{self, Shared};
use crate::identity::Identity;
use crate::room::Room;
use crate::socket::MuxSocket;
use crate::tls;

/// First wait before registering again after losing the server; doubles up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
/// Longest wait between two registration attempts (a relayed call resumes within about this
/// much of the server coming back).
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// How long closing waits for the calls' QUIC closes before it sends their held hang-ups.
const CLOSE_HOLD: Duration = Duration::from_millis(100);
/// How long [`Endpoint::bind`] waits for the first token binding's answer (its retransmits
/// give up after 1.75 s).
const PROBE_WAIT: Duration = Duration::from_secs(3);
/// How long `bind` waits, from its start, for the router's port mapping: a NAT-PMP or PCP
/// router answers within a LAN round trip or two, so a call placed right away can offer the
/// mapped address; a slower mapping (UPnP, or none) is not waited for (the server learns it
/// when it comes, for later calls).
const PORTMAP_WAIT: Duration = Duration::from_millis(300);

/// How to set up an [`Endpoint`].
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The rendezvous server (TCP and UDP on the same port).
    pub server: SocketAddr,
    /// This peer's name.
    pub name: String,
    /// This peer's identity.
    pub identity: Identity,
    /// Local UDP address to bind (default: any address of the server's family, port 0 —
    /// `0.0.0.0:0`, or `[::]:0` for a server on IPv6).
    pub bind: SocketAddr,
    /// Traversal timings (checks, budget, liveness).
    pub traversal: natcall_traversal::Config,
    /// The keys this peer met before (default none: nothing is remembered). With contacts, a
    /// call where the server vouches for another key than the one met before is refused with
    /// [`Error::KeyChanged`], and a first contact is stored once its call connects.
    pub contacts: Option<Contacts>,
    /// How the server's TLS key is checked (default: trusted on first use, for this endpoint's
    /// life).
    pub server_trust: ServerTrust,
    /// Ask the router to map the UDP socket's port (UPnP-IGD, NAT-PMP, PCP; default on): the
    /// mapped address becomes a candidate peers check, renewed while the endpoint lives and
    /// released when it closes. Skipped for a server on loopback (no router between) and on
    /// IPv6 (these protocols map IPv4).
    pub portmap: bool,
    /// Other servers of the same cluster (sharing names through Redis), each with how its key
    /// is checked: tried in order when `server` cannot be reached at start, and when the server
    /// registered with is lost (the peer then registers with the next one, keeping its name;
    /// its relayed calls resume there). Default none.
    pub fallback_servers: Vec<(SocketAddr, ServerTrust)>,
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
            bind: match server {
                SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
                SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
            },
            traversal,
            contacts: None,
            server_trust: ServerTrust::first_use(server.to_string()),
            portmap: true,
            fallback_servers: Vec::new(),
        }
    }
}

/// Whether the endpoint is registered with its server.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerState {
    /// Registered.
    Up,
    /// The connection was lost (why); the endpoint is registering again. Calls go on: direct
    /// ones untouched, relayed ones resume when the server is back.
    Reconnecting(String),
    /// No new registration will be tried: the server refused to register this peer again (its
    /// name went to another key), another session of this peer (same name and key) replaced
    /// this one ([`Error::Replaced`]), or the endpoint closed.
    Gone(String),
}

/// An offer of a call to this peer: accept it ([`IncomingCall::accept`],
/// [`IncomingCall::accept_with`]), or decline it ([`IncomingCall::reject`],
/// [`IncomingCall::busy`]); the caller hears a decline at once. An offer dropped unanswered is
/// declined.
#[derive(Debug)]
pub struct IncomingCall {
    endpoint: Endpoint,
    offer: Offer,
    /// The server was answered (the offer is not declined on drop).
    answered: bool,
}

impl IncomingCall {
    /// Who calls.
    pub fn caller(&self) -> &str {
        &self.offer.caller
    }

    /// The policy the caller asked for.
    pub fn policy(&self) -> Policy {
        self.offer.policy
    }

    /// The caller's key, as the server vouches for it.
    pub fn fingerprint(&self) -> Fingerprint {
        self.offer.fingerprint
    }

    /// Accepts and connects under the caller's policy; returns when the call is connected.
    /// The same as [`IncomingCall::accept_with`] with [`Policy::Auto`].
    pub async fn accept(self) -> Result<Call, Error> {
        self.accept_with(Policy::Auto).await
    }

    /// Accepts under this side's `policy` and connects; returns when the call is connected.
    /// The call runs under the stricter of the caller's policy and `policy`
    /// ([`Policy::combine`]: `auto` yields to the other, equal ones agree). When the two cannot
    /// both hold (`relay-only` against `direct-only`, say), the call is declined and both sides
    /// get [`Error::NoPath`]: the caller's says this side allows only `policy`. With contacts,
    /// a caller whose key changed is declined instead ([`Error::KeyChanged`]).
    pub async fn accept_with(mut self, policy: Policy) -> Result<Call, Error> {
        let inner = self.endpoint.inner.clone();
        let (caller, asked) = (self.offer.caller.clone(), self.offer.policy);
        if asked.combine(policy).is_none() {
            self.answer(Decline::Policy { allowed: policy });
            return Err(Error::NoPath(format!(
                "{caller} asked for a {asked} call, and this side allows only {policy}"
            )));
        }
        if let Err(e) = contacts::screen(inner.contacts.as_ref(), &caller, self.offer.fingerprint).await {
            self.answer(Decline::Declined);
            return Err(e);
        }
        let id = inner.shared.with(|core, now| core.accept(now, &self.offer, policy));
        self.answered = true;
        call::establish(inner, id, Role::Callee).await
    }

    /// Declines the call: the caller's [`Endpoint::call`] fails at once with [`Error::Ended`]
    /// ("NAME declined").
    pub fn reject(mut self) -> Result<(), Error> {
        self.answer(Decline::Declined);
        Ok(())
    }

    /// Declines the call as busy (this side is in another call): the caller's
    /// [`Endpoint::call`] fails at once with [`Error::Busy`].
    pub fn busy(mut self) {
        self.answer(Decline::Busy);
    }

    /// Declines the offer for `why`, once.
    fn answer(&mut self, why: Decline) {
        if !std::mem::replace(&mut self.answered, true) {
            self.endpoint
                .inner
                .shared
                .with(|core, _| core.decline(&self.offer, why));
        }
    }
}

impl Drop for IncomingCall {
    fn drop(&mut self) {
        // Unanswered (dropped, or its accept cancelled before it answered): decline rather
        // than leave the caller ringing until the ring timeout.
        self.answer(Decline::Declined);
    }
}

/// What an endpoint and its calls share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) identity: Identity,
    pub(crate) shared: Arc<Shared>,
    pub(crate) quic: quinn::Endpoint,
    /// Budget of a call's setup beyond the checks.
    pub(crate) traversal_budget: Duration,
    /// The keys met before, checked on every call.
    pub(crate) contacts: Option<Contacts>,
    offers: tokio::sync::Mutex<mpsc::Receiver<Offer>>,
    /// The rooms this endpoint asked for, and where their news goes.
    pub(crate) rooms: crate::room::Router,
    /// The state the supervisor last published.
    state: tokio::sync::watch::Sender<ServerState>,
    /// The router port mapping of the UDP socket, when asked for.
    portmap: Option<portmapper::Client>,
    /// The server registered with (the last one, while reconnecting).
    server: std::sync::Mutex<SocketAddr>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(p) = &self.portmap {
            p.deactivate(); // releases the router's mapping
        }
        self.shared.close();
    }
}

/// Asks the router for a mapping of `port` (UPnP-IGD, NAT-PMP, PCP) and keeps the core told of
/// the mapped address as it comes, changes and goes.
fn start_portmap(shared: &Arc<Shared>, port: u16) -> Option<portmapper::Client> {
    let port = std::num::NonZeroU16::new(port)?;
    let client = portmapper::Client::new(portmapper::Config::default());
    client.update_local_port(port);
    client.procure_mapping();
    let mut watch = client.watch_external_address();
    let shared = Arc::downgrade(shared);
    tokio::spawn(async move {
        while watch.changed().await.is_ok() {
            let mapped = (*watch.borrow()).map(SocketAddr::V4);
            let Some(shared) = shared.upgrade() else { return };
            info!(?mapped, "router port mapping");
            shared.with(|core, _| core.set_port_mapped(mapped));
        }
    });
    Some(client)
}

/// A peer registered with a rendezvous server, able to place and receive calls.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub(crate) inner: Arc<Inner>,
}

/// This host's addresses other peers may reach it at, with `port`, in the families of the UDP
/// socket: private IPv4 addresses (for a socket that speaks IPv4); unique-local and global IPv6
/// addresses (for one that speaks IPv6; never link-local: they mean nothing across hosts).
/// Loopback is included only when the server itself is on loopback (a single-host setup).
fn lan_addresses(port: u16, server: SocketAddr, families: Families) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.is_loopback())
        .filter_map(|i| match i.ip() {
            IpAddr::V4(v4) if families.v4 && (v4.is_private() || v4.is_link_local() || is_shared(v4)) => {
                Some(SocketAddr::new(IpAddr::V4(v4), port))
            }
            IpAddr::V6(v6) if families.v6 && reachable_v6(v6) => Some(SocketAddr::new(IpAddr::V6(v6), port)),
            _ => None,
        })
        .collect();
    // Private IPv4 first: many temporary IPv6 addresses must not crowd it out of the limit.
    out.sort_by_key(|a| a.is_ipv6());
    out.truncate(natcall_proto::control::MAX_LAN_ADDRS);
    if out.is_empty() && server.ip().is_loopback() {
        out.push(SocketAddr::new(server.ip(), port));
    }
    out
}

/// An IPv6 address another host may reach: unique-local (fc00::/7) or global unicast
/// (2000::/3); not link-local, loopback or multicast. (Documentation space, 2001:db8::/32, counts
/// as global: it is what labs use, and an address nobody routes only costs a few checks.)
fn reachable_v6(ip: std::net::Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    let unique_local = first & 0xfe00 == 0xfc00;
    let global = first & 0xe000 == 0x2000;
    unique_local || global
}

/// The address families the peer's UDP socket speaks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Families {
    pub(crate) v4: bool,
    pub(crate) v6: bool,
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

/// Binds the peer's one UDP socket: for the default address of a server on IPv4 (`0.0.0.0:0`,
/// the server not on loopback), `[::]` dual-stack where the host has IPv6, so the socket also
/// reaches peers' global IPv6 addresses (IPv4 addresses then travel as `::ffff:a.b.c.d` on the
/// socket, canonical everywhere else: [`Shared::send_udp`] and the receive paths convert);
/// also `[::]` dual-stack for the default address when the servers to fail over to are of both
/// families (a dual-stack name: the home may be lost to a server of the other family);
/// otherwise `addr` as given (a server on IPv6: IPv6 only).
fn bind_socket(addr: SocketAddr, server: SocketAddr, mixed: bool) -> Result<(UdpSocket, Families), Error> {
    let default_v4 = addr == SocketAddr::from(([0, 0, 0, 0], 0));
    let default_v6 = addr == SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    let default = match server {
        SocketAddr::V4(_) => default_v4,
        SocketAddr::V6(_) => default_v6,
    };
    if (default_v4 && server.is_ipv4() && !server.ip().is_loopback()) || (default && mixed) {
        let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
        if let Ok(s) = bind_udp(any6, false) {
            return Ok((s, Families { v4: true, v6: true }));
        }
    }
    let families = Families {
        v4: addr.is_ipv4(),
        v6: addr.is_ipv6(),
    };
    Ok((bind_udp(addr, true)?, families))
}

/// Binds a UDP socket with large buffers; an IPv6 one `v6_only` or dual-stack.
fn bind_udp(addr: SocketAddr, v6_only: bool) -> Result<UdpSocket, Error> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    if addr.is_ipv6() {
        // IPv6 only for a server on IPv6 (IPv4 peers are reached through the relay); dual-stack
        // when asked (see `bind_socket`).
        socket.set_only_v6(v6_only)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(UdpSocket::from_std(socket.into())?)
}

/// A seed from the OS's random source (zeros without one: still a working, if predictable, seed).
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_be_bytes(b)
}

impl Endpoint {
    /// Binds the UDP socket, registers with the server, learns the public address, and starts
    /// the endpoint's tasks.
    pub async fn bind(config: EndpointConfig) -> Result<Self, Error> {
        let mixed = config
            .fallback_servers
            .iter()
            .any(|(a, _)| a.is_ipv4() != config.server.is_ipv4());
        let (udp, families) = bind_socket(config.bind, config.server, mixed)?;
        let udp = Arc::new(udp);
        let port = udp.local_addr()?.port();
        let mut others = Vec::with_capacity(config.fallback_servers.len());
        for (addr, trust) in &config.fallback_servers {
            others.push((*addr, control::Tls::new(trust.clone())?));
        }
        let mut who = control::Credentials {
            server: config.server,
            identity: config.identity.clone(),
            name: config.name.clone(),
            lan_addrs: lan_addresses(port, config.server, families),
            tls: control::Tls::new(config.server_trust.clone())?,
            others,
        };
        debug!(local = ?udp.local_addr().ok(), ?families, lan = ?who.lan_addrs, "UDP socket bound");
        let conn = connect_any(&mut who).await?;
        let core = PeerCore::new(CoreConfig::new(&config.name, config.traversal.clone(), random_seed()));
        let (lanes, lane_rx) = control::lanes();
        let (relay_tx, relay_rx) = mpsc::channel(4096);
        let (offers_tx, offers_rx) = mpsc::channel(16);
        let (rooms_tx, rooms_rx) = mpsc::channel(256);
        let shared = Arc::new(Shared::new(
            core,
            udp,
            conn.registered.stun_addr,
            lanes,
            relay_tx,
            offers_tx,
            rooms_tx,
        ));
        let socket = Arc::new(MuxSocket::new(shared.clone(), relay_rx));
        let mut ep_config = quinn::EndpointConfig::default();
        ep_config.grease_quic_bit(false); // the fixed bit is our demultiplexer
        let pins = Arc::downgrade(&shared);
        let allowed: tls::PinCheck =
            Arc::new(move |fp: &Fingerprint| pins.upgrade().is_some_and(|s| s.lock().is_pinned(fp)));
        let quic = quinn::Endpoint::new_with_abstract_socket(
            ep_config,
            Some(tls::server_config(&config.identity, allowed)?),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        tokio::spawn(driver::drive(shared.clone()));
        let portmap_until = tokio::time::Instant::now() + PORTMAP_WAIT;
        let portmap = (config.portmap && config.server.is_ipv4() && !config.server.ip().is_loopback())
            .then(|| start_portmap(&shared, port))
            .flatten();
        let lane_rx = Arc::new(tokio::sync::Mutex::new(lane_rx));
        let reader = control::start(&shared, lane_rx.clone(), conn);
        let inner = Arc::new(Inner {
            name: config.name.clone(),
            identity: config.identity,
            shared: shared.clone(),
            quic: quic.clone(),
            traversal_budget: config.traversal.budget,
            contacts: config.contacts,
            offers: tokio::sync::Mutex::new(offers_rx),
            rooms: crate::room::Router::default(),
            state: tokio::sync::watch::channel(ServerState::Up).0,
            portmap,
            server: std::sync::Mutex::new(who.server),
        });
        tokio::spawn(crate::room::route(Arc::downgrade(&inner), rooms_rx));
        tokio::spawn(supervise(Arc::downgrade(&inner), who, lane_rx, reader));
        tokio::spawn(accept_quic(Arc::downgrade(&shared), quic));
        let ep = Self { inner };
        let _ = tokio::time::timeout(PROBE_WAIT, shared.wait(|core| core.probed().then_some(()))).await;
        if ep.inner.portmap.is_some() {
            let mapped = shared.wait(|core| core.port_mapped().map(|_| ()));
            let _ = tokio::time::timeout_at(portmap_until, mapped).await;
        }
        info!(name = %config.name, public = ?ep.public_addr(), mapped = ?ep.port_mapped(), "registered");
        Ok(ep)
    }

    /// Frees `config`'s name on its server: registers it (proving the key), asks the server
    /// to forget the binding, and returns once the server confirmed; anyone may register the
    /// name afterwards. No endpoint is left running (no UDP socket, no calls).
    pub async fn release_name(config: &EndpointConfig) -> Result<(), Error> {
        let mut others = Vec::with_capacity(config.fallback_servers.len());
        for (addr, trust) in &config.fallback_servers {
            others.push((*addr, control::Tls::new(trust.clone())?));
        }
        let mut who = control::Credentials {
            server: config.server,
            identity: config.identity.clone(),
            name: config.name.clone(),
            lan_addrs: Vec::new(),
            tls: control::Tls::new(config.server_trust.clone())?,
            others,
        };
        let released = connect_any(&mut who).await?.release_name().await?;
        info!(name = %released, server = %config.server, "name released");
        Ok(())
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
        self.inner.shared.lock().public_addr()
    }

    /// How this peer's NAT maps its UDP socket, as measured against the server's two STUN
    /// ports (`Mapping::Unknown` when the server has one port only, or UDP is blocked).
    pub fn nat_mapping(&self) -> natcall_proto::control::Mapping {
        self.inner.shared.lock().mapping()
    }

    /// The public address the router mapped to the UDP socket (UPnP-IGD, NAT-PMP, PCP), if it
    /// did.
    pub fn port_mapped(&self) -> Option<SocketAddr> {
        self.inner.shared.lock().port_mapped()
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.inner.shared.udp.local_addr()?)
    }

    /// Test hook: drop all UDP to and from everyone but the server, as if the direct path died.
    #[doc(hidden)]
    pub fn simulate_dead_udp(&self, dead: bool) {
        self.inner.shared.set_blackhole(dead);
    }

    /// The server this endpoint is registered with (the last one while it reconnects): the
    /// configured one, or one of its fallbacks.
    pub fn server(&self) -> SocketAddr {
        *self.inner.server.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the endpoint is registered with its server now.
    pub fn server_state(&self) -> ServerState {
        self.inner.state.borrow().clone()
    }

    /// The next change of [`Endpoint::server_state`] after `seen`.
    pub async fn server_changed(&self, seen: &ServerState) -> ServerState {
        let mut rx = self.inner.state.subscribe();
        match rx.wait_for(|s| s != seen).await {
            Ok(s) => s.clone(),
            Err(_) => ServerState::Gone("the endpoint closed".into()),
        }
    }

    /// Closes every call, then the connection to the server, gracefully: waits (up to a
    /// second) until the peers have been told and the server has every message queued for it,
    /// half-closes the control connection and waits for the server to close its side. Call
    /// before exiting the process (or dropping the endpoint).
    pub async fn close(&self) {
        let shared = &self.inner.shared;
        if let Some(p) = &self.inner.portmap {
            // The release goes out while the calls below close (the lease expires otherwise).
            p.deactivate();
        }
        shared.close();
        self.inner.quic.close(0u32.into(), b"endpoint closed");
        // A running call's hang-up waits for its QUIC close (so the server forwards the close
        // before it ends the call): give quinn a moment to send the closes, then send what is
        // still held, and put everything the core has for the server into the lanes.
        let _ = tokio::time::timeout(CLOSE_HOLD, shared.wait(|core| (!core.has_held()).then_some(()))).await;
        shared.with(|core, _| core.release_held());
        shared.step();
        let (done, flushed) = tokio::sync::oneshot::channel();
        let mut state = self.inner.state.subscribe();
        let up = matches!(*state.borrow(), ServerState::Up);
        let control = async {
            if !up {
                return;
            }
            // The writer answers the flush once the control lane and the relay frames queued
            // before it are written; then it half-closes and the server closes its side.
            if shared.lanes.control.send(control::Outgoing::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
            if shared.lanes.control.send(control::Outgoing::Close).await.is_ok() {
                let _ = state.wait_for(|s| matches!(s, ServerState::Gone(_))).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            tokio::join!(self.inner.quic.wait_idle(), control);
        })
        .await;
    }

    /// Calls `callee` with `policy`; returns when the call is connected.
    pub async fn call(&self, callee: &str, policy: Policy) -> Result<Call, Error> {
        let id = self.inner.shared.with(|core, now| core.place_call(now, callee, policy));
        debug!(callee, call = %id, "calling");
        call::establish(self.inner.clone(), id, Role::Caller).await
    }

    /// Creates room `room` with this peer as its creator and first member; `invite`: the
    /// names that may join (the creator also gets a join code for others: [`Room::code`]).
    /// Fails with [`Error::Room`] when the server refuses (the name is taken, a limit).
    pub async fn create_room(&self, room: &str, invite: &[&str]) -> Result<Room, Error> {
        let msg = ClientMsg::RoomCreate {
            room: room.to_owned(),
            invite: invite.iter().map(|s| (*s).to_owned()).collect(),
        };
        Room::open(self, room, msg).await
    }

    /// Joins room `room`, invited or with its join `code`. Each member already in, and each
    /// that joins later, comes with a pairwise session ([`crate::RoomEvent::Session`]).
    pub async fn join_room(&self, room: &str, code: Option<&str>) -> Result<Room, Error> {
        let msg = ClientMsg::RoomJoin {
            room: room.to_owned(),
            code: code.map(str::to_owned),
        };
        Room::open(self, room, msg).await
    }

    /// The next incoming call offer. Fails only when the endpoint can no longer be reached:
    /// [`Error::Replaced`] when another session of this peer took over its registration,
    /// [`Error::ServerLost`] when it closed or its name was refused on registering again.
    pub async fn accept(&self) -> Result<IncomingCall, Error> {
        let mut rx = self.inner.offers.lock().await;
        let mut state = self.inner.state.subscribe();
        tokio::select! {
            o = rx.recv() => match o {
                Some(offer) => Ok(IncomingCall { endpoint: self.clone(), offer, answered: false }),
                None => Err(Error::ServerLost("the endpoint closed".into())),
            },
            s = state.wait_for(|s| matches!(s, ServerState::Gone(_))) => {
                let reason = match s.as_deref() {
                    Ok(ServerState::Gone(r)) => r.clone(),
                    _ => "the endpoint closed".into(),
                };
                if self.inner.shared.lock().replaced().is_some() {
                    return Err(Error::Replaced(reason));
                }
                Err(Error::ServerLost(reason))
            }
        }
    }
}

/// Whether a refusal is final (another key owns the name, the name is bad): trying again
/// cannot help.
fn is_final(e: &Error) -> bool {
    matches!(e, Error::ServerKeyChanged { .. })
        || matches!(
            e,
            Error::Refused {
                code: ErrorCode::NameTaken | ErrorCode::BadName | ErrorCode::BadSignature | ErrorCode::VersionMismatch,
                ..
            }
        )
}

/// Registers with the current server of `who`, else with each other one in turn; fails with
/// the first server's error when none registers this peer (a final refusal stops at once).
async fn connect_any(who: &mut control::Credentials) -> Result<control::Connected, Error> {
    let mut first = None;
    for _ in 0..=who.others.len() {
        match control::connect(who).await {
            Ok(conn) => return Ok(conn),
            // A changed key is one server's: the others may still be trusted.
            Err(e) if is_final(&e) && !(who.has_others() && matches!(e, Error::ServerKeyChanged { .. })) => {
                return Err(e);
            }
            Err(e) => {
                debug!(server = %who.server, error = %e, "cannot register with this server");
                first.get_or_insert(e);
                if !who.rotate() {
                    break;
                }
            }
        }
    }
    // After a full turn the first server is current again.
    Err(first.unwrap_or_else(|| Error::Protocol("no server to register with".into())))
}

/// Registers again whenever the connection to the server ends, until the endpoint closes: with
/// the same server, or — with fallback servers — with the next one first (a server that is gone
/// is left at once), each tried in turn.
async fn supervise(
    inner: std::sync::Weak<Inner>,
    mut who: control::Credentials,
    lanes: Arc<tokio::sync::Mutex<LaneReceivers>>,
    mut reader: tokio::task::JoinHandle<String>,
) {
    loop {
        let reason = (&mut reader)
            .await
            .unwrap_or_else(|e| format!("the control reader failed: {e}"));
        let Some(strong) = inner.upgrade() else { return };
        let shared = strong.shared.clone();
        shared.with(|core, now| core.handle_server_lost(now, &reason));
        if shared.is_closing() {
            debug!(%reason, "control connection closed (endpoint closing)");
            strong.state.send_replace(ServerState::Gone(reason));
            return;
        }
        let replaced = shared.lock().replaced().map(str::to_owned);
        if let Some(reason) = replaced {
            // Final: registering again would take the name back from the newer session, which
            // would take it back in turn. The calls ended in the core; tell their peers.
            warn!(%reason, "this session was replaced; not registering again");
            strong
                .quic
                .close(0u32.into(), b"replaced by a newer session of the same peer");
            strong.state.send_replace(ServerState::Gone(reason));
            return;
        }
        warn!(%reason, "lost the rendezvous server; registering again");
        strong.state.send_replace(ServerState::Reconnecting(reason));
        drop(strong);
        let asked = shared.come_back_ms.swap(u64::MAX, Ordering::Relaxed);
        let moved = shared.lock().take_move_to();
        if !moved.is_empty() {
            info!(servers = ?moved, "the server named other servers of its cluster");
        }
        let mut wait = if asked == u64::MAX || !moved.is_empty() {
            RECONNECT_FIRST
        } else {
            Duration::from_millis(asked)
        };
        let template = who.trust().clone();
        for addr in moved.iter().rev() {
            if let Err(e) = who.prefer(*addr, &template) {
                debug!(server = %addr, error = %e, "cannot use a server the old one named");
            }
        }
        // The server just lost is tried last.
        let switched = who.rotate();
        if switched {
            info!(server = %who.server, "registering with the next server of the cluster");
        }
        let first_tried = who.server;
        // The wait before each round of servers: it doubles per round (up to RECONNECT_MAX),
        // while the next server of a round is tried at once.
        let mut round = wait;
        reader = loop {
            let jitter = 0.5 + f64::from(random_seed() as u32) / f64::from(u32::MAX) / 2.0;
            tokio::time::sleep(wait.mul_f64(jitter)).await;
            if shared.is_closing() {
                if let Some(i) = inner.upgrade() {
                    i.state.send_replace(ServerState::Gone("the endpoint closed".into()));
                }
                return;
            }
            match control::connect(&who).await {
                Ok(conn) => break control::start(&shared, lanes.clone(), conn),
                // A changed key is one server's: the others may still be trusted.
                Err(e) if is_final(&e) && !(who.has_others() && matches!(e, Error::ServerKeyChanged { .. })) => {
                    warn!(error = %e, "the server refused to register this peer again");
                    if let Some(i) = inner.upgrade() {
                        i.state.send_replace(ServerState::Gone(e.to_string()));
                    }
                    return;
                }
                Err(e) => {
                    debug!(server = %who.server, error = %e, "registering again failed");
                    if who.rotate() && who.server != first_tried {
                        wait = Duration::ZERO;
                    } else {
                        round = (round * 2).clamp(RECONNECT_FIRST, RECONNECT_MAX);
                        wait = round;
                    }
                }
            }
        };
        let Some(strong) = inner.upgrade() else { return };
        info!(server = %who.server, "registered with the rendezvous server again");
        *strong.server.lock().unwrap_or_else(|p| p.into_inner()) = who.server;
        strong.state.send_replace(ServerState::Up);
    }
}

/// Accepts incoming QUIC connections for the calls that expect one.
async fn accept_quic(shared: std::sync::Weak<Shared>, quic: quinn::Endpoint) {
    while let Some(incoming) = quic.accept().await {
        let Some(fake) = FakeAddr::parse(incoming.remote_address()) else {
            incoming.refuse();
            continue;
        };
        let expected = shared.upgrade().is_some_and(|s| s.lock().expects_quic(fake));
        if !expected {
            debug!(%fake, "QUIC connection for no started call refused");
            incoming.refuse();
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => {
                    let Some(shared) = shared.upgrade() else { return };
                    let id: CallId = fake.call();
                    let parked = shared
                        .lock()
                        .link_mut(id)
                        .map(|l| l.accepted = Some(conn.clone()))
                        .is_some();
                    if parked {
                        shared.touch();
                    } else {
                        conn.close(1u32.into(), b"call gone");
                    }
                }
                Err(e) => debug!(error = %e, "incoming QUIC handshake failed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_list_of_both_families_gets_a_dual_stack_socket() {
        let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
        let v6_server: SocketAddr = "[::1]:3478".parse().unwrap();
        let (_, only) = bind_socket(any6, v6_server, false).expect("binds [::]");
        assert!(only.v6 && !only.v4, "a server on IPv6 alone: IPv6 only");
        // A dual-stack name: home on IPv6, an IPv4 address to fail over to.
        let (socket, both) = bind_socket(any6, v6_server, true).expect("binds [::]");
        assert!(both.v6 && both.v4, "{both:?}");
        // It does reach IPv4 (as ::ffff:a.b.c.d).
        let v4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped(),
            v4.local_addr().unwrap().port(),
        ));
        socket
            .send_to(b"x", to)
            .await
            .expect("an IPv4 destination from the dual-stack socket");
        let mut got = [0u8; 4];
        v4.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(v4.recv(&mut got).expect("arrives over IPv4"), 1);
    }

    #[test]
    fn only_a_refusal_no_retry_can_mend_is_final() {
        let refused = |code| Error::Refused {
            code,
            message: String::new(),
        };
        assert!(is_final(&refused(ErrorCode::NameTaken)));
        assert!(!is_final(&refused(ErrorCode::ServerFull)));
        assert!(!is_final(&Error::Protocol("eof".into())));
    }
}
