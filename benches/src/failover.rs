//! The cluster's failover phase: a real runner (the `runnel-runner` library, address list of
//! every node) serves a tenant on its home; the home is killed with SIGKILL and the time
//! until a dispatch through another node succeeds is one sample. The killed node then
//! starts again under the same id and address, and the next run kills the new home.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use runnel_ctl::{Client, Method};
use serde_json::{Value, json};

use crate::cluster::Node;

const TENANT: &str = "failover";
/// One sample gives up after this long (the test's bound is 10 s).
const GIVE_UP: Duration = Duration::from_secs(60);
/// A dispatch attempt that has not answered after this long is abandoned and retried.
const ATTEMPT: Duration = Duration::from_secs(10);

fn job() -> Value {
    json!({ "owner": crate::sim::OWNER, "kind": "exec",
            "exec": { "program": "true", "args": [] }, "wait": true })
}

/// Whether one dispatch through `api` ran and succeeded.
async fn dispatch_succeeds(api: &Client) -> bool {
    let body = job();
    let call = api.call(Method::POST, "/v1/jobs", Some(&body));
    match tokio::time::timeout(ATTEMPT, call).await {
        Ok(Ok(a)) => a.status == 200 && a.body["state"] == "succeeded",
        _ => false,
    }
}

/// Index of the node that `/v1/cluster` (asked through `ask`) names as the tenant's home.
async fn home_of(nodes: &[Node], ask: usize) -> anyhow::Result<Option<usize>> {
    let n = nodes[ask].proc.as_ref().context("asked a stopped node")?;
    let status = Client::new(&n.http, &n.operator_key).get("/v1/cluster").await?;
    let home = status["tenants"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["tenant"] == TENANT))
        .and_then(|t| t["node"].as_str());
    Ok(home.and_then(|id| nodes.iter().position(|n| n.id == id)))
}

/// `runs` kill -9 failovers; answers each one's kill → first successful dispatch time.
pub(crate) async fn run(
    nodes: &mut [Node],
    bin: Option<&std::path::Path>,
    operator_key: &str,
    runs: usize,
) -> anyhow::Result<Vec<Duration>> {
    let first = nodes[0].proc.as_ref().context("node 1 is not running")?;
    let operator = Client::new(&first.http, operator_key);
    operator.post("/v1/tenants", json!({ "id": TENANT })).await?;
    let admin = operator
        .post(&format!("/v1/tenants/{TENANT}/keys"), json!({ "role": "admin" }))
        .await?["key"]
        .as_str()
        .context("no admin key")?
        .to_owned();
    let created = operator
        .with_key(&admin)
        .post("/v1/runners", json!({ "owner": crate::sim::OWNER, "name": "failover" }))
        .await?;
    let dir = tempfile::tempdir()?;
    let state = runnel_runner::StateDir::new(dir.path().join("runner"));
    let every_node = nodes.iter().map(|n| n.quic.as_str()).collect::<Vec<_>>().join(",");
    let token = created["token"].as_str().context("no token")?;
    runnel_runner::enroll(&every_node, &first.fingerprint, token, &state).await?;
    let runner = runnel_runner::Runner::builder(state).capacity(4).spawn()?;
    if let Err(status) = runner.wait_connected(Duration::from_secs(20)).await {
        bail!("the failover runner did not come online: {status:?}");
    }

    let mut samples = Vec::new();
    for run in 1..=runs {
        // Steady state first: the tenant is claimed and its runner serves at the home.
        let api = |i: usize| {
            nodes[i].proc.as_ref().map(|p| Client::new(&p.http, &admin)).context("node down")
        };
        let settled = Instant::now();
        while !dispatch_succeeds(&api(0)?).await {
            if settled.elapsed() > GIVE_UP {
                bail!("run {run}: no dispatch succeeded before the kill");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let home = home_of(nodes, 0).await?.context("no home after a successful dispatch")?;
        let survivors: Vec<Client> =
            (0..nodes.len()).filter(|i| *i != home).map(api).collect::<anyhow::Result<_>>()?;

        nodes[home].kill().await;
        let killed = Instant::now();
        'sample: loop {
            for c in &survivors {
                if dispatch_succeeds(c).await {
                    break 'sample;
                }
            }
            if killed.elapsed() > GIVE_UP {
                bail!("run {run}: no dispatch succeeded within {GIVE_UP:?} of the kill");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = killed.elapsed();
        eprintln!("failover {run}/{runs}: node {} killed → dispatch ok in {took:?}", home + 1);
        samples.push(took);
        nodes[home].start(bin, operator_key).await?;
    }
    runner.shutdown().await?;
    Ok(samples)
}
