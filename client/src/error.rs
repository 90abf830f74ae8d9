//! What a call can fail with.

use runnel_protocol::AnswerError;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker address is not `host:port`, or does not resolve.
    #[error("broker address {addr:?}: {reason}")]
    Address {
        /// The address given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA fingerprint is not `sha256:` and 64 hex digits.
    #[error("CA fingerprint: {0}")]
    Fingerprint(String),
    /// The broker could not be reached, or its TLS handshake failed (a CA that does not
    /// match the pinned fingerprint fails here).
    #[error("cannot connect to the broker: {0}")]
    Connect(String),
    /// The broker refused, as its HTTP API would have: 401 for a bad or revoked key, 403,
    /// 404 for a job that is not the key's tenant's, 400 for a bad spec, 409, 429, 503.
    #[error("refused: {message} ({status} {code})")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Error code (`not_found`, `forbidden`, …).
        code: String,
        /// Message.
        message: String,
    },
    /// The connection broke while the call was under way. For a dispatch, the broker
    /// may have taken the job (look for it before dispatching again).
    #[error("the connection to the broker broke during the call: {0}")]
    Lost(String),
    /// The broker answered out of protocol.
    #[error("broker answered out of protocol: {0}")]
    Protocol(String),
}

impl Error {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// An answer that could not be read on a stream of `conn`: a broken connection is
    /// [`Error::Lost`], anything else on a live one is the broker's fault.
    pub(crate) fn answer(e: AnswerError, conn: &quinn::Connection) -> Self {
        match e {
            AnswerError::Refused { status, code, message } => {
                Error::Refused { status, code, message }
            }
            e => match conn.close_reason() {
                Some(why) => Error::Lost(why.to_string()),
                None => Error::Protocol(e.to_string()),
            },
        }
    }
}
