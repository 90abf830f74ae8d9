//! Job handlers: how a runner runs one kind of job.
//!
//! ```no_run
//! # use runnel_runner::{Job, JobHandler, handler};
//! struct Echo;
//! #[async_trait::async_trait]
//! impl JobHandler for Echo {
//!     async fn run(&self, job: Job) -> runnel_protocol::JobResult {
//!         job.stdout(&job.payload).await;
//!         handler::succeeded()
//!     }
//! }
//! ```
//! Install with `Runner::builder(state).handler("echo", Echo)`. A handler must return soon
//! after [`Job::cancelled`] fires (cancel or timeout); the runner reports the outcome.

use std::time::Duration;

use runnel_protocol::{
    JobOutcome, JobResult, OutputStream, RunnerJobFrame, limits::MAX_OUTPUT_CHUNK,
};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// One job, as a handler sees it.
#[derive(Debug)]
pub struct Job {
    /// Job id.
    pub id: String,
    /// Kind.
    pub kind: String,
    /// Payload (handler-defined format).
    pub payload: Vec<u8>,
    /// Run-time limit (enforced by the runner through [`Job::cancelled`]).
    pub timeout: Duration,
    pub(crate) frames: mpsc::Sender<RunnerJobFrame>,
    pub(crate) cancel: CancellationToken,
}

impl Job {
    /// Sends output, split into protocol-sized chunks. Returns false once the broker is
    /// gone (the job will be cancelled; stop producing).
    pub async fn output(&self, stream: OutputStream, data: &[u8]) -> bool {
        for chunk in data.chunks(MAX_OUTPUT_CHUNK) {
            let frame = RunnerJobFrame::Output { stream, data: chunk.to_vec() };
            if self.frames.send(frame).await.is_err() {
                return false;
            }
        }
        true
    }

    /// [`Job::output`] to stdout.
    pub async fn stdout(&self, data: &[u8]) -> bool {
        self.output(OutputStream::Stdout, data).await
    }

    /// Resolves when the job is cancelled or times out.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// Whether the job was cancelled or timed out.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// A job kind's implementation.
#[async_trait::async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Runs one job to its end.
    async fn run(&self, job: Job) -> JobResult;
}

fn result(outcome: JobOutcome, exit_code: Option<i32>, message: impl Into<String>) -> JobResult {
    JobResult { outcome, exit_code, message: message.into(), output_truncated: false }
}

/// A success without an exit code.
pub fn succeeded() -> JobResult {
    result(JobOutcome::Succeeded, None, "")
}

/// A failure with a message.
pub fn failed(message: impl Into<String>) -> JobResult {
    result(JobOutcome::Failed, None, message)
}

/// A refusal (nothing ran).
pub fn rejected(message: impl Into<String>) -> JobResult {
    result(JobOutcome::Rejected, None, message)
}

/// Stopped by cancel.
pub fn cancelled(message: impl Into<String>) -> JobResult {
    result(JobOutcome::Cancelled, None, message)
}
