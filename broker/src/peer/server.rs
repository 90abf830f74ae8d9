//! The answering side: every call is answered with local work only, on the connection's
//! lane (`runnel-peer/2`) or on a stream of its own (every call of a node of an older
//! build).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use runnel_protocol::{
    ErrorCode, PeerRequest, PeerResponse, encode, encode_job_answer, encode_output, read_frame,
    take_end, write_frame,
};
use tokio_util::sync::CancellationToken;

use super::peer_node;
use crate::actors::Tenants;
use crate::api::{ApiError, Caller};
use crate::call_lane::{self, LaneEnd, LaneRules, OneLane};
use crate::homed::{self, Hop, JobAnswer, Output};
use crate::metrics::{AnswerApi, answers_held};
use crate::shared::Shared;

/// Longest a peer handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest an `OutputSince` waits for output before it is answered with none: a follow
/// whose caller went away (an HTTP client that hung up on a quiet job) frees its place on
/// the lane within this, instead of holding it until the job writes or ends.
pub(crate) const OUTPUT_POLL: Duration = Duration::from_secs(10);

/// Accepts peer connections until `shutdown`.
pub(crate) async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    tenants: Arc<Tenants>,
    shutdown: CancellationToken,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        conns.spawn(connection(incoming, shared.clone(), tenants.clone()));
    }
    conns.abort_all();
}

async fn connection(incoming: quinn::Incoming, shared: Arc<Shared>, tenants: Arc<Tenants>) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "peer handshake failed"),
        Err(_) => return tracing::debug!(%remote, "peer handshake timed out"),
    };
    // The chain was verified in the handshake; the certificate must name a node.
    let Some(node) = peer_node(&conn, shared.ca.cluster()) else {
        tracing::warn!(%remote, "peer connection without a node certificate of this cluster");
        return conn
            .close(ErrorCode::Unauthenticated.as_u32().into(), b"node certificate required");
    };
    let lane_open = Arc::new(OneLane::default());
    let ended = serve_calls(&conn, |send, recv| {
        call(send, recv, (shared.clone(), tenants.clone(), lane_open.clone()))
    });
    let ended = ended.await;
    tracing::debug!(%node, error = %ended, "peer connection ended");
}

/// Answers every bidirectional stream the other side of `conn` opens with `call`, until
/// the connection ends (answered: why); the calls still running end with it. A node's calls
/// and a native API client's are served alike.
///
/// The calls are driven here, in the connection's own task, not a task each: no spawn per
/// call, and answers that come due together (a burst of job results) are written in one
/// turn of this task, so quinn packs them into fewer datagrams. One connection's calls thus
/// share one core; a client that needs more opens more connections.
pub(crate) async fn serve_calls<F, Fut>(conn: &quinn::Connection, call: F) -> quinn::ConnectionError
where
    F: Fn(quinn::SendStream, quinn::RecvStream) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut calls = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                // A call that panicked (a bug) ends alone, as a task of its own would.
                Ok((send, recv)) => calls.push(AssertUnwindSafe(call(send, recv)).catch_unwind()),
                Err(e) => return e,
            },
            Some(_) = calls.next(), if !calls.is_empty() => {}
        }
    }
}

/// A refusal as the API would answer it.
pub(crate) fn refused(e: &ApiError) -> PeerResponse {
    PeerResponse::Refused {
        status: e.status.as_u16(),
        code: e.code.to_owned(),
        message: e.message.clone(),
    }
}

/// A call's answer, before it is encoded: a job (this node's lent from its entry, without
/// a copy of its output; or the home's view) or one frame (`Jobs`, `Closed`, `Online`, or
/// a piece of output: `Output`, `End`).
pub(crate) enum Reply {
    Job(JobAnswer),
    Frame(PeerResponse),
}

impl From<JobAnswer> for Reply {
    fn from(job: JobAnswer) -> Self {
        Reply::Job(job)
    }
}

