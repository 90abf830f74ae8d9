//! Simulated runners: real enrollment, real certificates, real QUIC connections (many per
//! endpoint), answering an `echo` job kind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use runnel_certs::pem;
use runnel_ctl::{Client, Method};
use runnel_protocol::{
    BrokerJobFrame, ClientControl, Heartbeat, Hello, JobOutcome, JobResult, LaneFrame, Outbox,
    OutputStream, RunnerJobFrame, ServerControl, encode_append, read_frame, write_frame,
};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::broker_proc::BrokerProc;
use crate::drive::{Dispatched, closed_loop, histogram};
use crate::http1::{self, Http1Conn};

pub(crate) const OWNER: &str = "o";

pub(crate) struct Identity {
    pub(crate) runner_id: String,
    cert_pem: String,
    key_pem: String,
}

pub(crate) struct TenantFleet {
    pub(crate) admin: String,
    pub(crate) runners: Vec<Identity>,
}

pub(crate) struct Fleet {
    pub(crate) tenants: Vec<TenantFleet>,
    ca_pem: String,
    quic: String,
    /// The runners' QUIC keep-alive.
    keep_alive: Duration,
}

/// The simulated runners' keep-alive unless a bench asks for another: with the bench
/// broker's 20 s heartbeats, the idle fleet's packets are few and steady.
const BENCH_KEEP_ALIVE: Duration = Duration::from_secs(10);

impl Fleet {
    /// Creates `tenants` tenants with `per_tenant` runners each, enrolled for real.
    pub(crate) async fn enroll(
        b: &BrokerProc,
        tenants: usize,
        per_tenant: usize,
        parallel: usize,
    ) -> anyhow::Result<Self> {
        let operator = Client::new(&b.http, &b.operator_key);
        let dir = tempfile::tempdir()?;
        let t0 = Instant::now();
        let mut out = Vec::new();
        for t in 0..tenants {
            let tenant = format!("t{t}");
            operator.post("/v1/tenants", json!({ "id": tenant })).await?;
            let admin = operator
                .post(&format!("/v1/tenants/{tenant}/keys"), json!({ "role": "admin" }))
                .await?["key"]
                .as_str()
                .context("key")?
                .to_owned();
            let runners = futures::stream::iter(0..per_tenant)
                .map(|i| {
                    let (client, dir) =
                        (operator.with_key(&admin), dir.path().join(format!("{t}-{i}")));
                    async move {
                        let v = client
                            .post(
                                "/v1/runners",
                                json!({ "owner": OWNER, "name": format!("sim{i}") }),
                            )
                            .await?;
                        let state = runnel_runner::StateDir::new(&dir);
                        runnel_runner::enroll(
                            &b.quic,
                            &b.fingerprint,
                            v["token"].as_str().context("token")?,
                            &state,
                        )
                        .await?;
                        Ok::<_, anyhow::Error>(Identity {
                            runner_id: v["runner_id"].as_str().context("runner_id")?.to_owned(),
                            cert_pem: std::fs::read_to_string(state.cert_path())?,
                            key_pem: std::fs::read_to_string(state.key_path())?,
                        })
                    }
                })
                .buffer_unordered(parallel)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<anyhow::Result<Vec<_>>>()?;
            out.push(TenantFleet { admin, runners });
        }
        let n: usize = out.iter().map(|t| t.runners.len()).sum();
        eprintln!("enrolled {n} runners in {:.1}s", t0.elapsed().as_secs_f64());
        let ca_pem = std::fs::read_to_string(dir.path().join("0-0").join("ca.pem"))?;
        Ok(Self { tenants: out, ca_pem, quic: b.quic.clone(), keep_alive: BENCH_KEEP_ALIVE })
    }

    /// The same fleet, its runners keeping their connections alive every `d`.
    pub(crate) fn keep_alive(mut self, d: Duration) -> Self {
        self.keep_alive = d;
        self
    }

    /// The same fleet, dialling `quic` (a cluster node: the tenants' home) instead.
    pub(crate) fn dialling(mut self, quic: &str) -> Self {
        quic.clone_into(&mut self.quic);
        self
    }

