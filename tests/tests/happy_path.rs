//! The quickstart, end to end, with the real runner binary driven by the exact enroll
//! command the API hands out.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use runnel_tests::{TestBroker, runner_bin, spawn_runner_process, wait_runner_status};
use serde_json::json;

#[tokio::test]
async fn operator_to_tenant_to_token_to_enroll_to_run_echo_hello() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let created = b.create_runner(&admin, "alice", json!({ "os": "linux" })).await;
    let runner_id = created["runner_id"].as_str().unwrap();
    assert!(created["expires_at"].as_str().unwrap().ends_with('Z'));
    let (_, listed) = b.api.get(&format!("/v1/runners/{runner_id}"), &admin).await;
    assert_eq!(listed["status"], "pending");

    // Paste the enroll command as a user would, with our state dir.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("runner");
    let cmd = created["enroll_command"].as_str().unwrap();
    let mut words: Vec<String> = cmd.split_whitespace().map(str::to_owned).collect();
    assert_eq!(words[0], "runnel-runner");
    assert!(cmd.contains(&b.handle().ca_fingerprint()));
    assert!(!cmd.contains("--state-dir"), "the default state dir is outside job dirs: {cmd}");
    words.extend(["--state-dir".to_owned(), state.display().to_string()]);
    let out = tokio::process::Command::new(runner_bin!()).args(&words[1..]).output().await.unwrap();
    assert!(out.status.success(), "enroll failed: {}", String::from_utf8_lossy(&out.stderr));
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("key.pem")).unwrap().permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);

    let mut child = spawn_runner_process(runner_bin!(), &state, 2);
    wait_runner_status(&b, &admin, runner_id, "online").await;
    let (status, job) = b.run(&admin, "alice", "echo", &["hello"]).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["output"], "hello\n");
    assert_eq!(job["exit_code"], 0);
    assert_eq!(job["runner_id"], runner_id);

    // Streamed output endpoint returns the same bytes once the job is over.
    let raw = b.api.raw(&format!("/v1/jobs/{}/output", job["id"].as_str().unwrap()), &admin).await;
    assert_eq!(raw, "hello\n");

    // A failing command is `failed` with its exit code; a missing program is `failed` too.
    let (_, job) = b.run(&admin, "alice", "sh", &["-c", "echo oops >&2; exit 3"]).await;
    assert_eq!(job["state"], "failed");
    assert_eq!(job["exit_code"], 3);
    assert_eq!(job["output"], "oops\n");
    let (_, job) = b.run(&admin, "alice", "/nonexistent/program", &[]).await;
    assert_eq!(job["state"], "failed");
    assert!(job["message"].as_str().unwrap().contains("could not start"), "{job}");

    // SIGTERM drains: the process exits cleanly and the runner goes offline.
    let pid = child.id().unwrap() as i32;
    nix_kill(pid, "TERM");
    let status =
        tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "runner exit: {status:?}");
    wait_runner_status(&b, &admin, runner_id, "offline").await;
}

fn nix_kill(pid: i32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}
