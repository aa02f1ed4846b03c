//! A model of NAT boxes (RFC 4787 mapping and filtering, hairpinning, blocked UDP) for
//! simulations in virtual time: this crate's own tests and the peer core's.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

/// NAT mapping behaviour (RFC 4787).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// One mapping for every destination ("cone").
    EndpointIndependent,
    /// One mapping per destination IP.
    AddressDependent,
    /// One mapping per destination address and port ("symmetric").
    AddressAndPortDependent,
}

/// NAT filtering behaviour (RFC 4787).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    /// Anyone may answer ("full cone").
    EndpointIndependent,
    /// Only an IP sent to ("restricted").
    AddressDependent,
    /// Only an address and port sent to ("port-restricted").
    AddressAndPortDependent,
}

/// How a NAT behaves.
#[derive(Debug, Clone, Copy)]
pub struct NatConfig {
    /// Which destinations share a mapping.
    pub mapping: Mapping,
    /// Which sources may answer through a mapping.
    pub filtering: Filtering,
    /// Whether hosts behind it reach each other through its public address.
    pub hairpin: bool,
    /// Whether it drops all UDP.
    pub udp_blocked: bool,
}

#[derive(Debug)]
struct Binding {
    internal: SocketAddr,
    sent_to: HashSet<SocketAddr>,
}

/// One NAT box and its mappings.
#[derive(Debug)]
pub struct Nat {
    /// The NAT's public IP.
    pub ip: IpAddr,
    /// How it behaves.
    pub config: NatConfig,
    next_port: u16,
    mappings: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    bindings: HashMap<u16, Binding>,
}

impl Nat {
    /// A NAT with public IP `ip`.
    pub fn new(ip: IpAddr, config: NatConfig) -> Self {
        let next_port = 40_000 + u16::from(ip.to_string().len() as u8) * 100;
        Self {
            ip,
            config,
            next_port,
            mappings: HashMap::new(),
            bindings: HashMap::new(),
        }
    }

    /// Translates an outgoing packet's source; `None` if UDP is blocked.
    pub fn outbound(&mut self, internal: SocketAddr, destination: SocketAddr) -> Option<SocketAddr> {
        if self.config.udp_blocked {
            return None;
        }
        let key = match self.config.mapping {
            Mapping::EndpointIndependent => None,
            Mapping::AddressDependent => Some(SocketAddr::new(destination.ip(), 0)),
            Mapping::AddressAndPortDependent => Some(destination),
        };
        let next_port = &mut self.next_port;
        let port = *self.mappings.entry((internal, key)).or_insert_with(|| {
            *next_port += 1;
            *next_port
        });
        let binding = self.bindings.entry(port).or_insert_with(|| Binding {
            internal,
            sent_to: HashSet::new(),
        });
        binding.sent_to.insert(destination);
        Some(SocketAddr::new(self.ip, port))
    }

    /// The internal destination of an incoming packet, if the filter lets it in.
    pub fn inbound(&self, from: SocketAddr, port: u16) -> Option<SocketAddr> {
        if self.config.udp_blocked {
            return None;
        }
        let binding = self.bindings.get(&port)?;
        let allowed = match self.config.filtering {
            Filtering::EndpointIndependent => true,
            Filtering::AddressDependent => binding.sent_to.iter().any(|a| a.ip() == from.ip()),
            Filtering::AddressAndPortDependent => binding.sent_to.contains(&from),
        };
        allowed.then_some(binding.internal)
    }
}
