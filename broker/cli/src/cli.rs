//! The `runnel-broker` command line.
//!
//! `main` does five things: set up tracing, load and validate config (exit 64 on a bad
//! one), build, log the bound addresses, and wait for a signal, then drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use runnel_broker::{
    Broker, BrokerHandle, Config, ConfigError, FileConfig, HttpTls, parse_duration,
};

/// Exit status for a bad configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "runnel-broker",
    version,
    about = "runnel broker: runners dial out over QUIC, jobs reach exactly one of them"
)]
struct Cli {
    /// Log format: pretty or json (RUST_LOG sets the level).
    #[arg(long, global = true, env = "RUNNEL_LOG_FORMAT", default_value = "pretty")]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default).
    Serve(Box<ServeArgs>),
    /// A self-contained tour: broker, two tenants, three real runners, jobs, revocation.
    Demo,
}

/// Flags of `serve`; each can also come from `RUNNEL_<NAME>` or the config file.
#[derive(Debug, Default, Args)]
struct ServeArgs {
    /// TOML config file (keys as the long flags: data-dir = "...").
    #[arg(long, env = "RUNNEL_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (CA, store). Default ./runnel-data.
    #[arg(long, env = "RUNNEL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address for runners (QUIC). Default 0.0.0.0:7443.
    #[arg(long, env = "RUNNEL_QUIC_LISTEN")]
    quic_listen: Option<SocketAddr>,
    /// TCP address of the HTTP API. Default 127.0.0.1:7480.
    #[arg(long, env = "RUNNEL_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// host:port written into enroll commands (and the server certificate); in a cluster
    /// a name every node answers to, or the nodes' own host:port list, comma-separated.
    #[arg(long, env = "RUNNEL_ADVERTISE")]
    advertise: Option<String>,
    /// Cluster name (trust domain of identities). Default runnel.
    #[arg(long, env = "RUNNEL_CLUSTER")]
    cluster: Option<String>,
    /// Extra DNS names / IPs for the server certificate (repeatable).
    #[arg(long = "server-name", env = "RUNNEL_SERVER_NAMES", value_delimiter = ',')]
    server_names: Vec<String>,
    /// Enrollment token lifetime (e.g. 1h).
    #[arg(long, env = "RUNNEL_TOKEN_TTL")]
    token_ttl: Option<String>,
    /// Runner certificate lifetime (e.g. 30d).
    #[arg(long, env = "RUNNEL_RUNNER_CERT_VALIDITY")]
    runner_cert_validity: Option<String>,
    /// Per-tenant queue limit.
    #[arg(long, env = "RUNNEL_QUEUE_LIMIT")]
    queue_limit: Option<usize>,
    /// Default queue-wait limit of a job (e.g. 30s).
    #[arg(long, env = "RUNNEL_QUEUE_TIMEOUT")]
    queue_timeout: Option<String>,
    /// Default run-time limit of a job (e.g. 10m).
    #[arg(long, env = "RUNNEL_JOB_TIMEOUT")]
    job_timeout: Option<String>,
    /// QUIC idle timeout: how fast a silent runner counts as lost (e.g. 15s).
    #[arg(long, env = "RUNNEL_IDLE_TIMEOUT")]
    idle_timeout: Option<String>,
    /// Heartbeat interval asked of runners (e.g. 5s).
    #[arg(long, env = "RUNNEL_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<String>,
    /// Tenants with their own `tenant` metric label; later ones share `_other` (0: off).
    #[arg(long, env = "RUNNEL_METRICS_TENANT_LABELS")]
    metrics_tenant_labels: Option<usize>,
    /// Live API keys one tenant may hold (default 100).
    #[arg(long, env = "RUNNEL_MAX_KEYS_PER_TENANT")]
    max_keys_per_tenant: Option<usize>,
    /// Unrevoked runners one tenant may have (default 10000).
    #[arg(long, env = "RUNNEL_MAX_RUNNERS_PER_TENANT")]
    max_runners_per_tenant: Option<usize>,
    /// Finished jobs kept per tenant for GET, newest (default 10000).
    #[arg(long, env = "RUNNEL_JOB_RETENTION")]
    job_retention: Option<usize>,
    /// Finished jobs older than this are forgotten (default 1h).
    #[arg(long, env = "RUNNEL_JOB_RETENTION_AGE")]
    job_retention_age: Option<String>,
    /// Bytes of payloads and output one tenant's jobs may hold; the oldest finished jobs'
    /// output goes first (default 268435456 = 256 MiB).
    #[arg(long, env = "RUNNEL_JOB_BUDGET_BYTES")]
    job_budget_bytes: Option<usize>,
    /// Queued plus running jobs one tenant may have; dispatch answers 429 past it
    /// (default 10000).
    #[arg(long, env = "RUNNEL_MAX_JOBS_PER_TENANT")]
    max_jobs_per_tenant: Option<usize>,
    /// Audit events kept per log, newest first (default 100000).
    #[arg(long, env = "RUNNEL_AUDIT_RETENTION_COUNT")]
    audit_retention_count: Option<usize>,
    /// Audit events older than this are deleted (default 90d).
    #[arg(long, env = "RUNNEL_AUDIT_RETENTION_AGE")]
    audit_retention_age: Option<String>,
    /// etcd endpoints (http://host:port, comma-separated): run as a cluster node on etcd
    /// instead of the embedded store.
    #[arg(long, env = "RUNNEL_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix of this cluster in etcd (default /runnel).
    #[arg(long, env = "RUNNEL_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    /// This node's id in the cluster (default: the hostname).
    #[arg(long, env = "RUNNEL_NODE_ID")]
    node_id: Option<String>,
    /// UDP address of the node-to-node endpoint (cluster only). Default 0.0.0.0:7444.
    #[arg(long, env = "RUNNEL_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// host:port of this node's own QUIC endpoint, where other nodes redirect runners.
    #[arg(long, env = "RUNNEL_NODE_ADVERTISE")]
    node_advertise: Option<String>,
    /// On SIGTERM, longest wait for accepted jobs to end and for runners to leave (default
    /// 60s).
    #[arg(long, env = "RUNNEL_DRAIN_TIMEOUT")]
    drain_timeout: Option<String>,
    /// Window a draining broker (SIGTERM) spreads its runners' reconnects over: each gets
    /// GoAway with its own delay in it (default 5s).
    #[arg(long, env = "RUNNEL_GOAWAY_WINDOW")]
    goaway_window: Option<String>,
    /// TTL of this node's membership lease in etcd (default 5s).
    #[arg(long, env = "RUNNEL_LEASE_TTL")]
    lease_ttl: Option<String>,
    /// Longest wait for a request's headers, and on an idle keep-alive connection for the
    /// next request (default 10s).
    #[arg(long, env = "RUNNEL_HTTP_HEADER_TIMEOUT")]
    http_header_timeout: Option<String>,
    /// Longest wait for a request body (default 30s).
    #[arg(long, env = "RUNNEL_HTTP_BODY_TIMEOUT")]
    http_body_timeout: Option<String>,
    /// Longest an API client (HTTP or native) may leave an answer untaken while the broker
    /// waits to write more of it; then its HTTP connection is closed, or its native call's
    /// stream reset (default 60s).
    #[arg(long, env = "RUNNEL_API_SEND_TIMEOUT")]
    api_send_timeout: Option<String>,
    /// Open HTTP API connections at most; more are closed at once (default 4096).
    #[arg(long, env = "RUNNEL_HTTP_MAX_CONNECTIONS")]
    http_max_connections: Option<usize>,
    /// Open native API connections one tenant may have; past it a client's hello is
    /// refused 429 (default 256).
    #[arg(long, env = "RUNNEL_NATIVE_MAX_CONNECTIONS_PER_TENANT")]
    native_max_connections_per_tenant: Option<usize>,
    /// Open HTTP API connections from one source address; more from it are closed at once
    /// (default 256).
    #[arg(long, env = "RUNNEL_HTTP_MAX_CONNECTIONS_PER_SOURCE")]
    http_max_connections_per_source: Option<usize>,
    /// Bytes of HTTP answers one tenant's clients may leave unread in the broker; past it
    /// the tenant's next large answer waits for room (default 67108864 = 64 MiB).
    #[arg(long, env = "RUNNEL_HTTP_ANSWER_BUDGET_BYTES")]
    http_answer_budget_bytes: Option<usize>,
    /// API requests per second from one source address, burst twice that; 429 beyond
    /// (default 2000, 0: off).
    #[arg(long, env = "RUNNEL_RATE_LIMIT_PER_SOURCE")]
    rate_limit_per_source: Option<u32>,
    /// API requests per second with one API key, burst twice that; 429 beyond
    /// (default 1000, 0: off).
    #[arg(long, env = "RUNNEL_RATE_LIMIT_PER_KEY")]
    rate_limit_per_key: Option<u32>,
    /// QUIC connections in their handshake, Hello or enrollment at once; more are refused
    /// and their runners retry after a backoff (default 1024).
    #[arg(long, env = "RUNNEL_QUIC_MAX_HANDSHAKES")]
    quic_max_handshakes: Option<usize>,
    /// Enrollments in progress at once; more are told to try again (default 64).
    #[arg(long, env = "RUNNEL_MAX_ENROLLMENTS")]
    max_enrollments: Option<usize>,
    /// Enrollment attempts per second from one source address, burst twice that
    /// (default 20, 0: off).
    #[arg(long, env = "RUNNEL_ENROLL_RATE_PER_SOURCE")]
    enroll_rate_per_source: Option<u32>,
    /// Incoming QUIC connections per second (burst twice that) past which a source must
    /// prove its address with a Retry round trip first (default 500, 0: always).
    #[arg(long, env = "RUNNEL_QUIC_VALIDATE_ABOVE")]
    quic_validate_above: Option<u32>,
    /// Incoming QUIC connections per second from one source address, burst twice that;
    /// past it the source must do a Retry, and then is refused (default 200, 0: off).
    #[arg(long, env = "RUNNEL_QUIC_RATE_PER_SOURCE")]
    quic_rate_per_source: Option<u32>,
    /// TLS on the HTTP API: off, or auto (a certificate from the cluster CA, which clients
    /// pin by fingerprint). Default off, which only a loopback --http-listen allows.
    #[arg(long, env = "RUNNEL_HTTP_TLS")]
    http_tls: Option<String>,
    /// PEM certificate chain (leaf first) for the HTTP API; with --http-tls-key.
    #[arg(long, env = "RUNNEL_HTTP_TLS_CERT")]
    http_tls_cert: Option<PathBuf>,
    /// PEM private key for the HTTP API; with --http-tls-cert.
    #[arg(long, env = "RUNNEL_HTTP_TLS_KEY")]
    http_tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback --http-listen (a TLS proxy in front ends TLS).
    #[arg(long, env = "RUNNEL_HTTP_INSECURE")]
    http_insecure: bool,
}

