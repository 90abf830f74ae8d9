//! runnel-runner: the process that dials out to a broker and runs jobs.
//!
//! # Layout
//! - `enroll` ([`enroll()`]): one-time enrollment: local ed25519 key, token + CSR, pinned CA.
//! - `state` ([`StateDir`]): the state dir (key 0600, certificate, CA, broker address).
//! - [`tls`]: client TLS configs (fingerprint-pinned for enrollment, mTLS after).
//! - `runner`: [`Runner::builder`] → [`RunnerHandle`], [`RunnerStatus`], and the loop of
//!   sessions until drained, stopped or refused.
//! - `session`: one session: connect, Hello/Welcome, heartbeats, the control-stream reader
//!   (renewal, GoAway), accepting job streams.
//! - `job`: one job stream: checks, the handler, output, the Result.
//! - `backoff`: reconnect delays, exponential with full jitter.
//! - `dial`: which address the next session dials (rotation, redirects, a just-failed node avoided).
//! - [`handler`]: the [`JobHandler`] trait custom job kinds implement, and [`Job`].
//! - `exec` ([`Exec`]): the built-in `exec` handler (process group, streamed output, kill on cancel).
//! - [`cli`]: the `runnel-runner` command line.
#![deny(clippy::unwrap_used)]

mod backoff;
pub mod cli;
mod dial;
mod enroll;
mod exec;
pub mod handler;
mod job;
mod lane;
mod runner;
mod session;
mod state;
pub mod tls;

pub use enroll::enroll;
pub use exec::Exec;
pub use handler::{Job, JobHandler};
pub use runnel_protocol::transport::Stats;
pub use runner::{Runner, RunnerBuilder, RunnerHandle, RunnerStatus};
pub use state::{RunnerInfo, StateDir};

/// A boxed cause, kept as the `source()` of a [`RunnerError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Runner errors. Every variant that wraps a failure keeps it as its `source()`.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The state dir or one of its files could not be created, read, written or parsed.
    #[error("state {context}: {source}")]
    State {
        /// What was being done, and on which path.
        context: String,
        /// The cause (I/O, TOML).
        #[source]
        source: BoxError,
    },
    /// `enroll` was pointed at a state dir that already holds a runner.
    #[error("{0} already holds an enrolled runner; use another --state-dir")]
    AlreadyEnrolled(std::path::PathBuf),
    /// Certificates or keys failed.
    #[error(transparent)]
    Cert(#[from] runnel_certs::CertError),
    /// The broker address does not resolve or parse.
    #[error("broker address {0:?}: {1}")]
    Address(String, String),
    /// TLS setup failed.
    #[error("tls: {0}")]
    Tls(#[source] BoxError),
    /// The CA the broker sent at enrollment is not the one pinned by fingerprint.
    #[error("broker returned a CA that does not match the pin")]
    CaPinMismatch,
    /// The broker's enrollment answer carried no CA certificate.
    #[error("no CA in the broker's enrollment answer")]
    NoCa,
    /// Connecting or talking to the broker failed.
    #[error("connection: {0}")]
    Connection(#[source] BoxError),
    /// The broker closed the enrollment stream without an answer.
    #[error("broker closed without answering")]
    BrokerClosed,
    /// The broker refused enrollment.
    #[error("enrollment refused ({code}): {message}")]
    EnrollRefused {
        /// The refusal code (token unknown, expired, consumed; bad request).
        code: runnel_protocol::ErrorCode,
        /// The broker's explanation, for the operator.
        message: String,
    },
    /// The broker refused this runner for good (revoked, unknown): re-enroll.
    #[error("refused by the broker: {0}")]
    Refused(String),
    /// The runner's task panicked (a bug; the message is the panic's).
    #[error("runner task panicked: {0}")]
    Panicked(String),
}

impl RunnerError {
    /// A [`RunnerError::State`] for `context` caused by `source`.
    pub(crate) fn state(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        RunnerError::State { context: context.into(), source: source.into() }
    }

    /// A [`RunnerError::Connection`] caused by `source`.
    pub(crate) fn connection(source: impl Into<BoxError>) -> Self {
        RunnerError::Connection(source.into())
    }

    /// A [`RunnerError::Tls`] caused by `source`.
    pub(crate) fn tls(source: impl Into<BoxError>) -> Self {
        RunnerError::Tls(source.into())
    }
}
