//! A lane: the calls answered once (`submit`, `get`, `cancel`, `wait`) share one stream of
//! the connection (`ApiRequest::Lane`), instead of a stream each
//! ([`runnel_protocol::CallLane`], which nodes of a cluster use for their calls too).
//! When the lane breaks (the connection closed, or the broker answered out of protocol),
//! every call still waiting fails with the reason, the connection is closed so that the
//! next call dials again, and no call is taken after.

use runnel_protocol::{ApiRequest, CallLane, ErrorCode, JobInfo, LaneBroken, LaneFailed, encode};

use crate::error::Error;

/// The calls of one connection that are answered once.
pub(crate) struct Lane(CallLane<ApiRequest>);

/// Why a call on a lane failed.
pub(crate) enum Failed {
    /// Nothing was sent: the lane had broken. Safe to try on a new connection.
    Unsent,
    /// The call was sent (or may have been); its error.
    Sent(Error),
}

impl Lane {
    /// Opens a lane on `conn` (a connection whose Welcome has come). Its first frame
    /// leaves with the first call.
    pub(crate) async fn open(conn: &quinn::Connection) -> Result<Self, Error> {
        let (send, recv) = conn.open_bi().await.map_err(|e| Error::Connect(e.to_string()))?;
        let first = encode(&ApiRequest::Lane).map_err(|e| Error::Protocol(e.to_string()))?;
        let conn = conn.clone();
        let ended =
            move |why: Option<runnel_protocol::AnswerError>| match (conn.close_reason(), why) {
                (Some(closed), _) => LaneBroken::Lost(closed.to_string()),
                // After the client ended it (every handle gone), or the broker stopped.
                (None, None) => {
                    conn.close(0u32.into(), b"lane ended");
                    LaneBroken::Protocol("the broker ended the lane".into())
                }
                (None, Some(e)) => {
                    tracing::debug!(error = %e, "native API lane broke; closing the connection");
                    conn.close(ErrorCode::Protocol.as_u32().into(), b"lane broke");
                    LaneBroken::Protocol(e.to_string())
                }
            };
        Ok(Self(CallLane::open(send, recv, first, ended)))
    }

    /// Sends `request` and waits for its answer.
    pub(crate) async fn call(&self, request: &ApiRequest) -> Result<JobInfo, Failed> {
        self.0.job(request).await.map_err(|e| match e {
            LaneFailed::Unsent => Failed::Unsent,
            LaneFailed::Refused { status, code, message } => {
                Failed::Sent(Error::Refused { status, code, message })
            }
            LaneFailed::Broken(LaneBroken::Lost(why)) => Failed::Sent(Error::Lost(why)),
            LaneFailed::Broken(LaneBroken::Protocol(why)) => Failed::Sent(Error::Protocol(why)),
            LaneFailed::Request(e) => Failed::Sent(Error::Protocol(format!("request: {e}"))),
            LaneFailed::Unexpected(what) => {
                Failed::Sent(Error::Protocol(format!("{what} does not answer a call")))
            }
        })
    }
}
