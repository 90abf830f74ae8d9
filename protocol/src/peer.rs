//! `runnel-peer/1`: node-to-node calls inside a cluster, on mutual TLS with node
//! certificates (`spiffe://<cluster>/node/<id>`). One bidirectional stream per call: the
//! caller sends one [`PeerRequest`] and finishes its side; the home answers with frames of
//! [`PeerResponse`] and finishes.
//!
//! The dispatch messages are shaped for any authenticated caller, not only nodes: the
//! caller's authority travels as a [`PeerCaller`] that the home checks with the same rules
//! as its own API, so a native client path can reuse them.
//!
//! A job answer is [`PeerResponse::Job`] (with empty `output`), then the output in
//! [`PeerResponse::Output`] chunks, then [`PeerResponse::End`]: a job may hold up to 1 MiB
//! of output, more than one frame carries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Largest output chunk in one [`PeerResponse::Output`] frame.
pub const PEER_OUTPUT_CHUNK: usize = 64 * 1024;

/// Job lifecycle: `queued → running → succeeded | failed | cancelled | timed_out |
/// runner_lost | rejected`, and `node_lost` (cluster): the node holding the job stopped,
/// and the job may or may not have run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a runner.
    Queued,
    /// Sent to a runner.
    Running,
    /// Exited 0.
    Succeeded,
    /// Ran and failed.
    Failed,
    /// Cancelled by a caller.
    Cancelled,
    /// Ran past its run-time limit or waited past its queue limit.
    TimedOut,
    /// Its runner's connection was lost mid-job.
    RunnerLost,
    /// Refused by the runner without running.
    Rejected,
    /// (cluster) The node that held the job is gone; it may or may not have run.
    NodeLost,
}

impl JobState {
    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }

    /// Short lowercase name (as in JSON).
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
            JobState::RunnerLost => "runner_lost",
            JobState::Rejected => "rejected",
            JobState::NodeLost => "node_lost",
        }
    }
}

/// A point-in-time view of a job, as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Owner.
    pub owner: String,
    /// Kind.
    pub kind: String,
    /// State.
    pub state: JobState,
    /// Runner that took it.
    pub runner_id: Option<String>,
    /// Exit code, where the process exited.
    pub exit_code: Option<i32>,
    /// How it ended, in words (the runner's message, or why the broker ended it).
    pub message: String,
    /// Creation time (unix ms).
    pub created_at_ms: i64,
    /// Start (unix ms).
    pub started_at_ms: Option<i64>,
    /// End (unix ms).
    pub finished_at_ms: Option<i64>,
    /// Output so far (UTF-8, lossy).
    pub output: String,
    /// Whether output was cut.
    pub output_truncated: bool,
    /// Whether the broker let go of the output to stay within the tenant's byte budget
    /// (the oldest finished jobs' output goes first; the job itself is still kept).
    pub output_expired: bool,
}

/// [`JobInfo`] borrowed: the same fields in the same order, so that postcard and JSON write
/// the same bytes for it as for the owned view (`tests/frames.rs`). A broker answers a job
/// from its entry with it, without copying the entry's strings into a [`JobInfo`] first.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct JobInfoRef<'a> {
    /// Job id.
    pub id: &'a str,
    /// Owner.
    pub owner: &'a str,
    /// Kind.
    pub kind: &'a str,
    /// State.
    pub state: JobState,
    /// Runner that took it.
    pub runner_id: Option<&'a str>,
    /// Exit code, where the process exited.
    pub exit_code: Option<i32>,
    /// How it ended, in words.
    pub message: &'a str,
    /// Creation time (unix ms).
    pub created_at_ms: i64,
    /// Start (unix ms).
    pub started_at_ms: Option<i64>,
    /// End (unix ms).
    pub finished_at_ms: Option<i64>,
    /// Output so far (UTF-8, lossy).
    pub output: &'a str,
    /// Whether output was cut.
    pub output_truncated: bool,
    /// Whether the broker let go of the output.
    pub output_expired: bool,
}

