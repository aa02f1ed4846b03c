//! Deterministic tests of the peer core: two cores and a model of the rendezvous server on the
//! traversal crate's simulated NATs, stepped in virtual time to the next delivery or timeout.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natcall_proto::control::{
    CallFailure, CallStart, Candidates, ClientMsg, Decline, Fingerprint, Policy, Reply, ServerMsg,
};
use natcall_proto::stun::{self as wire, TokenCredentials};
use natcall_traversal::sim::{Filtering, Mapping, Nat, NatConfig};

use super::*;

const SERVER: &str = "192.0.2.1:3478";
const LATENCY: Duration = Duration::from_millis(20);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// What sits in front of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Public,
    FullCone,
    PortRestricted,
    Symmetric,
    UdpBlocked,
}

impl Kind {
    fn nat(self) -> Option<NatConfig> {
        use {Filtering as F, Mapping as M};
        let (mapping, filtering, udp_blocked) = match self {
            Kind::Public => return None,
            Kind::FullCone => (M::EndpointIndependent, F::EndpointIndependent, false),
            Kind::PortRestricted => (M::EndpointIndependent, F::AddressAndPortDependent, false),
            Kind::Symmetric => (M::AddressAndPortDependent, F::AddressAndPortDependent, false),
            Kind::UdpBlocked => (M::EndpointIndependent, F::AddressAndPortDependent, true),
        };
        Some(NatConfig {
            mapping,
            filtering,
            hairpin: false,
            udp_blocked,
        })
    }
}

/// A peer's host: its socket address and the NAT in front of it.
#[derive(Debug, Clone, Copy)]
struct Host {
    addr: SocketAddr,
    nat: Option<usize>,
}

/// Who a datagram is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    Peer(usize),
    Server,
}

/// The network: two hosts behind their NATs, and the server on a public address.
struct Net {
    hosts: [Host; 2],
    nats: Vec<Nat>,
    /// Drop every datagram between the peers (a dead direct path).
    partitioned: bool,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: HashMap<u64, (To, SocketAddr, Vec<u8>)>,
    seq: u64,
}

impl Net {
    fn between(a: Kind, b: Kind) -> Self {
        let mut nats = Vec::new();
        let mut host = |kind: Kind, private: &str, public: &str| match kind.nat() {
            None => Host {
                addr: addr(public),
                nat: None,
            },
            Some(config) => {
                nats.push(Nat::new(addr(public).ip(), config));
                Host {
                    addr: addr(private),
                    nat: Some(nats.len() - 1),
                }
            }
        };
        let hosts = [
            host(a, "192.168.1.10:5000", "198.51.100.1:5000"),
            host(b, "10.0.0.7:6000", "203.0.113.9:6000"),
        ];
        Self::new(hosts, nats)
    }

    /// Both peers behind one port-restricted NAT without hairpinning.
    fn same_lan() -> Self {
        let mut nat = Kind::PortRestricted.nat().expect("a NAT");
        nat.hairpin = false;
        let hosts = [
            Host {
                addr: addr("192.168.1.10:5000"),
                nat: Some(0),
            },
            Host {
                addr: addr("192.168.1.11:5000"),
                nat: Some(0),
            },
        ];
        Self::new(hosts, vec![Nat::new(addr("198.51.100.1:0").ip(), nat)])
    }

    fn new(hosts: [Host; 2], nats: Vec<Nat>) -> Self {
        Self {
            hosts,
            nats,
            partitioned: false,
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            seq: 0,
        }
    }

    fn enqueue(&mut self, at: Instant, to: To, from: SocketAddr, data: Vec<u8>) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.in_flight.insert(self.seq, (to, from, data));
    }

    /// Sends a datagram from peer `from` at `now`.
    fn send(&mut self, now: Instant, from: usize, t: Transmit) {
        let src = self.hosts[from];
        let dst = self.hosts[1 - from];
        let same_lan = src.nat.is_some() && src.nat == dst.nat;
        if t.destination == dst.addr && dst.nat.is_some() {
            // A private address: reachable only from the same LAN.
            if same_lan && !self.partitioned {
                self.enqueue(now + Duration::from_millis(1), To::Peer(1 - from), src.addr, t.contents);
            }
            return;
        }
        let public_src = match src.nat {
            Some(n) => match self.nats[n].outbound(src.addr, t.destination) {
                Some(a) => a,
                None => return,
            },
            None => src.addr,
        };
        if t.destination == addr(SERVER) {
            self.enqueue(now + LATENCY / 2, To::Server, public_src, t.contents);
            return;
        }
        if self.partitioned {
            return;
        }
        match dst.nat {
            None if t.destination == dst.addr => {
                self.enqueue(now + LATENCY, To::Peer(1 - from), public_src, t.contents)
            }
            Some(n) if t.destination.ip() == self.nats[n].ip => {
                if same_lan && !self.nats[n].config.hairpin {
                    return;
                }
                if self.nats[n].inbound(public_src, t.destination.port()) == Some(dst.addr) {
                    self.enqueue(now + LATENCY, To::Peer(1 - from), public_src, t.contents);
                }
            }
            _ => {}
        }
    }

    /// The server answers a datagram that came from `to` (a public address).
    fn answer(&mut self, now: Instant, to: SocketAddr, data: Vec<u8>) {
        for (i, h) in self.hosts.iter().enumerate() {
            let inside = match h.nat {
                None if h.addr == to => Some(h.addr),
                Some(n) if self.nats[n].ip == to.ip() => self.nats[n].inbound(addr(SERVER), to.port()),
                _ => None,
            };
            if inside == Some(h.addr) {
                self.enqueue(now + LATENCY / 2, To::Peer(i), addr(SERVER), data);
                return;
            }
        }
    }

    fn next(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, _))| *at)
    }

    fn pop(&mut self, now: Instant) -> Option<(To, SocketAddr, Vec<u8>)> {
        let Reverse((at, seq)) = *self.queue.peek()?;
        if at > now {
            return None;
        }
        self.queue.pop();
        self.in_flight.remove(&seq)
    }
}

