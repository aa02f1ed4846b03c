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
//! | symmetric-upnp | `Nat::Strict`, and **miniupnpd** (Debian's `miniupnpd-nftables`) in the router's namespace: UPnP-IGD, NAT-PMP and PCP on the LAN side, its port forwards in its own nftables table, admitted by the router's filter ([`start_miniupnpd`]) |
//! | same-lan | one router EIM + APDF with `hairpin(true/false)`, both devices on it |

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patchbay::{
    Device, Firewall, IpSupport, Ipv4Net, Lab, Nat, NatConfig, NatFiltering, NatMapping, NatV6Mode, Router,
    RouterPreset,
};

use crate::kind::V6Case;
use crate::process::run_spawned;
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
    /// Daemons in the routers' namespaces (miniupnpd), stopped with the lab.
    pub daemons: Vec<Daemon>,
    /// The public router the server hangs off (more public hosts may join it).
    pub dc: Router,
}

/// A process in a lab namespace (miniupnpd): killed when dropped, its files removed.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    router: Router,
}

impl Daemon {
    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The port forwards miniupnpd holds now (its DNAT rules).
    pub fn port_forwards(&self) -> Result<usize, Error> {
        let rules = run_spawned(
            |c| self.router.spawn_command_sync(c),
            "nft",
            &["list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd"],
        )?;
        Ok(rules.matches("dnat").count())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A kind's router(s), the device's last, and the daemons they run.
#[derive(Debug)]
pub struct Uplink {
    /// The routers, outermost first.
    pub routers: Vec<Router>,
    /// Daemons in their namespaces (miniupnpd for symmetric-upnp).
    pub daemons: Vec<Daemon>,
}

impl std::ops::Deref for Uplink {
    type Target = [Router];

    fn deref(&self) -> &[Router] {
        &self.routers
    }
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
        Kind::Symmetric | Kind::SymmetricUpnp => Nat::Strict.to_config(),
    }
}

/// Adds the router(s) for `kind`; returns them, the one the device plugs into last, with the
/// daemons they run. `tag` names them (`a`, `b`) and `index` picks the carrier's
/// 100.64.x.0/24 (and the port-mapping address of symmetric-upnp).
pub async fn add_uplink(lab: &Lab, kind: Kind, tag: &str, index: u8) -> Result<Uplink, Error> {
    let mut daemons = Vec::new();
    let routers = add_routers(lab, kind, tag, index).await?;
    if kind == Kind::SymmetricUpnp {
        let r = routers
            .last()
            .ok_or_else(|| Error::InvalidScenario("no router".into()))?;
        daemons.push(start_miniupnpd(lab, r, index)?);
    }
    Ok(Uplink { routers, daemons })
}

async fn add_routers(lab: &Lab, kind: Kind, tag: &str, index: u8) -> Result<Vec<Router>, Error> {
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

/// The public address a symmetric-upnp router's miniupnpd hands out (`ext_ip`), by `index`.
///
/// miniupnpd refuses to map ports on an external address in a reserved range, and patchbay's
/// IX is 198.18.0.0/24 (RFC 2544 benchmarking, reserved): the router hands out an address of
/// the lab's own from 11.0.0.0/24 instead, routed to it by the IX inside the lab's namespaces
/// only (no route leads out of a lab).
pub fn upnp_external_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(11, 0, 0, index.max(1))
}

/// The interface holding `ip` in `ip -o -4 addr show` output.
fn iface_of(addrs: &str, ip: Ipv4Addr) -> Option<String> {
    addrs.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        let pos = w.iter().position(|x| *x == "inet")?;
        let a = w.get(pos + 1)?.split('/').next()?.parse::<Ipv4Addr>().ok()?;
        (a == ip).then(|| w.get(1).map(|s| s.to_string())).flatten()
    })
}

