//! A runner connection's job lane (protocol 3): one stream, opened with the connection's
//! first job, carries every job of the connection, each frame a `LaneFrame` naming the job
//! by this connection's number for it. No stream is opened, tracked, credited and ended
//! per job, on either side (BENCHMARKS.md: the spike measured −15% of the harness's CPU
//! per job and about −4% of the broker's).
//!
//! The same rules as a job stream's (`drive_job`): a job ends with the runner's `Result`;
//! it is bounded by its run timeout plus `RESULT_GRACE`; a cancel is sent as `Cancel` and
//! the runner then has `CANCEL_GRACE` to confirm it; a job the broker gave up on is sent a
//! `Cancel` too, so that the runner stops it. A frame for a job the broker has already
//! ended is ignored (the runner may not have heard yet); a malformed frame closes the
//! connection. The lane's opening waits on the runner's stream credit, so it is polled
//! with the rest, never awaited: jobs taken before it is open are watched from the start
//! and sent when it opens, and one cancelled or past its time before that ends without
//! ever reaching the runner (a runner that grants no stream holds no job). Writes never
//! wait: what the runner has not read stays in the lane's buffer, and a job whose time is
//! up before its request was even written closes the connection (a runner that reads
//! nothing cannot make requests pile up here). All of it is driven by the connection's
//! one I/O task.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{AbortHandle, Abortable, BoxFuture};
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use runnel_protocol::{
    BrokerJobFrame, FrameError, LaneFrame, RunnerJobFrame, encode_append, encode_lane_job_request,
    read_frame,
};

use super::runner_connection::{CANCEL_GRACE, Jobs, RESULT_GRACE, outcome_state};
use crate::jobs::{Finish, JobEntry, JobState};

/// What a job's watch reports.
enum Watch {
    /// The job was cancelled (by the API).
    Cancelled(u32),
    /// Its time (run timeout and grace, or the cancel's grace) is up.
    Expired(u32),
}

/// A job on the lane, not yet ended.
struct Running {
    job: Arc<JobEntry>,
    /// Its request is in `out` (or written); until the lane is open it is not.
    sent: bool,
    /// Where its request ends in the lane's bytes (counted as `JobLane::written`).
    request_end: u64,
    cancel_sent: bool,
    /// Stops the job's watch once it has ended.
    watch: AbortHandle,
}

/// Why the lane cannot go on: the connection is closed with this.
pub(super) struct Broken {
    pub code: runnel_protocol::ErrorCode,
    pub reason: &'static str,
}

type Opening = BoxFuture<'static, Result<(quinn::SendStream, quinn::RecvStream), String>>;

/// One connection's job lane.
#[derive(Default)]
pub(super) struct JobLane {
    /// The lane being opened (the runner may grant no stream: nothing waits on it but the
    /// jobs, whose watches run meanwhile).
    opening: Option<Opening>,
    send: Option<quinn::SendStream>,
    frames: Option<BoxStream<'static, Result<Option<LaneFrame<RunnerJobFrame>>, FrameError>>>,
    running: HashMap<u32, Running>,
    watches: FuturesUnordered<Abortable<BoxFuture<'static, Watch>>>,
    next: u32,
    /// Frames not yet written, from `out[sent..]`.
    out: Vec<u8>,
    sent: usize,
    /// Bytes written on the lane so far.
    written: u64,
}

impl JobLane {
    /// Takes `taken` for the runner: each is sent on the lane, which is opened with the
    /// connection's first job, and watched for its cancel and deadline from now on.
    pub(super) fn start(
        &mut self,
        conn: &quinn::Connection,
        jobs: &Jobs,
        taken: Vec<Arc<JobEntry>>,
    ) {
        if self.send.is_none() && self.opening.is_none() {
            let conn = conn.clone();
            self.opening =
                Some(async move { conn.open_bi().await.map_err(|e| e.to_string()) }.boxed());
        }
        for job in taken {
            self.next = self.next.wrapping_add(1);
            let n = self.next;
            let cancel = job.cancel.clone();
            let limit = job.spec.timeout + RESULT_GRACE;
            let watch = async move {
                tokio::select! {
                    () = cancel.cancelled_owned() => Watch::Cancelled(n),
                    () = tokio::time::sleep(limit) => Watch::Expired(n),
                }
            };
            let watch = self.watch(watch.boxed());
            self.running
                .insert(n, Running { job, sent: false, request_end: 0, cancel_sent: false, watch });
            if self.send.is_some() {
                self.send_job(n, jobs);
            }
        }
    }

