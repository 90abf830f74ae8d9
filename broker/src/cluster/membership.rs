//! Membership: each node holds `nodes/<id>` on its own short lease.
//!
//! - [`Cluster::join`] grants the lease and creates the node's key on it, only if no live
//!   node holds that id (a restarted node waits out its predecessor's lease).
//! - [`Cluster::keep_alive`] renews the lease every TTL/4 and remembers, by this process's
//!   own monotonic clock, when the last renewal that etcd acknowledged was *sent*.
//!   [`Cluster::lease_valid`] is false once that is TTL/2 old: from then on the node must
//!   act as if it had already lost its lease (fencing), because etcd may give its tenants
//!   away at TTL, and this node's clock or scheduling may be late (GC pause, SIGSTOP, a
//!   partition from etcd).
//! - When etcd answers that the lease is gone, the node joins again on a new lease.
//! - Every node's view of the others follows the store's watch (`nodes/` keys).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::store::{EtcdStore, StoreError, etcd_error};

/// Where a node's record lives, under the cluster prefix.
pub(crate) const NODES_PREFIX: &str = "nodes/";

/// What a node publishes about itself in `nodes/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NodeRecord {
    /// The node id (`--node-id`).
    pub id: String,
    /// This node's own QUIC address (`--node-advertise`): where runners are redirected.
    pub quic: String,
    /// This node's HTTP API address.
    pub http: String,
    /// This node's `runnel-peer/1` address, where other nodes forward calls.
    pub peer: String,
    /// etcd lease the record lives on.
    pub lease: i64,
    /// When the node started (unix seconds).
    pub started_at: i64,
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// etcd failed or could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another live node holds this id (after waiting out two lease TTLs).
    #[error("node id {0:?} is held by a live node; give each node its own --node-id")]
    IdTaken(String),
}

/// This node's membership, its view of the others, and its placement claims.
pub(crate) struct Cluster {
    pub(super) store: EtcdStore,
    ttl: Duration,
    /// The node's own record, replaced on every re-join (a new lease).
    record: Mutex<NodeRecord>,
    /// Live nodes by id, as the watch last reported them (this node included).
    pub nodes: DashMap<String, NodeRecord>,
    /// When the process started, the zero of `renewed_ms`.
    epoch: Instant,
    /// Milliseconds after `epoch` at which the last acknowledged renewal was sent.
    renewed_ms: AtomicI64,
    /// Which node each tenant's claim names, as the watch last reported it.
    pub(super) homes: DashMap<String, String>,
    /// The tenants this node is home of now, with the epoch of each claim.
    pub(crate) mine: DashMap<String, i64>,
    /// Set when the node drains: it takes no new dispatch or claim, and no runner of a
    /// tenant it is not home of.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// Set when the drain tells runners to go away: from then on it takes no runner at all.
    pub(crate) runners_leaving: std::sync::atomic::AtomicBool,
    /// Tenants being handed to another node (rebalance): no new dispatch or runner here.
    pub(crate) moving: DashMap<String, ()>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.record().id).finish_non_exhaustive()
    }
}

fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}

impl Cluster {
    /// Joins the cluster as `record.id` (its `lease` field is filled in here).
    pub(crate) async fn join(
        store: EtcdStore,
        record: NodeRecord,
        ttl: Duration,
    ) -> Result<Arc<Self>, JoinError> {
        let epoch = Instant::now();
        let record = register(&store, record, ttl).await?;
        let cluster = Arc::new(Self {
            store,
            ttl,
            nodes: DashMap::new(),
            epoch,
            renewed_ms: AtomicI64::new(0),
            record: Mutex::new(record.clone()),
            homes: DashMap::new(),
            mine: DashMap::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
            runners_leaving: std::sync::atomic::AtomicBool::new(false),
            moving: DashMap::new(),
        });
        cluster.nodes.insert(record.id.clone(), record);
        cluster.rescan_nodes().await?;
        cluster.rescan_placement().await?;
        Ok(cluster)
    }

