//! The calls that need a tenant's home node: dispatch, job get/list/cancel/output, and
//! closing a revoked runner's connection. Each runs here when this node is the home (or
//! holds the job), and is forwarded over `runnel-peer/1` otherwise. The checks (role,
//! owner) run at the home, in one place, whichever node the call arrived at; a call that
//! arrived from a peer is answered here or refused, never forwarded again.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use runnel_protocol::{DispatchSpec, PeerRequest};

use crate::actors::{DispatchRefusal, TenantMsg, Tenants};
use crate::api::{ApiError, Caller};
use crate::cluster::{Home, NodeRecord};
use crate::jobs::{JobEntry, JobInfoRef, JobSpec, JobState, JobTable, JobView, OverBudget, Page};
use crate::peer::{PeerClient, PeerError};
use crate::records::Role;
use crate::shared::{ACTOR_CALL_TIMEOUT, Shared};

/// Longest a `wait` may hold a call open.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(300);

/// Where a call came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hop {
    /// This node's own API: forwarded when another node is the home.
    Api,
    /// Another node: answered here or refused.
    Peer,
}

/// Where a tenant's call runs.
enum Route {
    /// Here; in a cluster with this node's id and the claim's epoch.
    Here(Option<(String, i64)>),
    /// On the home node.
    There(Arc<PeerClient>, NodeRecord),
}

fn not_home(node: &NodeRecord) -> ApiError {
    ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        "not_home",
        format!("this tenant is served by node {} (http://{})", node.id, node.http),
    )
}

async fn tenant_route(shared: &Shared, tenant: &str, hop: Hop) -> Result<Route, ApiError> {
    let Some(cluster) = &shared.cluster else { return Ok(Route::Here(None)) };
    // Boxed: the cluster's future is large, and a single node never builds it.
    match Box::pin(cluster.home(tenant)).await? {
        Home::Here { epoch } => Ok(Route::Here(Some((cluster.node_id(), epoch)))),
        Home::There(node) if hop == Hop::Api => match &shared.peers {
            Some(p) => Ok(Route::There(p.clone(), node)),
            None => Err(not_home(&node)),
        },
        // A peer thought this node was the home: it moved (or is moving).
        Home::There(node) => Err(not_home(&node)),
        Home::Nowhere(why) => Err(ApiError::unavailable(why)),
    }
}

/// Where a job is, from the home its id names.
enum JobRoute {
    Here,
    There(Arc<PeerClient>, NodeRecord),
    /// The node that held it (under that epoch) is gone.
    Lost(String, i64),
}

fn job_route(shared: &Shared, id: &str, hop: Hop) -> JobRoute {
    let (Some(cluster), Some((node, epoch))) = (&shared.cluster, JobTable::home_of(id)) else {
        return JobRoute::Here;
    };
    if node == cluster.node_id() || hop == Hop::Peer {
        return JobRoute::Here;
    }
    match (cluster.nodes.get(node).map(|n| n.clone()), &shared.peers) {
        (Some(n), Some(p)) => JobRoute::There(p.clone(), n),
        (Some(_), None) => JobRoute::Here,
        (None, _) => JobRoute::Lost(node.to_owned(), epoch),
    }
}

/// A forwarded call's failure, as the API answers it.
fn peer_error(e: PeerError) -> ApiError {
    match e {
        PeerError::Refused { status, code, message } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let err = ApiError::new(status, static_code(&code), message);
            // The home's 429s ask for a retry; so does the forwarded answer.
            if status == StatusCode::TOO_MANY_REQUESTS { err.retry_after(1) } else { err }
        }
        e => {
            tracing::warn!(error = %e, "forwarded call failed");
            ApiError::new(StatusCode::BAD_GATEWAY, "home_unreachable", e.to_string())
        }
    }
}

/// The error codes job calls answer, as static strings (a peer's unknown code is
/// `peer_error`).
fn static_code(code: &str) -> &'static str {
    const CODES: &[&str] = &[
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "conflict",
        "no_runner",
        "queue_full",
        "too_many_jobs",
        "over_byte_budget",
        "unavailable",
        "not_home",
        "internal",
        "home_unreachable",
    ];
    CODES.iter().copied().find(|c| *c == code).unwrap_or("peer_error")
}

