//! Where to find the server, who we are, and our identity: flags, then `config.toml` in the
//! home directory, then defaults.
//!
//! ```toml
//! server = "rendezvous.example.net:3478"   # HOST[:PORT][#SHA256:KEY]; the port defaults to 3478
//! name = "alice"
//! ```
//!
//! The server's TLS key is checked against `#SHA256:…` when given, else against the key
//! remembered in `known_servers` in the home directory (recorded on the first connection).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use natcall::{Contacts, Identity, ServerKey, ServerTrust};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server: Option<String>,
    name: Option<String>,
}

/// Everything a session needs to register.
#[derive(Debug)]
pub struct Settings {
    pub server: SocketAddr,
    pub name: String,
    pub identity: Identity,
    /// How the server's key is checked.
    pub trust: ServerTrust,
    /// The keys met before, for names on this server (scoped by the server's label,
    /// `HOST:PORT` without the key, as in `known_servers`).
    pub contacts: Contacts,
    /// Ask the router to map the UDP port (`--no-portmap` turns it off).
    pub portmap: bool,
    /// The other servers given (`--server` again): the same cluster, tried in order.
    pub fallbacks: Vec<(SocketAddr, ServerTrust)>,
}

/// The file, in the home directory, of servers' keys met on first use.
pub const KNOWN_SERVERS: &str = "known_servers";

/// `HOST[:PORT][#SHA256:KEY]` split into the server as the user names it (`HOST:PORT`, the
/// port 3478 when missing) and the key it must present.
pub fn parse_server(text: &str) -> Result<(String, Option<ServerKey>)> {
    let (addr, key) = match text.split_once('#') {
        Some((a, k)) => (
            a,
            Some(
                k.parse::<ServerKey>()
                    .map_err(|e| crate::output::usage(format!("--server {text:?}: {e}")))?,
            ),
        ),
        None => (text, None),
    };
    let usage = |what: String| Err(crate::output::usage(what));
    if addr.is_empty() {
        return usage(format!(
            "no server address in --server {text:?}: give HOST[:PORT], e.g. rendezvous.example.net or 127.0.0.1:3478"
        ));
    }
    if addr.contains("://") {
        return usage(format!(
            "--server {text:?} is a URL: give HOST[:PORT], e.g. rendezvous.example.net or 127.0.0.1:3478"
        ));
    }
    if let Some((host, port)) = addr.rsplit_once(':')
        && !host.contains(':')
        && port.parse::<u16>().is_err()
    {
        return usage(format!("--server {text:?}: {port:?} is not a port (1-65535)"));
    }
    let has_port = match addr.rsplit_once(':') {
        // An IPv6 address without brackets has colons but no port.
        Some((host, port)) => {
            !host.is_empty() && port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    let label = if has_port {
        addr.to_owned()
    } else if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:{DEFAULT_PORT}")
    } else {
        format!("{addr}:{DEFAULT_PORT}")
    };
    Ok((label, key))
}

const DEFAULT_SERVER: &str = "127.0.0.1:3478";
const DEFAULT_PORT: u16 = 3478;

impl Settings {
    pub async fn resolve(servers: Vec<String>, name: Option<String>, home: Option<PathBuf>) -> Result<Self> {
        let (home, file, file_path) = read_file(home)?;
        let mut servers = servers.into_iter();
        let server = servers
            .next()
            .or(file.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let name = match name.or(file.name).or_else(|| std::env::var("USER").ok()) {
            Some(n) => n,
            None => bail!("no name: pass --name or set name in {}", file_path.display()),
        };
        if let Err(e) = natcall::validate_name(&name) {
            return Err(anyhow::Error::new(crate::output::Coded {
                exit: crate::output::Exit::Refused,
                message: format!("invalid name {name:?}: {e}; choose another with --name"),
            }));
        }
        let (label, key) = parse_server(&server)?;
        let first = lookup_server(&label, &server).await?;
        let identity = Identity::load_or_create(&home)?;
        let contacts = Contacts::in_dir(&home, label.clone());
        let known = home.join(KNOWN_SERVERS);
        let mut others = Vec::new();
        for other in servers {
            let (label, key) = parse_server(&other)?;
            // A name that does not resolve now is left out: the others may do.
            if let Ok(addrs) = lookup_server(&label, &other).await {
                others.push((label, key, addrs));
            }
        }
        let ((addr, trust), fallbacks) = server_list((label, key, first), others, &known);
        Ok(Self {
            server: addr,
            name,
            identity,
            trust,
            contacts,
            portmap: true,
            fallbacks,
        })
    }
}

/// The home directory, its `config.toml` (empty when there is none) and that file's path.
fn read_file(home: Option<PathBuf>) -> Result<(PathBuf, File, PathBuf)> {
    let home = home
        .or_else(Identity::default_dir)
        .context("no home directory for the identity: set --home or NATCALL_HOME")?;
    let file_path = home.join("config.toml");
    let file: File = match std::fs::read_to_string(&file_path) {
        Ok(text) => toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(" line {}", text[..s.start].matches('\n').count() + 1));
            crate::output::usage(format!(
                "invalid {}{}: {} (its keys: server = \"HOST[:PORT]\", name = \"NAME\"; see the README)",
                file_path.display(),
                line.unwrap_or_default(),
                e.message()
            ))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file_path.display())),
    };
    Ok((home, file, file_path))
}

