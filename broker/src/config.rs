//! Broker configuration: flags, then `RUNNEL_*` environment variables, then a TOML file,
//! then defaults (first wins). Every value is validated before anything starts; a bad
//! config exits with status 64 and a one-line reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default UDP address of the QUIC endpoint runners dial.
pub(crate) const DEFAULT_QUIC_LISTEN: &str = "0.0.0.0:7443";
/// Default TCP address of the HTTP API (loopback: put a TLS proxy in front to expose it).
pub(crate) const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7480";
/// Default data directory.
pub(crate) const DEFAULT_DATA_DIR: &str = "./runnel-data";
/// Default cluster name (SPIFFE trust domain of identities).
pub(crate) const DEFAULT_CLUSTER: &str = "runnel";
/// Default lifetime of an enrollment token.
pub(crate) const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Default per-tenant queue limit; beyond it dispatch answers 429.
pub(crate) const DEFAULT_QUEUE_LIMIT: usize = 1024;
/// Default time a job may wait for a free runner.
pub(crate) const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default run-time limit of a job.
pub(crate) const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest run-time limit a job may ask for.
pub(crate) const MAX_JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Default QUIC idle timeout; a runner silent this long (killed, unplugged) is lost.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Default number of finished jobs kept per tenant for `GET /v1/jobs/{id}`.
pub(crate) const DEFAULT_JOB_RETENTION: usize = 10_000;
/// Default bytes of payloads and output one tenant's jobs may hold (256 MiB).
pub(crate) const DEFAULT_JOB_BUDGET_BYTES: usize = 256 << 20;
/// Default cap on one tenant's queued plus running jobs.
pub(crate) const DEFAULT_MAX_JOBS_PER_TENANT: usize = 10_000;
/// Default number of tenants with their own metric label.
pub(crate) const DEFAULT_METRICS_TENANT_LABELS: usize = 100;
/// Default audit events kept per log (each tenant's, and the cluster's).
pub(crate) const DEFAULT_AUDIT_RETENTION_COUNT: usize = 100_000;
/// Default age after which audit events are deleted.
pub(crate) const DEFAULT_AUDIT_RETENTION_AGE: Duration = Duration::from_secs(90 * 86_400);
/// Default period of the audit-retention pass.
pub(crate) const DEFAULT_AUDIT_PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Default window over which anonymous refusals are counted into one audit event per
/// (source, reason).
pub(crate) const DEFAULT_AUDIT_AGGREGATE_EVERY: Duration = Duration::from_secs(60);
/// Default cap on unrevoked (pending or enrolled) runners per tenant.
pub(crate) const DEFAULT_MAX_RUNNERS_PER_TENANT: usize = 10_000;
/// Default cap on live (unrevoked, unexpired) API keys per tenant.
pub(crate) const DEFAULT_MAX_KEYS_PER_TENANT: usize = 100;
/// Default UDP address of the node-to-node endpoint (`runnel-peer/1`, cluster only).
pub(crate) const DEFAULT_PEER_LISTEN: &str = "0.0.0.0:7444";
/// Default longest drain (cluster): how long a stopping node waits for its accepted jobs.
pub(crate) const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Default window over which a draining node spreads its runners' reconnects.
pub(crate) const DEFAULT_GOAWAY_WINDOW: Duration = Duration::from_secs(5);
/// Default key prefix of a cluster's data in etcd.
pub(crate) const DEFAULT_ETCD_PREFIX: &str = "/runnel";
/// Default TTL of a node's membership lease in etcd.
pub(crate) const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// Default longest wait for a client's request headers (and between requests on a
/// keep-alive connection): a client that sends nothing is closed after this.
pub(crate) const DEFAULT_HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest wait for a request body to arrive.
pub(crate) const DEFAULT_HTTP_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest a client may leave an answer unread while the broker waits to write
/// more of it (nginx's `send_timeout` is 60s).
pub(crate) const DEFAULT_API_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on open HTTP API connections; beyond it new ones are closed at once.
pub(crate) const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 4096;
/// Default cap on one source address's open HTTP API connections.
pub(crate) const DEFAULT_HTTP_MAX_CONNECTIONS_PER_SOURCE: usize = 256;
/// Default cap on one tenant's open native API connections.
pub(crate) const DEFAULT_NATIVE_MAX_CONNECTIONS_PER_TENANT: usize = 256;
/// Default bytes of HTTP answers one tenant's clients may leave unread in the broker.
pub(crate) const DEFAULT_HTTP_ANSWER_BUDGET_BYTES: usize = 64 << 20;
/// Default API requests per second from one source address (burst: twice that).
pub(crate) const DEFAULT_RATE_LIMIT_PER_SOURCE: u32 = 2000;
/// Default API requests per second with one API key (burst: twice that).
pub(crate) const DEFAULT_RATE_LIMIT_PER_KEY: u32 = 1000;
/// Default cap on QUIC connections in their handshake, Hello or enrollment at once.
pub(crate) const DEFAULT_QUIC_MAX_HANDSHAKES: usize = 1024;
/// Default cap on enrollments in progress at once.
pub(crate) const DEFAULT_MAX_ENROLLMENTS: usize = 64;
/// Default enrollment attempts per second from one source address (burst: twice that).
pub(crate) const DEFAULT_ENROLL_RATE_PER_SOURCE: u32 = 20;
/// Default rate of incoming QUIC connections per second (burst: twice that) past which a
/// source must prove its address with a Retry round trip first.
pub(crate) const DEFAULT_QUIC_VALIDATE_ABOVE: u32 = 500;
/// Default incoming QUIC connections per second from one source address (burst: twice
/// that).
pub(crate) const DEFAULT_QUIC_RATE_PER_SOURCE: u32 = 200;
/// Default age after which finished jobs are forgotten.
pub(crate) const DEFAULT_JOB_RETENTION_AGE: Duration = Duration::from_secs(3600);

