//! API keys: shown once, stored as salted hashes; listed without secrets; revoked and
//! expired keys are refused from their next request on. Tenant keys live under
//! `/v1/tenants/{t}/keys` (operator, or that tenant's admin), operator keys under
//! `/v1/operator-keys` (operators; create a new one, then revoke the old: rotation).

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
    /// Seconds until the key stops working (default: never).
    expires_in_secs: Option<u64>,
}

/// Body of `POST /v1/operator-keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateOperatorKey {
    /// `operator` (default) or `metrics` (read-only, `/metrics` only: for Prometheus).
    role: Option<Role>,
    /// Seconds until the key stops working (default: never).
    expires_in_secs: Option<u64>,
}

impl CreateKey {
    /// Everything about the body that needs no state: a per-tenant role, the owner rule,
    /// the expiry (None: never). The fuzz target `api_json` runs exactly this.
    pub(super) fn checked(&self) -> Result<Option<i64>, ApiError> {
        match (self.role, &self.owner) {
            (Role::Operator, _) => {
                return Err(ApiError::bad_request("operator keys are not per tenant"));
            }
            (Role::Metrics, _) => {
                return Err(ApiError::bad_request(
                    "metrics keys are cluster-wide: POST /v1/operator-keys {\"role\": \"metrics\"}",
                ));
            }
            (Role::Member, None) => {
                return Err(ApiError::bad_request("member keys need an owner"));
            }
            (Role::Member, Some(o)) => runnel_certs::identity::validate_segment("owner", o)
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
            (_, Some(_)) => return Err(ApiError::bad_request("only member keys have an owner")),
            (_, None) => {}
        }
        expiry(self.expires_in_secs)
    }
}

impl CreateOperatorKey {
    /// The role (operator or metrics) and the expiry; see [`CreateKey::checked`].
    pub(super) fn checked(&self) -> Result<(Role, Option<i64>), ApiError> {
        let role = match self.role.unwrap_or(Role::Operator) {
            r @ (Role::Operator | Role::Metrics) => r,
            _ => return Err(ApiError::bad_request("a cluster-wide key is operator or metrics")),
        };
        Ok((role, expiry(self.expires_in_secs)?))
    }
}

/// Longest key lifetime asked for at creation (10 years).
const MAX_KEY_LIFETIME_SECS: u64 = 10 * 365 * 86_400;

/// What a key listing shows: never the secret.
fn view(shared: &Shared, k: &ApiKey) -> Value {
    json!({
        "id": k.id,
        "role": k.role,
        "tenant": k.tenant,
        "owner": k.owner,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
        "last_used_at": shared.key_last_used.get(&k.id).map(|t| *t),
    })
}

fn expiry(secs: Option<u64>) -> Result<Option<i64>, ApiError> {
    match secs {
        None => Ok(None),
        Some(0) => Err(ApiError::bad_request("expires_in_secs must be at least 1")),
        Some(s) if s > MAX_KEY_LIFETIME_SECS => {
            Err(ApiError::bad_request("expires_in_secs is over 10 years"))
        }
        Some(s) => Ok(Some(now_unix() + i64::try_from(s).unwrap_or(i64::MAX / 2))),
    }
}

/// Checks that the caller may manage `tenant`'s keys (operator, or that tenant's admin;
/// another tenant's admin gets 404, learning nothing) and that the tenant exists.
async fn manages(shared: &Shared, caller: &Caller, tenant: &str) -> Result<(), ApiError> {
    let allowed = match caller.role {
        Role::Operator => true,
        Role::Admin => caller.tenant.as_deref() == Some(tenant),
        _ => false,
    };
    if !allowed {
        return Err(if caller.role == Role::Admin {
            ApiError::not_found("no such tenant")
        } else {
            ApiError::forbidden("only operators and tenant admins manage keys")
        });
    }
    if shared.registry.tenant(tenant).await?.is_none() {
        return Err(ApiError::not_found("no such tenant"));
    }
    Ok(())
}

