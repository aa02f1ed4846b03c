//! How a peer knows its rendezvous server is the real one: the TLS channel's server
//! certificate is checked against, in this order,
//! 1. a key given explicitly ([`ServerTrust::pinned`], from `--server HOST:PORT#SHA256:…`):
//!    only that key is accepted;
//! 2. the key this endpoint, or an earlier run (the `known_servers` file), met first for this
//!    server: a different key is refused ([`Error::ServerKeyChanged`]), never silently taken;
//! 3. the web PKI roots, for a server dialled by DNS name with a certificate from a public CA
//!    (such keys rotate with every renewal and are not pinned);
//! 4. otherwise the key is trusted on first use and remembered (in memory for the endpoint's
//!    life, and in `known_servers` when there is one), as SSH does with host keys.
//!
//! The TLS 1.3 handshake signature is verified in every case: the server holds the key.
//!
//! `known_servers` has one line per server, `HOST:PORT SHA256:…`; `#` starts a comment.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use natcall_proto::server_key::ServerKey;
use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tracing::{info, warn};

use crate::error::Error;

/// How an endpoint checks its server's key (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTrust {
    /// The server as the user named it, `HOST:PORT`: its line in `known_servers` and its name
    /// in errors.
    pub label: String,
    /// The DNS name to verify a CA certificate for (`None` when dialled by IP address).
    pub dns_name: Option<String>,
    /// The only key accepted, when given.
    pub pinned: Option<ServerKey>,
    /// Where keys trusted on first use are remembered across runs.
    pub known_servers: Option<PathBuf>,
    /// The certificate authorities a DNS-named server's certificate may chain to; empty: the
    /// web PKI roots (Mozilla's, as `webpki-roots` ships them). Set for a private CA.
    pub ca_roots: Vec<CertificateDer<'static>>,
}

impl ServerTrust {
    /// Trust on first use, remembered for this endpoint's life only.
    pub fn first_use(label: impl Into<String>) -> Self {
        let label = label.into();
        let dns_name = dns_name_of(&label);
        Self {
            label,
            dns_name,
            pinned: None,
            known_servers: None,
            ca_roots: Vec::new(),
        }
    }

    /// Only `key` is accepted.
    pub fn pinned(label: impl Into<String>, key: ServerKey) -> Self {
        Self {
            pinned: Some(key),
            ..Self::first_use(label)
        }
    }
}

/// The host part of `HOST:PORT` when it is a DNS name (not an IP address).
fn dns_name_of(label: &str) -> Option<String> {
    let host = match label.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => label,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.parse::<std::net::IpAddr>().is_ok() {
        None
    } else {
        Some(host.to_owned())
    }
}

/// The keys of `known_servers`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KnownServers {
    keys: BTreeMap<String, ServerKey>,
}

impl KnownServers {
    /// Reads `path` (an absent file knows no server).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(Error::Tls(format!("cannot read {}: {e}", path.display()))),
        };
        let mut keys = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(label), Some(key), None) = (words.next(), words.next(), words.next()) else {
                return Err(Error::Tls(format!(
                    "{} line {}: expected `HOST:PORT SHA256:…`",
                    path.display(),
                    n + 1
                )));
            };
            let key = key
                .parse::<ServerKey>()
                .map_err(|e| Error::Tls(format!("{} line {}: {e}", path.display(), n + 1)))?;
            keys.insert(label.to_owned(), key);
        }
        Ok(Self { keys })
    }

    /// The key remembered for `label`.
    pub fn get(&self, label: &str) -> Option<ServerKey> {
        self.keys.get(label).copied()
    }

    /// Remembers `key` for `label` in `path` (replacing what was there), atomically.
    pub fn record(path: &Path, label: &str, key: ServerKey) -> Result<(), Error> {
        let mut known = Self::load(path)?;
        known.keys.insert(label.to_owned(), key);
        let mut text = String::from("# natcall: rendezvous servers and their keys (HOST:PORT SHA256:...)\n");
        for (l, k) in &known.keys {
            text.push_str(&format!("{l} {k}\n"));
        }
        crate::file::replace_private(path, text.as_bytes())
            .map_err(|e| Error::Tls(format!("cannot write {}: {e}", path.display())))
    }
}

/// Where the key a server's key was checked against came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Given,
    Remembered,
}

/// The TLS verifier of one endpoint's server connections.
#[derive(Debug)]
pub(crate) struct Verifier {
    trust: ServerTrust,
    provider: Arc<CryptoProvider>,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// The key met first by this endpoint: later connections must present it.
    learned: Mutex<Option<ServerKey>>,
    /// The last refusal, for the error the connection reports.
    refused: Mutex<Option<Error>>,
}

