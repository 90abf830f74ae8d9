//! A cluster of real `runnel-broker` processes on a real etcd: nodes form and leave, share one CA, one operator
//! key and one registry (what one node writes, every node's caches follow), and an etcd
//! outage answers 503 until etcd is back, without any broker restart.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_tests::{ProcessCluster, wait_for, word_after};
use serde_json::{Value, json};

fn node_ids(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

const BROKER: &str = env!("CARGO_BIN_EXE_broker-under-test");

/// `runnelctl cluster status` (the real command line) against `api`; answers its stdout.
async fn ctl_cluster_status(api: &runnel_tests::Api, op: &str, json: bool) -> String {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ctl-under-test"));
    cmd.env("RUNNEL_URL", api.base())
        .env("RUNNEL_KEY", op)
        .env("RUNNEL_CONFIG_DIR", "/nonexistent");
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.args(["cluster", "status"]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn nodes_form_one_cluster_with_one_ca_one_operator_key_and_one_registry() {
    let Some(mut c) = ProcessCluster::start(BROKER, 3, &[]).await else { return };
    let op = c.operator_key.clone();
    for n in &c.nodes {
        let v: Value = serde_json::from_str(&ctl_cluster_status(&n.api, &op, true).await).unwrap();
        assert_eq!(v["mode"], "etcd");
        assert_eq!(v["this_node"], n.id.as_str());
        assert_eq!(node_ids(&v), ["n1", "n2", "n3"]);
        assert!(
            v["nodes"].as_array().unwrap().iter().all(|n| n["lease_ttl_left_s"].as_u64() > Some(0))
        );
        let table = ctl_cluster_status(&n.api, &op, false).await;
        assert!(table.contains("3 node(s)"), "{table}");
    }

    // A tenant made through n1 is listed by n3; a key made through n2 works on n3.
    let (s, _) = c.nodes[0].api.post("/v1/tenants", &op, json!({ "id": "acme" })).await;
    assert_eq!(s, 201);
    let (_, v) = c.nodes[2].api.get("/v1/tenants", &op).await;
    assert_eq!(v["tenants"][0]["id"], "acme");
    let (s, v) =
        c.nodes[1].api.post("/v1/tenants/acme/keys", &op, json!({ "role": "admin" })).await;
    assert_eq!(s, 201, "{v}");
    let admin = v["key"].as_str().unwrap().to_owned();
    let key_id = v["id"].as_str().unwrap().to_owned();
    wait_for(Duration::from_secs(5), "n3 to know the new key", || async {
        (c.nodes[2].api.get("/v1/runners", &admin).await.0 == 200).then_some(())
    })
    .await;
    // Every node loads the one cluster CA: the enroll commands all pin one fingerprint.
    let mut fps = Vec::new();
    for n in &c.nodes {
        let v = n.api.create_runner(&admin, "alice", json!({})).await;
        fps.push(word_after(v["enroll_command"].as_str().unwrap(), "--ca-fingerprint").to_owned());
    }
    assert!(fps.iter().all(|f| f == &fps[0] && f.starts_with("sha256:")), "{fps:?}");
    // Revoked through n3: refused on n1 too, once its cache has followed the watch.
    let (s, _) = c.nodes[2].api.delete(&format!("/v1/tenants/acme/keys/{key_id}"), &op).await;
    assert_eq!(s, 200);
    wait_for(Duration::from_secs(5), "n1 to refuse the revoked key", || async {
        (c.nodes[0].api.get("/v1/runners", &admin).await.0 == 401).then_some(())
    })
    .await;

    // A node that stops (SIGTERM) leaves at once: its lease is revoked, not left to expire.
    c.nodes[1].signal("TERM");
    assert!(c.nodes[1].wait_exit(Duration::from_secs(15)).await.success());
    let (_, v) = c.nodes[0].api.get("/v1/cluster", &op).await;
    assert_eq!(node_ids(&v), ["n1", "n3"]);
    // Only operators see the cluster.
    let (s, _) = c.nodes[0].api.get("/v1/cluster", &admin).await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn an_etcd_outage_answers_503_and_heals_without_a_broker_restart() {
    let Some(mut c) = ProcessCluster::start(BROKER, 2, &[]).await else { return };
    let op = c.operator_key.clone();
    let admin = c.tenant("acme").await;
    let v = c.nodes[0].api.create_runner(&admin, "alice", json!({})).await;
    let token = v["token"].as_str().unwrap().to_owned();
    let fp = word_after(v["enroll_command"].as_str().unwrap(), "--ca-fingerprint").to_owned();

    c.etcd.stop();
    for n in &c.nodes {
        wait_for(Duration::from_secs(10), "readyz to answer 503", || async {
            (n.api.get("/readyz", "").await.0 == 503).then_some(())
        })
        .await;
    }
    let (s, v) = c.nodes[1].api.post("/v1/tenants", &op, json!({ "id": "other" })).await;
    assert_eq!(s, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("etcd"), "{v}");
    // Enrollment (at n2) says "unavailable, try again", not "bad token".
    let dir = tempfile::tempdir().unwrap();
    let state = runnel_runner::StateDir::new(dir.path().join("state"));
    let n2 = c.nodes[1].quic.clone();
    let err = runnel_runner::enroll(&n2, &fp, &token, &state).await.expect_err("etcd is down");
    assert!(err.to_string().contains("unavailable"), "{err}");

    c.etcd.start_again().await;
    for n in &c.nodes {
        wait_for(Duration::from_secs(15), "readyz to answer 200 again", || async {
            (n.api.get("/readyz", "").await.0 == 200).then_some(())
        })
        .await;
    }
    // The token was not spent by the refused attempt.
    runnel_runner::enroll(&n2, &fp, &token, &state).await.unwrap();
    let (s, _) = c.nodes[1].api.post("/v1/tenants", &op, json!({ "id": "other" })).await;
    assert_eq!(s, 201);
}

#[tokio::test]
async fn a_node_started_before_etcd_waits_for_it() {
    let Some(mut c) = ProcessCluster::start(BROKER, 1, &[]).await else { return };
    c.etcd.stop();
    c.nodes[0].signal("KILL");
    c.nodes[0].wait_exit(Duration::from_secs(10)).await;
    // The node starts while etcd is down (as one boot script or a host reboot starts both),
    // and is ready once etcd comes up 2 s later, instead of exiting.
    let (etcd, node) = (&mut c.etcd, &mut c.nodes[0]);
    let late_etcd = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        etcd.start_again().await;
    };
    tokio::join!(node.start_again(), late_etcd);
    let (s, v) = c.nodes[0].api.get("/v1/cluster", &c.operator_key).await;
    assert_eq!((s, node_ids(&v)), (200, vec!["n1".to_owned()]), "{v}");
}