    /// This node's own record (plain data: a poisoned lock still holds a whole record).
    fn record(&self) -> NodeRecord {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// This node's id.
    pub(crate) fn node_id(&self) -> String {
        self.record().id
    }

    /// This node's current lease.
    pub(crate) fn lease(&self) -> i64 {
        self.record().lease
    }

    /// The lease TTL.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long ago the last acknowledged renewal was sent (by this process's clock).
    pub(crate) fn lease_age(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis();
        let renewed = u128::try_from(self.renewed_ms.load(Ordering::Acquire)).unwrap_or(0);
        Duration::from_millis(u64::try_from(now.saturating_sub(renewed)).unwrap_or(u64::MAX))
    }

    /// False once the lease was last renewed TTL/2 ago: the node must stop acting as home.
    pub(crate) fn lease_valid(&self) -> bool {
        self.lease_age() < self.ttl / 2
    }

    /// Every node registered in etcd now, with what is left of its lease (None when etcd
    /// would not say).
    pub(crate) async fn live_nodes(
        &self,
    ) -> Result<Vec<(NodeRecord, Option<Duration>)>, StoreError> {
        use crate::store::Store;
        let all = self.store.scan_prefix(NODES_PREFIX, usize::MAX).await?;
        let mut out = Vec::with_capacity(all.len());
        for (key, value) in all {
            let n: NodeRecord = serde_json::from_slice(&value)
                .map_err(|e| StoreError::Corrupt { key, message: e.to_string() })?;
            let left = self
                .store
                .client()
                .lease_client()
                .time_to_live(n.lease, None)
                .await
                .ok()
                .and_then(|r| u64::try_from(r.ttl()).ok())
                .map(Duration::from_secs);
            out.push((n, left));
        }
        Ok(out)
    }

    /// Replaces the view of live nodes with a fresh scan.
    pub(crate) async fn rescan_nodes(&self) -> Result<(), StoreError> {
        use crate::store::Store;
        let all = self.store.scan_prefix(NODES_PREFIX, usize::MAX).await?;
        let live: Vec<NodeRecord> =
            all.iter().filter_map(|(_, v)| serde_json::from_slice(v).ok()).collect();
        self.nodes.retain(|id, _| live.iter().any(|n| &n.id == id));
        for n in live {
            self.nodes.insert(n.id.clone(), n);
        }
        Ok(())
    }

    /// Applies a watched change under `nodes/`.
    pub(crate) fn node_changed(&self, key: &str, value: Option<&[u8]>) {
        let Some(id) = key.strip_prefix(NODES_PREFIX) else { return };
        match value.map(serde_json::from_slice::<NodeRecord>) {
            Some(Ok(n)) => {
                self.nodes.insert(n.id.clone(), n);
            }
            Some(Err(e)) => tracing::warn!(%key, error = %e, "node record does not decode"),
            None => {
                self.nodes.remove(id);
            }
        }
    }

    /// Renews the lease forever (until aborted): every TTL/4 one keep-alive, whose send
    /// time becomes the renewal time once etcd acknowledges it. A lost lease (etcd says
    /// TTL 0, or it was revoked) is replaced by joining again.
    pub(crate) async fn keep_alive(self: Arc<Self>) {
        let every = self.ttl / 4;
        let mut stream = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let sent = self.epoch.elapsed();
            let lease = self.lease();
            if stream.is_none() {
                match self.store.client().lease_client().keep_alive(lease).await {
                    Ok(s) => stream = Some(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd lease keep-alive: cannot open stream");
                        continue;
                    }
                }
            }
            let Some((keeper, responses)) = stream.as_mut() else { continue };
            let answer = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            match tokio::time::timeout(every.max(Duration::from_millis(500)), answer).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                    let ms = i64::try_from(sent.as_millis()).unwrap_or(i64::MAX);
                    self.renewed_ms.store(ms, Ordering::Release);
                    metrics::gauge!(crate::metrics::names::CLUSTER_LEASE_AGE).set(0.0);
                }
                Ok(Ok(Some(_))) => {
                    tracing::error!(lease, "etcd says this node's lease is gone; joining again");
                    stream = None;
                    // Its claims went with it: stop serving them before anything else (the
                    // fence loop stops every tenant actor that is not in `mine`).
                    self.mine.clear();
                    self.rejoin().await;
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    tracing::warn!(
                        age_ms = self.lease_age().as_millis() as u64,
                        "etcd lease keep-alive failed; retrying"
                    );
                    stream = None;
                }
            }
            metrics::gauge!(crate::metrics::names::CLUSTER_LEASE_AGE)
                .set(self.lease_age().as_secs_f64());
            metrics::gauge!(crate::metrics::names::CLUSTER_NODES).set(self.nodes.len() as f64);
        }
    }

    async fn rejoin(&self) {
        let mut record = self.record();
        record.lease = 0;
        match register(&self.store, record, self.ttl).await {
            Ok(r) => {
                tracing::info!(lease = r.lease, "rejoined the cluster on a new lease");
                self.renewed_ms.store(
                    i64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(i64::MAX),
                    Ordering::Release,
                );
                *self.record.lock().unwrap_or_else(|p| p.into_inner()) = r;
            }
            Err(e) => tracing::warn!(error = %e, "rejoining the cluster failed; will retry"),
        }
    }

    /// Leaves the cluster: revokes the lease, which deletes everything on it at once.
    pub(crate) async fn leave(&self) {
        let lease = self.lease();
        if let Err(e) = self.store.client().lease_client().revoke(lease).await {
            tracing::warn!(error = %e, "revoking the node lease failed; it expires by itself");
        }
    }
}

/// Grants a lease and creates `nodes/<id>` on it if absent. A taken id is retried for one
/// TTL (a restarted node's predecessor may still hold it), then refused.
async fn register(
    store: &EtcdStore,
    mut record: NodeRecord,
    ttl: Duration,
) -> Result<NodeRecord, JoinError> {
    let mut lease_client = store.client().lease_client();
    let key = store.etcd_key(&format!("{NODES_PREFIX}{}", record.id));
    // A node restarted after a crash finds its own old key until the old lease expires. An
    // etcd that was down meanwhile restores every lease with its full TTL, plus its
    // election time, when it comes back: so wait two TTLs before calling the id taken.
    let give_up = Instant::now() + ttl * 2 + Duration::from_secs(2);
    let mut granted_at: Option<Instant> = None;
    loop {
        // Nothing renews the lease while we wait: a fresh one before it could lapse.
        if granted_at.is_none_or(|at| at.elapsed() >= ttl / 2) {
            if granted_at.is_some() {
                let _ = lease_client.revoke(record.lease).await;
            }
            record.lease = lease_client.grant(ttl_secs(ttl), None).await.map_err(etcd_error)?.id();
            granted_at = Some(Instant::now());
        }
        let value = serde_json::to_vec(&record).map_err(|e| StoreError::Engine(e.to_string()))?;
        let txn =
            Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then(
                [TxnOp::put(key.clone(), value, Some(PutOptions::new().with_lease(record.lease)))],
            );
        let resp = store.client().kv_client().txn(txn).await.map_err(etcd_error)?;
        if resp.succeeded() {
            return Ok(record);
        }
        if Instant::now() >= give_up {
            let _ = lease_client.revoke(record.lease).await;
            return Err(JoinError::IdTaken(record.id));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
