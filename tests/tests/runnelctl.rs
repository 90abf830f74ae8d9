//! `runnelctl` against a real broker: every subcommand, JSON output, exit codes, errors.
#![allow(missing_docs, clippy::unwrap_used)]

use runnel_tests::{TestBroker, runner_bin, spawn_runner_process, wait_runner_status};
use serde_json::Value;

struct Ctl<'a> {
    url: String,
    key: &'a str,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ctl<'_> {
    async fn run(&self, args: &[&str]) -> Out {
        let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_ctl-under-test"))
            .args(args)
            .env("RUNNEL_URL", &self.url)
            .env("RUNNEL_KEY", self.key)
            .env("RUNNEL_CONFIG_DIR", "/nonexistent")
            .output()
            .await
            .unwrap();
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let o = self.run(&a).await;
        assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
        serde_json::from_str(o.stdout.trim()).unwrap()
    }
}

#[tokio::test]
async fn runnelctl_covers_the_api() {
    let b = TestBroker::start().await;
    let op = Ctl { url: b.api.base().to_owned(), key: &b.operator_key };
    assert!(op.run(&["tenants", "create", "acme"]).await.stdout.contains("created tenant acme"));
    assert!(op.run(&["tenants", "list"]).await.stdout.contains("acme"));
    let admin = op.json(&["keys", "create", "--tenant", "acme", "--role", "admin"]).await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let ctl = Ctl { url: b.api.base().to_owned(), key: &admin };

    let created = ctl
        .run(&["runners", "create", "--owner", "alice", "--name", "box", "--label", "os=linux"])
        .await;
    assert_eq!(created.code, 0, "{}", created.stderr);
    let enroll_line = created
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("runnel-runner enroll"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut words: Vec<String> = enroll_line.split_whitespace().map(str::to_owned).collect();
    words.extend(["--state-dir".to_owned(), dir.path().join("r").display().to_string()]);
    let out = tokio::process::Command::new(runner_bin!()).args(&words[1..]).output().await.unwrap();
    assert!(out.status.success());
    let list = ctl.json(&["runners", "list"]).await;
    let id = list["runners"][0]["id"].as_str().unwrap().to_owned();
    let _child = spawn_runner_process(runner_bin!(), &dir.path().join("r"), 2);
    wait_runner_status(&b, &admin, &id, "online").await;
    let table = ctl.run(&["runners", "list"]).await.stdout;
    assert!(
        table.starts_with("ID") && table.contains("online") && table.contains("os=linux"),
        "{table}"
    );
    assert!(ctl.run(&["runners", "get", &id]).await.stdout.contains(&id));

    // jobs run streams output and exits with the job's exit code.
    let ok = ctl
        .run(&["jobs", "run", "--owner", "alice", "--", "sh", "-c", "echo streamed; exit 0"])
        .await;
    assert_eq!((ok.code, ok.stdout.as_str()), (0, "streamed\n"), "{}", ok.stderr);
    let bad = ctl
        .run(&["jobs", "run", "--owner", "alice", "--", "sh", "-c", "echo nope >&2; exit 7"])
        .await;
    assert_eq!(bad.code, 7);
    assert!(bad.stdout.contains("nope"));
    let timed = ctl
        .run(&["jobs", "run", "--owner", "alice", "--timeout-ms", "200", "--", "sleep", "10"])
        .await;
    assert_eq!(timed.code, 124, "{}", timed.stderr);
    assert!(timed.stderr.contains("timed_out"));

    let jobs = ctl.json(&["jobs", "list", "--owner", "alice"]).await;
    let job_id = jobs["jobs"][0]["id"].as_str().unwrap().to_owned();
    assert!(ctl.run(&["jobs", "get", &job_id]).await.stdout.contains(&job_id));
    let c = ctl.json(&["jobs", "cancel", &job_id]).await;
    assert_eq!(c["id"], job_id.as_str());

    assert_eq!(
        ctl.run(&["jobs", "output", &job_id]).await.stdout,
        "",
        "the timed-out sleep printed nothing"
    );
    // Lists carry no output; the job that streamed is found by reading each one.
    let listed = ctl.json(&["jobs", "list", "--limit", "10"]).await;
    let ids: Vec<String> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|j| assert_eq!(j["output"], "", "lists carry no output: {j}"))
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    let mut first = None;
    for id in ids {
        if ctl.json(&["jobs", "get", &id]).await["output"] == "streamed\n" {
            first = Some(id);
        }
    }
    let first = first.expect("the streamed job is listed");
    assert_eq!(ctl.run(&["jobs", "output", &first]).await.stdout, "streamed\n");
    let missing = ctl.run(&["jobs", "output", "job-nope"]).await;
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("not_found"), "{}", missing.stderr);
    let st = ctl.run(&["status"]).await;
    assert!(
        st.stdout.contains("healthy: ok") && st.stdout.contains("ready: ready"),
        "{}",
        st.stdout
    );
    assert!(ctl.run(&["audit"]).await.stdout.contains("runner_created"));
    let revoked = ctl.json(&["runners", "revoke", &id]).await;
    assert_eq!(revoked["connections_closed"], 1);

    // Errors: one line, non-zero exit.
    let e = ctl.run(&["runners", "get", "r-nope"]).await;
    assert_eq!(e.code, 1);
    assert_eq!(e.stderr.trim().lines().count(), 1, "{}", e.stderr);
    assert!(e.stderr.contains("not_found"));
    let nokey = Ctl { url: b.api.base().to_owned(), key: "rk_bad" };
    assert!(nokey.run(&["tenants", "list"]).await.stderr.contains("unauthorized"));
    let unreachable = Ctl { url: "http://127.0.0.1:1".into(), key: "x" };
    let u = unreachable.run(&["tenants", "list"]).await;
    assert_eq!(u.code, 1);
    assert!(u.stderr.contains("cannot reach"), "{}", u.stderr);
}

