//! The rendezvous server's key as peers pin it: the SHA-256 of the server certificate's
//! SubjectPublicKeyInfo, written `SHA256:` and unpadded base64 (as OpenSSH prints host keys).
//!
//! The key, not the certificate, is pinned: a server may re-issue its self-signed certificate
//! (a new validity period, another name) and stay the same server.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use rustls_pki_types::CertificateDer;

/// A server key fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerKey(pub [u8; 32]);

/// Why a text is not a server key, or a certificate has none.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerKeyError {
    /// Not `SHA256:` followed by 43 base64 characters.
    #[error("a server key is written SHA256: and 43 base64 characters, not {0:?}")]
    Text(String),
    /// The certificate does not parse.
    #[error("the server certificate does not parse: {0}")]
    Certificate(String),
}

impl ServerKey {
    /// The key of an X.509 certificate (DER).
    pub fn of_cert(der: &[u8]) -> Result<Self, ServerKeyError> {
        let der = CertificateDer::from(der);
        let cert = webpki::EndEntityCert::try_from(&der).map_err(|e| ServerKeyError::Certificate(format!("{e:?}")))?;
        Ok(Self::of_spki(&cert.subject_public_key_info()))
    }

    /// The key of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki);
        let mut k = [0u8; 32];
        k.copy_from_slice(digest.as_ref());
        Self(k)
    }
}

impl fmt::Display for ServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SHA256:{}", STANDARD_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerKey({self})")
    }
}

impl FromStr for ServerKey {
    type Err = ServerKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ServerKeyError::Text(s.to_owned());
        let b64 = s.strip_prefix("SHA256:").ok_or_else(bad)?;
        let bytes = STANDARD_NO_PAD.decode(b64.trim_end_matches('=')).map_err(|_| bad())?;
        let k: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        Ok(Self(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_reads_back_from_its_text() {
        let k = ServerKey([0xab; 32]);
        let text = k.to_string();
        assert!(text.starts_with("SHA256:") && text.len() == 7 + 43, "{text}");
        assert_eq!(text.parse::<ServerKey>(), Ok(k));
        // OpenSSH-style padding is tolerated.
        assert_eq!(format!("{text}=").parse::<ServerKey>(), Ok(k));
    }

    #[test]
    fn bad_texts_say_what_a_key_looks_like() {
        for bad in [
            "",
            "SHA256:",
            "sha256:q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s",
            "SHA256:abc",
            "SHA256:!!!",
        ] {
            let e = bad.parse::<ServerKey>().unwrap_err();
            assert!(e.to_string().contains("SHA256: and 43 base64"), "{e}");
        }
    }

    #[test]
    fn two_certificates_of_one_key_have_one_server_key() {
        let key = rcgen::KeyPair::generate().expect("keygen");
        let a = rcgen::CertificateParams::new(vec!["a.invalid".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let b = rcgen::CertificateParams::new(vec!["b.invalid".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_ne!(a.der(), b.der());
        assert_eq!(ServerKey::of_cert(a.der()), ServerKey::of_cert(b.der()));
        let other = rcgen::KeyPair::generate().expect("keygen");
        let c = rcgen::CertificateParams::new(vec!["a.invalid".into()])
            .expect("params")
            .self_signed(&other)
            .expect("cert");
        assert_ne!(ServerKey::of_cert(a.der()), ServerKey::of_cert(c.der()));
        assert!(ServerKey::of_cert(b"junk").is_err());
    }
}