/// A call the model server knows.
#[derive(Debug, Clone)]
struct ServerCall {
    members: [usize; 2],
    policy: Policy,
    active: bool,
}

/// The rendezvous server's signalling, STUN responder and resume matching, as the protocol
/// describes them (without the relay's bytes: the core only routes to it).
#[derive(Default)]
struct Server {
    up: [bool; 2],
    public: [Option<SocketAddr>; 2],
    calls: HashMap<u32, ServerCall>,
    next_id: u32,
    /// Pending resumes: (proof) → (member, the id it sent).
    pending: HashMap<[u8; 32], (usize, u32)>,
    /// Every message each peer sent, in order.
    received: [Vec<ClientMsg>; 2],
    out: Vec<(usize, ServerMsg)>,
}

const NAMES: [&str; 2] = ["alice", "bob"];

fn token(i: usize) -> TokenCredentials {
    TokenCredentials {
        username: format!("tok-{}", NAMES[i]),
        password: format!("pw-{}", NAMES[i]),
    }
}

fn key(i: usize) -> Fingerprint {
    Fingerprint([i as u8 + 1; 32])
}

impl Server {
    fn handle(&mut self, from: usize, msg: ClientMsg, net: &Net) {
        self.received[from].push(msg.clone());
        let other = 1 - from;
        match msg {
            ClientMsg::Call {
                request,
                callee,
                policy,
            } => {
                if callee != NAMES[other] || !self.up[other] {
                    return self.out.push((
                        from,
                        ServerMsg::CallFailed {
                            request,
                            callee,
                            failure: CallFailure::Offline,
                        },
                    ));
                }
                self.next_id += 1;
                let id = self.next_id;
                self.calls.insert(
                    id,
                    ServerCall {
                        members: [from, other],
                        policy,
                        active: false,
                    },
                );
                self.out.push((from, ServerMsg::Ringing { request, call: id }));
                self.out.push((
                    other,
                    ServerMsg::Incoming {
                        call: id,
                        caller: NAMES[from].into(),
                        fingerprint: key(from),
                        policy,
                    },
                ));
            }
            ClientMsg::Reply { call, reply } => {
                let Some(c) = self.calls.get_mut(&call).filter(|c| c.members[1] == from && !c.active) else {
                    return;
                };
                let decline = match reply {
                    Reply::Decline(d) => Some(d),
                    Reply::Accept { policy } => match c.policy.combine(policy) {
                        Some(p) => {
                            c.policy = p;
                            None
                        }
                        None => Some(Decline::Policy { allowed: policy }),
                    },
                };
                if let Some(decline) = decline {
                    let caller = c.members[0];
                    self.calls.remove(&call);
                    return self.out.push((caller, ServerMsg::CallDeclined { call, decline }));
                }
                c.active = true;
                let (policy, members) = (c.policy, c.members);
                for (n, &m) in members.iter().enumerate() {
                    let peer = members[1 - n];
                    self.out.push((
                        m,
                        ServerMsg::Start(CallStart {
                            call,
                            peer: NAMES[peer].into(),
                            fingerprint: key(peer),
                            candidates: Candidates {
                                public: self.public[peer],
                                lan: vec![net.hosts[peer].addr],
                                mapping: natcall_proto::control::Mapping::Unknown,
                                port_mapped: None,
                            },
                            password: "call-password-42".into(),
                            controlling: n == 0,
                            delay_ms: 0,
                            policy,
                        }),
                    ));
                }
            }
            ClientMsg::Hangup { call, .. } => {
                if let Some(c) = self.calls.remove(&call) {
                    let peer = if c.members[0] == from {
                        c.members[1]
                    } else {
                        c.members[0]
                    };
                    self.out.push((
                        peer,
                        ServerMsg::CallEnded {
                            call,
                            reason: format!("{} hung up", NAMES[from]),
                        },
                    ));
                }
            }
            ClientMsg::Resume { call, peer, proof } => {
                if peer != NAMES[other] {
                    return;
                }
                match self.pending.remove(&proof) {
                    Some((first, first_call)) if first == other => {
                        self.next_id += 1;
                        let id = self.next_id;
                        self.calls.insert(
                            id,
                            ServerCall {
                                members: [other, from],
                                policy: Policy::Auto,
                                active: true,
                            },
                        );
                        self.out.push((other, ServerMsg::Resumed { call: first_call, id }));
                        self.out.push((from, ServerMsg::Resumed { call, id }));
                    }
                    _ => {
                        self.pending.insert(proof, (from, call));
                    }
                }
            }
            _ => {}
        }
    }