/// TLS on the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HttpTls {
    /// Plain HTTP (allowed on a loopback address, or with `--http-insecure`).
    #[default]
    Off,
    /// A server certificate issued by the cluster CA at start (the one the QUIC endpoint
    /// uses): clients pin the CA fingerprint, as runners do.
    Auto,
    /// A certificate chain and key from PEM files (e.g. from the operator's own PKI).
    Files {
        /// PEM certificate chain, leaf first.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
}

impl HttpTls {
    /// From `--http-tls off|auto` and `--http-tls-cert`/`--http-tls-key`: the two files
    /// together (with `--http-tls` unset or `files`), or a mode alone.
    pub fn from_parts(
        mode: Option<&str>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        let invalid =
            |reason: &str| ConfigError::Invalid { field: "http-tls", reason: reason.into() };
        match (mode, cert, key) {
            (None | Some("files"), Some(cert), Some(key)) => Ok(Self::Files { cert, key }),
            (_, Some(_), None) | (_, None, Some(_)) => {
                Err(invalid("--http-tls-cert and --http-tls-key go together"))
            }
            (Some(m), Some(_), Some(_)) => Err(invalid(&format!(
                "--http-tls {m} does not take --http-tls-cert/--http-tls-key (omit --http-tls)"
            ))),
            (None | Some("off"), None, None) => Ok(Self::Off),
            (Some("auto"), None, None) => Ok(Self::Auto),
            (Some("files"), None, None) => {
                Err(invalid("--http-tls files needs --http-tls-cert and --http-tls-key"))
            }
            (Some(m), None, None) => {
                Err(invalid(&format!("unknown mode {m:?} (use off, auto, or the two file flags)")))
            }
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the CA, the database and the server certificate live.
    pub data_dir: PathBuf,
    /// UDP address of the QUIC endpoint.
    pub quic_listen: SocketAddr,
    /// TCP address of the HTTP API.
    pub http_listen: SocketAddr,
    /// `host:port` written into enroll commands (and into the server certificate): in a
    /// cluster, a name every node answers to (DNS, a UDP load balancer), or the nodes'
    /// own addresses separated by commas, which runners try in turn.
    pub advertise: Option<String>,
    /// Cluster name.
    pub cluster: String,
    /// Extra DNS names or IPs for the server certificate.
    pub server_names: Vec<String>,
    /// Enrollment token lifetime.
    pub token_ttl: Duration,
    /// Runner certificate lifetime.
    pub runner_cert_validity: Duration,
    /// Per-tenant queue limit.
    pub queue_limit: usize,
    /// Default queue-wait limit.
    pub queue_timeout: Duration,
    /// Default run-time limit.
    pub job_timeout: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Heartbeat interval asked of runners.
    pub heartbeat_interval: Duration,
    /// Finished jobs kept.
    pub job_retention: usize,
    /// Age after which finished jobs are dropped.
    pub job_retention_age: Duration,
    /// Bytes of payloads and output one tenant's jobs may hold (oldest finished output
    /// goes first).
    pub job_budget_bytes: usize,
    /// Queued plus running jobs per tenant; past it dispatch answers 429.
    pub max_jobs_per_tenant: usize,
    /// Tenants that get their own `tenant` metric label (0: none; later ones: `_other`).
    pub metrics_tenant_labels: usize,
    /// Live API keys a tenant may hold; creating more answers 409 `too_many_keys`.
    pub max_keys_per_tenant: usize,
    /// Unrevoked runners per tenant; creating more answers 409.
    pub max_runners_per_tenant: usize,
    /// Audit events kept per log (the newest).
    pub audit_retention_count: usize,
    /// Audit events older than this are deleted.
    pub audit_retention_age: Duration,
    /// How often the retention pass runs.
    pub audit_prune_every: Duration,
    /// Anonymous refusals (failed enrollments, refused handshakes of unproven
    /// certificates) are counted per (source, reason) and written as one event per window.
    pub audit_aggregate_every: Duration,
    /// etcd endpoints (`http://host:port`); empty: the embedded redb store, single node.
    pub etcd: Vec<String>,
    /// Key prefix of this cluster in etcd, so that several clusters can share one etcd.
    pub etcd_prefix: String,
    /// This node's id in the cluster (default: the hostname).
    pub node_id: String,
    /// UDP address of the node-to-node endpoint (cluster only): other nodes forward API
    /// calls for this node's tenants here.
    pub peer_listen: SocketAddr,
    /// `host:port` of this node's own QUIC endpoint, as other nodes redirect runners to it
    /// (default: the advertised address when one node, else the bound address).
    pub node_advertise: Option<String>,
    /// TTL of this node's membership lease; a node that cannot renew it for half of this
    /// stops serving its tenants.
    pub lease_ttl: Duration,
    /// On SIGTERM, how long the node waits (in a cluster) for the jobs it accepted to end
    /// before it tells its runners to go away, and then for them to leave.
    pub drain_timeout: Duration,
    /// The window a draining node (SIGTERM) spreads its runners' reconnects over.
    pub goaway_window: Duration,
    /// Longest wait for a request's headers, and for the next request on an idle
    /// keep-alive connection.
    pub http_header_timeout: Duration,
    /// Longest wait for a request body.
    pub http_body_timeout: Duration,
    /// Longest the broker waits, with an answer to write, for an API client (HTTP or
    /// native) to take more of it off the wire; then the HTTP connection is closed, or the
    /// native call's stream reset (and the answer let go of).
    pub api_send_timeout: Duration,
    /// Open HTTP connections at most; more are closed at once.
    pub http_max_connections: usize,
    /// Open HTTP connections from one source address at most; more from it are closed at
    /// once, so one client cannot take every place `http_max_connections` leaves.
    pub http_max_connections_per_source: usize,
    /// Bytes of HTTP answers over `api::answers::UNCOUNTED` one tenant's clients may
    /// leave unread in the broker (one larger than it takes all of it); past it the
    /// tenant's next such answer waits for room, another tenant's does not.
    pub http_answer_budget_bytes: usize,
    /// Open native API connections one tenant may have (operator keys count together);
    /// past it a hello is refused 429. Each may hold up to `limits::ANSWER_BUDGET` plus a
    /// lane's `LANE_MAX_UNWRITTEN` and one answer for a client that does not read.
    pub native_max_connections_per_tenant: usize,
    /// API requests per second from one source address (0: no limit).
    pub rate_limit_per_source: u32,
    /// API requests per second with one key (0: no limit).
    pub rate_limit_per_key: u32,
    /// QUIC connections in their handshake, Hello or enrollment at once; past it new
    /// connections are refused (the runner backs off and retries).
    pub quic_max_handshakes: usize,
    /// Enrollments in progress at once; past it enrollments are refused "try again".
    pub max_enrollments: usize,
    /// Enrollment attempts per second from one source address (0: no limit).
    pub enroll_rate_per_source: u32,
    /// Incoming QUIC connections per second past which sources must prove their address
    /// with a Retry round trip (0: always).
    pub quic_validate_above: u32,
    /// Incoming QUIC connections per second from one source address (0: no limit); past
    /// it a source is sent a Retry, and once its address is proven, refused.
    pub quic_rate_per_source: u32,
    /// TLS on the HTTP API.
    pub http_tls: HttpTls,
    /// Allow plain HTTP on a non-loopback address (a TLS proxy in front ends TLS).
    pub http_insecure: bool,
}

/// The machine's host name, the default node id (`node` when it cannot be read or is not
/// a valid identity segment).
pub fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| runnel_certs::identity::validate_segment("node-id", h).is_ok())
        .unwrap_or_else(|| "node".to_owned())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: DEFAULT_DATA_DIR.into(),
            quic_listen: parse_addr(DEFAULT_QUIC_LISTEN),
            http_listen: parse_addr(DEFAULT_HTTP_LISTEN),
            advertise: None,
            cluster: DEFAULT_CLUSTER.into(),
            server_names: Vec::new(),
            token_ttl: DEFAULT_TOKEN_TTL,
            runner_cert_validity: runnel_certs::DEFAULT_RUNNER_VALIDITY,
            queue_limit: DEFAULT_QUEUE_LIMIT,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            job_timeout: DEFAULT_JOB_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            heartbeat_interval: runnel_protocol::transport::DEFAULT_HEARTBEAT_INTERVAL,
            job_retention: DEFAULT_JOB_RETENTION,
            job_retention_age: DEFAULT_JOB_RETENTION_AGE,
            job_budget_bytes: DEFAULT_JOB_BUDGET_BYTES,
            max_jobs_per_tenant: DEFAULT_MAX_JOBS_PER_TENANT,
            metrics_tenant_labels: DEFAULT_METRICS_TENANT_LABELS,
            max_keys_per_tenant: DEFAULT_MAX_KEYS_PER_TENANT,
            max_runners_per_tenant: DEFAULT_MAX_RUNNERS_PER_TENANT,
            audit_retention_count: DEFAULT_AUDIT_RETENTION_COUNT,
            audit_retention_age: DEFAULT_AUDIT_RETENTION_AGE,
            audit_prune_every: DEFAULT_AUDIT_PRUNE_EVERY,
            audit_aggregate_every: DEFAULT_AUDIT_AGGREGATE_EVERY,
            etcd: Vec::new(),
            etcd_prefix: DEFAULT_ETCD_PREFIX.into(),
            node_id: default_node_id(),
            peer_listen: parse_addr(DEFAULT_PEER_LISTEN),
            node_advertise: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            goaway_window: DEFAULT_GOAWAY_WINDOW,
            http_header_timeout: DEFAULT_HTTP_HEADER_TIMEOUT,
            http_body_timeout: DEFAULT_HTTP_BODY_TIMEOUT,
            api_send_timeout: DEFAULT_API_SEND_TIMEOUT,
            http_max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
            native_max_connections_per_tenant: DEFAULT_NATIVE_MAX_CONNECTIONS_PER_TENANT,
            http_max_connections_per_source: DEFAULT_HTTP_MAX_CONNECTIONS_PER_SOURCE,
            http_answer_budget_bytes: DEFAULT_HTTP_ANSWER_BUDGET_BYTES,
            rate_limit_per_source: DEFAULT_RATE_LIMIT_PER_SOURCE,
            rate_limit_per_key: DEFAULT_RATE_LIMIT_PER_KEY,
            quic_max_handshakes: DEFAULT_QUIC_MAX_HANDSHAKES,
            max_enrollments: DEFAULT_MAX_ENROLLMENTS,
            enroll_rate_per_source: DEFAULT_ENROLL_RATE_PER_SOURCE,
            quic_validate_above: DEFAULT_QUIC_VALIDATE_ABOVE,
            quic_rate_per_source: DEFAULT_QUIC_RATE_PER_SOURCE,
            http_tls: HttpTls::Off,
            http_insecure: false,
        }
    }
}