/// The answer for a job whose node is gone: terminal `node_lost`, never a 404.
fn node_lost(id: &str, node: &str) -> JobView {
    JobView {
        id: id.to_owned(),
        owner: String::new(),
        kind: String::new(),
        state: JobState::NodeLost,
        runner_id: None,
        exit_code: None,
        message: format!(
            "node {node}, which held this job, stopped; the job may or may not have run"
        ),
        created_at_ms: 0,
        started_at_ms: None,
        finished_at_ms: None,
        output: String::new(),
        output_truncated: false,
        output_expired: false,
    }
}

/// A job as a call answers it: this node's entry, or the view the job's home answered.
/// The entry is answered from without a copy of its strings ([`JobAnswer::with_view`]).
pub(crate) enum JobAnswer {
    /// The job is this node's.
    Here(Arc<JobEntry>),
    /// The view another node answered.
    There(JobView),
}

impl JobAnswer {
    /// `f` of the job's view, with its output (borrowed: see [`JobEntry::with_view`]).
    pub(crate) fn with_view<R>(&self, f: impl FnOnce(JobInfoRef<'_>) -> R) -> R {
        match self {
            JobAnswer::Here(job) => job.with_view(true, f),
            JobAnswer::There(view) => f(view.borrowed()),
        }
    }

    /// The job's view, owned.
    pub(crate) fn into_view(self) -> JobView {
        match self {
            JobAnswer::Here(job) => job.view(),
            JobAnswer::There(view) => view,
        }
    }
}

impl From<JobView> for JobAnswer {
    fn from(view: JobView) -> Self {
        JobAnswer::There(view)
    }
}

/// `POST /v1/jobs`: one message to exactly one TenantActor, the caller's, on its home.
pub(crate) async fn dispatch(
    shared: &Shared,
    tenants: &Tenants,
    caller: &Caller,
    spec: DispatchSpec,
    hop: Hop,
) -> Result<JobAnswer, ApiError> {
    caller.require(&[Role::Admin, Role::Dispatcher, Role::Member])?;
    if !caller.sees_owner(&spec.owner) {
        return Err(ApiError::forbidden("a member key dispatches only to its own owner"));
    }
    let tenant = caller.tenant()?;
    let home = match tenant_route(shared, tenant, hop).await? {
        Route::There(peers, node) => {
            let req = PeerRequest::Dispatch { caller: caller.to_peer(), spec };
            forwarded(shared, "dispatch");
            return Box::pin(peers.job(&node, req)).await.map(JobAnswer::There).map_err(peer_error);
        }
        Route::Here(home) => home,
    };
    let actor = tenants.actor(tenant).await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    let wait = spec.wait;
    let spec = JobSpec {
        owner: spec.owner,
        runner_id: spec.runner_id,
        labels: spec.labels,
        kind: spec.kind,
        payload: spec.payload,
        timeout: Duration::from_millis(spec.timeout_ms),
        queue_timeout: Duration::from_millis(spec.queue_timeout_ms),
    };
    let job = shared
        .jobs
        .create(tenant, spec, home.as_ref().map(|(n, e)| (n.as_str(), *e)))
        .map_err(|over| {
            let outcome = match over {
                OverBudget::Unfinished(_) => "too_many_jobs",
                OverBudget::Bytes(_) => "over_byte_budget",
            };
            crate::metrics::dispatch_outcome(outcome);
            let message = match over {
                OverBudget::Unfinished(n) => {
                    format!("the tenant has {n} jobs queued or running (its limit); retry later")
                }
                OverBudget::Bytes(n) => format!(
                    "the tenant's jobs hold its {} MiB budget of payload and output; retry later",
                    n >> 20
                ),
            };
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, outcome, message).retry_after(1)
        })?;
    // One timer for the whole call: the actor's verdict within ACTOR_CALL_TIMEOUT, then
    // (with `wait`) the job's end within the wait's limit. A tokio timer costs a locked
    // insert when first polled and a locked removal when dropped; a reset moves it in one
    // (two timers here were ~2% of a native dispatch's broker CPU: BENCHMARKS.md).
    let limit = tokio::time::sleep(ACTOR_CALL_TIMEOUT);
    tokio::pin!(limit);
    let sent = job.clone();
    let call = actor.call(move |reply| TenantMsg::Dispatch(sent, reply), None);
    tokio::pin!(call);
    let verdict = tokio::select! {
        v = &mut call => v.ok(),
        // Given up only while the dispatch waits in the actor's mailbox; once the actor
        // has taken it, its verdict (the job may be on a runner already) is the answer.
        () = &mut limit => if job.give_up_dispatch() { None } else { call.await.ok() },
    };
    let refusal = match verdict {
        Some(ractor::rpc::CallResult::Success(Ok(()))) => None,
        // Left the table and counted in the actor.
        Some(ractor::rpc::CallResult::Success(Err(r))) => {
            let code = r.code();
            Some(match r {
                DispatchRefusal::QueueFull => ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    code,
                    "the tenant's job queue is full; retry later",
                ),
                DispatchRefusal::NoRunner(m) => ApiError::conflict(code, m),
                DispatchRefusal::UnknownRunner => ApiError::not_found("no such runner"),
            })
        }
        // The actor never took it (or is gone): it leaves the table here.
        _ => {
            let err = ApiError::unavailable("tenant actor did not answer");
            crate::metrics::dispatch_outcome(err.code);
            shared.jobs.discard(&job);
            Some(err)
        }
    };
    if let Some(err) = refusal {
        return Err(err);
    }
    if wait {
        let most =
            (job.spec.queue_timeout + job.spec.timeout + Duration::from_secs(10)).min(MAX_WAIT);
        limit.as_mut().reset(tokio::time::Instant::now() + most);
        tokio::select! {
            () = job.until_over() => {}
            () = &mut limit => {}
        }
    }
    Ok(JobAnswer::Here(job))
}

