//! Failover with real broker processes on a real etcd: kill -9 a tenant's home, or
//! SIGSTOP it past its lease, and the tenant gets a new home whose runners are online and
//! whose dispatches succeed; at no moment do two nodes serve the tenant.
//!
//! The nodes run with `--idle-timeout 2s`: a runner notices its node died only when QUIC
//! gives up on the connection (a killed process sends nothing), so failover takes about
//! max(lease TTL, idle timeout) plus the reconnect backoff: 5.2-5.5 s here. Until the lease
//! runs out the live nodes redirect the runner to the dead home; a runner that followed
//! such a redirect waited out a 5 s handshake, and failover took 8.5 s (runner/src/dial.rs).
//! `RUNNEL_TEST_LOG=runnel_runner=info RUNNEL_TEST_NODE_LOG=runnel_broker=info` shows why.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use runnel_runner::{Runner, RunnerHandle};
use runnel_tests::{Api, Method, ProcessCluster, serving, wait_for};
use serde_json::{Value, json};

const BROKER: &str = env!("CARGO_BIN_EXE_broker-under-test");
/// The two tests take turns: each starts 3 brokers and an etcd, and the failover bound is
/// measured on this machine's 2 cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const FLAGS: &[&str] = &["--idle-timeout", "2s", "--heartbeat-interval", "500ms"];

fn exec(program: &str, args: &[&str], wait: bool) -> Value {
    json!({ "owner": "alice", "kind": "exec", "exec": { "program": program, "args": args }, "wait": wait })
}

/// Tenant acme with one runner of alice, online; answers (admin key, home index, runner).
async fn tenant_with_runner(
    c: &ProcessCluster,
    dir: &std::path::Path,
) -> (String, usize, RunnerHandle) {
    let admin = c.tenant("acme").await;
    let (_, state) = c.enrolled(0, &admin, "alice", &dir.join("runner")).await;
    let runner = Runner::builder(state).capacity(4).spawn().unwrap();
    runner.wait_connected(Duration::from_secs(20)).await.unwrap();
    let home = c.home_of("acme").await.unwrap();
    (admin, home, runner)
}

/// Samples every node's served tenants until stopped; panics if two nodes ever serve
/// `tenant` in one round.
fn watch_for_two_homes(
    c: &ProcessCluster,
    tenant: &'static str,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<usize>) {
    let apis: Vec<Api> = c.nodes.iter().map(|n| n.api.clone()).collect();
    let op = c.operator_key.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    let task = tokio::spawn(async move {
        let mut rounds = 0;
        while !done.load(Ordering::Relaxed) {
            let views = futures::future::join_all(apis.iter().map(|a| serving(a, &op))).await;
            let homes: Vec<(usize, i64)> = views
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.get(tenant).map(|e| (i, *e)))
                .collect();
            assert!(homes.len() <= 1, "two nodes serve {tenant} at once: {homes:?}");
            rounds += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rounds
    });
    (stop, task)
}

/// Dispatches through every node but `skip` until a job succeeds; answers how long that
/// took. An attempt that a node forwards to the dead home hangs for the forward's 3 s
/// timeout, so attempts are not made in turn (that measured up to 6 s late): a new one
/// starts at every node every 200 ms, and the first success ends it.
async fn until_dispatch_succeeds(
    c: &ProcessCluster,
    skip: usize,
    admin: &str,
    limit: Duration,
) -> Duration {
    use futures::StreamExt;
    let started = Instant::now();
    let apis: Vec<&Api> =
        c.nodes.iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, n)| &n.api).collect();
    let attempt = |api: &Api| {
        let api = api.clone();
        async move {
            let body = Some(exec("echo", &["ok"], true));
            let answer = api.try_call(Method::POST, "/v1/jobs", admin, body).await;
            let ok = matches!(&answer, Some((200, v)) if v["state"] == "succeeded");
            if !ok && std::env::var_os("DEBUG_FAILOVER").is_some() {
                eprintln!("{:?} {answer:?}", started.elapsed());
            }
            ok
        }
    };
    let mut attempts = futures::stream::FuturesUnordered::new();
    let mut every = tokio::time::interval(Duration::from_millis(200));
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = every.tick() => {
                for api in &apis {
                    attempts.push(attempt(api));
                }
            }
            Some(ok) = attempts.next(), if !attempts.is_empty() => {
                if ok {
                    return started.elapsed();
                }
            }
            _ = &mut deadline => panic!("no dispatch succeeded within {limit:?}"),
        }
    }
}

