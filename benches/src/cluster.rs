//! `cluster`: a real etcd and three `runnel-broker` nodes on this machine. One tenant's
//! runners connect to its home; the same closed-loop dispatch runs through the home and
//! then through another node (forwarded over `runnel-peer/1`), which gives the forwarding
//! overhead; then every runner is revoked through a node that is not the home, measured
//! until the runner sees its connection close; last, kill -9 failovers
//! (see [`crate::failover`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use runnel_ctl::Client;
use serde_json::json;

use crate::broker_proc::BrokerProc;
use crate::{report, sim};

/// etcd from `--etcd-bin`, PATH or /usr/bin (Debian's etcd-server).
pub(crate) fn find_etcd(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let found = std::process::Command::new("sh").args(["-c", "command -v etcd"]).output()?;
    if found.status.success() {
        return Ok(PathBuf::from(String::from_utf8_lossy(&found.stdout).trim()));
    }
    bail!("etcd not found (Debian: apt-get install etcd-server, or pass --etcd-bin)")
}

/// One cluster node: a fixed id and fixed addresses, so that it can start again after a
/// kill and its runners (whose address list names every node) find it.
pub(crate) struct Node {
    pub(crate) id: String,
    pub(crate) quic: String,
    args: Vec<String>,
    pub(crate) proc: Option<BrokerProc>,
}

impl Node {
    /// (Re)starts the broker. `operator_key`: the cluster's key, once the first node minted it.
    pub(crate) async fn start(
        &mut self,
        bin: Option<&Path>,
        operator_key: &str,
    ) -> anyhow::Result<()> {
        let key = (!operator_key.is_empty()).then_some(operator_key);
        self.proc = Some(BrokerProc::start_with(bin, &self.quic, &self.args, key).await?);
        Ok(())
    }

    pub(crate) async fn kill(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill().await;
        }
    }

    fn running(&self) -> anyhow::Result<&BrokerProc> {
        self.proc.as_ref().with_context(|| format!("node {} is not running", self.id))
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Three nodes on `etcd`, each with its own runner address; `--advertise` lists them all.
/// Runners notice a dead node through QUIC's idle timeout, so it is short here (2 s, with
/// heartbeats every 500 ms), as in the failover test.
async fn start_nodes(bin: Option<&Path>, etcd: &str) -> anyhow::Result<(Vec<Node>, String)> {
    let quic: Vec<String> = (0..3)
        .map(|_| Ok(format!("127.0.0.1:{}", free_udp_port()?)))
        .collect::<anyhow::Result<_>>()?;
    let every = quic.join(",");
    let mut nodes = Vec::new();
    let mut key = String::new();
    for (i, q) in quic.into_iter().enumerate() {
        let id = format!("n{}", i + 1);
        let args = [
            "--etcd",
            etcd,
            "--node-id",
            &id,
            "--peer-listen",
            "127.0.0.1:0",
            "--advertise",
            &every,
            "--node-advertise",
            &q,
            "--idle-timeout",
            "2s",
            "--heartbeat-interval",
            "500ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut node = Node { id, quic: q, args, proc: None };
        // One after the other: the first creates the CA and the operator key.
        node.start(bin, &key).await?;
        key.clone_from(&node.running()?.operator_key);
        nodes.push(node);
    }
    Ok((nodes, key))
}

/// The whole `cluster` run.
pub(crate) async fn run(
    broker_bin: Option<&Path>,
    etcd_bin: Option<&Path>,
    runners: usize,
    failovers: usize,
    common: &crate::Common,
) -> anyhow::Result<()> {
    let mut etcd = runnel_tests::EtcdServer::start_bin(&find_etcd(etcd_bin)?)
        .await
        .map_err(anyhow::Error::msg)?;
    let (mut cluster, operator_key) = start_nodes(broker_bin, &etcd.url()).await?;
    let nodes: Vec<&BrokerProc> = cluster.iter().map(Node::running).collect::<Result<_, _>>()?;
    let fleet = sim::Fleet::enroll(nodes[0], 1, runners, 64).await?;
    // A first dispatch claims the tenant; etcd then names its home.
    let admin = Client::new(&nodes[0].http, &fleet.tenants[0].admin);
    let _ = admin.post("/v1/jobs", json!({ "owner": sim::OWNER, "kind": "echo" })).await;
    let status = Client::new(&nodes[0].http, &operator_key).get("/v1/cluster").await?;
    let home_id = status["tenants"][0]["node"].as_str().context("no home claimed")?;
    let home_http = status["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == home_id))
        .and_then(|n| n["http"].as_str())
        .context("home node not listed")?;
    let home = nodes.iter().position(|n| n.http.ends_with(home_http)).context("home not ours")?;
    let other = (home + 1) % nodes.len();
    let fleet = fleet.dialling(&nodes[home].quic);
    let connected = fleet.connect(common.endpoints, common.runner_capacity, 256).await?;
    let label = format!(
        "nodes=3 runners={runners} c={} d={}s payload={}B",
        common.concurrency, common.duration, common.payload
    );
    let runner_count = Some((connected.conns.len(), connected.failed));

    let before = nodes[home].usage()?;
    let direct = common.dispatch(nodes[home], &fleet).await;
    let after = nodes[home].usage()?;
    let at_home =
        report::print("runnel", "cluster-home", &label, &direct, &before, &after, runner_count);
    // Through another node: its CPU is the forwarding cost, the home's is the work.
    let (before, other_before) = (nodes[home].usage()?, nodes[other].usage()?);
    let forwarded = common.dispatch(nodes[other], &fleet).await;
    let (after, other_after) = (nodes[home].usage()?, nodes[other].usage()?);
    let via = report::print(
        "runnel",
        "cluster-forwarded",
        &label,
        &forwarded,
        &before,
        &after,
        runner_count,
    );
    report::forwarding(
        &at_home,
        &via,
        other_after.cpu_secs - other_before.cpu_secs,
        forwarded.elapsed,
    );

    let (hist, failed) = sim::revoke_all(nodes[other], &fleet, &connected).await;
    println!(
        "== cross-node revoke: DELETE through a node that is not the home → connection closed"
    );
    report::revoke(&hist, failed);
    drop(connected);

    let samples = crate::failover::run(&mut cluster, broker_bin, &operator_key, failovers).await?;
    report::failover(&samples);
    for n in cluster {
        if let Some(p) = n.proc {
            p.stop().await;
        }
    }
    etcd.stop();
    Ok(())
}