fn forwarded(_shared: &Shared, kind: &'static str) {
    metrics::counter!(crate::metrics::names::CLUSTER_FORWARDED, "kind" => kind).increment(1);
}

/// A job of this node the caller may see; a job of the caller's tenant that this node held
/// under an older claim (before a restart or failover) is `node_lost`; anything else is a
/// 404.
async fn local_job(
    shared: &Shared,
    caller: &Caller,
    id: &str,
) -> Result<Result<Arc<JobEntry>, JobView>, ApiError> {
    let tenant = caller.tenant()?;
    if let Some(job) = shared.jobs.get(tenant, id).filter(|j| caller.sees_owner(&j.spec.owner)) {
        return Ok(Ok(job));
    }
    if let (Some(cluster), Some((node, epoch))) = (&shared.cluster, JobTable::home_of(id))
        && node == cluster.node_id()
        && cluster.mine.get(tenant).is_none_or(|current| *current != epoch)
    {
        return Box::pin(lost_if_ours(shared, tenant, id, node, epoch)).await.map(Err);
    }
    Err(ApiError::not_found("no such job"))
}

/// `node_lost` for a job id of a node that no longer holds it, if the id's epoch was a
/// claim of the caller's tenant on that node (so another tenant's ids stay 404). When etcd
/// has compacted that history away, the answer is `node_lost` (it reveals nothing: the
/// job cannot be read anywhere).
async fn lost_if_ours(
    shared: &Shared,
    tenant: &str,
    id: &str,
    node: &str,
    epoch: i64,
) -> Result<JobView, ApiError> {
    let ours = match &shared.cluster {
        Some(c) => c.was_claim(tenant, node, epoch).await.unwrap_or(true),
        None => false,
    };
    if ours { Ok(node_lost(id, node)) } else { Err(ApiError::not_found("no such job")) }
}

/// A job whose node (under `epoch`) is gone.
async fn lost(
    shared: &Shared,
    caller: &Caller,
    id: &str,
    node: &str,
    epoch: i64,
) -> Result<JobView, ApiError> {
    Box::pin(lost_if_ours(shared, caller.tenant()?, id, node, epoch)).await
}

