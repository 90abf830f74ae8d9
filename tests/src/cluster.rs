//! A real etcd on loopback, and clusters of real brokers on it (in this process, each
//! with its own ports and data dir).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use runnel_broker::Config;
use runnel_runner::StateDir;

use crate::TestBroker;

/// A real `etcd` (Debian's `etcd-server`) on free loopback ports with a temp data dir,
/// killed (by pid) when dropped.
pub struct EtcdServer {
    bin: PathBuf,
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> Result<u16, String> {
    let port = |l: std::net::TcpListener| l.local_addr().map(|a| a.port());
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(port)
        .map_err(|e| format!("no free port: {e}"))
}

impl EtcdServer {
    /// Starts one, or answers None (with one SKIPPED line) where etcd is not installed.
    /// In CI (`CI` set) a missing etcd fails the test instead: `.ci/run` installs it.
    pub async fn start() -> Option<Self> {
        if Command::new("etcd").arg("--version").output().is_err() {
            assert!(std::env::var_os("CI").is_none(), "etcd missing in CI: .ci/run installs it");
            eprintln!("SKIPPED: etcd not installed (apt-get install etcd-server)");
            return None;
        }
        Some(Self::start_bin(Path::new("etcd")).await.unwrap_or_else(|e| panic!("{e}")))
    }