/// The bytes of a call's answer, on a stream of its own or after its `LaneAnswer` on a
/// lane: a job as [`job_answer`] writes it, one frame, or the refusal.
///
/// The job's view is encoded before anything is awaited, and the call's future keeps only
/// bytes: it lives inside every call's future, which is one allocation per call. Holding
/// the view (and the frame built from it) across the writes had made a native dispatch's
/// call future 1,696 bytes; it is 1,560 now, most of the rest `homed::dispatch`'s. (Both
/// were past glibc's per-thread cache, 1,032 bytes; the broker binary now runs on jemalloc,
/// whose thread caches serve that size: BENCHMARKS.md.)
pub(crate) fn reply_bytes(
    r: Result<Reply, ApiError>,
) -> Result<Vec<u8>, runnel_protocol::FrameError> {
    match r {
        Ok(Reply::Job(job)) => job_answer(Ok::<_, ApiError>(job)),
        Ok(Reply::Frame(frame)) => encode(&frame),
        Err(e) => encode(&refused(&e)),
    }
}

/// A job answer's bytes: the view without output, the output in chunks, the end
/// (`encode_job_answer`); a refusal as `Refused`.
pub(crate) fn job_answer(
    r: Result<impl Into<JobAnswer>, ApiError>,
) -> Result<Vec<u8>, runnel_protocol::FrameError> {
    match r {
        Ok(job) => job.into().with_view(encode_job_answer),
        Err(e) => encode(&refused(&e)),
    }
}

/// Serves one stream of a peer connection: a call, or the connection's lane
/// (`lane_open`: whether it has one).
async fn call(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    (shared, tenants, lane_open): (Arc<Shared>, Arc<Tenants>, Arc<OneLane>),
) {
    let req = match read_frame::<PeerRequest, _>(&mut recv).await {
        Ok(Some(PeerRequest::Lane)) => {
            // One lane per connection, as on the native API.
            let Some(_taken) = lane_open.take() else {
                tracing::warn!("a second lane on one peer connection refused");
                let _ = send.reset(ErrorCode::BadRequest.as_u32().into());
                return;
            };
            let (s, t) = (&*shared, &*tenants);
            let rules = LaneRules {
                max_calls: super::PEER_LANE_CALLS,
                send_timeout: s.config.api_send_timeout,
                held: |bytes| answers_held(AnswerApi::Peer, bytes),
            };
            let lane = call_lane::serve(send, recv, rules, |req| lane_call(req, s, t));
            if let LaneEnd::Malformed(e) = Box::pin(lane).await {
                tracing::warn!(error = %e, "malformed call on a peer lane");
            }
            return;
        }
        Ok(Some(r)) => {
            // The request is the whole stream; its end came with it.
            take_end(&mut recv);
            r
        }
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "malformed peer request");
            let _ = send.reset(e.code().as_u32().into());
            return;
        }
    };
    let (s, t) = (&*shared, &*tenants);
    let _ = match req {
        PeerRequest::JobOutput { caller, id } => {
            let r = match caller_of(caller) {
                Ok(c) => homed::job_output(s, &c, &id, Hop::Peer).await,
                Err(e) => Err(e),
            };
            stream_output(&mut send, r).await
        }
        // Read above: only ever a stream's first frame.
        PeerRequest::Lane => Ok(()),
        req => match reply_bytes(lane_call(req, s, t).await) {
            Ok(bytes) => send.write_all(&bytes).await.map_err(drop),
            Err(_) => Err(()),
        },
    };
    let _ = send.finish();
}

/// The caller a node forwards a call for, checked as the home's own API checks a key's.
fn caller_of(c: runnel_protocol::PeerCaller) -> Result<Caller, ApiError> {
    Caller::from_peer(c).ok_or_else(|| ApiError::bad_request("unknown role in forwarded call"))
}

