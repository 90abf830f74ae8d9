//! Runners: create (one-time token), list, get, revoke.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{ApiError, ApiJson, Caller};
use crate::actors::Tenants;
use crate::homed::Hop;
use crate::records::{AuditEvent, Role, RunnerRecord, RunnerState, TokenRecord, now_unix};
use crate::secret::{TOKEN_PREFIX, mint, new_id};
use crate::shared::Shared;

/// Most labels on one runner or job.
pub(super) const MAX_LABELS: usize = 32;
/// Longest runner name.
pub(super) const MAX_NAME_LEN: usize = 128;
/// Shortest and longest enrollment token lifetime a caller may ask for.
const TOKEN_TTL_RANGE: (u64, u64) = (1, 7 * 24 * 3600);

/// Body of `POST /v1/runners`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateRunner {
    owner: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Token lifetime in seconds (default: the broker's `token-ttl`).
    token_ttl_secs: Option<u64>,
}

impl CreateRunner {
    /// Everything about the body that needs no state: owner, name, labels, and the token
    /// lifetime asked for (None: the broker's default). The fuzz target `api_json` runs
    /// exactly this.
    pub(super) fn checked(&self) -> Result<Option<Duration>, ApiError> {
        runnel_certs::identity::validate_segment("owner", &self.owner)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if self.name.is_empty()
            || self.name.len() > MAX_NAME_LEN
            || self.name.chars().any(char::is_control)
        {
            return Err(ApiError::bad_request(format!(
                "name must be 1-{MAX_NAME_LEN} printable characters"
            )));
        }
        validate_labels(&self.labels)?;
        match self.token_ttl_secs {
            Some(s) if !(TOKEN_TTL_RANGE.0..=TOKEN_TTL_RANGE.1).contains(&s) => {
                Err(ApiError::bad_request("token_ttl_secs must be between 1 and 604800"))
            }
            Some(s) => Ok(Some(Duration::from_secs(s))),
            None => Ok(None),
        }
    }
}

/// Checks a label map (keys and values follow the identity segment rule).
pub(super) fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::bad_request(format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        runnel_certs::identity::validate_segment("label key", k)
            .and_then(|_| runnel_certs::identity::validate_segment("label value", v))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    Ok(())
}

/// How a runner looks through the API.
#[derive(Debug, Serialize)]
pub(super) struct RunnerView {
    id: String,
    owner: String,
    name: String,
    labels: BTreeMap<String, String>,
    /// `pending`, `online`, `offline`, `draining` or `revoked`.
    status: &'static str,
    created_at: i64,
    enrolled_at: Option<i64>,
    revoked_at: Option<i64>,
    last_seen: Option<i64>,
    connections: u32,
    in_flight: u32,
    load: f64,
    cert_not_after: Option<i64>,
}

/// Live status of runners held by another node (the tenant's home), by runner id.
type Remote = std::collections::HashMap<String, String>;

fn view(shared: &Shared, r: RunnerRecord, remote: &Remote) -> RunnerView {
    let live = shared.index.get(&r.id).filter(|e| e.connections > 0);
    let (connections, draining, last_seen, in_flight, load_milli) = match (live, remote.get(&r.id))
    {
        (Some(e), _) => (e.connections, e.draining, e.last_seen, e.in_flight, e.load_milli),
        // Held by the home: it says online or draining (the load figures stay there).
        (None, Some(status)) => (1, status == "draining", r.last_seen, 0, 0),
        (None, None) => (0, false, r.last_seen, 0, 0),
    };
    let status = match r.state {
        RunnerState::Pending => "pending",
        RunnerState::Revoked => "revoked",
        RunnerState::Paired if connections == 0 => "offline",
        RunnerState::Paired if draining => "draining",
        RunnerState::Paired => "online",
    };
    RunnerView {
        id: r.id,
        owner: r.owner,
        name: r.name,
        labels: r.labels,
        status,
        created_at: r.created_at,
        enrolled_at: r.enrolled_at,
        revoked_at: r.revoked_at,
        last_seen: last_seen.or(r.last_seen),
        connections,
        in_flight,
        load: f64::from(load_milli) / 1000.0,
        cert_not_after: r.cert_not_after,
    }
}

