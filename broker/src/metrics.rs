//! Prometheus metrics (`metrics` + `metrics-exporter-prometheus`, served on `/metrics`).
//!
//! Latencies are real histograms with explicit buckets, so they aggregate across nodes.
//! Every name is below; [`names`] is the single list the code, the dashboard and the
//! alert rules use.
//!
//! **Label cardinality.** `result`, `outcome` and `op` take a fixed, small set of values.
//! `tenant` is the only open-ended label: the first `--metrics-tenant-labels` tenants seen
//! (default 100) get their own value, later ones share `_other`; `0` turns the per-tenant
//! split off (`_all`). So a broker with thousands of tenants exports at most that many
//! series per tenant-labelled metric.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Metric names.
pub mod names {
    /// Gauge, `tenant`: runners with a live connection.
    pub const RUNNERS_CONNECTED: &str = "runnel_runners_connected";
    /// Counter, `result` (ok, revoked, unknown, expired, foreign_ca, malformed, retired).
    pub const HANDSHAKES: &str = "runnel_handshakes_total";
    /// Counter, `result` (ok, unknown, expired, replayed, bad_request, revoked, internal,
    /// unavailable, busy).
    pub const ENROLLMENTS: &str = "runnel_enrollments_total";
    /// Counter, `outcome` (a terminal job state, or queue_full / no_runner / unknown_runner).
    pub const DISPATCHES: &str = "runnel_dispatches_total";
    /// Histogram: job accepted → terminal state, seconds.
    pub const DISPATCH_LATENCY: &str = "runnel_dispatch_latency_seconds";
    /// Histogram: job accepted → sent to a runner, seconds.
    pub const QUEUE_WAIT: &str = "runnel_queue_wait_seconds";
    /// Gauge, `tenant`: jobs waiting for a runner.
    pub const QUEUE_DEPTH: &str = "runnel_queue_depth";
    /// Gauge: jobs running on runners.
    pub const JOBS_IN_FLIGHT: &str = "runnel_jobs_in_flight";
    /// Counter: runners revoked.
    pub const REVOCATIONS: &str = "runnel_revocations_total";
    /// Counter: live connections closed by revocations.
    pub const REVOCATION_CLOSED: &str = "runnel_revocation_connections_closed_total";
    /// Histogram, `op` (get, put, delete, scan, cas): store operation latency, seconds.
    pub const STORE_OP: &str = "runnel_store_op_seconds";
    /// Histogram: QUIC round-trip time to runners, sampled at each heartbeat, seconds.
    pub const QUIC_RTT: &str = "runnel_quic_rtt_seconds";
    /// Counter: QUIC packets lost on runner connections.
    pub const QUIC_LOST_PACKETS: &str = "runnel_quic_lost_packets_total";
    /// Counter: live sessions closed `replaced` because a newer session of the same runner
    /// identity connected (one live session per runner).
    pub const SESSIONS_REPLACED: &str = "runnel_sessions_replaced_total";
    /// Counter, `key` (the key id, never key material; `unknown` when none matched) and
    /// `reason` (malformed, unknown_id, bad_secret, revoked, expired): refused API keys.
    pub const API_KEY_FAILURES: &str = "runnel_api_key_failures_total";
    /// Gauge: live nodes in this node's view of the cluster (etcd mode only).
    pub const CLUSTER_NODES: &str = "runnel_cluster_nodes";
    /// Gauge: seconds since this node's lease was last renewed (etcd mode only); at
    /// TTL/2 the node stops serving its tenants.
    pub const CLUSTER_LEASE_AGE: &str = "runnel_cluster_lease_age_seconds";
    /// Counter: tenants this node claimed as their home (a new home after a failover or
    /// drain counts here too).
    pub const CLUSTER_PLACEMENTS: &str = "runnel_cluster_placements_total";
    /// Gauge: tenants homed on this node now.
    pub const CLUSTER_TENANTS_HOMED: &str = "runnel_cluster_tenants_homed";
    /// Counter: runners told to go to their tenant's home node.
    pub const CLUSTER_REDIRECTS: &str = "runnel_cluster_redirects_total";
    /// Counter, `kind` (dispatch, get, list, cancel, output, close_runner, release_tenant):
    /// calls this node forwarded to a tenant's home over `runnel-peer/1`.
    pub const CLUSTER_FORWARDED: &str = "runnel_cluster_forwarded_total";
    /// Gauge: connections this node keeps to its peers for the calls it forwards, one per
    /// node at most: one that closed is replaced on the next call to its node, and one to
    /// a node that left the cluster is let go of.
    pub const CLUSTER_PEER_CONNECTIONS: &str = "runnel_cluster_peer_connections";
    /// Gauge: lanes this node has open to its peers (`runnel-peer/2`): with a peer of an
    /// older build, calls go on streams of their own and no lane opens.
    pub const CLUSTER_PEER_LANES: &str = "runnel_cluster_peer_lanes";
    /// Gauge: bytes of answers this node's peer lanes hold for the nodes that called
    /// (encoded, not yet taken by the transport; each lane within `LANE_MAX_UNWRITTEN`).
    pub const CLUSTER_PEER_ANSWER_BYTES: &str = "runnel_cluster_peer_answer_bytes";
    /// Gauge: bytes of job payloads and output the job table holds (every tenant; each
    /// tenant within `--job-budget-bytes`).
    pub const JOBS_HELD_BYTES: &str = "runnel_jobs_held_bytes";
    /// Gauge: open connections to the HTTP API.
    pub const HTTP_CONNECTIONS: &str = "runnel_http_connections";
    /// Counter, `limit` (all, source): HTTP connections closed at once because
    /// `--http-max-connections` were open, or `--http-max-connections-per-source` from
    /// their source address.
    pub const HTTP_CONNECTIONS_REFUSED: &str = "runnel_http_connections_refused_total";
    /// Counter, `limit` (source, key): requests answered 429 by a rate limit.
    pub const HTTP_RATE_LIMITED: &str = "runnel_http_rate_limited_total";
    /// Counter, `limit` (retry, source, handshakes, enrollments, enroll_rate, closed):
    /// incoming QUIC connections and enrollments held back by a QUIC intake limit, or
    /// refused because the node drains before it stops (closed).
    pub const QUIC_INTAKE_LIMITED: &str = "runnel_quic_intake_limited_total";
    /// Counter: live runner connections whose remote address changed (a NAT rebinding or a
    /// network change; QUIC migrated the connection, no new handshake), seen at heartbeats.
    pub const QUIC_MIGRATIONS: &str = "runnel_quic_migrations_total";
    /// Gauge: open connections to the native API (`runnel-api/1`) past their hello.
    pub const NATIVE_CONNECTIONS: &str = "runnel_native_connections";
    /// Counter, `call` (dispatch, follow, get, cancel, wait, refused_hello,
    /// malformed): calls on the native API (a dispatch's outcome is in
    /// `runnel_dispatches_total`, whichever API it came through).
    pub const NATIVE_CALLS: &str = "runnel_native_calls_total";
    /// Gauge: bytes of native API answers encoded and not yet taken by quinn (a client
    /// that does not read holds them; bounded per connection, see `native.rs`).
    pub const NATIVE_ANSWER_BYTES: &str = "runnel_native_answer_bytes";
    /// Gauge: bytes of HTTP answers held for their clients to read (answers over 64 KiB,
    /// bounded per tenant by `--http-answer-budget-bytes`, see `api/answers.rs`).
    pub const HTTP_ANSWER_BYTES: &str = "runnel_http_answer_bytes";
    /// Gauge, `version`: always 1.
    pub const BUILD_INFO: &str = "runnel_build_info";