    /// Peer `i`'s connection ended: its active calls are suspended for the other member.
    fn lose(&mut self, i: usize) {
        self.up[i] = false;
        let gone: Vec<u32> = self
            .calls
            .iter()
            .filter(|(_, c)| c.members.contains(&i))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(c) = self.calls.remove(&id) {
                let other = if c.members[0] == i { c.members[1] } else { c.members[0] };
                if c.active && self.up[other] {
                    self.out.push((other, ServerMsg::CallSuspended { call: id }));
                }
            }
        }
    }

    /// Answers a token binding from `src` (a public address).
    fn stun(&mut self, src: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
        let p = wire::peek(data)?;
        let i = (0..2).find(|&i| p.username == Some(token(i).username.as_str()))?;
        self.public[i] = Some(src);
        let mut buf = [0u8; 256];
        let n = wire::encode_binding_success(&p.transaction_id, src, Some(&token(i).password), &mut buf).ok()?;
        Some(buf[..n].to_vec())
    }
}

/// What the harness does with incoming offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offers {
    /// Accepted under this policy.
    Accept(Policy),
    /// Declined for this reason.
    Decline(Decline),
    Ignore,
}

/// Two cores, the network, the server, and virtual time.
struct World {
    t0: Instant,
    now: Instant,
    cores: [PeerCore<()>; 2],
    net: Net,
    server: Server,
    offers: Offers,
    /// Calls each side accepted, by the server's id.
    accepted: Vec<(usize, CallId)>,
    /// Steps in a row that did not advance virtual time.
    stuck: u32,
}

fn traversal() -> natcall_traversal::Config {
    let mut t = natcall_traversal::Config::default();
    t.liveness_timeout = Duration::from_millis(2500);
    t
}

#[allow(clippy::disallowed_methods)] // the origin of virtual time, read once per test
fn origin() -> Instant {
    Instant::now()
}

impl World {
    /// Both peers registered, their public addresses learned (or UDP found blocked).
    fn new(net: Net) -> Self {
        let t0 = origin();
        let core = |i: usize| PeerCore::new(CoreConfig::new(NAMES[i], traversal(), 7 + i as u64));
        let mut w = Self {
            t0,
            now: t0,
            cores: [core(0), core(1)],
            net,
            server: Server::default(),
            offers: Offers::Accept(Policy::Auto),
            accepted: Vec::new(),
            stuck: 0,
        };
        for i in 0..2 {
            w.register(i);
        }
        w.run_for(Duration::from_secs(2));
        w
    }

    fn register(&mut self, i: usize) {
        self.server.up[i] = true;
        let reg = Registered {
            stun_addr: addr(SERVER),
            token: token(i),
            relay_ack_every: 4,
            stun_alt: None,
        };
        let now = self.now;
        self.cores[i].handle_registered(now, reg);
        self.drain();
    }

    /// The drive contract for both cores, and the server's answers, until all is quiet.
    fn drain(&mut self) {
        loop {
            let mut any = false;
            for i in 0..2 {
                while let Some(t) = self.cores[i].poll_transmit() {
                    any = true;
                    assert!(t.contents.len() <= 512);
                    self.net.send(self.now, i, t);
                }
                while let Some((msg, _lane)) = self.cores[i].poll_control() {
                    any = true;
                    if self.server.up[i] {
                        self.server.handle(i, msg, &self.net);
                    }
                }
                while let Some(ev) = self.cores[i].poll_event() {
                    any = true;
                    match (ev, self.offers) {
                        (Event::Incoming(offer), Offers::Accept(policy)) => {
                            let id = self.cores[i].accept(self.now, &offer, policy);
                            self.accepted.push((i, id));
                        }
                        (Event::Incoming(offer), Offers::Decline(why)) => self.cores[i].decline(&offer, why),
                        _ => {}
                    }
                }
                self.cores[i].poll_changed();
            }
            for (to, msg) in std::mem::take(&mut self.server.out) {
                any = true;
                if self.server.up[to] {
                    let now = self.now;
                    self.cores[to].handle_server_msg(now, msg);
                }
            }
            if !any {
                return;
            }
        }
    }

