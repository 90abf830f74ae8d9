//! Revocation closes the live connection at once, reconnects fail in the handshake, and the
//! audit log has it all.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use runnel_runner::{Runner, RunnerError, RunnerStatus};
use runnel_tests::{TestBroker, wait_for, wait_runner_status};

/// Waits for a runner to stop for good because it is revoked.
async fn expect_revoked(runner: runnel_runner::RunnerHandle) {
    match tokio::time::timeout(Duration::from_secs(10), runner.join()).await.unwrap() {
        Err(RunnerError::Refused(why)) => assert!(why.contains("revoked"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn revoking_closes_the_connection_and_reconnects_are_refused() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let runner = Runner::builder(state.clone()).capacity(1).spawn().unwrap();
    runner.wait_connected(Duration::from_secs(10)).await.unwrap();
    wait_runner_status(&b, &admin, &id, "online").await;

    let mut watch = runner.watch();
    let t0 = Instant::now();
    let (s, v) = b.api.delete(&format!("/v1/runners/{id}"), &admin).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v, serde_json::json!({ "revoked": true, "stored": true, "connections_closed": 1 }));
    // The runner sees its connection end and stops for good (it does not loop).
    tokio::time::timeout(
        Duration::from_secs(5),
        watch.wait_for(|s| !matches!(s, RunnerStatus::Connected { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    let seen_closed = t0.elapsed();
    expect_revoked(runner).await;
    eprintln!("revoke → runner saw close: {seen_closed:?}");
    wait_runner_status(&b, &admin, &id, "revoked").await;

    // A fresh process with the same certificate is refused in the handshake.
    let again = Runner::builder(state).capacity(1).spawn().unwrap();
    expect_revoked(again).await;

    // Revoking twice is harmless; nothing left to close.
    let (s, v) = b.api.delete(&format!("/v1/runners/{id}"), &admin).await;
    assert_eq!((s, v["connections_closed"].as_u64()), (200, Some(0)));

    // Jobs for that owner now have no runner at all.
    let (s, v) = b.run(&admin, "alice", "true", &[]).await;
    assert_eq!(s, 409, "{v}");

    let audit = wait_for(Duration::from_secs(5), "audit events", || async {
        let (_, a) = b.api.get("/v1/audit", &admin).await;
        let events: Vec<String> = a["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap().to_owned())
            .collect();
        (events.contains(&"revoked".to_string()) && events.contains(&"denied".to_string()))
            .then_some(a)
    })
    .await;
    let revoked =
        audit["events"].as_array().unwrap().iter().find(|e| e["event"] == "revoked").unwrap();
    assert_eq!(revoked["runner_id"], id.as_str());
    assert!(revoked["actor"].as_str().unwrap().starts_with("key:"));
}

#[tokio::test]
async fn revoking_a_pending_runner_makes_its_token_useless() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let v = b.create_runner(&admin, "alice", serde_json::json!({})).await;
    let id = v["runner_id"].as_str().unwrap();
    let (s, _) = b.api.delete(&format!("/v1/runners/{id}"), &admin).await;
    assert_eq!(s, 200);
    let dir = tempfile::tempdir().unwrap();
    let r = runnel_runner::enroll(
        b.handle().advertise(),
        &b.handle().ca_fingerprint(),
        v["token"].as_str().unwrap(),
        &runnel_runner::StateDir::new(dir.path().join("r")),
    )
    .await;
    assert!(matches!(r, Err(RunnerError::EnrollRefused { .. })), "{r:?}");
}

#[tokio::test]
async fn revocation_fails_closed_when_the_store_cannot_write() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let runner = Runner::builder(state.clone()).capacity(1).spawn().unwrap();
    runner.wait_connected(Duration::from_secs(10)).await.unwrap();

    b.handle().fail_store_writes(true);
    let (s, v) = b.api.delete(&format!("/v1/runners/{id}"), &admin).await;
    // The answer is honest: in force here, not durable.
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("revocation_not_stored")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("1 live connection"), "{v}");
    // The live connection was closed anyway, and the runner stops for good.
    expect_revoked(runner).await;
    // A reconnect with the same certificate is refused in the handshake, store or not.
    let again = Runner::builder(state).capacity(1).spawn().unwrap();
    expect_revoked(again).await;
    // Once the store heals, repeating the DELETE makes it durable.
    b.handle().fail_store_writes(false);
    let (s, v) = b.api.delete(&format!("/v1/runners/{id}"), &admin).await;
    assert_eq!((s, v["stored"].as_bool()), (200, Some(true)), "{v}");
    wait_runner_status(&b, &admin, &id, "revoked").await;
}
