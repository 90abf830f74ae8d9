//! `runnel-api/1`, the native API on the broker's QUIC endpoint (see
//! `runnel_protocol::ApiRequest`): an API key in the first frame, then a stream per call,
//! many at a time, or many calls on one stream (a lane, one per connection). Every call
//! goes through the same single check sites as the HTTP API: the key through
//! `api::authenticate` (and `api::still_good` on each call, so a key revoked while a
//! connection is open stops working on its next call), the spec through
//! `api::checked_spec`, and the call itself through `homed`, which checks the tenant and
//! owner and forwards to the tenant's home in a cluster.

use std::sync::Arc;
use std::time::Duration;

use runnel_protocol::limits::{ANSWER_BUDGET, LANE_MAX_CALLS};
use runnel_protocol::version::MIN_PROTOCOL_VERSION;
use runnel_protocol::{
    ApiHello, ApiRequest, ApiWelcome, ErrorCode, PROTOCOL_VERSION, PeerResponse, read_frame,
    take_end, write_frame,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::actors::Tenants;
use crate::api::{ApiError, Caller, authenticate, checked_spec, still_good};
use crate::call_lane::{self, Answered, LaneEnd, LaneRules, OneLane};
use crate::deadline::SendDeadline;
use crate::homed::{self, Hop, JobAnswer, Output};
use crate::metrics::{AnswerApi, answers_held, names};
use crate::open_counts::Counted;
use crate::peer::{job_answer, refused, send_output, serve_calls};
use crate::records::Role;
use crate::shared::Shared;

/// Calls one connection may have open at once on streams of their own (each a
/// bidirectional stream). Runner connections get only a few; a client pipelines. Its one
/// lane holds up to `LANE_MAX_CALLS` more, so a connection has at most twice this many
/// calls under way.
pub(crate) const MAX_CALLS: u32 = 256;

/// How long the client has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection's [`ANSWER_BUDGET`], and the `runnel_native_answer_bytes` it adds to.
struct AnswerBudget(tokio::sync::Semaphore);

/// Bytes of the budget one answer holds until dropped.
struct HeldAnswer<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    bytes: u32,
}

impl AnswerBudget {
    fn new() -> Self {
        Self(tokio::sync::Semaphore::new(ANSWER_BUDGET))
    }

    /// Room for an answer of about `bytes` (one larger than the whole budget waits for
    /// all of it).
    async fn acquire(&self, bytes: usize) -> Result<HeldAnswer<'_>, tokio::sync::AcquireError> {
        let bytes = u32::try_from(bytes.min(ANSWER_BUDGET)).unwrap_or(u32::MAX);
        let permit = self.0.acquire_many(bytes).await?;
        answers_held(AnswerApi::Native, i64::from(bytes));
        Ok(HeldAnswer { _permit: permit, bytes })
    }
}

impl Drop for HeldAnswer<'_> {
    fn drop(&mut self) {
        answers_held(AnswerApi::Native, -i64::from(self.bytes));
    }
}