    /// Every metric above (the dashboard and alert files are checked against this).
    pub const ALL: &[&str] = &[
        RUNNERS_CONNECTED,
        HANDSHAKES,
        ENROLLMENTS,
        DISPATCHES,
        DISPATCH_LATENCY,
        QUEUE_WAIT,
        QUEUE_DEPTH,
        JOBS_IN_FLIGHT,
        REVOCATIONS,
        REVOCATION_CLOSED,
        STORE_OP,
        QUIC_RTT,
        QUIC_LOST_PACKETS,
        SESSIONS_REPLACED,
        API_KEY_FAILURES,
        CLUSTER_NODES,
        CLUSTER_LEASE_AGE,
        CLUSTER_PLACEMENTS,
        CLUSTER_TENANTS_HOMED,
        CLUSTER_REDIRECTS,
        CLUSTER_FORWARDED,
        CLUSTER_PEER_CONNECTIONS,
        CLUSTER_PEER_LANES,
        CLUSTER_PEER_ANSWER_BYTES,
        JOBS_HELD_BYTES,
        HTTP_CONNECTIONS,
        HTTP_CONNECTIONS_REFUSED,
        HTTP_RATE_LIMITED,
        QUIC_INTAKE_LIMITED,
        QUIC_MIGRATIONS,
        NATIVE_CONNECTIONS,
        NATIVE_CALLS,
        NATIVE_ANSWER_BYTES,
        HTTP_ANSWER_BYTES,
        BUILD_INFO,
    ];
}

