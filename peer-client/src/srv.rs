//! DNS SRV records for the rendezvous service (RFC 2782). `--server example.net`, a DNS name
//! given without a port, first asks for `_natcall._tcp.example.net`: each record's target and
//! port is a server, in the records' order (the lowest priority first; within one priority a
//! weighted random order, so clients spread over the nodes as the weights say). The name's own
//! addresses (A and AAAA) on port 3478 are looked up at the same time, and serve, as before,
//! when there is no SRV record or no answer within [`LOOKUP_TIMEOUT`]. A name with a port, an
//! IP address, `localhost`, single-label names and names in the hosts file are never looked up
//! this way.
//!
//! The servers an SRV record names share the trust of the name the user gave (its pinned key
//! or certificate), as the addresses of one name do: a deployment publishes one identity for
//! its cluster whatever the node.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use rand::Rng;

/// The service label natcall's records live under.
pub const SERVICE: &str = "_natcall._tcp";

/// How long the SRV lookup and its targets' addresses may take together before the name's own
/// addresses (looked up meanwhile) are used instead.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The SRV name to ask for the server `addr` (`HOST[:PORT]` without its `#key`), if any: a DNS
/// name with a dot and no port that is not an IP address or `localhost`.
pub fn srv_name(addr: &str) -> Option<String> {
    let host = addr.strip_suffix('.').unwrap_or(addr);
    let is_name = !host.is_empty()
        && host.contains('.')
        && !host.contains(':')
        && host.parse::<std::net::IpAddr>().is_err()
        && !host.eq_ignore_ascii_case("localhost")
        && !host.to_ascii_lowercase().ends_with(".localhost");
    is_name.then(|| format!("{SERVICE}.{host}."))
}

/// One SRV record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// The target host, as a fully qualified name (`.` alone: no service here).
    pub host: String,
}

/// The records in the order RFC 2782 tries them: by priority, lowest first; within a
/// priority, each next one drawn by the RFC's rule (a number from 0 to the weights' sum,
/// inclusive, against the running sums, weight 0 first): the heavier the likelier, and a
/// weight 0 record first only by a draw of 0.
pub fn order(mut targets: Vec<Target>, rng: &mut impl Rng) -> Vec<Target> {
    targets.sort_by_key(|t| (t.priority, t.weight));
    let mut out = Vec::with_capacity(targets.len());
    while !targets.is_empty() {
        let priority = targets[0].priority;
        let mut group: Vec<Target> = Vec::new();
        while targets.first().is_some_and(|t| t.priority == priority) {
            group.push(targets.remove(0));
        }
        // Weight 0 first, as the RFC's running sums have it.
        while !group.is_empty() {
            let total: u32 = group.iter().map(|t| u32::from(t.weight)).sum();
            let draw = rng.random_range(0..=total);
            let mut running = 0;
            let at = group
                .iter()
                .position(|t| {
                    running += u32::from(t.weight);
                    running >= draw
                })
                .unwrap_or(0);
            out.push(group.remove(at));
        }
    }
    out
}

/// The resolver of the system (`/etc/resolv.conf`, the hosts file), if it can be read; a
/// target's IPv4 and IPv6 addresses both.
pub fn system_resolver() -> Option<TokioResolver> {
    let mut builder = TokioResolver::builder_tokio().ok()?;
    builder.options_mut().ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    Some(builder.build())
}

/// Whether `host` is named in the hosts file (`/etc/hosts`): such a name is the machine's own
/// business, not asked of DNS as `_natcall._tcp.HOST`.
pub fn in_hosts_file(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    std::fs::read_to_string("/etc/hosts").is_ok_and(|text| {
        text.lines().any(|line| {
            let line = line.split('#').next().unwrap_or("");
            line.split_ascii_whitespace()
                .skip(1)
                .any(|name| name.eq_ignore_ascii_case(host))
        })
    })
}

