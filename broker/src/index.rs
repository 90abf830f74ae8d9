//! The in-memory runner index the handshake verifier reads.
//!
//! The verifier runs inside rustls, synchronously, on the endpoint's task: it must never
//! wait on the store. So every runner's pairing state is mirrored here (a DashMap keyed by
//! runner id) and kept in sync with the store: loaded at start, updated by the API on every
//! change, and by the store's watch stream for changes made elsewhere. Presence (live
//! connections, load, last heartbeat) lives here too; it is memory-only by design.
#![cfg_attr(not(feature = "bench-internals"), allow(unreachable_pub))] // `pub` items: see lib.rs `bench_internals`

use std::collections::{BTreeMap, BTreeSet};

use dashmap::DashMap;

use crate::dispatch::Needs;
use crate::records::{RunnerRecord, RunnerState};

/// What a runner said of itself in its last Hello.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Advertised {
    /// Its own labels (admin-set labels win over these).
    pub labels: BTreeMap<String, String>,
    /// The job kinds it has handlers for.
    pub kinds: Vec<String>,
}

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
    /// Serial (hex) of the runner's one current certificate: the verifier accepts no other,
    /// so a renewal retires the previous certificate at once.
    pub cert_serial: Option<String>,
    /// SHA-256 of that certificate's DER, once this broker has issued it or verified its
    /// chain to the CA (memory only): a handshake presenting exactly these bytes skips the
    /// chain's signature check (see `PairingVerifier::decide`).
    pub cert_digest: Option<[u8; 32]>,
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
    /// What the runner advertised in its last Hello (None: not seen since this broker
    /// started, so it may advertise anything).
    pub advertised: Option<Advertised>,
}

impl IndexEntry {
    /// Whether this runner could ever take a job with `needs`, online or not: paired, the
    /// right owner and id, and its labels and kinds fit. Admin labels win over advertised
    /// ones; a runner not seen since start may advertise anything, so only its admin labels
    /// can rule it out, while one that said Hello is judged by what it advertised.
    fn could_take(&self, id: &str, needs: &Needs<'_>) -> bool {
        self.owner == needs.owner
            && self.state == RunnerState::Paired
            && needs.runner_id.is_none_or(|want| want == id)
            && needs.labels.iter().all(|(k, v)| match (self.labels.get(k), &self.advertised) {
                (Some(have), _) => have == v,
                (None, Some(adv)) => adv.labels.get(k) == Some(v),
                (None, None) => true,
            })
            && self.advertised.as_ref().is_none_or(|adv| adv.kinds.iter().any(|k| k == needs.kind))
    }
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
    /// A certificate of this runner, but not its current one (retired by a renewal).
    Retired,
}

/// The index.
#[derive(Debug, Default)]
pub struct RunnerIndex {
    map: DashMap<String, IndexEntry>,
    /// Runner ids by (tenant, owner), so a question about one owner never walks the whole
    /// cluster's runners. Runners are never removed (revoked ones stay, marked).
    by_owner: DashMap<(String, String), BTreeSet<String>>,
    /// Unrevoked runners (pending or enrolled) per tenant: the quota check on every runner
    /// created reads it, where it had counted the whole cluster's runners each time.
    unrevoked: DashMap<String, usize>,
}