    /// Puts job `n`'s request in `out`; a job that cannot be encoded ends `runner_lost`.
    fn send_job(&mut self, n: u32, jobs: &Jobs) {
        let Some(r) = self.running.get_mut(&n) else { return };
        let job = &r.job;
        let timeout_ms = job.spec.timeout.as_millis() as u64;
        // Encoded from the entry itself: no copy of the id, kind and payload per job.
        let encoded = job.with_payload(|payload| {
            encode_lane_job_request(&mut self.out, n, &job.id, &job.spec.kind, payload, timeout_ms)
        });
        r.sent = true;
        r.request_end = self.written + (self.out.len() - self.sent) as u64;
        if let Err(e) = encoded {
            self.end(
                n,
                jobs,
                Finish::new(JobState::RunnerLost, format!("could not encode job: {e}")),
            );
        }
    }

    /// Job `n` ends here, without its Result.
    fn end(&mut self, n: u32, jobs: &Jobs, finish: Finish) {
        if let Some(r) = self.running.remove(&n) {
            r.watch.abort();
            jobs.ended(r.job, finish);
        }
    }

    fn watch(&mut self, f: BoxFuture<'static, Watch>) -> AbortHandle {
        let (handle, registration) = AbortHandle::new_pair();
        self.watches.push(Abortable::new(f, registration));
        handle
    }

    /// Whether there is anything to drive (a lane opened or being opened).
    pub(super) fn is_open(&self) -> bool {
        self.send.is_some() || self.opening.is_some()
    }

    /// The lane is open: the jobs that waited for it are sent.
    fn opened(&mut self, (send, recv): (quinn::SendStream, quinn::RecvStream), jobs: &Jobs) {
        self.send = Some(send);
        self.frames = Some(
            futures::stream::unfold(recv, |mut recv| async move {
                let next = read_frame::<LaneFrame<RunnerJobFrame>, _>(&mut recv).await;
                Some((next, recv))
            })
            .boxed(),
        );
        let mut waiting: Vec<u32> =
            self.running.iter().filter(|(_, r)| !r.sent).map(|(n, _)| *n).collect();
        // In the order they came.
        waiting.sort_unstable_by_key(|n| std::cmp::Reverse(self.next.wrapping_sub(*n)));
        for n in waiting {
            self.send_job(n, jobs);
        }
    }