/// `GET /v1/jobs/{id}`: this node's job lent from its entry (no copy of its output until
/// it is encoded), or the view its home (or its loss) answered.
pub(crate) async fn get_job(
    shared: &Shared,
    caller: &Caller,
    id: &str,
    hop: Hop,
) -> Result<JobAnswer, ApiError> {
    match job_route(shared, id, hop) {
        JobRoute::Here => Ok(match local_job(shared, caller, id).await? {
            Ok(job) => JobAnswer::Here(job),
            Err(lost) => lost.into(),
        }),
        JobRoute::There(peers, node) => {
            forwarded(shared, "get");
            let req = PeerRequest::GetJob { caller: caller.to_peer(), id: id.to_owned() };
            Box::pin(peers.job(&node, req)).await.map(JobAnswer::There).map_err(peer_error)
        }
        JobRoute::Lost(node, epoch) => {
            Box::pin(lost(shared, caller, id, &node, epoch)).await.map(JobAnswer::There)
        }
    }
}

/// `GET /v1/jobs`: the tenant's jobs on its home, newest first, without output, one page.
pub(crate) async fn list_jobs(
    shared: &Shared,
    caller: &Caller,
    mut page: Page,
    hop: Hop,
) -> Result<Vec<JobView>, ApiError> {
    let tenant = caller.tenant()?;
    if caller.role == Role::Member {
        page.owner.clone_from(&caller.owner);
    }
    match tenant_route(shared, tenant, hop).await? {
        Route::Here(_) => shared.jobs.list(tenant, &page).ok_or_else(|| {
            ApiError::bad_request(
                "the job named by before is gone (retention); list from the start",
            )
        }),
        Route::There(peers, node) => {
            forwarded(shared, "list");
            let req = PeerRequest::ListJobs {
                caller: caller.to_peer(),
                owner: page.owner,
                limit: u32::try_from(page.limit).unwrap_or(u32::MAX),
                before: page.before,
            };
            Box::pin(peers.jobs(&node, req)).await.map_err(peer_error)
        }
    }
}

/// `POST /v1/jobs/{id}/cancel`: idempotent; answers the job as it stands (lent, as
/// [`get_job`] does).
pub(crate) async fn cancel_job(
    shared: &Shared,
    tenants: &Tenants,
    caller: &Caller,
    id: &str,
    hop: Hop,
) -> Result<JobAnswer, ApiError> {
    match job_route(shared, id, hop) {
        JobRoute::Here => {
            let job = match local_job(shared, caller, id).await? {
                Ok(job) => job,
                Err(lost) => return Ok(lost.into()),
            };
            if !job.state().is_terminal() {
                job.cancel();
                if let Some(t) = tenants.get(&job.tenant) {
                    let _ = t.cast(TenantMsg::Cancel(job.id.clone()));
                }
            }
            Ok(JobAnswer::Here(job))
        }
        JobRoute::There(peers, node) => {
            forwarded(shared, "cancel");
            let req = PeerRequest::CancelJob { caller: caller.to_peer(), id: id.to_owned() };
            Box::pin(peers.job(&node, req)).await.map(JobAnswer::There).map_err(peer_error)
        }
        JobRoute::Lost(node, epoch) => {
            Box::pin(lost(shared, caller, id, &node, epoch)).await.map(JobAnswer::There)
        }
    }
}

/// Where a job's output comes from.
pub(crate) enum Output {
    /// This node's job.
    Here(Arc<JobEntry>),
    /// Streamed from the node holding it.
    There(Box<crate::peer::Answer>),
    /// Nothing: the job's node is gone.
    Nothing,
}

