//! `runnel-bench`: load harness. See `runnel-bench --help` and BENCHMARKS.md.
//!
//! Every run starts a real `runnel-broker` process (release build next to this binary, or
//! `--broker-bin`) on loopback with a fresh data dir, so its CPU time and RSS can be read
//! from `/proc`. Runners are simulated in-process but are real QUIC clients holding real
//! certificates obtained through the real enrollment flow, sharing a few quinn endpoints.

mod broker_proc;
mod cluster;
mod crypto_floor;
mod drive;
mod failover;
mod flood;
mod http1;
mod nats;
mod proc_usage;
mod reconnect;
mod report;
mod sim;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// How long `connect` watches the broker with every runner connected and no jobs.
const IDLE_WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(name = "runnel-bench", about = "runnel load harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// T tenants × R runners, C concurrent dispatchers for D seconds.
    Load(LoadArgs),
    /// N idle runners: handshake rate, RSS per runner, dispatch while all are connected.
    Connect(ConnectArgs),
    /// Revoke N connected runners one by one: DELETE → the runner sees its connection close.
    Revoke(RevokeArgs),
    /// `load`, and the same targeted request-reply through nats-server (TLS), with one
    /// connection per requester and with all on one (before and after runnel's rows), and
    /// the ratio to the best NATS row.
    CompareNats(CompareArgs),
    /// etcd + 3 nodes: dispatch through the home and through another node (forwarding
    /// overhead), revoke every runner through another node (cross-node latency), then
    /// kill -9 the home N times (failover time).
    Cluster(ClusterArgs),
    /// R runners under the dispatch load, quiet and then while strangers flood the QUIC
    /// port with handshakes and bad enrollments: p99 and throughput of both, and the ratio.
    Flood(FloodArgs),
    /// N real runners (the runner library, full-jitter backoff), the broker restarted twice
    /// (kill -9, then SIGTERM with GoAway): time until 50/99/100% are back, the peak
    /// handshake rate, the broker's CPU during the storm.
    Reconnect(ReconnectArgs),
}

#[derive(Debug, Args)]
struct ReconnectArgs {
    /// Runners (one tenant, each its own QUIC endpoint).
    #[arg(long, short = 'n', default_value_t = 500)]
    runners: usize,
    /// The broker's idle timeout: how long a killed broker's runners take to notice.
    #[arg(long, default_value = "10s")]
    idle_timeout: String,
    /// The window a draining broker spreads its runners' reconnects over.
    #[arg(long, default_value = "5s")]
    goaway_window: String,
    /// Path of the runnel-broker binary (default: next to this one).
    #[arg(long)]
    broker_bin: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct FloodArgs {
    /// Connected runners (one tenant).
    #[arg(long, short = 'r', default_value_t = 20)]
    runners: usize,
    /// Concurrent strangers in the flood, each connecting again as soon as it is done.
    #[arg(long, default_value_t = 64)]
    attackers: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct ClusterArgs {
    /// Runners of the one tenant (all on its home).
    #[arg(long, short = 'r', default_value_t = 8)]
    runners: usize,
    /// Path of the etcd binary (default: PATH; Debian's etcd-server).
    #[arg(long)]
    etcd_bin: Option<std::path::PathBuf>,
    /// kill -9 failovers to time (kill the home → first successful dispatch elsewhere).
    #[arg(long, default_value_t = 5)]
    failovers: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct CompareArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Path of the nats-server binary (default: PATH, then /usr/sbin/nats-server).
    #[arg(long)]
    nats_bin: Option<std::path::PathBuf>,
    /// Whole runs (each with its own broker and nats-server); past one, each runnel row's
    /// ratios and their median are printed at the end.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: u32,
}

#[derive(Debug, Args)]
struct RevokeArgs {
    /// Runners to connect and then revoke.
    #[arg(long, short = 'n', default_value_t = 500)]
    runners: usize,
    /// Path of the runnel-broker binary (default: next to this one).
    #[arg(long)]
    broker_bin: Option<std::path::PathBuf>,
}

#[derive(Debug, Args, Clone)]
struct Common {
    /// Path of the runnel-broker binary (default: next to this one).
    #[arg(long)]
    broker_bin: Option<std::path::PathBuf>,
    /// Concurrent dispatchers.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Dispatch phase length in seconds.
    #[arg(long, short = 'd', default_value_t = 10)]
    duration: u64,
    /// Payload bytes per job.
    #[arg(long, short = 'p', default_value_t = 256)]
    payload: usize,
    /// quinn client endpoints the simulated runners share.
    #[arg(long, default_value_t = 4)]
    endpoints: usize,
    /// Capacity each simulated runner advertises.
    #[arg(long, default_value_t = 8)]
    runner_capacity: u32,
    /// Jobs per request of the HTTP batch phase (`--api http-batch` or `all`), at most the
    /// concurrency: the concurrency's jobs in flight as concurrency / batch requests.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=32))]
    batch: u32,
    /// The client the HTTP phases send their requests with: a lean HTTP/1.1 client with a
    /// keep-alive connection per dispatcher (as wrk), or reqwest (runnelctl's client).
    #[arg(long, value_enum, default_value_t = sim::HttpClient::Lean)]
    http_client: sim::HttpClient,
}

/// The API a dispatch phase goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Api {
    /// `POST /v1/jobs` with `wait` (HTTP/1.1 keep-alive, JSON).
    Http,
    /// `runnel-api/1` through `runnel-client` (one QUIC connection per tenant).
    Native,
    /// HTTP, then native.
    Both,
    /// `POST /v1/jobs/batch` with `wait`, `--batch` jobs a request.
    HttpBatch,
    /// HTTP, HTTP batch, then native.
    All,
}

impl Api {
    fn phases(self) -> &'static [Api] {
        match self {
            Api::Http => &[Api::Http],
            Api::Native => &[Api::Native],
            Api::Both => &[Api::Http, Api::Native],
            Api::HttpBatch => &[Api::HttpBatch],
            Api::All => &[Api::Http, Api::HttpBatch, Api::Native],
        }
    }

