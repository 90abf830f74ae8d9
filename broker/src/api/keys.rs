//! API keys: shown once, stored as salted hashes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiJson, Caller};
use crate::records::{ApiKey, AuditEvent, Role, now_unix};
use crate::secret::{KEY_PREFIX, mint};
use crate::shared::Shared;

/// Body of `POST /v1/tenants/{t}/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateKey {
    role: Role,
    owner: Option<String>,
}

/// `POST /v1/tenants/{t}/keys`: operator, or an admin of that same tenant.
pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let allowed = match caller.role {
        Role::Operator => true,
        Role::Admin => caller.tenant.as_deref() == Some(tenant.as_str()),
        _ => false,
    };
    if !allowed {
        // Another tenant's admin learns nothing about whether `tenant` exists.
        return Err(if caller.role == Role::Admin {
            ApiError::not_found("no such tenant")
        } else {
            ApiError::forbidden("only operators and tenant admins create keys")
        });
    }
    if shared.registry.tenant(&tenant).await?.is_none() {
        return Err(ApiError::not_found("no such tenant"));
    }
    match (body.role, &body.owner) {
        (Role::Operator, _) => {
            return Err(ApiError::bad_request("operator keys are not per tenant"));
        }
        (Role::Member, None) => return Err(ApiError::bad_request("member keys need an owner")),
        (Role::Member, Some(o)) => runnel_certs::identity::validate_segment("owner", o)
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        (_, Some(_)) => return Err(ApiError::bad_request("only member keys have an owner")),
        (_, None) => {}
    }
    let minted = mint(KEY_PREFIX);
    let rec = ApiKey {
        id: minted.id.clone(),
        role: body.role,
        tenant: Some(tenant.clone()),
        owner: body.owner.clone(),
        secret: minted.hashed,
        created_at: now_unix(),
    };
    shared.registry.put_key(&rec).await?;
    shared.keys.insert(rec.id.clone(), rec.clone());
    let detail = format!("key {} role {:?}", rec.id, rec.role).to_lowercase();
    let ev = AuditEvent::now("key_created", caller.audit_actor(), Some(&tenant), None, detail);
    shared.registry.audit_best_effort(ev).await;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "key": minted.plaintext,
            "id": rec.id,
            "role": rec.role,
            "tenant": tenant,
            "owner": rec.owner,
        })),
    ))
}