#[tokio::test]
async fn runnelctl_lists_revokes_and_rotates_keys() {
    let b = TestBroker::start().await;
    let admin_key = b.tenant("acme").await;
    let admin = Ctl { url: b.api.base().to_owned(), key: &admin_key };
    let made = admin
        .json(&[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--role",
            "dispatcher",
            "--expires-in-secs",
            "3600",
        ])
        .await;
    let (id, secret) =
        (made["id"].as_str().unwrap().to_owned(), made["key"].as_str().unwrap().to_owned());
    assert!(made["expires_at"].is_i64(), "{made}");
    let listed = admin.run(&["keys", "list", "--tenant", "acme"]).await;
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert!(
        listed.stdout.contains(&id) && listed.stdout.contains("dispatcher"),
        "{}",
        listed.stdout
    );
    assert!(!listed.stdout.contains(secret.rsplit('_').next().unwrap()));
    let revoked = admin.run(&["keys", "revoke", &id, "--tenant", "acme"]).await;
    assert_eq!(revoked.code, 0, "{}", revoked.stderr);
    let gone = Ctl { url: b.api.base().to_owned(), key: &secret };
    let refused = gone.run(&["runners", "list"]).await;
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("revoked"), "{}", refused.stderr);

    let op = Ctl { url: b.api.base().to_owned(), key: &b.operator_key };
    let rotated = op.json(&["keys", "rotate-operator"]).await;
    assert!(rotated["key"].as_str().unwrap().starts_with("rk_"));
    let ops = op.json(&["keys", "list", "--operator"]).await;
    assert_eq!(ops["keys"].as_array().unwrap().len(), 2, "{ops}");
}

/// An in-process runner of `owner` with `labels`, online.
async fn labelled_runner(
    b: &TestBroker,
    admin: &str,
    owner: &str,
    labels: Value,
    dir: &std::path::Path,
) -> (String, runnel_runner::RunnerHandle) {
    let v = b.create_runner(admin, owner, labels).await;
    let state = runnel_runner::StateDir::new(dir);
    let token = v["token"].as_str().unwrap();
    runnel_runner::enroll(b.handle().advertise(), &b.handle().ca_fingerprint(), token, &state)
        .await
        .unwrap();
    let h = runnel_runner::Runner::builder(state).capacity(2).spawn().unwrap();
    h.wait_connected(std::time::Duration::from_secs(10)).await.unwrap();
    (v["runner_id"].as_str().unwrap().to_owned(), h)
}

#[tokio::test]
async fn jobs_run_each_runner_runs_once_on_every_matching_online_runner() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let linux = serde_json::json!({ "os": "linux" });
    let (l1, _h1) =
        labelled_runner(&b, &admin, "alice", linux.clone(), &dir.path().join("1")).await;
    let (l2, _h2) =
        labelled_runner(&b, &admin, "alice", linux.clone(), &dir.path().join("2")).await;
    let mac = serde_json::json!({ "os": "mac" });
    let (m, _h3) = labelled_runner(&b, &admin, "alice", mac, &dir.path().join("3")).await;
    let (bob, _h4) = labelled_runner(&b, &admin, "bob", linux, &dir.path().join("4")).await;
    let ctl = Ctl { url: b.api.base().to_owned(), key: &admin };

    let each = ["jobs", "run", "--owner", "alice", "--each-runner", "--label", "os=linux", "--"];
    let ok = ctl.run(&[&each[..], &["sh", "-c", "echo ran"]].concat()).await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    // Each matching runner once, its output under its header; not the mac, not bob's.
    for id in [&l1, &l2] {
        let header = ok.stdout.lines().find(|l| l.contains(id.as_str())).unwrap_or_default();
        assert!(
            header.starts_with("== ") && header.ends_with("succeeded, exit 0"),
            "{}",
            ok.stdout
        );
    }
    assert_eq!(ok.stdout.lines().filter(|l| *l == "ran").count(), 2, "{}", ok.stdout);
    assert!(!ok.stdout.contains(m.as_str()) && !ok.stdout.contains(bob.as_str()), "{}", ok.stdout);

    // The highest exit status of them all; an output without its last newline still ends
    // before the next header; JSON lists each job.
    let failed = ctl.run(&[&each[..], &["sh", "-c", "printf no; exit 3"]].concat()).await;
    assert_eq!(failed.code, 3, "{}", failed.stdout);
    assert_eq!(failed.stdout.lines().filter(|l| *l == "no").count(), 2, "{}", failed.stdout);
    let args = [&["-o", "json"][..], &each[..], &["true"]].concat();
    let out = ctl.run(&args).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let mut ran: Vec<&str> =
        v["jobs"].as_array().unwrap().iter().map(|j| j["runner_id"].as_str().unwrap()).collect();
    ran.sort_unstable();
    let mut want = [l1.as_str(), l2.as_str()];
    want.sort_unstable();
    assert_eq!(ran, want);

    // Nothing matches: told so, exit 1, nothing dispatched.
    let jobs_before = b.api.get("/v1/jobs", &admin).await.1["jobs"].as_array().unwrap().len();
    let none = ctl
        .run(&[
            "jobs",
            "run",
            "--owner",
            "alice",
            "--each-runner",
            "--label",
            "os=bsd",
            "--",
            "true",
        ])
        .await;
    assert_eq!(none.code, 1);
    assert!(none.stderr.contains("no online runner of alice matches"), "{}", none.stderr);
    let jobs_after = b.api.get("/v1/jobs", &admin).await.1["jobs"].as_array().unwrap().len();
    assert_eq!(jobs_before, jobs_after);
}