    /// Drives the lane: the runner's frames, the jobs' watches, the writes. Ready only
    /// when the lane is broken (the caller closes the connection).
    pub(super) fn poll(&mut self, cx: &mut Context<'_>, jobs: &Jobs) -> Poll<Broken> {
        loop {
            let mut moved = false;
            if let Some(opening) = self.opening.as_mut()
                && let Poll::Ready(opened) = opening.poll_unpin(cx)
            {
                self.opening = None;
                moved = true;
                match opened {
                    Ok(streams) => self.opened(streams, jobs),
                    // The connection is gone; its close ends the jobs.
                    Err(e) => {
                        tracing::debug!(error = %e, "could not open the job lane");
                        return Poll::Ready(broken(
                            runnel_protocol::ErrorCode::Protocol,
                            "could not open the job lane",
                        ));
                    }
                }
            }
            if let Some(frames) = self.frames.as_mut() {
                while let Poll::Ready(next) = frames.poll_next_unpin(cx) {
                    moved = true;
                    match next {
                        Some(Ok(Some(LaneFrame { job, frame }))) => {
                            on_frame(&mut self.running, job, frame, jobs);
                        }
                        // The runner ended its side: it is leaving (drained, sent away) and
                        // sends nothing more; its connection's close follows. A job still
                        // on the lane cannot end any other way.
                        Some(Ok(None)) | None => {
                            self.frames = None;
                            self.lose_all(jobs, "the runner ended its job lane");
                            break;
                        }
                        Some(Err(FrameError::Io(_) | FrameError::Truncated)) => {
                            return Poll::Ready(broken(
                                runnel_protocol::ErrorCode::Protocol,
                                "job lane broken",
                            ));
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "bad job frame from runner; closing");
                            return Poll::Ready(broken(e.code(), "bad job frame"));
                        }
                    }
                }
            }
            while let Poll::Ready(Some(fired)) = self.watches.poll_next_unpin(cx) {
                moved = true;
                match fired {
                    Ok(Watch::Cancelled(n)) => self.cancelled(n, jobs),
                    Ok(Watch::Expired(n)) => {
                        if let Some(b) = self.expired(n, jobs) {
                            return Poll::Ready(b);
                        }
                    }
                    // Its job ended first.
                    Err(_aborted) => {}
                }
            }
            if let Some(send) = self.send.as_mut() {
                while self.sent < self.out.len() {
                    match Pin::new(&mut *send).poll_write(cx, &self.out[self.sent..]) {
                        Poll::Ready(Ok(n)) if n > 0 => {
                            self.sent += n;
                            self.written += n as u64;
                            moved = true;
                        }
                        Poll::Ready(_) => {
                            return Poll::Ready(broken(
                                runnel_protocol::ErrorCode::Protocol,
                                "job lane write failed",
                            ));
                        }
                        Poll::Pending => break,
                    }
                }
                if self.sent == self.out.len() {
                    self.out.clear();
                    self.sent = 0;
                }
            }
            if !moved {
                return Poll::Pending;
            }
        }
    }

    /// The API cancelled job `n`: tell the runner, and give it `CANCEL_GRACE` to confirm.
    /// A job not yet sent (the lane is not open) is cancelled at once.
    fn cancelled(&mut self, n: u32, jobs: &Jobs) {
        let Some(r) = self.running.get_mut(&n) else { return };
        if !r.sent {
            let f = Finish::new(JobState::Cancelled, "cancelled before it reached the runner");
            return self.end(n, jobs, f);
        }
        r.cancel_sent = true;
        let _ = encode_append(&mut self.out, &LaneFrame { job: n, frame: BrokerJobFrame::Cancel });
        let grace = async move {
            tokio::time::sleep(CANCEL_GRACE).await;
            Watch::Expired(n)
        };
        let watch = self.watch(grace.boxed());
        if let Some(r) = self.running.get_mut(&n) {
            r.watch = watch;
        }
    }

    /// Job `n`'s time is up: it ends without the runner, which is told to stop it. A runner
    /// that has not even read the job's request by then does not read its lane: its
    /// connection is closed (what it leaves unread would otherwise pile up here, one
    /// request after another).
    fn expired(&mut self, n: u32, jobs: &Jobs) -> Option<Broken> {
        let r = self.running.remove(&n)?;
        let unread = r.sent && self.written < r.request_end;
        let f = if r.cancel_sent {
            Finish::new(JobState::Cancelled, "runner did not confirm the cancel in time")
        } else if !r.sent {
            Finish::new(JobState::TimedOut, "the runner opened no job lane within the run timeout")
        } else {
            let _ =
                encode_append(&mut self.out, &LaneFrame { job: n, frame: BrokerJobFrame::Cancel });
            Finish::new(JobState::TimedOut, "no result within the run timeout")
        };
        jobs.ended(r.job, f);
        unread.then(|| {
            broken(runnel_protocol::ErrorCode::Timeout, "runner does not read its job lane")
        })
    }

    /// The connection is gone: every job still on the lane ends `runner_lost`.
    pub(super) fn lose_all(&mut self, jobs: &Jobs, why: &str) {
        for (_, r) in self.running.drain() {
            r.watch.abort();
            jobs.ended(r.job, Finish::new(JobState::RunnerLost, why.to_owned()));
        }
    }
}

fn broken(code: runnel_protocol::ErrorCode, reason: &'static str) -> Broken {
    Broken { code, reason }
}

/// A frame from the runner, for job `n`.
fn on_frame(running: &mut HashMap<u32, Running>, n: u32, frame: RunnerJobFrame, jobs: &Jobs) {
    match frame {
        RunnerJobFrame::Output { data, .. } => {
            if let Some(r) = running.get(&n) {
                jobs.shared.jobs.append_output(&r.job, data);
            }
        }
        RunnerJobFrame::Result(r) => {
            if let Some(done) = running.remove(&n) {
                done.watch.abort();
                let f = Finish {
                    state: outcome_state(r.outcome),
                    exit_code: r.exit_code,
                    message: r.message,
                    output_truncated: r.output_truncated,
                };
                jobs.ended(done.job, f);
            }
        }
    }
}
