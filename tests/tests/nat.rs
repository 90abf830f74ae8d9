//! Runners behind a real NAT (issue #13, first step): the lab of `tests/netlab/netlab.sh`
//! (network namespaces, a MASQUERADE router with random ports that drops inbound
//! connections), with real `runnel-broker`, `runnel-runner` and `runnelctl` processes in
//! it. Where namespaces cannot be made each test says so in one line and skips; `.ci/run`
//! prints how many did.
#![allow(missing_docs, clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use runnel_tests::netlab::{BROKER_IP, Lab, NAT_OUTSIDE_IP, Ns, RUNNER_IP};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

const BROKER: &str = env!("CARGO_BIN_EXE_broker-under-test");
const RUNNER: &str = env!("CARGO_BIN_EXE_runner-under-test");
const CTL: &str = env!("CARGO_BIN_EXE_ctl-under-test");

/// A broker in the broker namespace: QUIC on its address, the API on its loopback.
struct NatBroker {
    _child: tokio::process::Child,
    fingerprint: String,
    operator_key: String,
    log: std::path::PathBuf,
}

async fn broker(lab: &Lab, dir: &std::path::Path) -> NatBroker {
    let log = dir.join("broker.log");
    let mut child = lab
        .command(Ns::Broker, BROKER)
        .args(["serve", "--quic-listen", &format!("{BROKER_IP}:7443")])
        .args(["--http-listen", "127.0.0.1:7480", "--idle-timeout", "10s"])
        .args(["--heartbeat-interval", "2s", "--data-dir"])
        .arg(dir.join("data"))
        .env("RUST_LOG", "info")
        .env("RUNNEL_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut fingerprint, mut key) = (None, None);
    while let Ok(Some(line)) =
        tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.unwrap()
    {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("CA fingerprint:") {
            fingerprint = Some(rest.trim().to_owned());
        } else if let Some(rest) = t.strip_prefix("Operator key file:") {
            key = Some(std::fs::read_to_string(rest.trim()).unwrap().trim().to_owned());
        }
        if fingerprint.is_some() && key.is_some() {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    NatBroker {
        _child: child,
        fingerprint: fingerprint.expect("CA fingerprint in the banner"),
        operator_key: key.expect("operator key file in the banner"),
        log,
    }
}

/// `runnelctl -o json ARGS` inside the broker namespace.
async fn ctl(lab: &Lab, key: &str, args: &[&str]) -> (i32, Value, String) {
    let o = lab
        .command(Ns::Broker, CTL)
        .args(["-o", "json"])
        .args(args)
        .env("RUNNEL_URL", "http://127.0.0.1:7480")
        .env("RUNNEL_KEY", key)
        .env("RUNNEL_CONFIG_DIR", "/nonexistent")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let v = serde_json::from_str(stdout.trim()).unwrap_or(Value::String(stdout));
    (o.status.code().unwrap_or(-1), v, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A broker in the lab, tenant `acme`, and a runner process behind the NAT, online.
struct Natted {
    b: NatBroker,
    admin: String,
    id: String,
    _runner: tokio::process::Child,
}

async fn natted(lab: &Lab, dir: &std::path::Path) -> Natted {
    let b = broker(lab, dir).await;
    let op = &b.operator_key;
    assert_eq!(ctl(lab, op, &["tenants", "create", "acme"]).await.0, 0);
    let (_, k, _) = ctl(lab, op, &["keys", "create", "--tenant", "acme", "--role", "admin"]).await;
    let admin = k["key"].as_str().unwrap().to_owned();
    let (code, r, err) =
        ctl(lab, &admin, &["runners", "create", "--owner", "alice", "--name", "natted"]).await;
    assert_eq!(code, 0, "{err}");
    let (id, token) = (r["runner_id"].as_str().unwrap().to_owned(), r["token"].as_str().unwrap());

    // The runner, on its private subnet, enrolls and connects through the NAT.
    let state = dir.join("runner");
    let enrolled = lab
        .command(Ns::Runner, RUNNER)
        .args(["enroll", "--broker", &format!("{BROKER_IP}:7443")])
        .args(["--ca-fingerprint", &b.fingerprint, "--token", token, "--state-dir"])
        .arg(&state)
        .output()
        .await
        .unwrap();
    assert!(enrolled.status.success(), "{}", String::from_utf8_lossy(&enrolled.stderr));
    let runner = lab
        .command(Ns::Runner, RUNNER)
        .args(["run", "--capacity", "2", "--state-dir"])
        .arg(&state)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    runnel_tests::wait_for(Duration::from_secs(20), "the runner online", || async {
        let (_, v, _) = ctl(lab, &admin, &["runners", "get", &id]).await;
        (v["status"] == "online").then_some(())
    })
    .await;
    Natted { b, admin, id, _runner: runner }
}

#[tokio::test]
async fn a_runner_behind_the_nat_enrolls_and_runs_jobs_and_the_broker_sees_only_the_nat() {
    let Some(lab) = Lab::up() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Natted { b, admin, _runner, .. } = natted(&lab, dir.path()).await;

    // Jobs run through it.
    for n in 0..3 {
        let (code, v, err) = ctl(
            &lab,
            &admin,
            &["jobs", "run", "--owner", "alice", "--", "sh", "-c", &format!("echo through-{n}")],
        )
        .await;
        assert_eq!(code, 0, "{v} {err}");
        assert!(v.to_string().contains(&format!("through-{n}")), "{v}");
    }

    // The broker saw the NAT's outside address, never the runner's private one.
    let log = std::fs::read_to_string(&b.log).unwrap();
    let connected: Vec<&str> = log.lines().filter(|l| l.contains("runner connected")).collect();
    assert!(!connected.is_empty(), "{log}");
    assert!(connected.iter().all(|l| l.contains(&format!("{NAT_OUTSIDE_IP}:"))), "{connected:?}");
    assert!(!log.contains(RUNNER_IP), "the broker saw the private address:\n{log}");
}

#[tokio::test]
async fn nothing_gets_in_from_the_broker_side() {
    let Some(lab) = Lab::up() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Something listening on the runner's private address (an HTTP API, plain on purpose).
    let _listener = lab
        .command(Ns::Runner, BROKER)
        .args(["serve", "--http-insecure", "--quic-listen", &format!("{RUNNER_IP}:7443")])
        .args(["--http-listen", &format!("{RUNNER_IP}:7480"), "--data-dir"])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let probe = |ns: Ns| {
        let cmd = format!("exec 3<>/dev/tcp/{RUNNER_IP}/7480");
        let mut c = lab.command(ns, "timeout");
        c.args(["3", "bash", "-c", &cmd]);
        c
    };
    // It is there: from its own namespace the port answers.
    runnel_tests::wait_for(Duration::from_secs(20), "the listener up", || async {
        probe(Ns::Runner).status().await.unwrap().success().then_some(())
    })
    .await;
    // From the broker's side, with a route through the NAT, nothing gets in.
    let inbound = probe(Ns::Broker).status().await.unwrap();
    assert!(!inbound.success(), "a TCP connection from the broker side reached the runner");
    // Nor does QUIC: an enrollment attempt toward the runner's address gets no answer.
    let quic = lab
        .command(Ns::Broker, RUNNER)
        .args(["enroll", "--broker", &format!("{RUNNER_IP}:7443")])
        .args(["--ca-fingerprint", &format!("sha256:{}", "0".repeat(64)), "--token", "rt_x_y"])
        .arg("--state-dir")
        .arg(dir.path().join("probe"))
        .output()
        .await
        .unwrap();
    assert!(!quic.status.success());
}

#[tokio::test]
async fn a_nat_rebinding_mid_job_migrates_the_connection_and_the_job_succeeds() {
    let Some(lab) = Lab::up() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Natted { b, admin, id, _runner } = natted(&lab, dir.path()).await;
    // A job that is quiet for 5 s, then prints.
    let job = lab
        .command(Ns::Broker, CTL)
        .args(["-o", "json", "jobs", "run", "--owner", "alice", "--"])
        .args(["sh", "-c", "sleep 5; echo after-the-rebinding"])
        .env("RUNNEL_URL", "http://127.0.0.1:7480")
        .env("RUNNEL_KEY", &admin)
        .env("RUNNEL_CONFIG_DIR", "/nonexistent")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The NAT forgets its mapping: the runner's next packets leave from a new port.
    lab.lab("rebind", &[]);
    let out = tokio::time::timeout(Duration::from_secs(30), job.wait_with_output())
        .await
        .expect("the job ended")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("after-the-rebinding"), "{stdout}");

    // The same connection went on from the new address: seen, and no second session.
    let log = runnel_tests::wait_for(Duration::from_secs(10), "the migration logged", || async {
        let log = std::fs::read_to_string(&b.log).unwrap();
        log.contains("the connection migrated").then_some(log)
    })
    .await;
    let migrated = log.lines().find(|l| l.contains("the connection migrated")).unwrap();
    assert!(migrated.matches(&format!("{NAT_OUTSIDE_IP}:")).count() == 2, "{migrated}");
    assert_eq!(log.matches("runner connected").count(), 1, "a reconnect:\n{log}");
    assert_eq!(log.matches("runner disconnected").count(), 0, "{log}");
    let (_, v, _) = ctl(&lab, &admin, &["runners", "get", &id]).await;
    assert_eq!((v["status"].as_str(), v["connections"].as_u64()), (Some("online"), Some(1)), "{v}");
}
