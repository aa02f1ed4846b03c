//! `natcall-lab netcheck`: `natcall netcheck` behind each NAT kind, checked against a tool we
//! did not write and against the kind the lab built.
//!
//! Per kind, one lab: the server host gets a second IP address on its link, and one peer sits
//! behind the kind's router(s). Then, from the peer:
//! 1. `natcall netcheck` against `natcall-rendezvous --alternate-ip` (our client, our server);
//! 2. coturn's `turnutils_natdiscovery -m -f` against the same server (their client, ours);
//! 3. `natcall netcheck` against coturn's `turnserver` on the same two addresses (our client,
//!    their server).
//!
//! Each gives a mapping and a filtering behaviour in RFC 4787 terms; the row agrees when all
//! three equal what the lab built ([`expected`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path as FsPath;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patchbay::Device;
use serde::Serialize;

use crate::process::{Binaries, Proc, run_in, run_in_output, run_in_status};
use crate::scenario::wait_listening;
use crate::topology::{self, SERVER_PORT};
use crate::{Error, Kind};

/// The RFC 4787 names the three tools agree on.
pub const EIM: &str = "endpoint-independent";
/// Address-dependent (mapping or filtering).
pub const AD: &str = "address-dependent";
/// Address-and-port-dependent (mapping or filtering).
pub const APD: &str = "address-and-port-dependent";

/// What one tool saw: UDP, the mapping and the filtering behaviour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Seen {
    /// Whether UDP to the server worked.
    pub udp: bool,
    /// Mapping behaviour, in [`EIM`], [`AD`], [`APD`] terms.
    pub mapping: Option<String>,
    /// Filtering behaviour.
    pub filtering: Option<String>,
}

impl Seen {
    fn blocked() -> Self {
        Self {
            udp: false,
            mapping: None,
            filtering: None,
        }
    }

    fn of(mapping: &str, filtering: &str) -> Self {
        Self {
            udp: true,
            mapping: Some(mapping.into()),
            filtering: Some(filtering.into()),
        }
    }

    /// "EIM / APDF", or "no UDP".
    pub fn short(&self) -> String {
        if !self.udp {
            return "no UDP".into();
        }
        let abbrev = |v: &Option<String>, suffix: &str| match v.as_deref() {
            Some(EIM) => format!("EI{suffix}"),
            Some(AD) => format!("AD{suffix}"),
            Some(APD) => format!("APD{suffix}"),
            _ => "?".into(),
        };
        format!("{} / {}", abbrev(&self.mapping, "M"), abbrev(&self.filtering, "F"))
    }
}

/// One kind's row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The NAT kind.
    pub kind: Kind,
    /// What the lab built.
    pub expected: Seen,
    /// `natcall netcheck` → `natcall-rendezvous`.
    pub ours: Option<Seen>,
    /// `turnutils_natdiscovery` → `natcall-rendezvous`.
    pub natdiscovery: Option<Seen>,
    /// `natcall netcheck` → coturn's `turnserver`.
    pub against_coturn: Option<Seen>,
    /// The port mapping protocols netcheck found the router answering ("UPnP-IGD, NAT-PMP,
    /// PCP", or "none").
    pub port_mapping: Option<String>,
    /// What went wrong, if a step could not run.
    pub error: Option<String>,
}

impl Row {
    /// All three saw what the lab built.
    pub fn agrees(&self) -> bool {
        [&self.ours, &self.natdiscovery, &self.against_coturn]
            .iter()
            .all(|s| s.as_ref() == Some(&self.expected))
    }
}

/// What the lab builds for `kind`, in RFC 4787 terms.
pub fn expected(kind: Kind) -> Seen {
    match kind {
        Kind::Public | Kind::FullCone => Seen::of(EIM, EIM),
        Kind::AddressRestricted => Seen::of(EIM, AD),
        Kind::PortRestricted | Kind::Cgnat => Seen::of(EIM, APD),
        // netcheck's own sockets are not mapped: the router is as symmetric as any.
        Kind::Symmetric | Kind::SymmetricUpnp => Seen::of(APD, APD),
        Kind::UdpBlocked => Seen::blocked(),
    }
}

