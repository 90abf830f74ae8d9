//! Runner selection: the plain decision a [`crate::actors::TenantActor`] makes for each job.
//!
//! A runner is eligible when it belongs to the job's owner, is the requested runner (if
//! one was named), carries every requested label, handles the job's kind, is not draining
//! and is below its advertised capacity. Among eligible runners the one with the fewest
//! jobs in flight wins; ties go to the one assigned least recently, so equal runners take
//! turns.

use std::collections::{BTreeMap, HashMap};

/// Identifies one live connection inside a tenant (a runner may briefly have two).
pub type ConnId = u64;

/// What the tenant knows of one connected runner.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Runner id.
    pub runner_id: String,
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
    pub fn fits(&self, needs: &Needs<'_>) -> bool {
        self.owner == needs.owner
            && needs.runner_id.is_none_or(|id| id == self.runner_id)
            && needs.labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
            && self.kinds.iter().any(|k| k == needs.kind)
    }

    /// Whether it can take one more job now.
    pub fn available(&self) -> bool {
        !self.draining && self.in_flight < self.capacity
    }
}

/// Picks the runner for a job, or `None` when no eligible runner is free now.
pub fn pick(slots: &HashMap<ConnId, Slot>, needs: &Needs<'_>) -> Option<ConnId> {
    slots
        .iter()
        .filter(|(_, s)| s.available() && s.fits(needs))
        .min_by_key(|(id, s)| (s.in_flight, s.last_assigned, **id))
        .map(|(id, _)| *id)
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
        }
    }

    fn needs<'a>(owner: &'a str, labels: &'a BTreeMap<String, String>) -> Needs<'a> {
        Needs { owner, runner_id: None, labels, kind: "exec" }
    }

    #[test]
    fn picks_least_loaded_runner_of_the_right_owner() {
        let none = BTreeMap::new();
        let slots = HashMap::from([
            (1, slot("a", "alice", 1)),
            (2, slot("b", "alice", 0)),
            (3, slot("c", "bob", 0)),
        ]);
        assert_eq!(pick(&slots, &needs("alice", &none)), Some(2));
        assert_eq!(pick(&slots, &needs("bob", &none)), Some(3));
        assert_eq!(pick(&slots, &needs("carol", &none)), None);
    }

    #[test]
    fn respects_capacity_draining_labels_kind_and_explicit_id() {
        let none = BTreeMap::new();
        let mut slots = HashMap::from([(1, slot("a", "alice", 2)), (2, slot("b", "alice", 0))]);
        if let Some(s) = slots.get_mut(&2) {
            s.draining = true;
        }
        assert_eq!(pick(&slots, &needs("alice", &none)), None, "full and draining");
        if let Some(s) = slots.get_mut(&2) {
            s.draining = false;
        }
        let mac = BTreeMap::from([("os".to_string(), "mac".to_string())]);
        assert_eq!(pick(&slots, &needs("alice", &mac)), None, "label mismatch");
        let other_kind = Needs { kind: "docker", ..needs("alice", &none) };
        assert_eq!(pick(&slots, &other_kind), None, "kind mismatch");
        let explicit = Needs { runner_id: Some("a"), ..needs("alice", &none) };
        assert_eq!(pick(&slots, &explicit), None, "named runner is full");
        let explicit = Needs { runner_id: Some("b"), ..needs("alice", &none) };
        assert_eq!(pick(&slots, &explicit), Some(2));
    }

    #[test]
    fn equal_runners_take_turns() {
        let none = BTreeMap::new();
        let mut slots = HashMap::from([(1, slot("a", "alice", 0)), (2, slot("b", "alice", 0))]);
        if let Some(s) = slots.get_mut(&1) {
            s.last_assigned = 5;
        }
        if let Some(s) = slots.get_mut(&2) {
            s.last_assigned = 4;
        }
        assert_eq!(pick(&slots, &needs("alice", &none)), Some(2));
    }
}