/// Buckets of job-level latencies (dispatch, queue wait): 0.5 ms … 10 min.
pub const JOB_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 600.0,
];
/// Buckets of store operations: 50 µs … 1 s.
pub const STORE_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
/// Buckets of QUIC RTT: 100 µs … 2 s.
pub const RTT_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0];
/// How often the exporter's upkeep runs (drains histogram buffers).
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Handles of the metrics every job touches, looked up once: each `counter!`/`gauge!`
/// call hashes its name and labels into the registry, six times per job otherwise.
/// Taken at the first job, after [`install`] (a handle is bound to the recorder of the
/// moment it is made).
pub(crate) struct JobMetrics {
    pub(crate) queue_wait: metrics::Histogram,
    pub(crate) in_flight: metrics::Gauge,
    pub(crate) held_bytes: metrics::Gauge,
    pub(crate) latency: metrics::Histogram,
    ended: Vec<(runnel_protocol::JobState, metrics::Counter)>,
}

impl JobMetrics {
    /// `runnel_dispatches_total{outcome}` for a job that ended in `state`.
    pub(crate) fn ended(&self, state: runnel_protocol::JobState) {
        match self.ended.iter().find(|(s, _)| *s == state) {
            Some((_, c)) => c.increment(1),
            None => dispatch_outcome(state.name()),
        }
    }
}

/// `runnel_dispatches_total{outcome}` once more: a dispatch refused (`outcome` is the API's
/// error code for it) or, past [`JobMetrics`]'s handles, a job that ended so.
pub(crate) fn dispatch_outcome(outcome: &'static str) {
    metrics::counter!(names::DISPATCHES, "outcome" => outcome).increment(1);
}

/// Whose answers [`answers_held`] counts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AnswerApi {
    /// `runnel_native_answer_bytes`.
    Native = 0,
    /// `runnel_http_answer_bytes`.
    Http = 1,
    /// `runnel_cluster_peer_answer_bytes`.
    Peer = 2,
}

/// The bytes of `api`'s answers held for their clients to read, moved by `delta`.
pub(crate) fn answers_held(api: AnswerApi, delta: i64) {
    static GAUGES: OnceLock<[metrics::Gauge; 3]> = OnceLock::new();
    let gauges = GAUGES.get_or_init(|| {
        [
            metrics::gauge!(names::NATIVE_ANSWER_BYTES),
            metrics::gauge!(names::HTTP_ANSWER_BYTES),
            metrics::gauge!(names::CLUSTER_PEER_ANSWER_BYTES),
        ]
    });
    #[allow(clippy::cast_precision_loss)] // answer sizes are far below 2^52
    gauges[api as usize].increment(delta as f64);
}