impl Verifier {
    pub(crate) fn new(trust: ServerTrust, provider: Arc<CryptoProvider>) -> Self {
        let webpki = trust.dns_name.as_ref().and_then(|_| {
            let roots = if trust.ca_roots.is_empty() {
                rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                }
            } else {
                let mut roots = rustls::RootCertStore::empty();
                roots.add_parsable_certificates(trust.ca_roots.iter().cloned());
                roots
            };
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .ok()
        });
        Self {
            trust,
            provider,
            webpki,
            learned: Mutex::new(None),
            refused: Mutex::new(None),
        }
    }

    /// Why the last handshake's certificate was refused, if it was.
    pub(crate) fn take_refusal(&self) -> Option<Error> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn refuse(&self, e: Error) -> rustls::Error {
        let text = e.to_string();
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        rustls::Error::General(text)
    }

    fn remembered(&self) -> Result<Option<ServerKey>, Error> {
        if let Some(k) = *self.learned.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(Some(k));
        }
        match &self.trust.known_servers {
            Some(path) => Ok(KnownServers::load(path)?.get(&self.trust.label)),
            None => Ok(None),
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<(), Error> {
        let presented = ServerKey::of_cert(end_entity).map_err(|e| Error::Tls(e.to_string()))?;
        let changed = |known, from| Error::ServerKeyChanged {
            server: self.trust.label.clone(),
            known,
            presented,
            given: from == Known::Given,
        };
        if let Some(key) = self.trust.pinned {
            return if key == presented {
                Ok(())
            } else {
                Err(changed(key, Known::Given))
            };
        }
        if let Some(key) = self.remembered()? {
            return if key == presented {
                *self.learned.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
                Ok(())
            } else {
                Err(changed(key, Known::Remembered))
            };
        }
        if let Some(webpki) = &self.webpki {
            if webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                .is_ok()
            {
                return Ok(());
            }
        }
        *self.learned.lock().unwrap_or_else(|p| p.into_inner()) = Some(presented);
        match &self.trust.known_servers {
            Some(path) => {
                KnownServers::record(path, &self.trust.label, presented)?;
                info!(server = %self.trust.label, key = %presented, file = %path.display(),
                    "first connection to this server: its key is remembered");
            }
            None => {
                info!(server = %self.trust.label, key = %presented, "first connection to this server: its key is pinned")
            }
        }
        Ok(())
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates, server_name, ocsp, now) {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                warn!(error = %e, "server certificate refused");
                Err(self.refuse(e))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS client configuration of an endpoint's server connections, and its verifier.
pub(crate) fn client_config(trust: ServerTrust) -> Result<(Arc<rustls::ClientConfig>, Arc<Verifier>), Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Verifier::new(trust, provider.clone()));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![natcall_proto::ALPN.to_vec()];
    // Every connection is a fresh handshake: nothing to resume, no 0-RTT.
    config.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(config), verifier))
}

/// The name the TLS handshake is made for: the DNS name, else the address.
pub(crate) fn server_name(trust: &ServerTrust, addr: std::net::SocketAddr) -> ServerName<'static> {
    trust
        .dns_name
        .as_ref()
        .and_then(|n| ServerName::try_from(n.clone()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_servers_round_trip_and_replace() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("known_servers");
        assert_eq!(
            KnownServers::load(&path).expect("absent is empty"),
            KnownServers::default()
        );
        KnownServers::record(&path, "127.0.0.1:3478", ServerKey([1; 32])).expect("writes");
        KnownServers::record(&path, "rv.example.net:3478", ServerKey([2; 32])).expect("writes");
        KnownServers::record(&path, "127.0.0.1:3478", ServerKey([3; 32])).expect("replaces");
        let known = KnownServers::load(&path).expect("reads");
        assert_eq!(known.get("127.0.0.1:3478"), Some(ServerKey([3; 32])));
        assert_eq!(known.get("rv.example.net:3478"), Some(ServerKey([2; 32])));
        assert_eq!(known.get("other:1"), None);
    }

    #[test]
    fn a_bad_known_servers_line_names_the_file_and_line() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("known_servers");
        std::fs::write(&path, "# comment\n127.0.0.1:3478 SHA256:nope\n").expect("write");
        let e = KnownServers::load(&path).unwrap_err().to_string();
        assert!(e.contains("known_servers line 2"), "{e}");
    }

    #[test]
    fn dns_names_are_told_from_addresses() {
        assert_eq!(dns_name_of("127.0.0.1:3478"), None);
        assert_eq!(dns_name_of("[::1]:3478"), None);
        assert_eq!(dns_name_of("rv.example.net:3478"), Some("rv.example.net".into()));
        assert_eq!(dns_name_of("localhost"), Some("localhost".into()));
    }
}