    /// Connects every runner (Hello → Welcome) over `endpoints` shared quinn endpoints.
    pub(crate) async fn connect(
        &self,
        endpoints: usize,
        capacity: u32,
        parallel: usize,
    ) -> anyhow::Result<Connected> {
        let eps = (0..endpoints.max(1))
            .map(|_| client_endpoint(endpoints))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ca = pem::certs_from_pem(&self.ca_pem)?.remove(0);
        let addr: std::net::SocketAddr = self.quic.parse()?;
        let keep_alive = self.keep_alive;
        let all: Vec<(usize, &Identity)> = self
            .tenants
            .iter()
            .enumerate()
            .flat_map(|(t, f)| f.runners.iter().map(move |r| (t, r)))
            .collect();
        let t0 = Instant::now();
        let mut tasks = JoinSet::new();
        let conns = futures::stream::iter(all.into_iter().enumerate())
            .map(|(i, (tenant, id))| {
                let ep = eps[i % eps.len()].clone();
                let ca = ca.clone();
                async move {
                    let chain = pem::certs_from_pem(&id.cert_pem)?;
                    let key = pem::private_key_from_pem(&id.key_pem)?;
                    let cfg = runnel_runner::tls::runner_config(
                        ca,
                        chain,
                        key,
                        keep_alive,
                        runnel_runner::tls::job_streams(capacity),
                    )?;
                    let conn = ep.connect_with(cfg, addr, "localhost")?.await?;
                    let (mut send, mut recv) = conn.open_bi().await?;
                    let hello = ClientControl::Hello(Hello {
                        min_version: 1,
                        max_version: runnel_protocol::PROTOCOL_VERSION,
                        runner_version: "bench".into(),
                        labels: Default::default(),
                        capacity,
                        kinds: vec!["echo".into()],
                    });
                    write_frame(&mut send, &hello).await?;
                    match read_frame::<ServerControl, _>(&mut recv).await? {
                        Some(ServerControl::Welcome(w)) => {
                            let hb = (w.heartbeat_interval_ms, w.version);
                            let runner_id = id.runner_id.clone();
                            Ok::<_, anyhow::Error>((conn, send, recv, hb, tenant, runner_id))
                        }
                        other => anyhow::bail!("no Welcome: {other:?}"),
                    }
                }
            })
            .buffer_unordered(parallel.max(1))
            .collect::<Vec<_>>()
            .await;
        let took = t0.elapsed();
        let mut live = Vec::new();
        let mut failed = 0usize;
        for c in conns {
            match c {
                Ok((conn, send, recv, hb, tenant, runner_id)) => {
                    tasks.spawn(serve(conn.clone(), send, recv, hb));
                    live.push(Live { conn, tenant, runner_id });
                }
                Err(e) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("connect failed: {e:#}");
                    }
                }
            }
        }
        Ok(Connected { conns: live, failed, took, _tasks: tasks, _endpoints: eps })
    }
}

/// A client endpoint for a share of the simulated runners. Thousands of connections share
/// its one UDP socket, so it gets large kernel buffers (capped by net.core.rmem_max), as the
/// broker's socket does; with the default, the harness itself would drop packets.
fn client_endpoint(endpoints: usize) -> anyhow::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let per = (16 << 20) / endpoints.max(1);
    socket2::SockRef::from(&socket).set_recv_buffer_size(per)?;
    socket2::SockRef::from(&socket).set_send_buffer_size(per)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    Ok(quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)?)
}

/// One connected simulated runner.
pub(crate) struct Live {
    pub(crate) conn: quinn::Connection,
    /// Index of its tenant in [`Fleet::tenants`].
    pub(crate) tenant: usize,
    pub(crate) runner_id: String,
}

/// Live simulated runners; dropping closes them.
pub(crate) struct Connected {
    pub(crate) conns: Vec<Live>,
    pub(crate) failed: usize,
    pub(crate) took: Duration,
    _tasks: JoinSet<()>,
    _endpoints: Vec<quinn::Endpoint>,
}

/// What the simulated runners' QUIC connections sent and received, all together.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct QuicCount {
    datagrams_tx: u64,
    datagrams_rx: u64,
    /// Frames the runners sent that are not data or acknowledgements: stream credit
    /// (`MAX_STREAMS`) and `STOP_SENDING`.
    credit_tx: u64,
    stop_tx: u64,
}

impl Connected {
    /// The runners' QUIC counters now (quinn's per-connection stats, summed).
    pub(crate) fn quic(&self) -> QuicCount {
        self.conns.iter().map(|c| c.conn.stats()).fold(QuicCount::default(), |n, s| QuicCount {
            datagrams_tx: n.datagrams_tx + s.udp_tx.datagrams,
            datagrams_rx: n.datagrams_rx + s.udp_rx.datagrams,
            credit_tx: n.credit_tx + s.frame_tx.max_streams_bidi,
            stop_tx: n.stop_tx + s.frame_tx.stop_sending,
        })
    }
}

