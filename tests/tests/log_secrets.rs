//! Tokens, API keys and private keys never appear in logs, at any level: the real broker and
//! runner binaries run at RUST_LOG=trace through enrollment, a job, and a revocation.
#![allow(missing_docs, clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use runnel_tests::{Api, runner_bin, wait_for};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn no_secret_reaches_any_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut broker = tokio::process::Command::new(env!("CARGO_BIN_EXE_broker-under-test"))
        .args([
            "serve",
            "--quic-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(broker.stdout.take().unwrap()).lines();
    let (mut http, mut key_file, mut banner) = (None, None, String::new());
    while let Some(l) = lines.next_line().await.unwrap() {
        banner.push_str(&l);
        banner.push('\n');
        let t = l.trim();
        if let Some(rest) = t.strip_prefix("HTTP API:") {
            http = Some(rest.trim().to_owned());
        }
        if let Some(rest) = t.strip_prefix("Operator key file:") {
            key_file = Some(std::path::PathBuf::from(rest.trim()));
        }
        if t.starts_with("export RUNNEL_URL") {
            break;
        }
    }
    // The key is in a 0600 file, and never on stdout (where journald would keep it).
    let key_file = key_file.expect("the banner names the key file");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    let operator = std::fs::read_to_string(&key_file).unwrap().trim().to_owned();
    assert!(operator.starts_with("rk_"), "{operator}");
    assert!(!banner.contains(&operator), "the operator key was printed: {banner}");
    let http = http.unwrap();
    let stderr = broker.stderr.take().unwrap();
    let broker_log = tokio::spawn(async move {
        let mut all = String::new();
        let mut r = BufReader::new(stderr).lines();
        while let Ok(Some(l)) = r.next_line().await {
            all.push_str(&l);
            all.push('\n');
        }
        all
    });

    let api = Api::new(http);
    assert_eq!(api.post("/v1/tenants", &operator, json!({ "id": "acme" })).await.0, 201);
    let (_, k) = api.post("/v1/tenants/acme/keys", &operator, json!({ "role": "admin" })).await;
    let admin = k["key"].as_str().unwrap().to_owned();
    let (_, r) = api.post("/v1/runners", &admin, json!({ "owner": "alice", "name": "box" })).await;
    let token = r["token"].as_str().unwrap().to_owned();
    let runner_id = r["runner_id"].as_str().unwrap().to_owned();
    // A wrong key and a replayed token exercise the refusal paths' logging too.
    assert_eq!(api.get("/v1/runners", &format!("{admin}0")).await.0, 401);

    let state = dir.path().join("runner");
    let cmd: Vec<String> =
        r["enroll_command"].as_str().unwrap().split_whitespace().map(str::to_owned).collect();
    let enroll = tokio::process::Command::new(runner_bin!())
        .args(&cmd[1..])
        .args(["--state-dir", &state.display().to_string()])
        .env("RUST_LOG", "trace")
        .output()
        .await
        .unwrap();
    assert!(enroll.status.success());
    let replay = tokio::process::Command::new(runner_bin!())
        .args(&cmd[1..])
        .args(["--state-dir", &dir.path().join("other").display().to_string()])
        .env("RUST_LOG", "trace")
        .output()
        .await
        .unwrap();
    assert!(!replay.status.success());
    let runner = tokio::process::Command::new(runner_bin!())
        .args(["run", "--state-dir", &state.display().to_string()])
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(15), "runner online", || async {
        let (_, v) = api.get(&format!("/v1/runners/{runner_id}"), &admin).await;
        (v["status"] == "online").then_some(())
    })
    .await;
    let (_, job) = api
        .post("/v1/jobs", &admin, json!({ "owner": "alice", "kind": "exec", "exec": { "program": "echo", "args": ["hi"] }, "wait": true }))
        .await;
    assert_eq!(job["output"], "hi\n");
    assert_eq!(api.delete(&format!("/v1/runners/{runner_id}"), &admin).await.0, 200);
    let runner_out = tokio::time::timeout(Duration::from_secs(15), runner.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &broker.id().unwrap().to_string()])
        .status()
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(10), broker.wait()).await;
    let broker_log = broker_log.await.unwrap();

    let pem_body = |p: std::path::PathBuf| -> String {
        std::fs::read_to_string(p).unwrap().lines().filter(|l| !l.starts_with("-----")).collect()
    };
    let secret_part = |s: &str| s.rsplit('_').next().unwrap().to_owned();
    let secrets = [
        ("operator key", secret_part(&operator)),
        ("admin key", secret_part(&admin)),
        ("enrollment token", secret_part(&token)),
        ("runner private key", pem_body(state.join("key.pem"))),
        ("CA private key", pem_body(data.join("ca.key"))),
    ];
    let logs = [
        ("broker", broker_log),
        (
            "enroll",
            String::from_utf8_lossy(&enroll.stderr).into_owned()
                + &String::from_utf8_lossy(&enroll.stdout),
        ),
        ("replay", String::from_utf8_lossy(&replay.stderr).into_owned()),
        ("runner", String::from_utf8_lossy(&runner_out.stderr).into_owned()),
    ];
    for (log_name, log) in &logs {
        assert!(
            log.len() > 200 || *log_name == "replay",
            "{log_name} log suspiciously short: trace logging not on?"
        );
        for (what, secret) in &secrets {
            assert!(secret.len() >= 40, "{what} looks too short to search for");
            assert!(!log.contains(secret.as_str()), "{what} appears in the {log_name} log");
        }
    }
}
