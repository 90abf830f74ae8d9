//! A cluster of brokers on a real etcd: nodes form and leave, share one CA, one operator
//! key and one registry (what one node writes, every node's caches follow), and an etcd
//! outage answers 503 until etcd is back, without any broker restart.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_tests::{TestCluster, wait_for};
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

#[tokio::test]
async fn nodes_form_one_cluster_with_one_ca_one_operator_key_and_one_registry() {
    let Some(mut c) = TestCluster::start(3, |_| {}).await else { return };
    let op = c.operator_key().to_owned();
    let fp = c.nodes[0].handle().ca_fingerprint();
    for n in &c.nodes {
        assert_eq!(n.handle().ca_fingerprint(), fp, "every node loads the one cluster CA");
        let (s, v) = n.api.get("/v1/cluster", &op).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["mode"], "etcd");
        assert_eq!(node_ids(&v), ["n1", "n2", "n3"]);
        assert!(
            v["nodes"].as_array().unwrap().iter().all(|n| n["lease_ttl_left_s"].as_u64() > Some(0))
        );
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
    // Revoked through n3: refused on n1 too, once its cache has followed the watch.
    let (s, _) = c.nodes[2].api.delete(&format!("/v1/tenants/acme/keys/{key_id}"), &op).await;
    assert_eq!(s, 200);
    wait_for(Duration::from_secs(5), "n1 to refuse the revoked key", || async {
        (c.nodes[0].api.get("/v1/runners", &admin).await.0 == 401).then_some(())
    })
    .await;

    // A node that shuts down leaves at once (its lease is revoked, not left to expire).
    let n2 = c.nodes.remove(1);
    n2.handle.unwrap().shutdown().await;
    let (_, v) = c.nodes[0].api.get("/v1/cluster", &op).await;
    assert_eq!(node_ids(&v), ["n1", "n3"]);
    // Only operators see the cluster.
    let (s, _) = c.nodes[0].api.get("/v1/cluster", &admin).await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn an_etcd_outage_answers_503_and_heals_without_a_broker_restart() {
    let Some(mut c) = TestCluster::start(2, |_| {}).await else { return };
    let op = c.operator_key().to_owned();
    let admin = c.nodes[0].tenant("acme").await;
    let v = c.nodes[0].create_runner(&admin, "alice", json!({})).await;
    let token = v["token"].as_str().unwrap().to_owned();

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
    // Enrollment says "unavailable, try again", not "bad token".
    let dir = tempfile::tempdir().unwrap();
    let state = runnel_runner::StateDir::new(dir.path().join("state"));
    let h = c.nodes[1].handle();
    let err = runnel_runner::enroll(h.advertise(), &h.ca_fingerprint(), &token, &state)
        .await
        .expect_err("etcd is down");
    assert!(err.to_string().contains("unavailable"), "{err}");

    c.etcd.start_again().await;
    for n in &c.nodes {
        wait_for(Duration::from_secs(15), "readyz to answer 200 again", || async {
            (n.api.get("/readyz", "").await.0 == 200).then_some(())
        })
        .await;
    }
    // The token was not spent by the refused attempt.
    runnel_runner::enroll(h.advertise(), &h.ca_fingerprint(), &token, &state).await.unwrap();
    let (s, _) = c.nodes[1].api.post("/v1/tenants", &op, json!({ "id": "other" })).await;
    assert_eq!(s, 201);
}
