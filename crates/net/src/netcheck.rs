//! `natcall netcheck`: what this host's NAT does, measured against a STUN server, in RFC 4787
//! and RFC 5780 terms — and what that means for calls.
//!
//! Against a server with an alternate address (RFC 5780: answers carry OTHER-ADDRESS, as
//! `natcall-rendezvous --alternate-ip` and coturn with two listening IPs do) every test of
//! RFC 5780 §4 runs; against one without, the second port (`stun_alt_port`, by default the main
//! port + 1) still tells whether the NAT maps per destination and filters by port.
//!
//! The tests, each from its own socket as RFC 5780 asks (filtering before mapping, whose tests
//! contact the alternate address):
//! - **UDP and latency**: five Binding requests to the server; the median round trip.
//! - **Mapping** (§4.3): the public address seen by the main address, by the alternate IP at
//!   the main port, and by the alternate IP and port. The same address every time is
//!   endpoint-independent; a change only with the IP is address-dependent; a change with the
//!   port too is address-and-port-dependent. The ports a dependent NAT handed out give the
//!   **allocation**: sequential (a small constant step) or random; a first port equal to the
//!   local one is **preserved**.
//! - **Filtering** (§4.4): asking the server to answer from its other IP and port
//!   (CHANGE-REQUEST): an answer that comes through means endpoint-independent filtering; from
//!   the other port only, address-dependent; neither, address-and-port-dependent.
//! - **Hairpinning** (§4.5): a request sent to one's own public address comes back.
//!
//! Every request is retransmitted (250 ms, then 500 ms) and every wait bounded: a whole run
//! takes a few seconds at most, however the network answers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natcall_proto::stun::{self as wire, BindingAnswer, Change};
use serde::Serialize;
use tokio::net::UdpSocket;

use crate::Error;

/// How long a request waits for its answer after each send: the first, then the retransmits.
const WAITS: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_millis(750),
];
/// Round trips measured for the latency.
const LATENCY_SAMPLES: usize = 5;

/// RFC 4787 mapping or filtering behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Behaviour {
    /// The same for every destination / anyone may send.
    EndpointIndependent,
    /// Per destination IP / only IPs sent to.
    AddressDependent,
    /// Per destination IP and port / only the exact addresses sent to.
    AddressAndPortDependent,
}

impl Behaviour {
    /// The RFC 4787 name.
    pub fn name(self) -> &'static str {
        match self {
            Self::EndpointIndependent => "endpoint-independent",
            Self::AddressDependent => "address-dependent",
            Self::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

/// How a NAT that maps per destination hands out ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Allocation {
    /// Each new mapping's port is the last one's plus `step`.
    Sequential {
        /// The step between two mappings' ports.
        step: i32,
    },
    /// No pattern.
    Random,
}

/// What `netcheck` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The STUN server asked.
    pub server: SocketAddr,
    /// Whether the server answered over UDP at all.
    pub udp: bool,
    /// The local address of the mapping test's socket.
    pub local: Option<SocketAddr>,
    /// The public address the server saw.
    pub public: Option<SocketAddr>,
    /// Median STUN round trip to the server (ms).
    pub latency_ms: Option<f64>,
    /// The server's alternate address (OTHER-ADDRESS), when it supports RFC 5780.
    pub other_address: Option<SocketAddr>,
    /// The second port the mapping was compared against, without RFC 5780.
    pub second_port: Option<u16>,
    /// Mapping behaviour (RFC 4787 §4.1); `None` when it could not be tested.
    pub mapping: Option<Behaviour>,
    /// Whether the address dependence of the mapping was tested (it needs an alternate IP).
    pub mapping_address_tested: bool,
    /// How a dependent mapping's ports are handed out.
    pub allocation: Option<Allocation>,
    /// Whether the first mapping kept the local port.
    pub port_preserved: Option<bool>,
    /// Filtering behaviour (RFC 4787 §5); `None` when it could not be tested.
    pub filtering: Option<Behaviour>,
    /// Whether the address dependence of the filtering was tested (it needs an alternate IP).
    pub filtering_address_tested: bool,
    /// Whether a packet to one's own public address comes back (RFC 4787 §6).
    pub hairpinning: Option<bool>,
    /// The port mapping protocols the router answers (not asked on loopback or IPv6).
    pub port_mapping: Option<PortMapping>,
    /// What this means for calls, in one sentence.
    pub verdict: String,
}

