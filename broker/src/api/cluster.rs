//! `GET /v1/cluster` (operator): the nodes of the cluster and the tenants' homes, as etcd
//! sees them now, and what this node itself serves.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{ApiError, Caller};
use crate::records::Role;
use crate::shared::Shared;

/// `GET /v1/cluster`: every live node with its addresses and how much of its lease is
/// left, read from etcd (not from this node's cached view). A single node on redb answers
/// `mode: single` and itself.
pub(super) async fn status(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Operator])?;
    let Some(cluster) = &shared.cluster else {
        return Ok(Json(json!({
            "cluster": shared.config.cluster,
            "mode": "single",
            "this_node": shared.config.node_id,
            "nodes": [{ "id": shared.config.node_id, "quic": shared.advertise }],
        })));
    };
    let nodes = cluster.live_nodes().await?;
    let nodes: Vec<Value> = nodes
        .into_iter()
        .map(|(n, ttl_left)| {
            json!({
                "id": n.id,
                "quic": n.quic,
                "http": n.http,
                "started_at": n.started_at,
                "lease_ttl_left_s": ttl_left.map(|d| d.as_secs()),
            })
        })
        .collect();
    let tenants: Vec<Value> = cluster
        .claims()
        .await?
        .into_iter()
        .map(|(tenant, node, epoch)| json!({ "tenant": tenant, "node": node, "epoch": epoch }))
        .collect();
    let homed_here: Vec<Value> = cluster
        .homed_here()
        .into_iter()
        .map(|(tenant, epoch)| json!({ "tenant": tenant, "epoch": epoch }))
        .collect();
    Ok(Json(json!({
        "cluster": shared.config.cluster,
        "mode": "etcd",
        "tenants": tenants,
        "homed_here": homed_here,
        "this_node": cluster.node_id(),
        "lease_ttl_ms": cluster.ttl().as_millis() as u64,
        "this_lease_age_ms": cluster.lease_age().as_millis() as u64,
        "nodes": nodes,
    })))
}

/// `POST /v1/cluster/rebalance` (operator): moves the tenants whose home is not the
/// rendezvous choice over the live nodes (after nodes joined), draining each on its home.
pub(super) async fn rebalance(
    State(shared): State<Arc<Shared>>,
    State(tenants): State<Arc<crate::actors::Tenants>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Operator])?;
    if shared.cluster.is_none() {
        return Err(ApiError::conflict("not_a_cluster", "a single node has nothing to rebalance"));
    }
    let moved = crate::homed::rebalance(&shared, &tenants).await?;
    let moved: Vec<Value> = moved
        .into_iter()
        .map(|(tenant, from, to, runners)| {
            json!({ "tenant": tenant, "from": from, "to": to, "runners_sent_away": runners })
        })
        .collect();
    Ok(Json(json!({ "moved": moved })))
}