    /// Starts the etcd binary `bin` (what `runnel-bench cluster` runs too), or says why it
    /// did not start, with etcd's log. A free port can be taken by another process before
    /// etcd binds it: then etcd exits at once saying so, and it gets other ports.
    pub async fn start_bin(bin: &Path) -> Result<Self, String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut etcd = Self {
                bin: bin.to_owned(),
                child: None,
                client_port: free_port()?,
                peer_port: free_port()?,
                dir: tempfile::tempdir().map_err(|e| format!("etcd's temp dir: {e}"))?,
            };
            match etcd.launch().await {
                Ok(()) => return Ok(etcd),
                Err(log) if attempt < 5 && log.contains("address already in use") => continue,
                Err(log) => return Err(format!("etcd on {} did not start; {log}", etcd.url())),
            }
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills it (SIGKILL); its data dir stays for [`EtcdServer::start_again`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data, and waits until it answers (a port
    /// that another process holds for a moment is tried again).
    pub async fn start_again(&mut self) {
        for attempt in 1.. {
            match self.launch().await {
                Ok(()) => return,
                Err(log) if attempt < 5 && log.contains("address already in use") => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(log) => panic!("etcd on {} did not start again; {log}", self.url()),
            }
        }
    }

    /// Starts the process and waits until it is healthy; its log when it exits first or
    /// is not healthy within 60 s.
    async fn launch(&mut self) -> Result<(), String> {
        let url = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("etcd's log: {e}"))?;
        let child = Command::new(&self.bin)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("etcd"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}"), "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let health = format!("127.0.0.1:{}", self.client_port);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let read_log = || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            format!("its log:\n{log}")
        };
        loop {
            if healthy(&health).await {
                return Ok(());
            }
            let exited = self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                self.child = None;
                return Err(read_log());
            }
            if std::time::Instant::now() > deadline {
                return Err(read_log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether etcd's `/health` on its client port says it has a leader.
async fn healthy(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let check = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\n\r\n").await.ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body.contains("\"health\":\"true\""))
    };
    tokio::time::timeout(Duration::from_secs(2), check).await.ok().flatten().unwrap_or(false)
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A cluster of in-process brokers on one etcd.
pub struct TestCluster {
    pub etcd: EtcdServer,
    pub nodes: Vec<TestBroker>,
}

impl TestCluster {
    /// `n` nodes `n1..`, started one after the other (so `n1` creates the CA and the
    /// operator key), each tweaked by `tweak`. None where etcd is not installed.
    pub async fn start(n: usize, tweak: impl Fn(&mut Config)) -> Option<Self> {
        let etcd = EtcdServer::start().await?;
        let mut c = Self { etcd, nodes: Vec::new() };
        for _ in 0..n {
            c.add_node(&tweak).await;
        }
        Some(c)
    }

    /// Starts one more node, `n<count+1>`, on the same etcd.
    pub async fn add_node(&mut self, tweak: impl Fn(&mut Config)) {
        let (url, i) = (self.etcd.url(), self.nodes.len() + 1);
        let mut node = TestBroker::start_with(|c| {
            c.etcd = vec![url];
            c.node_id = format!("n{i}");
            tweak(c);
        })
        .await;
        if let Some(first) = self.nodes.first() {
            assert!(node.operator_key.is_empty(), "only the first node mints an operator key");
            node.operator_key = first.operator_key.clone();
        }
        self.nodes.push(node);
    }

    /// The operator key (minted by the first node).
    pub fn operator_key(&self) -> &str {
        &self.nodes[0].operator_key
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One `runnel-broker serve` child process of a [`ProcessCluster`].
pub struct NodeProcess {
    pub id: String,
    pub quic: String,
    pub api: crate::Api,
    pub child: Option<tokio::process::Child>,
    args: Vec<String>,
    bin: String,
}

impl NodeProcess {
    /// The child's pid (it is running).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().and_then(|c| c.id()).map(|p| p as i32).unwrap()
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`, `TERM`) to the node.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal}");
    }

    /// Waits for the child to exit (after KILL or TERM); returns its exit status.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        tokio::time::timeout(limit, child.wait()).await.expect("node exits in time").unwrap()
    }

    /// Starts the node again with the same flags (same id, ports and data dir).
    pub async fn start_again(&mut self) {
        if let Err(e) = self.try_start().await {
            panic!("{e}");
        }
    }

    /// Starts the node and waits until it is ready; an error as soon as the child exits
    /// (a port taken since it was picked: its stderr says which), or after 30 s.
    async fn try_start(&mut self) -> Result<(), StartError> {
        let mut child = spawn_node(&self.bin, &self.args);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(StartError::Exited(format!(
                    "node {} exited at start: {status}",
                    self.id
                )));
            }
            let ready = self.api.try_call(crate::Method::GET, "/readyz", "", None).await;
            if ready.is_some_and(|(s, _)| s == 200) {
                self.child = Some(child);
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(StartError::NotReady(format!("node {} not ready in 30 s", self.id)));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Why a [`NodeProcess`] did not start.
#[derive(Debug)]
enum StartError {
    /// It exited: most often a port picked free was taken before the node bound it.
    Exited(String),
    /// It runs but never said it was ready.
    NotReady(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(m) | Self::NotReady(m) => f.write_str(m),
        }
    }
}

fn spawn_node(bin: &str, args: &[String]) -> tokio::process::Child {
    tokio::process::Command::new(bin)
        .arg("serve")
        .args(args)
        // RUNNEL_TEST_NODE_LOG (a RUST_LOG filter) shows the nodes' logs on stderr.
        .env("RUST_LOG", std::env::var("RUNNEL_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// How many clusters [`ProcessCluster::start`] tries before it gives up.
const START_TRIES: usize = 5;

/// A cluster of real `runnel-broker` processes (the binary at `bin`) on one etcd, each
/// with its own QUIC endpoint; `--advertise` lists them all, as runners without a load
/// balancer in front would use them.
pub struct ProcessCluster {
    pub etcd: EtcdServer,
    pub nodes: Vec<NodeProcess>,
    pub operator_key: String,
    _dir: tempfile::TempDir,
}

impl ProcessCluster {
    /// `n` nodes `n1..` with `extra` flags each; None where etcd is not installed.
    ///
    /// Ports are picked free and then bound by the nodes, so another process can take one
    /// in between (CI: "binding QUIC on 127.0.0.1:58188: Address already in use", then 30 s
    /// of waiting for a node that had exited). A node that exits at start makes a new
    /// cluster, on a new etcd and new ports, up to [`START_TRIES`] times.
    pub async fn start(bin: &str, n: usize, extra: &[&str]) -> Option<Self> {
        let mut last = String::new();
        for _ in 0..START_TRIES {
            match Self::try_start(bin, n, extra).await? {
                Ok(c) => return Some(c),
                Err(StartError::Exited(e)) => last = e,
                Err(e @ StartError::NotReady(_)) => panic!("{e}"),
            }
        }
        panic!("no cluster after {START_TRIES} tries: {last}");
    }

    async fn try_start(bin: &str, n: usize, extra: &[&str]) -> Option<Result<Self, StartError>> {
        let etcd = EtcdServer::start().await?;
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_udp_port(), free_port().expect("a free port"), free_udp_port()))
            .collect();
        let advertise =
            ports.iter().map(|(q, _, _)| format!("127.0.0.1:{q}")).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::new();
        for (i, (q, h, p)) in ports.iter().enumerate() {
            let id = format!("n{}", i + 1);
            let quic = format!("127.0.0.1:{q}");
            let mut args: Vec<String> = vec![
                "--etcd".into(),
                etcd.url(),
                "--node-id".into(),
                id.clone(),
                "--data-dir".into(),
                dir.path().join(&id).display().to_string(),
                "--quic-listen".into(),
                quic.clone(),
                "--http-listen".into(),
                format!("127.0.0.1:{h}"),
                "--advertise".into(),
                advertise.clone(),
                "--node-advertise".into(),
                quic.clone(),
                "--peer-listen".into(),
                format!("127.0.0.1:{p}"),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut node = NodeProcess {
                id,
                quic,
                api: crate::Api::new(format!("http://127.0.0.1:{h}")),
                child: None,
                args,
                bin: bin.to_owned(),
            };
            // One after the other: the first creates the CA and the operator key. On an
            // error the nodes already started are killed as they drop.
            if let Err(e) = node.try_start().await {
                return Some(Err(e));
            }
            nodes.push(node);
        }
        let key_file = dir.path().join("n1").join("operator.key");
        let operator_key = std::fs::read_to_string(key_file).unwrap().trim().to_owned();
        Some(Ok(Self { etcd, nodes, operator_key, _dir: dir }))
    }

    /// Creates tenant `id` through the first node; answers an admin key for it.
    pub async fn tenant(&self, id: &str) -> String {
        self.nodes[0].api.tenant(&self.operator_key, id).await
    }

    /// Creates a runner of `owner` through node `via` and enrolls it with every node's
    /// address, `via`'s first: `via` is the node it dials first, and it can reach the
    /// others when that one dies; answers (runner id, state).
    pub async fn enrolled(
        &self,
        via: usize,
        admin: &str,
        owner: &str,
        dir: &Path,
    ) -> (String, StateDir) {
        let v = self.nodes[via].api.create_runner(admin, owner, serde_json::json!({})).await;
        let fp = word_after(v["enroll_command"].as_str().unwrap(), "--ca-fingerprint");
        let n = self.nodes.len();
        let addrs: Vec<&str> = (0..n).map(|i| self.nodes[(via + i) % n].quic.as_str()).collect();
        let state = StateDir::new(dir);
        let token = v["token"].as_str().unwrap();
        runnel_runner::enroll(&addrs.join(","), fp, token, &state).await.unwrap();
        (v["runner_id"].as_str().unwrap().to_owned(), state)
    }

    /// The node that says it serves `tenant` now (None: none does, or none answers).
    pub async fn home_of(&self, tenant: &str) -> Option<usize> {
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child.is_some() && serving(&n.api, &self.operator_key).await.contains_key(tenant) {
                return Some(i);
            }
        }
        None
    }
}

/// What one node says it serves: tenant → epoch (empty when it does not answer in time).
pub async fn serving(api: &crate::Api, op: &str) -> HashMap<String, i64> {
    let call = api.try_call(crate::Method::GET, "/v1/cluster", op, None);
    let Ok(Some((200, v))) = tokio::time::timeout(Duration::from_millis(500), call).await else {
        return HashMap::new();
    };
    v["homed_here"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| Some((h["tenant"].as_str()?.to_owned(), h["epoch"].as_i64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The word after `flag` in a command line (an enroll command's `--broker`, say).
pub fn word_after<'a>(cmd: &'a str, flag: &str) -> &'a str {
    let mut words = cmd.split_whitespace();
    words.find(|w| *w == flag).and_then(|_| words.next()).unwrap()
}
