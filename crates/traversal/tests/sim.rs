//! Deterministic simulations of two traversal agents through modelled NATs.

#[path = "sim/network.rs"]
mod network;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natcall_traversal::{Agent, Candidate, Config, Credentials, Event, PathKind, RelayReason, Role};
use network::{Filtering, Host, Mapping, Nat, NatConfig, Network, Sim};

/// What sits in front of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Public,
    FullCone,
    AddressRestricted,
    PortRestricted,
    Symmetric,
    UdpBlocked,
}

impl Kind {
    fn nat(self, hairpin: bool) -> Option<NatConfig> {
        use {Filtering as F, Mapping as M};
        let (mapping, filtering, udp_blocked) = match self {
            Kind::Public => return None,
            Kind::FullCone => (M::EndpointIndependent, F::EndpointIndependent, false),
            Kind::AddressRestricted => (M::EndpointIndependent, F::AddressDependent, false),
            Kind::PortRestricted => (M::EndpointIndependent, F::AddressAndPortDependent, false),
            Kind::Symmetric => (M::AddressAndPortDependent, F::AddressAndPortDependent, false),
            Kind::UdpBlocked => (M::EndpointIndependent, F::AddressAndPortDependent, true),
        };
        Some(NatConfig {
            mapping,
            filtering,
            hairpin,
            udp_blocked,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Path(PathKind),
    Relay,
}

#[allow(clippy::disallowed_methods)] // the origin of virtual time, read once per test
fn origin() -> Instant {
    Instant::now()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn config(seed: u64) -> Config {
    let mut config = Config::default();
    config.rng_seed = seed;
    config
}

/// Peers on two different LANs (or public), `a` controlling.
fn network_between(a: Kind, b: Kind, latency: Duration) -> Network {
    let mut nats = Vec::new();
    let mut host = |kind: Kind, private: &str, public: &str| match kind.nat(false) {
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
    Network::new(hosts, nats, latency)
}

/// Both peers behind one port-restricted NAT.
fn same_lan_network(hairpin: bool) -> Network {
    let nat = Kind::PortRestricted.nat(hairpin).expect("a NAT");
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
    Network::new(
        hosts,
        vec![Nat::new(addr("198.51.100.1:0").ip(), nat)],
        Duration::from_millis(10),
    )
}

/// What the rendezvous server does: learn each side's server-reflexive address, hand
/// each side the other's candidates, and start both agents at `t0`.
fn start(mut network: Network, configs: [Config; 2], t0: Instant) -> Sim {
    let srflx = [network.server_reflexive(0), network.server_reflexive(1)];
    let try_lan = matches!(srflx, [Some(a), Some(b)] if a.ip() == b.ip());
    let agent = |side: usize, role: Role, config: Config| {
        let other = 1 - side;
        let mut candidates = vec![Candidate::lan(network.hosts[other].addr)];
        candidates.extend(srflx[other].map(Candidate::server_reflexive));
        let ufrags = ["alice", "bob"];
        let credentials = Credentials::new("call-password-42", ufrags[side], ufrags[other]).expect("valid credentials");
        let mut agent = Agent::new(config, role, credentials, candidates, try_lan, t0);
        if srflx[side].is_none() {
            agent.handle_udp_unusable(t0); // the server STUN went unanswered
        }
        agent
    };
    let [c0, c1] = configs;
    let agents = [agent(0, Role::Controlling, c0), agent(1, Role::Controlled, c1)];
    Sim::new(t0, network, agents)
}

fn decided(sim: &Sim) -> bool {
    (0..2).all(|side| sim.outcome(side).is_some())
}

/// Runs one scenario and checks the outcome on both sides and how long it took.
fn run_scenario(network: Network, expect: Expect, within: Duration) -> Sim {
    let t0 = origin();
    let mut sim = start(network, [config(1), config(2)], t0);
    assert!(
        sim.run_until(t0 + Duration::from_secs(10), decided),
        "undecided: {:?}",
        sim.events
    );
    for side in 0..2 {
        let (at, event) = sim.outcome(side).expect("decided");
        match (expect, event) {
            (Expect::Path(kind), Event::Selected { kind: got, .. }) => {
                assert_eq!(got, kind, "side {side}: {:?}", sim.events);
                assert!(at <= within, "side {side} selected after {at:?}: {:?}", sim.events);
            }
            (
                Expect::Relay,
                Event::UseRelay {
                    reason: RelayReason::UdpUnusable,
                },
            ) => {
                assert_eq!(at, Duration::ZERO);
            }
            (
                Expect::Relay,
                Event::UseRelay {
                    reason: RelayReason::NoValidPair { after },
                },
            ) => {
                assert_eq!(at, Config::default().budget, "relay decided at the budget");
                assert_eq!(after, Config::default().budget);
            }
            _ => panic!("side {side}: expected {expect:?}, got {:?}", sim.events),
        }
    }
    // Both sides agree on one path: each one's remote is the other's address as seen.
    if let (Some((_, Event::Selected { .. })), Some((_, Event::Selected { .. }))) = (sim.outcome(0), sim.outcome(1)) {
        let selected = sim
            .events
            .iter()
            .flatten()
            .filter(|(_, e)| matches!(e, Event::Selected { .. }));
        assert_eq!(selected.count(), 2, "exactly one Selected per side");
    }
    sim
}

const DIRECT_WITHIN: Duration = Duration::from_millis(300);

macro_rules! nat_matrix {
    ($($name:ident: $a:ident x $b:ident => $expect:expr;)*) => {$(
        #[test]
        fn $name() {
            let within = match $expect {
                Expect::Path(_) => DIRECT_WITHIN,
                Expect::Relay => Config::default().budget,
            };
            let latency = Duration::from_millis(10);
            // Both orders: each kind once on the controlling side.
            run_scenario(network_between(Kind::$a, Kind::$b, latency), $expect, within);
            run_scenario(network_between(Kind::$b, Kind::$a, latency), $expect, within);
        }
    )*};
}

const DIRECT: Expect = Expect::Path(PathKind::Direct);
const RELAY: Expect = Expect::Relay;

nat_matrix! {
    public_x_public_connects_direct: Public x Public => DIRECT;
    public_x_full_cone_connects_direct: Public x FullCone => DIRECT;
    public_x_address_restricted_connects_direct: Public x AddressRestricted => DIRECT;
    public_x_port_restricted_connects_direct: Public x PortRestricted => DIRECT;
    public_x_symmetric_connects_direct: Public x Symmetric => DIRECT;
    public_x_udp_blocked_falls_back_to_relay: Public x UdpBlocked => RELAY;
    full_cone_x_full_cone_connects_direct: FullCone x FullCone => DIRECT;
    full_cone_x_address_restricted_connects_direct: FullCone x AddressRestricted => DIRECT;
    full_cone_x_port_restricted_connects_direct: FullCone x PortRestricted => DIRECT;
    full_cone_x_symmetric_connects_direct: FullCone x Symmetric => DIRECT;
    full_cone_x_udp_blocked_falls_back_to_relay: FullCone x UdpBlocked => RELAY;
    address_restricted_x_address_restricted_connects_direct:
        AddressRestricted x AddressRestricted => DIRECT;
    address_restricted_x_port_restricted_connects_direct:
        AddressRestricted x PortRestricted => DIRECT;
    address_restricted_x_symmetric_connects_direct: AddressRestricted x Symmetric => DIRECT;
    address_restricted_x_udp_blocked_falls_back_to_relay: AddressRestricted x UdpBlocked => RELAY;
    port_restricted_x_port_restricted_connects_direct: PortRestricted x PortRestricted => DIRECT;
    port_restricted_x_symmetric_falls_back_to_relay: PortRestricted x Symmetric => RELAY;
    port_restricted_x_udp_blocked_falls_back_to_relay: PortRestricted x UdpBlocked => RELAY;
    symmetric_x_symmetric_falls_back_to_relay: Symmetric x Symmetric => RELAY;
    symmetric_x_udp_blocked_falls_back_to_relay: Symmetric x UdpBlocked => RELAY;
    udp_blocked_x_udp_blocked_falls_back_to_relay: UdpBlocked x UdpBlocked => RELAY;
}

#[test]
fn same_lan_with_hairpin_selects_lan() {
    let sim = run_scenario(
        same_lan_network(true),
        Expect::Path(PathKind::Lan),
        Duration::from_millis(20),
    );
    let public_checks = sim.events.iter().flatten().filter(|(_, e)| {
        matches!(
            e,
            Event::PairValidated {
                kind: PathKind::Direct,
                ..
            }
        )
    });
    assert_eq!(public_checks.count(), 0, "LAN won before public pairs started");
}

#[test]
fn same_lan_without_hairpin_selects_lan() {
    run_scenario(
        same_lan_network(false),
        Expect::Path(PathKind::Lan),
        Duration::from_millis(20),
    );
}

/// Time from start until `side` first validated a direct pair.
fn first_validated(sim: &Sim, side: usize) -> Option<Duration> {
    sim.events[side].iter().find_map(|(at, e)| match e {
        Event::PairValidated {
            kind: PathKind::Direct, ..
        } => Some(*at),
        _ => None,
    })
}

#[test]
fn port_restricted_pair_at_30ms_validates_within_two_rtts() {
    let network = network_between(Kind::PortRestricted, Kind::PortRestricted, Duration::from_millis(30));
    let sim = run_scenario(network, DIRECT, Duration::from_millis(300));
    let (a, b) = (
        first_validated(&sim, 0).expect("a valid"),
        first_validated(&sim, 1).expect("b valid"),
    );
    let selected = sim.outcome(0).expect("selected").0;
    println!("port-restricted x port-restricted @30ms one-way: validated a={a:?} b={b:?}, selected {selected:?}");
    assert!(a.max(b) <= Duration::from_millis(120), "validated a={a:?} b={b:?}");
}

#[test]
fn high_latency_and_loss_still_connect() {
    for seed in 0..20 {
        let t0 = origin();
        let mut network = network_between(Kind::PortRestricted, Kind::PortRestricted, Duration::from_millis(30));
        network.loss = 0.05;
        network.reseed(seed);
        let mut sim = start(network, [config(seed * 2 + 1), config(seed * 2 + 2)], t0);
        sim.run_until(t0 + Duration::from_secs(10), decided);
        for side in 0..2 {
            let outcome = sim.outcome(side);
            assert!(
                matches!(outcome, Some((at, Event::Selected { kind: PathKind::Direct, .. })) if at < Duration::from_secs(3)),
                "seed {seed} side {side}: {:?}",
                sim.events
            );
        }
    }
}

#[test]
fn silent_selected_path_is_lost_and_restart_selects_again() {
    let t0 = origin();
    let mut configs = [config(1), config(2)];
    for c in &mut configs {
        c.keepalive_interval = Duration::from_secs(1);
        c.liveness_timeout = Duration::from_secs(3);
    }
    let network = network_between(Kind::PortRestricted, Kind::PortRestricted, Duration::from_millis(10));
    let mut sim = start(network, configs, t0);
    assert!(sim.run_until(t0 + Duration::from_secs(1), decided));

    // An idle path is kept alive by keepalives: nothing is lost in a minute.
    let sent_before = sim.datagrams_sent;
    sim.run_until(t0 + Duration::from_secs(60), |_| false);
    assert!(
        sim.events
            .iter()
            .flatten()
            .all(|(_, e)| !matches!(e, Event::PathLost { .. }))
    );
    let keepalives = sim.datagrams_sent - sent_before;
    assert!(
        (60..=240).contains(&keepalives),
        "{keepalives} keepalive datagrams in ~60 s"
    );

    // The path starts dropping everything.
    sim.network.partitioned = true;
    let cut = sim.now;
    let lost = |sim: &Sim| (0..2).all(|s| matches!(sim.outcome(s), Some((_, Event::PathLost { .. }))));
    assert!(sim.run_until(cut + Duration::from_secs(10), lost), "{:?}", sim.events);
    let lost_after = sim.now - cut;
    assert!(lost_after <= Duration::from_millis(3800), "lost after {lost_after:?}");
    assert_eq!(sim.agents[0].poll_timeout(), None, "idle after PathLost");

    // The path heals; both sides restart (the server tells them to) and select again.
    sim.network.partitioned = false;
    let restart_at = sim.now;
    for agent in &mut sim.agents {
        agent.restart(restart_at);
    }
    sim.drain();
    let selected = |sim: &Sim| (0..2).all(|s| matches!(sim.outcome(s), Some((_, Event::Selected { .. }))));
    assert!(
        sim.run_until(restart_at + Duration::from_secs(1), selected),
        "{:?}",
        sim.events
    );
    assert!(sim.now - restart_at <= DIRECT_WITHIN);
}

#[test]
fn activity_suppresses_keepalives() {
    let t0 = origin();
    let network = network_between(Kind::Public, Kind::FullCone, Duration::from_millis(10));
    let mut sim = start(network, [config(1), config(2)], t0);
    assert!(sim.run_until(t0 + Duration::from_secs(1), decided));
    let remotes: Vec<SocketAddr> = (0..2)
        .map(|s| match sim.outcome(s) {
            Some((_, Event::Selected { remote, .. })) => remote,
            other => panic!("{other:?}"),
        })
        .collect();
    let sent_before = sim.datagrams_sent;
    // QUIC traffic every second for a minute: no STUN needed at all.
    for second in 1..=60 {
        let until = t0 + Duration::from_secs(second);
        sim.run_until(until, |_| false);
        sim.now = until;
        for (agent, remote) in sim.agents.iter_mut().zip(&remotes) {
            agent.handle_activity(until, *remote);
        }
        sim.drain();
    }
    assert_eq!(sim.datagrams_sent, sent_before);
}

/// Agent `alice` (controlling) with one candidate, and the check it sent first.
fn agent_with_check(t0: Instant) -> (Agent, SocketAddr, Vec<u8>) {
    let peer = addr("203.0.113.9:6000");
    let credentials = Credentials::new("right-password", "alice", "bob").expect("credentials");
    let candidates = vec![Candidate::server_reflexive(peer)];
    let mut agent = Agent::new(config(1), Role::Controlling, credentials, candidates, false, t0);
    agent.handle_timeout(t0);
    let check = agent.poll_transmit().expect("first check");
    assert_eq!(check.destination, peer);
    (agent, peer, check.contents)
}

fn response(password: &str, check: &[u8], mapped: SocketAddr) -> Vec<u8> {
    use stun_rs::attributes::stun::{Fingerprint, MessageIntegrity, XorMappedAddress};
    use stun_rs::{HMACKey, MessageClass, MessageEncoderBuilder, StunMessageBuilder, TransactionId};
    let mut id = [0u8; 12];
    id.copy_from_slice(&check[8..20]);
    let key = HMACKey::new_short_term(password).expect("key");
    let message = StunMessageBuilder::new(stun_rs::methods::BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(TransactionId::from(id))
        .with_attribute(XorMappedAddress::from(mapped))
        .with_attribute(MessageIntegrity::new(key))
        .with_attribute(Fingerprint::default())
        .build();
    let mut buf = [0u8; 256];
    let len = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, &message)
        .expect("encode");
    buf[..len].to_vec()
}

#[test]
fn spoofed_or_unauthenticated_responses_never_validate() {
    let t0 = origin();
    let (mut agent, peer, check) = agent_with_check(t0);
    let mapped = addr("198.51.100.1:40001");
    let now = t0 + Duration::from_millis(20);
    // Wrong password, from the probed address.
    assert!(!agent.handle_input(now, peer, &response("wrong-password", &check, mapped)));
    // Right password and transaction id, but from another host (e.g. a CGNAT neighbour).
    let elsewhere = addr("203.0.113.10:6000");
    agent.handle_input(now, elsewhere, &response("right-password", &check, mapped));
    // Right password, right address, unknown transaction id.
    let mut other_txid = check.clone();
    other_txid[8] ^= 0xff;
    agent.handle_input(now, peer, &response("right-password", &other_txid, mapped));
    assert_eq!(agent.poll_event(), None);
    // The genuine response still validates (and, as the only pair, is nominated).
    assert!(agent.handle_input(now, peer, &response("right-password", &check, mapped)));
    assert!(matches!(agent.poll_event(), Some(Event::PairValidated { remote, .. }) if remote == peer));
}

mod hostile_input {
    use super::*;
    use proptest::prelude::*;

    fn assert_quiet(agent: &mut Agent) -> Result<(), TestCaseError> {
        prop_assert_eq!(agent.poll_event(), None);
        Ok(())
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_or_produce_events(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let t0 = origin();
            let (mut agent, peer, _) = agent_with_check(t0);
            agent.handle_input(t0, peer, &data);
            assert_quiet(&mut agent)?;
        }

        #[test]
        fn truncated_or_flipped_responses_never_panic_or_produce_events(cut in 0usize..200, bit in 0usize..1600) {
            let t0 = origin();
            let (mut agent, peer, check) = agent_with_check(t0);
            let genuine = response("right-password", &check, addr("198.51.100.1:40001"));
            let mut flipped = genuine.clone();
            flipped[(bit / 8) % genuine.len()] ^= 1 << (bit % 8);
            agent.handle_input(t0, peer, &flipped);
            agent.handle_input(t0, peer, &genuine[..cut.min(genuine.len() - 1)]);
            assert_quiet(&mut agent)?;
        }

        #[test]
        fn truncated_or_flipped_checks_never_panic_or_produce_events(cut in 0usize..200, bit in 0usize..1600) {
            let t0 = origin();
            let (mut agent, peer, check) = agent_with_check(t0);
            let mut flipped = check.clone();
            flipped[(bit / 8) % check.len()] ^= 1 << (bit % 8);
            agent.handle_input(t0, peer, &flipped);
            agent.handle_input(t0, peer, &check[..cut.min(check.len())]);
            assert_quiet(&mut agent)?;
        }
    }
}

/// A symmetric NAT that hands out ports in sequence (the model's) behind the controlled side:
/// the ordinary checks fail, and the port-restricted side's probes at the predicted ports find
/// the one the symmetric NAT opened towards it. The winning candidate is a predicted one.
#[test]
fn probes_at_predicted_ports_traverse_a_sequential_symmetric_nat() {
    let t0 = origin();
    let mut network = network_between(Kind::PortRestricted, Kind::Symmetric, Duration::from_millis(10));
    let hard = network.server_reflexive(1).expect("UDP works");
    let mut sim = start(network, [config(1), config(2)], t0);
    let targets = natcall_traversal::birthday::targets(hard.ip(), hard.port(), Some(1), 64, 5);
    sim.agents[0].probe(
        t0,
        targets.clone(),
        Duration::from_millis(4),
        Duration::from_millis(100),
    );
    assert!(sim.run_until(t0 + Duration::from_secs(10), decided), "{:?}", sim.events);
    for side in 0..2 {
        let (at, event) = sim.outcome(side).expect("decided");
        assert!(
            matches!(
                event,
                Event::Selected {
                    kind: PathKind::Direct,
                    ..
                }
            ),
            "side {side}: {:?}",
            sim.events
        );
        assert!(at < Duration::from_secs(1), "side {side} after {at:?}");
    }
    let won = sim.agents[0].selected().expect("selected");
    assert_eq!(won.kind, natcall_traversal::CandidateKind::Predicted);
    assert!(targets.contains(&won.addr));
    let sent = sim.agents[0].probes_sent();
    assert!(
        sent >= 1 && sent < targets.len(),
        "probing stops once a pair is valid: {sent}"
    );

    // The same pair without probes relays at the budget.
    run_scenario(
        network_between(Kind::PortRestricted, Kind::Symmetric, Duration::from_millis(10)),
        RELAY,
        Config::default().budget,
    );
}

/// Probes are paced (one per interval after the delay) and bounded by the target list; none
/// is sent once the agent gave up.
#[test]
fn probes_are_paced_bounded_and_stop_with_the_checks() {
    let t0 = origin();
    let credentials = Credentials::new("call-password-42", "alice", "bob").expect("valid credentials");
    let mut agent = Agent::new(config(3), Role::Controlling, credentials, Vec::new(), false, t0);
    let targets: Vec<SocketAddr> = (0..10).map(|i| addr(&format!("203.0.113.9:{}", 2000 + i))).collect();
    agent.probe(
        t0,
        targets.clone(),
        Duration::from_millis(10),
        Duration::from_millis(50),
    );
    let mut sent = Vec::new();
    let mut now = t0;
    while let Some(t) = agent.poll_timeout() {
        now = t;
        agent.handle_timeout(now);
        while let Some(tx) = agent.poll_transmit() {
            assert!(tx.probe && tx.contents.len() < 512);
            sent.push((now - t0, tx.destination));
        }
        if agent.poll_event().is_some() {
            break;
        }
    }
    assert_eq!(sent.len(), targets.len(), "each target once");
    assert_eq!(sent[0], (Duration::from_millis(50), targets[0]));
    assert_eq!(sent[9], (Duration::from_millis(140), targets[9]));
    assert_eq!(
        now - t0,
        Config::default().budget,
        "then the agent gives up at its budget"
    );
    agent.handle_timeout(now + Duration::from_secs(1));
    assert!(agent.poll_transmit().is_none());
}

/// Probing runs again on a restart (the next attempt at a direct path), three runs at most.
#[test]
fn probing_runs_at_most_three_times_per_agent() {
    let t0 = origin();
    let credentials = Credentials::new("call-password-42", "alice", "bob").expect("valid credentials");
    let mut agent = Agent::new(config(4), Role::Controlling, credentials, Vec::new(), false, t0);
    let targets: Vec<SocketAddr> = (0..3).map(|i| addr(&format!("203.0.113.9:{}", 3000 + i))).collect();
    agent.probe(t0, targets, Duration::from_millis(10), Duration::ZERO);
    let mut now = t0;
    let mut per_run = Vec::new();
    for _ in 0..5 {
        let mut sent = 0;
        while let Some(t) = agent.poll_timeout() {
            now = t;
            agent.handle_timeout(now);
            while let Some(tx) = agent.poll_transmit() {
                sent += usize::from(tx.probe);
            }
            if agent.poll_event().is_some() {
                break;
            }
        }
        per_run.push(sent);
        agent.restart(now);
    }
    assert_eq!(per_run, [3, 3, 3, 0, 0]);
}