    fn step(&mut self, until: Instant) -> bool {
        let next = [
            self.net.next(),
            self.cores[0].poll_timeout(),
            self.cores[1].poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next.filter(|t| *t <= until) else {
            self.now = self.now.max(until);
            return false;
        };
        if next <= self.now {
            self.stuck += 1;
            assert!(
                self.stuck < 10_000,
                "virtual time does not advance at {:?}: {:?} / {:?}",
                self.elapsed(),
                self.cores[0].poll_timeout().map(|t| t - self.t0),
                self.cores[1].poll_timeout().map(|t| t - self.t0)
            );
        } else {
            self.stuck = 0;
        }
        self.now = self.now.max(next);
        while let Some((to, from, data)) = self.net.pop(self.now) {
            match to {
                To::Server => {
                    if let Some(answer) = self.server.stun(from, &data) {
                        self.net.answer(self.now, from, answer);
                    }
                }
                To::Peer(i) => {
                    let now = self.now;
                    let _ = self.cores[i].handle_datagram(now, from, &data);
                }
            }
            self.drain();
        }
        for i in 0..2 {
            if self.cores[i].poll_timeout().is_some_and(|t| t <= self.now) {
                let now = self.now;
                self.cores[i].handle_timeout(now);
                self.drain();
            }
        }
        true
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        while self.step(until) {}
    }

    fn run_until(&mut self, within: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let until = self.now + within;
        loop {
            if done(self) {
                return true;
            }
            if !self.step(until) {
                return done(self);
            }
        }
    }

    fn call(&mut self, policy: Policy) -> CallId {
        let now = self.now;
        let id = self.cores[0].place_call(now, "bob", policy);
        self.drain();
        id
    }

    fn view(&self, side: usize, id: CallId) -> &CallView {
        self.cores[side].call(id).expect("the call is known")
    }

    /// The callee's id of the last call it accepted.
    fn callee(&self) -> CallId {
        self.accepted.last().map(|(_, id)| *id).expect("bob accepted a call")
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }
}

/// The expected outcome of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Ends on this path and stays up.
    Path(Path),
    /// Ends with the policy's failure.
    Fails,
}

/// Runs one call under `policy` between `a` and `b`; checks both sides' outcome, and that a
/// failure comes at the traversal budget (or at once when UDP is known to be blocked) with the
/// policy's sentence.
fn scenario(a: Kind, b: Kind, policy: Policy, expect: Outcome) {
    let mut w = World::new(Net::between(a, b));
    let placed = w.elapsed();
    let id = w.call(policy);
    let callee = w.callee();
    let mut caller_ended = None;
    let decided = w.run_until(Duration::from_secs(8), |w| {
        let v = [w.view(0, id), w.view(1, callee)];
        if v[0].end.is_some() && caller_ended.is_none() {
            caller_ended = Some(w.elapsed());
        }
        match expect {
            Outcome::Path(p) => v
                .iter()
                .all(|v| v.path == p && v.changes.last().is_some_and(|c| c.to == p)),
            Outcome::Fails => v.iter().all(|v| v.end.is_some()),
        }
    });
    assert!(
        decided,
        "{a:?} × {b:?} under {policy}: {:?} / {:?}",
        w.view(0, id),
        w.view(1, callee)
    );
    match expect {
        Outcome::Path(p) => {
            // Still there a while later: nothing tore it down.
            w.run_for(Duration::from_secs(3));
            assert_eq!(w.view(0, id).path, p);
            assert_eq!(w.view(0, id).end, None);
            if p == Path::Relay {
                assert!(
                    w.view(0, id).changes.iter().all(|c| c.to == Path::Relay),
                    "never left the relay"
                );
            }
        }
        Outcome::Fails => {
            let took = caller_ended.expect("the caller's call ended") - placed;
            let udp_blocked = a == Kind::UdpBlocked || b == Kind::UdpBlocked;
            let budget = traversal().budget;
            if a == Kind::UdpBlocked {
                assert!(
                    took < Duration::from_millis(500),
                    "blocked UDP gives up at once: {took:?}"
                );
            } else {
                assert!(
                    took >= budget && took < budget + Duration::from_millis(500),
                    "gave up after {took:?} (budget {budget:?}, UDP blocked: {udp_blocked})"
                );
            }
            let Some(CallEnd::NoPath(why)) = w.view(0, id).end.clone() else {
                panic!("{:?}", w.view(0, id).end)
            };
            assert!(
                why.ends_with(&format!("the {policy} policy forbids the relay")),
                "{why}"
            );
            assert!(
                w.view(0, id).changes.iter().all(|c| c.to != Path::Relay),
                "never on the relay"
            );
        }
    }
}

macro_rules! scenarios {
    ($($name:ident: $a:ident, $b:ident, $policy:ident => $expect:expr;)*) => {$(
        #[test]
        fn $name() {
            scenario(Kind::$a, Kind::$b, Policy::$policy, $expect);
        }
    )*};
}

scenarios! {
    auto_full_cone_x_port_restricted_moves_from_the_relay_to_direct: FullCone, PortRestricted, Auto => Outcome::Path(Path::Direct);
    auto_public_x_symmetric_goes_direct: Public, Symmetric, Auto => Outcome::Path(Path::Direct);
    auto_symmetric_x_port_restricted_stays_on_the_relay: Symmetric, PortRestricted, Auto => Outcome::Path(Path::Relay);
    auto_udp_blocked_x_public_stays_on_the_relay: UdpBlocked, Public, Auto => Outcome::Path(Path::Relay);
    direct_only_full_cone_x_port_restricted_goes_direct: FullCone, PortRestricted, DirectOnly => Outcome::Path(Path::Direct);
    direct_only_symmetric_x_symmetric_fails_at_the_budget: Symmetric, Symmetric, DirectOnly => Outcome::Fails;
    direct_only_udp_blocked_fails_at_once: UdpBlocked, Public, DirectOnly => Outcome::Fails;
    relay_only_full_cone_x_full_cone_never_leaves_the_relay: FullCone, FullCone, RelayOnly => Outcome::Path(Path::Relay);
    relay_only_udp_blocked_x_symmetric_uses_the_relay: UdpBlocked, Symmetric, RelayOnly => Outcome::Path(Path::Relay);
    lan_only_across_two_lans_fails_at_the_budget: FullCone, FullCone, LanOnly => Outcome::Fails;
}

