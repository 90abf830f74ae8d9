//! The in-memory runner index the handshake verifier reads.
//!
//! The verifier runs inside rustls, synchronously, on the endpoint's task: it must never
//! wait on the store. So every runner's pairing state is mirrored here (a DashMap keyed by
//! runner id) and kept in sync with the store: loaded at start, updated by the API on every
//! change, and by the store's watch stream for changes made elsewhere. Presence (live
//! connections, load, last heartbeat) lives here too; it is memory-only by design.
#![cfg_attr(not(feature = "bench-internals"), allow(unreachable_pub))] // `pub` items: see lib.rs `bench_internals`

use std::collections::BTreeMap;

use dashmap::DashMap;

use crate::records::{RunnerRecord, RunnerState};

/// What the index knows of one runner.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IndexEntry {
    /// Tenant.
    pub tenant: String,
    /// Owner.
    pub owner: String,
    /// Admin-set labels.
    pub labels: BTreeMap<String, String>,
    /// Pairing state.
    pub state: RunnerState,
    /// Live connections right now.
    pub connections: u32,
    /// Whether the runner said it is draining.
    pub draining: bool,
    /// Last heartbeat or connect (unix seconds).
    pub last_seen: Option<i64>,
    /// Last reported load (load average × 1000).
    pub load_milli: u32,
    /// Last reported jobs in flight.
    pub in_flight: u32,
    /// Labels the runner advertised in its last Hello (None: not seen since start).
    pub advertised: Option<BTreeMap<String, String>>,
}

/// Why the index refuses a runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IndexRefusal {
    /// No such runner, or it names another tenant/owner than the record.
    Unknown,
    /// Revoked.
    Revoked,
    /// Created but never enrolled (cannot hold a valid cert; treat as unknown).
    Pending,
}

/// The index.
#[derive(Debug, Default)]
pub struct RunnerIndex {
    map: DashMap<String, IndexEntry>,
}

