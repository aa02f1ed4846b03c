//! NAT kinds (RFC 4787 mapping × filtering), scenarios, and the oracle of expected paths.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// What stands between a peer and the public network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// No NAT, no firewall: the peer has a public address.
    Public,
    /// Endpoint-independent mapping + endpoint-independent filtering (RFC 3489 full cone).
    FullCone,
    /// Endpoint-independent mapping + address-dependent filtering (restricted cone).
    AddressRestricted,
    /// Endpoint-independent mapping + address-and-port-dependent filtering (port-restricted
    /// cone; what most home routers and Linux masquerade do).
    PortRestricted,
    /// Endpoint-dependent mapping (a fresh random port per destination) + address-and-port-
    /// dependent filtering.
    Symmetric,
    /// A port-restricted home NAT behind a port-restricted carrier-grade NAT (RFC 6888 EIM).
    Cgnat,
    /// A port-restricted NAT whose firewall drops all UDP: only TCP leaves.
    UdpBlocked,
    /// A symmetric NAT whose router runs miniupnpd (UPnP-IGD, NAT-PMP, PCP), as many home
    /// routers do: a peer may ask it to map its port.
    SymmetricUpnp,
}

impl Kind {
    /// Every kind, in table order.
    pub const ALL: [Kind; 8] = [
        Kind::Public,
        Kind::FullCone,
        Kind::AddressRestricted,
        Kind::PortRestricted,
        Kind::Symmetric,
        Kind::Cgnat,
        Kind::UdpBlocked,
        Kind::SymmetricUpnp,
    ];

    /// The name used on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Public => "public",
            Kind::FullCone => "full-cone",
            Kind::AddressRestricted => "address-restricted",
            Kind::PortRestricted => "port-restricted",
            Kind::Symmetric => "symmetric",
            Kind::Cgnat => "cgnat",
            Kind::UdpBlocked => "udp-blocked",
            Kind::SymmetricUpnp => "symmetric-upnp",
        }
    }

    /// One line in RFC 4787 terms (for `--help` and docs).
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Public => "no NAT, no firewall: the peer's own address is public",
            Kind::FullCone => "EIM + EIF: one external port for all destinations; anyone may send to it (full cone)",
            Kind::AddressRestricted => {
                "EIM + ADF: one external port; only hosts the peer sent to may answer, from any port"
            }
            Kind::PortRestricted => {
                "EIM + APDF: one external port; only the exact address:port the peer sent to may answer"
            }
            Kind::Symmetric => {
                "EDM + APDF: a new random external port per destination; only that destination may answer"
            }
            Kind::Cgnat => "EIM + APDF home NAT behind an EIM + APDF carrier NAT (100.64.0.0/10): two NATs",
            Kind::UdpBlocked => "EIM + APDF NAT whose firewall drops all UDP: only TCP (the relay) works",
            Kind::SymmetricUpnp => {
                "symmetric NAT whose router runs miniupnpd (UPnP-IGD, NAT-PMP, PCP): a peer can have its port mapped"
            }
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::UnknownKind(s.to_owned()))
    }
}

/// An IP address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// The path a call runs on, as the `natcall --json` report names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// Private addresses behind one router.
    Lan,
    /// Punched public (or peer-reflexive) addresses.
    Direct,
    /// The rendezvous server's TCP relay.
    Relay,
}

impl Path {
    /// The report's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Path::Lan => "lan",
            Path::Direct => "direct",
            Path::Relay => "relay",
        }
    }

    /// Parses the report's name.
    pub fn from_report(s: &str) -> Option<Path> {
        [Path::Lan, Path::Direct, Path::Relay]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One scenario: the caller (A) and the callee (B), each behind its own router, or both
/// behind one router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// A behind a router of kind `a`, B behind another router of kind `b`.
    Pair {
        /// The caller's kind.
        a: Kind,
        /// The callee's kind.
        b: Kind,
    },
    /// Both peers behind one port-restricted (EIM + APDF) router, with or without hairpinning.
    SameLan {
        /// Whether the router forwards LAN → its own public address back into the LAN.
        hairpin: bool,
    },
    /// IPv6: the server dual-stack (`[::]:3478`), the peers as `case` says.
    V6(V6Case),
}

/// The IPv6 scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum V6Case {
    /// Both dual-stack, global IPv6 behind a stateful firewall that drops unsolicited inbound
    /// (RFC 6092), IPv4 behind a symmetric NAT each: IPv4 could only relay, so a direct path is
    /// IPv6 punched through both firewalls.
    FirewalledV6,
    /// Both dual-stack behind port-restricted IPv4 NATs and IPv6 firewalls: both families go
    /// direct, and IPv6 is preferred.
    DualStack,
    /// One peer on IPv6 only, the other on IPv4 only: the relay.
    V6OnlyToV4Only,
}

impl V6Case {
    /// Every case, in table order.
    pub const ALL: [V6Case; 3] = [V6Case::FirewalledV6, V6Case::DualStack, V6Case::V6OnlyToV4Only];

    /// The name in tables and file names.
    pub fn name(self) -> &'static str {
        match self {
            V6Case::FirewalledV6 => "v6-firewalled",
            V6Case::DualStack => "dual-stack",
            V6Case::V6OnlyToV4Only => "v6-only_x_v4-only",
        }
    }
}

