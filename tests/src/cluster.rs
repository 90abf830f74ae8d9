//! A real etcd on loopback, and clusters of real brokers on it (in this process, each
//! with its own ports and data dir).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use runnel_broker::Config;

use crate::{TestBroker, wait_for};

/// A real `etcd` (Debian's `etcd-server`) on free loopback ports with a temp data dir,
/// killed (by pid) when dropped.
pub struct EtcdServer {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
        let mut etcd = Self {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        etcd.start_again().await;
        Some(etcd)
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

    /// Starts it again on the same ports and data, and waits until it answers.
    pub async fn start_again(&mut self) {
        let url = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("etcd"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}"), "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let health = format!("127.0.0.1:{}", self.client_port);
        wait_for(Duration::from_secs(20), "etcd to answer", || async {
            // etcd answers /health on its client port once it has a leader.
            let mut s = tokio::net::TcpStream::connect(&health).await.ok()?;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /health HTTP/1.0\r\n\r\n").await.ok()?;
            let mut body = String::new();
            s.read_to_string(&mut body).await.ok()?;
            body.contains("\"health\":\"true\"").then_some(())
        })
        .await;
    }
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
        let mut nodes: Vec<TestBroker> = Vec::new();
        for i in 1..=n {
            let url = etcd.url();
            let mut node = TestBroker::start_with(|c| {
                c.etcd = vec![url];
                c.node_id = format!("n{i}");
                tweak(c);
            })
            .await;
            if let Some(first) = nodes.first() {
                assert!(node.operator_key.is_empty(), "only the first node mints an operator key");
                node.operator_key = first.operator_key.clone();
            }
            nodes.push(node);
        }
        Some(Self { etcd, nodes })
    }

    /// The operator key (minted by the first node).
    pub fn operator_key(&self) -> &str {
        &self.nodes[0].operator_key
    }
}
