//! A peer's long-lived identity: a self-signed certificate (ECDSA P-256, made with rcgen) and
//! its key. The certificate's SHA-256 fingerprint is the peer's key as the server and other
//! peers know it.
//!
//! Stored as two DER files in the identity directory (`$NATCALL_HOME`, or the user's config
//! dir + `natcall/`): `identity.crt.der` and `identity.key.der` (mode 0600).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use natcall_proto::auth::registration_message;
use natcall_proto::control::Fingerprint;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::Error;

const CERT_FILE: &str = "identity.crt.der";
const KEY_FILE: &str = "identity.key.der";
/// The name in every natcall certificate; peers are identified by fingerprint, not by name.
pub(crate) const CERT_NAME: &str = "natcall.invalid";

/// A certificate and its signing key.
#[derive(Clone)]
pub struct Identity {
    cert: Vec<u8>,
    key: Vec<u8>,
    fingerprint: Fingerprint,
    signer: Arc<EcdsaKeyPair>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A new random identity (not stored).
    pub fn generate() -> Result<Self, Error> {
        let key = rcgen::KeyPair::generate().map_err(|e| Error::Identity(format!("key generation failed: {e}")))?;
        let cert = rcgen::CertificateParams::new(vec![CERT_NAME.into()])
            .and_then(|p| p.self_signed(&key))
            .map_err(|e| Error::Identity(format!("certificate creation failed: {e}")))?;
        Self::from_der(cert.der().to_vec(), key.serialize_der())
    }

    /// An identity from a DER certificate and its PKCS#8 DER key.
    pub fn from_der(cert: Vec<u8>, key: Vec<u8>) -> Result<Self, Error> {
        let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key, &SystemRandom::new())
            .map_err(|e| Error::Identity(format!("the key is not an ECDSA P-256 PKCS#8 key: {e}")))?;
        Ok(Self {
            fingerprint: Fingerprint::of_cert(&cert),
            cert,
            key,
            signer: Arc::new(signer),
        })
    }

    /// The default identity directory: `$NATCALL_HOME`, else `<config dir>/natcall`.
    pub fn default_dir() -> Option<PathBuf> {
        std::env::var_os("NATCALL_HOME")
            .map(PathBuf::from)
            .or_else(|| dirs::config_dir().map(|d| d.join("natcall")))
    }

    /// Loads the identity kept in `dir`, creating and storing a new one on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, Error> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if cert_path.exists() && key_path.exists() {
            let read =
                |p: &Path| std::fs::read(p).map_err(|e| Error::Identity(format!("cannot read {}: {e}", p.display())));
            return Self::from_der(read(&cert_path)?, read(&key_path)?);
        }
        let id = Self::generate()?;
        id.store(dir)?;
        Ok(id)
    }

    fn store(&self, dir: &Path) -> Result<(), Error> {
        let io = |what: &str, e: std::io::Error| Error::Identity(format!("cannot {what} in {}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(|e| io("create the identity directory", e))?;
        let key_path = dir.join(KEY_FILE);
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key_path)
                .map_err(|e| io("write the key", e))?;
            f.write_all(&self.key).map_err(|e| io("write the key", e))?;
        }
        std::fs::write(dir.join(CERT_FILE), &self.cert).map_err(|e| io("write the certificate", e))
    }

    /// The SHA-256 fingerprint of the certificate: this peer's key.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The DER certificate.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }

    /// The registration proof for `name` on a connection whose challenge is `challenge` and whose
    /// TLS session exports `binding` ([`natcall_proto::auth`]).
    pub fn sign_registration(&self, challenge: &[u8; 32], binding: &[u8; 32], name: &str) -> Result<Vec<u8>, Error> {
        let sig = self
            .signer
            .sign(&SystemRandom::new(), &registration_message(challenge, binding, name))
            .map_err(|_| Error::Identity("signing failed".into()))?;
        Ok(sig.as_ref().to_vec())
    }

    pub(crate) fn rustls_cert(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert.clone())
    }

    pub(crate) fn rustls_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_created_once_and_then_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::load_or_create(dir.path()).expect("creates");
        let again = Identity::load_or_create(dir.path()).expect("loads");
        assert_eq!(first.fingerprint(), again.fingerprint());
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .expect("key file")
            .permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let sig = again.sign_registration(&[9; 32], &[8; 32], "alice").expect("signs");
        let fp = natcall_proto::auth::verify_registration(again.cert_der(), &sig, &[9; 32], &[8; 32], "alice")
            .expect("verifies");
        assert_eq!(fp, first.fingerprint());
    }

    #[test]
    fn a_corrupt_key_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(dir.path()).expect("creates");
        std::fs::write(dir.path().join(KEY_FILE), b"junk").expect("writes");
        let e = Identity::load_or_create(dir.path()).expect_err("corrupt");
        assert!(e.to_string().contains("not an ECDSA P-256 PKCS#8 key"), "{e}");
    }
}
