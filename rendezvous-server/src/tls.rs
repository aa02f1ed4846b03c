//! TLS 1.3 on the TCP channel (rustls with the ring provider), control and relay alike.
//!
//! Two ways for peers to know the server:
//! - **a CA certificate** (`tls_cert` / `tls_key`, PEM files, e.g. from certbot): peers verify
//!   it against the web PKI roots for the name they dialled. [`ServerTls::reload`] re-reads the
//!   files (the server calls it on SIGHUP), so a renewed certificate is served without a
//!   restart; a file that does not load leaves the current certificate in place.
//! - **its own long-lived key** (no certificate configured): created in the state directory on
//!   first start (`server-key.pem`, mode 0600), with a self-signed certificate made at each
//!   start. Peers pin the key ([`ServerKey`]) on first use or take it from `--server
//!   HOST:PORT#SHA256:…`; the server logs it at start. With no state directory (an in-memory
//!   server: tests, embedders) the key lives as long as the process.
//!
//! Data flow: the accept loop hands each TCP connection to [`crate::conn::serve`], which runs
//! the handshake under the hello deadline ([`ServerTls::acceptor`]), then splits the stream
//! ([`stream`]) between its reader and the outbox's writer.

pub mod stream;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use natcall_proto::server_key::ServerKey;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;
use tracing::info;

/// The name in the server's self-signed certificate (peers pin its key, not its name).
pub const SELF_SIGNED_NAME: &str = "natcall-rendezvous";
/// The file, in the state directory, that holds the server's own key.
pub const KEY_FILE: &str = "server-key.pem";

/// What the server's TLS identity cannot be made from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A key or certificate file cannot be read or written.
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    /// rustls refused the key or the configuration.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// The self-signed certificate could not be made.
    #[error("cannot make the self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
}

/// Where the server's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// A CA certificate chain and its key (PEM files).
    Files { cert: PathBuf, key: PathBuf },
    /// The server's own key in `dir` (created if missing), or in memory when `None`.
    SelfSigned { dir: Option<PathBuf> },
}

