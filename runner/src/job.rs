//! One job on the runner: check kind, drain and capacity, run the handler with its
//! run-time limit and cancel, stream its output, then the Result; on a stream of its own
//! (protocol 2) or on the connection's job lane (protocol 3, `lane.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use runnel_protocol::{
    BrokerJobFrame, ErrorCode, JobOutcome, JobRequest, LaneFrame, Outbox, RunnerJobFrame,
    encode_append, read_frame,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::handler::{self, Job};
use crate::runner::Inner;

/// Time the broker has to send the job on a new stream.
const JOB_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Output frames buffered per job before the handler waits.
const OUTPUT_QUEUE: usize = 32;
/// How long, after its Result, a job's stream waits for the broker to end its half. The
/// broker ends it with its next job on the connection or within a few milliseconds
/// (`STREAM_END_DELAY`); a stream dropped before its end was read would make quinn ask the
/// broker to stop sending (`STOP_SENDING`), which then left alone, ahead of the Result.
const END_WAIT: Duration = Duration::from_secs(1);

/// Serves one job stream: read the Job, run its handler, stream output, send the Result.
pub(crate) async fn serve_job(
    inner: &Arc<Inner>,
    outbox: Outbox<quinn::SendStream>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let req =
        match tokio::time::timeout(JOB_FRAME_TIMEOUT, read_frame::<BrokerJobFrame, _>(&mut recv))
            .await
        {
            Ok(Ok(Some(BrokerJobFrame::Job(r)))) => r,
            _ => {
                let _ = send.reset(ErrorCode::Protocol.as_u32().into());
                return;
            }
        };
    let span = tracing::info_span!("job", job = %req.job_id, kind = %req.kind);
    run_job(inner, outbox, req, send, recv).instrument(span).await
}

/// Runs one job whose request has been read (inside its span), on its own stream
/// (protocol 2).
async fn run_job(
    inner: &Arc<Inner>,
    outbox: Outbox<quinn::SendStream>,
    req: JobRequest,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let cancel = CancellationToken::new();
    let (frames_tx, mut frames_rx) = mpsc::channel::<RunnerJobFrame>(OUTPUT_QUEUE);
    // Broker → runner after the Job: Cancel, or the stream breaking (also a cancel).
    let listen_cancel = cancel.clone();
    let listener = AbortOnDropHandle::new(tokio::spawn(async move {
        match read_frame::<BrokerJobFrame, _>(&mut recv).await {
            Ok(None) => {}
            _ => listen_cancel.cancel(),
        }
    }));
    // Runner → broker: output frames, then the Result. Frames already queued are written
    // together, and the last write (the Result, with whatever output came just before it,
    // and the stream's end) goes through the connection's outbox, to share a datagram with
    // the other jobs' results written at about the same time.
    let writer = tokio::spawn(async move {
        let mut bytes = Vec::new();
        while let Some(frame) = frames_rx.recv().await {
            bytes.clear();
            let mut next = Some(frame);
            let mut last = false;
            while let Some(frame) = next.take() {
                last = matches!(frame, RunnerJobFrame::Result(_));
                if encode_append(&mut bytes, &frame).is_err() {
                    return;
                }
                if !last {
                    next = frames_rx.try_recv().ok();
                }
            }
            if last {
                if let Ok(send) = outbox.deliver(send, bytes).await {
                    // Keep the stream until the broker has it.
                    let _ = send.stopped().await;
                }
                return;
            }
            if send.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let result = execute(inner, req, frames_tx.clone(), cancel).await;
    let _ = frames_tx.send(RunnerJobFrame::Result(result)).await;
    drop(frames_tx);
    let _ = writer.await;
    // A Cancel now is too late to matter; the listener only reads the broker's end. (The
    // broker ends its half after the Result; a stream dropped before its end was read
    // would make quinn send a STOP_SENDING, which would leave alone.)
    let _ = tokio::time::timeout(END_WAIT, listener).await;
}

/// One job on the connection's job lane (protocol 3): its output and then its Result go
/// to the lane's writer as `LaneFrame`s of job `n`; `cancel` is fired by the lane's
/// reader when the broker sends `Cancel` for it.
pub(crate) async fn run_lane_job(
    inner: &Arc<Inner>,
    n: u32,
    req: JobRequest,
    lane: mpsc::Sender<Vec<u8>>,
    cancel: CancellationToken,
) {
    let (frames_tx, mut frames_rx) = mpsc::channel::<RunnerJobFrame>(OUTPUT_QUEUE);
    let forward = {
        let lane = lane.clone();
        async move {
            while let Some(frame) = frames_rx.recv().await {
                let mut bytes = Vec::new();
                if encode_append(&mut bytes, &LaneFrame { job: n, frame }).is_err()
                    || lane.send(bytes).await.is_err()
                {
                    return;
                }
            }
        }
    };
    // Every output frame has gone to the lane before the Result: the forwarder ends once
    // the handler's senders are gone.
    let (result, ()) = tokio::join!(execute(inner, req, frames_tx, cancel), forward);
    let mut bytes = Vec::new();
    if encode_append(&mut bytes, &LaneFrame { job: n, frame: RunnerJobFrame::Result(result) })
        .is_ok()
    {
        let _ = lane.send(bytes).await;
    }
}

/// What a job is on either protocol: the drain, kind and capacity checks (a refusal is a
/// `Rejected` result, nothing run), then its handler under its run timeout, `cancel` and
/// the runner's stop, its output into `frames` as it comes. Answers its Result, the
/// capacity permit already given back (the broker counts the job done when the Result
/// arrives and may send the next one at once).
async fn execute(
    inner: &Arc<Inner>,
    req: JobRequest,
    frames: mpsc::Sender<RunnerJobFrame>,
    cancel: CancellationToken,
) -> runnel_protocol::JobResult {
    let (handler, permit) =
        match (inner.handlers.get(&req.kind), inner.permits.clone().try_acquire_owned()) {
            _ if inner.draining.load(Ordering::Relaxed) => {
                return handler::rejected("runner is draining");
            }
            (None, _) => return handler::rejected(format!("no handler for kind {:?}", req.kind)),
            (_, Err(_)) => return handler::rejected("runner is at capacity"),
            (Some(h), Ok(p)) => (h.clone(), p),
        };
    let timeout = Duration::from_millis(req.timeout_ms);
    let timed_out = Arc::new(AtomicBool::new(false));
    let timer = {
        let cancel = cancel.clone();
        let timed_out = timed_out.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            timed_out.store(true, Ordering::Relaxed);
            cancel.cancel();
        }))
    };
    let job = Job {
        id: req.job_id,
        kind: req.kind,
        payload: req.payload,
        timeout,
        frames,
        cancel: cancel.clone(),
    };
    let stop = inner.stop.clone();
    let run = handler.run(job);
    tokio::pin!(run);
    let mut result = tokio::select! {
        r = &mut run => r,
        _ = stop.cancelled() => { cancel.cancel(); run.await }
    };
    timer.abort();
    if timed_out.load(Ordering::Relaxed) && result.outcome == JobOutcome::Cancelled {
        result.outcome = JobOutcome::TimedOut;
        result.message = format!("run timeout of {timeout:?} passed; process group killed");
    }
    drop(permit);
    result
}