impl QuicCount {
    /// One report line: per job, what the runners sent and received between `self` and
    /// `after` (on loopback each of these datagrams is one the broker received or sent).
    pub(crate) fn print_per_job(&self, after: &QuicCount, jobs: u64) {
        let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / jobs.max(1) as f64;
        println!(
            "  runner datagrams sent {:.2}/job, received {:.2}/job (MAX_STREAMS {:.2}/job, \
             STOP_SENDING {:.2}/job)",
            per(self.datagrams_tx, after.datagrams_tx),
            per(self.datagrams_rx, after.datagrams_rx),
            per(self.credit_tx, after.credit_tx),
            per(self.stop_tx, after.stop_tx),
        );
    }
}

async fn serve(
    conn: quinn::Connection,
    mut control: quinn::SendStream,
    mut from_broker: quinn::RecvStream,
    (heartbeat_ms, version): (u32, u16),
) {
    let hb = async move {
        let mut t = tokio::time::interval(Duration::from_millis(u64::from(heartbeat_ms.max(1000))));
        loop {
            t.tick().await;
            let m = ClientControl::Heartbeat(Heartbeat { in_flight: 0, load_milli: 0 });
            if write_frame(&mut control, &m).await.is_err() {
                return;
            }
        }
    };
    // Results leave through one task per connection, as the real runner's do
    // (`runnel_runner`'s session.rs): written together, they share datagrams. With
    // protocol 3 every job comes on one lane, as the real runner takes them.
    let outbox = Outbox::start();
    let jobs = async {
        if version >= runnel_protocol::version::JOB_LANE {
            if let Ok((send, recv)) = conn.accept_bi().await {
                lane_jobs(send, recv).await;
            }
            return;
        }
        while let Ok((send, mut recv)) = conn.accept_bi().await {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let Ok(Some(BrokerJobFrame::Job(job))) =
                    read_frame::<BrokerJobFrame, _>(&mut recv).await
                else {
                    return;
                };
                let mut answer = Vec::new();
                if echo(job.payload).iter().all(|f| encode_append(&mut answer, f).is_ok())
                    && let Ok(send) = outbox.deliver(send, answer).await
                {
                    let _ = send.stopped().await;
                    // Then the broker's end, as the real runner waits for it: dropped
                    // unread, the stream would make quinn send a STOP_SENDING, which would
                    // leave alone, ahead of the Result in the outbox (BENCHMARKS.md).
                    let end = read_frame::<BrokerJobFrame, _>(&mut recv);
                    let _ = tokio::time::timeout(Duration::from_secs(1), end).await;
                }
            });
        }
    };
    // A draining broker's GoAway: leave at once (a simulated runner runs nothing that
    // outlives its stream), as a real runner with no job running does.
    let goaway = async {
        while let Ok(Some(m)) = read_frame::<ServerControl, _>(&mut from_broker).await {
            if matches!(m, ServerControl::GoAway(_)) {
                conn.close(0u32.into(), b"going away");
                return;
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::select! { _ = hb => {}, _ = jobs => {}, _ = goaway => {} }
}

/// An echo's answer: the payload as output, then a successful Result (the real runner
/// writes the output queued before the Result with it).
fn echo(payload: Vec<u8>) -> [RunnerJobFrame; 2] {
    let output = RunnerJobFrame::Output { stream: OutputStream::Stdout, data: payload };
    let result = RunnerJobFrame::Result(JobResult {
        outcome: JobOutcome::Succeeded,
        exit_code: Some(0),
        message: String::new(),
        output_truncated: false,
    });
    [output, result]
}

/// A simulated runner's job lane (protocol 3): every job read in one task and answered
/// through one writer, which writes what comes together at once (as the real runner's
/// lane writer does).
async fn lane_jobs(mut send: quinn::SendStream, recv: quinn::RecvStream) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let writer = async move {
        runnel_protocol::write_lane(&mut send, &mut rx, Vec::new()).await;
    };
    let reader = async move {
        let mut recv = runnel_protocol::lane_reader(recv);
        while let Ok(Some(LaneFrame { job, frame })) =
            read_frame::<LaneFrame<BrokerJobFrame>, _>(&mut recv).await
        {
            let BrokerJobFrame::Job(req) = frame else { continue };
            let mut answer = Vec::new();
            for frame in echo(req.payload) {
                if encode_append(&mut answer, &LaneFrame { job, frame }).is_err() {
                    return;
                }
            }
            if tx.send(answer).is_err() {
                return;
            }
        }
    };
    tokio::join!(writer, reader);
}

/// Which client the HTTP rows send their requests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum HttpClient {
    /// A lean HTTP/1.1 client (`http1.rs`): one keep-alive connection per dispatcher.
    #[default]
    Lean,
    /// reqwest, through `runnelctl`'s client: a pool shared by all dispatchers.
    Reqwest,
}