fn parse_addr(s: &str) -> SocketAddr {
    // Only used on the constants above, which are valid.
    s.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl Config {
    /// Everything on loopback ephemeral ports in `data_dir`, with lost runners noticed in
    /// seconds: what `runnel-broker demo`, the end-to-end tests and the bench harness run.
    pub fn loopback(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.into(),
            quic_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            idle_timeout: Duration::from_secs(3),
            heartbeat_interval: Duration::from_secs(1),
            audit_aggregate_every: Duration::from_millis(250),
            ..Self::default()
        }
    }

    /// The address runners should dial, as written into enroll commands.
    pub fn advertised(&self, bound_quic: SocketAddr) -> String {
        if let Some(a) = &self.advertise {
            return a.clone();
        }
        if bound_quic.ip().is_unspecified() {
            format!("127.0.0.1:{}", bound_quic.port())
        } else {
            bound_quic.to_string()
        }
    }

    /// Checks every value and the rules between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: &str| {
            Err(ConfigError::Invalid { field, reason: reason.to_owned() })
        };
        if let Err(e) = runnel_certs::identity::validate_segment("cluster", &self.cluster) {
            return invalid("cluster", &e.to_string());
        }
        if self.queue_limit == 0 {
            return invalid("queue-limit", "must be at least 1");
        }
        if self.audit_retention_count == 0 {
            return invalid("audit-retention-count", "must be at least 1");
        }
        if self.audit_prune_every < Duration::from_millis(10)
            || self.audit_aggregate_every < Duration::from_millis(10)
        {
            return invalid("audit-prune-every", "audit intervals must be at least 10ms");
        }
        if self.job_retention == 0 || self.max_jobs_per_tenant == 0 {
            return invalid(
                "job-retention",
                "job retention and max-jobs-per-tenant must be at least 1",
            );
        }
        // A budget under one job's largest output plus payload would refuse ordinary jobs.
        if self.job_budget_bytes < 2 << 20 {
            return invalid("job-budget-bytes", "must be at least 2 MiB (2097152)");
        }
        if self.max_runners_per_tenant == 0 {
            return invalid("max-runners-per-tenant", "must be at least 1");
        }
        if self.max_keys_per_tenant == 0 {
            return invalid("max-keys-per-tenant", "must be at least 1");
        }
        if self.idle_timeout < Duration::from_secs(1) {
            return invalid("idle-timeout", "must be at least 1s");
        }
        if self.heartbeat_interval >= self.idle_timeout {
            return invalid("heartbeat-interval", "must be shorter than idle-timeout");
        }
        if self.job_timeout > MAX_JOB_TIMEOUT || self.job_timeout.is_zero() {
            return invalid("job-timeout", "must be between 1ms and 24h");
        }
        // Runners renew at 2/3 of the lifetime; anything under a minute is only useful in
        // tests, but it is not wrong.
        if self.runner_cert_validity < Duration::from_secs(1) {
            return invalid("runner-cert-validity", "must be at least 1s");
        }
        let host_port = |a: &str| {
            a.rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        };
        // One cluster-wide host:port, or the nodes' own, comma-separated (runners try them
        // in turn).
        if let Some(a) = self.advertise.as_deref().filter(|a| !a.split(',').all(host_port)) {
            return invalid("advertise", &format!("{a:?} must be host:port[,host:port...]"));
        }
        if let Some(a) = self.node_advertise.as_deref().filter(|a| !host_port(a)) {
            return invalid("node-advertise", &format!("{a:?} must be host:port"));
        }
        if let Err(e) = runnel_certs::identity::validate_segment("node-id", &self.node_id) {
            return invalid("node-id", &e.to_string());
        }
        for url in &self.etcd {
            let ok = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"))
                .is_some_and(host_port);
            if !ok {
                return invalid(
                    "etcd",
                    &format!("{url:?} must be http://host:port or https://host:port"),
                );
            }
        }
        let prefix_ok = self.etcd_prefix.starts_with('/')
            && self.etcd_prefix.len() > 1
            && !self.etcd_prefix.ends_with('/')
            && !self.etcd_prefix.contains("//");
        if !prefix_ok {
            return invalid("etcd-prefix", "must look like /runnel (a leading /, no trailing /)");
        }
        if self.goaway_window > Duration::from_secs(600) {
            return invalid("goaway-window", "must be at most 10m");
        }
        if self.http_header_timeout < Duration::from_millis(100)
            || self.http_body_timeout < Duration::from_millis(100)
        {
            return invalid("http-header-timeout", "HTTP timeouts must be at least 100ms");
        }
        if self.api_send_timeout < Duration::from_millis(100) {
            return invalid("api-send-timeout", "must be at least 100ms");
        }
        if self.quic_max_handshakes == 0 || self.max_enrollments == 0 {
            return invalid(
                "quic-max-handshakes",
                "quic-max-handshakes and max-enrollments must be at least 1",
            );
        }
        if self.http_tls == HttpTls::Off
            && !self.http_listen.ip().is_loopback()
            && !self.http_insecure
        {
            return invalid(
                "http-listen",
                &format!(
                    "{} is not a loopback address and the API has no TLS: API keys would \
                     cross the network in clear. Use --http-tls auto (a certificate from the \
                     cluster CA; runnelctl pins it with --ca-fingerprint) or \
                     --http-tls-cert/--http-tls-key, or pass --http-insecure if a TLS \
                     proxy in front of it ends TLS",
                    self.http_listen
                ),
            );
        }
        if self.http_max_connections == 0 {
            return invalid("http-max-connections", "must be at least 1");
        }
        if self.http_max_connections_per_source == 0 {
            return invalid("http-max-connections-per-source", "must be at least 1");
        }
        if self.native_max_connections_per_tenant == 0 {
            return invalid("native-max-connections-per-tenant", "must be at least 1");
        }
        if self.http_answer_budget_bytes < 1 << 20 {
            return invalid("http-answer-budget-bytes", "must be at least 1 MiB (1048576)");
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl > Duration::from_secs(60) {
            return invalid("lease-ttl", "must be between 2s and 60s");
        }
        Ok(())
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is out of range, malformed, or contradicts another.
    #[error("{field}: {reason}")]
    Invalid {
        /// The flag / file key, as operators write it (`queue-limit`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A duration flag or key did not parse.
    #[error("{field}: {reason}")]
    Duration {
        /// The flag / file key.
        field: &'static str,
        /// What [`parse_duration`] said.
        reason: String,
    },
    /// The config file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape (unknown keys included).
    #[error("config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said.
        #[source]
        source: toml::de::Error,
    },
}

