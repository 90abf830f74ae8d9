//! Broker restart keeps registrations; a crashed tenant actor is restarted without touching
//! other tenants; certificates renew over the live connection.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_runner::{Runner, RunnerError, RunnerHandle, RunnerStatus};
use runnel_tests::{TestBroker, wait_for, wait_runner_status};

#[tokio::test]
async fn after_a_restart_paired_runners_reconnect_and_revoked_ones_stay_out() {
    let mut b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (kept, kept_state) = b.enrolled(&admin, "alice", &dir.path().join("kept")).await;
    let (gone, gone_state) = b.enrolled(&admin, "alice", &dir.path().join("gone")).await;
    let kept_runner = Runner::builder(kept_state).capacity(2).spawn().unwrap();
    kept_runner.wait_connected(Duration::from_secs(10)).await.unwrap();
    assert_eq!(b.api.delete(&format!("/v1/runners/{gone}"), &admin).await.0, 200);

    b.restart().await;

    // Keys, runners and states survived; the paired runner came back by itself.
    reconnected(&kept_runner).await;
    wait_runner_status(&b, &admin, &kept, "online").await;
    let (s, v) = b.run(&admin, "alice", "echo", &["after restart"]).await;
    assert_eq!((s, v["runner_id"].as_str()), (200, Some(kept.as_str())), "{v}");
    let (_, v) = b.api.get(&format!("/v1/runners/{gone}"), &admin).await;
    assert_eq!(v["status"], "revoked");
    let revoked_runner = Runner::builder(gone_state).spawn().unwrap();
    match tokio::time::timeout(Duration::from_secs(10), revoked_runner.join()).await.unwrap() {
        Err(RunnerError::Refused(_)) => {}
        other => panic!("revoked runner got in after restart: {other:?}"),
    }
}

#[tokio::test]
async fn a_crashed_tenant_actor_restarts_without_touching_other_tenants() {
    let b = TestBroker::start().await;
    let a = b.tenant("a").await;
    let other = b.tenant("other").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, ha) = b.runner(&a, "alice", &dir.path().join("a"), 2).await;
    let (_, ho) = b.runner(&other, "olga", &dir.path().join("o"), 2).await;
    assert!(b.handle().crash_tenant("a"));

    // Tenant a's runner is dropped and comes back to the restarted actor.
    reconnected(&ha).await;
    let (_, v) = b.run(&a, "alice", "echo", &["a ok"]).await;
    assert_eq!(v["output"], "a ok\n", "{v}");
    // The other tenant's runner never noticed: still its first session.
    assert!(matches!(ho.status(), RunnerStatus::Connected { session: 1, .. }), "{:?}", ho.status());
    let (_, v) = b.run(&other, "olga", "echo", &["other ok"]).await;
    assert_eq!(v["output"], "other ok\n");
}

/// Waits (up to 20 s) for `runner`'s second session: its broker or tenant actor restarted,
/// which dropped its connection, and it came back.
async fn reconnected(runner: &RunnerHandle) {
    let mut watch = runner.watch();
    tokio::time::timeout(
        Duration::from_secs(20),
        watch.wait_for(|s| matches!(s, RunnerStatus::Connected { session, .. } if *session >= 2)),
    )
    .await
    .expect("the runner reconnected after the restart")
    .unwrap();
}

/// A broker with tenant `a` (its admin key) and one runner of alice's with room for
/// `capacity` jobs, living in the returned directory (where the tests' jobs leave files).
async fn tenant_a_with_a_runner(
    capacity: u32,
) -> (TestBroker, String, tempfile::TempDir, RunnerHandle) {
    let b = TestBroker::start().await;
    let a = b.tenant("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (_, runner) = b.runner(&a, "alice", &dir.path().join("a"), capacity).await;
    (b, a, dir, runner)
}

/// A tenant actor that does not answer (busy, stuck on its store) costs a dispatch 503
/// after `ACTOR_CALL_TIMEOUT` (5 s), not a call that hangs until the actor wakes; and the
/// job the caller was told was not taken never runs once the actor does wake.
#[tokio::test]
async fn a_dispatch_to_a_stalled_tenant_actor_is_answered_unavailable_and_never_runs() {
    let (b, a, dir, _runner) = tenant_a_with_a_runner(2).await;
    let ghost = dir.path().join("ghost");
    assert!(b.handle().stall_tenant("a", Duration::from_secs(7)));
    let started = std::time::Instant::now();
    let (status, v) = b.run(&a, "alice", "touch", &[ghost.to_str().unwrap()]).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
    assert!(started.elapsed() < Duration::from_secs(7), "answered only once the actor woke");
    let (_, jobs) = b.api.get("/v1/jobs", &a).await;
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "{jobs}");
    // The actor wakes and reads the refused dispatch first, then the later one: only the
    // later one runs.
    let (status, v) = b.run(&a, "alice", "echo", &["after"]).await;
    assert_eq!((status, v["output"].as_str()), (200, Some("after\n")), "{v}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!ghost.exists(), "the job answered 503 ran anyway");
}

/// A caller whose time limit passes while the tenant actor is deciding its dispatch (the
/// actor has it, past the mailbox) is told what the actor decided: the job ran and the
/// answer says so. Before, the caller answered 503 and let go of the job while the actor
/// sent it to a runner: a job the caller was told was not taken ran anyway.
#[tokio::test]
async fn a_dispatch_decided_after_the_callers_limit_is_answered_as_decided() {
    let (b, a, dir, _runner) = tenant_a_with_a_runner(1).await;
    let made = dir.path().join("made");
    // Past ACTOR_CALL_TIMEOUT (5 s).
    assert!(b.handle().slow_next_dispatch("a", Duration::from_secs(6)));
    let started = std::time::Instant::now();
    let (status, v) = b.run(&a, "alice", "touch", &[made.to_str().unwrap()]).await;
    // Whatever was answered, the actor has decided and its runner run the job by then.
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(started.elapsed())).await;
    assert_eq!(
        (status, made.exists()),
        (200, true),
        "answered {status} {v}, ran: {}",
        made.exists()
    );
    // The runner's one slot is free again: the next job runs.
    let (status, v) = b.run(&a, "alice", "echo", &["after"]).await;
    assert_eq!((status, v["output"].as_str()), (200, Some("after\n")), "{v}");
}