    fn label(self) -> &'static str {
        match self {
            Api::Http => "HTTP API",
            Api::Native => "native API",
            Api::Both => "both APIs",
            Api::HttpBatch => "HTTP API, batches",
            Api::All => "all APIs",
        }
    }
}

impl Common {
    /// Jobs per request of the HTTP batch phase: `--batch`, at most the concurrency.
    fn batch_size(&self) -> usize {
        (self.batch as usize).clamp(1, self.concurrency.max(1))
    }

    /// How a row names the API its phase went through.
    fn api_label(&self, api: Api) -> String {
        match api {
            Api::HttpBatch => format!("HTTP API, batches of {}", self.batch_size()),
            _ => api.label().to_owned(),
        }
    }

    /// The dispatch phase these flags describe, through the HTTP API.
    async fn dispatch(
        &self,
        broker: &broker_proc::BrokerProc,
        fleet: &sim::Fleet,
    ) -> drive::Dispatched {
        let len = Duration::from_secs(self.duration);
        sim::dispatch(broker, fleet, self.http_client, self.concurrency, len, self.payload).await
    }

    /// The same phase through `api` (`Http` or `Native`).
    async fn dispatch_via(
        &self,
        api: Api,
        broker: &broker_proc::BrokerProc,
        fleet: &sim::Fleet,
    ) -> anyhow::Result<drive::Dispatched> {
        let len = Duration::from_secs(self.duration);
        match api {
            Api::Native => {
                sim::dispatch_native(broker, fleet, self.concurrency, len, self.payload).await
            }
            Api::HttpBatch => {
                let batch = self.batch_size();
                let shape = (self.concurrency, batch);
                Ok(sim::dispatch_batch(broker, fleet, self.http_client, shape, len, self.payload)
                    .await)
            }
            Api::Http | Api::Both | Api::All => Ok(self.dispatch(broker, fleet).await),
        }
    }
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Tenants.
    #[arg(long, short = 't', default_value_t = 2)]
    tenants: usize,
    /// Runners per tenant.
    #[arg(long, short = 'r', default_value_t = 4)]
    runners: usize,
    /// Which API the dispatchers call: HTTP/JSON, the native QUIC API (runnel-client), or
    /// one phase of each on the same broker and runners.
    #[arg(long, value_enum, default_value_t = Api::Both)]
    api: Api,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// Idle runners to connect.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    runners: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    parallel: usize,
    /// Which API the dispatchers call: HTTP/JSON, the native QUIC API (runnel-client), or
    /// one phase of each on the same broker and runners.
    #[arg(long, value_enum, default_value_t = Api::Both)]
    api: Api,
    /// Idle traffic as in production: the broker's default heartbeat interval and the
    /// runner's default keep-alive (otherwise the fleet heartbeats every 20 s with a 10 s
    /// keep-alive, so that idle traffic stays out of the dispatch figures).
    #[arg(long)]
    production_idle: bool,
    /// Seconds the idle fleet's broker CPU is measured over, once all are connected.
    #[arg(long, default_value_t = IDLE_WINDOW.as_secs())]
    idle_window: u64,
    #[command(flatten)]
    common: Common,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The harness's own logs (its runners' and clients' quinn, say) go to stderr only when
    // RUNNEL_BENCH_LOG asks (a RUST_LOG-style filter); RUNNEL_BENCH_BROKER_LOG is the broker's.
    if let Ok(filter) = std::env::var("RUNNEL_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.command {
            Command::Load(a) => load(a).await,
            Command::Connect(a) => connect(a).await,
            Command::Revoke(a) => revoke(a).await,
            Command::CompareNats(a) => compare_nats(a).await,
            Command::Flood(a) => flood::run(&a.common, a.runners, a.attackers).await,
            Command::Reconnect(a) => {
                let bin = a.broker_bin.as_deref();
                reconnect::run(bin, a.runners, &a.idle_timeout, &a.goaway_window).await
            }
            Command::Cluster(a) => {
                let bin = a.common.broker_bin.clone();
                let etcd = a.etcd_bin.as_deref();
                cluster::run(bin.as_deref(), etcd, a.runners, a.failovers, &a.common).await
            }
        }
    })
}

