//! The durable records and the typed registry over the [`Store`].
//!
//! | key                         | record          |
//! |-----------------------------|-----------------|
//! | `tenants/<t>`               | [`Tenant`]      |
//! | `keys/<key id>`             | [`ApiKey`]      |
//! | `runners/<t>/<runner id>`   | [`RunnerRecord`]|
//! | `tokens/<token id>`         | [`TokenRecord`] |
//! | `audit/<t or @cluster>/<ts>`| [`AuditEvent`]  |
#![cfg_attr(not(feature = "bench-internals"), allow(unreachable_pub))] // `pub` items: see lib.rs `bench_internals`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::secret::HashedSecret;
use crate::store::{Store, StoreError};

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Tenant {
    /// Tenant id.
    pub id: String,
    /// Creation time (unix seconds).
    pub created_at: i64,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    /// Cluster-wide: tenants and their first keys.
    Operator,
    /// One tenant: runners, tokens, keys, jobs, audit.
    Admin,
    /// One tenant: jobs for any owner; reads runners.
    Dispatcher,
    /// One owner of one tenant: its jobs and runners.
    Member,
    /// Cluster-wide, read-only: `GET /metrics` and nothing else (Prometheus's scrape key).
    Metrics,
}

impl Role {
    /// The role's name, as in JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Dispatcher => "dispatcher",
            Role::Member => "member",
            Role::Metrics => "metrics",
        }
    }

    /// The role of a name.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        [Role::Operator, Role::Admin, Role::Dispatcher, Role::Member, Role::Metrics]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// An API key record (the secret itself is only hashed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ApiKey {
    /// Public key id.
    pub id: String,
    /// Role.
    pub role: Role,
    /// Tenant (None for operator keys).
    pub tenant: Option<String>,
    /// Owner (member keys only).
    pub owner: Option<String>,
    /// Salted hash of the secret.
    pub secret: HashedSecret,
    /// Creation time.
    pub created_at: i64,
    /// When the key stops working (unix seconds; None: never).
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// When it was revoked (refused from the next request on).
    #[serde(default)]
    pub revoked_at: Option<i64>,
}

impl ApiKey {
    /// Why the key may not be used at `now`, if it may not.
    pub(crate) fn unusable(&self, now: i64) -> Option<&'static str> {
        if self.revoked_at.is_some() {
            Some("revoked")
        } else if self.expires_at.is_some_and(|t| now >= t) {
            Some("expired")
        } else {
            None
        }
    }
}

/// Lifecycle of a runner record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunnerState {
    /// Created, token issued, not enrolled yet.
    Pending,
    /// Enrolled; holds a certificate.
    Paired,
    /// Revoked; refused in the handshake forever.
    Revoked,
}

/// A runner record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerRecord {
    /// Runner id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Owner.
    pub owner: String,
    /// Display name.
    pub name: String,
    /// Labels set by the admin; jobs select on them (with the runner's own).
    pub labels: BTreeMap<String, String>,
    /// Lifecycle state.
    pub state: RunnerState,
    /// Creation time.
    pub created_at: i64,
    /// Enrollment time.
    pub enrolled_at: Option<i64>,
    /// Revocation time.
    pub revoked_at: Option<i64>,
    /// Serial of the newest certificate issued.
    pub cert_serial: Option<String>,
    /// Expiry of the newest certificate issued.
    pub cert_not_after: Option<i64>,
    /// Last time the runner connected or disconnected (heartbeats update memory only).
    pub last_seen: Option<i64>,
}

/// An enrollment token record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TokenRecord {
    /// Token id.
    pub id: String,
    /// Runner the token enrolls.
    pub runner_id: String,
    /// Tenant.
    pub tenant: String,
    /// Owner.
    pub owner: String,
    /// Salted hash of the secret.
    pub secret: HashedSecret,
    /// Expiry (unix seconds).
    pub expires_at: i64,
    /// Set once, atomically, when used.
    pub consumed_at: Option<i64>,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct AuditEvent {
    /// When (unix seconds).
    pub at: i64,
    /// What: `tenant_created`, `key_created`, `runner_created`, `enrolled`, `renewed`,
    /// `revoked`, `denied`.
    pub event: String,
    /// Who did it (`key:<id>`, `runner:<id>`, `anonymous`).
    pub actor: String,
    /// Tenant concerned (None for cluster-level events).
    pub tenant: Option<String>,
    /// Runner concerned.
    pub runner_id: Option<String>,
    /// What happened, in words (never a secret).
    pub detail: String,
}

