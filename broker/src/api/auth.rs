//! `Authorization: Bearer <key>` → [`Caller`]. Keys are checked against salted hashes in
//! constant time; the plaintext is never logged.

use std::sync::Arc;

use axum::extract::FromRef;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::ApiError;
use crate::metrics::names;
use crate::records::{ApiKey, Role, now_unix};
use crate::secret::{KEY_PREFIX, split};
use crate::shared::Shared;

/// Who is calling, from a verified API key.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// Key id (for the audit log and its rate limit).
    pub key_id: Arc<str>,
    /// Role.
    pub role: Role,
    /// Tenant (None for operators).
    pub tenant: Option<String>,
    /// Owner (members only).
    pub owner: Option<String>,
}

impl Caller {
    /// The caller's tenant; operators have none and are refused.
    pub(crate) fn tenant(&self) -> Result<&str, ApiError> {
        self.tenant
            .as_deref()
            .ok_or_else(|| ApiError::forbidden("operator keys are cluster-wide; use a tenant key"))
    }

    /// Refuses unless the caller has one of `roles`.
    pub(crate) fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("a {:?} key cannot do this", self.role).to_lowercase()))
        }
    }

    /// Whether the caller may see things of `owner` (members see only their own).
    pub(crate) fn sees_owner(&self, owner: &str) -> bool {
        match self.role {
            Role::Member => self.owner.as_deref() == Some(owner),
            _ => true,
        }
    }

    /// The caller as a forwarded call carries it to the tenant's home.
    pub(crate) fn to_peer(&self) -> runnel_protocol::PeerCaller {
        runnel_protocol::PeerCaller {
            key_id: self.key_id.to_string(),
            role: self.role.name().to_owned(),
            tenant: self.tenant.clone(),
            owner: self.owner.clone(),
        }
    }

    /// The caller of a forwarded call (the forwarding node, a verified peer, checked the
    /// key); None for a role this build does not know.
    pub(crate) fn from_peer(p: runnel_protocol::PeerCaller) -> Option<Self> {
        let role = Role::from_name(&p.role)?;
        Some(Self { key_id: p.key_id.into(), role, tenant: p.tenant, owner: p.owner })
    }

    /// `actor` string for audit events.
    pub(crate) fn audit_actor(&self) -> String {
        format!("key:{}", self.key_id)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller
where
    Arc<Shared>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let shared = Arc::<Shared>::from_ref(state);
        let shared = &shared;
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <key>"))?;
        let value = header.to_str().map_err(|_| ApiError::unauthorized("invalid API key"))?;
        let presented = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| ApiError::unauthorized("expected Authorization: Bearer <key>"))?;
        let caller = authenticate(shared, presented)?;
        // A scrape key is good for the scrape and nothing else, whatever a handler checks.
        if caller.role == Role::Metrics && parts.uri.path() != "/metrics" {
            return Err(ApiError::forbidden("a metrics key can only read /metrics"));
        }
        Ok(caller)
    }
}

fn failed(key: &str, reason: &'static str) {
    metrics::counter!(names::API_KEY_FAILURES, "key" => key.to_owned(), "reason" => reason)
        .increment(1);
}

/// The one check of a presented API key, for HTTP and the native API alike: well formed,
/// known, the right secret (salted hash, constant time), usable now, within its rate.
pub(crate) fn authenticate(shared: &Shared, presented: &str) -> Result<Caller, ApiError> {
    let Some((id, random)) = split(KEY_PREFIX, presented.trim()) else {
        failed("unknown", "malformed");
        return Err(ApiError::unauthorized("invalid API key"));
    };
    // Read in place, as `still_good` does (no copy of the whole record per request).
    let Some(rec) = shared.keys.get(id) else {
        failed("unknown", "unknown_id");
        return Err(ApiError::unauthorized("invalid API key"));
    };
    // Counted per key id (public, never key material): a wrong secret for a real key
    // is someone guessing, or a leaked id.
    if !rec.secret.verify(random) {
        failed(&rec.id, "bad_secret");
        return Err(ApiError::unauthorized("invalid API key"));
    }
    let key_id: Arc<str> = rec.id.as_str().into();
    usable(shared, &rec, &key_id)?;
    Ok(Caller { key_id, role: rec.role, tenant: rec.tenant.clone(), owner: rec.owner.clone() })
}

/// A caller whose secret was already verified (a native API connection, per call): its key
/// still exists and is usable (not revoked, not expired since), and within its rate.
pub(crate) fn still_good(shared: &Shared, caller: &Caller) -> Result<(), ApiError> {
    // Read in place (no copy of the record per call); `usable` touches no other entry of
    // `keys`, so holding the read guard meanwhile is safe.
    let Some(rec) = shared.keys.get(&*caller.key_id) else {
        failed("unknown", "unknown_id");
        return Err(ApiError::unauthorized("API key revoked"));
    };
    usable(shared, &rec, &caller.key_id)
}

/// `rec`, the record of key `key_id`, is usable now, and the key within its rate.
fn usable(shared: &Shared, rec: &ApiKey, key_id: &Arc<str>) -> Result<(), ApiError> {
    let now = now_unix();
    if let Some(why) = rec.unusable(now) {
        failed(&rec.id, why);
        // The secret was right, so the key's tenant is proven: the refused use goes in
        // its log, counted per window (a script looping on a revoked key must not
        // write one event per request).
        let reason = if why == "revoked" { "revoked key used" } else { "expired key used" };
        shared.refusals.note(rec.tenant.as_deref(), &format!("key:{}", rec.id), reason);
        return Err(ApiError::unauthorized(format!("API key {why}")));
    }
    shared.rate_limits.check_key(key_id)?;
    // Per request: update in place; allocate the key's entry only on its first use.
    match shared.key_last_used.get_mut(&rec.id) {
        Some(mut t) => *t = now,
        None => {
            shared.key_last_used.insert(rec.id.clone(), now);
        }
    }
    Ok(())
}