pub use runnel_protocol::duration::parse_duration;

/// The `[broker]`-less TOML file: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// See [`Config::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`Config::quic_listen`].
    pub quic_listen: Option<SocketAddr>,
    /// See [`Config::http_listen`].
    pub http_listen: Option<SocketAddr>,
    /// See [`Config::advertise`].
    pub advertise: Option<String>,
    /// See [`Config::cluster`].
    pub cluster: Option<String>,
    /// See [`Config::server_names`].
    pub server_names: Option<Vec<String>>,
    /// See [`Config::token_ttl`].
    pub token_ttl: Option<String>,
    /// See [`Config::runner_cert_validity`].
    pub runner_cert_validity: Option<String>,
    /// See [`Config::queue_limit`].
    pub queue_limit: Option<usize>,
    /// See [`Config::queue_timeout`].
    pub queue_timeout: Option<String>,
    /// See [`Config::job_timeout`].
    pub job_timeout: Option<String>,
    /// See [`Config::idle_timeout`].
    pub idle_timeout: Option<String>,
    /// See [`Config::heartbeat_interval`].
    pub heartbeat_interval: Option<String>,
    /// See [`Config::metrics_tenant_labels`].
    pub metrics_tenant_labels: Option<usize>,
    /// See [`Config::max_keys_per_tenant`].
    pub max_keys_per_tenant: Option<usize>,
    /// See [`Config::max_runners_per_tenant`].
    pub max_runners_per_tenant: Option<usize>,
    /// See [`Config::job_retention`].
    pub job_retention: Option<usize>,
    /// See [`Config::job_retention_age`].
    pub job_retention_age: Option<String>,
    /// See [`Config::job_budget_bytes`].
    pub job_budget_bytes: Option<usize>,
    /// See [`Config::max_jobs_per_tenant`].
    pub max_jobs_per_tenant: Option<usize>,
    /// See [`Config::audit_retention_count`].
    pub audit_retention_count: Option<usize>,
    /// See [`Config::audit_retention_age`].
    pub audit_retention_age: Option<String>,
    /// See [`Config::etcd`].
    pub etcd: Option<Vec<String>>,
    /// See [`Config::etcd_prefix`].
    pub etcd_prefix: Option<String>,
    /// See [`Config::node_id`].
    pub node_id: Option<String>,
    /// See [`Config::node_advertise`].
    pub node_advertise: Option<String>,
    /// See [`Config::peer_listen`].
    pub peer_listen: Option<SocketAddr>,
    /// See [`Config::lease_ttl`].
    pub lease_ttl: Option<String>,
    /// See [`Config::drain_timeout`].
    pub drain_timeout: Option<String>,
    /// See [`Config::goaway_window`].
    pub goaway_window: Option<String>,
    /// See [`Config::http_header_timeout`].
    pub http_header_timeout: Option<String>,
    /// See [`Config::http_body_timeout`].
    pub http_body_timeout: Option<String>,
    /// See [`Config::api_send_timeout`].
    pub api_send_timeout: Option<String>,
    /// See [`Config::http_max_connections`].
    pub http_max_connections: Option<usize>,
    /// See [`Config::native_max_connections_per_tenant`].
    pub native_max_connections_per_tenant: Option<usize>,
    /// See [`Config::http_max_connections_per_source`].
    pub http_max_connections_per_source: Option<usize>,
    /// See [`Config::http_answer_budget_bytes`].
    pub http_answer_budget_bytes: Option<usize>,
    /// See [`Config::rate_limit_per_source`].
    pub rate_limit_per_source: Option<u32>,
    /// See [`Config::rate_limit_per_key`].
    pub rate_limit_per_key: Option<u32>,
    /// See [`Config::quic_max_handshakes`].
    pub quic_max_handshakes: Option<usize>,
    /// See [`Config::max_enrollments`].
    pub max_enrollments: Option<usize>,
    /// See [`Config::enroll_rate_per_source`].
    pub enroll_rate_per_source: Option<u32>,
    /// See [`Config::quic_validate_above`].
    pub quic_validate_above: Option<u32>,
    /// See [`Config::quic_rate_per_source`].
    pub quic_rate_per_source: Option<u32>,
    /// `off` or `auto`; see [`HttpTls::from_parts`].
    pub http_tls: Option<String>,
    /// See [`HttpTls::Files`].
    pub http_tls_cert: Option<PathBuf>,
    /// See [`HttpTls::Files`].
    pub http_tls_key: Option<PathBuf>,
    /// See [`Config::http_insecure`].
    pub http_insecure: Option<bool>,
}

