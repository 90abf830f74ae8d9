//! Enrollment: one request and one response on the first bidirectional stream of an
//! `runnel-enroll/1` connection.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// A new runner's request: the one-time token and a CSR for its locally generated key.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// Protocol version of the runner.
    pub version: u16,
    /// The one-time enrollment token. Never logged: `Debug` redacts it.
    pub token: String,
    /// PEM CSR. The names it asks for are ignored.
    pub csr_pem: String,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("version", &self.version)
            .field("token", &"<redacted>")
            .field("csr_len", &self.csr_pem.len())
            .finish()
    }
}

/// What a successful enrollment returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The runner certificate, PEM.
    pub cert_pem: String,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
    /// The runner id.
    pub runner_id: String,
    /// The tenant.
    pub tenant: String,
    /// The owner.
    pub owner: String,
}

/// The broker's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EnrollResponse {
    /// Enrolled.
    Ok(Enrolled),
    /// Refused.
    Refused {
        /// Why (token unknown, expired, consumed, bad request).
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}
