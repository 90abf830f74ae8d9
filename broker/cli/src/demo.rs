//! `runnel-broker demo`: a newcomer's first five minutes in one command.
//!
//! Starts a broker on the embedded default (redb) in a temp dir, creates two tenants with
//! owners, enrolls and starts three real `runnel-runner` processes, dispatches jobs with
//! live output, shows that one tenant cannot see the other's runner, revokes a runner and
//! shows its connection closing, points at `/metrics`, and cleans up.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use runnel_broker::{Broker, BrokerHandle, Config};
use runnel_ctl::Client;

fn step(n: u32, what: &str) {
    println!("\n\x1b[1m[{n}] {what}\x1b[0m");
}

/// Finds `runnel-runner`: next to this binary, else on PATH.
fn runner_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    if let Some(dir) = me.parent() {
        let beside = dir.join("runnel-runner");
        if beside.exists() {
            return Ok(beside);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|p| p.join("runnel-runner")).find(|p| p.exists()).context(
        "runnel-runner not found next to runnel-broker or on PATH (cargo build --release --bins)",
    )
}

struct Demo {
    operator: Client,
    base: String,
    runner_bin: PathBuf,
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Demo {
    async fn tenant(&self, id: &str) -> anyhow::Result<Client> {
        self.operator.post("/v1/tenants", json!({ "id": id })).await?;
        let k = self
            .operator
            .post(&format!("/v1/tenants/{id}/keys"), json!({ "role": "admin" }))
            .await?;
        Ok(Client::new(&self.base, k["key"].as_str().context("key")?))
    }

    /// Creates a runner, enrolls it with the exact command the API returned, starts it.
    async fn runner(&mut self, admin: &Client, owner: &str, name: &str) -> anyhow::Result<String> {
        let v = admin.post("/v1/runners", json!({ "owner": owner, "name": name })).await?;
        let id = v["runner_id"].as_str().context("runner_id")?.to_owned();
        let state = self.dir.join(name);
        let cmd = v["enroll_command"].as_str().context("enroll_command")?;
        let mut words: Vec<String> = cmd.split_whitespace().map(str::to_owned).collect();
        // The command enrolls into the default state dir; the demo keeps each runner's own.
        words.extend(["--state-dir".to_owned(), state.display().to_string()]);
        let shown = cmd.split(" --token ").next().unwrap_or(cmd);
        println!("  {name}: {shown} --token rt_… (one-time)");
        let out = Command::new(&self.runner_bin).args(&words[1..]).output().await?;
        if !out.status.success() {
            bail!("enroll failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let child = Command::new(&self.runner_bin)
            .args(["run", "--capacity", "2", "--state-dir"])
            .arg(&state)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.children.push((id.clone(), child));
        Ok(id)
    }

    async fn wait_status(&self, admin: &Client, id: &str, want: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = admin.get(&format!("/v1/runners/{id}")).await?;
            if v["status"] == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("runner {id} is {} (wanted {want})", v["status"]);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn run_job(&self, admin: &Client, owner: &str, script: &str) -> anyhow::Result<Value> {
        let job = admin
            .post("/v1/jobs", json!({ "owner": owner, "kind": "exec", "exec": { "program": "sh", "args": ["-c", script] } }))
            .await?;
        let id = job["id"].as_str().context("id")?.to_owned();
        admin.stream_output(&id, &mut tokio::io::stdout()).await?;
        Ok(admin.get(&format!("/v1/jobs/{id}")).await?)
    }
}

fn runners_table(v: &Value) {
    for r in v["runners"].as_array().map(Vec::as_slice).unwrap_or_default() {
        println!(
            "  {:<20} owner={:<6} name={:<14} {}",
            r["id"].as_str().unwrap_or("?"),
            r["owner"].as_str().unwrap_or("?"),
            r["name"].as_str().unwrap_or("?"),
            r["status"].as_str().unwrap_or("?")
        );
    }
}

/// Runs the demo.
pub(crate) async fn run() -> anyhow::Result<()> {
    let runner_bin = runner_binary()?;
    let tmp = tempfile::tempdir()?;
    let config = Config {
        quic_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        heartbeat_interval: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(5),
        ..Config::loopback(&tmp.path().join("data"))
    };
    step(1, "start a broker on the embedded default (redb) in a temp dir");
    let broker = Broker::spawn(config).await?;
    println!(
        "  QUIC {}  HTTP {}  CA {}",
        broker.quic_addr(),
        broker.http_url(),
        broker.ca_fingerprint()
    );
    let operator_key = broker.first_operator_key.clone().context("operator key")?;
    let base = broker.http_url();
    let mut demo = Demo {
        operator: Client::new(&base, &operator_key),
        base: base.clone(),
        runner_bin,
        dir: tmp.path().to_owned(),
        children: Vec::new(),
    };
    let result = script(&mut demo, &broker).await;
    step(9, "shut down: runners drain on SIGTERM, then the broker stops");
    for (_, child) in &mut demo.children {
        if let Some(pid) = child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
    }
    for (_, child) in &mut demo.children {
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    }
    broker.shutdown().await;
    result?;
    println!("\ndone. Run your own: cargo run --release -p runnel-broker-cli -- serve (README.md)");
    Ok(())
}

async fn script(d: &mut Demo, broker: &BrokerHandle) -> anyhow::Result<()> {
    step(2, "two tenants, each with an admin key");
    let acme = d.tenant("acme").await?;
    let globex = d.tenant("globex").await?;
    println!("  acme, globex");

    step(3, "three runners enroll with one-time tokens and dial out");
    let alice = d.runner(&acme, "alice", "alice-laptop").await?;
    let bob = d.runner(&acme, "bob", "bob-ci").await?;
    let carol = d.runner(&globex, "carol", "carol-edge").await?;
    for (admin, id) in [(&acme, &alice), (&acme, &bob), (&globex, &carol)] {
        d.wait_status(admin, id, "online").await?;
    }
    runners_table(&acme.get("/v1/runners").await?);
    runners_table(&globex.get("/v1/runners").await?);

    step(4, "dispatch to alice: output streams live from her runner");
    let j = d
        .run_job(
            &acme,
            "alice",
            "for i in 1 2 3; do echo \"step $i on runner of alice\"; sleep 0.3; done",
        )
        .await?;
    println!("  → {} on {} (exit {})", j["state"], j["runner_id"], j["exit_code"]);
    let j = d.run_job(&globex, "carol", "echo hello from globex; uname -s").await?;
    println!("  → {} on {} (exit {})", j["state"], j["runner_id"], j["exit_code"]);

    step(5, "isolation: globex cannot see or use acme's runner");
    match globex.get(&format!("/v1/runners/{alice}")).await {
        Err(e) => println!("  GET acme's runner with globex's key → {e}"),
        Ok(_) => bail!("globex saw acme's runner"),
    }
    let r = globex
        .post("/v1/jobs", json!({ "owner": "alice", "runner_id": alice, "kind": "exec", "exec": { "program": "id" } }))
        .await;
    match r {
        Err(e) => println!("  dispatch to acme's runner from globex → {e}"),
        Ok(_) => bail!("globex dispatched to acme's runner"),
    }
    println!(
        "  globex sees {} runner(s)",
        globex.get("/v1/runners").await?["runners"].as_array().map_or(0, Vec::len)
    );

    step(6, "revoke bob's runner: its live connection closes at once");
    let t0 = Instant::now();
    let v = acme.delete(&format!("/v1/runners/{bob}")).await?;
    println!("  DELETE /v1/runners/{bob} → {v} in {:?}", t0.elapsed());
    if let Some((_, child)) = d.children.iter_mut().find(|(id, _)| *id == bob) {
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .context("bob's runner did not exit")??;
        println!("  bob's runner process exited with {status} (3 = refused for good: re-enroll)");
    }
    d.wait_status(&acme, &bob, "revoked").await?;
    match acme
        .post("/v1/jobs", json!({ "owner": "bob", "kind": "exec", "exec": { "program": "true" } }))
        .await
    {
        Err(e) => println!("  a job for bob now → {e}"),
        Ok(_) => bail!("a job for a revoked runner was accepted"),
    }

    step(7, "the audit log");
    let audit = acme.get("/v1/audit").await?;
    for e in audit["events"].as_array().map(Vec::as_slice).unwrap_or_default() {
        println!(
            "  {:<15} {:<18} {}",
            e["event"].as_str().unwrap_or(""),
            e["actor"].as_str().unwrap_or(""),
            e["detail"].as_str().unwrap_or("")
        );
    }

    step(8, "metrics for Prometheus (a metrics key reads /metrics and nothing else)");
    let anonymous = Client::new(&broker.http_url(), "").text("/metrics").await?;
    println!("  without a key: {}", anonymous.lines().next().unwrap_or_default());
    let scrape = d.operator.post("/v1/operator-keys", json!({ "role": "metrics" })).await?;
    let scrape_key = scrape["key"].as_str().context("metrics key")?;
    let id = scrape["id"].as_str().unwrap_or_default();
    println!("  with metrics key {id}, {}/metrics:", broker.http_url());
    let body = Client::new(&broker.http_url(), scrape_key).text("/metrics").await?;
    for l in body.lines().filter(|l| {
        l.starts_with("runnel_dispatches_total")
            || l.starts_with("runnel_runners_connected")
            || l.starts_with("runnel_handshakes_total")
    }) {
        println!("    {l}");
    }
    Ok(())
}