impl RunnerIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or refreshes a runner from its durable record, keeping presence.
    pub fn apply(&self, rec: &RunnerRecord) {
        let mut entry = self.map.entry(rec.id.clone()).or_insert_with(|| IndexEntry {
            tenant: rec.tenant.clone(),
            owner: rec.owner.clone(),
            labels: BTreeMap::new(),
            state: rec.state,
            connections: 0,
            draining: false,
            last_seen: rec.last_seen,
            load_milli: 0,
            in_flight: 0,
            advertised: None,
        });
        // Revocation is final, whatever order updates arrive in.
        if entry.state != RunnerState::Revoked {
            entry.state = rec.state;
        }
        entry.tenant = rec.tenant.clone();
        entry.owner = rec.owner.clone();
        entry.labels = rec.labels.clone();
    }

    /// Marks a runner revoked at once.
    pub(crate) fn revoke(&self, runner_id: &str) {
        if let Some(mut e) = self.map.get_mut(runner_id) {
            e.state = RunnerState::Revoked;
        }
    }

    /// The synchronous check the verifier makes: is this runner paired, for this tenant and
    /// owner?
    pub(crate) fn check(
        &self,
        runner_id: &str,
        tenant: &str,
        owner: &str,
    ) -> Result<(), IndexRefusal> {
        let e = self.map.get(runner_id).ok_or(IndexRefusal::Unknown)?;
        if e.tenant != tenant || e.owner != owner {
            return Err(IndexRefusal::Unknown);
        }
        match e.state {
            RunnerState::Paired => Ok(()),
            RunnerState::Revoked => Err(IndexRefusal::Revoked),
            RunnerState::Pending => Err(IndexRefusal::Pending),
        }
    }

    /// A copy of one entry.
    pub(crate) fn get(&self, runner_id: &str) -> Option<IndexEntry> {
        self.map.get(runner_id).map(|e| e.clone())
    }

    /// Updates presence of a runner.
    pub(crate) fn update_presence(&self, runner_id: &str, f: impl FnOnce(&mut IndexEntry)) {
        if let Some(mut e) = self.map.get_mut(runner_id) {
            f(&mut e);
        }
    }

    /// Whether any paired runner of (tenant, owner) could ever take a job with these needs
    /// (ignoring whether it is online). Used to refuse at once jobs nobody can run.
    pub(crate) fn any_could_match(
        &self,
        tenant: &str,
        owner: &str,
        runner_id: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        let fits = |id: &str, e: &IndexEntry| {
            e.tenant == tenant
                && e.owner == owner
                && e.state == RunnerState::Paired
                && runner_id.is_none_or(|want| want == id)
                && labels.iter().all(|(k, v)| {
                    // Admin labels win over advertised ones. A runner not seen since start
                    // may advertise anything, so only its admin labels can rule it out.
                    match (e.labels.get(k), &e.advertised) {
                        (Some(have), _) => have == v,
                        (None, Some(adv)) => adv.get(k) == Some(v),
                        (None, None) => true,
                    }
                })
        };
        match runner_id {
            Some(id) => self.map.get(id).is_some_and(|e| fits(id, &e)),
            None => self.map.iter().any(|kv| fits(kv.key(), kv.value())),
        }
    }

    /// Number of runners known.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, state: RunnerState) -> RunnerRecord {
        RunnerRecord {
            id: id.into(),
            tenant: "t".into(),
            owner: "o".into(),
            name: id.into(),
            labels: BTreeMap::from([("os".into(), "linux".into())]),
            state,
            created_at: 0,
            enrolled_at: None,
            revoked_at: None,
            cert_serial: None,
            cert_not_after: None,
            last_seen: None,
        }
    }

    #[test]
    fn check_follows_state_and_revocation_is_final() {
        let idx = RunnerIndex::new();
        assert_eq!(idx.check("r1", "t", "o"), Err(IndexRefusal::Unknown));
        idx.apply(&rec("r1", RunnerState::Pending));
        assert_eq!(idx.check("r1", "t", "o"), Err(IndexRefusal::Pending));
        idx.apply(&rec("r1", RunnerState::Paired));
        assert_eq!(idx.check("r1", "t", "o"), Ok(()));
        assert_eq!(idx.check("r1", "other", "o"), Err(IndexRefusal::Unknown));
        assert_eq!(idx.check("r1", "t", "other"), Err(IndexRefusal::Unknown));
        idx.revoke("r1");
        assert_eq!(idx.check("r1", "t", "o"), Err(IndexRefusal::Revoked));
        // A stale "paired" update arriving late does not un-revoke.
        idx.apply(&rec("r1", RunnerState::Paired));
        assert_eq!(idx.check("r1", "t", "o"), Err(IndexRefusal::Revoked));
    }

    #[test]
    fn any_could_match_respects_owner_labels_and_id() {
        let idx = RunnerIndex::new();
        idx.apply(&rec("r1", RunnerState::Paired));
        let linux = BTreeMap::from([("os".to_string(), "linux".to_string())]);
        let mac = BTreeMap::from([("os".to_string(), "mac".to_string())]);
        assert!(idx.any_could_match("t", "o", None, &linux));
        assert!(!idx.any_could_match("t", "o", None, &mac));
        let gpu = BTreeMap::from([("gpu".to_string(), "yes".to_string())]);
        assert!(idx.any_could_match("t", "o", None, &gpu), "never seen: it may advertise gpu");
        idx.update_presence("r1", |e| e.advertised = Some(BTreeMap::new()));
        assert!(!idx.any_could_match("t", "o", None, &gpu), "seen without gpu");
        idx.update_presence("r1", |e| e.advertised = Some(gpu.clone()));
        assert!(idx.any_could_match("t", "o", None, &gpu));
        assert!(!idx.any_could_match("t", "x", None, &linux));
        assert!(idx.any_could_match("t", "o", Some("r1"), &BTreeMap::new()));
        assert!(!idx.any_could_match("t", "o", Some("r2"), &BTreeMap::new()));
        idx.revoke("r1");
        assert!(!idx.any_could_match("t", "o", None, &linux));
    }
}