fn dur(
    flag: Option<String>,
    file: Option<String>,
    field: &'static str,
) -> Result<Option<std::time::Duration>, ConfigError> {
    flag.or(file)
        .map(|s| parse_duration(&s).map_err(|reason| ConfigError::Duration { field, reason }))
        .transpose()
}

impl ServeArgs {
    fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let d = Config::default();
        let or_file = |flag: Vec<String>, file: Option<Vec<String>>| {
            if flag.is_empty() { file.unwrap_or_default() } else { flag }
        };
        let server_names = or_file(self.server_names, file.server_names);
        let etcd = or_file(self.etcd, file.etcd);
        // The mode and the files come from one layer: flags win over the file as a whole.
        let http_tls = if self.http_tls.is_some()
            || self.http_tls_cert.is_some()
            || self.http_tls_key.is_some()
        {
            HttpTls::from_parts(self.http_tls.as_deref(), self.http_tls_cert, self.http_tls_key)?
        } else {
            HttpTls::from_parts(file.http_tls.as_deref(), file.http_tls_cert, file.http_tls_key)?
        };
        let http_insecure = self.http_insecure || file.http_insecure.unwrap_or(false);
        let config = Config {
            data_dir: self.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            quic_listen: self.quic_listen.or(file.quic_listen).unwrap_or(d.quic_listen),
            http_listen: self.http_listen.or(file.http_listen).unwrap_or(d.http_listen),
            advertise: self.advertise.or(file.advertise),
            cluster: self.cluster.or(file.cluster).unwrap_or(d.cluster),
            server_names,
            token_ttl: dur(self.token_ttl, file.token_ttl, "token-ttl")?.unwrap_or(d.token_ttl),
            runner_cert_validity: dur(
                self.runner_cert_validity,
                file.runner_cert_validity,
                "runner-cert-validity",
            )?
            .unwrap_or(d.runner_cert_validity),
            queue_limit: self.queue_limit.or(file.queue_limit).unwrap_or(d.queue_limit),
            queue_timeout: dur(self.queue_timeout, file.queue_timeout, "queue-timeout")?
                .unwrap_or(d.queue_timeout),
            job_timeout: dur(self.job_timeout, file.job_timeout, "job-timeout")?
                .unwrap_or(d.job_timeout),
            idle_timeout: dur(self.idle_timeout, file.idle_timeout, "idle-timeout")?
                .unwrap_or(d.idle_timeout),
            heartbeat_interval: dur(
                self.heartbeat_interval,
                file.heartbeat_interval,
                "heartbeat-interval",
            )?
            .unwrap_or(d.heartbeat_interval),
            metrics_tenant_labels: self
                .metrics_tenant_labels
                .or(file.metrics_tenant_labels)
                .unwrap_or(d.metrics_tenant_labels),
            max_keys_per_tenant: self
                .max_keys_per_tenant
                .or(file.max_keys_per_tenant)
                .unwrap_or(d.max_keys_per_tenant),
            max_runners_per_tenant: self
                .max_runners_per_tenant
                .or(file.max_runners_per_tenant)
                .unwrap_or(d.max_runners_per_tenant),
            job_retention: self.job_retention.or(file.job_retention).unwrap_or(d.job_retention),
            job_retention_age: dur(
                self.job_retention_age,
                file.job_retention_age,
                "job-retention-age",
            )?
            .unwrap_or(d.job_retention_age),
            job_budget_bytes: self
                .job_budget_bytes
                .or(file.job_budget_bytes)
                .unwrap_or(d.job_budget_bytes),
            max_jobs_per_tenant: self
                .max_jobs_per_tenant
                .or(file.max_jobs_per_tenant)
                .unwrap_or(d.max_jobs_per_tenant),
            audit_retention_count: self
                .audit_retention_count
                .or(file.audit_retention_count)
                .unwrap_or(d.audit_retention_count),
            audit_retention_age: dur(
                self.audit_retention_age,
                file.audit_retention_age,
                "audit-retention-age",
            )?
            .unwrap_or(d.audit_retention_age),
            etcd,
            etcd_prefix: self.etcd_prefix.or(file.etcd_prefix).unwrap_or(d.etcd_prefix),
            node_id: self.node_id.or(file.node_id).unwrap_or(d.node_id),
            node_advertise: self.node_advertise.or(file.node_advertise),
            peer_listen: self.peer_listen.or(file.peer_listen).unwrap_or(d.peer_listen),
            lease_ttl: dur(self.lease_ttl, file.lease_ttl, "lease-ttl")?.unwrap_or(d.lease_ttl),
            drain_timeout: dur(self.drain_timeout, file.drain_timeout, "drain-timeout")?
                .unwrap_or(d.drain_timeout),
            goaway_window: dur(self.goaway_window, file.goaway_window, "goaway-window")?
                .unwrap_or(d.goaway_window),
            http_header_timeout: dur(
                self.http_header_timeout,
                file.http_header_timeout,
                "http-header-timeout",
            )?
            .unwrap_or(d.http_header_timeout),
            http_body_timeout: dur(
                self.http_body_timeout,
                file.http_body_timeout,
                "http-body-timeout",
            )?
            .unwrap_or(d.http_body_timeout),
            api_send_timeout: dur(
                self.api_send_timeout,
                file.api_send_timeout,
                "api-send-timeout",
            )?
            .unwrap_or(d.api_send_timeout),
            http_max_connections: self
                .http_max_connections
                .or(file.http_max_connections)
                .unwrap_or(d.http_max_connections),
            native_max_connections_per_tenant: self
                .native_max_connections_per_tenant
                .or(file.native_max_connections_per_tenant)
                .unwrap_or(d.native_max_connections_per_tenant),
            http_max_connections_per_source: self
                .http_max_connections_per_source
                .or(file.http_max_connections_per_source)
                .unwrap_or(d.http_max_connections_per_source),
            http_answer_budget_bytes: self
                .http_answer_budget_bytes
                .or(file.http_answer_budget_bytes)
                .unwrap_or(d.http_answer_budget_bytes),
            rate_limit_per_source: self
                .rate_limit_per_source
                .or(file.rate_limit_per_source)
                .unwrap_or(d.rate_limit_per_source),
            rate_limit_per_key: self
                .rate_limit_per_key
                .or(file.rate_limit_per_key)
                .unwrap_or(d.rate_limit_per_key),
            quic_max_handshakes: self
                .quic_max_handshakes
                .or(file.quic_max_handshakes)
                .unwrap_or(d.quic_max_handshakes),
            max_enrollments: self
                .max_enrollments
                .or(file.max_enrollments)
                .unwrap_or(d.max_enrollments),
            enroll_rate_per_source: self
                .enroll_rate_per_source
                .or(file.enroll_rate_per_source)
                .unwrap_or(d.enroll_rate_per_source),
            quic_validate_above: self
                .quic_validate_above
                .or(file.quic_validate_above)
                .unwrap_or(d.quic_validate_above),
            quic_rate_per_source: self
                .quic_rate_per_source
                .or(file.quic_rate_per_source)
                .unwrap_or(d.quic_rate_per_source),
            http_tls,
            http_insecure,
            ..d
        };
        config.validate()?;
        Ok(config)
    }
}

