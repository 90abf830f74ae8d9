//! A runner's own key: generated locally, never sent anywhere; only its CSR leaves.

use rcgen::{CertificateParams, KeyPair, PKCS_ED25519};

use crate::CertError;

/// Generates a fresh ed25519 key.
pub fn generate_key() -> Result<KeyPair, CertError> {
    Ok(KeyPair::generate_for(&PKCS_ED25519)?)
}

/// Loads a key from PKCS#8 PEM.
pub fn key_from_pem(pem: &str) -> Result<KeyPair, CertError> {
    KeyPair::from_pem(pem).map_err(|e| CertError::Malformed(format!("private key: {e}")))
}

/// A PEM CSR for `key`. It names nothing: the broker decides the identity.
pub fn csr_pem(key: &KeyPair) -> Result<String, CertError> {
    let params = CertificateParams::new(Vec::<String>::new())?;
    Ok(params.serialize_request(key)?.pem()?)
}
