//! Birthday traversal of a NAT that gives every destination a new public port (RFC 4787
//! endpoint-dependent mapping: a "symmetric" NAT), when the other peer's NAT keeps one port for
//! all destinations.
//!
//! The hard side (the symmetric NAT) opens [`Config::birthday_sockets`] sockets and sends one
//! packet from each to the easy side's public address: its NAT now holds that many ports, each
//! open to exactly that address. The easy side sends checks ([`crate::Agent::probe`]) to the
//! hard side's public IP at the ports [`targets`] guesses. With `n` ports open among the
//! `N` = 64 512 a NAT hands out, each random probe hits one with probability `n / N`: with
//! 256 sockets, half the runs hit within 175 probes, 98 % within 1 000, and
//! 1 − (1 − 256/64 512)^2 048 ≈ 99.97 % within the default 2 048. A hit reaches the hard side
//! as an ordinary check, and the checks that follow validate the pair both ways.
//!
//! When the symmetric NAT hands ports out in sequence (`step`), the next ports are predicted
//! and probed first.
//!
//! [`Config::birthday_sockets`]: crate::Config::birthday_sockets

use std::net::{IpAddr, SocketAddr};

use crate::rng::SplitMix64;

/// The lowest port a NAT hands out (ports below are left to services).
pub const FIRST_PORT: u16 = 1024;
/// Ports predicted from a sequential allocation, at most, before the random ones.
pub const MAX_PREDICTED: usize = 512;

/// The addresses to probe on `ip`, at most `count`: with a sequential `step`, the ports after
/// `last_port` (the peer's public port as the server saw it) in that step first; then distinct
/// random ports in `FIRST_PORT..=65535`, none twice, shuffled with `seed`.
pub fn targets(ip: IpAddr, last_port: u16, step: Option<i32>, count: usize, seed: u64) -> Vec<SocketAddr> {
    let mut out = Vec::with_capacity(count);
    let mut taken = vec![false; 65_536];
    if let Some(step) = step.filter(|s| *s != 0) {
        let mut port = i32::from(last_port);
        for _ in 0..count.min(MAX_PREDICTED) {
            port += step;
            let Ok(p) = u16::try_from(port) else { break };
            if p < FIRST_PORT {
                break;
            }
            if !taken[usize::from(p)] {
                taken[usize::from(p)] = true;
                out.push(SocketAddr::new(ip, p));
            }
        }
    }
    let mut ports: Vec<u16> = (FIRST_PORT..=u16::MAX).filter(|p| !taken[usize::from(*p)]).collect();
    let mut rng = SplitMix64::new(seed);
    let want = count.saturating_sub(out.len()).min(ports.len());
    // A partial Fisher–Yates shuffle: the first `want` entries are a uniform random sample.
    for i in 0..want {
        let j = i + (rng.next_u64() % (ports.len() - i) as u64) as usize;
        ports.swap(i, j);
        out.push(SocketAddr::new(ip, ports[i]));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7));

    #[test]
    fn random_targets_are_distinct_ports_in_range_and_vary_with_the_seed() {
        let a = targets(IP, 40_000, None, 2048, 1);
        assert_eq!(a.len(), 2048);
        let ports: HashSet<u16> = a.iter().map(|t| t.port()).collect();
        assert_eq!(ports.len(), 2048, "no port twice");
        assert!(a.iter().all(|t| t.ip() == IP && t.port() >= FIRST_PORT));
        assert_ne!(a, targets(IP, 40_000, None, 2048, 2));
        assert_eq!(a, targets(IP, 40_000, None, 2048, 1));
    }

    #[test]
    fn a_sequential_nat_has_its_next_ports_probed_first() {
        let t = targets(IP, 40_000, Some(2), 1000, 9);
        let first: Vec<u16> = t.iter().take(3).map(|t| t.port()).collect();
        assert_eq!(first, [40_002, 40_004, 40_006]);
        assert_eq!(t.len(), 1000);
        let ports: HashSet<u16> = t.iter().map(|t| t.port()).collect();
        assert_eq!(ports.len(), 1000);
        // Near the top of the range the prediction stops where the ports do.
        let top = targets(IP, 65_530, Some(1), 10, 9);
        assert_eq!(
            top.iter().take(5).map(|t| t.port()).collect::<Vec<_>>(),
            [65_531, 65_532, 65_533, 65_534, 65_535]
        );
        assert_eq!(top.len(), 10);
    }

    #[test]
    fn asking_for_more_than_there_are_gives_every_port_once() {
        let t = targets(IP, 1, None, 100_000, 3);
        assert_eq!(t.len(), usize::from(u16::MAX - FIRST_PORT) + 1);
    }
}