/// Which port mapping protocols the router (the default gateway) answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortMapping {
    /// UPnP-IGD (an Internet Gateway Device found by SSDP).
    pub upnp: bool,
    /// NAT-PMP (RFC 6886).
    pub nat_pmp: bool,
    /// PCP (RFC 6887).
    pub pcp: bool,
}

/// Asks the default gateway which port mapping protocols it speaks (2 s at most).
async fn probe_port_mapping() -> Option<PortMapping> {
    let client = portmapper::Client::new(portmapper::Config::default());
    let out = tokio::time::timeout(Duration::from_secs(2), client.probe())
        .await
        .ok()?
        .ok()?
        .ok()?;
    Some(PortMapping {
        upnp: out.upnp,
        nat_pmp: out.nat_pmp,
        pcp: out.pcp,
    })
}

/// One request's answer: what the server said, from where, and how long it took.
#[derive(Debug, Clone, Copy)]
struct Answer {
    answer: BindingAnswer,
    from: SocketAddr,
    rtt: Duration,
}

/// A socket for one test group.
async fn socket_for(server: SocketAddr) -> Result<UdpSocket, Error> {
    let any: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    Ok(UdpSocket::bind(any).await?)
}

fn tid() -> [u8; 12] {
    let mut t = [0u8; 12];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut t);
    t
}

/// The local address `socket` sends to `server` from: its port, and the IP the system routes
/// by (asked of a throwaway connected socket).
async fn local_addr(socket: &UdpSocket, server: SocketAddr) -> Option<SocketAddr> {
    let port = socket.local_addr().ok()?.port();
    let probe = socket_for(server).await.ok()?;
    probe.connect(server).await.ok()?;
    Some(SocketAddr::new(probe.local_addr().ok()?.ip(), port))
}

/// What a request got.
enum Reply {
    /// An answer (from anywhere).
    Answered(Answer),
    /// An error response (e.g. 420: the server cannot make that change).
    Refused,
    /// Nothing, after every retransmission.
    Silent,
}

/// Sends a Binding request to `to` from `socket` (retransmitting) and waits for its answer from
/// anywhere; `None` when none came or the server refused it.
async fn ask(socket: &UdpSocket, to: SocketAddr, change: Change) -> Result<Option<Answer>, Error> {
    Ok(match ask_change(socket, to, change).await? {
        Reply::Answered(a) => Some(a),
        Reply::Refused | Reply::Silent => None,
    })
}

/// [`ask`] with CHANGE-REQUEST `change`, telling a refusal from silence.
async fn ask_change(socket: &UdpSocket, to: SocketAddr, change: Change) -> Result<Reply, Error> {
    let tid = tid();
    let mut req = [0u8; 64];
    let n = wire::encode_change_request(&tid, change, &mut req).map_err(|e| Error::Protocol(e.to_string()))?;
    let mut buf = [0u8; 1500];
    let started = Instant::now();
    for wait in WAITS {
        // An unreachable destination (ICMP) is a lost request, not an error of the check.
        let _ = socket.send_to(&req[..n], to).await;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let got = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await;
            let Ok(got) = got else { break };
            let Ok((len, from)) = got else { continue };
            match wire::parse_binding_answer(&buf[..len], &tid) {
                Ok(answer) => {
                    return Ok(Reply::Answered(Answer {
                        answer,
                        from: SocketAddr::new(from.ip().to_canonical(), from.port()),
                        rtt: started.elapsed(),
                    }));
                }
                Err(wire::StunError::Refused(_)) => return Ok(Reply::Refused),
                Err(_) => continue,
            }
        }
    }
    Ok(Reply::Silent)
}