impl JobInfo {
    /// This view, borrowed.
    pub fn borrowed(&self) -> JobInfoRef<'_> {
        JobInfoRef {
            id: &self.id,
            owner: &self.owner,
            kind: &self.kind,
            state: self.state,
            runner_id: self.runner_id.as_deref(),
            exit_code: self.exit_code,
            message: &self.message,
            created_at_ms: self.created_at_ms,
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            output: &self.output,
            output_truncated: self.output_truncated,
            output_expired: self.output_expired,
        }
    }
}

impl JobInfoRef<'_> {
    /// The owned view.
    pub fn to_info(&self) -> JobInfo {
        JobInfo {
            id: self.id.to_owned(),
            owner: self.owner.to_owned(),
            kind: self.kind.to_owned(),
            state: self.state,
            runner_id: self.runner_id.map(str::to_owned),
            exit_code: self.exit_code,
            message: self.message.to_owned(),
            created_at_ms: self.created_at_ms,
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            output: self.output.to_owned(),
            output_truncated: self.output_truncated,
            output_expired: self.output_expired,
        }
    }
}

/// Who a forwarded call is made for, as the node that authenticated the API key saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCaller {
    /// The key id (for audit), never the secret.
    pub key_id: String,
    /// `operator`, `admin`, `dispatcher` or `member`.
    pub role: String,
    /// The key's tenant.
    pub tenant: Option<String>,
    /// The key's owner (member keys).
    pub owner: Option<String>,
}

/// A job to dispatch, already validated by the node that received it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatchSpec {
    /// Owner whose runners may take it.
    pub owner: String,
    /// Optional explicit runner.
    pub runner_id: Option<String>,
    /// Labels the runner must carry.
    pub labels: BTreeMap<String, String>,
    /// Handler kind.
    pub kind: String,
    /// Handler payload.
    #[serde(with = "crate::bytes")]
    pub payload: Vec<u8>,
    /// Run-time limit.
    pub timeout_ms: u64,
    /// Queue-wait limit.
    pub queue_timeout_ms: u64,
    /// Answer only once the job has ended.
    pub wait: bool,
}

impl std::fmt::Debug for DispatchSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Payloads may carry tenant data: never print them.
        f.debug_struct("DispatchSpec")
            .field("owner", &self.owner)
            .field("kind", &self.kind)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// One call to a tenant's home node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Dispatch a job; answered as a job.
    Dispatch {
        /// For whom.
        caller: PeerCaller,
        /// What.
        spec: DispatchSpec,
    },
    /// A job's current view; answered as a job.
    GetJob {
        /// For whom.
        caller: PeerCaller,
        /// Which.
        id: String,
    },
    /// The caller's jobs, newest first, without output; answered [`PeerResponse::Jobs`].
    ListJobs {
        /// For whom.
        caller: PeerCaller,
        /// Only this owner's.
        owner: Option<String>,
        /// At most this many.
        limit: u32,
        /// Only jobs older than this one (the cursor of the previous page).
        before: Option<String>,
    },
    /// Cancel a job; answered as a job.
    CancelJob {
        /// For whom.
        caller: PeerCaller,
        /// Which.
        id: String,
    },
    /// Stream a job's output until it ends: [`PeerResponse::Output`] chunks, then
    /// [`PeerResponse::End`].
    JobOutput {
        /// For whom.
        caller: PeerCaller,
        /// Which.
        id: String,
    },
    /// Close a revoked runner's live connections on its home; answered
    /// [`PeerResponse::Closed`].
    CloseRunner {
        /// The runner's tenant.
        tenant: String,
        /// The runner.
        runner_id: String,
    },
    /// Which of these runners have a live session on this node; answered
    /// [`PeerResponse::Online`].
    RunnersOnline {
        /// The tenant.
        tenant: String,
        /// The runners asked about.
        runner_ids: Vec<String>,
    },
    /// (rebalance) Hand the tenant over: finish its accepted jobs, send its runners away,
    /// release the claim; answered [`PeerResponse::Closed`] with the runners sent away.
    ReleaseTenant {
        /// The tenant.
        tenant: String,
    },
    /// (`runnel-peer/2`) This stream is a lane: [`crate::LaneCall`]s of every request but
    /// `JobOutput` (which lasts as long as its job) and `Lane` follow, each answered as on
    /// a stream of its own after a [`crate::LaneAnswer`] naming it, in the order the
    /// answers are ready ([`LaneReply`]). The first frame of a stream only; a connection
    /// has one lane at a time.
    Lane,
    /// (`runnel-peer/2`) A job's output from byte `offset` on, once there is some or the
    /// job has ended: answered [`PeerResponse::Output`] (at most [`PEER_OUTPUT_CHUNK`]
    /// bytes; ask again from past it; empty when nothing came within the home's poll, ten
    /// seconds: ask again from the same offset) or [`PeerResponse::End`] (the job has
    /// ended and nothing lies past `offset`). How a node follows an output on the lane, piece by
    /// piece, instead of holding a stream for as long as the job runs.
    OutputSince {
        /// For whom.
        caller: PeerCaller,
        /// Which.
        id: String,
        /// Bytes of output already had.
        offset: u64,
    },
}