/// Reads `natcall --json netcheck`'s report.
fn parse_netcheck(stdout: &str) -> Option<Seen> {
    let v: serde_json::Value = stdout.lines().rev().find_map(|l| serde_json::from_str(l).ok())?;
    if v["event"] != "netcheck" {
        return None;
    }
    Some(Seen {
        udp: v["udp"].as_bool()?,
        mapping: v["mapping"].as_str().map(str::to_owned),
        filtering: v["filtering"].as_str().map(str::to_owned),
    })
}

/// Reads `turnutils_natdiscovery -m -f`'s verdict lines.
fn parse_natdiscovery(stdout: &str) -> Seen {
    let find = |what: &str| {
        if stdout.contains(&format!("Endpoint Independent {what}")) {
            Some(EIM.to_owned())
        } else if stdout.contains(&format!("Address and Port Dependent {what}")) {
            Some(APD.to_owned())
        } else if stdout.contains(&format!("Address Dependent {what}")) {
            Some(AD.to_owned())
        } else {
            None
        }
    };
    let (mapping, filtering) = (find("Mapping"), find("Filtering"));
    Seen {
        udp: mapping.is_some() || filtering.is_some() || stdout.contains("reflexive addr"),
        mapping,
        filtering,
    }
}

/// The server's interface, its address and prefix length (from `ip -4 -o addr show`).
fn server_link(server: &Device) -> Result<(String, Ipv4Addr, u8), Error> {
    let out = run_in_output(server, "ip", &["-4", "-o", "addr", "show", "scope", "global"])?;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let (Some(dev), Some(pos)) = (words.get(1), words.iter().position(|w| *w == "inet"))
            && let Some((ip, prefix)) = words.get(pos + 1).and_then(|c| c.split_once('/'))
            && let (Ok(ip), Ok(prefix)) = (ip.parse::<Ipv4Addr>(), prefix.parse::<u8>())
        {
            return Ok(((*dev).to_owned(), ip, prefix));
        }
    }
    Err(Error::InvalidScenario(format!(
        "the server host has no IPv4 address: {out}"
    )))
}

/// A second address in the server's subnet, near its top (patchbay hands addresses out from
/// the bottom).
fn second_ip(ip: Ipv4Addr, prefix: u8) -> Result<Ipv4Addr, Error> {
    if prefix > 28 {
        return Err(Error::InvalidScenario(format!(
            "the server's subnet /{prefix} is too small"
        )));
    }
    let host_bits = 32 - u32::from(prefix);
    let net = u32::from(ip) & !((1u32 << host_bits) - 1);
    Ok(Ipv4Addr::from(net + (1u32 << host_bits) - 6))
}

/// A STUN answer from `addr` comes to `device` (coturn is up), within 10 s.
fn wait_stun(device: &Device, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    // A bare Binding request (RFC 8489 header only): type 0x0001, length 0, the magic cookie.
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&[7; 12]);
    while Instant::now() < deadline {
        let r = req.clone();
        let answered = device
            .run_sync(move || {
                let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                s.send_to(&r, addr)?;
                let mut buf = [0u8; 512];
                Ok(s.recv_from(&mut buf).is_ok())
            })
            .unwrap_or(false);
        if answered {
            return Ok(());
        }
    }
    Err(format!("no STUN answer from {addr} within 10 s"))
}

/// Kills a child on drop (coturn).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One kind's row; every step bounded.
pub async fn run_kind(bins: &Binaries, kind: Kind, dir: &FsPath) -> Row {
    let mut row = Row::empty(kind);
    if let Err(e) = fill(bins, kind, dir, &mut row).await {
        row.error = Some(e);
    }
    row
}

async fn fill(bins: &Binaries, kind: Kind, dir: &FsPath, row: &mut Row) -> Result<(), String> {
    // Each tool in a lab of its own: a NAT's state from one tool's tests (an address-dependent
    // filter remembers every address any mapping contacted) must not colour the next one's.
    for tool in [Tool::Ours, Tool::NatDiscovery, Tool::AgainstCoturn] {
        let seen = in_lab(bins, kind, dir, tool).await?;
        match tool {
            Tool::Ours => {
                row.ours = seen;
                let out = std::fs::read_to_string(dir.join("netcheck-ours.json")).unwrap_or_default();
                row.port_mapping = port_mapping_of(&out);
            }
            Tool::NatDiscovery => row.natdiscovery = seen,
            Tool::AgainstCoturn => row.against_coturn = seen,
        }
    }
    Ok(())
}

