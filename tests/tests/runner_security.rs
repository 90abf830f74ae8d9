//! What a job can reach on its runner: not the runner's key, not the runner's environment;
//! and the runner's CLI survives a closed stdout.
#![allow(missing_docs, clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use runnel_tests::{TestBroker, runner_bin, wait_runner_status};
use serde_json::json;

/// Enrolls through the real binary into `<work>/runnel-runner` (the old default layout:
/// the state dir inside the runner's working directory) and starts `runnel-runner run`
/// there, with `extra_env` in its environment.
async fn runner_in(
    b: &TestBroker,
    admin: &str,
    work: &std::path::Path,
    extra_env: &[(&str, &str)],
) -> (String, tokio::process::Child) {
    let created = b.create_runner(admin, "alice", json!({})).await;
    let state = work.join("runnel-runner");
    let mut words: Vec<String> =
        created["enroll_command"].as_str().unwrap().split_whitespace().map(str::to_owned).collect();
    words.extend(["--state-dir".to_owned(), state.display().to_string()]);
    let out = tokio::process::Command::new(runner_bin!())
        .args(&words[1..])
        .current_dir(work)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let child = tokio::process::Command::new(runner_bin!())
        .args(["run", "--capacity", "2", "--state-dir", "runnel-runner"])
        .current_dir(work)
        .envs(extra_env.iter().copied())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let id = created["runner_id"].as_str().unwrap().to_owned();
    wait_runner_status(b, admin, &id, "online").await;
    (id, child)
}

/// Enrolls a runner in `dir` and starts `runnel-runner run` with `flags`; waits until
/// it is online.
async fn online_with(
    b: &TestBroker,
    admin: &str,
    dir: &std::path::Path,
    flags: &[&str],
) -> tokio::process::Child {
    let (id, state) = b.enrolled(admin, "alice", &dir.join("r")).await;
    let child = tokio::process::Command::new(runner_bin!())
        .arg("run")
        .args(flags)
        .arg("--state-dir")
        .arg(state.path())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_runner_status(b, admin, &id, "online").await;
    child
}

async fn sh(b: &TestBroker, admin: &str, script: &str) -> serde_json::Value {
    let (s, v) = b
        .api
        .post("/v1/jobs", admin, json!({ "owner": "alice", "kind": "exec", "exec": { "program": "sh", "args": ["-c", script] }, "wait": true }))
        .await;
    assert_eq!(s, 200, "{v}");
    v
}

#[tokio::test]
async fn a_job_cannot_read_the_runners_key_or_see_its_environment() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let work = tempfile::tempdir().unwrap();
    let (_, _child) =
        runner_in(&b, &admin, work.path(), &[("RUNNEL_TEST_SECRET", "hunter2")]).await;

    // Relative to where the runner runs, the key is at runnel-runner/key.pem: the job is
    // elsewhere (its own temp dir), so it cannot open it that way.
    let v = sh(&b, &admin, "pwd; cat runnel-runner/key.pem").await;
    assert_eq!(v["state"], "failed", "{v}");
    let out = v["output"].as_str().unwrap();
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    // stdout and stderr arrive as separate streams: pwd's line is the one that is a path.
    let pwd = out.lines().find(|l| l.starts_with('/')).unwrap();
    assert_ne!(std::path::Path::new(pwd), work.path(), "the job ran in the runner's directory");
    assert!(pwd.contains("runnel-job-"), "{pwd}");

    // The runner's own variables are not the job's; the job's `env` is.
    let (s, v) = b
        .api
        .post("/v1/jobs", &admin, json!({ "owner": "alice", "kind": "exec", "exec": { "program": "sh", "args": ["-c", "echo \"[$RUNNEL_TEST_SECRET][$MINE]\""], "env": { "MINE": "ok" } }, "wait": true }))
        .await;
    assert_eq!((s, v["output"].as_str()), (200, Some("[][ok]\n")), "{v}");
    // Jobs still find programs on PATH.
    assert_eq!(
        sh(&b, &admin, "command -v true >/dev/null && echo found").await["output"],
        "found\n"
    );
}

#[tokio::test]
async fn exec_allow_limits_the_programs_a_job_may_run() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let _child = online_with(&b, &admin, dir.path(), &["--exec-allow", "echo"]).await;
    let (_, v) = b.run(&admin, "alice", "echo", &["allowed"]).await;
    assert_eq!((v["state"].as_str(), v["output"].as_str()), (Some("succeeded"), Some("allowed\n")));
    let (_, v) = b.run(&admin, "alice", "sh", &["-c", "echo escaped"]).await;
    assert_eq!(v["state"], "rejected", "{v}");
    assert!(!v["output"].as_str().unwrap_or("").contains("escaped"), "{v}");
}

#[tokio::test]
async fn enroll_into_a_closed_stdout_does_not_panic() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let created = b.create_runner(&admin, "alice", json!({})).await;
    let mut words: Vec<String> =
        created["enroll_command"].as_str().unwrap().split_whitespace().map(str::to_owned).collect();
    words.extend(["--state-dir".to_owned(), dir.path().join("r").display().to_string()]);
    // `… | head -0`: the reader is gone before the runner prints.
    let mut child = tokio::process::Command::new(runner_bin!())
        .args(&words[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn enroll_refuses_a_shared_directory_and_leaves_it_as_it_was() {
    use std::os::unix::fs::PermissionsExt;
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let created = b.create_runner(&admin, "alice", json!({})).await;
    let mut words: Vec<String> =
        created["enroll_command"].as_str().unwrap().split_whitespace().map(str::to_owned).collect();
    words.extend(["--state-dir".to_owned(), shared.display().to_string()]);
    let out = tokio::process::Command::new(runner_bin!()).args(&words[1..]).output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loose permissions"), "{out:?}");
    let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o1777, "the directory was not chmod-ed");
    // The refusal cost nothing: the same token enrolls into a proper directory.
    let pos = words.iter().position(|w| w == "--state-dir").unwrap();
    words[pos + 1] = dir.path().join("private").display().to_string();
    let out = tokio::process::Command::new(runner_bin!()).args(&words[1..]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn no_exec_runs_nothing_and_exec_jobs_are_refused_at_once() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let _child = online_with(&b, &admin, dir.path(), &["--no-exec"]).await;
    let (s, v) = b.run(&admin, "alice", "true", &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("no_runner")), "{v}");
}