/// The HTTP rows' senders: each dispatcher posts one body to one path with its tenant's
/// admin key (dispatcher `w` uses tenant `w % tenants`).
enum Posters {
    /// A connection per dispatcher, and each tenant's request bytes made once.
    Lean { conns: Vec<tokio::sync::Mutex<Http1Conn>>, requests: Vec<Vec<u8>> },
    /// A client per tenant's key on one connection pool.
    Reqwest { clients: Vec<Client>, path: &'static str, body: Value },
}

impl Posters {
    fn new(
        b: &BrokerProc,
        fleet: &Fleet,
        client: HttpClient,
        dispatchers: usize,
        path: &'static str,
        body: Value,
    ) -> Self {
        match client {
            HttpClient::Lean => {
                let host = b.http.trim_start_matches("http://").trim_end_matches('/');
                let bytes = body.to_string().into_bytes();
                let requests = fleet
                    .tenants
                    .iter()
                    .map(|t| http1::post_request(host, path, &t.admin, &bytes))
                    .collect();
                let conns = (0..dispatchers)
                    .map(|_| tokio::sync::Mutex::new(Http1Conn::new(host.to_owned())))
                    .collect();
                Posters::Lean { conns, requests }
            }
            HttpClient::Reqwest => {
                let base = Client::new(&b.http, "");
                let clients = fleet.tenants.iter().map(|t| base.with_key(&t.admin)).collect();
                Posters::Reqwest { clients, path, body }
            }
        }
    }

    /// Dispatcher `w`'s request; the answer's body read as a `T` when it is a 200, else the
    /// failure's kind.
    async fn post<T: serde::de::DeserializeOwned>(&self, w: usize) -> Result<T, String> {
        let (status, body) = match self {
            Posters::Lean { conns, requests } => {
                let mut conn = conns[w % conns.len()].lock().await;
                let answer = conn.send(&requests[w % requests.len()]).await?;
                (answer.status, serde_json::from_slice(answer.body))
            }
            Posters::Reqwest { clients, path, body } => {
                let client = &clients[w % clients.len()];
                let answer = client
                    .call(Method::POST, path, Some(body))
                    .await
                    .map_err(|_| "transport".to_string())?;
                (answer.status, serde_json::from_value(answer.body))
            }
        };
        if status != 200 {
            return Err(format!("http:{status}"));
        }
        body.map_err(|_| "bad_json".to_string())
    }