/// A tenant actor that fails while deciding a dispatch it has taken (past the mailbox,
/// so its caller waits for the verdict) answers that dispatch 503 at once, not after the
/// caller's limit nor never: the failed actor drops the reply, the caller discards the
/// job, and nothing of it is left queued or runs. The restarted actor serves the next
/// dispatch once the runner is back.
#[tokio::test]
async fn a_tenant_actor_failing_in_a_dispatch_answers_it_unavailable_and_serves_the_next() {
    let (b, a, dir, runner) = tenant_a_with_a_runner(1).await;
    let ghost = dir.path().join("ghost");
    assert!(b.handle().crash_on_next_dispatch("a"));
    let started = std::time::Instant::now();
    let (status, v) = b.run(&a, "alice", "touch", &[ghost.to_str().unwrap()]).await;
    assert_eq!((status, v["error"]["code"].as_str()), (503, Some("unavailable")), "{v}");
    // ACTOR_CALL_TIMEOUT is 5 s.
    assert!(started.elapsed() < Duration::from_secs(4), "answered after {:?}", started.elapsed());
    let (_, jobs) = b.api.get("/v1/jobs", &a).await;
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "{jobs}");
    reconnected(&runner).await;
    let (status, v) = b.run(&a, "alice", "echo", &["after"]).await;
    assert_eq!((status, v["output"].as_str()), (200, Some("after\n")), "{v}");
    assert!(!ghost.exists(), "the job answered 503 ran");
}

/// A job cancelled while its dispatch waits for the tenant actor (it is listed, queued,
/// from the moment it is accepted into the table) ends cancelled without reaching a
/// runner. Before, the actor placed it anyway: it was sent to the runner and the cancel
/// right after it.
#[tokio::test]
async fn a_job_cancelled_before_the_actor_decides_its_dispatch_never_reaches_a_runner() {
    let (b, a, dir, _runner) = tenant_a_with_a_runner(1).await;
    let ghost = dir.path().join("ghost");
    assert!(b.handle().stall_tenant("a", Duration::from_secs(2)));
    let cancel = async {
        let id = wait_for(Duration::from_secs(2), "the job listed", || async {
            let (_, v) = b.api.get("/v1/jobs", &a).await;
            v["jobs"][0]["id"].as_str().map(str::to_owned)
        })
        .await;
        let (status, v) =
            b.api.post(&format!("/v1/jobs/{id}/cancel"), &a, serde_json::json!({})).await;
        assert_eq!(status, 202, "{v}");
    };
    let args = [ghost.to_str().unwrap()];
    let ((status, v), ()) = tokio::join!(b.run(&a, "alice", "touch", &args), cancel);
    assert_eq!((status, v["state"].as_str()), (200, Some("cancelled")), "{v}");
    assert!(v["runner_id"].is_null() && v["started_at_ms"].is_null(), "it started: {v}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!ghost.exists(), "the cancelled job ran");
}

#[tokio::test]
async fn certificates_renew_over_the_live_connection() {
    let b = TestBroker::start_with(|c| c.runner_cert_validity = Duration::from_secs(3)).await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (id, state) = b.enrolled(&admin, "alice", &dir.path().join("r")).await;
    let first = std::fs::read_to_string(state.cert_path()).unwrap();
    let (_, v) = b.api.get(&format!("/v1/runners/{id}"), &admin).await;
    let first_expiry = v["cert_not_after"].as_i64().unwrap();
    let h = Runner::builder(state.clone()).capacity(1).spawn().unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    // After 2/3 of 3 s the runner asks for a new certificate, without reconnecting.
    wait_for(Duration::from_secs(10), "a renewed certificate", || async {
        let (_, v) = b.api.get(&format!("/v1/runners/{id}"), &admin).await;
        (v["cert_not_after"].as_i64() > Some(first_expiry)).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(5), "the new cert on disk", || async {
        (std::fs::read_to_string(state.cert_path()).unwrap() != first).then_some(())
    })
    .await;
    assert!(matches!(h.status(), RunnerStatus::Connected { session: 1, .. }), "{:?}", h.status());
    let (_, audit) = b.api.get("/v1/audit", &admin).await;
    assert!(audit.to_string().contains("\"renewed\""));
    // Past the first certificate's expiry, a reconnect uses the renewed one.
    runnel_tests::wait_past_unix(first_expiry, "the first certificate to expire").await;
    let h2 = Runner::builder(state).capacity(1).spawn().unwrap();
    h2.wait_connected(Duration::from_secs(10)).await.unwrap();
}