/// Runs every test against the STUN server at `server`; `second_port` names the server's
/// second port when it is not the main port + 1 (it is used only without RFC 5780).
pub async fn run(server: SocketAddr, second_port: Option<u16>) -> Result<Report, Error> {
    let mut report = Report {
        server,
        udp: false,
        local: None,
        public: None,
        latency_ms: None,
        other_address: None,
        second_port: None,
        mapping: None,
        mapping_address_tested: false,
        allocation: None,
        port_preserved: None,
        filtering: None,
        filtering_address_tested: false,
        hairpinning: None,
        port_mapping: None,
        verdict: String::new(),
    };
    // The router is asked meanwhile (a UPnP search takes up to a second).
    let asks_router = server.is_ipv4() && !server.ip().is_loopback();
    let port_mapping = tokio::spawn(async move { if asks_router { probe_port_mapping().await } else { None } });
    let mapping_socket = socket_for(server).await?;
    report.local = local_addr(&mapping_socket, server).await;
    // UDP and latency.
    let mut rtts = Vec::new();
    let mut first = None;
    for _ in 0..LATENCY_SAMPLES {
        match ask(&mapping_socket, server, Change::default()).await? {
            Some(a) => {
                rtts.push(a.rtt.as_secs_f64() * 1000.0);
                first.get_or_insert(a);
            }
            None if first.is_none() => break, // no answer to three sends: no UDP
            None => {}
        }
    }
    let Some(first) = first else {
        report.verdict =
            "UDP to the server gets no answer (blocked, or no STUN server there): calls go through the relay over TCP"
                .into();
        return Ok(report);
    };
    rtts.sort_by(f64::total_cmp);
    report.udp = true;
    report.latency_ms = Some(rtts[rtts.len() / 2]);
    let m1 = first.answer.mapped;
    report.public = Some(m1);
    report.port_preserved = report.local.map(|l| l.port() == m1.port());
    report.other_address = first.answer.origin.other_address;
    if report.other_address.is_some() {
        // Filtering before mapping: the mapping test contacts the alternate address, and a NAT
        // whose filter remembers every address any of its mappings contacted would admit it
        // after. The filtering socket's mappings then sit between the first port and the
        // others: the allocation is read from the two that follow each other.
        filtering(server, &mut report).await?;
        let ports = mapping(&mapping_socket, server, m1, second_port, &mut report).await?;
        report.allocation = allocation(if ports.len() == 3 { &ports[1..] } else { &ports });
    } else {
        // Without an alternate address nothing contacts another IP: mapping first, so its two
        // ports follow each other.
        let ports = mapping(&mapping_socket, server, m1, second_port, &mut report).await?;
        report.allocation = allocation(&ports);
        filtering(server, &mut report).await?;
    }
    report.hairpinning = Some(hairpin(&mapping_socket, m1).await?);
    report.port_mapping = port_mapping.await.ok().flatten();
    report.verdict = verdict(&report);
    Ok(report)
}

/// The mapping test: fills `report.mapping` and returns the public ports seen, in order.
async fn mapping(
    socket: &UdpSocket,
    server: SocketAddr,
    m1: SocketAddr,
    second_port: Option<u16>,
    report: &mut Report,
) -> Result<Vec<u16>, Error> {
    let mut ports = vec![m1.port()];
    if let Some(other) = report.other_address {
        report.mapping_address_tested = true;
        let Some(m2) = ask(socket, SocketAddr::new(other.ip(), server.port()), Change::default()).await? else {
            return Ok(ports);
        };
        ports.push(m2.answer.mapped.port());
        if m2.answer.mapped == m1 {
            report.mapping = Some(Behaviour::EndpointIndependent);
            return Ok(ports);
        }
        let Some(m3) = ask(socket, other, Change::default()).await? else {
            return Ok(ports);
        };
        ports.push(m3.answer.mapped.port());
        report.mapping = Some(if m3.answer.mapped == m2.answer.mapped {
            Behaviour::AddressDependent
        } else {
            Behaviour::AddressAndPortDependent
        });
        return Ok(ports);
    }
    // Without an alternate IP: the second port of the same IP.
    let port = second_port.unwrap_or_else(|| server.port().wrapping_add(1));
    let Some(m2) = ask(socket, SocketAddr::new(server.ip(), port), Change::default()).await? else {
        return Ok(ports);
    };
    report.second_port = Some(port);
    ports.push(m2.answer.mapped.port());
    if m2.answer.mapped == m1 {
        report.mapping = Some(Behaviour::EndpointIndependent);
        return Ok(ports);
    }
    report.mapping = Some(Behaviour::AddressAndPortDependent);
    Ok(ports)
}

