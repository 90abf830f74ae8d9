//! The answering side of a lane of calls (`runnel_protocol::CallLane` is the calling side):
//! a native API client's lane (`ApiRequest::Lane`) and a node's (`PeerRequest::Lane`,
//! `runnel-peer/2`). The calls answered at once share one stream; each answer is a
//! `LaneAnswer` naming its call, then the job, the one frame or the refusal, in the order
//! the answers are ready.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use runnel_protocol::limits::LANE_MAX_UNWRITTEN;
use runnel_protocol::{
    ErrorCode, FrameError, LaneAnswer, LaneCall, encode, encode_append, lane_reader, read_frame,
};
use serde::de::DeserializeOwned;
use tokio::io::AsyncWrite;

use crate::api::ApiError;
use crate::deadline::{SendDeadline, is_stalled};
use crate::homed::JobAnswer;
use crate::peer::{Reply, refused, reply_bytes};

/// A call's answer before it is encoded: the job (this node's lent from its entry, without
/// a copy of its output) or why the call was refused.
pub(crate) type Answered = Result<JobAnswer, ApiError>;

/// A connection's one lane: a second, opened while the first is served, is refused (it
/// would double what one connection may have under way).
#[derive(Debug, Default)]
pub(crate) struct OneLane(AtomicBool);

/// The connection's lane, taken until dropped (also when its call panicked).
pub(crate) struct LaneTaken<'a>(&'a AtomicBool);

impl OneLane {
    /// The lane, unless it is taken.
    pub(crate) fn take(&self) -> Option<LaneTaken<'_>> {
        (!self.0.swap(true, Ordering::AcqRel)).then_some(LaneTaken(&self.0))
    }
}

impl Drop for LaneTaken<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// How a lane ended.
pub(crate) enum LaneEnd {
    /// The caller ended it and every call was answered; or the caller or the connection
    /// went away (nothing more can be said to it).
    Done,
    /// A frame that is not a call: the lane is reset with its error code.
    Malformed(FrameError),
    /// An answer that could not be encoded, even as a refusal (a bug): the lane is reset.
    Unanswerable(FrameError),
    /// The caller took none of its answers within the send timeout: the lane is reset
    /// (`Timeout`) and its answers let go of.
    Stalled,
}

/// How a lane is served.
pub(crate) struct LaneRules {
    /// Calls it may have unanswered; past it no more are read until answers have gone
    /// out.
    pub max_calls: usize,
    /// How long the caller may take none of its answers before the lane is reset.
    pub send_timeout: Duration,
    /// Told of the bytes of answers the lane holds for its caller, as they come and go
    /// (`runnel_native_answer_bytes` for a client's lane, `runnel_cluster_peer_answer_bytes`
    /// for a node's).
    pub held: fn(i64),
}