/// In a cluster, asks the tenant's home which of `ids` it holds live sessions of (empty
/// when this node is the home, or the home does not answer: then they show as offline).
async fn remote_status(shared: &Shared, tenant: &str, ids: Vec<String>) -> Remote {
    let (Some(cluster), Some(peers)) = (&shared.cluster, &shared.peers) else {
        return Remote::new();
    };
    let Ok(crate::cluster::Home::There(node)) = cluster.home(tenant).await else {
        return Remote::new();
    };
    let req =
        runnel_protocol::PeerRequest::RunnersOnline { tenant: tenant.to_owned(), runner_ids: ids };
    match peers.online(&node, req).await {
        Ok(v) => v.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "live runner status from the home failed");
            Remote::new()
        }
    }
}

/// A runner the caller may see, or 404.
async fn visible(shared: &Shared, caller: &Caller, id: &str) -> Result<RunnerRecord, ApiError> {
    let tenant = caller.tenant()?;
    find(shared, tenant, caller, id).await
}

async fn find(
    shared: &Shared,
    tenant: &str,
    caller: &Caller,
    id: &str,
) -> Result<RunnerRecord, ApiError> {
    match shared.registry.runner(tenant, id).await? {
        Some(r) if caller.sees_owner(&r.owner) => Ok(r),
        _ => Err(ApiError::not_found("no such runner")),
    }
}

/// `POST /v1/runners`: admin creates a runner and gets its one-time enrollment token.
pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateRunner>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(&[Role::Admin])?;
    let tenant = caller.tenant()?.to_owned();
    let ttl = body.checked()?.unwrap_or(shared.config.token_ttl);
    let (have, cap) = (shared.index.unrevoked(&tenant), shared.config.max_runners_per_tenant);
    if have >= cap {
        return Err(ApiError::conflict(
            "too_many_runners",
            format!("the tenant already has {have} runners (the cap is {cap}); revoke some"),
        ));
    }
    let now = now_unix();
    let record = RunnerRecord {
        id: new_id("r"),
        tenant: tenant.clone(),
        owner: body.owner,
        name: body.name,
        labels: body.labels,
        state: RunnerState::Pending,
        created_at: now,
        enrolled_at: None,
        revoked_at: None,
        cert_serial: None,
        cert_not_after: None,
        last_seen: None,
    };
    let minted = mint(TOKEN_PREFIX);
    let expires_at = now + ttl.as_secs() as i64;
    let token = TokenRecord {
        id: minted.id.clone(),
        runner_id: record.id.clone(),
        tenant: tenant.clone(),
        owner: record.owner.clone(),
        secret: minted.hashed,
        expires_at,
        consumed_at: None,
    };
    shared.registry.put_runner(&record).await?;
    shared.registry.put_token(&token).await?;
    shared.index.apply(&record);
    let detail = format!("owner {} name {:?}", record.owner, record.name);
    let ev = AuditEvent::now(
        "runner_created",
        caller.audit_actor(),
        Some(&tenant),
        Some(&record.id),
        detail,
    );
    shared.registry.audit_best_effort(ev).await;
    let enroll_command = format!(
        "runnel-runner enroll --broker {} --ca-fingerprint {} --token {}",
        shared.advertise,
        shared.ca.fingerprint(),
        minted.plaintext
    );
    let expires_rfc3339 = time::OffsetDateTime::from_unix_timestamp(expires_at)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "runner_id": record.id,
            "token": minted.plaintext,
            "expires_at": expires_rfc3339,
            "expires_at_unix": expires_at,
            "enroll_command": enroll_command,
        })),
    ))
}

/// Query of `GET /v1/runners`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    owner: Option<String>,
}

