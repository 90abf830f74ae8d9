//! Jobs between a broker and a runner.
//!
//! - Protocol 2: the broker opens one bidirectional stream per job. It sends
//!   [`BrokerJobFrame::Job`] and may later send [`BrokerJobFrame::Cancel`]; the runner
//!   answers with any number of [`RunnerJobFrame::Output`] and exactly one
//!   [`RunnerJobFrame::Result`].
//! - Protocol 3, the *job lane*: the broker opens one bidirectional stream for all of the
//!   connection's jobs, with its first job, and the same frames travel on it each in a
//!   [`LaneFrame`] naming the job by the broker's number for it (unique on the connection
//!   among the jobs not yet ended). A frame for a number the other side has already ended
//!   (a Result after the broker gave up on the job, a Cancel after the Result) is ignored.

use serde::{Deserialize, Serialize};

/// The work itself.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Broker-assigned job id.
    pub job_id: String,
    /// Which handler runs it (`exec` is built in).
    pub kind: String,
    /// Handler-specific payload; for `exec` a postcard [`ExecSpec`].
    #[serde(with = "crate::bytes")]
    pub payload: Vec<u8>,
    /// Run-time limit; the runner kills the job when it passes.
    pub timeout_ms: u64,
}

impl std::fmt::Debug for JobRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Payloads may carry tenant data: never print them.
        f.debug_struct("JobRequest")
            .field("job_id", &self.job_id)
            .field("kind", &self.kind)
            .field("payload_len", &self.payload.len())
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Payload of the built-in `exec` kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Program to run (looked up in `PATH`).
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<String>,
}

/// Frames the broker sends on a job stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BrokerJobFrame {
    /// The job (first frame, exactly once).
    Job(JobRequest),
    /// Stop the job now.
    Cancel,
}

/// Encodes `BrokerJobFrame::Job` from borrowed parts: the same bytes as the owned frame
/// (a test holds them equal), without first copying a job's id, kind and payload into a
/// [`JobRequest`]. The broker sends one per job.
pub fn encode_job_request(
    job_id: &str,
    kind: &str,
    payload: &[u8],
    timeout_ms: u64,
) -> Result<Vec<u8>, crate::FrameError> {
    crate::encode(&BrokerJobFrameRef::Job(JobRequestRef { job_id, kind, payload, timeout_ms }))
}

/// [`encode_job_request`] on a job lane: `LaneFrame { job, frame: Job(..) }`, appended to
/// `out` (the same bytes as the owned frame's; a test holds them equal).
pub fn encode_lane_job_request(
    out: &mut Vec<u8>,
    job: u32,
    job_id: &str,
    kind: &str,
    payload: &[u8],
    timeout_ms: u64,
) -> Result<(), crate::FrameError> {
    let frame = BrokerJobFrameRef::Job(JobRequestRef { job_id, kind, payload, timeout_ms });
    crate::encode_append(out, &LaneFrame { job, frame })
}

/// [`JobRequest`], borrowed: postcard writes `&str` as `String` and `&[u8]` as `Vec<u8>`
/// (a length, then the bytes), and field names not at all.
#[derive(Serialize)]
struct JobRequestRef<'a> {
    job_id: &'a str,
    kind: &'a str,
    #[serde(with = "crate::bytes")]
    payload: &'a [u8],
    timeout_ms: u64,
}

/// [`BrokerJobFrame`] up to its `Job` variant, which must stay the first.
#[derive(Serialize)]
enum BrokerJobFrameRef<'a> {
    Job(JobRequestRef<'a>),
}

/// One frame on a job lane (protocol 3): a job's frame and the broker's number for the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaneFrame<F> {
    /// The job's number on this connection.
    pub job: u32,
    /// Its frame ([`BrokerJobFrame`] from the broker, [`RunnerJobFrame`] from the runner).
    pub frame: F,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a job ended on the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    /// Ran and exited with status 0.
    Succeeded,
    /// Ran and failed (non-zero exit, signal, could not start).
    Failed,
    /// Stopped by a cancel.
    Cancelled,
    /// Stopped because its run time passed.
    TimedOut,
    /// Refused without running (draining, full, unknown kind, bad payload).
    Rejected,
}

/// The final frame of a job stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// How it ended.
    pub outcome: JobOutcome,
    /// The process exit code, where there was one.
    pub exit_code: Option<i32>,
    /// Detail for humans ("exit status 2", "killed by signal 9").
    pub message: String,
    /// True when output passed the runner's cap and was cut.
    pub output_truncated: bool,
}

/// Frames the runner sends on a job stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RunnerJobFrame {
    /// A chunk of output, at most [`crate::limits::MAX_OUTPUT_CHUNK`] bytes.
    Output {
        /// Which stream.
        stream: OutputStream,
        /// The bytes.
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// The end.
    Result(JobResult),
}