impl FileConfig {
    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_catches_inconsistent_values() {
        assert!(Config::default().validate().is_ok());
        let bad = Config { heartbeat_interval: Duration::from_secs(60), ..Config::default() };
        assert!(bad.validate().is_err());
        let bad = Config { advertise: Some("nohost".into()), ..Config::default() };
        assert!(bad.validate().is_err());
        let bad = Config { cluster: "a/b".into(), ..Config::default() };
        assert!(bad.validate().is_err());
        let bad = Config { etcd: vec!["127.0.0.1:2379".into()], ..Config::default() };
        assert!(bad.validate().is_err(), "an etcd endpoint needs its scheme");
        let good = Config { etcd: vec!["http://127.0.0.1:2379".into()], ..Config::default() };
        assert!(good.validate().is_ok());
        for prefix in ["runnel", "/", "/runnel/", "/a//b"] {
            let bad = Config { etcd_prefix: prefix.into(), ..Config::default() };
            assert!(bad.validate().is_err(), "{prefix}");
        }
        let bad = Config { node_id: "a/b".into(), ..Config::default() };
        assert!(bad.validate().is_err());
        let bad = Config { node_advertise: Some("x".into()), ..Config::default() };
        assert!(bad.validate().is_err());
        let bad = Config { api_send_timeout: Duration::from_millis(99), ..Config::default() };
        let err = bad.validate().expect_err("a send timeout under 100ms").to_string();
        assert!(err.contains("api-send-timeout"), "{err}");
        let bad = Config { http_answer_budget_bytes: (1 << 20) - 1, ..Config::default() };
        let err = bad.validate().expect_err("a budget under 1 MiB").to_string();
        assert!(err.contains("http-answer-budget-bytes"), "{err}");
        // A public API address needs TLS, or an explicit --http-insecure.
        let public = SocketAddr::from(([0, 0, 0, 0], 7480));
        let bad = Config { http_listen: public, ..Config::default() };
        let err = bad.validate().expect_err("plain HTTP on 0.0.0.0").to_string();
        assert!(err.contains("not a loopback address") && err.contains("--http-tls auto"), "{err}");
        for ok in [
            Config { http_listen: public, http_tls: HttpTls::Auto, ..Config::default() },
            Config { http_listen: public, http_insecure: true, ..Config::default() },
        ] {
            assert!(ok.validate().is_ok());
        }
    }