/// Serves one native API connection (its handshake done). `slot`, the connection's
/// intake slot, is given back once the hello is answered.
pub(crate) async fn serve(
    conn: quinn::Connection,
    slot: tokio::sync::OwnedSemaphorePermit,
    shared: Arc<Shared>,
    tenants: Arc<Tenants>,
) {
    let remote = conn.remote_address();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let hello = read_frame::<ApiHello, _>(&mut recv).await.ok()??;
        Some((send, hello))
    })
    .await;
    let Ok(Some((mut send, hello))) = hello else {
        return conn.close(ErrorCode::Protocol.as_u32().into(), b"expected ApiHello");
    };
    let (caller, _counted) = match welcome(&shared, &hello) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%remote, code = e.code, "native API hello refused");
            counted("refused_hello");
            let refusal = ApiWelcome::Refused {
                status: e.status.as_u16(),
                code: e.code.to_owned(),
                message: e.message.clone(),
            };
            let _ = write_frame(&mut send, &refusal).await;
            let _ = send.finish();
            // Give the refusal a moment to arrive before the close overtakes it.
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
            return conn.close(ErrorCode::Unauthenticated.as_u32().into(), b"refused");
        }
    };
    let ok = ApiWelcome::Welcome {
        tenant: caller.tenant.clone(),
        role: caller.role.name().to_owned(),
        max_calls: MAX_CALLS,
    };
    // Its calls are allowed before it hears the welcome: the stream credit then travels
    // with the welcome, and the client's first calls need not wait for it (the endpoint
    // allows an unknown peer one stream: `endpoint::MAX_RUNNER_STREAMS`).
    conn.set_max_concurrent_bi_streams(MAX_CALLS.into());
    if write_frame(&mut send, &ok).await.is_err() || send.finish().is_err() {
        return;
    }
    drop(slot);
    let caller = Arc::new(caller);
    let lane_open = Arc::new(OneLane::default());
    let budget = Arc::new(AnswerBudget::new());
    let ended = serve_calls(&conn, |send, recv| {
        let ctx = (shared.clone(), tenants.clone(), caller.clone(), lane_open.clone());
        call(send, recv, ctx, budget.clone())
    });
    let ended = ended.await;
    tracing::debug!(%remote, error = %ended, "native API connection ended");
}

/// The `call` label values of `runnel_native_calls_total`.
const CALLS: [&str; 8] =
    ["dispatch", "follow", "get", "cancel", "wait", "lane", "refused_hello", "malformed"];

/// One more `call` in `runnel_native_calls_total`; the handles are looked up once, after
/// the recorder is installed (as `metrics::jobs()` does for the job path).
fn counted(call: &'static str) {
    static HANDLES: std::sync::OnceLock<Vec<metrics::Counter>> = std::sync::OnceLock::new();
    let handles = HANDLES.get_or_init(|| {
        CALLS.iter().map(|c| metrics::counter!(names::NATIVE_CALLS, "call" => *c)).collect()
    });
    match CALLS.iter().position(|c| *c == call).and_then(|i| handles.get(i)) {
        Some(c) => c.increment(1),
        None => metrics::counter!(names::NATIVE_CALLS, "call" => call).increment(1),
    }
}

/// One of a tenant's open native API connections (`""` for operator keys), counted
/// against `--native-max-connections-per-tenant` (so one tenant's clients cannot take
/// every connection the broker can hold, nor multiply the answers a connection may hold)
/// and in `runnel_native_connections`, until dropped.
struct TenantConnection {
    _counted: Counted<String>,
}

impl TenantConnection {
    fn open(shared: &Shared, tenant: &str, most: usize) -> Option<Self> {
        let counted = shared.native_connections.open(tenant.to_owned(), most)?;
        metrics::gauge!(names::NATIVE_CONNECTIONS).increment(1.0);
        Some(Self { _counted: counted })
    }
}

impl Drop for TenantConnection {
    fn drop(&mut self) {
        metrics::gauge!(names::NATIVE_CONNECTIONS).decrement(1.0);
    }
}

/// The hello's key, checked as `Authorization: Bearer` is, and the key's tenant within
/// its connection cap. Any version this broker speaks is welcome: the native API's frames
/// are the same in all of them (protocol 3 changed only the runners' job streams), so a
/// client older than the broker, as in a rolling upgrade that does the brokers first,
/// keeps working.
fn welcome(shared: &Shared, hello: &ApiHello) -> Result<(Caller, TenantConnection), ApiError> {
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
        return Err(ApiError::bad_request(format!(
            "native API version {} is not spoken here (this broker: {MIN_PROTOCOL_VERSION} to \
             {PROTOCOL_VERSION})",
            hello.version
        )));
    }
    let caller = authenticate(shared, &hello.key)?;
    if caller.role == Role::Metrics {
        return Err(ApiError::forbidden("a metrics key can only read /metrics"));
    }
    let most = shared.config.native_max_connections_per_tenant;
    let tenant = caller.tenant.as_deref().unwrap_or_default();
    let Some(counted) = TenantConnection::open(shared, tenant, most) else {
        return Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            format!("this tenant has {most} native API connections open, the most it may"),
        )
        .retry_after(1));
    };
    Ok((caller, counted))
}