/// What the SRV records for `name` say: `Ok(None)` when there are none (or no answer in time,
/// or none of their targets resolve): use the name's own addresses; `Ok(Some(servers))` in
/// the records' order; `Err` when the domain says it offers no natcall service (a single
/// record whose target is `.`).
pub async fn lookup(resolver: &TokioResolver, name: &str) -> Result<Option<Vec<SocketAddr>>, String> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, lookup_within(resolver, name)).await {
        Ok(found) => found,
        Err(_) => {
            tracing::debug!(%name, "SRV lookup not done in time: the name's own addresses serve");
            Ok(None)
        }
    }
}

async fn lookup_within(resolver: &TokioResolver, name: &str) -> Result<Option<Vec<SocketAddr>>, String> {
    let records = match tokio::time::timeout(LOOKUP_TIMEOUT, resolver.srv_lookup(name)).await {
        Ok(Ok(found)) => found
            .iter()
            .map(|r| Target {
                priority: r.priority(),
                weight: r.weight(),
                port: r.port(),
                host: r.target().to_ascii(),
            })
            .collect::<Vec<_>>(),
        Ok(Err(e)) => {
            tracing::debug!(%name, error = %e, "no SRV record: the name's own addresses serve");
            return Ok(None);
        }
        Err(_) => {
            tracing::debug!(%name, "no SRV answer in time: the name's own addresses serve");
            return Ok(None);
        }
    };
    if let [only] = records.as_slice()
        && only.host == "."
    {
        return Err(format!(
            "{name} says this domain offers no natcall server (SRV target \".\")"
        ));
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
    let targets: Vec<Target> = order(records, &mut rng).into_iter().filter(|t| t.host != ".").collect();
    // All targets at once, their addresses kept in the records' order.
    let found = futures_util::future::join_all(targets.iter().map(|t| resolver.lookup_ip(t.host.as_str()))).await;
    let mut servers: Vec<SocketAddr> = Vec::new();
    for (target, ips) in targets.iter().zip(found) {
        match ips {
            Ok(ips) => {
                for ip in ips.iter() {
                    let addr = SocketAddr::new(ip.to_canonical(), target.port);
                    if !servers.contains(&addr) {
                        servers.push(addr);
                    }
                }
            }
            Err(e) => tracing::warn!(%name, target = %target.host, error = %e, "an SRV target does not resolve"),
        }
    }
    Ok((!servers.is_empty()).then_some(servers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn t(priority: u16, weight: u16, host: &str) -> Target {
        Target {
            priority,
            weight,
            port: 3478,
            host: host.into(),
        }
    }

    #[test]
    fn only_names_without_a_port_are_looked_up() {
        assert_eq!(srv_name("example.net").as_deref(), Some("_natcall._tcp.example.net."));
        assert_eq!(srv_name("example.net.").as_deref(), Some("_natcall._tcp.example.net."));
        for no in [
            "example.net:3478",
            "192.0.2.1",
            "2001:db8::1",
            "[2001:db8::1]",
            "localhost",
            "a.localhost",
            "rv",
            "",
        ] {
            assert_eq!(srv_name(no), None, "{no}");
        }
        // The hosts file's names are the machine's own: no SRV query for them.
        assert!(in_hosts_file("localhost"));
        assert!(in_hosts_file("LOCALHOST."));
        assert!(!in_hosts_file("no-such-name.invalid"));
    }

    #[test]
    fn lower_priorities_come_first_and_weights_share_the_first_place() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut first_heavy = 0;
        for _ in 0..2000 {
            let got = order(
                vec![t(20, 0, "backup."), t(10, 1, "light."), t(10, 3, "heavy.")],
                &mut rng,
            );
            assert_eq!(got.len(), 3);
            assert_eq!(got[2].host, "backup.", "{got:?}");
            if got[0].host == "heavy." {
                first_heavy += 1;
            }
        }
        // Weights 3 : 1, drawn as RFC 2782 says (a number from 0 to the sum, inclusive, against
        // running sums): the heavy one is first 3 times in 5 (draws 2, 3, 4 of 0–4).
        let share = f64::from(first_heavy) / 2000.0;
        assert!((0.55..0.65).contains(&share), "heavy first in {share:.3} of the draws");
    }

    /// A DNS server on loopback answering `_natcall._tcp.cluster.test.` with two targets (and
    /// their addresses), and `_natcall._tcp.none.test.` with `.`; everything else NXDOMAIN.
    async fn dns_server(ports: (u16, u16)) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
        use hickory_resolver::proto::rr::rdata::{A, AAAA, SRV};
        use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("binds");
        let addr = socket.local_addr().expect("addr");
        let name = |s: &str| Name::from_ascii(s).expect("name");
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut reply = Message::new();
                reply
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_recursion_available(true);
                reply.add_queries(query.queries().to_vec());
                for q in query.queries() {
                    let qname = q.name().to_ascii();
                    let answer = |rdata: RData| Record::from_rdata(q.name().clone(), 60, rdata);
                    match (qname.as_str(), q.query_type()) {
                        ("_natcall._tcp.cluster.test.", RecordType::SRV) => {
                            reply.add_answer(answer(RData::SRV(SRV::new(20, 1, ports.1, name("n2.cluster.test.")))));
                            reply.add_answer(answer(RData::SRV(SRV::new(10, 1, ports.0, name("n1.cluster.test.")))));
                        }
                        ("_natcall._tcp.none.test.", RecordType::SRV) => {
                            reply.add_answer(answer(RData::SRV(SRV::new(0, 0, 0, name(".")))));
                        }
                        ("n1.cluster.test.", RecordType::A) => {
                            reply.add_answer(answer(RData::A(A::new(127, 0, 0, 1))));
                        }
                        ("n2.cluster.test.", RecordType::A) => {
                            reply.add_answer(answer(RData::A(A::new(127, 0, 0, 2))));
                        }
                        ("n1.cluster.test.", RecordType::AAAA) => {
                            reply.add_answer(answer(RData::AAAA(AAAA::new(0, 0, 0, 0, 0, 0, 0, 1))));
                        }
                        ("n2.cluster.test.", RecordType::AAAA) => {}
                        _ => {
                            reply.set_response_code(ResponseCode::NXDomain);
                        }
                    }
                }
                let Ok(bytes) = reply.to_vec() else { continue };
                let _ = socket.send_to(&bytes, from).await;
            }
        });
        (addr, task)
    }

    /// A resolver asking `server`, with the options of [`system_resolver`].
    fn resolver_at(server: SocketAddr) -> TokioResolver {
        use hickory_resolver::config::{LookupIpStrategy, NameServerConfigGroup, ResolverConfig};
        use hickory_resolver::name_server::TokioConnectionProvider;
        let config = ResolverConfig::from_parts(
            None,
            vec![],
            NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true),
        );
        let mut builder = TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
        builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        builder.build()
    }

    #[tokio::test]
    async fn srv_records_name_the_servers_in_their_order_and_dot_means_none() {
        let (dns, task) = dns_server((4001, 4002)).await;
        let resolver = resolver_at(dns);
        let found = lookup(&resolver, &srv_name("cluster.test").expect("a name"))
            .await
            .expect("records");
        // By priority: n1 (its IPv4 and IPv6 addresses), then n2.
        let found = found.expect("servers");
        let mut first = found[..2].to_vec();
        first.sort();
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(first, [addr("127.0.0.1:4001"), addr("[::1]:4001")], "{found:?}");
        assert_eq!(found[2..], [addr("127.0.0.2:4002")], "{found:?}");
        // No record: the name's own addresses serve.
        assert_eq!(lookup(&resolver, "_natcall._tcp.other.test.").await, Ok(None));
        // "." alone: the domain offers no natcall server.
        let err = lookup(&resolver, "_natcall._tcp.none.test.")
            .await
            .expect_err("no service");
        assert!(err.contains("offers no natcall server"), "{err}");
        task.abort();
    }
}
