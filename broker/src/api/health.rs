//! Liveness and readiness.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::ApiError;
use crate::actors::Tenants;
use crate::shared::Shared;

/// `GET /healthz`: the process answers.
pub(super) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: the store answers, the actor tree is up, and (in a cluster) this node's
/// lease is current.
pub(super) async fn readyz(
    State(shared): State<Arc<Shared>>,
    State(tenants): State<Arc<Tenants>>,
) -> Result<Json<Value>, ApiError> {
    if !tenants.started() {
        return Err(ApiError::unavailable("actor tree not started"));
    }
    if shared
        .cluster
        .as_ref()
        .is_some_and(|c| c.draining.load(std::sync::atomic::Ordering::Acquire))
    {
        return Err(ApiError::unavailable("this node is draining"));
    }
    if let Some(c) = shared.cluster.as_ref().filter(|c| !c.lease_valid()) {
        return Err(ApiError::unavailable(format!(
            "this node's etcd lease was last renewed {} ms ago (TTL {} s): not serving tenants",
            c.lease_age().as_millis(),
            c.ttl().as_secs()
        )));
    }
    shared
        .registry
        .store()
        .get("meta/cluster")
        .await
        .map_err(|e| ApiError::unavailable(format!("store: {e}")))?;
    // Anonymous: nothing about tenants or runners (how many there are is not public).
    Ok(Json(json!({ "status": "ready" })))
}

/// `GET /metrics`: Prometheus text format, for a `metrics` key (Prometheus's) or an
/// operator key; anyone else gets 401/403 (the series name tenants).
pub(super) async fn metrics(
    State(shared): State<Arc<Shared>>,
    caller: super::Caller,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    caller.require(&[crate::records::Role::Metrics, crate::records::Role::Operator])?;
    let body = shared.prometheus.as_ref().map(|h| h.render()).unwrap_or_default();
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}