/// One frame of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerResponse {
    /// A job (its `output` empty; the output follows in chunks).
    Job(JobInfo),
    /// A list of jobs (without output).
    Jobs(Vec<JobInfo>),
    /// A piece of output.
    Output(#[serde(with = "crate::bytes")] Vec<u8>),
    /// The end of a job answer or of an output stream.
    End,
    /// Connections closed.
    Closed(u32),
    /// The subset of the runners asked about that are online here, with their status.
    Online(Vec<(String, String)>),
    /// The call was refused, as the API would answer it.
    Refused {
        /// HTTP status.
        status: u16,
        /// Error code (`not_found`, `forbidden`, …).
        code: String,
        /// Message.
        message: String,
    },
}

impl PeerResponse {
    /// What the frame is, in words, for errors.
    pub fn what(&self) -> &'static str {
        match self {
            PeerResponse::Job(_) => "a job",
            PeerResponse::Jobs(_) => "a job list",
            PeerResponse::Output(_) => "output",
            PeerResponse::End => "the end",
            PeerResponse::Closed(_) => "a count",
            PeerResponse::Online(_) => "runner status",
            PeerResponse::Refused { .. } => "a refusal",
        }
    }
}

/// [`PeerResponse`] up to its `End` variant, the job and the output borrowed: the variants
/// keep their places, so postcard writes the same index for each.
#[derive(Serialize)]
enum PeerResponseRef<'a> {
    Job(JobInfoRef<'a>),
    _Jobs,
    Output(#[serde(with = "crate::bytes")] &'a [u8]),
    End,
}

/// `output` as [`PeerResponse::Output`] frames of at most [`PEER_OUTPUT_CHUNK`] bytes,
/// appended to `out` (no copy of the output but into `out`).
pub fn encode_output(out: &mut Vec<u8>, output: &[u8]) -> Result<(), crate::FrameError> {
    // Prefix, variant and a length of at most 3 bytes per chunk.
    out.reserve(output.len() + 8 * output.len().div_ceil(PEER_OUTPUT_CHUNK));
    for chunk in output.chunks(PEER_OUTPUT_CHUNK) {
        crate::encode_append(out, &PeerResponseRef::Output(chunk))?;
    }
    Ok(())
}

/// A job's whole answer, as [`read_job_answer`] reads it, in one buffer (one write):
/// [`PeerResponse::Job`] with `job` less its output, the output as [`encode_output`] writes
/// it, then [`PeerResponse::End`]. The frames are the same bytes as each encoded on its own
/// (`tests/frames.rs`).
pub fn encode_job_answer(job: JobInfoRef<'_>) -> Result<Vec<u8>, crate::FrameError> {
    let output = job.output.as_bytes();
    let job = JobInfoRef { output: "", ..job };
    // The job's frame is small; End is 5 bytes.
    let mut out = Vec::with_capacity(256 + output.len());
    crate::encode_append(&mut out, &PeerResponseRef::Job(job))?;
    encode_output(&mut out, output)?;
    crate::encode_append(&mut out, &PeerResponseRef::End)?;
    Ok(out)
}

/// Why an answer (to a node's or a native client's call) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The call was refused, as the API would have refused it.
    #[error("{message} ({status} {code})")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
    /// The stream ended before the answer did.
    #[error("the answer ended early")]
    Ended,
    /// A frame could not be read (the stream broke, or a frame was malformed).
    #[error(transparent)]
    Frame(#[from] crate::FrameError),
    /// A frame that does not belong in this answer.
    #[error("unexpected {0} in the answer")]
    Unexpected(&'static str),
}

/// The next frame of an answer; a refusal and an early end are errors. After an answer's
/// last frame (`End`, or a refusal) it also reads the stream's end when that came with it
/// ([`crate::take_end`]), so that the reader may drop the stream without quinn asking the
/// peer to stop sending, one `STOP_SENDING` per call.
pub async fn read_answer<R>(recv: &mut R) -> Result<PeerResponse, AnswerError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    next_frame(recv, Then::TakeEnd).await
}

/// What follows an answer's last frame.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// The stream's end (a call on a stream of its own).
    TakeEnd,
    /// The next answer (a lane): nothing may be read past the answer.
    More,
}

