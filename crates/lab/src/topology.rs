//! Building a scenario's network with patchbay.
//!
//! ```text
//!                      ┌──────────── lab IX (patchbay) ─────────────┐
//!   dc (public) ── server device (natcall-rendezvous)               │
//!   A's uplink router(s) ── alice        B's uplink router(s) ── bob│
//! ```
//!
//! How each [`Kind`] is built (patchbay provides everything but the composition):
//!
//! | kind | routers |
//! |---|---|
//! | public | a router without NAT (`Nat::None`): the device gets a public address |
//! | full-cone | `Nat::Open` (EIM + EIF) |
//! | address-restricted | `NatConfig` EIM + `NatFiltering::AddressDependent` (no patchbay preset) |
//! | port-restricted | `Nat::Moderate` (EIM + APDF) |
//! | symmetric | `Nat::Strict` (EDM, `masquerade random`, + APDF) |
//! | cgnat | carrier router `Nat::Moderate` with downstream 100.64.x.0/24, home router `Nat::Moderate` upstream of it |
//! | udp-blocked | `Nat::Moderate` + a custom firewall that drops all UDP (`block_udp`) |
//! | same-lan | one router EIM + APDF with `hairpin(true/false)`, both devices on it |

use patchbay::{Device, Ipv4Net, Lab, Nat, NatConfig, NatFiltering, NatMapping, Router};

use crate::{Error, Kind, Scenario};

/// The rendezvous server's port inside the lab.
pub const SERVER_PORT: u16 = 3478;

/// One scenario's lab: dropping it removes every namespace it made.
pub struct Net {
    /// The lab (owns the namespaces).
    pub lab: Lab,
    /// The public host running `natcall-rendezvous`.
    pub server: Device,
    /// The caller.
    pub a: Device,
    /// The callee.
    pub b: Device,
    /// The routers, A's first (for probes and diagnostics).
    pub routers: Vec<Router>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("lab", &self.lab.prefix())
            .field("server", &self.server.name())
            .field("a", &self.a.name())
            .field("b", &self.b.name())
            .finish_non_exhaustive()
    }
}

fn lab_err(e: anyhow::Error) -> Error {
    Error::Lab(e)
}

/// A new, empty lab. As real root patchbay must be told so; otherwise the process must have
/// entered a user namespace first ([`patchbay::init_userns`], done by the `natcall-lab` binary).
pub async fn new_lab() -> Result<Lab, Error> {
    let mut builder = Lab::builder();
    if is_root() {
        builder = builder.allow_real_root();
    }
    builder.build().await.map_err(lab_err)
}

/// Whether the process runs as (real or user-namespace) root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The NAT config of a single-router kind (`None` for public; cgnat uses it for both routers).
pub fn nat_config(kind: Kind) -> Option<NatConfig> {
    match kind {
        Kind::Public => None,
        Kind::FullCone => Nat::Open.to_config(),
        Kind::AddressRestricted => NatConfig::builder()
            .mapping(NatMapping::EndpointIndependent)
            .filtering(NatFiltering::AddressDependent)
            .build()
            .ok(),
        Kind::PortRestricted | Kind::Cgnat | Kind::UdpBlocked => Nat::Moderate.to_config(),
        Kind::Symmetric => Nat::Strict.to_config(),
    }
}

/// Adds the router(s) for `kind`; returns them, the one the device plugs into last.
/// `tag` names them (`a`, `b`) and `index` picks the carrier's 100.64.x.0/24.
pub async fn add_uplink(lab: &Lab, kind: Kind, tag: &str, index: u8) -> Result<Vec<Router>, Error> {
    let name = format!("{tag}-{kind}");
    match kind {
        Kind::Cgnat => {
            let cidr: Ipv4Net = format!("100.64.{index}.0/24")
                .parse()
                .map_err(|e| Error::InvalidScenario(format!("carrier subnet: {e}")))?;
            let carrier = lab
                .add_router(&format!("{tag}-carrier"))
                .nat(Nat::Moderate)
                .downstream_cidr(cidr)
                .build()
                .await
                .map_err(lab_err)?;
            let home = lab
                .add_router(&format!("{tag}-home"))
                .upstream(carrier.id())
                .nat(Nat::Moderate)
                .build()
                .await
                .map_err(lab_err)?;
            Ok(vec![carrier, home])
        }
        Kind::UdpBlocked => {
            let r = lab
                .add_router(&name)
                .nat(Nat::Moderate)
                .firewall_custom(|f| f.block_udp())
                .build()
                .await
                .map_err(lab_err)?;
            Ok(vec![r])
        }
        _ => {
            let r = lab
                .add_router(&name)
                .nat(nat_config(kind))
                .build()
                .await
                .map_err(lab_err)?;
            Ok(vec![r])
        }
    }
}

/// Adds a device named `name` behind `router`.
pub async fn add_device(lab: &Lab, name: &str, router: &Router) -> Result<Device, Error> {
    lab.add_device(name).uplink(router.id()).build().await.map_err(lab_err)
}

/// The router both same-lan peers sit behind: EIM + APDF, hairpin as asked.
pub fn same_lan_nat(hairpin: bool) -> Result<NatConfig, Error> {
    NatConfig::builder()
        .mapping(NatMapping::EndpointIndependent)
        .filtering(NatFiltering::AddressAndPortDependent)
        .hairpin(hairpin)
        .build()
        .map_err(|e| Error::InvalidScenario(e.to_string()))
}

/// Builds the whole network of a scenario.
pub async fn build(scenario: Scenario) -> Result<Net, Error> {
    let lab = new_lab().await?;
    let dc = lab.add_router("dc").build().await.map_err(lab_err)?;
    let server = add_device(&lab, "server", &dc).await?;
    let (a, b, routers) = match scenario {
        Scenario::Pair { a, b } => {
            let ra = add_uplink(&lab, a, "a", 1).await?;
            let rb = add_uplink(&lab, b, "b", 2).await?;
            let da = add_device(&lab, "alice", last(&ra)?).await?;
            let db = add_device(&lab, "bob", last(&rb)?).await?;
            (da, db, ra.into_iter().chain(rb).collect())
        }
        Scenario::SameLan { hairpin } => {
            let r = lab
                .add_router("lan")
                .nat(same_lan_nat(hairpin)?)
                .build()
                .await
                .map_err(lab_err)?;
            let da = add_device(&lab, "alice", &r).await?;
            let db = add_device(&lab, "bob", &r).await?;
            (da, db, vec![r])
        }
    };
    Ok(Net {
        lab,
        server,
        a,
        b,
        routers,
    })
}

fn last(routers: &[Router]) -> Result<&Router, Error> {
    routers
        .last()
        .ok_or_else(|| Error::InvalidScenario("a kind without a router".into()))
}