/// `GET /v1/runners[?owner=o]`.
pub(super) async fn list(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<axum::response::Response, ApiError> {
    let tenant = caller.tenant()?;
    let records: Vec<RunnerRecord> = shared
        .registry
        .runners(Some(tenant))
        .await?
        .into_iter()
        .filter(|r| caller.sees_owner(&r.owner) && q.owner.as_ref().is_none_or(|o| *o == r.owner))
        .collect();
    let remote =
        remote_status(&shared, tenant, records.iter().map(|r| r.id.clone()).collect()).await;
    let runners: Vec<RunnerView> = records.into_iter().map(|r| view(&shared, r, &remote)).collect();
    // Unpaged (up to a tenant's runner cap): megabytes for a big fleet.
    shared.http_answers.value(Some(tenant), &json!({ "runners": runners })).await
}

/// `GET /v1/runners/{id}`.
pub(super) async fn get(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RunnerView>, ApiError> {
    let r = visible(&shared, &caller, &id).await?;
    let remote = remote_status(&shared, &r.tenant, vec![r.id.clone()]).await;
    Ok(Json(view(&shared, r, &remote)))
}

/// How often a revocation's store write is tried before the answer says it did not land.
const REVOKE_STORE_TRIES: u32 = 3;
/// Wait before the first retry of that write; doubles each time.
const REVOKE_RETRY_FIRST: Duration = Duration::from_millis(50);

/// `DELETE /v1/runners/{id}`: revoke, failing closed. The index and the live connections
/// go first, so whatever the store does the runner is refused in its next handshake (the
/// index never un-revokes); then the record is written, retried. The answer says whether
/// the revocation reached the store: 200 when it did, 503 when it is in force only in this
/// process (retry the DELETE; it is idempotent).
pub(super) async fn revoke(
    State(shared): State<Arc<Shared>>,
    State(tenants): State<Arc<Tenants>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // The tenant's admin, or an operator (cluster-wide: the runner's tenant comes from the
    // index, and the audit names the operator's key).
    let r = if caller.role == Role::Operator {
        let tenant = shared
            .index
            .get(&id)
            .map(|e| e.tenant)
            .ok_or_else(|| ApiError::not_found("no such runner"))?;
        find(&shared, &tenant, &caller, &id).await?
    } else {
        let r = visible(&shared, &caller, &id).await?;
        caller.require(&[Role::Admin])?;
        r
    };
    shared.index.revoke(&id);
    // On the tenant's home, wherever that is (forwarded in a cluster).
    let closed = crate::homed::close_runner(&shared, &tenants, &r.tenant, &id, Hop::Api).await;
    let now = now_unix();
    let mut stored = None;
    let mut wait = REVOKE_RETRY_FIRST;
    for attempt in 1..=REVOKE_STORE_TRIES {
        let write = shared
            .registry
            .update_runner(&r.tenant, &id, |rec| {
                if rec.state == RunnerState::Revoked {
                    return false;
                }
                rec.state = RunnerState::Revoked;
                rec.revoked_at = Some(now);
                true
            })
            .await;
        match write {
            Ok(newly) => {
                stored = Some(newly.is_some());
                break;
            }
            Err(e) => {
                tracing::warn!(runner = %id, attempt, error = %e, "revocation store write failed");
                if attempt < REVOKE_STORE_TRIES {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }
    if stored == Some(true) {
        metrics::counter!(crate::metrics::names::REVOCATIONS).increment(1);
    }
    let n = closed.unwrap_or(0);
    metrics::counter!(crate::metrics::names::REVOCATION_CLOSED).increment(n as u64);
    let detail = format!(
        "{n} live connection(s) closed{}{}",
        if closed.is_none() { "; tenant actor did not answer" } else { "" },
        if stored.is_none() { "; not stored" } else { "" }
    );
    let ev = AuditEvent::now("revoked", caller.audit_actor(), Some(&r.tenant), Some(&id), detail);
    shared.registry.audit_best_effort(ev).await;
    tracing::info!(tenant = %r.tenant, runner = %id, closed = n, stored = stored.is_some(), "runner revoked");
    match (closed, stored) {
        (Some(n), Some(_)) => {
            Ok(Json(json!({ "revoked": true, "stored": true, "connections_closed": n })))
        }
        (Some(n), None) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "revocation_not_stored",
            format!(
                "the runner is revoked in this broker and {n} live connection(s) were closed, \
                 but the store write failed {REVOKE_STORE_TRIES} times; retry to make it durable"
            ),
        )),
        (None, _) => Err(ApiError::unavailable(
            "tenant actor did not answer; the runner is refused in new handshakes but may \
             still be connected; retry",
        )),
    }
}