/// Who asks whom.
#[derive(Debug, Clone, Copy)]
enum Tool {
    /// `natcall netcheck` → `natcall-rendezvous --alternate-ip`.
    Ours,
    /// `turnutils_natdiscovery` → `natcall-rendezvous --alternate-ip`.
    NatDiscovery,
    /// `natcall netcheck` → coturn's `turnserver` on two addresses.
    AgainstCoturn,
}

/// Builds a lab for `kind` (the server host with a second address, one peer behind the kind's
/// router) and runs `tool` in it; the lab is gone when this returns.
async fn in_lab(bins: &Binaries, kind: Kind, dir: &FsPath, tool: Tool) -> Result<Option<Seen>, String> {
    let lab = topology::new_lab().await.map_err(|e| e.to_string())?;
    let dc = lab.add_router("dc").build().await.map_err(|e| e.to_string())?;
    let server = topology::add_device(&lab, "server", &dc)
        .await
        .map_err(|e| e.to_string())?;
    let routers = topology::add_uplink(&lab, kind, "a", 1)
        .await
        .map_err(|e| e.to_string())?;
    let router = routers.last().ok_or("a kind without a router")?;
    let peer = topology::add_device(&lab, "peer", router)
        .await
        .map_err(|e| e.to_string())?;
    let (bins, dir) = (bins.clone(), dir.to_path_buf());
    let seen = tokio::task::spawn_blocking(move || run_tool(&bins, &dir, &server, &peer, tool))
        .await
        .map_err(|e| format!("the netcheck driver panicked: {e}"))?;
    drop(lab);
    seen
}

fn run_tool(bins: &Binaries, dir: &FsPath, server: &Device, peer: &Device, tool: Tool) -> Result<Option<Seen>, String> {
    let e = |e: Error| e.to_string();
    let (dev, ip1, prefix) = server_link(server).map_err(e)?;
    let ip2 = second_ip(ip1, prefix).map_err(e)?;
    run_in(
        server,
        "ip",
        &["addr", "add", &format!("{ip2}/{prefix}"), "dev", &dev],
        None,
    )
    .map_err(e)?;
    let primary = SocketAddr::from((ip1, SERVER_PORT));
    let netcheck = |name: &str| -> Result<Option<Seen>, String> {
        let home = dir.join("peer-home").display().to_string();
        let natcall = bins.natcall.display().to_string();
        let (out, _) = run_in_status(
            peer,
            &natcall,
            &["--json", "--home", &home, "--server", &primary.to_string(), "netcheck"],
        )
        .map_err(e)?;
        std::fs::write(dir.join(format!("{name}.json")), &out).map_err(|e| e.to_string())?;
        Ok(parse_netcheck(&out))
    };
    if let Tool::AgainstCoturn = tool {
        let log = dir.join("turnserver.log");
        let mut cmd = Command::new(crate::error::find_tool("turnserver").unwrap_or_else(|| "turnserver".into()));
        cmd.args(["-n", "--stun-only", "--no-auth", "--no-cli", "--no-tls", "--no-dtls"])
            .args(["--listening-ip", &ip1.to_string(), "--listening-ip", &ip2.to_string()])
            .args(["--listening-port", &SERVER_PORT.to_string()])
            .args(["--alt-listening-port", &(SERVER_PORT + 1).to_string()])
            .args(["--simple-log", "--log-file"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let coturn = server
            .spawn_command_sync(cmd)
            .map_err(|e| format!("starting turnserver: {e:#}"))?;
        let _coturn = Killed(coturn);
        // From the server host: a peer without UDP never hears it.
        wait_stun(server, primary)?;
        return netcheck("netcheck-coturn");
    }
    let args: Vec<String> = [
        "--listen",
        &primary.to_string(),
        "--alternate-ip",
        &ip2.to_string(),
        "--ephemeral",
        "--log-level",
        "debug",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut rendezvous = Proc::spawn(server, dir, "rendezvous", &bins.rendezvous, &args).map_err(e)?;
    wait_listening(server, primary)?;
    let seen = match tool {
        Tool::Ours => netcheck("netcheck-ours"),
        _ => {
            // Filtering first, from a NAT that has contacted nobody yet; then mapping.
            let mut out = String::new();
            for test in ["-f", "-m"] {
                let (o, _) = run_in_status(
                    peer,
                    "turnutils_natdiscovery",
                    &[test, "-p", &SERVER_PORT.to_string(), &ip1.to_string()],
                )
                .map_err(e)?;
                out.push_str(&o);
            }
            std::fs::write(dir.join("natdiscovery.txt"), &out).map_err(|e| e.to_string())?;
            Ok(Some(parse_natdiscovery(&out)))
        }
    };
    rendezvous.kill();
    rendezvous.drain();
    seen
}

/// Runs `kinds`, `jobs` at a time, each in its own lab, logs under `dir/<kind>/`.
pub async fn run(bins: &Binaries, kinds: &[Kind], jobs: usize, dir: &FsPath) -> Vec<Row> {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
    let mut tasks = Vec::new();
    for &kind in kinds {
        let (bins, sem) = (bins.clone(), sem.clone());
        let dir = dir.join(kind.name());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            if let Err(e) = std::fs::create_dir_all(&dir) {
                let mut row = Row::empty(kind);
                row.error = Some(format!("creating {}: {e}", dir.display()));
                return row;
            }
            run_kind(&bins, kind, &dir).await
        }));
    }
    let mut rows = Vec::new();
    for (t, &kind) in tasks.into_iter().zip(kinds) {
        rows.push(t.await.unwrap_or_else(|e| {
            let mut row = Row::empty(kind);
            row.error = Some(format!("the task panicked: {e}"));
            row
        }));
    }
    rows
}

