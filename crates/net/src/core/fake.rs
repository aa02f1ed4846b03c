//! [`FakeAddr`]: the address quinn sees for the peer of one call, standing for whatever real
//! path (LAN, punched, relay) carries the call now.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

/// A call's handle inside one endpoint, chosen locally (never the server's call id, which
/// changes when a call is resumed on another server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct CallId(pub(crate) u32);

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The stable QUIC-facing address of a call's peer: an IPv6 ULA (`fd6e:6174:6361::/48`, "natca")
/// carrying the local [`CallId`]. Never a real network address; only the peer core maps it to
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FakeAddr(SocketAddrV6);

const PREFIX: [u8; 6] = [0xfd, 0x6e, 0x61, 0x74, 0x63, 0x61];

impl FakeAddr {
    /// The fake address of call `id`.
    pub(crate) fn of(id: CallId) -> Self {
        let mut o = [0u8; 16];
        o[..6].copy_from_slice(&PREFIX);
        o[12..].copy_from_slice(&id.0.to_be_bytes());
        Self(SocketAddrV6::new(Ipv6Addr::from(o), 1, 0, 0))
    }

    /// The fake address `addr` is, if it is one.
    pub(crate) fn parse(addr: SocketAddr) -> Option<Self> {
        match addr {
            SocketAddr::V6(v6) if v6.ip().octets()[..6] == PREFIX && v6.port() == 1 => Some(Self(v6)),
            _ => None,
        }
    }

    /// The call it stands for.
    pub(crate) fn call(self) -> CallId {
        let o = self.0.ip().octets();
        CallId(u32::from_be_bytes([o[12], o[13], o[14], o[15]]))
    }

    /// As quinn wants it.
    pub(crate) fn socket(self) -> SocketAddr {
        SocketAddr::V6(self.0)
    }
}

impl fmt::Display for FakeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fake_address_round_trips_and_real_ones_are_not_fake() {
        let fake = FakeAddr::of(CallId(0xdead_beef));
        assert_eq!(FakeAddr::parse(fake.socket()), Some(fake));
        assert_eq!(fake.call(), CallId(0xdead_beef));
        assert_eq!(FakeAddr::parse("127.0.0.1:1".parse().expect("addr")), None);
        assert_eq!(FakeAddr::parse("[fd00::1]:1".parse().expect("addr")), None);
    }
}