/// What every call of a connection shares: the broker, the key's caller, and whether the
/// connection's one lane is open.
type CallContext = (Arc<Shared>, Arc<Tenants>, Arc<Caller>, Arc<OneLane>);

async fn call(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    (shared, tenants, caller, lane_open): CallContext,
    budget: Arc<AnswerBudget>,
) {
    let req = match read_frame::<ApiRequest, _>(&mut recv).await {
        // Its calls follow on this stream; a second lane would double what one connection
        // may have under way.
        Ok(Some(ApiRequest::Lane)) => {
            let Some(_taken) = lane_open.take() else {
                tracing::debug!("a second native API lane on one connection refused");
                counted("malformed");
                let _ = send.reset(ErrorCode::BadRequest.as_u32().into());
                return;
            };
            Box::pin(lane(send, recv, &shared, &tenants, &caller)).await;
            return;
        }
        Ok(Some(r)) => {
            // The request is the whole stream; its end came with it.
            take_end(&mut recv);
            r
        }
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(error = %e, "malformed native API request");
            counted("malformed");
            let _ = send.reset(e.code().as_u32().into());
            return;
        }
    };
    let (s, t, c) = (&*shared, &*tenants, &*caller);
    // A client that stops taking the answer has `--api-send-timeout`, then the stream is
    // reset and the answer let go of.
    let mut send = SendDeadline::new(send, s.config.api_send_timeout);
    let written = match req {
        // The rarer call's future is boxed, so that every call's future stays as small as
        // a plain dispatch needs (it is allocated per call).
        ApiRequest::Dispatch { spec, follow: true } => {
            counted("follow");
            match still_good(s, c) {
                Ok(()) => Box::pin(follow(&mut send, s, t, c, spec)).await,
                Err(e) => write_frame(&mut send, &refused(&e)).await.map_err(drop),
            }
        }
        req => {
            let answered = answer(req, s, t, c).await;
            // Encoded (a copy of the job's output) only once the connection's budget has
            // room for it, and held only until quinn has taken it.
            let Ok(_held) = budget.acquire(answer_size(&answered)).await else { return };
            match job_answer(answered) {
                Ok(bytes) => send.write_all(&bytes).await.map_err(drop),
                Err(_) => {
                    drop(send.get_mut().reset(ErrorCode::Internal.as_u32().into()));
                    return;
                }
            }
        }
    };
    let send = send.get_mut();
    match written {
        Ok(()) => drop(send.finish()),
        // Stalled (or the stream already gone): what quinn still holds for it is let go.
        Err(()) => drop(send.reset(ErrorCode::Timeout.as_u32().into())),
    }
}

/// About the bytes [`job_answer`] encodes `answered` into: its output and message, and
/// the rest of a job's view (ids, names, times), which is small.
fn answer_size(answered: &Answered) -> usize {
    const REST: usize = 512;
    match answered {
        Ok(job) => job.with_view(|v| v.output.len() + v.message.len() + REST),
        Err(e) => e.message.len() + REST,
    }
}

/// A call answered once (every call but a followed dispatch), on a stream of its own or
/// on a lane: the job, or why it was refused.
async fn answer(req: ApiRequest, s: &Shared, t: &Tenants, c: &Caller) -> Answered {
    counted(match &req {
        ApiRequest::Dispatch { follow: false, .. } => "dispatch",
        ApiRequest::Dispatch { follow: true, .. } => "follow",
        ApiRequest::GetJob { .. } => "get",
        ApiRequest::CancelJob { .. } => "cancel",
        ApiRequest::WaitJob { .. } => "wait",
        ApiRequest::Lane => "lane",
    });
    still_good(s, c)?;
    match req {
        ApiRequest::Dispatch { spec, follow: false } => {
            homed::dispatch(s, t, c, checked_spec(&s.config, c, spec)?, Hop::Api).await
        }
        ApiRequest::GetJob { id } => homed::get_job(s, c, &id, Hop::Api).await,
        ApiRequest::CancelJob { id } => homed::cancel_job(s, t, c, &id, Hop::Api).await,
        ApiRequest::WaitJob { id } => {
            Box::pin(until_end(None::<&mut quinn::SendStream>, s, c, &id)).await
        }
        ApiRequest::Dispatch { follow: true, .. } | ApiRequest::Lane => {
            Err(ApiError::bad_request("a followed dispatch or a lane needs a stream of its own"))
        }
    }
}

