//! Subcommands of `runnelctl`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::table::{ago, render};
use crate::{Client, CtlError};

/// Seconds since the Unix epoch (for "… ago" columns).
fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[derive(Debug, Parser)]
#[command(name = "runnelctl", version, about = "Operate a runnel broker through its HTTP API")]
struct Cli {
    /// Broker API URL.
    #[arg(long, env = "RUNNEL_URL", global = true)]
    url: Option<String>,
    /// API key.
    #[arg(long, env = "RUNNEL_KEY", hide_env_values = true, global = true)]
    key: Option<String>,
    /// Fingerprint (sha256:<hex>) of the cluster CA, for an https:// URL: the one CA
    /// trusted (the broker prints it at start).
    #[arg(long, env = "RUNNEL_CA_FINGERPRINT", global = true)]
    ca_fingerprint: Option<String>,
    /// Profile from profiles.toml (url, key, ca_fingerprint).
    #[arg(long, env = "RUNNEL_PROFILE", global = true)]
    profile: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tenants (operator key).
    #[command(subcommand)]
    Tenants(Tenants),
    /// API keys.
    #[command(subcommand)]
    Keys(Keys),
    /// Runners.
    #[command(subcommand)]
    Runners(Runners),
    /// Jobs.
    #[command(subcommand)]
    Jobs(Jobs),
    /// Broker health and readiness (no key needed).
    Status,
    /// The cluster (operator key).
    #[command(subcommand)]
    Cluster(Cluster),
    /// The audit log (tenant for admin keys, cluster for operator keys).
    Audit {
        /// Most events to show.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
enum Cluster {
    /// Nodes, their addresses and how much of each lease is left.
    Status,
    /// Move tenants to the node rendezvous hashing picks among the live nodes now (after
    /// nodes joined); each is drained on its old home first.
    Rebalance,
}

#[derive(Debug, Subcommand)]
enum Tenants {
    /// Create a tenant.
    Create {
        /// Tenant id.
        id: String,
    },
    /// List tenants.
    List,
}

#[derive(Debug, Subcommand)]
enum Keys {
    /// Create an API key (printed once).
    Create {
        /// Tenant.
        #[arg(long)]
        tenant: String,
        /// admin, dispatcher or member.
        #[arg(long)]
        role: String,
        /// Owner (member keys).
        #[arg(long)]
        owner: Option<String>,
        /// Seconds until the key stops working (default: never).
        #[arg(long)]
        expires_in_secs: Option<u64>,
    },
    /// List a tenant's keys (never their secrets), or the operator keys with --operator.
    List {
        /// Tenant.
        #[arg(long, required_unless_present = "operator")]
        tenant: Option<String>,
        /// The operator keys instead.
        #[arg(long, conflicts_with = "tenant")]
        operator: bool,
    },
    /// Revoke a key: refused from its next request on.
    Revoke {
        /// Key id (the `rk_<id>_…` middle part, as listed).
        id: String,
        /// Tenant of the key.
        #[arg(long, required_unless_present = "operator")]
        tenant: Option<String>,
        /// An operator key instead.
        #[arg(long, conflicts_with = "tenant")]
        operator: bool,
    },
    /// Mint another operator key (rotation: create, switch to it, revoke the old one).
    RotateOperator,
    /// Mint a metrics key: it reads /metrics and nothing else (Prometheus's bearer token;
    /// revoke it with `keys revoke --operator <id>`).
    CreateMetrics {
        /// Seconds until the key stops working (default: never).
        #[arg(long)]
        expires_in_secs: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum Runners {
    /// Create a runner; prints its one-time token and enroll command.
    Create {
        /// Owner the runner belongs to.
        #[arg(long)]
        owner: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Label key=value (repeatable).
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// Token lifetime in seconds.
        #[arg(long)]
        token_ttl: Option<u64>,
    },
    /// List runners.
    List {
        /// Only this owner's.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Show one runner.
    Get {
        /// Runner id.
        id: String,
    },
    /// Revoke a runner: closes its connections, refuses it forever.
    Revoke {
        /// Runner id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum Jobs {
    /// Run a program on a runner, stream its output, exit with its exit code.
    Run {
        /// Owner whose runner runs it (members: their own, implied).
        #[arg(long)]
        owner: Option<String>,
        /// A specific runner.
        #[arg(long)]
        runner: Option<String>,
        /// On every online runner (of --owner, with the --label labels) instead of one:
        /// a job each, dispatched in batches; prints each runner's output and exits with
        /// the highest job's exit status.
        #[arg(long, conflicts_with = "runner")]
        each_runner: bool,
        /// Required label key=value (repeatable).
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// Run-time limit in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Environment variable KEY=VALUE for the program (repeatable).
        #[arg(long = "env", value_parser = parse_kv)]
        env: Vec<(String, String)>,
        /// Working directory on the runner.
        #[arg(long)]
        cwd: Option<String>,
        /// Program and arguments (after --).
        #[arg(required = true, trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Show one job.
    Get {
        /// Job id.
        id: String,
    },
    /// Recent jobs.
    List {
        /// Only this owner's.
        #[arg(long)]
        owner: Option<String>,
        /// Most jobs to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Stream a job's output (what it printed so far, then live until it ends).
    Output {
        /// Job id.
        id: String,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} must be key=value"))?;
    Ok((k.to_owned(), v.to_owned()))
}

fn profiles_path() -> PathBuf {
    std::env::var_os("RUNNEL_CONFIG_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/runnel")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("profiles.toml")
}

fn client(cli: &Cli) -> Result<Client, CtlError> {
    let (mut url, mut key) = (cli.url.clone(), cli.key.clone());
    let mut pin = cli.ca_fingerprint.clone();
    if url.is_none() || key.is_none() || cli.profile.is_some() {
        let name = cli.profile.clone().unwrap_or_else(|| "default".into());
        let path = profiles_path();
        if let Ok(text) = std::fs::read_to_string(&path) {
            let all: BTreeMap<String, BTreeMap<String, String>> = toml::from_str(&text)
                .map_err(|e| CtlError::Config(format!("{}: {e}", path.display())))?;
            if let Some(p) = all.get(&name) {
                url = url.or_else(|| p.get("url").cloned());
                key = key.or_else(|| p.get("key").cloned());
                pin = pin.or_else(|| p.get("ca_fingerprint").cloned());
            } else if cli.profile.is_some() {
                return Err(CtlError::Config(format!("no profile {name:?} in {}", path.display())));
            }
        } else if cli.profile.is_some() {
            return Err(CtlError::Config(format!("cannot read {}", path.display())));
        }
    }
    let url =
        url.ok_or_else(|| CtlError::Config("set RUNNEL_URL (or --url, or a profile)".into()))?;
    let key =
        key.ok_or_else(|| CtlError::Config("set RUNNEL_KEY (or --key, or a profile)".into()))?;
    match (url.starts_with("https://"), pin) {
        (true, Some(pin)) => Client::pinned(&url, &key, &pin),
        (true, None) => Err(CtlError::Config(
            "an https:// URL needs the cluster CA's fingerprint: --ca-fingerprint \
             sha256:<hex> (or RUNNEL_CA_FINGERPRINT), as the broker prints at start"
                .into(),
        )),
        (false, _) => Ok(Client::new(&url, &key)),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn labels(v: &Value) -> String {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(","))
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "-".into())
}

fn runner_rows(list: &[Value]) -> String {
    let now = now_unix();
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                s(&r["id"]),
                s(&r["owner"]),
                s(&r["name"]),
                s(&r["status"]),
                ago(r["last_seen"].as_i64(), now),
                labels(&r["labels"]),
                format!("{}/{:.2}", s(&r["in_flight"]), r["load"].as_f64().unwrap_or(0.0)),
            ]
        })
        .collect();
    render(&["ID", "OWNER", "NAME", "STATUS", "LAST SEEN", "LABELS", "JOBS/LOAD"], &rows)
}

fn job_rows(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|j| {
            vec![
                s(&j["id"]),
                s(&j["owner"]),
                s(&j["state"]),
                s(&j["runner_id"]),
                s(&j["exit_code"]),
                s(&j["message"]),
            ]
        })
        .collect();
    render(&["ID", "OWNER", "STATE", "RUNNER", "EXIT", "MESSAGE"], &rows)
}

/// Most jobs in one `POST /v1/jobs/batch` (the broker's limit).
const BATCH: usize = 32;

/// `jobs run --each-runner`: `job` (an exec job with `wait`) on every online runner of
/// `owner` (all the key may see without one) whose labels include `labels`, each named by
/// its `runner_id`, through `POST /v1/jobs/batch`. Prints each runner's output under a
/// header, or with `-o json` the jobs; exits with the highest of their exit statuses.
async fn run_on_each(
    c: &Client,
    json_out: bool,
    owner: Option<&str>,
    labels: &BTreeMap<String, String>,
    job: Value,
) -> Result<ExitCode, CtlError> {
    let list = c.get(&runners_path(owner)).await?;
    let runners: Vec<&Value> = list["runners"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["status"] == "online")
                .filter(|r| labels.iter().all(|(k, v)| r["labels"][k] == v.as_str()))
                .collect()
        })
        .unwrap_or_default();
    if runners.is_empty() {
        let whose = owner.map(|o| format!(" of {o}")).unwrap_or_default();
        eprintln!("runnelctl: no online runner{whose} matches");
        return Ok(ExitCode::from(1));
    }
    let mut ended = Vec::new();
    for chunk in runners.chunks(BATCH) {
        let jobs: Vec<Value> = chunk
            .iter()
            .map(|r| {
                let mut j = job.clone();
                j["owner"] = r["owner"].clone();
                j["runner_id"] = r["id"].clone();
                j
            })
            .collect();
        let answer = c.post("/v1/jobs/batch", json!({ "jobs": jobs })).await?;
        for (r, j) in chunk.iter().zip(answer["jobs"].as_array().into_iter().flatten()) {
            ended.push((r, finished(c, j.clone()).await?));
        }
    }
    let worst = ended.iter().map(|(_, j)| job_exit(j)).max().unwrap_or(0);
    if json_out {
        let jobs: Vec<&Value> = ended.iter().map(|(_, j)| j).collect();
        println!("{}", json!({ "jobs": jobs }));
    } else {
        for (r, j) in &ended {
            let how = match (&j["error"], j["exit_code"].as_i64()) {
                (e, _) if e.is_object() => format!("not run: {}", s(&e["message"])),
                (_, Some(code)) => format!("{}, exit {code}", s(&j["state"])),
                _ => format!("{}: {}", s(&j["state"]), s(&j["message"])),
            };
            println!("== {} ({}): {how}", s(&r["name"]), s(&r["id"]));
            // Each output on lines of its own: the next header never follows an unended line.
            if let Some(out) = j["output"].as_str().filter(|o| !o.is_empty()) {
                let end = if out.ends_with('\n') { "" } else { "\n" };
                print!("{out}{end}");
            }
        }
    }
    Ok(ExitCode::from(worst))
}

/// A batch's answer for one job, once the job ended (a batch waits at most the broker's
/// limit; what is still running is then asked for until it ends), with its whole output
/// (a batch leaves out outputs over 64 KiB). A job the batch refused stays its error.
async fn finished(c: &Client, mut job: Value) -> Result<Value, CtlError> {
    if job["error"].is_object() {
        return Ok(job);
    }
    let id = s(&job["id"]);
    job = until_ended(c, &id, job).await?;
    if job["output_omitted"] == true {
        job = c.get(&format!("/v1/jobs/{id}")).await?;
    }
    Ok(job)
}

/// Job `id` (last seen as `job`) once it ended: asked for every 100 ms while it is queued
/// or running.
async fn until_ended(c: &Client, id: &str, mut job: Value) -> Result<Value, CtlError> {
    while matches!(job["state"].as_str(), Some("queued" | "running")) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        job = c.get(&format!("/v1/jobs/{id}")).await?;
    }
    Ok(job)
}

/// `GET /v1/runners`, of `owner` only when given.
fn runners_path(owner: Option<&str>) -> String {
    owner.map_or_else(|| "/v1/runners".to_owned(), |o| format!("/v1/runners?owner={o}"))
}

/// Exit status of `jobs run` when the job ended without an exit code of its own.
fn job_exit(job: &Value) -> u8 {
    if let Some(code) = job["exit_code"].as_i64() {
        return u8::try_from(code.clamp(0, 255)).unwrap_or(1);
    }
    match job["state"].as_str() {
        Some("succeeded") => 0,
        Some("timed_out") => 124,
        Some("cancelled") => 130,
        _ => 1,
    }
}

async fn run(cli: Cli) -> Result<ExitCode, CtlError> {
    let c = client(&cli)?;
    let json_out = cli.output == Output::Json;
    let print = |v: &Value, human: String| {
        if json_out {
            println!("{v}");
        } else {
            println!("{human}");
        }
    };
    match cli.command {
        Command::Tenants(Tenants::Create { id }) => {
            let v = c.post("/v1/tenants", json!({ "id": id })).await?;
            print(&v, format!("created tenant {}", s(&v["id"])));
        }
        Command::Tenants(Tenants::List) => {
            let v = c.get("/v1/tenants").await?;
            let rows: Vec<Vec<String>> = v["tenants"]
                .as_array()
                .map(|a| a.iter().map(|t| vec![s(&t["id"]), s(&t["created_at"])]).collect())
                .unwrap_or_default();
            print(&v, render(&["ID", "CREATED"], &rows));
        }
        Command::Keys(Keys::Create { tenant, role, owner, expires_in_secs }) => {
            let v = c
                .post(
                    &format!("/v1/tenants/{tenant}/keys"),
                    json!({ "role": role, "owner": owner, "expires_in_secs": expires_in_secs }),
                )
                .await?;
            print(&v, format!("{}\n(shown once: store it now)", s(&v["key"])));
        }
        Command::Keys(Keys::List { tenant, operator: _ }) => {
            let path = match &tenant {
                Some(t) => format!("/v1/tenants/{t}/keys"),
                None => "/v1/operator-keys".to_owned(),
            };
            let v = c.get(&path).await?;
            let rows: Vec<Vec<String>> = v["keys"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|k| {
                            let state = if k["revoked_at"].is_i64() { "revoked" } else { "live" };
                            vec![s(&k["id"]), s(&k["role"]), s(&k["owner"]), state.to_owned()]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print(&v, render(&["ID", "ROLE", "OWNER", "STATE"], &rows));
        }
        Command::Keys(Keys::Revoke { id, tenant, operator: _ }) => {
            let path = match &tenant {
                Some(t) => format!("/v1/tenants/{t}/keys/{id}"),
                None => format!("/v1/operator-keys/{id}"),
            };
            let v = c.delete(&path).await?;
            print(&v, format!("key {id} revoked"));
        }
        Command::Keys(Keys::CreateMetrics { expires_in_secs }) => {
            let body = json!({ "role": "metrics", "expires_in_secs": expires_in_secs });
            let v = c.post("/v1/operator-keys", body).await?;
            print(
                &v,
                format!(
                    "{}\n(metrics key {}, shown once: put it in Prometheus's credentials_file)",
                    s(&v["key"]),
                    s(&v["id"])
                ),
            );
        }
        Command::Keys(Keys::RotateOperator) => {
            let v = c.post("/v1/operator-keys", json!({})).await?;
            print(
                &v,
                format!(
                    "{}\n(new operator key, shown once; switch to it, then revoke the old one with \
                     `runnelctl keys revoke --operator <id>`)",
                    s(&v["key"])
                ),
            );
        }
        Command::Runners(Runners::Create { owner, name, labels, token_ttl }) => {
            let labels: BTreeMap<_, _> = labels.into_iter().collect();
            let v = c
                .post("/v1/runners", json!({ "owner": owner, "name": name, "labels": labels, "token_ttl_secs": token_ttl }))
                .await?;
            print(
                &v,
                format!(
                    "runner {} created; token expires {} (shown once)\n\non the runner machine:\n  {}",
                    s(&v["runner_id"]),
                    s(&v["expires_at"]),
                    s(&v["enroll_command"])
                ),
            );
        }
        Command::Runners(Runners::List { owner }) => {
            let v = c.get(&runners_path(owner.as_deref())).await?;
            print(&v, runner_rows(v["runners"].as_array().map(Vec::as_slice).unwrap_or_default()));
        }
        Command::Runners(Runners::Get { id }) => {
            let v = c.get(&format!("/v1/runners/{id}")).await?;
            print(&v, runner_rows(std::slice::from_ref(&v)));
        }
        Command::Runners(Runners::Revoke { id }) => {
            let v = c.delete(&format!("/v1/runners/{id}")).await?;
            print(
                &v,
                format!("revoked {id}; closed {} live connection(s)", s(&v["connections_closed"])),
            );
        }
        Command::Jobs(Jobs::Run {
            owner,
            runner,
            each_runner,
            labels,
            timeout_ms,
            env,
            cwd,
            command,
        }) => {
            let (program, args) =
                command.split_first().ok_or_else(|| CtlError::Config("no program given".into()))?;
            let env: BTreeMap<_, _> = env.into_iter().collect();
            let labels: BTreeMap<_, _> = labels.into_iter().collect();
            let exec = json!({ "program": program, "args": args, "env": env, "cwd": cwd });
            if each_runner {
                let job = json!({ "labels": labels, "kind": "exec", "exec": exec,
                                  "timeout_ms": timeout_ms, "wait": true });
                return run_on_each(&c, json_out, owner.as_deref(), &labels, job).await;
            }
            let job = c
                .post(
                    "/v1/jobs",
                    json!({ "owner": owner, "runner_id": runner, "labels": labels, "kind": "exec",
                            "exec": exec, "timeout_ms": timeout_ms }),
                )
                .await?;
            let id = s(&job["id"]);
            if !json_out {
                c.stream_output(&id, &mut tokio::io::stdout()).await?;
            }
            let done = until_ended(&c, &id, c.get(&format!("/v1/jobs/{id}")).await?).await?;
            if json_out {
                println!("{done}");
            } else if done["state"] != "succeeded" {
                eprintln!("runnelctl: job {id} {}: {}", s(&done["state"]), s(&done["message"]));
            }
            return Ok(ExitCode::from(job_exit(&done)));
        }
        Command::Jobs(Jobs::Get { id }) => {
            let v = c.get(&format!("/v1/jobs/{id}")).await?;
            print(
                &v,
                format!(
                    "{}\n--- output ---\n{}",
                    job_rows(std::slice::from_ref(&v)),
                    s(&v["output"])
                ),
            );
        }
        Command::Jobs(Jobs::List { owner, limit }) => {
            let q = owner.map(|o| format!("&owner={o}")).unwrap_or_default();
            let v = c.get(&format!("/v1/jobs?limit={limit}{q}")).await?;
            print(&v, job_rows(v["jobs"].as_array().map(Vec::as_slice).unwrap_or_default()));
        }
        Command::Jobs(Jobs::Cancel { id }) => {
            let v = c.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await?;
            print(&v, format!("cancel requested; job {id} is {}", s(&v["state"])));
        }
        Command::Jobs(Jobs::Output { id }) => {
            c.stream_output(&id, &mut tokio::io::stdout()).await?;
        }
        Command::Status => {
            let health = c.get("/healthz").await?;
            let ready = c.get("/readyz").await?;
            let v = json!({ "health": health, "ready": ready });
            print(&v, format!("healthy: {}\nready: {}", s(&health["status"]), s(&ready["status"])));
        }
        Command::Cluster(Cluster::Status) => {
            let v = c.get("/v1/cluster").await?;
            let this = s(&v["this_node"]);
            let rows: Vec<Vec<String>> = v["nodes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|n| {
                            let id = s(&n["id"]);
                            let me = if id == this { "*" } else { "" };
                            vec![
                                format!("{id}{me}"),
                                s(&n["quic"]),
                                s(&n["http"]),
                                s(&n["lease_ttl_left_s"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            let head = format!(
                "cluster {} ({}), {} node(s); * = this node",
                s(&v["cluster"]),
                s(&v["mode"]),
                rows.len()
            );
            let homes: Vec<Vec<String>> = v["tenants"]
                .as_array()
                .map(|a| {
                    a.iter().map(|t| vec![s(&t["tenant"]), s(&t["node"]), s(&t["epoch"])]).collect()
                })
                .unwrap_or_default();
            let nodes = render(&["NODE", "QUIC", "HTTP", "LEASE LEFT S"], &rows);
            let homes = render(&["TENANT", "HOME", "EPOCH"], &homes);
            print(&v, format!("{head}\n{nodes}\n\n{homes}"));
        }
        Command::Cluster(Cluster::Rebalance) => {
            let v = c.post("/v1/cluster/rebalance", json!({})).await?;
            let rows: Vec<Vec<String>> = v["moved"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|m| {
                            let cell = |k: &str| s(&m[k]);
                            vec![
                                cell("tenant"),
                                cell("from"),
                                cell("to"),
                                cell("runners_sent_away"),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print(&v, render(&["TENANT", "FROM", "TO", "RUNNERS SENT AWAY"], &rows));
        }
        Command::Audit { limit } => {
            let v = c.get(&format!("/v1/audit?limit={limit}")).await?;
            let rows: Vec<Vec<String>> = v["events"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            vec![
                                s(&e["at"]),
                                s(&e["event"]),
                                s(&e["actor"]),
                                s(&e["runner_id"]),
                                s(&e["detail"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print(&v, render(&["AT", "EVENT", "ACTOR", "RUNNER", "DETAIL"], &rows));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses flags and runs one command.
pub(super) fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runnelctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("runnelctl: {e}");
            ExitCode::FAILURE
        }
    }
}