    /// What the row's notes say of the client.
    fn note(&self) -> String {
        match self {
            Posters::Lean { .. } => {
                "  HTTP client: lean HTTP/1.1, a keep-alive connection per dispatcher".to_owned()
            }
            Posters::Reqwest { .. } => "  HTTP client: reqwest (runnelctl's), one pool".to_owned(),
        }
    }
}

/// The job each HTTP dispatcher dispatches: an echo of `payload` bytes, waited for.
fn echo_job(payload: usize) -> Value {
    json!({ "owner": OWNER, "kind": "echo", "payload": "x".repeat(payload), "wait": true })
}

/// What the HTTP rows read of a job's answer (the rest is skipped, not built into a
/// JSON tree: that tree was 12% of the whole harness's CPU in the HTTP row).
#[derive(serde::Deserialize)]
struct Echo {
    state: Option<String>,
    output: Option<String>,
    error: Option<EchoError>,
}

#[derive(serde::Deserialize)]
struct EchoError {
    code: String,
}

/// A batch's answer: its jobs in order.
#[derive(serde::Deserialize)]
struct EchoBatch {
    jobs: Vec<Echo>,
}

/// Whether a job's answer `v` says it succeeded echoing `payload` bytes (a batch's job
/// refused on its own names its error's code).
fn echoed(v: &Echo, payload: usize) -> Result<(), String> {
    if v.state.as_deref() != Some("succeeded") {
        let why = v.state.as_deref().or(v.error.as_ref().map(|e| e.code.as_str()));
        return Err(format!("state:{}", why.unwrap_or("?")));
    }
    if v.output.as_deref().map(str::len) != Some(payload) {
        return Err("wrong_output".to_string());
    }
    Ok(())
}

/// `concurrency` dispatchers, each in a loop of `POST /v1/jobs` with `wait`, for `len`.
pub(crate) async fn dispatch(
    b: &BrokerProc,
    fleet: &Fleet,
    client: HttpClient,
    concurrency: usize,
    len: Duration,
    payload: usize,
) -> Dispatched {
    let posters =
        Arc::new(Posters::new(b, fleet, client, concurrency, "/v1/jobs", echo_job(payload)));
    let note = posters.note();
    let mut r = closed_loop(concurrency, len, move |w, _| {
        let posters = posters.clone();
        async move {
            let v: Echo = posters.post(w).await?;
            echoed(&v, payload)?;
            Ok(1)
        }
    })
    .await;
    r.notes.push(note);
    r
}

/// The same load through `POST /v1/jobs/batch`: `concurrency` jobs in flight as
/// `concurrency / batch` dispatchers, each posting `batch` jobs with `wait` and counting
/// them once the answer says each succeeded with its output.
pub(crate) async fn dispatch_batch(
    b: &BrokerProc,
    fleet: &Fleet,
    client: HttpClient,
    (concurrency, batch): (usize, usize),
    len: Duration,
    payload: usize,
) -> Dispatched {
    let batch = batch.max(1);
    let dispatchers = (concurrency / batch).max(1);
    let body = json!({ "jobs": vec![echo_job(payload); batch] });
    let posters = Arc::new(Posters::new(b, fleet, client, dispatchers, "/v1/jobs/batch", body));
    let note = posters.note();
    let mut r = closed_loop(dispatchers, len, move |w, _| {
        let posters = posters.clone();
        async move {
            let v: EchoBatch = posters.post(w).await?;
            if v.jobs.len() != batch {
                return Err("wrong_batch".to_string());
            }
            v.jobs.iter().try_for_each(|v| echoed(v, payload))?;
            Ok(batch as u64)
        }
    })
    .await;
    r.notes.push(note);
    r
}

/// The same dispatch load over the native API (`runnel-client`): `concurrency`
/// dispatchers, each in a loop of `submit` with `wait`, for `len`. The dispatchers of a
/// tenant share one client (one QUIC connection), as NATS requesters share theirs in the
/// peer row.
pub(crate) async fn dispatch_native(
    b: &BrokerProc,
    fleet: &Fleet,
    concurrency: usize,
    len: Duration,
    payload: usize,
) -> anyhow::Result<Dispatched> {
    let mut clients = Vec::new();
    for t in &fleet.tenants {
        clients.push(runnel_client::Client::connect(&b.quic, &b.fingerprint, &t.admin).await?);
    }
    let clients: Arc<[runnel_client::Client]> = clients.into();
    let mut spec = runnel_client::job(OWNER, "echo", vec![b'x'; payload]);
    spec.wait = true;
    let before: Vec<_> = clients.iter().map(runnel_client::Client::stats).collect();
    let stats = clients.clone();
    let mut r = closed_loop(concurrency, len, move |w, _| {
        let (spec, clients) = (spec.clone(), clients.clone());
        async move {
            let client = &clients[w % clients.len()];
            let job = client.submit(spec).await.map_err(|e| match e.status() {
                Some(s) => format!("refused:{s}"),
                None => "transport".to_string(),
            })?;
            if job.state != runnel_protocol::JobState::Succeeded {
                return Err(format!("state:{:?}", job.state));
            }
            if job.output.len() != payload {
                return Err("wrong_output".to_string());
            }
            Ok(1)
        }
    })
    .await;
    let (mut sent, mut received) = (0, 0);
    for (c, a) in stats.iter().zip(before) {
        let b = c.stats();
        sent += b.datagrams_sent.saturating_sub(a.datagrams_sent);
        received += b.datagrams_received.saturating_sub(a.datagrams_received);
    }
    let per = |n: u64| n as f64 / r.ok.max(1) as f64;
    r.notes.push(format!(
        "  client datagrams sent {:.2}/job, received {:.2}/job",
        per(sent),
        per(received)
    ));
    Ok(r)
}

/// Revokes every connected runner, one at a time, and measures DELETE sent → the runner's
/// connection closed (as the runner sees it).
pub(crate) async fn revoke_all(
    b: &BrokerProc,
    fleet: &Fleet,
    connected: &Connected,
) -> (Histogram<u64>, usize) {
    let base = Client::new(&b.http, "");
    let mut hist = histogram();
    let mut failed = 0;
    for live in &connected.conns {
        let admin = &fleet.tenants[live.tenant].admin;
        let closed = live.conn.clone();
        let t0 = Instant::now();
        let waiter = tokio::spawn(async move {
            closed.closed().await;
            t0.elapsed()
        });
        let ok =
            base.with_key(admin).delete(&format!("/v1/runners/{}", live.runner_id)).await.is_ok();
        match tokio::time::timeout(Duration::from_secs(10), waiter).await {
            Ok(Ok(took)) if ok => {
                let _ = hist.record(took.as_micros() as u64);
            }
            _ => failed += 1,
        }
    }
    (hist, failed)
}
