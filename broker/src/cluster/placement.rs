//! Placement: each tenant has exactly one home node.
//!
//! - The home is chosen by rendezvous hashing over the live nodes (highest
//!   `SHA-256(tenant, node)` wins), so every node computes the same choice and a joining
//!   node takes only tenants that have no home yet.
//! - The chosen node claims it with one txn: create `placement/<tenant>` = its id, on its
//!   own lease, only if absent. The claim's revision is the tenant's **epoch**.
//! - The claim lives as long as the node's lease: a dead node's tenants are free again
//!   after TTL, and the node itself stops serving them at TTL/2 by its own clock (the fence
//!   loop in `broker.rs` stops every tenant actor that is not in [`Cluster::mine`]).

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::membership::{Cluster, NodeRecord};
use crate::store::{Store, StoreError, etcd_error};

/// Where claims live, under the cluster prefix.
pub(crate) const PLACEMENT_PREFIX: &str = "placement/";

/// Where a tenant is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Home {
    /// Here, under the claim of this epoch.
    Here {
        /// The claim's revision.
        epoch: i64,
    },
    /// On another live node.
    There(NodeRecord),
    /// Nowhere right now (why): the home died and its claim has not expired yet, or this
    /// node's lease is not current.
    Nowhere(String),
}

/// Rendezvous score of `node` for `tenant`.
fn score(tenant: &str, node: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(tenant.as_bytes());
    ctx.update(&[0]);
    ctx.update(node.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The node rendezvous hashing picks for `tenant` among `nodes`.
pub(crate) fn rendezvous<'a>(
    tenant: &str,
    nodes: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    nodes.max_by_key(|n| score(tenant, n))
}

impl Cluster {
    /// Where `tenant` is served, claiming it here when this node is the rendezvous choice
    /// and nobody holds it.
    pub(crate) async fn home(&self, tenant: &str) -> Result<Home, StoreError> {
        if !self.lease_valid() {
            return Ok(Home::Nowhere("this node's etcd lease is not current".into()));
        }
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(Home::Nowhere("this node is draining; try again in a moment".into()));
        }
        if self.moving.contains_key(tenant) {
            return Ok(Home::Nowhere("this tenant is moving to a new home; try again".into()));
        }
        if let Some(epoch) = self.mine.get(tenant) {
            return Ok(Home::Here { epoch: *epoch });
        }
        let me = self.node_id();
        if let Some(owner) = self.homes.get(tenant).map(|o| o.clone()) {
            if owner != me {
                return Ok(self.there(tenant, &owner));
            }
            // A claim of ours that `mine` does not hold yet: settle it with etcd below.
        } else {
            let chosen = {
                let ids: Vec<String> = self.nodes.iter().map(|n| n.key().clone()).collect();
                rendezvous(tenant, ids.iter().map(String::as_str)).map(str::to_owned)
            };
            match chosen {
                Some(n) if n != me => return Ok(self.there(tenant, &n)),
                _ => {}
            }
        }
        self.claim(tenant).await
    }

    /// Where `tenant`'s runners are served: as [`Self::home`], except that a draining node
    /// takes the runners of its own tenants until it tells runners to go away. The first
    /// phase of a drain waits for the jobs this node accepted, and a job still waiting for a
    /// runner needs one to reach it here, where the other nodes send it.
    pub(crate) async fn home_for_runner(&self, tenant: &str) -> Result<Home, StoreError> {
        use std::sync::atomic::Ordering::Acquire;
        if self.lease_valid()
            && self.draining.load(Acquire)
            && !self.runners_leaving.load(Acquire)
            && !self.moving.contains_key(tenant)
            && let Some(epoch) = self.mine.get(tenant).map(|e| *e)
        {
            return Ok(Home::Here { epoch });
        }
        self.home(tenant).await
    }

    fn there(&self, tenant: &str, node: &str) -> Home {
        match self.nodes.get(node) {
            Some(n) => Home::There(n.clone()),
            None => Home::Nowhere(format!(
                "the home node {node} of tenant {tenant} is gone; a new home takes over \
                 within {} s",
                self.ttl().as_secs()
            )),
        }
    }

    /// Claims `tenant` for this node on its lease, if nobody holds it; else reports the
    /// holder (which may be this node, from a concurrent claim).
    async fn claim(&self, tenant: &str) -> Result<Home, StoreError> {
        let me = self.node_id();
        let lease = self.lease();
        let key = self.store.etcd_key(&format!("{PLACEMENT_PREFIX}{tenant}"));
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                me.clone().into_bytes(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let started = std::time::Instant::now();
        let resp = self.store.client().kv_client().txn(txn).await.map_err(etcd_error);
        metrics::histogram!(crate::metrics::names::STORE_OP, "op" => "claim")
            .record(started.elapsed().as_secs_f64());
        let resp = resp?;
        if resp.succeeded() {
            let epoch = resp.header().map_or(0, |h| h.revision());
            self.mine.insert(tenant.to_owned(), epoch);
            self.homes.insert(tenant.to_owned(), me);
            metrics::counter!(crate::metrics::names::CLUSTER_PLACEMENTS).increment(1);
            tracing::info!(tenant, epoch, "claimed tenant: this node is its home");
            return Ok(Home::Here { epoch });
        }
        let held = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        let Some(kv) = held else {
            // Released between our compare and our read: the next call claims it.
            return Ok(Home::Nowhere(format!("tenant {tenant} is changing home; try again")));
        };
        let owner = String::from_utf8_lossy(kv.value()).into_owned();
        if owner == me && kv.lease() == lease {
            let epoch = kv.create_revision();
            self.mine.insert(tenant.to_owned(), epoch);
            return Ok(Home::Here { epoch });
        }
        self.homes.insert(tenant.to_owned(), owner.clone());
        Ok(self.there(tenant, &owner))
    }

    /// The tenants this node is home of, with their epochs (sorted by tenant); none while
    /// the lease is not current (as the fence loop is about to find).
    pub(crate) fn homed_here(&self) -> Vec<(String, i64)> {
        if !self.lease_valid() {
            return Vec::new();
        }
        let mut v: Vec<(String, i64)> = self.mine.iter().map(|e| (e.key().clone(), *e)).collect();
        v.sort();
        v
    }

    /// Whether this node is home of `tenant` now.
    pub(crate) fn is_home(&self, tenant: &str) -> bool {
        self.lease_valid() && self.mine.contains_key(tenant)
    }

    /// Drops every claim from `mine` (this node no longer serves any tenant): on fencing.
    pub(crate) fn forget_claims(&self) {
        self.mine.clear();
    }

    /// Applies a watched change under `placement/`. A claim of ours that changed hands or
    /// vanished leaves `mine` at once.
    pub(crate) fn placement_changed(&self, key: &str, value: Option<&[u8]>) {
        let Some(tenant) = key.strip_prefix(PLACEMENT_PREFIX) else { return };
        let me = self.node_id();
        match value {
            Some(v) => {
                let owner = String::from_utf8_lossy(v).into_owned();
                if owner != me {
                    self.mine.remove(tenant);
                }
                self.homes.insert(tenant.to_owned(), owner);
            }
            None => {
                self.homes.remove(tenant);
                if self.mine.remove(tenant).is_some() {
                    tracing::warn!(tenant, "this node's claim on the tenant vanished");
                }
            }
        }
    }

    /// Replaces the view of claims with a fresh scan.
    pub(crate) async fn rescan_placement(&self) -> Result<(), StoreError> {
        let all = self.store.scan_prefix(PLACEMENT_PREFIX, usize::MAX).await?;
        let me = self.node_id();
        self.homes.clear();
        for (key, value) in all {
            if let Some(t) = key.strip_prefix(PLACEMENT_PREFIX) {
                self.homes.insert(t.to_owned(), String::from_utf8_lossy(&value).into_owned());
            }
        }
        self.mine.retain(|t, _| self.homes.get(t).is_some_and(|o| *o == me));
        Ok(())
    }

    /// Whether `epoch` was a claim of `tenant` on `node` (etcd keeps the history until it
    /// compacts it): Some(answer), or None when that revision is compacted away.
    pub(crate) async fn was_claim(&self, tenant: &str, node: &str, epoch: i64) -> Option<bool> {
        let key = self.store.etcd_key(&format!("{PLACEMENT_PREFIX}{tenant}"));
        let options = etcd_client::GetOptions::new().with_revision(epoch);
        match self.store.client().kv_client().get(key, Some(options)).await {
            Ok(resp) => {
                Some(resp.kvs().first().is_some_and(|kv| {
                    kv.create_revision() == epoch && kv.value() == node.as_bytes()
                }))
            }
            Err(e) => {
                tracing::debug!(error = %e, tenant, epoch, "claim history unavailable");
                None
            }
        }
    }

    /// Every claim in etcd now: (tenant, node, epoch), for `cluster status`.
    pub(crate) async fn claims(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let prefix = self.store.etcd_key(PLACEMENT_PREFIX);
        let options = etcd_client::GetOptions::new().with_prefix();
        let resp = self
            .store
            .client()
            .kv_client()
            .get(prefix.clone(), Some(options))
            .await
            .map_err(etcd_error)?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                let tenant = kv.key().get(prefix.len()..).unwrap_or_default();
                let tenant = String::from_utf8_lossy(tenant).into_owned();
                (tenant, String::from_utf8_lossy(kv.value()).into_owned(), kv.create_revision())
            })
            .collect())
    }
}