/// The server's TLS identity and the rustls configuration that serves it.
pub struct ServerTls {
    source: TlsSource,
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("source", &self.source)
            .field("key", &self.key())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads (or, for a self-signed server, creates) the identity from `source`.
    pub fn load(source: TlsSource) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = certified(&source, &provider)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(current),
            provider: provider.clone(),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![natcall_proto::ALPN.to_vec()];
        // No session tickets or resumption: connections are long-lived, and 0-RTT data could be
        // replayed.
        config.send_tls13_tickets = 0;
        Ok(Self {
            source,
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The key peers pin.
    pub fn key(&self) -> ServerKey {
        self.resolver.key()
    }

    /// Whether the certificate is self-signed (peers pin the key) or from files (a CA's).
    pub fn source(&self) -> &TlsSource {
        &self.source
    }

    /// Re-reads the certificate and key files; the current ones stay in place on error. A
    /// self-signed server keeps its key. Returns the key now served.
    pub fn reload(&self) -> Result<ServerKey, TlsError> {
        if let TlsSource::Files { .. } = self.source {
            let fresh = certified(&self.source, &self.resolver.provider)?;
            *self.resolver.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        }
        Ok(self.key())
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// Serves the current certificate to every handshake.
#[derive(Debug)]
struct Resolver {
    current: RwLock<(Arc<CertifiedKey>, ServerKey)>,
    provider: Arc<CryptoProvider>,
}

impl Resolver {
    fn key(&self) -> ServerKey {
        self.current.read().unwrap_or_else(|p| p.into_inner()).1
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone())
    }
}

fn certified(source: &TlsSource, provider: &CryptoProvider) -> Result<(Arc<CertifiedKey>, ServerKey), TlsError> {
    let (chain, key) = match source {
        TlsSource::Files { cert, key } => (read_chain(cert)?, read_key(key)?),
        TlsSource::SelfSigned { dir } => self_signed(dir.as_deref())?,
    };
    let leaf = chain.first().ok_or_else(|| TlsError::Invalid {
        path: PathBuf::new(),
        why: "no certificate".into(),
    })?;
    let server_key = ServerKey::of_cert(leaf).map_err(|e| TlsError::Invalid {
        path: match source {
            TlsSource::Files { cert, .. } => cert.clone(),
            TlsSource::SelfSigned { .. } => PathBuf::from(KEY_FILE),
        },
        why: e.to_string(),
    })?;
    let signer = provider.key_provider.load_private_key(key)?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match()?;
    Ok((Arc::new(certified), server_key))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = std::fs::read(path).map_err(|source| TlsError::File {
        what: "cannot read the TLS certificate",
        path: path.to_owned(),
        source,
    })?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            why: format!("not a PEM certificate chain: {e}"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            why: "no CERTIFICATE block".into(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = std::fs::read(path).map_err(|source| TlsError::File {
        what: "cannot read the TLS key",
        path: path.to_owned(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| TlsError::Invalid {
        path: path.to_owned(),
        why: format!("not a PEM private key: {e}"),
    })
}

/// The server's own key (loaded from `dir`, or created there) and a fresh self-signed
/// certificate for it.
fn self_signed(dir: Option<&Path>) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let key = match dir {
        Some(dir) => load_or_create_key(dir)?,
        None => rcgen::KeyPair::generate()?,
    };
    let cert = rcgen::CertificateParams::new(vec![SELF_SIGNED_NAME.to_owned()])?.self_signed(&key)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((vec![cert.der().clone()], der))
}

fn load_or_create_key(dir: &Path) -> Result<rcgen::KeyPair, TlsError> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(|e| TlsError::Invalid {
            path: path.clone(),
            why: format!("not the server's key: {e}"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate()?;
            write_private(&path, key.serialize_pem().as_bytes()).map_err(|source| TlsError::File {
                what: "cannot write the server key",
                path: path.clone(),
                source,
            })?;
            info!(path = %path.display(), "created the server's TLS key");
            Ok(key)
        }
        Err(source) => Err(TlsError::File {
            what: "cannot read the server key",
            path,
            source,
        }),
    }
}

/// Writes `bytes` to `path` readable by the owner only, atomically (a temporary file renamed
/// over it after an fsync), creating the directory.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("pem.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_server_keeps_its_key_across_restarts() {
        let dir = tempfile::tempdir().expect("dir");
        let first = ServerTls::load(TlsSource::SelfSigned {
            dir: Some(dir.path().into()),
        })
        .expect("creates");
        let again = ServerTls::load(TlsSource::SelfSigned {
            dir: Some(dir.path().into()),
        })
        .expect("loads");
        assert_eq!(first.key(), again.key());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key is private");
        let ephemeral = ServerTls::load(TlsSource::SelfSigned { dir: None }).expect("in memory");
        assert_ne!(ephemeral.key(), first.key());
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join(KEY_FILE), "not a key").expect("write");
        let e = ServerTls::load(TlsSource::SelfSigned {
            dir: Some(dir.path().into()),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains(KEY_FILE), "{e}");
    }

    #[test]
    fn certificate_files_are_served_and_reloaded() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let write = |name: &str| {
            let k = rcgen::KeyPair::generate().expect("keygen");
            let c = rcgen::CertificateParams::new(vec![name.to_owned()])
                .expect("params")
                .self_signed(&k)
                .expect("cert");
            std::fs::write(&cert, c.pem()).expect("cert");
            std::fs::write(&key, k.serialize_pem()).expect("key");
            ServerKey::of_cert(c.der()).expect("key")
        };
        let first = write("one.example");
        let tls = ServerTls::load(TlsSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        })
        .expect("loads");
        assert_eq!(tls.key(), first);
        let second = write("one.example");
        assert_eq!(tls.reload().expect("reloads"), second);
        // A broken renewal keeps the certificate that works.
        std::fs::write(&key, "garbage").expect("write");
        let e = tls.reload().unwrap_err().to_string();
        assert!(e.contains("key.pem"), "{e}");
        assert_eq!(tls.key(), second);
        let e = ServerTls::load(TlsSource::Files {
            cert: dir.path().join("missing.pem"),
            key,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