/// Sets up `tracing`: `RUST_LOG` for levels (default info), pretty or JSON lines.
fn init_tracing(format: &str, default_level: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        "pretty" => builder.try_init().map_err(|e| e.to_string()),
        "json" => builder.json().try_init().map_err(|e| e.to_string()),
        other => Err(format!("unknown log format {other:?} (use pretty or json)")),
    }
}

fn print_banner(h: &BrokerHandle) {
    println!("runnel broker ready");
    println!("  QUIC (runners):  {}   advertised as {}", h.quic_addr(), h.advertise());
    println!("  HTTP API:        {}", h.http_url());
    println!("  CA fingerprint:  {}", h.ca_fingerprint());
    if let Some(file) = &h.first_operator_key_file {
        println!();
        println!("  Operator key file: {}", file.display());
        println!("  (the first operator API key, 0600, written once: move it to your secret");
        println!("  store; the broker keeps only its hash)");
        println!("  export RUNNEL_URL={} RUNNEL_KEY=$(cat {})", h.http_url(), file.display());
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// The environment variable tokio reads for its number of worker threads.
const WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// The runtime: a worker thread per CPU, or as many as `TOKIO_WORKER_THREADS` says. tokio
/// reads that variable itself and panics on anything but a positive whole number; it is
/// checked here first, so a bad value is a configuration error like a bad flag.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    let usable = |v: &std::ffi::OsStr| v.to_str().and_then(|s| s.parse::<usize>().ok()) > Some(0);
    if let Some(v) = std::env::var_os(WORKER_THREADS_ENV)
        && !usable(&v)
    {
        eprintln!(
            "runnel-broker: invalid configuration: {WORKER_THREADS_ENV} must be a positive \
             whole number (worker threads), not {v:?}"
        );
        return Err(ExitCode::from(EXIT_CONFIG));
    }
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("runnel-broker: cannot start runtime: {e}");
        ExitCode::FAILURE
    })
}

fn run_demo() -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(crate::demo::run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runnel-broker demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command line; returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo narrates on stdout; its logs stay quiet unless RUST_LOG asks.
    let level = if matches!(cli.command, Some(Command::Demo)) { "warn" } else { "info" };
    if let Err(e) = init_tracing(&cli.log_format, level) {
        eprintln!("runnel-broker: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let args = match cli.command.unwrap_or(Command::Serve(Box::default())) {
        Command::Serve(args) => args,
        Command::Demo => return run_demo(),
    };
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("runnel-broker: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let handle = match Broker::spawn(config).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("runnel-broker: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        print_banner(&handle);
        wait_for_signal().await;
        tracing::info!("signal received; draining and shutting down");
        handle.drain().await;
        handle.shutdown().await;
        ExitCode::SUCCESS
    })
}