#[test]
fn relay_only_sends_no_check_to_the_peer() {
    let mut w = World::new(Net::between(Kind::Public, Kind::Public));
    let id = w.call(Policy::RelayOnly);
    w.run_for(Duration::from_secs(3));
    assert_eq!(w.view(0, id).path, Path::Relay);
    assert!(w.cores[0].calls[&id].agent.is_none(), "no agent under relay-only");
}

#[test]
fn auto_behind_one_nat_selects_the_lan_and_lan_only_does_too() {
    for policy in [Policy::Auto, Policy::LanOnly] {
        let mut w = World::new(Net::same_lan());
        let id = w.call(policy);
        let callee = w.callee();
        assert!(
            w.run_until(Duration::from_secs(3), |w| w.view(0, id).path == Path::Lan
                && w.view(1, callee).path == Path::Lan),
            "{policy}: {:?}",
            w.view(0, id)
        );
    }
}

#[test]
fn a_dead_direct_path_falls_back_to_the_relay_and_direct_comes_back_after_the_backoff() {
    let mut w = World::new(Net::between(Kind::FullCone, Kind::PortRestricted));
    let id = w.call(Policy::Auto);
    assert!(w.run_until(Duration::from_secs(3), |w| w.view(0, id).path == Path::Direct));
    w.net.partitioned = true;
    let lost_at = w.elapsed();
    assert!(w.run_until(Duration::from_secs(10), |w| w.view(0, id).path == Path::Relay));
    let fell_back = w.elapsed() - lost_at;
    assert!(fell_back < Duration::from_secs(6), "fell back after {fell_back:?}");
    w.net.partitioned = false;
    assert!(w.run_until(Duration::from_secs(12), |w| w.view(0, id).path == Path::Direct));
    let back = w.elapsed() - lost_at - fell_back;
    assert!(
        back >= policy::RETRY_FIRST - Duration::from_millis(100) && back < policy::RETRY_FIRST + Duration::from_secs(2),
        "direct again {back:?} after the fallback (retry after {:?})",
        policy::RETRY_FIRST
    );
    assert_eq!(w.view(0, id).end, None);
}

#[test]
fn direct_only_checks_again_once_when_its_path_dies_then_fails() {
    let mut w = World::new(Net::between(Kind::FullCone, Kind::FullCone));
    let id = w.call(Policy::DirectOnly);
    assert!(w.run_until(Duration::from_secs(3), |w| w.view(0, id).path == Path::Direct));
    w.net.partitioned = true;
    assert!(w.run_until(Duration::from_secs(20), |w| w.view(0, id).end.is_some()));
    let Some(CallEnd::NoPath(why)) = w.view(0, id).end.clone() else {
        panic!("{:?}", w.view(0, id).end)
    };
    assert!(why.contains("direct-only policy forbids the relay"), "{why}");
}

#[test]
fn two_calls_to_one_name_ring_and_run_apart() {
    let mut w = World::new(Net::between(Kind::FullCone, Kind::PortRestricted));
    let first = w.call(Policy::Auto);
    let second = w.call(Policy::RelayOnly);
    assert_ne!(first, second);
    let ids: Vec<u32> = w.server.received[0]
        .iter()
        .filter_map(|m| match m {
            ClientMsg::Call { request, .. } => Some(*request),
            _ => None,
        })
        .collect();
    assert_eq!(ids, vec![first.0, second.0], "each call has its own request id");
    assert_eq!(w.accepted.len(), 2, "bob was offered both");
    assert!(w.run_until(Duration::from_secs(3), |w| w.view(0, first).path == Path::Direct));
    assert_eq!(w.view(0, second).path, Path::Relay);
    let (s1, s2) = (w.cores[0].calls[&first].server_id, w.cores[0].calls[&second].server_id);
    assert!(s1.is_some() && s2.is_some() && s1 != s2, "{s1:?} {s2:?}");
    // Hanging up one leaves the other running.
    let now = w.now;
    w.cores[0].release(now, first, "bye");
    w.drain();
    w.run_for(Duration::from_secs(2));
    assert!(
        w.cores[0].call(first).is_none(),
        "released and forgotten after the linger"
    );
    assert_eq!(w.view(0, second).end, None);
    assert_eq!(w.server.calls.len(), 1, "the server was told of the hang-up");
}