impl AuditEvent {
    /// An event happening now.
    pub(crate) fn now(
        event: &str,
        actor: impl Into<String>,
        tenant: Option<&str>,
        runner_id: Option<&str>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            at: now_unix(),
            event: event.into(),
            actor: actor.into(),
            tenant: tenant.map(str::to_owned),
            runner_id: runner_id.map(str::to_owned),
            detail: detail.into(),
        }
    }
}

/// Store key prefix of the cluster-level audit log.
const CLUSTER_AUDIT: &str = "@cluster";

/// Typed access to records.
#[derive(Clone)]
pub(crate) struct Registry {
    store: Arc<dyn Store>,
    audit_seq: Arc<AtomicU64>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { key: key.into(), message: e.to_string() })
}

/// Outcome of consuming an enrollment token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Consume {
    /// Consumed now; enroll this runner.
    Ok(TokenRecord),
    /// No such token, or the secret does not match.
    Unknown,
    /// Past its expiry.
    Expired,
    /// Already used.
    Replayed,
}

impl Registry {
    /// Wraps a store.
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self { store, audit_seq: Arc::new(AtomicU64::new(0)) }
    }

    /// The store underneath.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.store.get(key).await? {
            Some(bytes) => Ok(Some(decode(key, &bytes)?)),
            None => Ok(None),
        }
    }

    async fn scan<T: DeserializeOwned>(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<T>, StoreError> {
        self.store
            .scan_prefix(prefix, limit)
            .await?
            .into_iter()
            .map(|(k, v)| decode(&k, &v))
            .collect()
    }

    /// Creates a tenant; false if it exists already.
    pub(crate) async fn create_tenant(&self, tenant: &Tenant) -> Result<bool, StoreError> {
        let key = format!("tenants/{}", tenant.id);
        self.store.compare_and_swap(&key, None, Some(encode(tenant))).await
    }

    /// A tenant.
    pub(crate) async fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        self.get(&format!("tenants/{id}")).await
    }

    /// All tenants.
    pub(crate) async fn tenants(&self, limit: usize) -> Result<Vec<Tenant>, StoreError> {
        self.scan("tenants/", limit).await
    }

    /// Stores an API key record.
    pub(crate) async fn put_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        self.store.put(&format!("keys/{}", key.id), encode(key)).await
    }

    /// All API key records.
    pub(crate) async fn keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.scan("keys/", usize::MAX).await
    }

    /// Stores a runner record.
    pub(crate) async fn put_runner(&self, r: &RunnerRecord) -> Result<(), StoreError> {
        self.store.put(&format!("runners/{}/{}", r.tenant, r.id), encode(r)).await
    }

    /// A runner of `tenant`.
    pub(crate) async fn runner(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<RunnerRecord>, StoreError> {
        self.get(&format!("runners/{tenant}/{id}")).await
    }

    /// Runners of one tenant (`Some`) or of all tenants (`None`).
    pub(crate) async fn runners(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<RunnerRecord>, StoreError> {
        match tenant {
            Some(t) => self.scan(&format!("runners/{t}/"), usize::MAX).await,
            None => self.scan("runners/", usize::MAX).await,
        }
    }

    /// Stores a new token record.
    pub(crate) async fn put_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.store.put(&format!("tokens/{}", t.id), encode(t)).await
    }

    /// A token record, without consuming it.
    pub(crate) async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(&format!("tokens/{id}")).await
    }

    /// Consumes a token atomically: of any number of concurrent callers presenting the
    /// same valid token, exactly one gets [`Consume::Ok`].
    pub(crate) async fn consume_token(
        &self,
        id: &str,
        random: &str,
    ) -> Result<Consume, StoreError> {
        let key = format!("tokens/{id}");
        let Some(raw) = self.store.get(&key).await? else { return Ok(Consume::Unknown) };
        let mut rec: TokenRecord = decode(&key, &raw)?;
        // Check the secret before saying anything about the token's state.
        if !rec.secret.verify(random) {
            return Ok(Consume::Unknown);
        }
        if rec.consumed_at.is_some() {
            return Ok(Consume::Replayed);
        }
        if now_unix() >= rec.expires_at {
            return Ok(Consume::Expired);
        }
        rec.consumed_at = Some(now_unix());
        if self.store.compare_and_swap(&key, Some(&raw), Some(encode(&rec))).await? {
            Ok(Consume::Ok(rec))
        } else {
            // Someone else changed it between our read and our swap: they won.
            Ok(Consume::Replayed)
        }
    }

    /// Appends an audit event.
    pub(crate) async fn audit(&self, ev: AuditEvent) -> Result<(), StoreError> {
        let scope = ev.tenant.clone().unwrap_or_else(|| CLUSTER_AUDIT.into());
        let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let seq = self.audit_seq.fetch_add(1, Ordering::Relaxed);
        self.store.put(&format!("audit/{scope}/{nanos:024}-{seq:08}"), encode(&ev)).await
    }

    /// Appends an audit event where a failure must not fail the caller (the event is
    /// logged as lost instead).
    pub(crate) async fn audit_best_effort(&self, ev: AuditEvent) {
        let event = ev.event.clone();
        if let Err(e) = self.audit(ev).await {
            tracing::warn!(error = %e, %event, "could not write audit event");
        }
    }

    /// Deletes the audit events of one log (a tenant's, or the cluster's with `None`)
    /// beyond the newest `keep`, and those older than `max_age`. Returns how many went.
    pub(crate) async fn prune_audit(
        &self,
        tenant: Option<&str>,
        keep: usize,
        max_age: std::time::Duration,
    ) -> Result<usize, StoreError> {
        /// Keys deleted per scan.
        const BATCH: usize = 500;
        let prefix = format!("audit/{}/", tenant.unwrap_or(CLUSTER_AUDIT));
        let mut deleted = 0;
        // Beyond the count, newest kept.
        loop {
            let page = self.store.scan_prefix_rev(&prefix, None, keep + BATCH).await?;
            let extra: Vec<String> = page.into_iter().skip(keep).map(|(k, _)| k).collect();
            if extra.is_empty() {
                break;
            }
            for k in &extra {
                self.store.delete(k).await?;
            }
            deleted += extra.len();
        }
        // Older than the age: keys start with the event's time in nanoseconds.
        let cutoff = time::OffsetDateTime::now_utc().unix_timestamp_nanos()
            - i128::try_from(max_age.as_nanos()).unwrap_or(i128::MAX / 2);
        let cutoff_key = format!("{prefix}{cutoff:024}");
        loop {
            let page = self.store.scan_prefix(&prefix, BATCH).await?;
            let old: Vec<String> =
                page.into_iter().map(|(k, _)| k).take_while(|k| *k < cutoff_key).collect();
            if old.is_empty() {
                break;
            }
            for k in &old {
                self.store.delete(k).await?;
            }
            deleted += old.len();
        }
        Ok(deleted)
    }

    /// A page of audit events of a tenant (`Some`) or of the cluster (`None`), newest
    /// first, older than the cursor `before`; with the cursor of the next page when this
    /// one is full.
    pub(crate) async fn audit_log(
        &self,
        tenant: Option<&str>,
        before: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<AuditEvent>, Option<String>), StoreError> {
        let prefix = format!("audit/{}/", tenant.unwrap_or(CLUSTER_AUDIT));
        let before = before.map(|c| format!("{prefix}{c}"));
        let page = self.store.scan_prefix_rev(&prefix, before.as_deref(), limit).await?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|(k, _)| k[prefix.len()..].to_owned()))
            .flatten();
        let events = page
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(&v)
                    .map_err(|e| StoreError::Corrupt { key: k, message: e.to_string() })
            })
            .collect::<Result<Vec<AuditEvent>, _>>()?;
        Ok((events, next))
    }
}

impl Registry {
    /// Read-modify-write of a runner record with compare-and-swap, retried on conflict.
    /// `f` returns false to leave the record alone. Returns the record as written, or
    /// `None` if it does not exist or `f` declined.
    pub(crate) async fn update_runner(
        &self,
        tenant: &str,
        id: &str,
        mut f: impl FnMut(&mut RunnerRecord) -> bool,
    ) -> Result<Option<RunnerRecord>, StoreError> {
        let key = format!("runners/{tenant}/{id}");
        loop {
            let Some(raw) = self.store.get(&key).await? else { return Ok(None) };
            let mut rec: RunnerRecord = decode(&key, &raw)?;
            if !f(&mut rec) {
                return Ok(None);
            }
            if self.store.compare_and_swap(&key, Some(&raw), Some(encode(&rec))).await? {
                return Ok(Some(rec));
            }
        }
    }
}
