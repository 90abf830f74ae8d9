//! runnel-runner: the process that dials out to a broker and runs jobs.
//!
//! # Layout
//! - [`enroll()`]: one-time enrollment: local ed25519 key, token + CSR, pinned CA.
//! - [`state`]: the state dir (key 0600, certificate, CA, broker address).
//! - [`tls`]: client TLS configs (fingerprint-pinned for enrollment, mTLS after).
//! - [`runner`]: [`Runner::builder`] → [`RunnerHandle`]: connect, Hello/Welcome, heartbeats,
//!   renewal, reconnect with exponential backoff and full jitter, drain.
//! - [`handler`]: the [`JobHandler`] trait custom job kinds implement, and [`Job`].
//! - [`exec`]: the built-in `exec` handler (process group, streamed output, kill on cancel).
//! - [`cli`]: the `runnel-runner` command line.
#![deny(clippy::unwrap_used)]

pub mod cli;
pub mod enroll;
pub mod exec;
pub mod handler;
pub mod runner;
pub mod state;
pub mod tls;

pub use enroll::enroll;
pub use exec::Exec;
pub use handler::{Job, JobHandler};
pub use runner::{Runner, RunnerBuilder, RunnerHandle, RunnerStatus};
pub use state::StateDir;

/// Runner errors.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The state dir is missing or unreadable.
    #[error("state: {0}")]
    State(String),
    /// Certificates or keys failed.
    #[error(transparent)]
    Cert(#[from] runnel_certs::CertError),
    /// The broker address does not resolve or parse.
    #[error("broker address {0:?}: {1}")]
    Address(String, String),
    /// TLS setup failed.
    #[error("tls: {0}")]
    Tls(String),
    /// Connecting or talking to the broker failed.
    #[error("connection: {0}")]
    Connection(String),
    /// The broker refused enrollment.
    #[error("enrollment refused ({code}): {message}")]
    EnrollRefused {
        /// Why.
        code: runnel_protocol::ErrorCode,
        /// Detail.
        message: String,
    },
    /// The broker refused this runner for good (revoked, unknown): re-enroll.
    #[error("refused by the broker: {0}")]
    Refused(String),
}
