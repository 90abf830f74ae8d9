//! The runner's side of a job lane (protocol 3): the one stream the broker opens with the
//! connection's first job carries every job, each frame a `LaneFrame` naming it. One task
//! reads the jobs and the cancels; one writes every job's output and Result, what comes
//! together in one write (so that results of jobs that end together share datagrams, as
//! the `Outbox` does for streams).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use runnel_protocol::{
    BrokerJobFrame, ErrorCode, JobRequest, LaneFrame, lane_reader, read_frame, write_lane,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// Encoded frames queued for the lane's writer; past it a job's output waits.
const LANE_QUEUE: usize = 64;
/// How long a session that leaves waits for the broker to have the lane's last frames.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A job read from the lane: its number, its request, and its cancel (fired when the
/// broker sends `Cancel` for it).
pub(crate) type LaneJob = (u32, JobRequest, CancellationToken);

/// A connection's job lane.
pub(crate) struct Lane {
    /// Jobs as the broker sends them.
    pub(crate) jobs: mpsc::Receiver<LaneJob>,
    /// Where a job's frames go.
    pub(crate) writer: mpsc::Sender<Vec<u8>>,
    cancels: Cancels,
    _tasks: (AbortOnDropHandle<()>, AbortOnDropHandle<()>),
}

/// The cancels of the jobs running, by number.
#[derive(Clone, Default)]
pub(crate) struct Cancels(Arc<Mutex<HashMap<u32, CancellationToken>>>);

impl Cancels {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, CancellationToken>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Job `n` has ended: a later `Cancel` for it is nothing.
    pub(crate) fn ended(&self, n: u32) {
        self.lock().remove(&n);
    }
}

impl Lane {
    /// Serves the lane the broker opened on `conn`. A frame that is not a lane frame
    /// closes the connection (the session then ends and dials again).
    pub(crate) fn open(
        conn: quinn::Connection,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
        capacity: u32,
    ) -> Self {
        let (writer, mut frames) = mpsc::channel::<Vec<u8>>(LANE_QUEUE);
        let write = AbortOnDropHandle::new(tokio::spawn(async move {
            if !write_lane(&mut send, &mut frames, Vec::new()).await {
                return;
            }
            // Every job's frames are written: end the lane, and keep it until the broker
            // has all of it (the session closes the connection next).
            let _ = send.finish();
            let _ = send.stopped().await;
        }));
        // The broker sends at most `capacity` jobs before results come back.
        let (jobs_tx, jobs) = mpsc::channel::<LaneJob>(capacity.clamp(1, 1024) as usize);
        let cancels = Cancels::default();
        let running = cancels.clone();
        let read = AbortOnDropHandle::new(tokio::spawn(async move {
            let mut recv = lane_reader(recv);
            loop {
                match read_frame::<LaneFrame<BrokerJobFrame>, _>(&mut recv).await {
                    Ok(Some(LaneFrame { job, frame: BrokerJobFrame::Job(req) })) => {
                        let cancel = CancellationToken::new();
                        running.lock().insert(job, cancel.clone());
                        if jobs_tx.send((job, req, cancel)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(LaneFrame { job, frame: BrokerJobFrame::Cancel })) => {
                        if let Some(c) = running.lock().get(&job) {
                            c.cancel();
                        }
                    }
                    // The broker ended the lane, or the connection went: the session sees
                    // the connection's end.
                    Ok(None) | Err(runnel_protocol::FrameError::Io(_)) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "bad job lane frame from the broker; closing");
                        conn.close(e.code().as_u32().into(), b"bad job lane frame");
                        return;
                    }
                }
            }
        }));
        Self { jobs, writer, cancels, _tasks: (write, read) }
    }

    /// Closes `conn` as a session that leaves (drained, sent away) once no job runs: the
    /// lane's queued frames first, [`FLUSH_WAIT`] at most until the broker has them (a
    /// close drops what is still unsent, and a Result lost so would end its job
    /// `runner_lost`).
    pub(crate) async fn leave(lane: Option<Self>, conn: &quinn::Connection, why: &[u8]) {
        if let Some(Lane { writer, _tasks: (write, _read), .. }) = lane {
            drop(writer);
            let _ = tokio::time::timeout(FLUSH_WAIT, write).await;
        }
        conn.close(ErrorCode::Ok.as_u32().into(), why);
    }

    /// The cancels, for a job to say it has ended.
    pub(crate) fn cancels(&self) -> Cancels {
        self.cancels.clone()
    }
}