impl Cluster {
    /// Releases every claim of this node (drain), so that the next home claims at once
    /// instead of waiting out the lease.
    pub(crate) async fn release_claims(&self) {
        let claims: Vec<String> = self.mine.iter().map(|e| e.key().clone()).collect();
        for tenant in claims {
            self.release_claim(&tenant).await;
        }
    }

    /// Releases this node's claim on `tenant`: deleted only while it still names this node.
    pub(crate) async fn release_claim(&self, tenant: &str) {
        let me = self.node_id();
        self.mine.remove(tenant);
        let key = self.store.etcd_key(&format!("{PLACEMENT_PREFIX}{tenant}"));
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, me.into_bytes())])
            .and_then([TxnOp::delete(key, None)]);
        if let Err(e) = self.store.client().kv_client().txn(txn).await {
            tracing::warn!(tenant, error = %e, "releasing a claim failed; it expires with the lease");
        }
    }

    /// The claims whose home is not the rendezvous choice over the live nodes now (after
    /// nodes joined): (tenant, holder, where it should be).
    pub(crate) async fn misplaced(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let ids: Vec<String> = self.nodes.iter().map(|n| n.key().clone()).collect();
        Ok(self
            .claims()
            .await?
            .into_iter()
            .filter_map(|(tenant, holder, _)| {
                let best = rendezvous(&tenant, ids.iter().map(String::as_str))?.to_owned();
                (best != holder).then_some((tenant, holder, best))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_moves_only_the_tenants_of_a_lost_node() {
        let three = ["n1", "n2", "n3"];
        let tenants: Vec<String> = (0..300).map(|i| format!("t{i}")).collect();
        let home3: Vec<&str> =
            tenants.iter().map(|t| rendezvous(t, three.iter().copied()).unwrap_or("")).collect();
        // Every node gets some share.
        for n in three {
            let share = home3.iter().filter(|h| **h == n).count();
            assert!(share > 50, "{n} homes {share} of 300");
        }
        // Without n2, only n2's tenants move.
        let two = ["n1", "n3"];
        for (t, before) in tenants.iter().zip(&home3) {
            let after = rendezvous(t, two.iter().copied()).unwrap_or("");
            if *before != "n2" {
                assert_eq!(after, *before, "{t} moved although its home stayed");
            }
        }
        assert_eq!(rendezvous("t", std::iter::empty()), None);
    }
}