async fn next_frame<R>(recv: &mut R, then: Then) -> Result<PeerResponse, AnswerError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let last = |recv: &mut R| {
        if then == Then::TakeEnd {
            crate::take_end(recv);
        }
    };
    match crate::read_frame::<PeerResponse, _>(recv).await? {
        Some(PeerResponse::Refused { status, code, message }) => {
            last(recv);
            Err(AnswerError::Refused { status, code, message })
        }
        Some(PeerResponse::End) => {
            last(recv);
            Ok(PeerResponse::End)
        }
        Some(r) => Ok(r),
        None => Err(AnswerError::Ended),
    }
}

/// The rest of a job answer after its `Job` frame: the output chunks up to `End`, put
/// back into `job.output`.
pub async fn read_job_output<R>(recv: &mut R, job: JobInfo) -> Result<JobInfo, AnswerError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    job_output(recv, job, Then::TakeEnd).await
}

async fn job_output<R>(recv: &mut R, mut job: JobInfo, then: Then) -> Result<JobInfo, AnswerError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut output = Vec::new();
    loop {
        match next_frame(recv, then).await? {
            PeerResponse::Output(chunk) => output.extend_from_slice(&chunk),
            PeerResponse::End => break,
            other => return Err(AnswerError::Unexpected(other.what())),
        }
    }
    // The chunks split the output at any byte; only the whole is text again.
    job.output = String::from_utf8_lossy(&output).into_owned();
    Ok(job)
}

/// A whole job answer: `Job`, its output in `Output` chunks, `End`.
pub async fn read_job_answer<R>(recv: &mut R) -> Result<JobInfo, AnswerError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    job_answer(recv, Then::TakeEnd).await
}

async fn job_answer<R>(recv: &mut R, then: Then) -> Result<JobInfo, AnswerError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    match next_frame(recv, then).await? {
        PeerResponse::Job(job) => job_output(recv, job, then).await,
        other => Err(AnswerError::Unexpected(other.what())),
    }
}

/// One answer on a lane, past its refusals: a job (the calls answered as a job) or, on a
/// node's lane, the one frame of a call answered in one (`Jobs`, `Closed`, `Online`, and
/// `Output` or `End` for `OutputSince`).
#[derive(Debug, Clone, PartialEq)]
pub enum LaneReply {
    /// A job answer: `Job`, its output, `End`.
    Job(JobInfo),
    /// A one-frame answer.
    Frame(PeerResponse),
}

/// The next answer on a lane ([`crate::ApiRequest::Lane`], [`PeerRequest::Lane`]): which
/// call, and its answer or its refusal (`Err(AnswerError::Refused)`, the lane going on).
/// `Ok(None)`: the lane ended between answers. Any other error breaks the lane.
pub async fn read_lane_answer<R>(
    recv: &mut R,
) -> Result<Option<(u32, Result<LaneReply, AnswerError>)>, AnswerError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let Some(crate::LaneAnswer { call }) = crate::read_frame(recv).await? else {
        return Ok(None);
    };
    let answer = match next_frame(recv, Then::More).await {
        Ok(PeerResponse::Job(job)) => job_output(recv, job, Then::More).await.map(LaneReply::Job),
        // (A refusal is an error here already.)
        Ok(f) => Ok(LaneReply::Frame(f)),
        Err(e) => Err(e),
    };
    match answer {
        Ok(reply) => Ok(Some((call, Ok(reply)))),
        Err(e @ AnswerError::Refused { .. }) => Ok(Some((call, Err(e)))),
        Err(e) => Err(e),
    }
}