    #[test]
    fn http_tls_modes_parse_and_contradictions_explain() {
        let p = |m: Option<&str>, c: Option<&str>, k: Option<&str>| {
            HttpTls::from_parts(m, c.map(PathBuf::from), k.map(PathBuf::from))
        };
        assert_eq!(p(None, None, None).ok(), Some(HttpTls::Off));
        assert_eq!(p(Some("auto"), None, None).ok(), Some(HttpTls::Auto));
        assert!(matches!(p(None, Some("c"), Some("k")), Ok(HttpTls::Files { .. })));
        for (m, c, k) in [
            (None, Some("c"), None),
            (None, None, Some("k")),
            (Some("auto"), Some("c"), Some("k")),
            (Some("files"), None, None),
            (Some("yes"), None, None),
        ] {
            let e = p(m, c, k).expect_err("contradiction").to_string();
            assert!(e.starts_with("http-tls: "), "{e}");
        }
    }

    #[test]
    fn file_config_refuses_unknown_keys() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("runnel.toml");
        std::fs::write(&p, "quic-listen = \"127.0.0.1:9\"\nbogus = 1\n").expect("write");
        let err = FileConfig::load(&p).expect_err("unknown");
        assert!(matches!(err, ConfigError::Parse { .. }) && err.to_string().contains("bogus"));
        std::fs::write(&p, "quic-listen = \"127.0.0.1:9\"\nqueue-limit = 5\n").expect("write");
        let f = FileConfig::load(&p).expect("ok");
        assert_eq!(f.queue_limit, Some(5));
    }
}
