//! runnel-protocol: the wire between a broker and its runners.
//!
//! # Layout
//! - `frame`: length-prefixed postcard frames with a hard maximum size. Decoding keeps an
//!   *incomplete* frame (wait for more bytes) apart from a *bad* one (close the peer).
//! - `control`: the control stream a runner opens after the handshake (Hello/Welcome,
//!   Heartbeat, RenewCert, GoAway, Redirect).
//! - `job`: the job frames (Job, Output, Result, Cancel), on a stream per job (protocol 2)
//!   or on one job lane per connection (protocol 3).
//! - `enroll`: the single request/response of ALPN `runnel-enroll/1`.
//! - `peer`: node-to-node calls of ALPN `runnel-peer/1` and `runnel-peer/2` (a cluster
//!   forwards API calls to a tenant's home; 2 adds a lane of calls), and the job view and
//!   states they carry.
//! - `api`: the native API of ALPN `runnel-api/1` (clients dispatch over QUIC with an API
//!   key; the answers are `peer`'s frames).
//! - `call_lane`: the calling side of a lane of calls (a native API client's, a node's).
//! - `outbox`: a stream's last frame written by one task per connection, so that frames
//!   posted together share datagrams (a client's requests, a runner's results).
//! - `error`: numeric error and connection-close codes shared by both sides.
//! - [`duration`]: `30s`/`5m` as both sides' flags and config files write durations.
//! - [`limits`] and [`version`]: the constants both sides agree on; [`transport`]: the QUIC
//!   settings each side asks of its peer (acknowledgement frequency), as a quinn config
//!   with feature `quinn` (quinn's sans-IO core only: still no sockets here).
//!
//! This crate does no I/O of its own beyond generic `AsyncRead`/`AsyncWrite` helpers in
//! `frame` and `outbox`; it knows nothing of sockets, certificates or actors. Enums only ever grow at
//! the end, so an older peer decodes every variant it knows.
#![deny(clippy::unwrap_used)]

// Type modules are private behind the re-exports below; `limits` and `version` stay public
// as namespaces of the constants both sides agree on.
mod api;
mod bytes;
mod call_lane;
mod control;
pub mod duration;
mod enroll;
mod error;
mod frame;
mod job;
pub mod limits;
mod outbox;
mod peer;
pub mod transport;
pub mod version;

pub use api::{ApiHello, ApiRequest, ApiWelcome, LaneAnswer, LaneCall};
pub use call_lane::{CallLane, LaneBroken, LaneFailed};
pub use control::{ClientControl, GoAway, Heartbeat, Hello, Redirect, ServerControl, Welcome};
pub use enroll::{EnrollRequest, EnrollResponse, Enrolled};
pub use error::ErrorCode;
pub use frame::{
    FrameError, decode, encode, encode_append, lane_reader, read_frame, take_end, write_frame,
};
pub use job::{
    BrokerJobFrame, ExecSpec, JobOutcome, JobRequest, JobResult, LaneFrame, OutputStream,
    RunnerJobFrame, encode_job_request, encode_lane_job_request,
};
pub use outbox::{Outbox, Queue, gather, write_lane};
pub use peer::{
    AnswerError, DispatchSpec, JobInfo, JobInfoRef, JobState, LaneReply, PEER_OUTPUT_CHUNK,
    PeerCaller, PeerRequest, PeerResponse, encode_job_answer, encode_output, read_answer,
    read_job_answer, read_job_output, read_lane_answer,
};
pub use version::{
    ALPN_API, ALPN_ENROLL, ALPN_PEER, ALPN_PEER_LANE, ALPN_RUNNER, PROTOCOL_VERSION,
};
