//! Runner selection: the plain decision a TenantActor makes for each job.
//!
//! A runner is eligible when it belongs to the job's owner, is the requested runner (if
//! one was named), carries every requested label, handles the job's kind, is not draining
//! and is below its advertised capacity. Among eligible runners the one with the fewest
//! jobs in flight wins; among those, one whose last job did not fail, then the one assigned
//! most recently (its connection's state is still in the CPU's caches): see [`Rank`].
#![cfg_attr(not(feature = "bench-internals"), allow(unreachable_pub))] // `pub` items: see lib.rs `bench_internals`

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Identifies one live connection inside a tenant (a runner may briefly have two).
pub(crate) type ConnId = u64;

/// What the tenant knows of one connected runner.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Runner id (shared with the jobs it runs: see [`crate::jobs::JobEntry::mark_running`]).
    pub runner_id: std::sync::Arc<str>,
    /// Owner.
    pub owner: String,
    /// Effective labels (admin-set, then the runner's own where the admin set none).
    pub labels: BTreeMap<String, String>,
    /// Handler kinds the runner announced.
    pub kinds: Vec<String>,
    /// Advertised concurrency.
    pub capacity: u32,
    /// Jobs the broker has sent it and not seen finish.
    pub in_flight: u32,
    /// Whether it asked for no new work.
    pub draining: bool,
    /// Dispatch sequence number of its latest assignment (0: never).
    pub last_assigned: u64,
    /// Whether its latest job that said anything of the runner ended failed, rejected or
    /// timed out rather than succeeded (see [`Rank`]); a cancelled or lost job leaves it.
    pub last_failed: bool,
}

/// What a job needs of a runner.
#[derive(Debug, Clone, Copy)]
pub struct Needs<'a> {
    /// Owner.
    pub owner: &'a str,
    /// Explicit runner id.
    pub runner_id: Option<&'a str>,
    /// Required labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Handler kind.
    pub kind: &'a str,
}

impl Slot {
    /// Whether this runner could take the job at all (ignoring load).
    pub(crate) fn fits(&self, needs: &Needs<'_>) -> bool {
        self.owner == needs.owner
            && needs.runner_id.is_none_or(|id| id == &*self.runner_id)
            && needs.labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
            && self.kinds.iter().any(|k| k == needs.kind)
    }

    /// Whether it can take one more job now.
    pub(crate) fn available(&self) -> bool {
        !self.draining && self.in_flight < self.capacity
    }
}

/// Preference order among free runners: fewest in flight (DESIGN.md); among those, one
/// whose latest job did not fail before one whose did; then the most recently assigned.
///
/// - **Most recent first** keeps dispatch on the connections whose state is in the CPU's
///   caches. Taking turns sent each job to the runner idle the longest, so with 20,000
///   connected every job touched a cold connection (quinn's and rustls's state, the
///   actor's, ~40 KiB each): 57 µs of broker CPU per job against 20 with 8 runners, and
///   17.0k jobs/s against 31.5k with this order (`runnel-bench connect -n 20000`,
///   BENCHMARKS.md 2026-12-05). Pools of idle connections are LIFO for the same reason.
/// - **A failed job sends its runner to the back** of its equals: a broken runner (full
///   disk, missing tool) ends its jobs at once and would otherwise be the most recent
///   one again at every pick, taking nearly every job. Its next success brings it back.
type Rank = (u32, bool, Reverse<u64>, ConnId);

/// The connected runners of one tenant, indexed for dispatch.
///
/// `free` holds, per owner, every runner that can take a job now, in preference order, so
/// the usual pick is the first element that fits: O(log n) instead of a scan over every
/// runner of the tenant (the scan made a 2,000-runner tenant 2.7× slower to dispatch to).
#[derive(Debug, Default)]
pub struct Pool {
    slots: HashMap<ConnId, Slot>,
    free: HashMap<String, BTreeSet<Rank>>,
    by_runner: HashMap<std::sync::Arc<str>, Vec<ConnId>>,
}