async fn load(a: LoadArgs) -> anyhow::Result<()> {
    load_rows(&a).await.map(drop)
}

/// The runnel rows: a fresh broker, `a.tenants × a.runners` enrolled runners, a dispatch
/// phase per API `--api` names, on the same broker and runners one after the other.
async fn load_rows(a: &LoadArgs) -> anyhow::Result<Vec<report::Row>> {
    let broker = broker_proc::BrokerProc::start(a.common.broker_bin.as_deref()).await?;
    let fleet = sim::Fleet::enroll(&broker, a.tenants, a.runners, 64).await?;
    let connected = fleet.connect(a.common.endpoints, a.common.runner_capacity, 256).await?;
    let runners = Some((connected.conns.len(), connected.failed));
    let mut rows = Vec::new();
    for &api in a.api.phases() {
        let (before, quic) = (broker.usage()?, connected.quic());
        let d = a.common.dispatch_via(api, &broker, &fleet).await?;
        let after = broker.usage()?;
        let label = format!("{}, {}", load_label(a), a.common.api_label(api));
        rows.push(report::print("runnel", "load", &label, &d, &before, &after, runners));
        quic.print_per_job(&connected.quic(), d.ok);
    }
    drop(connected);
    broker.stop().await;
    Ok(rows)
}

async fn compare_nats(a: CompareArgs) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for _ in 0..a.runs {
        runs.push(compare_once(&a).await?);
    }
    if runs.len() > 1 {
        report::compare_runs(&runs);
    }
    Ok(())
}

/// One `compare-nats` run: NATS's shared-connection row, runnel's rows, then both NATS
/// rows again, and the ratios against the best NATS row of the three. Measuring NATS at
/// its best both before and after runnel's rows keeps a slow stretch of a noisy machine
/// during one of them from making runnel's ratio look better than it is.
async fn compare_once(a: &CompareArgs) -> anyhow::Result<Vec<report::Ratio>> {
    let Some(bin) = nats::find_bin(a.nats_bin.as_deref())? else {
        let runnel = load_rows(&a.load).await?;
        let why = "nats-server not found on PATH or in /usr/sbin (Debian: apt-get install \
                   nats-server, or pass --nats-bin)";
        return Ok(report::compare(&runnel, Err(why)));
    };
    let (l, c) = (&a.load, &a.load.common);
    let server = nats::NatsProc::start(&bin).await?;
    let runners = nats::connect_runners(&server, l.tenants, l.runners).await?;
    eprintln!(
        "nats: {} runners subscribed in {:.1}s",
        l.tenants * l.runners,
        runners.took.as_secs_f64()
    );
    let len = Duration::from_secs(c.duration);
    let nats_row = |how: nats::Requesters, when: &'static str| {
        let server = &server;
        async move {
            let before = server.usage()?;
            let d =
                nats::dispatch(server, l.tenants, l.runners, c.concurrency, len, c.payload, how)
                    .await?;
            let after = server.usage()?;
            let label = format!("{}, {}{when}", load_label(l), how.label());
            anyhow::Ok(report::print("nats", "load", &label, &d, &before, &after, None))
        }
    };
    let mut rows = vec![nats_row(nats::Requesters::SharedConnection, ", before runnel's").await?];
    let runnel = load_rows(&a.load).await?;
    for how in [nats::Requesters::OwnConnection, nats::Requesters::SharedConnection] {
        rows.push(nats_row(how, "").await?);
    }
    drop(runners);
    server.stop().await;
    Ok(report::compare(&runnel, Ok(&rows)))
}