impl RunnerIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or refreshes a runner from its durable record, keeping presence.
    pub fn apply(&self, rec: &RunnerRecord) {
        let (mut entry, counted_before) = match self.map.entry(rec.id.clone()) {
            dashmap::Entry::Occupied(o) => {
                let entry = o.into_ref();
                let counted = (entry.state != RunnerState::Revoked).then(|| entry.tenant.clone());
                (entry, counted)
            }
            dashmap::Entry::Vacant(v) => {
                let entry = v.insert(IndexEntry {
                    tenant: rec.tenant.clone(),
                    owner: rec.owner.clone(),
                    labels: BTreeMap::new(),
                    state: rec.state,
                    cert_serial: None,
                    cert_digest: None,
                    connections: 0,
                    draining: false,
                    last_seen: rec.last_seen,
                    load_milli: 0,
                    in_flight: 0,
                    advertised: None,
                });
                (entry, None)
            }
        };
        // Revocation is final, whatever order updates arrive in.
        if entry.state != RunnerState::Revoked {
            entry.state = rec.state;
        }
        let counted_after = entry.state != RunnerState::Revoked;
        let moved = (entry.tenant != rec.tenant || entry.owner != rec.owner)
            .then(|| (entry.tenant.clone(), entry.owner.clone()));
        entry.tenant = rec.tenant.clone();
        entry.owner = rec.owner.clone();
        entry.labels = rec.labels.clone();
        if rec.cert_serial.is_some() && rec.cert_serial != entry.cert_serial {
            entry.cert_serial = rec.cert_serial.clone();
            entry.cert_digest = None;
        }
        // Never hold a lock of one map while taking the other's (any_could_match holds
        // `by_owner` while it reads `map`).
        drop(entry);
        // Worked out under the entry's lock, so each change is counted once however
        // updates race; applied after it (never one map's lock while taking another's).
        let counted_after = counted_after.then_some(rec.tenant.as_str());
        if counted_before.as_deref() != counted_after {
            if let Some(tenant) = counted_before {
                self.count(&tenant, -1);
            }
            if let Some(tenant) = counted_after {
                self.count(tenant, 1);
            }
        }
        if let Some(mut ids) = moved.and_then(|old| self.by_owner.get_mut(&old)) {
            ids.remove(&rec.id);
        }
        self.by_owner
            .entry((rec.tenant.clone(), rec.owner.clone()))
            .or_default()
            .insert(rec.id.clone());
    }

    /// Marks a runner revoked at once.
    pub(crate) fn revoke(&self, runner_id: &str) {
        let Some(mut e) = self.map.get_mut(runner_id) else { return };
        if e.state == RunnerState::Revoked {
            return;
        }
        e.state = RunnerState::Revoked;
        let tenant = e.tenant.clone();
        drop(e);
        self.count(&tenant, -1);
    }

    /// Moves `tenant`'s unrevoked count by `delta` (the name copied only the first time).
    fn count(&self, tenant: &str, delta: isize) {
        match self.unrevoked.get_mut(tenant) {
            Some(mut n) => *n = n.saturating_add_signed(delta),
            None => {
                let mut n = self.unrevoked.entry(tenant.to_owned()).or_default();
                *n = n.saturating_add_signed(delta);
            }
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

    /// [`Self::check`] for a presented certificate: also refuses any serial but the
    /// runner's current one.
    pub(crate) fn check_cert(
        &self,
        runner_id: &str,
        tenant: &str,
        owner: &str,
        serial_hex: &str,
    ) -> Result<(), IndexRefusal> {
        self.check(runner_id, tenant, owner)?;
        let current =
            self.map.get(runner_id).is_some_and(|e| e.cert_serial.as_deref() == Some(serial_hex));
        if current { Ok(()) } else { Err(IndexRefusal::Retired) }
    }

    /// Whether `digest` is the SHA-256 of the runner's current certificate as this broker
    /// issued it or verified it: bytes it has already seen chain to the CA.
    pub(crate) fn is_known_cert(&self, runner_id: &str, digest: &[u8; 32]) -> bool {
        self.map.get(runner_id).is_some_and(|e| e.cert_digest.as_ref() == Some(digest))
    }

    /// Records the bytes of the runner's current certificate `serial_hex`, whose chain was
    /// just verified; nothing if the runner's current certificate is another by now.
    pub(crate) fn remember_cert(&self, runner_id: &str, serial_hex: &str, digest: [u8; 32]) {
        if let Some(mut e) = self.map.get_mut(runner_id)
            && e.cert_serial.as_deref() == Some(serial_hex)
        {
            e.cert_digest = Some(digest);
        }
    }

    /// Makes the certificate this broker just issued (and stored) the runner's current one:
    /// the verifier accepts no other, and knows these bytes.
    pub(crate) fn set_current_cert(&self, runner_id: &str, serial_hex: &str, digest: [u8; 32]) {
        if let Some(mut e) = self.map.get_mut(runner_id) {
            e.cert_serial = Some(serial_hex.to_owned());
            e.cert_digest = Some(digest);
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
    /// (whether or not it is online; see [`IndexEntry::could_take`]). Used to refuse at once
    /// jobs nobody can run. Looks only at that owner's runners.
    pub(crate) fn any_could_match(&self, tenant: &str, needs: &Needs<'_>) -> bool {
        let fits = |id: &str| {
            self.map.get(id).is_some_and(|e| e.tenant == tenant && e.could_take(id, needs))
        };
        match needs.runner_id {
            Some(id) => fits(id),
            None => self
                .by_owner
                .get(&(tenant.to_owned(), needs.owner.to_owned()))
                .is_some_and(|ids| ids.iter().any(|id| fits(id))),
        }
    }

    /// Runners of `tenant` that are not revoked (pending or enrolled): its quota count.
    pub(crate) fn unrevoked(&self, tenant: &str) -> usize {
        self.unrevoked.get(tenant).map_or(0, |n| *n)
    }

    /// Number of runners with a live session on this node (of `tenant` only, if given).
    pub(crate) fn connected(&self, tenant: Option<&str>) -> usize {
        self.map
            .iter()
            .filter(|e| e.connections > 0 && tenant.is_none_or(|t| t == e.tenant))
            .count()
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

    fn needs<'a>(
        owner: &'a str,
        runner_id: Option<&'a str>,
        labels: &'a BTreeMap<String, String>,
        kind: &'a str,
    ) -> Needs<'a> {
        Needs { owner, runner_id, labels, kind }
    }

    fn advertise(labels: BTreeMap<String, String>, kinds: &[&str]) -> Option<Advertised> {
        Some(Advertised { labels, kinds: kinds.iter().map(|k| k.to_string()).collect() })
    }

    #[test]
    fn any_could_match_respects_owner_labels_and_id() {
        let idx = RunnerIndex::new();
        idx.apply(&rec("r1", RunnerState::Paired));
        let none = BTreeMap::new();
        let linux = BTreeMap::from([("os".to_string(), "linux".to_string())]);
        let mac = BTreeMap::from([("os".to_string(), "mac".to_string())]);
        assert!(idx.any_could_match("t", &needs("o", None, &linux, "exec")));
        assert!(!idx.any_could_match("t", &needs("o", None, &mac, "exec")));
        let gpu = BTreeMap::from([("gpu".to_string(), "yes".to_string())]);
        assert!(
            idx.any_could_match("t", &needs("o", None, &gpu, "exec")),
            "never seen: it may advertise gpu"
        );
        idx.update_presence("r1", |e| e.advertised = advertise(BTreeMap::new(), &["exec"]));
        assert!(!idx.any_could_match("t", &needs("o", None, &gpu, "exec")), "seen without gpu");
        idx.update_presence("r1", |e| e.advertised = advertise(gpu.clone(), &["exec"]));
        assert!(idx.any_could_match("t", &needs("o", None, &gpu, "exec")));
        assert!(!idx.any_could_match("t", &needs("x", None, &linux, "exec")));
        assert!(!idx.any_could_match("other", &needs("o", None, &linux, "exec")));
        assert!(idx.any_could_match("t", &needs("o", Some("r1"), &none, "exec")));
        assert!(!idx.any_could_match("t", &needs("o", Some("r2"), &none, "exec")));
        assert!(!idx.any_could_match("other", &needs("o", Some("r1"), &none, "exec")));
        idx.revoke("r1");
        assert!(!idx.any_could_match("t", &needs("o", None, &linux, "exec")));
    }

    #[test]
    fn only_the_current_certificates_bytes_are_known() {
        let idx = RunnerIndex::new();
        let mut r = rec("r1", RunnerState::Paired);
        r.cert_serial = Some("aa".into());
        idx.apply(&r);
        assert!(!idx.is_known_cert("r1", &[1; 32]), "nothing verified yet");
        // A digest for a serial that is not the current one is not remembered.
        idx.remember_cert("r1", "bb", [1; 32]);
        assert!(!idx.is_known_cert("r1", &[1; 32]));
        idx.remember_cert("r1", "aa", [1; 32]);
        assert!(idx.is_known_cert("r1", &[1; 32]));
        assert!(!idx.is_known_cert("r1", &[3; 32]), "other bytes");
        assert!(!idx.is_known_cert("r2", &[1; 32]), "another runner");
        // The same record again (a store watch echo) keeps what is known.
        idx.apply(&r);
        assert!(idx.is_known_cert("r1", &[1; 32]));
        // A renewal stored elsewhere (another serial in the record) forgets the bytes.
        r.cert_serial = Some("cc".into());
        idx.apply(&r);
        assert!(!idx.is_known_cert("r1", &[1; 32]));
        // A renewal issued here knows its new bytes at once.
        idx.set_current_cert("r1", "dd", [4; 32]);
        assert!(idx.is_known_cert("r1", &[4; 32]));
        assert!(!idx.is_known_cert("r1", &[1; 32]));
    }

    #[test]
    fn only_the_current_certificate_serial_passes() {
        let idx = RunnerIndex::new();
        let mut r = rec("r1", RunnerState::Paired);
        r.cert_serial = Some("aa".into());
        idx.apply(&r);
        assert_eq!(idx.check_cert("r1", "t", "o", "aa"), Ok(()));
        assert_eq!(idx.check_cert("r1", "t", "o", "bb"), Err(IndexRefusal::Retired));
        idx.set_current_cert("r1", "bb", [2; 32]);
        assert_eq!(idx.check_cert("r1", "t", "o", "aa"), Err(IndexRefusal::Retired));
        assert_eq!(idx.check_cert("r1", "t", "o", "bb"), Ok(()));
        // Revocation still wins over a current serial.
        idx.revoke("r1");
        assert_eq!(idx.check_cert("r1", "t", "o", "bb"), Err(IndexRefusal::Revoked));
    }

    #[test]
    fn any_could_match_judges_kinds_by_the_last_hello() {
        let idx = RunnerIndex::new();
        idx.apply(&rec("r1", RunnerState::Paired));
        let none = BTreeMap::new();
        assert!(
            idx.any_could_match("t", &needs("o", None, &none, "gpu-train")),
            "never seen since start: it may advertise any kind"
        );
        idx.update_presence("r1", |e| e.advertised = advertise(BTreeMap::new(), &["exec"]));
        assert!(idx.any_could_match("t", &needs("o", None, &none, "exec")));
        assert!(!idx.any_could_match("t", &needs("o", None, &none, "gpu-train")));
        assert!(!idx.any_could_match("t", &needs("o", Some("r1"), &none, "gpu-train")));
        // A second runner of the owner that serves the kind makes it possible again.
        idx.apply(&rec("r2", RunnerState::Paired));
        idx.update_presence("r2", |e| e.advertised = advertise(BTreeMap::new(), &["gpu-train"]));
        assert!(idx.any_could_match("t", &needs("o", None, &none, "gpu-train")));
    }

    #[test]
    fn the_owner_index_follows_records() {
        let idx = RunnerIndex::new();
        for i in 0..50 {
            let mut r = rec(&format!("r{i}"), RunnerState::Paired);
            r.owner = format!("o{}", i % 5);
            idx.apply(&r);
        }
        // Re-applying a record does not duplicate it; each owner has its 10 runners.
        idx.apply(&{
            let mut r = rec("r0", RunnerState::Paired);
            r.owner = "o0".into();
            r
        });
        for o in 0..5 {
            let ids = idx.by_owner.get(&("t".to_string(), format!("o{o}"))).expect("owner");
            assert_eq!(ids.len(), 10);
            assert!(ids.iter().all(|id| idx.get(id).is_some_and(|e| e.owner == format!("o{o}"))));
        }
        assert!(idx.by_owner.get(&("t".to_string(), "nobody".to_string())).is_none());
    }

    /// The per-tenant count follows every change exactly once, as the scan it replaced
    /// would count: new records, re-applied ones, revocation (by record or at once, in
    /// either order, twice), and a tenant that has none.
    #[test]
    fn the_unrevoked_count_matches_a_scan_through_every_change() {
        let idx = RunnerIndex::new();
        let scan = |t: &str| {
            idx.map.iter().filter(|e| e.tenant == t && e.state != RunnerState::Revoked).count()
        };
        let in_tenant = |id: &str, tenant: &str, state| {
            let mut r = rec(id, state);
            r.tenant = tenant.into();
            r
        };
        for (id, tenant) in [("a", "t"), ("b", "t"), ("c", "u")] {
            idx.apply(&in_tenant(id, tenant, RunnerState::Pending));
        }
        idx.apply(&in_tenant("a", "t", RunnerState::Paired)); // re-applied: no second count
        idx.apply(&in_tenant("a", "t", RunnerState::Paired));
        assert_eq!((idx.unrevoked("t"), idx.unrevoked("u")), (2, 1));
        idx.revoke("a");
        idx.revoke("a"); // twice: counted once
        idx.apply(&in_tenant("a", "t", RunnerState::Revoked)); // the record follows
        idx.apply(&in_tenant("b", "t", RunnerState::Revoked)); // the record first
        idx.revoke("b");
        idx.apply(&in_tenant("b", "t", RunnerState::Paired)); // stale: revocation is final
        idx.revoke("nobody");
        for t in ["t", "u", "none"] {
            assert_eq!(idx.unrevoked(t), scan(t), "tenant {t}");
        }
        assert_eq!((idx.unrevoked("t"), idx.unrevoked("u"), idx.unrevoked("none")), (0, 1, 0));
    }
}