/// A call answered at once (all but a followed output), on a stream of its own or on the
/// connection's lane; a followed output (`JobOutput`) lasts as long as its job and is
/// refused on a lane (it takes a stream of its own, so that the calls after it are not
/// held up): on a lane, an output is followed piece by piece (`OutputSince`), each piece
/// answered once there is some.
async fn lane_call(req: PeerRequest, s: &Shared, t: &Tenants) -> Result<Reply, ApiError> {
    let as_job = |r: Result<JobAnswer, ApiError>| r.map(Reply::Job);
    match req {
        PeerRequest::Dispatch { caller, spec } => {
            as_job(homed::dispatch(s, t, &caller_of(caller)?, spec, Hop::Peer).await)
        }
        PeerRequest::GetJob { caller, id } => {
            as_job(homed::get_job(s, &caller_of(caller)?, &id, Hop::Peer).await)
        }
        PeerRequest::CancelJob { caller, id } => {
            as_job(homed::cancel_job(s, t, &caller_of(caller)?, &id, Hop::Peer).await)
        }
        PeerRequest::ListJobs { caller, owner, limit, before } => {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let page = crate::jobs::Page { owner, limit, before };
            let jobs = homed::list_jobs(s, &caller_of(caller)?, page, Hop::Peer).await?;
            Ok(Reply::Frame(PeerResponse::Jobs(jobs)))
        }
        PeerRequest::CloseRunner { tenant, runner_id } => {
            let n = homed::close_runner(s, t, &tenant, &runner_id, Hop::Peer).await;
            Ok(Reply::Frame(PeerResponse::Closed(n.unwrap_or(0))))
        }
        PeerRequest::ReleaseTenant { tenant } => {
            let n = homed::release_tenant(s, t, &tenant).await;
            Ok(Reply::Frame(PeerResponse::Closed(n)))
        }
        PeerRequest::RunnersOnline { tenant, runner_ids } => {
            let online = runner_ids
                .into_iter()
                .filter_map(|id| {
                    let e = s.index.get(&id).filter(|e| e.tenant == tenant && e.connections > 0)?;
                    Some((id, if e.draining { "draining" } else { "online" }.to_owned()))
                })
                .collect();
            Ok(Reply::Frame(PeerResponse::Online(online)))
        }
        PeerRequest::OutputSince { caller, id, offset } => {
            let Output::Here(job) =
                homed::job_output(s, &caller_of(caller)?, &id, Hop::Peer).await?
            else {
                return Ok(Reply::Frame(PeerResponse::End));
            };
            let offset = usize::try_from(offset).unwrap_or(usize::MAX);
            let Ok((chunk, _)) = tokio::time::timeout(OUTPUT_POLL, job.next_output(offset)).await
            else {
                // Nothing new: a caller that still follows asks again; one that went away
                // asks no more, and its place on the lane is free.
                return Ok(Reply::Frame(PeerResponse::Output(Vec::new())));
            };
            // Empty only once the job has ended with nothing past `offset`.
            Ok(Reply::Frame(match chunk.is_empty() {
                true => PeerResponse::End,
                false => PeerResponse::Output(chunk),
            }))
        }
        PeerRequest::JobOutput { .. } | PeerRequest::Lane => {
            Err(ApiError::bad_request("a followed output or a lane needs a stream of its own"))
        }
    }
}

/// A job's output, live until it ends, in chunks; then the end.
async fn stream_output(
    send: &mut quinn::SendStream,
    r: Result<Output, ApiError>,
) -> Result<(), ()> {
    match r {
        Ok(Output::Here(job)) => send_output(send, &job).await?,
        Ok(_) => {}
        Err(e) => return write_frame(send, &refused(&e)).await.map_err(drop),
    }
    write_frame(send, &PeerResponse::End).await.map_err(drop)
}

/// This node's job's output, live until the job ends, in [`PeerResponse::Output`] chunks.
pub(crate) async fn send_output<W: tokio::io::AsyncWrite + Unpin>(
    send: &mut W,
    job: &crate::jobs::JobEntry,
) -> Result<(), ()> {
    use tokio::io::AsyncWriteExt;
    let mut offset = 0usize;
    loop {
        let (chunk, finished) = job.next_output(offset).await;
        offset += chunk.len();
        let mut frames = Vec::new();
        encode_output(&mut frames, &chunk).map_err(drop)?;
        send.write_all(&frames).await.map_err(drop)?;
        if finished {
            return Ok(());
        }
    }
}