impl Slot {
    fn rank(&self, conn: ConnId) -> Rank {
        (self.in_flight, self.last_failed, Reverse(self.last_assigned), conn)
    }
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a connection.
    pub fn insert(&mut self, conn: ConnId, slot: Slot) {
        self.by_runner.entry(slot.runner_id.clone()).or_default().push(conn);
        if slot.available() {
            self.free.entry(slot.owner.clone()).or_default().insert(slot.rank(conn));
        }
        self.slots.insert(conn, slot);
    }

    /// Removes a connection.
    pub(crate) fn remove(&mut self, conn: ConnId) -> Option<Slot> {
        let slot = self.slots.remove(&conn)?;
        if let Some(set) = self.free.get_mut(&slot.owner) {
            set.remove(&slot.rank(conn));
            // Empty, it names no connection of the owner that is still here and free; a
            // busy one that frees up makes the set again.
            if set.is_empty() {
                self.free.remove(&slot.owner);
            }
        }
        if let Some(v) = self.by_runner.get_mut(&*slot.runner_id) {
            v.retain(|c| *c != conn);
            if v.is_empty() {
                self.by_runner.remove(&*slot.runner_id);
            }
        }
        Some(slot)
    }

    /// Changes one slot, keeping the free index in step.
    fn update(&mut self, conn: ConnId, f: impl FnOnce(&mut Slot)) -> Option<&Slot> {
        let slot = self.slots.get_mut(&conn)?;
        let (old_rank, was_free) = (slot.rank(conn), slot.available());
        f(slot);
        let (new_rank, is_free) = (slot.rank(conn), slot.available());
        // An owner's set stays when its runners are all busy (`remove` drops an empty one):
        // a job's assign and release then allocate nothing here (the owner had been cloned,
        // and the set's node made again, each time its last free runner filled up).
        match self.free.get_mut(&slot.owner) {
            Some(set) => {
                if was_free {
                    set.remove(&old_rank);
                }
                if is_free {
                    set.insert(new_rank);
                }
            }
            None if is_free => {
                self.free.entry(slot.owner.clone()).or_default().insert(new_rank);
            }
            None => {}
        }
        self.slots.get(&conn)
    }

    /// Records an assignment (sequence number `seq`) to `conn`.
    pub fn assign(&mut self, conn: ConnId, seq: u64) -> Option<&Slot> {
        self.update(conn, |s| {
            s.in_flight += 1;
            s.last_assigned = seq;
        })
    }

