//! runnel-client: dispatch jobs to a runnel broker over its native API (`runnel-api/1`,
//! QUIC on the broker's runner port) with an API key.
//!
//! The HTTP API (`POST /v1/jobs`) answers the same calls under the same rules; this path
//! costs the broker less per call and carries many calls at once on one connection.
//!
//! - [`Client::connect`] takes the broker's QUIC address, or a cluster's nodes
//!   comma-separated (any node serves any tenant, forwarding to its home; a node that
//!   does not answer is passed over), pins the cluster CA by its fingerprint (as
//!   enrollment does), and
//!   proves the caller with an API key. The key's tenant and role decide what it may do,
//!   exactly as over HTTP: a job of another tenant is not found (404), a member key
//!   dispatches only to its own owner (403).
//! - [`Client::dispatch`] answers a [`JobHandle`] at once: the job's output as it comes,
//!   then its result. [`Client::submit`] answers once, as `POST /v1/jobs` does (with
//!   `wait`, the ended job and all of its output). [`Client::get`], [`Client::cancel`]
//!   and [`Client::wait`] take a job id.
//! - At most [`Options::max_in_flight`] calls are open at once; more wait for a turn
//!   (backpressure instead of an unbounded queue in the client or the broker).
//! - The calls answered once (`submit`, `get`, `cancel`, `wait`) share one stream of the
//!   connection, a lane: no stream to open and close per call. A followed dispatch has a
//!   stream of its own. Requests are written by one task per client, so that calls made
//!   at about the same time leave in the same datagrams ([`Client::stats`] counts them).
//! - A closed connection (broker restarted, network gone) is dialled again on the next
//!   call. A call is retried once on the new connection when that cannot run it twice: a
//!   call whose request never left, or a read (`get`, `wait`, `cancel`, which are
//!   idempotent). A dispatch whose connection broke after its request left fails with
//!   [`Error::Lost`]: the broker may have taken it, and a second try could run it twice.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), runnel_client::Error> {
//! use runnel_client::{Client, exec};
//!
//! // The broker's QUIC address, its CA fingerprint (`runnel-broker init` prints it), a key.
//! let client = Client::connect("broker.example:7443", "sha256:3f…", "rk_…").await?;
//! let mut job = client.dispatch(exec("alice", "echo", &["hello"])).await?;
//! while let Some(chunk) = job.output().await? {
//!     print!("{}", String::from_utf8_lossy(&chunk));
//! }
//! let ended = job.result().await?;
//! println!("{} {:?} exit {:?}", ended.id, ended.state, ended.exit_code);
//! # Ok(()) }
//! ```
//!
//! `examples/dispatch.rs` is the same as a program.
#![deny(clippy::unwrap_used)]

mod client;
mod error;
mod handle;
mod lane;
mod spec;

pub use client::{Client, Options};
pub use error::Error;
pub use handle::JobHandle;
pub use runnel_protocol::transport::Stats;
pub use runnel_protocol::{DispatchSpec, ExecSpec, JobInfo, JobState};
pub use spec::{exec, job};