#[tokio::test]
async fn a_killed_home_is_replaced_within_10s_and_never_two_homes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    runnel_tests::log_from_env();
    if let Ok(f) = std::env::var("RUNNEL_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(f).try_init();
    }
    let Some(mut c) = ProcessCluster::start(BROKER, 3, FLAGS).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (admin, home, runner) = tenant_with_runner(&c, dir.path()).await;
    let (_, epoch_before) =
        serving(&c.nodes[home].api, &c.operator_key).await.into_iter().next().unwrap();
    let (stop, sampler) = watch_for_two_homes(&c, "acme");
    // A job running on the home when it dies.
    let (s, v) = c.nodes[home].api.post("/v1/jobs", &admin, exec("sleep", &["60"], false)).await;
    assert_eq!(s, 201, "{v}");
    let doomed = v["id"].as_str().unwrap().to_owned();
    wait_for(Duration::from_secs(10), "the doomed job to run", || async {
        let (_, v) = c.nodes[home].api.get(&format!("/v1/jobs/{doomed}"), &admin).await;
        (v["state"] == "running").then_some(())
    })
    .await;

    c.nodes[home].signal("KILL");
    c.nodes[home].wait_exit(Duration::from_secs(5)).await;
    let killed = Instant::now();
    until_dispatch_succeeds(&c, home, &admin, Duration::from_secs(20)).await;
    let failover = killed.elapsed();
    eprintln!("failover (kill -9 → first successful dispatch): {failover:?}");
    assert!(failover < Duration::from_secs(10), "failover took {failover:?}");

    let new_home = c.home_of("acme").await.expect("a new home");
    assert_ne!(new_home, home);
    let epoch_after = serving(&c.nodes[new_home].api, &c.operator_key).await["acme"];
    assert!(epoch_after > epoch_before, "the new claim has a newer epoch");
    // The job that was running on the dead node answers node_lost through every other
    // node, never 404; another tenant still gets 404.
    for (i, n) in c.nodes.iter().enumerate().filter(|(i, _)| *i != home) {
        let (s, v) = n.api.get(&format!("/v1/jobs/{doomed}"), &admin).await;
        assert_eq!((s, v["state"].as_str()), (200, Some("node_lost")), "node {i}: {v}");
    }
    let (_, v) =
        c.nodes[new_home].api.post("/v1/tenants", &c.operator_key, json!({ "id": "globex" })).await;
    let _ = v;
    let (_, v) = c.nodes[new_home]
        .api
        .post("/v1/tenants/globex/keys", &c.operator_key, json!({ "role": "admin" }))
        .await;
    let intruder = v["key"].as_str().unwrap().to_owned();
    let (s, _) = c.nodes[new_home].api.get(&format!("/v1/jobs/{doomed}"), &intruder).await;
    assert_eq!(s, 404);
    stop.store(true, Ordering::Relaxed);
    assert!(sampler.await.unwrap() > 10, "the sampler ran");
    runner.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_paused_home_loses_its_tenants_and_serves_nothing_after_it_resumes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    runnel_tests::log_from_env();
    let Some(c) = ProcessCluster::start(BROKER, 3, FLAGS).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (admin, home, runner) = tenant_with_runner(&c, dir.path()).await;
    let (stop, sampler) = watch_for_two_homes(&c, "acme");

    // Paused for 3x the lease TTL (5 s): etcd gives the tenant away meanwhile.
    c.nodes[home].signal("STOP");
    until_dispatch_succeeds(&c, home, &admin, Duration::from_secs(20)).await;
    let new_home = c.home_of("acme").await.expect("a new home");
    assert_ne!(new_home, home);
    tokio::time::sleep(Duration::from_secs(15)).await;
    c.nodes[home].signal("CONT");

    // Resumed, the old home serves nothing of acme: calls through it are forwarded to the
    // new home (every job it answers for names the new home), and it says it serves
    // nothing.
    let old = &c.nodes[home].api;
    let new_id = c.nodes[new_home].id.clone();
    wait_for(Duration::from_secs(10), "the old home to forward to the new one", || async {
        let body = Some(exec("echo", &["x"], true));
        let (s, v) = old.try_call(Method::POST, "/v1/jobs", &admin, body).await?;
        if s == 200 {
            let id = v["id"].as_str()?;
            assert!(id.ends_with(&format!("-{new_id}")), "served by the old home: {v}");
        }
        (s == 200 && v["state"] == "succeeded").then_some(())
    })
    .await;
    assert!(serving(old, &c.operator_key).await.is_empty());
    // The new home still serves, with the runner online there.
    until_dispatch_succeeds(&c, home, &admin, Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    runner.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rolling_restart_loses_and_doubles_no_accepted_job() {
    let _turn = ONE_AT_A_TIME.lock().await;
    runnel_tests::log_from_env();
    let flags = [FLAGS, &["--drain-timeout", "20s", "--goaway-window", "1s"]].concat();
    let Some(mut c) = ProcessCluster::start(BROKER, 3, &flags).await else { return };
    let admin = c.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, state) = c.enrolled(0, &admin, "alice", &dir.path().join("runner")).await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rec = runnel_tests::Record { runner: "r".into(), seen: seen.clone() };
    let runner = Runner::builder(state).capacity(4).handler("record", rec).spawn().unwrap();
    runner.wait_connected(Duration::from_secs(20)).await.unwrap();

    // A dispatcher that, like a load balancer, sends each job to a node whose /readyz is
    // 200, and retries a job only when it was not accepted (5xx, or the node was down).
    let apis: Vec<Api> = c.nodes.iter().map(|n| n.api.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    let key = admin.clone();
    let dispatcher = tokio::spawn(async move {
        let mut accepted: Vec<(String, Value)> = Vec::new();
        let mut i = 0usize;
        while !done.load(Ordering::Relaxed) {
            let api = &apis[i % apis.len()];
            i += 1;
            let ready = api.try_call(Method::GET, "/readyz", "", None).await;
            if ready.map(|(s, _)| s) != Some(200) {
                continue;
            }
            let body = json!({ "owner": "alice", "kind": "record", "payload": format!("p{i}"), "wait": true });
            match api.try_call(Method::POST, "/v1/jobs", &key, Some(body)).await {
                Some((200 | 201, v)) => accepted.push((v["id"].as_str().unwrap().to_owned(), v)),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        accepted
    });

    for i in 0..c.nodes.len() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.nodes[i].signal("TERM");
        let status = c.nodes[i].wait_exit(Duration::from_secs(40)).await;
        assert!(status.success(), "node {i} drains and exits 0: {status:?}");
        c.nodes[i].start_again().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let accepted = dispatcher.await.unwrap();
    assert!(accepted.len() > 20, "jobs kept flowing: {}", accepted.len());
    for (id, v) in &accepted {
        assert_eq!(v["state"], "succeeded", "accepted job {id} ended {v}");
    }
    let seen: Vec<String> = seen.lock().unwrap().iter().map(|(job, _)| job.clone()).collect();
    let unique: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no job ran twice");
    let accepted_ids: std::collections::HashSet<&String> =
        accepted.iter().map(|(id, _)| id).collect();
    assert_eq!(unique, accepted_ids, "every accepted job ran, and nothing else did");
    // The runner followed its tenant's home as each one drained (GoAway, then a new home).
    match runner.status() {
        runnel_runner::RunnerStatus::Connected { session, .. } => {
            assert!(session >= 2, "the runner moved with its tenant: session {session}")
        }
        other => panic!("runner not connected at the end: {other:?}"),
    }
    runner.shutdown().await.unwrap();
}

/// A draining home waits (up to the drain timeout) for the jobs it accepted to end, and a
/// job that waits for a runner needs the runner to reach it: the draining home must take its
/// tenant's runners until it sends them away, while every other node sends them there.
/// (It refused them as "draining", and the job failed at the drain timeout.)
#[tokio::test]
async fn a_draining_home_takes_its_tenants_runner_for_the_job_it_waits_for() {
    let _turn = ONE_AT_A_TIME.lock().await;
    runnel_tests::log_from_env();
    let flags = [FLAGS, &["--drain-timeout", "20s", "--goaway-window", "1s"]].concat();
    let Some(mut c) = ProcessCluster::start(BROKER, 3, &flags).await else { return };
    let admin = c.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, state) = c.enrolled(0, &admin, "alice", &dir.path().join("runner")).await;
    // No runner online yet: the job waits on the tenant's home.
    let (s, v) = c.nodes[0].api.post("/v1/jobs", &admin, exec("echo", &["late"], false)).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let home = c.home_of("acme").await.expect("a home");
    c.nodes[home].signal("TERM");
    let api = c.nodes[home].api.clone();
    wait_for(Duration::from_secs(5), "the home to drain", || async {
        let ready = api.try_call(Method::GET, "/readyz", "", None).await;
        (ready.map(|(s, _)| s) == Some(503)).then_some(())
    })
    .await;

    let runner = Runner::builder(state).capacity(4).spawn().unwrap();
    wait_for(Duration::from_secs(15), "the waiting job to run", || async {
        let (_, v) = api.get(&format!("/v1/jobs/{id}"), &admin).await;
        assert!(!["failed", "node_lost", "cancelled"].contains(&v["state"].as_str()?), "{v}");
        (v["state"] == "succeeded").then_some(())
    })
    .await;
    // The drain then ends by itself, well before its timeout.
    let status = c.nodes[home].wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "the home drains and exits 0: {status:?}");
    runner.shutdown().await.unwrap();
}

/// `runnel_cluster_peer_connections` of node `i` (0 before it first moved).
async fn peer_connections(c: &ProcessCluster, i: usize) -> f64 {
    let text = c.nodes[i].api.raw("/metrics", &c.operator_key).await;
    runnel_tests::metric_value(&text, "runnel_cluster_peer_connections").unwrap_or(0.0)
}

#[tokio::test]
async fn the_nodes_that_called_a_node_let_go_of_their_connection_when_it_leaves() {
    let _turn = ONE_AT_A_TIME.lock().await;
    runnel_tests::log_from_env();
    let Some(mut c) = ProcessCluster::start(BROKER, 3, FLAGS).await else { return };
    let admin = c.tenant("acme").await;
    let no_runner = |c: &ProcessCluster, i: usize| {
        let (api, admin) = (c.nodes[i].api.clone(), admin.clone());
        async move {
            let (s, v) = api.post("/v1/jobs", &admin, exec("true", &[], true)).await;
            assert_eq!((s, v["error"]["code"].as_str()), (409, Some("no_runner")), "{v}");
        }
    };
    // Every node asks the tenant's home, so the other two keep a connection to it.
    for i in 0..3 {
        no_runner(&c, i).await;
    }
    let home = c.home_of("acme").await.expect("a home");
    for i in 0..3 {
        let want = if i == home { 0.0 } else { 1.0 };
        assert_eq!(peer_connections(&c, i).await, want, "node {i}, home {home}");
    }

    // The home leaves for good (drained, then gone); no call goes to it again.
    c.nodes[home].signal("TERM");
    let status = c.nodes[home].wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    let survivors: Vec<usize> = (0..3).filter(|i| *i != home).collect();
    for &i in &survivors {
        wait_for(Duration::from_secs(15), "the node gone from the survivors' view", || async {
            let text = c.nodes[i].api.raw("/metrics", &c.operator_key).await;
            (runnel_tests::metric_value(&text, "runnel_cluster_nodes") == Some(2.0)).then_some(())
        })
        .await;
        no_runner(&c, i).await;
    }
    // Each survivor keeps a connection only to the new home (if it is not that home): the
    // one to the node that left went with it, although nothing dialled that node again.
    let new_home = c.home_of("acme").await.expect("a new home");
    assert_ne!(new_home, home);
    for &i in &survivors {
        let want = if i == new_home { 0.0 } else { 1.0 };
        wait_for(Duration::from_secs(10), "the departed node's connection let go of", || async {
            (peer_connections(&c, i).await == want).then_some(())
        })
        .await;
    }
}
