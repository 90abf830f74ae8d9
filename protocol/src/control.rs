//! The control stream: the first bidirectional stream a runner opens after the handshake.
//! The runner speaks [`ClientControl`], the broker answers with [`ServerControl`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// First message on the control stream. Identity is *not* in here: it comes only from the
/// verified certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the runner speaks.
    pub min_version: u16,
    /// Newest protocol version the runner speaks.
    pub max_version: u16,
    /// The runner's software version, for operators.
    pub runner_version: String,
    /// Labels the runner advertises (`os=linux`, `gpu=a100`); jobs select on them.
    pub labels: BTreeMap<String, String>,
    /// How many jobs the runner runs at once.
    pub capacity: u32,
    /// Job kinds the runner has handlers for.
    pub kinds: Vec<String>,
}

/// The broker's answer to [`Hello`]. Until it arrives, a runner is not connected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The negotiated protocol version.
    pub version: u16,
    /// The runner id, as read from the certificate.
    pub runner_id: String,
    /// The tenant, as read from the certificate.
    pub tenant: String,
    /// The owner, as read from the certificate.
    pub owner: String,
    /// How often the runner should send [`Heartbeat`]s.
    pub heartbeat_interval_ms: u32,
    /// (protocol 2) The epoch of the tenant's placement on this node (0 on a single node):
    /// a runner refuses a Welcome whose epoch is older than one it has seen for its tenant,
    /// so a node that lost its claim (paused, partitioned) cannot take it back.
    pub epoch: u64,
}

/// Periodic load report; also keeps `last_seen` fresh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Jobs running right now on the runner.
    pub in_flight: u32,
    /// One-minute load average times 1000 (0 where unknown).
    pub load_milli: u32,
}

/// The broker asks the runner to leave (its node drains on SIGTERM, in a cluster): the
/// runner finishes the jobs it runs, closes, and reconnects after `reconnect_after_ms`,
/// which the broker draws from a window so that its runners do not come back in step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoAway {
    /// Why, for logs.
    pub reason: String,
    /// How long to wait before reconnecting.
    pub reconnect_after_ms: u32,
}

/// (cluster) The runner's tenant lives on another node; reconnect there. Reserved: no
/// broker sends it yet, and runners do not act on it yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redirect {
    /// `host:port` of the home node.
    pub addr: String,
}

/// Messages a runner sends on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientControl {
    /// Opens the session.
    Hello(Hello),
    /// Load report.
    Heartbeat(Heartbeat),
    /// Asks for a new certificate for the same key (PEM CSR).
    RenewCert {
        /// A PEM CSR signed by the runner's key.
        csr_pem: String,
    },
    /// The runner is draining: send it no new jobs.
    Draining,
}

/// Messages the broker sends on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerControl {
    /// Accepts the session.
    Welcome(Welcome),
    /// A renewed certificate.
    RenewedCert {
        /// The new certificate, PEM.
        cert_pem: String,
        /// Its expiry, seconds since the Unix epoch.
        not_after_unix: i64,
    },
    /// Renewal refused.
    RenewRefused {
        /// The refusal code (`Rejected` when too soon, `Revoked`, `BadRequest`).
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Leave and come back later.
    GoAway(GoAway),
    /// (cluster) Go to another node.
    Redirect(Redirect),
    /// The session is refused or ends with an error.
    Error {
        /// What went wrong, as a code the runner can act on.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}