/// Serves a lane: calls of type `R` read from `recv` are answered by `answer` (a job, or
/// one frame: anything that is a [`Reply`]) and written to `send` as they are ready, each
/// a [`LaneAnswer`] and the call's answer. All of it is
/// driven here, in the connection's task: answers that come due together are written
/// together. No more calls are read while `max_calls` are unanswered or
/// [`LANE_MAX_UNWRITTEN`] bytes of answers wait for the caller to read them, so a caller
/// that sends without reading is held back by its own lane; and answers are encoded only
/// while fewer than that wait, so the calls already under way hold their jobs lent, not
/// copies of their output. Ends the stream (finished or reset, as it ended) and answers
/// how it ended.
pub(crate) async fn serve<R, F, Fut, A>(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    rules: LaneRules,
    answer: F,
) -> LaneEnd
where
    R: DeserializeOwned,
    F: Fn(R) -> Fut,
    Fut: Future<Output = Result<A, ApiError>>,
    A: Into<Reply>,
{
    let LaneRules { max_calls, send_timeout, held } = rules;
    let bytes = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let mut send = SendDeadline::new(send, send_timeout);
    let mut calls = Box::pin(futures::stream::unfold(lane_reader(recv), |mut recv| async move {
        let next = read_frame::<LaneCall<R>, _>(&mut recv).await.transpose()?;
        Some((next, recv))
    }));
    let mut running = FuturesUnordered::new();
    // Answered calls waiting for room in `out`.
    let mut ready = std::collections::VecDeque::new();
    // Answers not yet written, from `out[sent..]`.
    let (mut out, mut sent) = (Vec::new(), 0usize);
    let mut reading = true;
    let ended = std::future::poll_fn(|cx| {
        loop {
            let mut moved = false;
            while let Poll::Ready(Some(answered)) = running.poll_next_unpin(cx) {
                ready.push_back(answered);
                moved = true;
            }
            while out.len() - sent < LANE_MAX_UNWRITTEN {
                let Some((call, answered)) = ready.pop_front() else { break };
                let before = out.len();
                if let Err(e) = append(&mut out, call, answered) {
                    return Poll::Ready(LaneEnd::Unanswerable(e));
                }
                held(bytes(out.len() - before));
                moved = true;
            }
            while reading
                && running.len() + ready.len() < max_calls
                && out.len() - sent < LANE_MAX_UNWRITTEN
            {
                match calls.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(LaneCall { call, request }))) => {
                        // A call that panics (a bug) is answered 500; the lane goes on.
                        let answered = AssertUnwindSafe(answer(request)).catch_unwind();
                        running.push(answered.map(move |a| (call, a)));
                        moved = true;
                    }
                    Poll::Ready(Some(Err(FrameError::Io(_)))) => {
                        return Poll::Ready(LaneEnd::Done);
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(LaneEnd::Malformed(e)),
                    Poll::Ready(None) => reading = false,
                    Poll::Pending => break,
                }
            }
            while sent < out.len() {
                match Pin::new(&mut send).poll_write(cx, &out[sent..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        sent += n;
                        held(-bytes(n));
                        moved = true;
                    }
                    Poll::Ready(Err(e)) if is_stalled(&e) => {
                        return Poll::Ready(LaneEnd::Stalled);
                    }
                    Poll::Ready(_) => return Poll::Ready(LaneEnd::Done),
                    Poll::Pending => break,
                }
            }
            if sent == out.len() {
                // Written: keep the buffer for the next answers, unless a large answer
                // grew it.
                if out.capacity() > 64 * 1024 {
                    out = Vec::new();
                }
                out.clear();
                sent = 0;
            }
            if !reading && running.is_empty() && ready.is_empty() && out.is_empty() {
                return Poll::Ready(LaneEnd::Done);
            }
            if !moved {
                return Poll::Pending;
            }
        }
    })
    .await;
    held(-bytes(out.len() - sent));
    let send = send.get_mut();
    match &ended {
        LaneEnd::Done => {
            let _ = send.finish();
        }
        LaneEnd::Stalled => {
            tracing::debug!("a lane's caller took none of its answers in time");
            let _ = send.reset(ErrorCode::Timeout.as_u32().into());
        }
        LaneEnd::Malformed(e) => {
            tracing::debug!(error = %e, "malformed call on a lane");
            let _ = send.reset(e.code().as_u32().into());
        }
        LaneEnd::Unanswerable(e) => {
            tracing::error!(error = %e, "a lane's answer could not be encoded");
            let _ = send.reset(ErrorCode::Internal.as_u32().into());
        }
    }
    ended
}

/// One answer on a lane, appended to `out`: its head, then its bytes (an answer that
/// could not be encoded, or whose call panicked, is answered 500).
fn append<A: Into<Reply>>(
    out: &mut Vec<u8>,
    call: u32,
    answered: std::thread::Result<Result<A, ApiError>>,
) -> Result<(), FrameError> {
    let bytes = match answered.map(|a| reply_bytes(a.map(Into::into))) {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => encode(&refused(&ApiError::internal(e)))?,
        Err(_) => encode(&refused(&ApiError::internal("a lane call panicked")))?,
    };
    encode_append(out, &LaneAnswer { call })?;
    out.extend_from_slice(&bytes);
    Ok(())
}