/// The allocation pattern of a dependent mapping's ports.
fn allocation(ports: &[u16]) -> Option<Allocation> {
    if ports.len() < 2 || ports.windows(2).all(|w| w[0] == w[1]) {
        return None;
    }
    let steps: Vec<i32> = ports.windows(2).map(|w| i32::from(w[1]) - i32::from(w[0])).collect();
    let step = steps[0];
    let sequential = step != 0
        && step.abs() <= natcall_proto::control::Mapping::MAX_SEQUENTIAL_STEP
        && steps.iter().all(|s| *s == step);
    Some(if sequential {
        Allocation::Sequential { step }
    } else {
        Allocation::Random
    })
}

/// The filtering test, from a fresh socket: fills `report.filtering`.
async fn filtering(server: SocketAddr, report: &mut Report) -> Result<(), Error> {
    let socket = socket_for(server).await?;
    // Test I opens the NAT towards the server's main address only.
    if ask(&socket, server, Change::default()).await?.is_none() {
        return Ok(());
    }
    // An answer counts only from where it was asked to come from; a server that refuses the
    // change, or ignores it and answers from where it was asked, leaves the filtering untested.
    if report.other_address.is_some() {
        let both = Change { ip: true, port: true };
        match ask_change(&socket, server, both).await? {
            Reply::Answered(a) if a.from.ip() != server.ip() => {
                report.filtering_address_tested = true;
                report.filtering = Some(Behaviour::EndpointIndependent);
                return Ok(());
            }
            Reply::Answered(_) | Reply::Refused => return Ok(()),
            Reply::Silent => report.filtering_address_tested = true,
        }
    }
    let port_only = Change { ip: false, port: true };
    // Without an alternate IP an answer from the other port means only that filtering does not
    // depend on the port (endpoint-independent or address-dependent: `filtering_address_tested`
    // is false then).
    report.filtering = match ask_change(&socket, server, port_only).await? {
        Reply::Answered(a) if a.from.port() != server.port() => Some(Behaviour::AddressDependent),
        Reply::Answered(_) | Reply::Refused => {
            report.filtering_address_tested = false;
            None
        }
        Reply::Silent => Some(Behaviour::AddressAndPortDependent),
    };
    Ok(())
}

