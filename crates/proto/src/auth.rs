//! Registration proof: a peer proves it holds the private key of the certificate whose
//! fingerprint becomes its identity, by signing the server's per-connection challenge.
//!
//! The signed message is `"natcall-register-v2\0" || challenge (32 bytes) || binding (32 bytes)
//! || name`, signed with the certificate's key (ECDSA P-256 with SHA-256, or Ed25519). `binding`
//! is exported from the TLS session the registration travels on (label
//! [`crate::REGISTER_BINDING_LABEL`], no context, 32 bytes), so a signature made for one TLS
//! session is worthless on another: a man in the middle that terminates the peer's TLS with its
//! own key cannot pass the peer's registration on to the real server.

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm};

use crate::control::{Fingerprint, MAX_CERT_LEN};

const CONTEXT: &[u8] = b"natcall-register-v2\0";

/// A registration proof did not verify.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// The certificate is over [`MAX_CERT_LEN`] bytes.
    #[error("certificate of {0} bytes is over the limit of {MAX_CERT_LEN}")]
    CertTooLarge(usize),
    /// The certificate does not parse.
    #[error("certificate does not parse: {0}")]
    BadCertificate(String),
    /// The signature does not verify with the certificate's key.
    #[error("signature does not verify with the certificate's key")]
    BadSignature,
}

/// The bytes a peer signs to register `name` on a connection whose challenge is `challenge` and
/// whose TLS session exports `binding`.
pub fn registration_message(challenge: &[u8; 32], binding: &[u8; 32], name: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + 64 + name.len());
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(challenge);
    m.extend_from_slice(binding);
    m.extend_from_slice(name.as_bytes());
    m
}

/// Verifies a registration proof and returns the certificate's fingerprint.
pub fn verify_registration(
    cert_der: &[u8],
    signature: &[u8],
    challenge: &[u8; 32],
    binding: &[u8; 32],
    name: &str,
) -> Result<Fingerprint, AuthError> {
    if cert_der.len() > MAX_CERT_LEN {
        return Err(AuthError::CertTooLarge(cert_der.len()));
    }
    let der = CertificateDer::from(cert_der);
    let cert = webpki::EndEntityCert::try_from(&der).map_err(|e| AuthError::BadCertificate(format!("{e:?}")))?;
    let message = registration_message(challenge, binding, name);
    let algs: [&dyn SignatureVerificationAlgorithm; 2] = [webpki::ring::ECDSA_P256_SHA256, webpki::ring::ED25519];
    if algs
        .iter()
        .any(|alg| cert.verify_signature(*alg, &message, signature).is_ok())
    {
        Ok(Fingerprint::of_cert(cert_der))
    } else {
        Err(AuthError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};

    fn identity() -> (Vec<u8>, EcdsaKeyPair) {
        let key = rcgen::KeyPair::generate().expect("keygen");
        let cert = rcgen::CertificateParams::new(vec!["natcall.invalid".into()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed");
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &key.serialize_der(),
            &SystemRandom::new(),
        )
        .expect("pkcs8");
        (cert.der().to_vec(), pair)
    }

    #[test]
    fn a_valid_proof_yields_the_certificate_fingerprint() {
        let (cert, key) = identity();
        let challenge = [7u8; 32];
        let sig = key
            .sign(
                &SystemRandom::new(),
                &registration_message(&challenge, &[5; 32], "alice"),
            )
            .expect("sign");
        let fp = verify_registration(&cert, sig.as_ref(), &challenge, &[5; 32], "alice").expect("verifies");
        assert_eq!(fp, Fingerprint::of_cert(&cert));
    }

    #[test]
    fn a_proof_for_another_challenge_name_or_tls_session_is_refused() {
        let (cert, key) = identity();
        let sig = key
            .sign(&SystemRandom::new(), &registration_message(&[1; 32], &[5; 32], "alice"))
            .expect("sign");
        assert_eq!(
            verify_registration(&cert, sig.as_ref(), &[2; 32], &[5; 32], "alice"),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify_registration(&cert, sig.as_ref(), &[1; 32], &[5; 32], "mallory"),
            Err(AuthError::BadSignature)
        );
        // The same challenge and name on another TLS session (a relaying man in the middle).
        assert_eq!(
            verify_registration(&cert, sig.as_ref(), &[1; 32], &[6; 32], "alice"),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn someone_elses_certificate_with_my_signature_is_refused() {
        let (cert_a, _) = identity();
        let (_, key_b) = identity();
        let sig = key_b
            .sign(&SystemRandom::new(), &registration_message(&[3; 32], &[5; 32], "alice"))
            .expect("sign");
        assert_eq!(
            verify_registration(&cert_a, sig.as_ref(), &[3; 32], &[5; 32], "alice"),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn garbage_certificates_are_errors() {
        assert!(matches!(
            verify_registration(b"not a cert", b"sig", &[0; 32], &[0; 32], "a"),
            Err(AuthError::BadCertificate(_))
        ));
        let huge = vec![0u8; MAX_CERT_LEN + 1];
        assert_eq!(
            verify_registration(&huge, b"", &[0; 32], &[0; 32], "a"),
            Err(AuthError::CertTooLarge(MAX_CERT_LEN + 1))
        );
    }
}