/// `GET /v1/jobs/{id}/output`.
pub(crate) async fn job_output(
    shared: &Shared,
    caller: &Caller,
    id: &str,
    hop: Hop,
) -> Result<Output, ApiError> {
    match job_route(shared, id, hop) {
        JobRoute::Here => Ok(match local_job(shared, caller, id).await? {
            Ok(job) => Output::Here(job),
            Err(_) => Output::Nothing,
        }),
        JobRoute::There(peers, node) => {
            forwarded(shared, "output");
            let answer = peers.output(&node, caller.to_peer(), id.to_owned());
            let mut answer = Box::pin(answer).await.map_err(peer_error)?;
            // A refusal (404, 403) comes first, before any output.
            answer.peek().await.map_err(peer_error)?;
            Ok(Output::There(Box::new(answer)))
        }
        JobRoute::Lost(node, epoch) => {
            Box::pin(lost(shared, caller, id, &node, epoch)).await.map(|_| Output::Nothing)
        }
    }
}

/// Closes a revoked runner's live connections on its tenant's home; answers how many
/// (None when the home did not answer).
pub(crate) async fn close_runner(
    shared: &Shared,
    tenants: &Tenants,
    tenant: &str,
    runner: &str,
    hop: Hop,
) -> Option<u32> {
    if let Ok(Route::There(peers, node)) = tenant_route(shared, tenant, hop).await {
        forwarded(shared, "close_runner");
        let req =
            PeerRequest::CloseRunner { tenant: tenant.to_owned(), runner_id: runner.to_owned() };
        return peers
            .closed(&node, req)
            .await
            .map_err(|e| tracing::warn!(error = %e, "remote close failed"))
            .ok();
    }
    // Here, or no home (then nobody holds its connections): close whatever this node has.
    match tenants.get(tenant) {
        Some(t) => match t
            .call(|reply| TenantMsg::Revoke(runner.to_owned(), reply), Some(ACTOR_CALL_TIMEOUT))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(n)) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
            _ => None,
        },
        None => Some(0),
    }
}

/// (rebalance) Hands `tenant` over from this node: no new dispatch or runner for it here,
/// its accepted jobs finish (up to the drain timeout), its runners get `GoAway` (spread over
/// the GoAway window) and leave, then the claim is released so the rendezvous choice claims
/// it on its next call. Answers how many runners were sent away (0 if not homed here).
pub(crate) async fn release_tenant(shared: &Shared, tenants: &Tenants, tenant: &str) -> u32 {
    let Some(cluster) = &shared.cluster else { return 0 };
    if !cluster.is_home(tenant) {
        return 0;
    }
    cluster.moving.insert(tenant.to_owned(), ());
    let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
    let idle = |t: &str| shared.jobs.unfinished(t).is_empty();
    while !idle(tenant) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = u32::try_from(shared.index.connected(Some(tenant))).unwrap_or(u32::MAX);
    if let Some(actor) = tenants.get(tenant) {
        let window_ms = u32::try_from(shared.config.goaway_window.as_millis()).unwrap_or(u32::MAX);
        let _ = actor.cast(TenantMsg::GoAway { window_ms });
    }
    while shared.index.connected(Some(tenant)) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.release_claim(tenant).await;
    cluster.moving.remove(tenant);
    tracing::info!(tenant, runners = sent, "tenant handed over (rebalance)");
    sent
}

/// `POST /v1/cluster/rebalance`: every tenant whose home is not the rendezvous choice over
/// the live nodes (nodes joined since it was claimed) is handed over by its home, one
/// tenant at a time; answers what moved.
pub(crate) async fn rebalance(
    shared: &Shared,
    tenants: &Tenants,
) -> Result<Vec<(String, String, String, u32)>, ApiError> {
    let Some(cluster) = &shared.cluster else { return Ok(Vec::new()) };
    let mut moved = Vec::new();
    for (tenant, holder, to) in cluster.misplaced().await? {
        let sent = if holder == cluster.node_id() {
            release_tenant(shared, tenants, &tenant).await
        } else {
            let (Some(peers), Some(node)) =
                (&shared.peers, cluster.nodes.get(&holder).map(|n| n.clone()))
            else {
                continue;
            };
            forwarded(shared, "release_tenant");
            let req = PeerRequest::ReleaseTenant { tenant: tenant.clone() };
            peers.closed(&node, req).await.map_err(peer_error)?
        };
        moved.push((tenant, holder, to, sent));
    }
    Ok(moved)
}
