//! Tenants (operator) and the audit log.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, Caller};
use crate::records::{AuditEvent, Role, Tenant, now_unix};
use crate::shared::Shared;

/// Body of `POST /v1/tenants`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateTenant {
    id: String,
}

impl CreateTenant {
    /// The id rule (the fuzz target `api_json` runs exactly this).
    pub(super) fn checked(&self) -> Result<(), ApiError> {
        runnel_certs::identity::validate_segment("tenant id", &self.id)
            .map(drop)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }
}

/// `POST /v1/tenants`.
pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateTenant>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(&[Role::Operator])?;
    body.checked()?;
    let tenant = Tenant { id: body.id, created_at: now_unix() };
    if !shared.registry.create_tenant(&tenant).await? {
        return Err(ApiError::conflict("exists", format!("tenant {:?} already exists", tenant.id)));
    }
    let ev = AuditEvent::now("tenant_created", caller.audit_actor(), None, None, tenant.id.clone());
    shared.registry.audit_best_effort(ev).await;
    Ok((StatusCode::CREATED, Json(json!({ "id": tenant.id, "created_at": tenant.created_at }))))
}

/// `GET /v1/tenants`.
pub(super) async fn list(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Operator])?;
    let tenants = shared.registry.tenants(10_000).await?;
    Ok(Json(json!({ "tenants": tenants })))
}

/// Default and largest page of `GET /v1/audit`.
const AUDIT_PAGE: usize = 100;
const AUDIT_PAGE_MAX: usize = 1000;

/// `GET /v1/audit[?limit=N&before=CURSOR]`: the caller's tenant (admin) or the cluster
/// (operator), newest first; `next_before` is the cursor of the next (older) page, null
/// on the last one.
pub(super) async fn audit(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::response::Response, ApiError> {
    caller.require(&[Role::Operator, Role::Admin])?;
    let limit = match q.get("limit") {
        Some(l) => {
            l.parse::<usize>().ok().filter(|n| (1..=AUDIT_PAGE_MAX).contains(n)).ok_or_else(
                || ApiError::bad_request(format!("limit must be 1..={AUDIT_PAGE_MAX}")),
            )?
        }
        None => AUDIT_PAGE,
    };
    let before = q.get("before").map(String::as_str);
    if before.is_some_and(|c| {
        c.is_empty() || c.len() > 64 || !c.bytes().all(|b| b.is_ascii_digit() || b == b'-')
    }) {
        return Err(ApiError::bad_request("before must be a cursor from next_before"));
    }
    let (events, next) = shared.registry.audit_log(caller.tenant.as_deref(), before, limit).await?;
    let page = json!({ "events": events, "next_before": next });
    shared.http_answers.value(caller.tenant.as_deref(), &page).await
}