#[test]
fn checks_reach_only_their_own_call() {
    let mut w = World::new(Net::between(Kind::FullCone, Kind::FullCone));
    let first = w.call(Policy::Auto);
    let second = w.call(Policy::Auto);
    // One call per pair of sockets goes direct; the other stays on the relay, both up.
    assert!(w.run_until(Duration::from_secs(3), |w| {
        let paths = [w.view(0, first).path, w.view(0, second).path];
        paths.contains(&Path::Direct) && paths.contains(&Path::Relay)
    }));
    w.run_for(Duration::from_secs(2));
    assert_eq!(w.view(0, first).end, None);
    assert_eq!(w.view(0, second).end, None);
    let usernames: Vec<&String> = w.cores[0].by_username.keys().collect();
    assert_eq!(usernames.len(), 2, "{usernames:?}");
    // A check with an unknown USERNAME reaches no call.
    let forged = natcall_traversal::Credentials::new("call-password-42", "bob~999", "alice~999").expect("credentials");
    let mut agent = Agent::new(
        traversal(),
        natcall_traversal::Role::Controlling,
        forged,
        vec![natcall_traversal::Candidate::server_reflexive(addr(
            "198.51.100.1:5000",
        ))],
        false,
        w.now,
    );
    agent.handle_timeout(w.now);
    let check = agent.poll_transmit().expect("a check");
    let now = w.now;
    assert_eq!(
        w.cores[0].handle_datagram(now, addr("203.0.113.9:6000"), &check.contents),
        Datagram::Dropped
    );
}

#[test]
fn a_ringing_call_that_is_never_answered_times_out_and_leaves_nothing_behind() {
    let mut w = World::new(Net::between(Kind::FullCone, Kind::FullCone));
    w.offers = Offers::Ignore;
    let id = w.call(Policy::Auto);
    w.run_for(Duration::from_secs(39));
    assert_eq!(w.view(0, id).end, None, "still ringing before the ring timeout");
    w.run_for(Duration::from_secs(2));
    assert_eq!(w.view(0, id).end, Some(CallEnd::NoAnswer));
    let now = w.now;
    w.cores[0].release(now, id, "no answer");
    w.drain();
    let core = &w.cores[0];
    assert_eq!(core.len(), 0);
    assert!(
        core.by_server.is_empty() && core.by_username.is_empty() && core.by_real.is_empty() && core.by_tid.is_empty()
    );
    assert!(
        w.server.calls.is_empty(),
        "the withdrawn call is gone at the server too"
    );
}

#[test]
fn a_call_refused_by_the_server_says_why() {
    let mut w = World::new(Net::between(Kind::FullCone, Kind::FullCone));
    w.server.up[1] = false; // bob is offline
    let id = w.call(Policy::Auto);
    assert_eq!(w.view(0, id).end, Some(CallEnd::Refused(CallFailure::Offline)));
}

#[test]
fn a_declining_callee_ends_the_call_at_once_with_its_reason() {
    let cases = [
        (Decline::Declined, CallEnd::Ended("bob declined".into())),
        (Decline::Busy, CallEnd::Busy),
        (
            Decline::Policy {
                allowed: Policy::RelayOnly,
            },
            CallEnd::NoPath("bob allows only relay-only calls, and this call asked for direct-only".into()),
        ),
    ];
    for (decline, end) in cases {
        let mut w = World::new(Net::between(Kind::FullCone, Kind::FullCone));
        w.offers = Offers::Decline(decline);
        let id = w.call(Policy::DirectOnly);
        assert_eq!(w.view(0, id).end, Some(end), "at once: no time passed");
        assert!(w.server.calls.is_empty());
        assert!(w.accepted.is_empty());
    }
}

#[test]
fn the_callee_s_policy_narrows_an_auto_call_to_the_relay() {
    let mut w = World::new(Net::between(Kind::FullCone, Kind::FullCone));
    w.offers = Offers::Accept(Policy::RelayOnly);
    let id = w.call(Policy::Auto);
    let callee = w.callee();
    w.run_for(Duration::from_secs(8));
    for (side, id) in [(0, id), (1, callee)] {
        let v = w.view(side, id);
        assert_eq!(v.start.as_ref().map(|s| s.policy), Some(Policy::RelayOnly));
        assert_eq!((v.path, v.end.clone()), (Path::Relay, None), "side {side}");
        assert_eq!(v.changes.len(), 1, "connecting → relay, never a direct path");
    }
    // An incompatible pair is declined by the server even for a callee that accepts it.
    let mut w = World::new(Net::between(Kind::FullCone, Kind::FullCone));
    w.offers = Offers::Accept(Policy::LanOnly);
    let id = w.call(Policy::RelayOnly);
    assert!(matches!(&w.view(0, id).end, Some(CallEnd::NoPath(why)) if why.contains("allows only lan-only")));
}