/// Mints, stores and caches a key; audits its creation.
async fn mint_key(
    shared: &Shared,
    caller: &Caller,
    role: Role,
    tenant: Option<&str>,
    owner: Option<String>,
    expires_at: Option<i64>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let minted = mint(KEY_PREFIX);
    let rec = ApiKey {
        id: minted.id.clone(),
        role,
        tenant: tenant.map(str::to_owned),
        owner,
        secret: minted.hashed,
        created_at: now_unix(),
        expires_at,
        revoked_at: None,
    };
    shared.registry.put_key(&rec).await?;
    shared.keys.insert(rec.id.clone(), rec.clone());
    let detail = format!("key {} role {:?}", rec.id, rec.role).to_lowercase();
    let ev = AuditEvent::now("key_created", caller.audit_actor(), tenant, None, detail);
    shared.registry.audit_best_effort(ev).await;
    let mut v = view(shared, &rec);
    v["key"] = json!(minted.plaintext);
    Ok((StatusCode::CREATED, Json(v)))
}

/// `POST /v1/tenants/{t}/keys`: operator, or an admin of that same tenant; at most
/// `max_keys_per_tenant` live keys.
pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    manages(&shared, &caller, &tenant).await?;
    let expires_at = body.checked()?;
    let now = now_unix();
    let live = shared
        .keys
        .iter()
        .filter(|k| k.tenant.as_deref() == Some(tenant.as_str()) && k.unusable(now).is_none())
        .count();
    let cap = shared.config.max_keys_per_tenant;
    if live >= cap {
        return Err(ApiError::conflict(
            "too_many_keys",
            format!(
                "tenant {tenant:?} already has {live} live keys (the cap is {cap}); revoke some"
            ),
        ));
    }
    mint_key(&shared, &caller, body.role, Some(&tenant), body.owner, expires_at).await
}

/// `GET /v1/tenants/{t}/keys`: the tenant's keys, newest first, without secrets.
pub(super) async fn list(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    manages(&shared, &caller, &tenant).await?;
    Ok(Json(json!({ "keys": listing(&shared, Some(&tenant)) })))
}

fn listing(shared: &Shared, tenant: Option<&str>) -> Vec<Value> {
    let mut keys: Vec<ApiKey> =
        shared.keys.iter().filter(|k| k.tenant.as_deref() == tenant).map(|k| k.clone()).collect();
    keys.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| a.id.cmp(&b.id)));
    keys.iter().map(|k| view(shared, k)).collect()
}

/// `DELETE /v1/tenants/{t}/keys/{id}`: the key is refused from the next request on.
pub(super) async fn revoke(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    manages(&shared, &caller, &tenant).await?;
    revoke_key(&shared, &caller, Some(&tenant), &id).await
}

/// Marks a key revoked (memory first, then the store) and audits it.
async fn revoke_key(
    shared: &Shared,
    caller: &Caller,
    tenant: Option<&str>,
    id: &str,
) -> Result<Json<Value>, ApiError> {
    let mut rec = match shared.keys.get(id) {
        Some(k) if k.tenant.as_deref() == tenant => k.clone(),
        _ => return Err(ApiError::not_found("no such key")),
    };
    if rec.revoked_at.is_none() {
        rec.revoked_at = Some(now_unix());
        // Memory first: the next request with it is refused whatever the store does.
        shared.keys.insert(rec.id.clone(), rec.clone());
        shared.registry.put_key(&rec).await?;
        let ev = AuditEvent::now(
            "key_revoked",
            caller.audit_actor(),
            tenant,
            None,
            format!("key {}", rec.id),
        );
        shared.registry.audit_best_effort(ev).await;
    }
    Ok(Json(view(shared, &rec)))
}

/// `GET /v1/operator-keys`: operator keys, without secrets.
pub(super) async fn list_operator(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Operator])?;
    Ok(Json(json!({ "keys": listing(&shared, None) })))
}

/// `POST /v1/operator-keys`: a new operator key (rotation: create, switch, revoke the old),
/// or with `"role": "metrics"` a key that can only read `/metrics`.
pub(super) async fn create_operator(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateOperatorKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(&[Role::Operator])?;
    let (role, expires_at) = body.checked()?;
    mint_key(&shared, &caller, role, None, None, expires_at).await
}

/// `DELETE /v1/operator-keys/{id}`: refused for the last usable operator key.
pub(super) async fn revoke_operator(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Operator])?;
    let now = now_unix();
    let others = shared
        .keys
        .iter()
        .filter(|k| k.role == Role::Operator && k.id != id && k.unusable(now).is_none())
        .count();
    if others == 0 && shared.keys.get(&id).is_some_and(|k| k.role == Role::Operator) {
        return Err(ApiError::conflict(
            "last_operator_key",
            "this is the last usable operator key; create another first",
        ));
    }
    revoke_key(&shared, &caller, None, &id).await
}
