//! A simulated network in virtual time: hosts, NAT boxes, latency, seeded loss, and a
//! driver that steps two agents to the earliest delivery or timeout.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use natcall_traversal::sim::{Filtering, Mapping, Nat, NatConfig};
use natcall_traversal::{Agent, Event, Transmit};

pub const SERVER: &str = "192.0.2.1:3478";

/// One peer's host: its socket address and the NAT in front of it, if any.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    pub addr: SocketAddr,
    pub nat: Option<usize>,
}

struct Delivery {
    to: usize,
    from: SocketAddr,
    data: Vec<u8>,
}

/// The network both agents share, plus the deliveries in flight.
pub struct Network {
    pub hosts: [Host; 2],
    pub nats: Vec<Nat>,
    pub latency: Duration,
    pub lan_latency: Duration,
    pub loss: f64,
    /// Drop every packet between the peers (path failure).
    pub partitioned: bool,
    rng: u64,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: HashMap<u64, Delivery>,
    seq: u64,
}

impl Network {
    pub fn new(hosts: [Host; 2], nats: Vec<Nat>, latency: Duration) -> Self {
        Self {
            hosts,
            nats,
            latency,
            lan_latency: Duration::from_millis(1),
            loss: 0.0,
            partitioned: false,
            rng: 0x5EED,
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            seq: 0,
        }
    }

    /// The address the rendezvous server observes for `host` (one packet to the server).
    pub fn server_reflexive(&mut self, host: usize) -> Option<SocketAddr> {
        let server: SocketAddr = SERVER.parse().ok()?;
        let Host { addr, nat } = self.hosts[host];
        match nat {
            Some(nat) => self.nats[nat].outbound(addr, server),
            None => Some(addr),
        }
    }

    /// Changes the loss pattern.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = seed;
    }

    fn random(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Sends `transmit` from host `from` at `now`.
    pub fn send(&mut self, now: Instant, from: usize, transmit: Transmit) {
        let to = 1 - from;
        let (src_host, dst_host) = (self.hosts[from], self.hosts[to]);
        if self.partitioned || self.random() < self.loss {
            return;
        }
        let same_lan = src_host.nat.is_some() && src_host.nat == dst_host.nat;
        // Private destination: reachable only on the same LAN.
        if transmit.destination == dst_host.addr && dst_host.nat.is_some() {
            if same_lan {
                self.enqueue(now + self.lan_latency, to, src_host.addr, transmit.contents);
            }
            return;
        }
        let public_src = match src_host.nat {
            Some(nat) => match self.nats[nat].outbound(src_host.addr, transmit.destination) {
                Some(addr) => addr,
                None => return,
            },
            None => src_host.addr,
        };
        let arrives = now + if same_lan { self.lan_latency } else { self.latency };
        match dst_host.nat {
            None if transmit.destination == dst_host.addr => {
                self.enqueue(arrives, to, public_src, transmit.contents);
            }
            Some(nat) if transmit.destination.ip() == self.nats[nat].ip => {
                if same_lan && !self.nats[nat].config.hairpin {
                    return;
                }
                let inbound = self.nats[nat].inbound(public_src, transmit.destination.port());
                if inbound == Some(dst_host.addr) {
                    self.enqueue(arrives, to, public_src, transmit.contents);
                }
            }
            _ => {} // nobody there
        }
    }

    fn enqueue(&mut self, at: Instant, to: usize, from: SocketAddr, data: Vec<u8>) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.in_flight.insert(self.seq, Delivery { to, from, data });
    }

    fn next_delivery(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, _))| *at)
    }

    fn pop_due(&mut self, now: Instant) -> Option<(usize, SocketAddr, Vec<u8>)> {
        let Reverse((at, seq)) = *self.queue.peek()?;
        if at > now {
            return None;
        }
        self.queue.pop();
        let delivery = self.in_flight.remove(&seq)?;
        Some((delivery.to, delivery.from, delivery.data))
    }
}

/// Two agents on a [`Network`], stepped in virtual time.
pub struct Sim {
    pub t0: Instant,
    pub now: Instant,
    pub network: Network,
    pub agents: [Agent; 2],
    /// Every event with the virtual time (since `t0`) it was emitted.
    pub events: [Vec<(Duration, Event)>; 2],
    pub datagrams_sent: usize,
}

impl Sim {
    pub fn new(t0: Instant, network: Network, agents: [Agent; 2]) -> Self {
        let mut sim = Self {
            t0,
            now: t0,
            network,
            agents,
            events: [vec![], vec![]],
            datagrams_sent: 0,
        };
        sim.drain();
        sim
    }

    /// Collects transmits and events of both agents (the drive contract).
    pub fn drain(&mut self) {
        for side in 0..2 {
            while let Some(transmit) = self.agents[side].poll_transmit() {
                assert!(
                    transmit.contents.len() < 512,
                    "datagram of {} bytes",
                    transmit.contents.len()
                );
                self.datagrams_sent += 1;
                self.network.send(self.now, side, transmit);
            }
            while let Some(event) = self.agents[side].poll_event() {
                self.events[side].push((self.now - self.t0, event));
            }
        }
    }

    /// Advances to the next delivery or timeout; `false` when nothing is left before
    /// `until`.
    pub fn step(&mut self, until: Instant) -> bool {
        let next = [
            self.network.next_delivery(),
            self.agents[0].poll_timeout(),
            self.agents[1].poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next.filter(|&next| next <= until) else {
            return false;
        };
        self.now = self.now.max(next);
        while let Some((to, from, data)) = self.network.pop_due(self.now) {
            self.agents[to].handle_input(self.now, from, &data);
            self.drain();
        }
        for side in 0..2 {
            if self.agents[side].poll_timeout().is_some_and(|t| t <= self.now) {
                self.agents[side].handle_timeout(self.now);
                self.drain();
            }
        }
        true
    }

    /// Steps until `done` holds or `until`; returns whether `done` held.
    pub fn run_until(&mut self, until: Instant, mut done: impl FnMut(&Self) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            if !self.step(until) {
                return done(self);
            }
        }
    }

    /// The last decision of `side`: `Selected`, `UseRelay` or `PathLost`.
    pub fn outcome(&self, side: usize) -> Option<(Duration, Event)> {
        self.events[side]
            .iter()
            .rev()
            .find(|(_, e)| !matches!(e, Event::PairValidated { .. }))
            .copied()
    }
}