/// The process's [`JobMetrics`].
pub(crate) fn jobs() -> &'static JobMetrics {
    use runnel_protocol::JobState::*;
    static JOBS: OnceLock<JobMetrics> = OnceLock::new();
    JOBS.get_or_init(|| JobMetrics {
        queue_wait: metrics::histogram!(names::QUEUE_WAIT),
        in_flight: metrics::gauge!(names::JOBS_IN_FLIGHT),
        held_bytes: metrics::gauge!(names::JOBS_HELD_BYTES),
        latency: metrics::histogram!(names::DISPATCH_LATENCY),
        ended: [Succeeded, Failed, Cancelled, TimedOut, RunnerLost, Rejected, NodeLost]
            .into_iter()
            .map(|s| (s, metrics::counter!(names::DISPATCHES, "outcome" => s.name())))
            .collect(),
    })
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle. `None` when another
/// recorder was installed first (an embedding program's): metrics then go there.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(names::DISPATCH_LATENCY.into()), JOB_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(names::QUEUE_WAIT.into()), JOB_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(names::STORE_OP.into()), STORE_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(names::QUIC_RTT.into()), RTT_BUCKETS)
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(e) => {
                    tracing::error!(error = %e, "metrics disabled: bad bucket configuration");
                    return None;
                }
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
                return None;
            }
            describe();
            metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(names::RUNNERS_CONNECTED, "Runners with a live connection, by tenant.");
    describe_counter!(names::HANDSHAKES, "Runner TLS handshakes by result.");
    describe_counter!(names::ENROLLMENTS, "Enrollment attempts by result.");
    describe_counter!(names::DISPATCHES, "Dispatched jobs by outcome.");
    describe_histogram!(names::DISPATCH_LATENCY, Unit::Seconds, "Job accepted to terminal state.");
    describe_histogram!(names::QUEUE_WAIT, Unit::Seconds, "Job accepted to sent to a runner.");
    describe_gauge!(names::QUEUE_DEPTH, "Jobs waiting for a runner, by tenant.");
    describe_gauge!(names::JOBS_IN_FLIGHT, "Jobs running on runners.");
    describe_counter!(names::REVOCATIONS, "Runners revoked.");
    describe_counter!(names::REVOCATION_CLOSED, "Live connections closed by revocations.");
    describe_histogram!(names::STORE_OP, Unit::Seconds, "Store operation latency by op.");
    describe_histogram!(
        names::QUIC_RTT,
        Unit::Seconds,
        "QUIC RTT to runners, sampled per heartbeat."
    );
    describe_counter!(names::QUIC_LOST_PACKETS, "QUIC packets lost on runner connections.");
    describe_gauge!(names::JOBS_HELD_BYTES, "Bytes of job payloads and output held.");
    describe_gauge!(names::HTTP_CONNECTIONS, "Open connections to the HTTP API.");
    describe_gauge!(names::NATIVE_CONNECTIONS, "Open connections to the native API.");
    describe_counter!(names::NATIVE_CALLS, "Calls on the native API, by call.");
    describe_gauge!(
        names::NATIVE_ANSWER_BYTES,
        "Bytes of native API answers encoded and not yet taken by the transport."
    );
    describe_gauge!(
        names::HTTP_ANSWER_BYTES,
        "Bytes of HTTP answers over 64 KiB made and not yet written out."
    );
    describe_counter!(
        names::HTTP_CONNECTIONS_REFUSED,
        "HTTP connections closed because a connection cap (all, per source) was reached."
    );
    describe_counter!(names::HTTP_RATE_LIMITED, "Requests answered 429 by a rate limit, by limit.");
    describe_counter!(
        names::QUIC_MIGRATIONS,
        "Runner connections that continued from a new remote address (QUIC migration)."
    );
    describe_counter!(
        names::QUIC_INTAKE_LIMITED,
        "Incoming QUIC connections sent a Retry or refused, and enrollments refused, by limit."
    );
    describe_gauge!(names::BUILD_INFO, "Build information.");
}

/// Caps the number of distinct `tenant` label values.
#[derive(Debug)]
pub struct TenantLabels {
    cap: usize,
    seen: Mutex<HashSet<String>>,
}

/// Label value of tenants past the cap.
pub const OTHER_TENANTS: &str = "_other";
/// Label value when per-tenant labels are off.
pub const ALL_TENANTS: &str = "_all";

impl TenantLabels {
    /// At most `cap` tenants get their own label value.
    pub fn new(cap: usize) -> Self {
        Self { cap, seen: Mutex::new(HashSet::new()) }
    }

    /// The label value for `tenant`.
    pub fn label(&self, tenant: &str) -> String {
        if self.cap == 0 {
            return ALL_TENANTS.into();
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(tenant) {
            return tenant.into();
        }
        if seen.len() < self.cap {
            seen.insert(tenant.into());
            return tenant.into();
        }
        OTHER_TENANTS.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_labels_are_capped() {
        let l = TenantLabels::new(2);
        assert_eq!(l.label("a"), "a");
        assert_eq!(l.label("b"), "b");
        assert_eq!(l.label("c"), OTHER_TENANTS);
        assert_eq!(l.label("a"), "a");
        assert_eq!(TenantLabels::new(0).label("a"), ALL_TENANTS);
    }
}