/// Starts miniupnpd in `router`'s namespace, as on a home router: NAT-PMP, PCP and UPnP-IGD
/// on the LAN side, handing out [`upnp_external_ip`]`(index)`; its port forwards go into its
/// own nftables table, and the router's filter admits what they forward (`ct status dnat`).
/// Returns once it listens.
pub fn start_miniupnpd(lab: &Lab, router: &Router, index: u8) -> Result<Daemon, Error> {
    let missing = |what: &str| Error::InvalidScenario(format!("symmetric-upnp router: no {what}"));
    let wan_ip = router.uplink_ip().ok_or_else(|| missing("uplink address"))?;
    let lan_gw = router.downstream_gw().ok_or_else(|| missing("LAN address"))?;
    let lan_cidr = router.downstream_cidr().ok_or_else(|| missing("LAN subnet"))?;
    let addrs = run_spawned(|c| router.spawn_command_sync(c), "ip", &["-o", "-4", "addr", "show"])?;
    let wan = iface_of(&addrs, wan_ip).ok_or_else(|| missing("uplink interface"))?;
    let lan = iface_of(&addrs, lan_gw).ok_or_else(|| missing("LAN interface"))?;
    let ext = upnp_external_ip(index);
    // The IX routes the handed-out address to this router.
    let ix = lab.ix();
    run_spawned(
        |c| ix.spawn_command_sync(c),
        "ip",
        &["route", "replace", &format!("{ext}/32"), "via", &wan_ip.to_string()],
    )?;
    let dir = tempfile::tempdir().map_err(Error::io("a folder for miniupnpd"))?;
    let rules = dir.path().join("miniupnpd.nft");
    let table = format!(
        r#"table inet miniupnpd {{
    chain forward {{ type filter hook forward priority -5; policy accept; jump miniupnpd; }}
    chain miniupnpd {{ }}
    chain prerouting {{ type nat hook prerouting priority -105; policy accept; jump prerouting_miniupnpd; }}
    chain prerouting_miniupnpd {{ }}
    chain postrouting {{ type nat hook postrouting priority 95; policy accept; jump postrouting_miniupnpd; }}
    chain postrouting_miniupnpd {{ }}
}}
insert rule ip filter forward iif "{wan}" ct status dnat accept
"#
    );
    std::fs::write(&rules, table).map_err(Error::io("writing miniupnpd's nftables rules"))?;
    let rules = rules.display().to_string();
    run_spawned(|c| router.spawn_command_sync(c), "nft", &["-f", &rules])?;
    let conf = dir.path().join("miniupnpd.conf");
    let text = format!(
        "ext_ifname={wan}\next_ip={ext}\nlistening_ip={lan}\nhttp_port=0\nenable_natpmp=yes\nenable_upnp=yes\n\
         secure_mode=yes\nsystem_uptime=yes\nupnp_table_name=miniupnpd\nupnp_nat_table_name=miniupnpd\n\
         upnp_forward_chain=miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n\
         upnp_nat_postrouting_chain=postrouting_miniupnpd\nuuid=3f1d5e1a-7c2b-4f3e-9a6d-0b5c8e2f{index:04x}\n\
         allow 1024-65535 {lan_cidr} 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
    );
    std::fs::write(&conf, text).map_err(Error::io("writing miniupnpd's configuration"))?;
    let log_path = dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).map_err(Error::io("creating miniupnpd's log"))?;
    let program = crate::error::find_tool("miniupnpd").ok_or_else(|| Error::Command {
        command: "miniupnpd".into(),
        stderr: "not found: apt-get install miniupnpd-nftables".into(),
    })?;
    let mut cmd = Command::new(program);
    cmd.arg("-f")
        .arg(&conf)
        .arg("-P")
        .arg(dir.path().join("miniupnpd.pid"))
        .arg("-d")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let child = router.spawn_command_sync(cmd).map_err(|e| Error::Command {
        command: "miniupnpd".into(),
        stderr: format!("{e:#}"),
    })?;
    let mut daemon = Daemon {
        child,
        dir,
        router: router.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = daemon.log();
        if text.contains("Listening for NAT-PMP/PCP traffic") {
            return Ok(daemon);
        }
        if let Ok(Some(status)) = daemon.child.try_wait() {
            return Err(Error::Command {
                command: "miniupnpd".into(),
                stderr: format!("exited ({status}):\n{text}"),
            });
        }
        if Instant::now() > deadline {
            return Err(Error::Command {
                command: "miniupnpd".into(),
                stderr: format!("not listening for NAT-PMP/PCP within 10 s:\n{text}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
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
    let mut daemons = Vec::new();
    let mut dc = lab.add_router("dc");
    if let Scenario::V6(_) = scenario {
        dc = dc.ip_support(IpSupport::DualStack);
    }
    let dc = dc.build().await.map_err(lab_err)?;
    let server = add_device(&lab, "server", &dc).await?;
    let (a, b, routers) = match scenario {
        Scenario::V6(case) => {
            // Home routers: IPv4 NAT as the case says, global IPv6 (no NAT) behind the stateful
            // firewall every CE router runs (RFC 6092). patchbay draws both families' LAN
            // prefixes from one pool: the public one, so IPv6 hosts get global addresses (the
            // IPv4 side is translated all the same).
            let home = |name: &str, ip: IpSupport, nat: Nat| {
                lab.add_router(name)
                    .preset(RouterPreset::Public)
                    .ip_support(ip)
                    .nat(nat)
                    .nat_v6(NatV6Mode::None)
                    .firewall(Firewall::BlockInbound)
            };
            let (ra, rb) = match case {
                V6Case::FirewalledV6 => (
                    home("a-v6", IpSupport::DualStack, Nat::Strict),
                    home("b-v6", IpSupport::DualStack, Nat::Strict),
                ),
                V6Case::DualStack => (
                    home("a-v6", IpSupport::DualStack, Nat::Moderate),
                    home("b-v6", IpSupport::DualStack, Nat::Moderate),
                ),
                V6Case::V6OnlyToV4Only => (
                    home("a-v6", IpSupport::V6Only, Nat::None),
                    home("b-v4", IpSupport::V4Only, Nat::Moderate),
                ),
            };
            let ra = ra.build().await.map_err(lab_err)?;
            let rb = rb.build().await.map_err(lab_err)?;
            let da = add_device(&lab, "alice", &ra).await?;
            let db = add_device(&lab, "bob", &rb).await?;
            (da, db, vec![ra, rb])
        }
        Scenario::Pair { a, b } => {
            let ra = add_uplink(&lab, a, "a", 1).await?;
            let rb = add_uplink(&lab, b, "b", 2).await?;
            let da = add_device(&lab, "alice", last(&ra)?).await?;
            let db = add_device(&lab, "bob", last(&rb)?).await?;
            daemons.extend(ra.daemons);
            daemons.extend(rb.daemons);
            (da, db, ra.routers.into_iter().chain(rb.routers).collect())
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
        daemons,
        dc,
    })
}

fn last(routers: &[Router]) -> Result<&Router, Error> {
    routers
        .last()
        .ok_or_else(|| Error::InvalidScenario("a kind without a router".into()))
}
