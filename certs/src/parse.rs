//! Reads identity and validity back out of a certificate.
//!
//! Call this only on a certificate rustls has already verified against the cluster CA:
//! parsing proves nothing about who signed it.

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::{CertError, Identity};

/// What runnel reads out of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCert {
    /// The identity named by the single URI SAN.
    pub identity: Identity,
    /// The serial number, hex.
    pub serial_hex: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// The subject's public key (for ed25519, its 32 raw bytes).
    pub public_key: Vec<u8>,
}

/// Parses a DER certificate that must carry exactly one URI SAN naming a runnel identity.
pub fn parse_cert(der: &[u8]) -> Result<ParsedCert, CertError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::Malformed("trailing bytes after certificate".into()));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Malformed(format!("SAN extension: {e}")))?
        .ok_or_else(|| CertError::Identity("certificate has no SAN".into()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri =
        uris.next().ok_or_else(|| CertError::Identity("certificate has no URI SAN".into()))?;
    if uris.next().is_some() {
        return Err(CertError::Identity("certificate has more than one URI SAN".into()));
    }
    let validity = cert.validity();
    Ok(ParsedCert {
        identity: Identity::parse_uri(uri)?,
        serial_hex: hex::encode(cert.raw_serial()),
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}