#[test]
fn a_replaced_session_ends_its_calls_and_stays_down() {
    let mut w = World::new(Net::between(Kind::FullCone, Kind::FullCone));
    let id = w.call(Policy::Auto);
    w.run_for(Duration::from_secs(3));
    assert_eq!(w.view(0, id).end, None);
    let now = w.now;
    let why = w.cores[0].handle_replaced(now, addr("198.51.100.1:40001"));
    assert_eq!(
        why,
        "another natcall session registered as alice (from 198.51.100.1:40001) and replaced this one"
    );
    assert_eq!(w.cores[0].replaced(), Some(why.as_str()));
    assert_eq!(w.view(0, id).end, Some(CallEnd::Replaced(why.clone())));
    // Nothing more can be placed, and it says why.
    let later = w.cores[0].place_call(now, "bob", Policy::Auto);
    assert_eq!(w.view(0, later).end, Some(CallEnd::Replaced(why)));
    assert!(
        w.cores[0].poll_control().is_none(),
        "nothing is sent to a server it lost"
    );
}

#[test]
fn a_setup_that_fails_tells_the_server_so_the_callee_is_not_left_busy() {
    let mut w = World::new(Net::between(Kind::Symmetric, Kind::Symmetric));
    let id = w.call(Policy::DirectOnly);
    let callee = w.callee();
    assert!(w.run_until(Duration::from_secs(8), |w| w.view(0, id).end.is_some()));
    assert_eq!(w.server.calls.len(), 1, "the server still counts the call until told");
    let now = w.now;
    w.cores[0].release(now, id, "call setup failed");
    w.drain();
    w.run_for(Duration::from_secs(2));
    assert!(w.server.calls.is_empty(), "hang-up reached the server");
    assert!(
        w.server.received[0]
            .iter()
            .any(|m| matches!(m, ClientMsg::Hangup { reason, .. } if reason == "call setup failed"))
    );
    assert!(matches!(
        w.view(1, callee).end,
        Some(CallEnd::Ended(_)) | Some(CallEnd::NoPath(_))
    ));
}

#[test]
fn calls_outlive_the_server_and_a_relayed_call_is_resumed_with_a_new_id() {
    let mut w = World::new(Net::between(Kind::Symmetric, Kind::PortRestricted));
    let id = w.call(Policy::Auto);
    let callee = w.callee();
    w.run_for(Duration::from_secs(1));
    let old = w.cores[0].calls[&id].server_id.expect("known");
    assert_eq!(w.cores[0].route(FakeAddr::of(id)), Route::Relay(old));
    // Both derive the same proof from their QUIC session (here: given).
    w.cores[0].set_proof(id, [9; 32]);
    w.cores[1].set_proof(callee, [9; 32]);
    // The server dies: the call stays, its relay route goes nowhere, a ringing call fails.
    w.server = Server::default();
    let now = w.now;
    for core in &mut w.cores {
        core.handle_server_lost(now, "the server closed the connection");
    }
    let ringing = w.cores[0].place_call(now, "bob", Policy::Auto);
    assert!(matches!(w.view(0, ringing).end, Some(CallEnd::ServerLost(_))));
    w.run_for(Duration::from_secs(3));
    assert_eq!(w.view(0, id).end, None, "the call outlives the server");
    assert_eq!(w.cores[0].route(FakeAddr::of(id)), Route::Void);
    // A new server: both register again and re-announce the call; it is resumed.
    w.server.next_id = 100;
    w.register(1);
    assert!(w.server.received[1].iter().any(
        |m| matches!(m, ClientMsg::Resume { call, peer, proof } if *call == old && peer == "alice" && *proof == [9; 32])
    ));
    w.register(0);
    let new = w.cores[0].calls[&id].server_id.expect("resumed");
    assert_ne!(new, old);
    assert_eq!(w.cores[0].route(FakeAddr::of(id)), Route::Relay(new));
    assert_eq!(w.cores[1].route(FakeAddr::of(callee)), Route::Relay(new));
    assert!(w.cores[0].server_knows(id));
    // Relay frames for the new id reach the call; for the old one, nothing.
    assert_eq!(w.cores[0].handle_relay(new).call, Some(id));
    assert_eq!(w.cores[0].handle_relay(old).call, None);
}

#[test]
fn a_suspended_call_is_resumed_when_the_other_member_comes_back() {
    let mut w = World::new(Net::between(Kind::Symmetric, Kind::PortRestricted));
    let id = w.call(Policy::Auto);
    let callee = w.callee();
    w.run_for(Duration::from_secs(1));
    w.cores[0].set_proof(id, [3; 32]);
    w.cores[1].set_proof(callee, [3; 32]);
    // bob's connection drops; alice is told the call is suspended and re-announces it.
    w.server.lose(1);
    let now = w.now;
    w.cores[1].handle_server_lost(now, "reset");
    w.drain();
    assert!(!w.cores[0].server_knows(id));
    assert!(
        w.server.received[0]
            .iter()
            .any(|m| matches!(m, ClientMsg::Resume { .. }))
    );
    w.register(1);
    assert!(w.cores[0].server_knows(id) && w.cores[1].server_knows(callee));
    assert_eq!(w.view(0, id).end, None);
}