impl Scenario {
    /// A behind `a`, B behind `b`.
    pub fn pair(a: Kind, b: Kind) -> Self {
        Scenario::Pair { a, b }
    }

    /// The caller's column in the table.
    pub fn a_label(&self) -> String {
        match self {
            Scenario::Pair { a, .. } => a.to_string(),
            Scenario::SameLan { .. } => "same-lan".into(),
            Scenario::V6(c) => c.name().into(),
        }
    }

    /// The callee's column in the table.
    pub fn b_label(&self) -> String {
        match self {
            Scenario::Pair { b, .. } => b.to_string(),
            Scenario::SameLan { hairpin: true } => "same-lan (hairpin on)".into(),
            Scenario::SameLan { hairpin: false } => "same-lan (hairpin off)".into(),
            Scenario::V6(c) => c.name().into(),
        }
    }

    /// A file-name-safe name: `port-restricted_x_symmetric`, `same-lan_hairpin-on`.
    pub fn slug(&self) -> String {
        match self {
            Scenario::Pair { a, b } => format!("{a}_x_{b}"),
            Scenario::SameLan { hairpin: true } => "same-lan_hairpin-on".into(),
            Scenario::SameLan { hairpin: false } => "same-lan_hairpin-off".into(),
            Scenario::V6(c) => format!("ipv6_{}", c.name()),
        }
    }

    /// The oracle: the path the call must end on.
    ///
    /// - same router → LAN (hairpin on or off: private addresses are checked first);
    /// - UDP blocked on either side → relay;
    /// - symmetric × (port-restricted | cgnat | symmetric) → relay: the symmetric side's port
    ///   for the peer is unknown and the other side only lets in the exact address:port it
    ///   sent to;
    /// - everything else → direct (a symmetric side's fresh port is learnt from its checks as a
    ///   peer-reflexive candidate when the other side filters by address only, or not at all).
    pub fn expected(&self) -> Path {
        let (a, b) = match *self {
            Scenario::SameLan { .. } => return Path::Lan,
            Scenario::V6(V6Case::V6OnlyToV4Only) => return Path::Relay,
            Scenario::V6(_) => return Path::Direct,
            Scenario::Pair { a, b } => (a, b),
        };
        if a == Kind::UdpBlocked || b == Kind::UdpBlocked {
            return Path::Relay;
        }
        // One symmetric NAT is traversed: by ordinary checks when the other side filters by
        // address only (or not at all), by birthday probing when it filters by port too. Two
        // symmetric NATs leave nothing to aim at: the relay — unless one router maps a port on
        // request (symmetric-upnp), which the other side then reaches like a public address.
        if a == Kind::Symmetric && b == Kind::Symmetric {
            return Path::Relay;
        }
        Path::Direct
    }

    /// Every scenario of `natcall-lab matrix`: each unordered pair of kinds (same-kind pairs
    /// included), then same-lan with hairpin on and off.
    pub fn matrix() -> Vec<Scenario> {
        let mut all = Vec::new();
        for (i, a) in Kind::ALL.into_iter().enumerate() {
            for b in Kind::ALL.into_iter().skip(i) {
                all.push(Scenario::pair(a, b));
            }
        }
        all.push(Scenario::SameLan { hairpin: true });
        all.push(Scenario::SameLan { hairpin: false });
        all.extend(V6Case::ALL.map(Scenario::V6));
        all
    }

    /// The address family the caller's final path must run on, when the scenario says.
    pub fn expected_family(&self) -> Option<Family> {
        match self {
            Scenario::V6(V6Case::FirewalledV6 | V6Case::DualStack) => Some(Family::V6),
            _ => None,
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} × {}", self.a_label(), self.b_label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_has_every_unordered_pair_and_both_same_lan_variants() {
        let all = Scenario::matrix();
        assert_eq!(all.len(), 8 * 9 / 2 + 2 + 3);
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
    }

    #[test]
    fn the_oracle_matches_the_issue() {
        use Kind::*;
        let e = |a, b| Scenario::pair(a, b).expected();
        assert_eq!(e(PortRestricted, PortRestricted), Path::Direct);
        assert_eq!(e(Cgnat, Cgnat), Path::Direct);
        for k in [
            Public,
            FullCone,
            AddressRestricted,
            PortRestricted,
            Cgnat,
            SymmetricUpnp,
        ] {
            assert_eq!(e(Symmetric, k), Path::Direct, "{k}");
            assert_eq!(e(k, Symmetric), Path::Direct, "{k}");
        }
        assert_eq!(e(Symmetric, Symmetric), Path::Relay);
        assert_eq!(e(SymmetricUpnp, SymmetricUpnp), Path::Direct);
        for k in Kind::ALL {
            assert_eq!(e(UdpBlocked, k), Path::Relay, "{k}");
        }
        assert_eq!(Scenario::SameLan { hairpin: false }.expected(), Path::Lan);
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in Kind::ALL {
            assert_eq!(k.name().parse::<Kind>().unwrap(), k);
        }
        assert!("cone".parse::<Kind>().is_err());
    }
}