/// Every server to try, home first: each `(label, key, addresses)` given in order, every
/// address of a name in the order the resolver gave them (a name with several addresses is
/// several servers, tried in turn). The addresses of one name share its trust: they must hold
/// the same key, or a certificate for that name.
fn server_list(
    first: (String, Option<ServerKey>, Vec<SocketAddr>),
    others: Vec<(String, Option<ServerKey>, Vec<SocketAddr>)>,
    known: &Path,
) -> ((SocketAddr, ServerTrust), Vec<(SocketAddr, ServerTrust)>) {
    let mut all: Vec<(SocketAddr, ServerTrust)> = Vec::new();
    for (label, key, addrs) in std::iter::once(first).chain(others) {
        for addr in addrs {
            // An address met before is tried once, unless the user pinned another key for it
            // here; a key pinned here for an address met unpinned is never ignored.
            if let Some((_, earlier)) = all.iter_mut().find(|(a, _)| *a == addr) {
                match (earlier.pinned, key) {
                    (None, Some(k)) => {
                        earlier.pinned = Some(k);
                        continue;
                    }
                    (Some(a), Some(b)) if a != b => {}
                    _ => continue,
                }
            }
            let trust = ServerTrust {
                pinned: key,
                known_servers: Some(known.to_path_buf()),
                ..ServerTrust::first_use(label.clone())
            };
            all.push((addr, trust));
        }
    }
    let mut all = all.into_iter();
    let home = all.next().expect("lookup_server gives at least one address");
    (home, all.collect())
}

/// The addresses of the server `label` (HOST[:PORT]), at least one, without repeats; a name
/// that does not resolve is exit 3. `given` is the `--server` text: a DNS name given without a
/// port is looked up as an SRV record first (see [`crate::srv`]).
async fn lookup_server(label: &str, given: &str) -> Result<Vec<SocketAddr>> {
    let unreachable = |why: String| {
        anyhow::Error::new(crate::output::Coded {
            exit: crate::output::Exit::Server,
            message: why,
        })
    };
    // SRV records and the name's own addresses are asked for at once: with no SRV record the
    // wait is the address lookup's alone.
    let host = given.split_once('#').map_or(given, |(h, _)| h);
    let srv = async {
        let name = crate::srv::srv_name(host).filter(|_| !crate::srv::in_hosts_file(host))?;
        let resolver = crate::srv::system_resolver()?;
        Some(crate::srv::lookup(&resolver, &name).await.map(|found| (name, found)))
    };
    let (srv, plain) = tokio::join!(srv, tokio::net::lookup_host(label));
    match srv {
        Some(Err(e)) => return Err(unreachable(format!("{e} (check --server)"))),
        Some(Ok((name, Some(servers)))) => {
            tracing::debug!(%name, ?servers, "servers from SRV records");
            return Ok(servers);
        }
        Some(Ok((_, None))) | None => {}
    }
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let found = plain.map_err(|e| {
        unreachable(format!(
            "cannot resolve the rendezvous server {label}: {e} (check --server)"
        ))
    })?;
    for addr in found {
        // `[::ffff:a.b.c.d]` is the IPv4 server a.b.c.d: reached from an IPv4 socket.
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(unreachable(format!(
            "the rendezvous server {label} has no address (check --server)"
        )));
    }
    Ok(addrs)
}

