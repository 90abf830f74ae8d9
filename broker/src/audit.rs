//! Refusals that anyone can cause (failed enrollments, refused handshakes) are not written
//! one event per attempt: a stranger could fill the disk and stall the store's single
//! writer, which revocation also waits on. They are counted per (log, source, reason) and
//! written as one event per window, carrying the count. Proven callers' events (a verified
//! certificate, a valid API key) are still written one by one, by their call sites.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::records::{AuditEvent, Registry};

/// Distinct (log, source, reason) counted per window; beyond it new sources are counted
/// under source `other`, so the counter itself stays bounded.
const MAX_KEYS: usize = 10_000;

/// (tenant log or None for the cluster's, source, reason).
type Key = (Option<String>, String, &'static str);

/// The counter of refusals waiting for the next window's flush.
#[derive(Debug, Default)]
pub(crate) struct RefusalAudit {
    counts: Mutex<HashMap<Key, u64>>,
}

impl RefusalAudit {
    /// Counts one refusal of `reason` from `source` (an address, or what is known of the
    /// peer), for the tenant's log when `tenant` is proven, else the cluster's.
    pub(crate) fn note(&self, tenant: Option<&str>, source: &str, reason: &'static str) {
        let Ok(mut counts) = self.counts.lock() else { return };
        let mut key = (tenant.map(str::to_owned), source.to_owned(), reason);
        if counts.len() >= MAX_KEYS && !counts.contains_key(&key) {
            key.1 = "other".to_owned();
        }
        *counts.entry(key).or_default() += 1;
    }

    /// Takes the counts, leaving the counter empty.
    fn take(&self) -> HashMap<Key, u64> {
        self.counts.lock().map(|mut c| std::mem::take(&mut *c)).unwrap_or_default()
    }

    /// Writes one `denied` event per (log, source, reason) counted since the last flush.
    pub(crate) async fn flush(&self, registry: &Registry) {
        let mut counts: Vec<(Key, u64)> = self.take().into_iter().collect();
        counts.sort();
        for ((tenant, source, reason), n) in counts {
            let detail = format!("{n}× {reason} from {source}");
            let ev = AuditEvent::now("denied", "anonymous", tenant.as_deref(), None, detail);
            registry.audit_best_effort(ev).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_log_source_and_reason_and_stays_bounded() {
        let a = RefusalAudit::default();
        for _ in 0..1000 {
            a.note(None, "10.0.0.1:5000", "unknown token");
        }
        a.note(Some("acme"), "10.0.0.1:5000", "expired token");
        let c = a.take();
        assert_eq!(c.len(), 2);
        assert_eq!(c[&(None, "10.0.0.1:5000".to_string(), "unknown token")], 1000);
        assert!(a.take().is_empty(), "a flush empties it");
        for i in 0..(MAX_KEYS + 50) {
            a.note(None, &format!("10.0.{}.{}:1", i / 256, i % 256), "unknown token");
        }
        let c = a.take();
        assert_eq!(c.len(), MAX_KEYS + 1);
        assert_eq!(c[&(None, "other".to_string(), "unknown token")], 50);
    }
}