/// Whether a request to our own public address comes back to us.
async fn hairpin(socket: &UdpSocket, public: SocketAddr) -> Result<bool, Error> {
    let tid = tid();
    let mut req = [0u8; 64];
    let n =
        wire::encode_change_request(&tid, Change::default(), &mut req).map_err(|e| Error::Protocol(e.to_string()))?;
    let mut buf = [0u8; 1500];
    for wait in WAITS {
        let _ = socket.send_to(&req[..n], public).await;
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(got) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            if let Ok((len, _)) = got
                && len == n
                && buf[..n] == req[..n]
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// What the findings mean for calls.
fn verdict(r: &Report) -> String {
    use Behaviour::*;
    if r.port_mapping.is_some_and(|p| p.upnp || p.nat_pmp || p.pcp) {
        return "the router maps a port on request (natcall asks it): peers reach this host at the mapped \
                port, direct calls with every peer whose UDP works"
            .into();
    }
    match (r.mapping, r.filtering) {
        (Some(EndpointIndependent), Some(EndpointIndependent)) => {
            "reachable from anywhere on this port: direct calls with every peer whose UDP works".into()
        }
        (Some(EndpointIndependent), _) => "a NAT that keeps one port per socket: direct calls by hole punching with \
             most peers, and by birthday traversal with one behind a symmetric NAT; the relay only for peers \
             whose UDP is blocked"
            .into(),
        (Some(_), _) => "a symmetric NAT (a new port per destination): direct calls with peers on a public address \
             or behind a port-keeping NAT (birthday traversal); calls with another symmetric NAT go through the relay"
            .into(),
        (None, _) => "the server does not answer on a second address or port, so the mapping is unknown: calls \
             punch as usual and fall back to the relay"
            .into(),
    }
}

/// The report for a person, one finding per line.
pub fn text(r: &Report) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "not tested".into());
    let mut out = format!("netcheck against {}", r.server);
    match (r.other_address, r.second_port) {
        (Some(o), _) => out.push_str(&format!(" (RFC 5780: alternate address {o})\n")),
        (None, Some(p)) => out.push_str(&format!(" (no alternate address; second port {p})\n")),
        (None, None) => out.push('\n'),
    }
    if !r.udp {
        out.push_str(&format!(
            "  UDP:             no answer\n  calls:           {}\n",
            r.verdict
        ));
        return out;
    }
    let lat = r.latency_ms.map_or(String::new(), |l| {
        format!("; STUN round trip {l:.1} ms (median of {LATENCY_SAMPLES})")
    });
    out.push_str(&format!("  UDP:             works{lat}\n"));
    let preserved = match r.port_preserved {
        Some(true) => ", port kept",
        Some(false) => ", port changed",
        None => "",
    };
    let local = r.local.map(|l| format!(" (local {l}{preserved})")).unwrap_or_default();
    out.push_str(&format!(
        "  public address:  {}{local}\n",
        opt(r.public.map(|p| p.to_string()))
    ));
    let scope = |tested: bool| {
        if tested {
            ""
        } else {
            " (across ports of one IP; the address was not tested)"
        }
    };
    out.push_str(&format!(
        "  mapping:         {}{}\n",
        opt(r.mapping.map(|m| m.name().to_owned())),
        if r.mapping.is_some() {
            scope(r.mapping_address_tested)
        } else {
            ""
        }
    ));
    let filtering = match (r.filtering, r.filtering_address_tested) {
        (Some(Behaviour::AddressDependent), false) => {
            Some("endpoint-independent or address-dependent (the address was not tested)".to_owned())
        }
        (f, _) => f.map(|f| f.name().to_owned()),
    };
    out.push_str(&format!("  filtering:       {}\n", opt(filtering)));
    let allocation = match (r.mapping, r.allocation) {
        (Some(Behaviour::EndpointIndependent), _) => "one port for every destination".to_owned(),
        (_, Some(Allocation::Sequential { step })) => format!("sequential (step {step}): the next ports are predicted"),
        (_, Some(Allocation::Random)) => "random".to_owned(),
        _ => "not tested".to_owned(),
    };
    out.push_str(&format!("  port allocation: {allocation}\n"));
    out.push_str(&format!(
        "  hairpinning:     {}\n",
        opt(r.hairpinning.map(|h| if h { "yes" } else { "no" }.to_owned()))
    ));
    let protocols = r.port_mapping.map(|p| {
        let names: Vec<&str> = [(p.upnp, "UPnP-IGD"), (p.nat_pmp, "NAT-PMP"), (p.pcp, "PCP")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        if names.is_empty() {
            "none answered".to_owned()
        } else {
            names.join(", ")
        }
    });
    out.push_str(&format!("  port mapping:    {}\n", opt(protocols)));
    out.push_str(&format!("  calls:           {}\n", r.verdict));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_patterns() {
        assert_eq!(allocation(&[40_000]), None);
        assert_eq!(allocation(&[40_000, 40_000]), None);
        assert_eq!(
            allocation(&[40_000, 40_002, 40_004]),
            Some(Allocation::Sequential { step: 2 })
        );
        assert_eq!(allocation(&[40_000, 40_001]), Some(Allocation::Sequential { step: 1 }));
        assert_eq!(allocation(&[40_000, 40_002, 40_007]), Some(Allocation::Random));
        assert_eq!(allocation(&[40_000, 21_113]), Some(Allocation::Random));
    }
}