/// The server's address as `--server` or the config file name it (for commands that need no
/// identity, like `netcheck`).
pub async fn server_addr(servers: Vec<String>, home: Option<PathBuf>) -> Result<SocketAddr> {
    let (_, file, _) = read_file(home)?;
    let server = servers
        .into_iter()
        .next()
        .or(file.server)
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    let (label, _) = parse_server(&server)?;
    Ok(lookup_server(&label, &server).await?[0])
}

/// `natcall trust-server HOST:PORT#SHA256:KEY`: remembers `KEY` for the server in
/// `known_servers`, replacing the key met before (after the server's key was replaced).
pub fn trust_server(home: Option<PathBuf>, server: &str) -> Result<String> {
    let home = home
        .or_else(Identity::default_dir)
        .context("no home directory: set --home or NATCALL_HOME")?;
    let (label, key) = parse_server(server)?;
    let key = key.with_context(|| format!("give the key to trust: {label}#SHA256:..."))?;
    let path = home.join(KNOWN_SERVERS);
    natcall::KnownServers::record(&path, &label, key)?;
    Ok(format!("{label} is now trusted with key {key} (in {})", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_address_of_a_name_is_a_server_tried_in_turn_before_the_next_name() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let key = ServerKey([7; 32]);
        let (home, rest) = server_list(
            (
                "rv.example.net:3478".into(),
                Some(key),
                vec![addr("192.0.2.1:3478"), addr("[2001:db8::1]:3478")],
            ),
            vec![
                ("other.example.net:3478".into(), None, vec![addr("198.51.100.7:3478")]),
                // The same address under another name is tried once.
                ("alias.example.net:3478".into(), None, vec![addr("192.0.2.1:3478")]),
                // With another key pinned for it, it is tried again with that key.
                (
                    "198.51.100.7:3478".into(),
                    Some(ServerKey([9; 32])),
                    vec![addr("198.51.100.7:3478")],
                ),
                (
                    "192.0.2.1:3478".into(),
                    Some(ServerKey([8; 32])),
                    vec![addr("192.0.2.1:3478")],
                ),
            ],
            Path::new("/nonexistent/known_servers"),
        );
        assert_eq!(home.0, addr("192.0.2.1:3478"));
        let order: Vec<SocketAddr> = rest.iter().map(|(a, _)| *a).collect();
        assert_eq!(
            order,
            [
                addr("[2001:db8::1]:3478"),
                addr("198.51.100.7:3478"),
                addr("192.0.2.1:3478")
            ]
        );
        // other.example.net's address, met unpinned, takes the key pinned for it later.
        assert_eq!(rest[1].1.pinned, Some(ServerKey([9; 32])));
        // rv.example.net's, pinned to another key, is tried once more with the later one.
        assert_eq!(rest[2].1.pinned, Some(ServerKey([8; 32])));
        // The addresses of one name share its label and its pinned key.
        assert_eq!(home.1.label, "rv.example.net:3478");
        assert_eq!(rest[0].1.label, "rv.example.net:3478");
        assert_eq!(rest[0].1.pinned, Some(key));
        assert_eq!(rest[1].1.label, "other.example.net:3478");
    }

    #[test]
    fn a_server_without_a_port_uses_3478_and_a_key_after_a_hash_is_pinned() {
        assert_eq!(parse_server("127.0.0.1").unwrap(), ("127.0.0.1:3478".into(), None));
        assert_eq!(
            parse_server("rv.example.net:4000").unwrap(),
            ("rv.example.net:4000".into(), None)
        );
        assert_eq!(parse_server("::1").unwrap(), ("[::1]:3478".into(), None));
        assert_eq!(parse_server("[::1]:9").unwrap(), ("[::1]:9".into(), None));
        let key = ServerKey([7; 32]);
        assert_eq!(
            parse_server(&format!("127.0.0.1:3478#{key}")).unwrap(),
            ("127.0.0.1:3478".into(), Some(key))
        );
        let e = parse_server("127.0.0.1:3478#SHA256:short").unwrap_err();
        assert!(format!("{e:#}").contains("SHA256: and 43 base64"), "{e:#}");
        assert!(parse_server("#x").is_err());
    }
}
