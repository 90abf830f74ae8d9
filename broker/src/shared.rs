//! State every part of one broker process shares. Built once in [`crate::Broker::spawn`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use runnel_certs::ClusterCa;

use crate::config::Config;
use crate::index::RunnerIndex;
use crate::jobs::JobTable;
use crate::records::{ApiKey, Registry};

/// How long a call into an actor may take before the caller gives up.
pub(crate) const ACTOR_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The shared state.
pub(crate) struct Shared {
    /// Validated configuration.
    pub config: Config,
    /// Durable records.
    pub registry: Registry,
    /// The verifier's view of runners.
    pub index: Arc<RunnerIndex>,
    /// The cluster CA.
    pub ca: ClusterCa,
    /// All jobs.
    pub jobs: JobTable,
    /// API key records by key id (mirror of the store, for auth without a store read).
    pub keys: DashMap<String, ApiKey>,
    /// Anonymous refusals waiting to be written, aggregated.
    pub refusals: crate::audit::RefusalAudit,
    /// When each key was last used (unix seconds; memory only, since this start).
    pub key_last_used: DashMap<String, i64>,
    /// `host:port` runners dial.
    pub advertise: String,
    /// The `tenant` metric label cap.
    pub tenant_labels: crate::metrics::TenantLabels,
    /// This node's cluster membership (None: single node on redb).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Calls to other nodes (cluster only).
    pub peers: Option<Arc<crate::peer::PeerClient>>,
    /// The API's per-source and per-key request rate limits.
    pub rate_limits: crate::api::RateLimits,
    /// The QUIC endpoint's intake limits (handshakes, enrollments, Retry).
    pub intake: crate::endpoint::IntakeLimits,
    /// Open native API connections per tenant (`--native-max-connections-per-tenant`).
    pub native_connections: Arc<crate::open_counts::OpenCounts<String>>,
    /// Each tenant's room for unread HTTP answers (`--http-answer-budget-bytes`).
    pub http_answers: crate::api::AnswerBudgets,
    /// Renders `/metrics` (None when another recorder owns the process).
    pub prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    conn_seq: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("advertise", &self.advertise).finish_non_exhaustive()
    }
}

impl Shared {
    /// Builds the shared state.
    pub(crate) fn new(
        config: Config,
        registry: Registry,
        index: Arc<RunnerIndex>,
        ca: ClusterCa,
        advertise: String,
        cluster: Option<Arc<crate::cluster::Cluster>>,
        peers: Option<Arc<crate::peer::PeerClient>>,
    ) -> Self {
        let jobs = JobTable::new(crate::jobs::Budget {
            retention: config.job_retention,
            retention_age: config.job_retention_age,
            bytes: config.job_budget_bytes,
            unfinished: config.max_jobs_per_tenant,
        });
        let tenant_labels = crate::metrics::TenantLabels::new(config.metrics_tenant_labels);
        let rate_limits =
            crate::api::RateLimits::new(config.rate_limit_per_source, config.rate_limit_per_key);
        Self {
            intake: crate::endpoint::IntakeLimits::new(&config),
            native_connections: Arc::default(),
            http_answers: crate::api::AnswerBudgets::new(config.http_answer_budget_bytes),
            rate_limits,
            tenant_labels,
            prometheus: crate::metrics::install(),
            config,
            registry,
            index,
            ca,
            jobs,
            keys: DashMap::new(),
            key_last_used: DashMap::new(),
            refusals: crate::audit::RefusalAudit::default(),
            advertise,
            cluster,
            peers,
            conn_seq: AtomicU64::new(1),
        }
    }

    /// A fresh connection id.
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.conn_seq.fetch_add(1, Ordering::Relaxed)
    }
}