/// A lane ([`ApiRequest::Lane`]): its calls answered as [`answer`] answers them, within
/// [`LANE_MAX_CALLS`] unanswered (`call_lane::serve`).
async fn lane(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    s: &Shared,
    t: &Tenants,
    c: &Caller,
) {
    counted("lane");
    let rules = LaneRules {
        max_calls: LANE_MAX_CALLS,
        send_timeout: s.config.api_send_timeout,
        held: |bytes| answers_held(AnswerApi::Native, bytes),
    };
    let ended = call_lane::serve(send, recv, rules, |req: ApiRequest| answer(req, s, t, c)).await;
    if let LaneEnd::Malformed(_) = ended {
        counted("malformed");
    }
}

/// Follows a job's output until the job ends (sending it on `send` when given), then
/// answers the ended job: its end is known once its output stream ends.
async fn until_end<W: AsyncWrite + Unpin>(
    send: Option<&mut W>,
    s: &Shared,
    c: &Caller,
    id: &str,
) -> Result<JobAnswer, ApiError> {
    relay(send, homed::job_output(s, c, id, Hop::Api).await?).await?;
    homed::get_job(s, c, id, Hop::Api).await
}

/// A followed dispatch: the accepted job, its output live, then the ended job.
async fn follow<W: AsyncWrite + Unpin>(
    send: &mut W,
    s: &Shared,
    t: &Tenants,
    c: &Caller,
    spec: runnel_protocol::DispatchSpec,
) -> Result<(), ()> {
    let spec = match checked_spec(&s.config, c, spec) {
        Ok(spec) => spec,
        Err(e) => return write_frame(send, &refused(&e)).await.map_err(drop),
    };
    let spec = runnel_protocol::DispatchSpec { wait: false, ..spec };
    let mut job = match homed::dispatch(s, t, c, spec, Hop::Api).await {
        Ok(j) => j.into_view(),
        Err(e) => return write_frame(send, &refused(&e)).await.map_err(drop),
    };
    job.output.clear();
    let id = job.id.clone();
    write_frame(send, &PeerResponse::Job(job)).await.map_err(drop)?;
    match until_end(Some(send), s, c, &id).await {
        Ok(end) => {
            let mut end = end.into_view();
            end.output.clear();
            write_frame(send, &PeerResponse::Job(end)).await.map_err(drop)?;
            write_frame(send, &PeerResponse::End).await.map_err(drop)
        }
        Err(e) => write_frame(send, &refused(&e)).await.map_err(drop),
    }
}

/// Follows a job's output until the job ends, sending it on `send` when given (else only
/// waiting). A job on another node is read from there; a gone node has nothing more.
async fn relay<W: AsyncWrite + Unpin>(send: Option<&mut W>, out: Output) -> Result<(), ApiError> {
    let lost = || ApiError::unavailable("the client went away");
    match (out, send) {
        (Output::Here(job), Some(send)) => send_output(send, &job).await.map_err(|()| lost()),
        (Output::Here(job), None) => {
            job.until_over().await;
            Ok(())
        }
        (Output::There(mut answer), mut send) => loop {
            match answer.next().await {
                Ok(PeerResponse::Output(chunk)) => {
                    if let Some(send) = send.as_deref_mut() {
                        write_frame(send, &PeerResponse::Output(chunk))
                            .await
                            .map_err(|_| lost())?;
                    }
                }
                Ok(_) => return Ok(()),
                Err(e) => return Err(ApiError::unavailable(e.to_string())),
            }
        },
        (Output::Nothing, _) => Ok(()),
    }
}