impl Row {
    /// A row with what the lab builds for `kind` and nothing seen yet.
    fn empty(kind: Kind) -> Self {
        Row {
            kind,
            expected: expected(kind),
            ours: None,
            natdiscovery: None,
            against_coturn: None,
            port_mapping: None,
            error: None,
        }
    }
}

/// The port mapping protocols in netcheck's report, as one phrase.
fn port_mapping_of(stdout: &str) -> Option<String> {
    let v: serde_json::Value = stdout.lines().rev().find_map(|l| serde_json::from_str(l).ok())?;
    let p = &v["port_mapping"];
    if !p.is_object() {
        return None;
    }
    let names: Vec<&str> = [("upnp", "UPnP-IGD"), ("nat_pmp", "NAT-PMP"), ("pcp", "PCP")]
        .into_iter()
        .filter_map(|(k, name)| (p[k] == true).then_some(name))
        .collect();
    Some(if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    })
}

/// The agreement table in Markdown.
pub fn table(rows: &[Row]) -> String {
    let cell = |s: &Option<Seen>| s.as_ref().map_or("-".to_owned(), Seen::short);
    let mut out = String::from(
        "| kind | lab built | netcheck → natcall-rendezvous | turnutils_natdiscovery → natcall-rendezvous | netcheck → coturn | agree | port mapping (netcheck) |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.kind,
            r.expected.short(),
            cell(&r.ours),
            cell(&r.natdiscovery),
            cell(&r.against_coturn),
            if r.agrees() { "yes" } else { "**no**" },
            r.port_mapping.as_deref().unwrap_or("-")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natdiscovery_verdicts_are_read() {
        let out = "NAT with Endpoint Independent Mapping!\n...\nNAT with Address and Port Dependent Filtering!\n";
        assert_eq!(parse_natdiscovery(out), Seen::of(EIM, APD));
        let out = "No NAT! (Endpoint Independent Mapping)\nNAT with Address Dependent Filtering!";
        assert_eq!(parse_natdiscovery(out), Seen::of(EIM, AD));
        assert!(!parse_natdiscovery("").udp);
    }

    #[test]
    fn the_second_ip_is_near_the_top_of_the_subnet() {
        let ip = second_ip("198.18.0.2".parse().expect("ip"), 24).expect("fits");
        assert_eq!(ip, "198.18.0.250".parse::<Ipv4Addr>().expect("ip"));
    }
}