#[test]
fn a_relayed_call_that_cannot_be_resumed_ends_but_a_direct_one_goes_on() {
    for (a, b, ends) in [
        (Kind::Symmetric, Kind::PortRestricted, true),
        (Kind::FullCone, Kind::FullCone, false),
    ] {
        let mut w = World::new(Net::between(a, b));
        let id = w.call(Policy::Auto);
        w.run_for(Duration::from_secs(2));
        w.cores[0].set_proof(id, [5; 32]);
        let old = w.cores[0].calls[&id].server_id.expect("known");
        let now = w.now;
        w.cores[0].handle_server_lost(now, "gone");
        w.register(0);
        w.cores[0].handle_server_msg(
            now,
            ServerMsg::ResumeFailed {
                call: old,
                reason: "bob did not resume the call within 30 s".into(),
            },
        );
        assert_eq!(w.view(0, id).end.is_some(), ends, "{a:?} × {b:?}: {:?}", w.view(0, id));
    }
}

#[test]
fn relay_health_checks_are_counted_in_the_core() {
    let mut w = World::new(Net::between(Kind::FullCone, Kind::FullCone));
    let acks: Vec<Option<u32>> = (0..9).map(|_| w.cores[0].handle_relay(77).ack).collect();
    assert_eq!(
        acks,
        vec![None, None, None, Some(4), None, None, None, Some(4), None],
        "one ack per relay_ack_every frames, whoever they were for"
    );
    let now = w.now;
    w.cores[0].handle_server_lost(now, "gone");
    w.register(0);
    assert_eq!(
        w.cores[0].handle_relay(77).ack,
        None,
        "the count starts over on a new connection"
    );
}

#[test]
fn a_held_hang_up_follows_the_relayed_close_or_its_deadline() {
    let mut w = World::new(Net::between(Kind::Symmetric, Kind::Symmetric));
    let id = w.call(Policy::RelayOnly);
    w.run_for(Duration::from_secs(1));
    let now = w.now;
    w.cores[0].release(now, id, "bye");
    assert!(w.cores[0].poll_control().is_none(), "held until QUIC's close goes out");
    assert!(matches!(w.cores[0].route_quic(FakeAddr::of(id)), Route::Relay(_)));
    assert!(matches!(
        w.cores[0].poll_control(),
        Some((ClientMsg::Hangup { .. }, Lane::AfterRelay))
    ));
    // Without a packet, the deadline releases it.
    let id2 = w.call(Policy::RelayOnly);
    w.run_for(Duration::from_secs(1));
    let sid2 = w.cores[0].calls[&id2].server_id.expect("known");
    let now = w.now;
    w.cores[0].release(now, id2, "bye");
    w.drain();
    let told = |w: &World| {
        w.server.received[0]
            .iter()
            .any(|m| matches!(m, ClientMsg::Hangup { call, .. } if *call == sid2))
    };
    assert!(!told(&w), "held for the close");
    w.run_for(Duration::from_millis(100));
    assert!(told(&w), "released by its deadline");
    assert!(!w.server.calls.contains_key(&sid2));
}

#[test]
fn a_start_nobody_waits_for_is_hung_up() {
    let mut w = World::new(Net::between(Kind::FullCone, Kind::FullCone));
    let now = w.now;
    w.cores[0].handle_server_msg(
        now,
        ServerMsg::Start(CallStart {
            call: 4242,
            peer: "mallory".into(),
            fingerprint: key(1),
            candidates: Candidates::default(),
            password: "x".into(),
            controlling: true,
            delay_ms: 0,
            policy: Policy::Auto,
        }),
    );
    assert!(matches!(
        w.cores[0].poll_control(),
        Some((ClientMsg::Hangup { call: 4242, .. }, Lane::Control))
    ));
    assert_eq!(w.cores[0].len(), 0);
}

#[test]
fn a_room_session_starts_without_ringing_and_ends_with_the_server() {
    let mut w = World::new(Net::between(Kind::FullCone, Kind::FullCone));
    let now = w.now;
    let start = CallStart {
        call: 4343,
        peer: "bob".into(),
        fingerprint: key(2),
        candidates: Candidates::default(),
        password: "pw".into(),
        controlling: false,
        delay_ms: 0,
        policy: Policy::Auto,
    };
    w.cores[0].handle_server_msg(
        now,
        ServerMsg::RoomPeer {
            room: "team".into(),
            start: start.clone(),
        },
    );
    let id = match w.cores[0].poll_event() {
        Some(Event::RoomPeer { room, peer, id, role }) => {
            assert_eq!((room.as_str(), peer.as_str(), role), ("team", "bob", Role::Callee));
            id
        }
        other => panic!("{other:?}"),
    };
    let view = w.cores[0].call(id).expect("the session is a call");
    assert_eq!(view.phase, Phase::Running, "nobody rings: it starts at once");
    assert_eq!(view.start.as_ref(), Some(&start));
    assert_eq!(w.cores[0].call_of_server(4343), Some(id));
    assert!(
        w.cores[0].is_pinned(&key(2)),
        "the other member's key is pinned for the QUIC handshake"
    );
    w.cores[0].handle_server_msg(
        now,
        ServerMsg::CallEnded {
            call: 4343,
            reason: "bob left the room".into(),
        },
    );
    let view = w.cores[0].call(id).expect("still known until released");
    assert_eq!(view.end, Some(CallEnd::Ended("bob left the room".into())));
}
