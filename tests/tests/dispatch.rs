//! Dispatch: exactly once, to the right owner, least loaded first; custom kinds; labels;
//! no runner at all → told at once.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runnel_runner::Runner;
use runnel_tests::{Record, TestBroker, labels};
use serde_json::json;

#[tokio::test]
async fn two_hundred_jobs_over_four_runners_each_run_exactly_once_on_the_right_owner() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    let mut alice_runners = Vec::new();
    for i in 0..5 {
        let owner = if i < 4 { "alice" } else { "bob" };
        let (id, state) = b.enrolled(&admin, owner, &dir.path().join(i.to_string())).await;
        let rec = Record { runner: id.clone(), seen: seen.clone() };
        let h = Runner::builder(state).capacity(4).handler("record", rec).spawn().unwrap();
        h.wait_connected(Duration::from_secs(10)).await.unwrap();
        if owner == "alice" {
            alice_runners.push(id);
        }
        handles.push(h);
    }
    let mut tasks = Vec::new();
    for n in 0..200 {
        let api = b.api.clone();
        let admin = admin.clone();
        tasks.push(tokio::spawn(async move {
            api.post("/v1/jobs", &admin, json!({ "owner": "alice", "kind": "record", "payload": format!("job {n}"), "wait": true }))
                .await
        }));
    }
    let mut by_job = HashMap::new();
    for (n, t) in tasks.into_iter().enumerate() {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["state"], "succeeded", "{v}");
        assert_eq!(v["output"], format!("job {n}"));
        by_job.insert(
            v["id"].as_str().unwrap().to_owned(),
            v["runner_id"].as_str().unwrap().to_owned(),
        );
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 200, "every job ran once, none twice");
    let mut per_runner: HashMap<&str, usize> = HashMap::new();
    for (job, runner) in &seen {
        assert_eq!(by_job.get(job), Some(runner), "the API names the runner that ran it");
        assert!(alice_runners.contains(runner), "a job of alice ran on {runner}");
        *per_runner.entry(runner).or_default() += 1;
    }
    assert_eq!(by_job.len(), 200);
    // Least-in-flight spreads the load: every runner took a fair share.
    assert_eq!(per_runner.len(), 4, "{per_runner:?}");
    assert!(per_runner.values().all(|&n| n >= 20), "{per_runner:?}");
}

#[tokio::test]
async fn labels_and_explicit_runner_ids_select_and_impossible_jobs_fail_fast() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let gpu = b.create_runner(&admin, "alice", json!({ "gpu": "yes" })).await;
    let state = runnel_runner::StateDir::new(dir.path().join("gpu"));
    runnel_runner::enroll(
        b.handle().advertise(),
        &b.handle().ca_fingerprint(),
        gpu["token"].as_str().unwrap(),
        &state,
    )
    .await
    .unwrap();
    let gpu_id = gpu["runner_id"].as_str().unwrap().to_owned();
    let _g = Runner::builder(state).capacity(2).labels(labels(&[("os", "linux")])).spawn().unwrap();
    let (plain_id, _p) = b.runner(&admin, "alice", &dir.path().join("plain"), 2).await;
    _g.wait_connected(Duration::from_secs(10)).await.unwrap();

    for _ in 0..5 {
        let (_, v) = b
            .api
            .post("/v1/jobs", &admin, json!({ "owner": "alice", "labels": { "gpu": "yes", "os": "linux" }, "kind": "exec", "exec": { "program": "true" }, "wait": true }))
            .await;
        assert_eq!(v["runner_id"], gpu_id.as_str(), "{v}");
    }
    let (_, v) = b
        .api
        .post("/v1/jobs", &admin, json!({ "owner": "alice", "runner_id": plain_id, "kind": "exec", "exec": { "program": "true" }, "wait": true }))
        .await;
    assert_eq!(v["runner_id"], plain_id.as_str());

    // Nobody could ever run these: answered at once, not after a queue timeout.
    let t0 = std::time::Instant::now();
    let (s, v) = b.run(&admin, "nobody", "true", &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("no_runner")));
    let (s, _) = b
        .api
        .post("/v1/jobs", &admin, json!({ "owner": "alice", "labels": { "gpu": "no" }, "kind": "exec", "exec": { "program": "true" } }))
        .await;
    assert_eq!(s, 409);
    assert!(t0.elapsed() < Duration::from_secs(2));

    // Both of alice's runners said Hello with only `exec`: a `docker` job is refused at once,
    // naming the kind, instead of waiting out its queue timeout.
    let (s, v) = b
        .api
        .post("/v1/jobs", &admin, json!({ "owner": "alice", "kind": "docker", "payload": "x", "queue_timeout_ms": 30000, "wait": true }))
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("no_runner")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("\"docker\""), "{v}");

    // A runner paired but not seen since the broker started may advertise anything: the
    // job waits for it, and times out in the queue when it never comes.
    let (_carol_runner, _state) = b.enrolled(&admin, "carol", &dir.path().join("carol")).await;
    let (s, v) = b
        .api
        .post("/v1/jobs", &admin, json!({ "owner": "carol", "kind": "docker", "payload": "x", "queue_timeout_ms": 300, "wait": true }))
        .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("timed_out")), "{v}");
}
