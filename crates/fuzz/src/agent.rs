//! `stun_agent`: datagrams and time at a peer's ICE agent ([`Agent`]), driven the way the
//! peer's driver does (timers at their deadlines, every output drained).
//!
//! Input: one byte of setup (bit 0: the agent is controlling, bit 1: it tries LAN candidates),
//! then records `ctl: u8, len: u16 BE, datagram`. `ctl` bits 2–6 advance the clock by that
//! many 10 ms steps (timers due on the way run first); bits 0–1 pick the source among
//! [`SOURCES`]. With bit 7 set the record has no length or datagram and bits 0–1 pick an
//! action instead: restart, UDP unusable, or activity from source 0 or 2. An empty datagram
//! only advances the clock.
//!
//! The agent's credentials are fixed, so recorded exchanges ([`crate::seeds`]) replay
//! through authentication. Invariants: every datagram the agent sends is STUN, under 512
//! bytes, to a candidate or a source it heard from; every pair it validates or selects is
//! one of those; a timer never fires 64 times without moving.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use natcall_traversal::{Agent, Candidate, Config, Credentials, Event, Role, Transmit, looks_like_stun};

use crate::epoch;
use crate::input::Input;

/// The call's password, known to both agents.
pub const PASSWORD: &str = "fuzz-call-password";
/// The address the agent's peer sees it at (where the peer's agent sends).
pub const AGENT_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 20)), 3000);
/// Where datagrams come from: the peer's public address and its LAN address (both
/// candidates of the agent), and two addresses it does not know (peer-reflexive).
pub const SOURCES: [SocketAddr; 4] = [
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 40_001),
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 168, 1, 2)), 5000),
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 6000),
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99)), 7),
];
/// One clock step of a record.
pub const STEP: Duration = Duration::from_millis(10);
/// How long the agent tries before it falls back to the relay.
pub const BUDGET: Duration = Duration::from_secs(1);
/// `ctl` bit 7: an action record.
pub const ACTION: u8 = 0x80;

/// The agent under test, its clock, and what it said.
#[derive(Debug)]
pub struct Harness {
    agent: Agent,
    now: Instant,
    /// Events in the order they came.
    pub events: Vec<Event>,
}

impl Harness {
    /// The agent a `stun_agent` input's setup byte describes, started at the epoch.
    pub fn new(setup: u8) -> Self {
        let role = if setup & 1 == 1 {
            Role::Controlling
        } else {
            Role::Controlled
        };
        let credentials = Credentials::new(PASSWORD, "agent", "peer").expect("fixed valid credentials");
        let remote = vec![Candidate::server_reflexive(SOURCES[0]), Candidate::lan(SOURCES[1])];
        let mut config = Config::default();
        config.rng_seed = 0x5eed;
        // A shorter budget than a call's 5 s: the same states, a fifth of the retransmissions
        // per input (every check the agent sends costs a SASLprep and an HMAC).
        config.budget = BUDGET;
        let agent = Agent::new(config, role, credentials, remote, setup & 2 == 2, epoch());
        Self {
            agent,
            now: epoch(),
            events: Vec::new(),
        }
    }

    /// The agent's clock.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Runs one record; returns what the agent sent meanwhile.
    pub fn step(&mut self, ctl: u8, datagram: &[u8]) -> Vec<Transmit> {
        let mut sent = self.drain();
        sent.extend(self.advance(STEP * u32::from((ctl >> 2) & 0x1f)));
        let source = SOURCES[usize::from(ctl & 3)];
        if ctl & ACTION != 0 {
            match ctl & 3 {
                0 => self.agent.restart(self.now),
                1 => self.agent.handle_udp_unusable(self.now),
                2 => self.agent.handle_activity(self.now, SOURCES[0]),
                _ => self.agent.handle_activity(self.now, SOURCES[2]),
            }
        } else if !datagram.is_empty() {
            self.agent.handle_input(self.now, source, datagram);
        }
        sent.extend(self.drain());
        sent
    }

    /// Moves the clock by `by`, firing the timers due on the way.
    fn advance(&mut self, by: Duration) -> Vec<Transmit> {
        let target = self.now + by;
        let mut sent = Vec::new();
        let mut stuck = 0;
        while let Some(at) = self.agent.poll_timeout().filter(|&at| at <= target) {
            if at <= self.now {
                stuck += 1;
                assert!(stuck < 64, "the agent's timer does not move past {:?}", at - epoch());
            } else {
                stuck = 0;
            }
            self.now = self.now.max(at);
            self.agent.handle_timeout(self.now);
            sent.extend(self.drain());
        }
        self.now = target;
        sent
    }

    fn drain(&mut self) -> Vec<Transmit> {
        let sent: Vec<_> = std::iter::from_fn(|| self.agent.poll_transmit()).collect();
        for t in &sent {
            assert!(t.contents.len() < 512, "{}-byte datagram", t.contents.len());
            assert!(
                looks_like_stun(&t.contents),
                "the agent sent something that is not STUN"
            );
            assert!(
                SOURCES.contains(&t.destination),
                "sent to {} that nobody named",
                t.destination
            );
        }
        while let Some(event) = self.agent.poll_event() {
            match event {
                Event::PairValidated { remote, .. } | Event::Selected { remote, .. } | Event::PathLost { remote } => {
                    assert!(SOURCES.contains(&remote), "a pair with {remote} that nobody named");
                }
                _ => {}
            }
            self.events.push(event);
        }
        sent
    }
}

/// The `stun_agent` target.
pub fn stun_agent(data: &[u8]) {
    let mut input = Input::new(data);
    let mut harness = Harness::new(input.u8());
    while !input.is_empty() {
        let ctl = input.u8();
        let datagram = if ctl & ACTION == 0 { input.long_bytes() } else { &[] };
        harness.step(ctl, datagram);
    }
}
