//! Placement on a real etcd: each tenant has one home node, claimed with an epoch; runners
//! that dial another node are redirected there, and only the home serves the tenant.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_runner::Runner;
use runnel_tests::{TestCluster, wait_for};
use serde_json::{Value, json};

fn exec(program: &str, args: &[&str]) -> Value {
    json!({ "owner": "alice", "kind": "exec", "exec": { "program": program, "args": args }, "wait": true })
}

#[tokio::test]
async fn runners_are_redirected_to_their_tenants_home_and_only_the_home_serves_it() {
    let Some(c) = TestCluster::start(3, |_| {}).await else { return };
    let op = c.operator_key().to_owned();
    let admin = c.nodes[0].tenant("acme").await;

    // With no runner yet, the home answers 409 no_runner (claiming the tenant); every
    // other node answers 421 not_home, naming the home.
    let mut home = None;
    for (i, n) in c.nodes.iter().enumerate() {
        let (s, v) = n.api.post("/v1/jobs", &admin, exec("true", &[])).await;
        match s {
            409 => home = Some(i),
            421 => assert_eq!(v["error"]["code"], "not_home", "{v}"),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    let home = home.expect("one node is the home");
    let other = (home + 1) % 3;
    for (i, n) in c.nodes.iter().enumerate() {
        let (s, v) = n.api.post("/v1/jobs", &admin, exec("true", &[])).await;
        assert_eq!(s, if i == home { 409 } else { 421 }, "the home does not move: {v}");
    }

    // A runner enrolled through (and so dialling) another node comes online at the home.
    let dir = tempfile::tempdir().unwrap();
    let (id, state) = c.nodes[other].enrolled(&admin, "alice", &dir.path().join("r")).await;
    let runner = Runner::builder(state).capacity(2).spawn().unwrap();
    runner.wait_connected(Duration::from_secs(15)).await.unwrap();
    wait_for(Duration::from_secs(10), "the runner online at the home", || async {
        let (_, v) = c.nodes[home].api.get(&format!("/v1/runners/{id}"), &admin).await;
        (v["status"] == "online").then_some(())
    })
    .await;
    let (s, v) = c.nodes[home].api.post("/v1/jobs", &admin, exec("echo", &["hi"])).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "succeeded", "{v}");

    // Exactly one node claims the tenant, at one epoch, and only it serves it.
    let mut serving = Vec::new();
    for n in &c.nodes {
        let (_, v) = n.api.get("/v1/cluster", &op).await;
        let claims: Vec<&Value> = v["tenants"].as_array().unwrap().iter().collect();
        assert_eq!(claims.len(), 1, "{v}");
        assert_eq!(claims[0]["tenant"], "acme");
        assert!(claims[0]["epoch"].as_i64() > Some(0), "{v}");
        if let Some(h) = v["homed_here"].as_array().filter(|a| !a.is_empty()) {
            assert_eq!(h[0]["epoch"], claims[0]["epoch"]);
            serving.push(v["this_node"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(serving, [format!("n{}", home + 1)]);
    runner.shutdown().await.unwrap();
}
