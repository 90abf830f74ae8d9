//! The calling side of a lane of calls: the calls answered at once share one stream
//! (opened with [`crate::ApiRequest::Lane`] by a native API client,
//! [`crate::PeerRequest::Lane`] by a node), instead of a stream each: no stream to open,
//! track, acknowledge and close per call, on either side. Each call is a
//! [`LaneCall`](crate::LaneCall) numbered by the caller; each answer a
//! [`LaneAnswer`](crate::LaneAnswer) naming it, then the job, the one frame, or the
//! refusal ([`crate::read_lane_answer`]), in the order the answers are ready.
//!
//! One task writes the calls (those posted at about the same time together, so that they
//! share datagrams: [`crate::write_lane`]), one reads the answers and hands each to its
//! caller by the call's number. When the lane ends or breaks, every call still waiting
//! fails with the reason the lane's owner gives (`ended`, which may also close the
//! connection), and no call is taken after.
//!
//! Generic over the stream's two halves, so this crate stays without sockets.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::{
    AnswerError, JobInfo, LaneCall, LaneReply, encode, lane_reader, read_lane_answer, write_lane,
};

/// The calls of one lane, sent as requests of type `R`.
pub struct CallLane<R> {
    /// Encoded calls, for the writing task.
    queue: mpsc::UnboundedSender<Vec<u8>>,
    waiting: Arc<Mutex<Waiting>>,
    next: AtomicU32,
    _requests: PhantomData<fn(&R)>,
}

impl<R> std::fmt::Debug for CallLane<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallLane").finish_non_exhaustive()
    }
}

/// The calls sent and not yet answered.
#[derive(Default)]
struct Waiting {
    calls: HashMap<u32, oneshot::Sender<Result<LaneReply, LaneFailed>>>,
    /// Why the lane ended; once set, no call is taken.
    broken: Option<LaneBroken>,
}

/// Why a lane ended, as its owner words it (`ended` of [`CallLane::open`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaneBroken {
    /// The connection closed (why).
    #[error("{0}")]
    Lost(String),
    /// The other side ended the lane or answered out of protocol.
    #[error("{0}")]
    Protocol(String),
}