fn load_label(a: &LoadArgs) -> String {
    format!(
        "tenants={} runners/tenant={} c={} d={}s payload={}B",
        a.tenants, a.runners, a.common.concurrency, a.common.duration, a.common.payload
    )
}

async fn connect(a: ConnectArgs) -> anyhow::Result<()> {
    // The fleet is one tenant's, so the per-tenant runner cap (10,000 by default) must
    // allow all of it: `connect -n 20000` had stopped at the 10,001st runner.
    let mut extra = vec!["--max-runners-per-tenant".to_owned(), a.runners.max(1).to_string()];
    let mut keep_alive = None;
    if a.production_idle {
        use runnel_protocol::transport::{DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_KEEP_ALIVE};
        let heartbeat = format!("{}ms", DEFAULT_HEARTBEAT_INTERVAL.as_millis());
        extra.extend(["--heartbeat-interval".to_owned(), heartbeat]);
        keep_alive = Some(DEFAULT_KEEP_ALIVE);
    }
    // The crypto floor is measured before the broker starts and again after the idle
    // window, and the two averaged: this VM's speed drifts within seconds.
    let floor_before = tokio::task::spawn_blocking(crypto_floor::per_handshake).await??;
    let bin = a.common.broker_bin.as_deref();
    let broker = broker_proc::BrokerProc::start_with(bin, "127.0.0.1:0", &extra, None).await?;
    let mut fleet = sim::Fleet::enroll(&broker, 1, a.runners, 64).await?;
    if let Some(d) = keep_alive {
        fleet = fleet.keep_alive(d);
    }
    let idle = broker.usage()?;
    let connected = fleet.connect(a.common.endpoints, a.common.runner_capacity, a.parallel).await?;
    let with_all = broker.usage()?;
    // What the idle fleet alone costs the broker (heartbeats, keep-alives, timers).
    let window = Duration::from_secs(a.idle_window.max(1));
    tokio::time::sleep(window).await;
    let idle_after = broker.usage()?;
    let idle_cpu = (idle_after.cpu_secs - with_all.cpu_secs) / window.as_secs_f64();
    let floor_after = tokio::task::spawn_blocking(crypto_floor::per_handshake).await??;
    let floor = [floor_before, floor_after];
    report::connect(&a.runners, &connected, &idle, &with_all, idle_cpu, floor);
    let mut before = idle_after;
    for &api in a.api.phases() {
        let d = a.common.dispatch_via(api, &broker, &fleet).await?;
        let after = broker.usage()?;
        let c = &a.common;
        let label = format!(
            "runners={} c={} d={}s payload={}B, {}",
            a.runners,
            c.concurrency,
            c.duration,
            c.payload,
            c.api_label(api)
        );
        let runners = Some((connected.conns.len(), connected.failed));
        report::print("runnel", "connect", &label, &d, &before, &after, runners);
        before = after;
    }
    drop(connected);
    broker.stop().await;
    Ok(())
}

async fn revoke(a: RevokeArgs) -> anyhow::Result<()> {
    let broker = broker_proc::BrokerProc::start(a.broker_bin.as_deref()).await?;
    let fleet = sim::Fleet::enroll(&broker, 1, a.runners, 64).await?;
    let connected = fleet.connect(4, 1, 256).await?;
    let (hist, failed) = sim::revoke_all(&broker, &fleet, &connected).await;
    report::revoke(&hist, failed);
    drop(connected);
    broker.stop().await;
    Ok(())
}
