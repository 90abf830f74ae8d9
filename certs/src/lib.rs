//! runnel-certs: the cluster CA and the certificates it issues.
//!
//! # Layout
//! - [`identity`]: the SPIFFE-style URIs that name runners and nodes, and their rules.
//! - `ca`: the ed25519 cluster CA; issues the broker's server certificate and runner
//!   certificates from CSRs (ignoring whatever names a CSR asks for).
//! - `parse`: reads the identity, serial and validity back out of a certificate that
//!   rustls has already verified.
//! - [`pem`]: PEM files on disk; private keys are written 0600.
//! - [`key`]: a runner's local ed25519 key and its CSR.
//! - [`pin`]: a TLS client config that trusts one CA by its fingerprint (enrollment,
//!   `runnelctl` over HTTPS).
//! - [`tls`]: the one rustls crypto provider every endpoint uses (AES-128-GCM-SHA256
//!   first), and the server side's "our suite order, not the client's".
//!
//! Nothing here opens sockets or knows about brokers and runners beyond their names.
#![deny(clippy::unwrap_used)]

// `ca` and `parse` are private behind the re-exports; `identity`, `key` and `pem` stay
// public as namespaces of functions (`key::generate_key`, `pem::read`).
mod ca;
pub mod identity;
pub mod key;
mod parse;
pub mod pem;
pub mod pin;
pub mod tls;

pub use ca::{
    CLOCK_SKEW, ClusterCa, DEFAULT_RUNNER_VALIDITY, IssuedCert, PEER_SERVER_NAME, Validity,
    csr_public_key,
};
pub use identity::{Identity, NodeIdentity, RunnerIdentity};
pub use parse::{ParsedCert, parse_cert};

/// Errors from issuing, parsing or storing certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen could not build or sign a certificate or CSR.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate or CSR does not parse.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// An identity URI or one of its segments is invalid.
    #[error("invalid identity: {0}")]
    Identity(String),
    /// A CSR uses a key type other than ed25519.
    #[error("unsupported key algorithm: runner keys must be ed25519")]
    KeyAlgorithm,
    /// A fingerprint string is not `sha256:<64 hex digits>`.
    #[error("invalid fingerprint: expected sha256:<64 hex digits>")]
    Fingerprint,
    /// Reading or writing a PEM file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The SHA-256 of a DER certificate: the bytes [`fingerprint`] prints and a pin compares.
pub fn digest(der: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
    out
}

/// `sha256:<hex>` of a DER certificate, as printed in enroll commands.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(digest(der)))
}

/// Parses `sha256:<64 hex digits>` into the 32 digest bytes.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], CertError> {
    let hex_part = s.strip_prefix("sha256:").ok_or(CertError::Fingerprint)?;
    let bytes = hex::decode(hex_part).map_err(|_| CertError::Fingerprint)?;
    bytes.try_into().map_err(|_| CertError::Fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip_and_bad_ones_are_refused() {
        let fp = fingerprint(b"abc");
        let raw = parse_fingerprint(&fp).expect("parse");
        assert_eq!(format!("sha256:{}", hex::encode(raw)), fp);
        assert!(parse_fingerprint("sha1:00").is_err());
        assert!(parse_fingerprint("sha256:zz").is_err());
        assert!(parse_fingerprint("sha256:0011").is_err());
    }
}