/// Why a call on a lane failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneFailed {
    /// Nothing was sent: the lane had ended. Safe to send on another lane.
    Unsent,
    /// The call was answered with a refusal ([`AnswerError::Refused`]'s fields).
    Refused {
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
    /// The call was sent (or may have been), and the lane ended before its answer.
    Broken(LaneBroken),
    /// The call could not be encoded (nothing was sent).
    Request(String),
    /// The call was answered with a frame that does not answer it (named).
    Unexpected(&'static str),
}

impl<R: Serialize> CallLane<R> {
    /// Starts a lane on a stream whose two halves are `send` and `recv`; `first`, the
    /// lane's opening frame, leaves with the first call. Its tasks run on the current
    /// tokio runtime; the writer ends the lane (`shutdown`) once every handle is gone.
    /// `ended` words why the lane ended, given the error that broke it (`None`: it ended
    /// between answers); it is called once, from the reading task.
    pub fn open<W, Rd>(
        send: W,
        recv: Rd,
        first: Vec<u8>,
        ended: impl FnOnce(Option<AnswerError>) -> LaneBroken + Send + 'static,
    ) -> Self
    where
        W: AsyncWrite + Unpin + Send + 'static,
        Rd: AsyncRead + Unpin + Send + 'static,
    {
        let (queue, calls) = mpsc::unbounded_channel();
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        tokio::spawn(write_calls(send, calls, first));
        tokio::spawn(read_answers(recv, waiting.clone(), ended));
        Self { queue, waiting, next: AtomicU32::new(0), _requests: PhantomData }
    }

    /// Sends `request`, answered as a job, and waits for its answer.
    pub async fn job(&self, request: &R) -> Result<JobInfo, LaneFailed> {
        match self.call(request).await? {
            LaneReply::Job(job) => Ok(job),
            LaneReply::Frame(f) => Err(LaneFailed::Unexpected(f.what())),
        }
    }

    /// Sends `request` and waits for its answer.
    pub async fn call(&self, request: &R) -> Result<LaneReply, LaneFailed> {
        let call = self.next.fetch_add(1, Ordering::Relaxed);
        let frame =
            encode(&LaneCall { call, request }).map_err(|e| LaneFailed::Request(e.to_string()))?;
        let (answer, answered) = oneshot::channel();
        {
            let mut waiting = lock(&self.waiting);
            if waiting.broken.is_some() {
                return Err(LaneFailed::Unsent);
            }
            waiting.calls.insert(call, answer);
        }
        if self.queue.send(frame).is_err() {
            lock(&self.waiting).calls.remove(&call);
            return Err(LaneFailed::Unsent);
        }
        match answered.await {
            Ok(r) => r,
            // The reading task ended without answering: only if its runtime is shutting
            // down.
            Err(_) => Err(LaneFailed::Broken(LaneBroken::Lost("shutting down".into()))),
        }
    }

    /// Why the lane ended, once it has.
    pub fn broken(&self) -> Option<LaneBroken> {
        lock(&self.waiting).broken.clone()
    }
}

fn lock(waiting: &Mutex<Waiting>) -> MutexGuard<'_, Waiting> {
    // The map stays whole if a holder panicked.
    waiting.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes the calls posted to `calls`, after the lane's `first` frame: those posted
/// together in one write. Ends the lane once every [`CallLane`] handle is gone.
async fn write_calls<W: AsyncWrite + Unpin>(
    mut send: W,
    mut calls: mpsc::UnboundedReceiver<Vec<u8>>,
    first: Vec<u8>,
) {
    // A failed write breaks the stream: the reader sees it and answers every waiting call.
    if write_lane(&mut send, &mut calls, first).await {
        let _ = send.shutdown().await;
    }
}

/// Hands each answer to its caller; when the lane ends, fails the calls still waiting.
async fn read_answers<Rd: AsyncRead + Unpin>(
    recv: Rd,
    waiting: Arc<Mutex<Waiting>>,
    ended: impl FnOnce(Option<AnswerError>) -> LaneBroken,
) {
    let mut recv = lane_reader(recv);
    let why = loop {
        match read_lane_answer(&mut recv).await {
            Ok(Some((call, answer))) => {
                let caller = lock(&waiting).calls.remove(&call);
                // A caller that gave up has dropped its end; an unknown number is ignored.
                if let Some(caller) = caller {
                    let _ = caller.send(answer.map_err(refused));
                }
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let broken = ended(why);
    let mut waiting = lock(&waiting);
    for (_, caller) in waiting.calls.drain() {
        let _ = caller.send(Err(LaneFailed::Broken(broken.clone())));
    }
    waiting.broken = Some(broken);
}

/// A call's own error on a lane: [`crate::read_lane_answer`] answers only refusals per
/// call (anything else breaks the lane).
fn refused(e: AnswerError) -> LaneFailed {
    match e {
        AnswerError::Refused { status, code, message } => {
            LaneFailed::Refused { status, code, message }
        }
        e => LaneFailed::Broken(LaneBroken::Protocol(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ApiRequest, JobState, LaneAnswer, PeerResponse, encode_append, read_frame};

    fn job(id: &str) -> JobInfo {
        JobInfo {
            id: id.into(),
            owner: "ci".into(),
            kind: "echo".into(),
            state: JobState::Succeeded,
            runner_id: None,
            exit_code: Some(0),
            message: String::new(),
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            output: "hello".into(),
            output_truncated: false,
            output_expired: false,
        }
    }

    /// Answers arrive in any order and each reaches its own caller, a job or one frame; a
    /// refusal is the call's alone; when the other side breaks the lane, the calls still waiting fail
    /// with `ended`'s words and later calls are not sent.
    #[tokio::test]
    async fn answers_reach_their_own_callers_and_a_broken_lane_fails_the_rest() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (recv, send) = tokio::io::split(ours);
        let lane = Arc::new(CallLane::<ApiRequest>::open(
            send,
            recv,
            encode(&ApiRequest::Lane).expect("first"),
            |why| LaneBroken::Protocol(format!("broke: {}", why.is_some())),
        ));
        let get = |id: &str| ApiRequest::GetJob { id: id.into() };
        let calls: Vec<_> = ["a", "b", "c", "d"]
            .into_iter()
            .map(|id| {
                let (lane, req) = (lane.clone(), get(id));
                tokio::spawn(async move { lane.call(&req).await })
            })
            .collect();
        let (mut their_recv, mut their_send) = tokio::io::split(theirs);
        let first = read_frame::<ApiRequest, _>(&mut their_recv).await.expect("read");
        assert_eq!(first, Some(ApiRequest::Lane));
        let mut numbers = HashMap::new();
        for _ in 0..4 {
            let c = read_frame::<LaneCall, _>(&mut their_recv).await.expect("call").expect("one");
            let ApiRequest::GetJob { id } = c.request else { panic!("{:?}", c.request) };
            numbers.insert(id, c.call);
        }
        // "b" answered first, "a" refused, "d" in one frame, "c" never: the lane then breaks.
        let mut out = Vec::new();
        encode_append(&mut out, &LaneAnswer { call: numbers["b"] }).expect("head");
        out.extend_from_slice(&crate::encode_job_answer(job("b").borrowed()).expect("job"));
        encode_append(&mut out, &LaneAnswer { call: numbers["a"] }).expect("head");
        let refusal = PeerResponse::Refused {
            status: 404,
            code: "not_found".into(),
            message: "no such job".into(),
        };
        encode_append(&mut out, &refusal).expect("refusal");
        encode_append(&mut out, &LaneAnswer { call: numbers["d"] }).expect("head");
        encode_append(&mut out, &PeerResponse::Closed(2)).expect("one frame");
        out.extend_from_slice(&[0xff; 9]); // not a frame
        tokio::io::AsyncWriteExt::write_all(&mut their_send, &out).await.expect("write");
        let mut answers = Vec::new();
        for c in calls {
            answers.push(c.await.expect("task"));
        }
        let refused = LaneFailed::Refused {
            status: 404,
            code: "not_found".into(),
            message: "no such job".into(),
        };
        assert_eq!(answers[0], Err(refused));
        assert_eq!(answers[1], Ok(LaneReply::Job(job("b"))));
        let broken = LaneBroken::Protocol("broke: true".into());
        assert_eq!(answers[2], Err(LaneFailed::Broken(broken.clone())));
        assert_eq!(answers[3], Ok(LaneReply::Frame(PeerResponse::Closed(2))));
        assert_eq!(lane.broken(), Some(broken));
        assert_eq!(lane.call(&get("e")).await, Err(LaneFailed::Unsent));
    }
}
