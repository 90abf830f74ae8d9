//! `runnel-api/1`: the native API on the broker's QUIC endpoint, for clients that dispatch
//! at a rate HTTP/JSON costs too much for (`runnel-client`). Server-authenticated TLS (the
//! client pins the cluster CA, as enrollment does); the caller proves itself with an API
//! key in the first frame.
//!
//! - The client opens one bidirectional stream, sends [`ApiHello`], finishes its side,
//!   and reads one [`ApiWelcome`]. Nothing else is served before a Welcome.
//! - Then each call is one more bidirectional stream, many at a time: one [`ApiRequest`]
//!   from the client, answered with [`PeerResponse`] frames, as a node answers a node: a
//!   job is `Job`, its output in `Output` chunks, `End`; a refusal is one `Refused` with
//!   the status and code the HTTP API would give. One set of dispatch messages
//!   ([`DispatchSpec`], [`JobInfo`]) serves clients and nodes.
//! - Or many calls on one stream, a *lane*: its first frame is [`ApiRequest::Lane`], then
//!   [`LaneCall`]s, each answered, in the order the answers are ready, with a
//!   [`LaneAnswer`] naming the call and then the call's answer as on a stream of its own
//!   (the stream is not ended after it). Every call but a followed dispatch may go on a
//!   lane; a lane spares a stream's opening, state and acknowledgements per call. The
//!   broker reads no more of a lane while it has [`LANE_MAX_CALLS`](crate::limits::LANE_MAX_CALLS)
//!   calls unanswered (or answers the client has not read); a malformed frame resets the
//!   lane, the calls still on it unanswered. Ending the lane's send side ends the lane
//!   once its calls are answered. A connection has one lane at a time: a second is reset
//!   (`ErrorCode::BadRequest`) unread.
//!
//! [`PeerResponse`]: crate::PeerResponse

use serde::{Deserialize, Serialize};

use crate::DispatchSpec;

/// The first frame of a native API connection.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiHello {
    /// The protocol version the client speaks ([`crate::PROTOCOL_VERSION`]).
    pub version: u16,
    /// The API key (`rk_…`), as `Authorization: Bearer` carries it over HTTP.
    pub key: String,
}

impl std::fmt::Debug for ApiHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: never print it.
        f.debug_struct("ApiHello").field("version", &self.version).finish_non_exhaustive()
    }
}

/// The answer to [`ApiHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiWelcome {
    /// The key is good: calls may follow.
    Welcome {
        /// The key's tenant (None for an operator key, which dispatches nothing).
        tenant: Option<String>,
        /// The key's role (`admin`, `dispatcher`, `member`, …).
        role: String,
        /// How many calls may be open at once on this connection.
        max_calls: u32,
    },
    /// Refused, as the HTTP API would answer (401 for a bad key, 429, …); the broker
    /// closes the connection after this.
    Refused {
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
}

/// One call on its own stream, for the key of the connection's [`ApiHello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ApiRequest {
    /// Dispatch a job. An empty `owner` means the key's own (member keys); zero timeouts
    /// mean the broker's defaults. Answered as a job: with `spec.wait`, once it ended.
    /// With `follow`, the answer is the accepted job (`Job`), then its output live as it
    /// comes (`Output`), then the ended job (`Job` again, without output), then `End`.
    Dispatch {
        /// What.
        spec: DispatchSpec,
        /// Stream the output and then the result on this stream.
        follow: bool,
    },
    /// A job's current view; answered as a job.
    GetJob {
        /// Which.
        id: String,
    },
    /// Cancel a job (idempotent); answered as a job.
    CancelJob {
        /// Which.
        id: String,
    },
    /// Wait until a job has ended; answered as a job.
    WaitJob {
        /// Which.
        id: String,
    },
    /// This stream is a lane: [`LaneCall`]s follow (the first frame of a stream only).
    Lane,
}

/// One call on a lane. `R` is [`ApiRequest`], or a reference to one when encoding
/// (serde writes both alike).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaneCall<R = ApiRequest> {
    /// The caller's number for it, echoed in its [`LaneAnswer`]; unique among the lane's
    /// calls not yet answered.
    pub call: u32,
    /// The call.
    pub request: R,
}

/// The head of one answer on a lane: the call's answer frames follow, as on a stream of
/// its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneAnswer {
    /// Which call ([`LaneCall::call`]).
    pub call: u32,
}