    /// Records that a job on `conn` ended, and whether it failed (failed, rejected or
    /// timed out: see [`Rank`]); `None` when its end says nothing of the runner (a cancel).
    pub fn release(&mut self, conn: ConnId, failed: Option<bool>) {
        self.update(conn, |s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            if let Some(failed) = failed {
                s.last_failed = failed;
            }
        });
    }

    /// Marks `conn` draining: it takes no new job.
    pub(crate) fn drain(&mut self, conn: ConnId) {
        self.update(conn, |s| s.draining = true);
    }

    /// The slot of a connection.
    pub(crate) fn get(&self, conn: ConnId) -> Option<&Slot> {
        self.slots.get(&conn)
    }

    /// Connections of one runner.
    pub(crate) fn conns_of(&self, runner_id: &str) -> Vec<ConnId> {
        self.by_runner.get(runner_id).cloned().unwrap_or_default()
    }

    /// Whether any connected runner could take the job at all (ignoring load).
    pub(crate) fn any_fits(&self, needs: &Needs<'_>) -> bool {
        match needs.runner_id {
            Some(id) => {
                self.conns_of(id).iter().any(|c| self.slots.get(c).is_some_and(|s| s.fits(needs)))
            }
            None => self.slots.values().any(|s| s.fits(needs)),
        }
    }

    /// Picks the runner for a job, or `None` when no eligible runner is free now.
    pub fn pick(&self, needs: &Needs<'_>) -> Option<ConnId> {
        if let Some(id) = needs.runner_id {
            return self
                .conns_of(id)
                .into_iter()
                .filter_map(|c| self.slots.get(&c).map(|s| (c, s)))
                .filter(|(_, s)| s.available() && s.fits(needs))
                .min_by_key(|(c, s)| s.rank(*c))
                .map(|(c, _)| c);
        }
        self.free
            .get(needs.owner)?
            .iter()
            .map(|(_, _, _, c)| *c)
            .find(|c| self.slots.get(c).is_some_and(|s| s.fits(needs)))
    }

    /// Number of connections.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: &str, owner: &str, in_flight: u32) -> Slot {
        Slot {
            runner_id: id.into(),
            owner: owner.into(),
            labels: BTreeMap::from([("os".into(), "linux".into())]),
            kinds: vec!["exec".into()],
            capacity: 2,
            in_flight,
            draining: false,
            last_assigned: 0,
            last_failed: false,
        }
    }

    fn needs<'a>(owner: &'a str, labels: &'a BTreeMap<String, String>) -> Needs<'a> {
        Needs { owner, runner_id: None, labels, kind: "exec" }
    }

    fn pool(slots: Vec<(ConnId, Slot)>) -> Pool {
        let mut p = Pool::new();
        for (c, s) in slots {
            p.insert(c, s);
        }
        p
    }

    #[test]
    fn picks_least_loaded_runner_of_the_right_owner() {
        let none = BTreeMap::new();
        let p = pool(vec![
            (1, slot("a", "alice", 1)),
            (2, slot("b", "alice", 0)),
            (3, slot("c", "bob", 0)),
        ]);
        assert_eq!(p.pick(&needs("alice", &none)), Some(2));
        assert_eq!(p.pick(&needs("bob", &none)), Some(3));
        assert_eq!(p.pick(&needs("carol", &none)), None);
    }

    #[test]
    fn respects_capacity_draining_labels_kind_and_explicit_id() {
        let none = BTreeMap::new();
        let mut p = pool(vec![(1, slot("a", "alice", 2)), (2, slot("b", "alice", 0))]);
        p.drain(2);
        assert_eq!(p.pick(&needs("alice", &none)), None, "full and draining");
        let mut p = pool(vec![(1, slot("a", "alice", 2)), (2, slot("b", "alice", 0))]);
        let mac = BTreeMap::from([("os".to_string(), "mac".to_string())]);
        assert_eq!(p.pick(&needs("alice", &mac)), None, "label mismatch");
        let other_kind = Needs { kind: "docker", ..needs("alice", &none) };
        assert_eq!(p.pick(&other_kind), None, "kind mismatch");
        let explicit = Needs { runner_id: Some("a"), ..needs("alice", &none) };
        assert_eq!(p.pick(&explicit), None, "named runner is full");
        p.release(1, Some(false));
        assert_eq!(p.pick(&explicit), Some(1), "named runner freed a slot");
        let explicit = Needs { runner_id: Some("b"), ..needs("alice", &none) };
        assert_eq!(p.pick(&explicit), Some(2));
        let wrong_owner = Needs { runner_id: Some("b"), ..needs("bob", &none) };
        assert_eq!(p.pick(&wrong_owner), None);
    }

    #[test]
    fn the_runner_just_freed_takes_the_next_job_and_the_index_follows_every_change() {
        let none = BTreeMap::new();
        let mut p = pool(vec![(1, slot("a", "alice", 0)), (2, slot("b", "alice", 0))]);
        // One job at a time: the connection that just finished one (its state in the
        // caches) takes the next, rather than the one idle the longest.
        let first = p.pick(&needs("alice", &none)).expect("free runner");
        let mut counts = HashMap::new();
        for seq in 1..=10 {
            let c = p.pick(&needs("alice", &none)).expect("free runner");
            p.assign(c, seq);
            *counts.entry(c).or_insert(0) += 1;
            p.release(c, Some(false));
        }
        assert_eq!(counts.get(&first), Some(&10), "{counts:?}");
        // Two at a time: least in flight comes first, so both runners work.
        let a = p.pick(&needs("alice", &none)).unwrap();
        p.assign(a, 11);
        let b = p.pick(&needs("alice", &none)).unwrap();
        assert_ne!(a, b, "the idle runner before a second job on the busy one");
        // Fill both: nothing free; free one: that one.
        p.assign(a, 12);
        p.assign(b, 13);
        p.assign(b, 14);
        assert_eq!(p.pick(&needs("alice", &none)), None);
        p.release(2, Some(false));
        assert_eq!(p.pick(&needs("alice", &none)), Some(2));
        assert!(p.remove(2).is_some());
        assert_eq!(p.pick(&needs("alice", &none)), None);
        assert!(p.conns_of("b").is_empty());
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn a_runner_that_fails_its_jobs_does_not_take_them_all() {
        // A broken runner ends each job at once; picked most-recent-first it would be
        // the most recent again at every pick. After a failure it goes behind its equals.
        let none = BTreeMap::new();
        let mut p = pool(vec![
            (1, slot("broken", "alice", 0)),
            (2, slot("b", "alice", 0)),
            (3, slot("c", "alice", 0)),
        ]);
        let mut on_broken = 0;
        for seq in 1..=30 {
            let c = p.pick(&needs("alice", &none)).expect("free runner");
            p.assign(c, seq);
            let failed = c == 1;
            on_broken += usize::from(failed);
            p.release(c, Some(failed));
        }
        assert!(on_broken <= 1, "the broken runner took {on_broken} of 30");
        // With the healthy ones busy it still works (least in flight comes first), and
        // one success puts it back among its equals.
        p.assign(2, 31);
        p.assign(3, 32);
        assert_eq!(p.pick(&needs("alice", &none)), Some(1));
        p.assign(1, 33);
        p.release(1, Some(false));
        p.release(2, Some(false));
        p.release(3, Some(false));
        assert!(!p.get(1).unwrap().last_failed);
        assert_eq!(p.pick(&needs("alice", &none)), Some(1), "back, and the most recent");
    }

    /// The indexed pick agrees with a plain scan over random pools.
    #[test]
    fn indexed_pick_matches_a_full_scan() {
        let none = BTreeMap::new();
        let mut p = Pool::new();
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state >> 33
        };
        for c in 0..200u64 {
            let owner = if next() % 3 == 0 { "bob" } else { "alice" };
            let mut s = slot(&format!("r{c}"), owner, (next() % 3) as u32);
            s.draining = next() % 10 == 0;
            s.last_assigned = next() % 50;
            s.last_failed = next() % 4 == 0;
            p.insert(c, s);
        }
        for round in 0..500u64 {
            let owner = if round % 2 == 0 { "alice" } else { "bob" };
            let want = needs(owner, &none);
            let scan = p
                .slots
                .iter()
                .filter(|(_, s)| s.available() && s.fits(&want))
                .min_by_key(|(c, s)| s.rank(**c))
                .map(|(c, _)| *c);
            assert_eq!(p.pick(&want), scan, "round {round}");
            match next() % 3 {
                0 => {
                    if let Some(c) = scan {
                        p.assign(c, 100 + round);
                    }
                }
                1 => p.release(
                    next() % 200,
                    [None, Some(false), Some(true)].get(next() as usize % 3).copied().flatten(),
                ),
                _ => {
                    let c = next() % 200;
                    if let Some(s) = p.remove(c) {
                        p.insert(c, s);
                    }
                }
            }
        }
    }

    #[test]
    fn a_busy_owner_keeps_its_free_set_and_its_last_connection_takes_it() {
        let none = BTreeMap::new();
        let mut p = pool(vec![(1, slot("a", "alice", 0))]);
        p.assign(1, 1);
        p.assign(1, 2);
        assert_eq!(p.pick(&needs("alice", &none)), None, "full");
        assert!(p.free.get("alice").is_some_and(BTreeSet::is_empty), "kept, empty");
        p.release(1, Some(false));
        assert_eq!(p.pick(&needs("alice", &none)), Some(1), "freed");
        p.assign(1, 3);
        p.assign(1, 4);
        p.remove(1);
        assert!(p.free.is_empty(), "no set outlives the owner's last connection");
        assert_eq!(p.pick(&needs("alice", &none)), None);
    }
}
