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
//! connection. The lane holds no future, task or timer per job: its jobs' deadlines are
//! kept in order with one timer for the earliest, and a cancel reaches it through the
//! lane's `CancelHook`. The lane's opening waits on the runner's stream credit, so it is
//! polled with the rest, never awaited: jobs taken before it is open are watched from the start
//! and sent when it opens, and one cancelled or past its time before that ends without
//! ever reaching the runner (a runner that grants no stream holds no job). Writes never
//! wait: what the runner has not read stays in the lane's buffer, and a job whose time is
//! up before its request was even written closes the connection (a runner that reads
//! nothing cannot make requests pile up here). All of it is driven by the connection's
//! one I/O task.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use runnel_protocol::{
    BrokerJobFrame, FrameError, LaneFrame, RunnerJobFrame, encode_append, encode_lane_job_request,
    lane_reader, read_frame,
};
use tokio::time::{Instant, Sleep};

use super::runner_connection::{CANCEL_GRACE, Jobs, RESULT_GRACE, outcome_state};
use crate::jobs::{CancelHook, Finish, JobEntry, JobState};

/// A job on the lane, not yet ended.
struct Running {
    job: Arc<JobEntry>,
    /// Its request is in `out` (or written); until the lane is open it is not.
    sent: bool,
    /// Where its request ends in the lane's bytes (counted as `JobLane::written`).
    request_end: u64,
    cancel_sent: bool,
    /// When the broker gives up on it (its key in `JobLane::deadlines`).
    deadline: Instant,
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
    /// jobs, whose deadlines and cancels are watched meanwhile).
    opening: Option<Opening>,
    send: Option<quinn::SendStream>,
    frames: Option<BoxStream<'static, Result<Option<LaneFrame<RunnerJobFrame>>, FrameError>>>,
    running: HashMap<u32, Running>,
    /// The running jobs' deadlines, earliest first.
    deadlines: BTreeSet<(Instant, u32)>,
    /// Fires at or before the earliest deadline (a job that ended leaves it early: it is
    /// set again when it fires, not each time a job ends).
    timer: Option<Pin<Box<Sleep>>>,
    /// Told of a cancel of any job on the lane.
    cancels: Arc<CancelHook>,
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
        let now = Instant::now();
        for job in taken {
            self.next = self.next.wrapping_add(1);
            let n = self.next;
            let deadline = now + job.spec.timeout + RESULT_GRACE;
            let cancelled = job.hook_cancel(&self.cancels);
            self.running.insert(
                n,
                Running { job, sent: false, request_end: 0, cancel_sent: false, deadline },
            );
            self.set_deadline(n, deadline);
            if self.send.is_some() {
                self.send_job(n, jobs);
            }
            if cancelled {
                self.cancelled(n, jobs);
            }
        }
    }

    /// Job `n` is given up on at `at` (its earlier deadline, if any, already removed).
    fn set_deadline(&mut self, n: u32, at: Instant) {
        self.deadlines.insert((at, n));
        match self.timer.as_mut() {
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            Some(t) if t.deadline() > at => t.as_mut().reset(at),
            Some(_) => {}
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

    /// Job `n` leaves the lane; answers it (`None` if it had already left).
    fn remove(&mut self, n: u32) -> Option<Running> {
        let r = self.running.remove(&n)?;
        self.deadlines.remove(&(r.deadline, n));
        Some(r)
    }

    /// Job `n` ends here, without its Result.
    fn end(&mut self, n: u32, jobs: &Jobs, finish: Finish) {
        if let Some(r) = self.remove(n) {
            jobs.ended(r.job, finish);
        }
    }

    /// Whether there is anything to drive (a lane opened or being opened).
    pub(super) fn is_open(&self) -> bool {
        self.send.is_some() || self.opening.is_some()
    }

    /// The lane is open: the jobs that waited for it are sent.
    fn opened(&mut self, (send, recv): (quinn::SendStream, quinn::RecvStream), jobs: &Jobs) {
        self.send = Some(send);
        self.frames = Some(
            futures::stream::unfold(lane_reader(recv), |mut recv| async move {
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

    /// Drives the lane: its opening, the runner's frames, the jobs' cancels and deadlines,
    /// the writes. Ready only when the lane is broken (the caller closes the connection).
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
            while let Some(frames) = self.frames.as_mut()
                && let Poll::Ready(next) = frames.poll_next_unpin(cx)
            {
                moved = true;
                match next {
                    Some(Ok(Some(LaneFrame { job, frame }))) => self.on_frame(job, frame, jobs),
                    // The runner ended its side: it is leaving (drained, sent away) and sends
                    // nothing more; its connection's close follows. A job still on the lane
                    // cannot end any other way.
                    Some(Ok(None)) | None => {
                        self.frames = None;
                        self.lose_all(jobs, "the runner ended its job lane");
                    }
                    Some(Err(FrameError::Io(_) | FrameError::Truncated)) => {
                        let code = runnel_protocol::ErrorCode::Protocol;
                        return Poll::Ready(broken(code, "job lane broken"));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "bad job frame from runner; closing");
                        return Poll::Ready(broken(e.code(), "bad job frame"));
                    }
                }
            }
            if self.cancels.take(cx) {
                moved = true;
                let cancelled: Vec<u32> = self
                    .running
                    .iter()
                    .filter(|(_, r)| !r.cancel_sent && r.job.is_cancelled())
                    .map(|(n, _)| *n)
                    .collect();
                for n in cancelled {
                    self.cancelled(n, jobs);
                }
            }
            if self.timer.as_mut().is_some_and(|t| t.as_mut().poll(cx).is_ready()) {
                moved = true;
                let now = Instant::now();
                while let Some(&(at, n)) = self.deadlines.first()
                    && at <= now
                {
                    if let Some(b) = self.expired(n, jobs) {
                        return Poll::Ready(b);
                    }
                }
                match (self.deadlines.first(), self.timer.as_mut()) {
                    (Some(&(at, _)), Some(t)) => t.as_mut().reset(at),
                    _ => self.timer = None,
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

    /// A frame from the runner, for job `n`.
    fn on_frame(&mut self, n: u32, frame: RunnerJobFrame, jobs: &Jobs) {
        match frame {
            RunnerJobFrame::Output { data, .. } => {
                if let Some(r) = self.running.get(&n) {
                    jobs.shared.jobs.append_output(&r.job, data);
                }
            }
            RunnerJobFrame::Result(r) => {
                let f = Finish {
                    state: outcome_state(r.outcome),
                    exit_code: r.exit_code,
                    message: r.message,
                    output_truncated: r.output_truncated,
                };
                self.end(n, jobs, f);
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
        let (old, grace) = (r.deadline, Instant::now() + CANCEL_GRACE);
        r.deadline = grace;
        self.deadlines.remove(&(old, n));
        self.set_deadline(n, grace);
        let _ = encode_append(&mut self.out, &LaneFrame { job: n, frame: BrokerJobFrame::Cancel });
    }

    /// Job `n`'s time is up: it ends without the runner, which is told to stop it. A runner
    /// that has not even read the job's request by then does not read its lane: its
    /// connection is closed (what it leaves unread would otherwise pile up here, one
    /// request after another).
    fn expired(&mut self, n: u32, jobs: &Jobs) -> Option<Broken> {
        let r = self.remove(n)?;
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
        self.deadlines.clear();
        for (_, r) in self.running.drain() {
            jobs.ended(r.job, Finish::new(JobState::RunnerLost, why.to_owned()));
        }
    }
}

fn broken(code: runnel_protocol::ErrorCode, reason: &'static str) -> Broken {
    Broken { code, reason }
}
