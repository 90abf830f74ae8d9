//! Support for the end-to-end tests: a real broker on loopback ephemeral ports, an HTTP
//! client for its API, and helpers to enroll and start real runners (in-process or as
//! child processes). Nothing here is mocked.
#![allow(missing_docs, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod cluster;
pub mod fleet;
pub mod netlab;

pub use cluster::{EtcdServer, NodeProcess, ProcessCluster, TestCluster, serving, word_after};
use runnel_broker::{Broker, BrokerHandle, Config};
pub use runnel_ctl::Method;
use runnel_runner::{Runner, RunnerHandle, StateDir};
use serde_json::{Value, json};

/// `main` of the helper bins (`fleet-under-test`, `delay-line-under-test`): runs `f` on a
/// tokio runtime; an error goes to stderr as `NAME: error` and exits 1.
pub fn bin_main<F>(name: &str, f: impl FnOnce() -> F) -> std::process::ExitCode
where
    F: Future<Output = Result<(), String>>,
{
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start a runtime: {e}"))
        .and_then(|rt| rt.block_on(f()));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Where `RUNNEL_TEST_LOG` holds a `RUST_LOG` filter, this test process's logs (in-process
/// runners and brokers) go to stderr; run with `--nocapture`. Child brokers of a
/// [`ProcessCluster`] read `RUNNEL_TEST_NODE_LOG` instead.
pub fn log_from_env() {
    if let Ok(filter) = std::env::var("RUNNEL_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).try_init();
    }
}

/// Polls `f` until it returns `Some`, or panics after `limit` with `what`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the wall clock (unix seconds, as tokens and certificates count it) is past
/// `t`: for expiry tests, which then wait exactly as long as the expiry needs.
pub async fn wait_past_unix(t: i64, what: &str) {
    let limit = Duration::from_secs(u64::try_from(t.saturating_sub(now_unix())).unwrap_or(0) + 5);
    wait_for(limit, what, || async { (now_unix() > t).then_some(()) }).await
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A broker under test, with its data dir.
pub struct TestBroker {
    pub handle: Option<BrokerHandle>,
    pub dir: tempfile::TempDir,
    pub operator_key: String,
    pub api: Api,
    pub config: Config,
}

impl TestBroker {
    /// Starts a broker with the test defaults.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a broker after `tweak` adjusts the config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::loopback(&dir.path().join("data"));
        tweak(&mut config);
        let handle = Broker::spawn(config.clone()).await.unwrap();
        // Empty for a cluster node other than the first (see `TestCluster`).
        let operator_key = handle.first_operator_key.clone().unwrap_or_default();
        let api = Api::for_broker(&handle);
        Self { handle: Some(handle), dir, operator_key, api, config }
    }

    pub fn handle(&self) -> &BrokerHandle {
        self.handle.as_ref().unwrap()
    }

    /// Stops the broker and starts it again on the same data dir and ports.
    pub async fn restart(&mut self) {
        let old = self.handle.take().unwrap();
        let (quic, http) = (old.quic_addr(), old.http_addr());
        old.shutdown().await;
        let mut config = self.config.clone();
        config.quic_listen = quic;
        config.http_listen = http;
        let handle = wait_for(Duration::from_secs(10), "broker restart", || {
            let c = config.clone();
            async move { Broker::spawn(c).await.ok() }
        })
        .await;
        assert!(handle.first_operator_key.is_none(), "a restart must not mint a new operator key");
        self.handle = Some(handle);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The cluster CA (with its key) from the data dir, to forge certificates in tests.
    pub fn ca(&self) -> runnel_certs::ClusterCa {
        let d = self.data_dir();
        runnel_certs::ClusterCa::from_pem(
            "runnel",
            &std::fs::read_to_string(d.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(d.join("ca.key")).unwrap(),
        )
        .unwrap()
    }

    /// Creates a tenant and returns an admin key for it.
    pub async fn tenant(&self, id: &str) -> String {
        self.api.tenant(&self.operator_key, id).await
    }

    /// Creates a key of a tenant (as operator).
    pub async fn key(&self, tenant: &str, body: Value) -> String {
        self.api.key(&self.operator_key, tenant, body).await
    }

    /// Revokes `tenant`'s first key of `role`, as its admin `admin`.
    pub async fn revoke_key_of_role(&self, admin: &str, tenant: &str, role: &str) {
        let (_, keys) = self.api.get(&format!("/v1/tenants/{tenant}/keys"), admin).await;
        let key = keys["keys"].as_array().unwrap().iter().find(|k| k["role"] == role);
        let id = key.unwrap()["id"].as_str().unwrap().to_owned();
        let (s, v) = self.api.delete(&format!("/v1/tenants/{tenant}/keys/{id}"), admin).await;
        assert_eq!(s, 200, "{v}");
    }

    /// Creates a runner record; returns the API answer (runner_id, token, enroll_command).
    pub async fn create_runner(&self, admin: &str, owner: &str, labels: Value) -> Value {
        self.api.create_runner(admin, owner, labels).await
    }

    /// Creates and enrolls a runner (through the real enrollment protocol).
    pub async fn enrolled(&self, admin: &str, owner: &str, dir: &Path) -> (String, StateDir) {
        let v = self.create_runner(admin, owner, json!({})).await;
        let state = StateDir::new(dir);
        runnel_runner::enroll(
            self.handle().advertise(),
            &self.handle().ca_fingerprint(),
            v["token"].as_str().unwrap(),
            &state,
        )
        .await
        .unwrap();
        (v["runner_id"].as_str().unwrap().to_owned(), state)
    }

    /// Creates, enrolls and starts an in-process runner; waits for its Welcome.
    pub async fn runner(
        &self,
        admin: &str,
        owner: &str,
        dir: &Path,
        capacity: u32,
    ) -> (String, RunnerHandle) {
        let (id, state) = self.enrolled(admin, owner, dir).await;
        let h = Runner::builder(state).capacity(capacity).spawn().unwrap();
        h.wait_connected(Duration::from_secs(10)).await.unwrap();
        (id, h)
    }

    /// Dispatches an exec job and waits for it to end.
    pub async fn run(&self, key: &str, owner: &str, program: &str, args: &[&str]) -> (u16, Value) {
        self.api
            .post(
                "/v1/jobs",
                key,
                json!({ "owner": owner, "kind": "exec", "exec": { "program": program, "args": args }, "wait": true }),
            )
            .await
    }

    /// Waits until a job reaches a terminal state; returns its view.
    pub async fn job_end(&self, key: &str, id: &str, limit: Duration) -> Value {
        self.api.job_end(key, id, limit).await
    }
}

/// The API as tests see it: `runnel_ctl::Client` (the one HTTP client of the project) with
/// the key chosen per call, answering `(status, body)` so tests can check error statuses.
#[derive(Clone)]
pub struct Api {
    client: runnel_ctl::Client,
}

impl Api {
    pub fn new(base: String) -> Self {
        Self { client: runnel_ctl::Client::new(&base, "") }
    }

    /// The API of `handle`: plain HTTP, or HTTPS pinned to its CA (`--http-tls`).
    pub fn for_broker(handle: &BrokerHandle) -> Self {
        let url = handle.http_url();
        if url.starts_with("https://") {
            let client = runnel_ctl::Client::pinned(&url, "", &handle.ca_fingerprint()).unwrap();
            Self { client }
        } else {
            Self::new(url)
        }
    }

    /// The client for `key`.
    pub fn as_key(&self, key: &str) -> runnel_ctl::Client {
        self.client.with_key(key)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let a = self.as_key(key).call(method, path, body.as_ref()).await.unwrap();
        (a.status, a.body)
    }

    /// Like `get`/`post`, but a node that does not answer (killed, paused, starting) is
    /// None instead of a panic.
    pub async fn try_call(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> Option<(u16, Value)> {
        let a = self.as_key(key).call(method, path, body.as_ref()).await.ok()?;
        Some((a.status, a.body))
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, key, Some(body)).await
    }

    pub async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        self.call(Method::GET, path, key, None).await
    }

    pub async fn delete(&self, path: &str, key: &str) -> (u16, Value) {
        self.call(Method::DELETE, path, key, None).await
    }

    pub async fn raw(&self, path: &str, key: &str) -> String {
        self.as_key(key).text(path).await.unwrap()
    }

    /// Creates a tenant (as operator `op`) and returns an admin key for it.
    pub async fn tenant(&self, op: &str, id: &str) -> String {
        let (s, v) = self.post("/v1/tenants", op, json!({ "id": id })).await;
        assert_eq!(s, 201, "{v}");
        self.key(op, id, json!({ "role": "admin" })).await
    }

    /// Creates a key of a tenant (as operator `op`).
    pub async fn key(&self, op: &str, tenant: &str, body: Value) -> String {
        let (s, v) = self.post(&format!("/v1/tenants/{tenant}/keys"), op, body).await;
        assert_eq!(s, 201, "{v}");
        v["key"].as_str().unwrap().to_owned()
    }

    /// Creates a runner record; returns the API answer (runner_id, token, enroll_command).
    pub async fn create_runner(&self, admin: &str, owner: &str, labels: Value) -> Value {
        let body = json!({ "owner": owner, "name": "test", "labels": labels });
        let (s, v) = self.post("/v1/runners", admin, body).await;
        assert_eq!(s, 201, "{v}");
        v
    }

    /// Waits until a job reaches a terminal state; returns its view.
    pub async fn job_end(&self, key: &str, id: &str, limit: Duration) -> Value {
        wait_for(limit, "job to end", || async {
            let (_, v) = self.get(&format!("/v1/jobs/{id}"), key).await;
            let s = v["state"].as_str().unwrap_or("").to_owned();
            (s != "queued" && s != "running").then_some(v)
        })
        .await
    }

    pub fn base(&self) -> &str {
        self.client.url()
    }
}

/// A job handler (kind `record`) that records which runner ran which job, to check
/// exactly-once delivery, and echoes the payload as output.
#[derive(Clone)]
pub struct Record {
    pub runner: String,
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

#[async_trait::async_trait]
impl runnel_runner::JobHandler for Record {
    async fn run(&self, job: runnel_runner::Job) -> runnel_protocol::JobResult {
        self.seen.lock().unwrap().push((job.id.clone(), self.runner.clone()));
        // Hold the slot a little so load spreads across runners.
        tokio::time::sleep(Duration::from_millis(5)).await;
        job.stdout(&job.payload).await;
        runnel_runner::handler::succeeded()
    }
}

/// Whether `bin` is on PATH (for tests of a real component that may be missing on a
/// developer machine; CI installs them).
pub fn installed(bin: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The value of one series in Prometheus text: `series` is the name with its labels as
/// the exporter writes them (`runnel_x_total{limit="retry"}`), or a bare name for an
/// unlabelled one. None when the series is not there (a counter never incremented).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.starts_with(' ').then(|| rest.trim().parse().ok()).flatten()
    })
}

/// Path of the real runner binary (only integration tests know it, hence a macro).
#[macro_export]
macro_rules! runner_bin {
    () => {
        env!("CARGO_BIN_EXE_runner-under-test")
    };
}

/// Starts `runnel-runner run` (the binary at `bin`) as a child process.
pub fn spawn_runner_process(bin: &str, state_dir: &Path, capacity: u32) -> tokio::process::Child {
    tokio::process::Command::new(bin)
        .args(["run", "--state-dir"])
        .arg(state_dir)
        .args(["--capacity", &capacity.to_string()])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits until the API shows a runner with `status`.
pub async fn wait_runner_status(b: &TestBroker, key: &str, id: &str, status: &str) {
    wait_for(Duration::from_secs(15), &format!("runner {id} to be {status}"), || async {
        let (_, v) = b.api.get(&format!("/v1/runners/{id}"), key).await;
        (v["status"] == status).then_some(())
    })
    .await
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A Hello as a well-behaved runner sends it, speaking protocol 2 (a stream per job):
/// what the tests that take jobs by hand expect. [`hello_v`] for another version.
pub fn hello() -> runnel_protocol::ClientControl {
    hello_v(2)
}

/// [`hello`] speaking at most protocol `max`.
pub fn hello_v(max: u16) -> runnel_protocol::ClientControl {
    runnel_protocol::ClientControl::Hello(runnel_protocol::Hello {
        min_version: runnel_protocol::version::MIN_PROTOCOL_VERSION,
        max_version: max,
        runner_version: "test".into(),
        labels: BTreeMap::new(),
        capacity: 1,
        kinds: vec!["exec".into()],
    })
}

/// Opens a raw `runnel/1` connection presenting `cert_pem`/`key_pem` (for tests that speak
/// the protocol by hand). With TLS 1.3 this can succeed even when the broker then refuses
/// the certificate; the refusal shows on the first read.
pub async fn connect_with_cert(
    b: &TestBroker,
    cert_pem: &str,
    key_pem: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    use runnel_certs::pem;
    let ca = pem::certs_from_pem(b.ca().cert_pem()).unwrap().remove(0);
    let chain = pem::certs_from_pem(cert_pem).unwrap();
    let key = pem::private_key_from_pem(key_pem).unwrap();
    let cfg = runnel_runner::tls::runner_config(ca, chain, key, Duration::from_secs(1), 8).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.connect_with(cfg, b.handle().quic_addr(), "localhost").unwrap().await
}

/// A raw native API (`runnel-api/1`) connection: dials the broker pinning its CA, says
/// hello with `key` in protocol `version`, and answers the broker's welcome. `transport`
/// sets the client's own QUIC limits (a client that grants little receive credit, say).
pub async fn native_hello(
    b: &TestBroker,
    key: &str,
    version: u16,
    transport: Option<quinn::TransportConfig>,
) -> (quinn::Endpoint, quinn::Connection, runnel_protocol::ApiWelcome) {
    use runnel_protocol::{ALPN_API, ApiHello, ApiWelcome, read_frame, write_frame};
    let pin = runnel_certs::parse_fingerprint(&b.handle().ca_fingerprint()).unwrap();
    let mut tls = runnel_certs::pin::client_config(pin).unwrap();
    tls.alpn_protocols = vec![ALPN_API.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut cfg = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    if let Some(t) = transport {
        cfg.transport_config(std::sync::Arc::new(t));
    }
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn =
        endpoint.connect_with(cfg, b.handle().quic_addr(), "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &ApiHello { version, key: key.to_owned() }).await.unwrap();
    send.finish().unwrap();
    let welcome = read_frame::<ApiWelcome, _>(&mut recv).await.unwrap().unwrap();
    (endpoint, conn, welcome)
}

/// [`connect_with_cert`] with an enrolled runner's own files.
pub async fn connect_as(b: &TestBroker, state: &StateDir) -> quinn::Connection {
    let cert = std::fs::read_to_string(state.cert_path()).unwrap();
    let key = std::fs::read_to_string(state.key_path()).unwrap();
    connect_with_cert(b, &cert, &key).await.unwrap()
}

/// A raw session that got its Welcome; returns the connection and its control streams.
pub async fn welcomed_full(
    b: &TestBroker,
    state: &StateDir,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    welcomed_speaking(b, state, hello()).await
}

/// [`welcomed_full`] with `hello` (another protocol version, say: [`hello_v`]).
pub async fn welcomed_speaking(
    b: &TestBroker,
    state: &StateDir,
    hello: runnel_protocol::ClientControl,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    use runnel_protocol::{ServerControl, read_frame, write_frame};
    let conn = connect_as(b, state).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &hello).await.unwrap();
    let welcome = read_frame::<ServerControl, _>(&mut recv).await;
    assert!(matches!(welcome, Ok(Some(ServerControl::Welcome(_)))), "{welcome:?}");
    (conn, send, recv)
}

/// [`welcomed_full`] without the receive side.
pub async fn welcomed(b: &TestBroker, state: &StateDir) -> (quinn::Connection, quinn::SendStream) {
    let (conn, send, _) = welcomed_full(b, state).await;
    (conn, send)
}

/// The application close code a connection ends with (panics on any other end, or after
/// 5 s).
pub async fn closed_with(conn: &quinn::Connection) -> u32 {
    match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            u32::try_from(c.error_code.into_inner()).unwrap()
        }
        other => panic!("unexpected close: {other:?}"),
    }
}

/// A client's ticket store that counts the session tickets the server gave it.
#[derive(Debug, Default)]
pub struct CountingTickets {
    inner: std::sync::OnceLock<std::sync::Arc<rustls::client::ClientSessionMemoryCache>>,
    /// Tickets handed to it so far.
    pub given: std::sync::atomic::AtomicUsize,
}

impl CountingTickets {
    fn cache(&self) -> &rustls::client::ClientSessionMemoryCache {
        self.inner
            .get_or_init(|| std::sync::Arc::new(rustls::client::ClientSessionMemoryCache::new(8)))
    }
}

impl rustls::client::ClientSessionStore for CountingTickets {
    fn set_kx_hint(&self, n: rustls::pki_types::ServerName<'static>, g: rustls::NamedGroup) {
        self.cache().set_kx_hint(n, g)
    }
    fn kx_hint(&self, n: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.cache().kx_hint(n)
    }
    fn set_tls12_session(
        &self,
        n: rustls::pki_types::ServerName<'static>,
        v: rustls::client::Tls12ClientSessionValue,
    ) {
        self.cache().set_tls12_session(n, v)
    }
    fn tls12_session(
        &self,
        n: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.cache().tls12_session(n)
    }
    fn remove_tls12_session(&self, n: &rustls::pki_types::ServerName<'static>) {
        self.cache().remove_tls12_session(n)
    }
    fn insert_tls13_ticket(
        &self,
        n: rustls::pki_types::ServerName<'static>,
        v: rustls::client::Tls13ClientSessionValue,
    ) {
        self.given.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.cache().insert_tls13_ticket(n, v)
    }
    fn take_tls13_ticket(
        &self,
        n: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.cache().take_tls13_ticket(n)
    }
}
