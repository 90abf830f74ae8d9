//! A real `runnel-broker` child process on loopback.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::proc_usage::{Usage, usage};

pub(crate) struct BrokerProc {
    child: Child,
    dir: tempfile::TempDir,
    bin: PathBuf,
    args: Vec<String>,
    pub(crate) http: String,
    pub(crate) quic: String,
    pub(crate) operator_key: String,
    pub(crate) fingerprint: String,
}

fn default_bin() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me.parent().context("no parent dir")?;
    let bin = dir.join("runnel-broker");
    if !bin.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p runnel-broker-cli) or pass --broker-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// What a started broker's banner said.
struct Banner {
    http: String,
    quic: String,
    fingerprint: String,
    operator_key: Option<String>,
}

impl BrokerProc {
    pub(crate) async fn start(bin: Option<&Path>) -> anyhow::Result<Self> {
        Self::start_with(bin, "127.0.0.1:0", &[], None).await
    }

    /// A broker on `quic_listen` with `extra` flags (where they name one of the bench's
    /// defaults below, they replace it). `operator_key`: the key of a cluster whose first
    /// node already minted it (later nodes print no key file).
    pub(crate) async fn start_with(
        bin: Option<&Path>,
        quic_listen: &str,
        extra: &[String],
        operator_key: Option<&str>,
    ) -> anyhow::Result<Self> {
        let bin = match bin {
            Some(b) => b.to_owned(),
            None => default_bin()?,
        };
        let dir = tempfile::tempdir()?;
        // The bench's defaults, except those `extra` sets itself.
        let defaults = [
            ("--queue-limit", "100000"),
            ("--idle-timeout", "60s"),
            ("--heartbeat-interval", "20s"),
            // The harness is one source and a few keys at thousands of requests a second:
            // it measures the dispatch path, not the rate limiter (BENCHMARKS.md).
            ("--rate-limit-per-source", "0"),
            ("--rate-limit-per-key", "0"),
            // Its HTTP dispatchers (`-c`, one connection each) may outnumber one source's
            // default share of connections; the broker's overall cap stays.
            ("--http-max-connections-per-source", "4096"),
            // Fleets of thousands enroll and connect from this one address (`flood` sets
            // these back to the production defaults).
            ("--enroll-rate-per-source", "0"),
            ("--quic-rate-per-source", "0"),
            ("--max-enrollments", "1024"),
        ]
        .into_iter()
        .filter(|(flag, _)| !extra.iter().any(|e| e == flag))
        .flat_map(|(flag, value)| [flag.to_owned(), value.to_owned()]);
        let args: Vec<String> = defaults.chain(extra.iter().cloned()).collect();
        let expect_key = operator_key.is_none();
        let (child, banner) = Self::spawn(&bin, quic_listen, &args, dir.path(), expect_key).await?;
        let operator_key = banner.operator_key.or_else(|| operator_key.map(str::to_owned));
        Ok(Self {
            child,
            dir,
            bin,
            args,
            http: banner.http,
            quic: banner.quic,
            operator_key: operator_key.context("no operator key file in banner")?,
            fingerprint: banner.fingerprint,
        })
    }

    async fn spawn(
        bin: &Path,
        quic_listen: &str,
        args: &[String],
        dir: &Path,
        expect_key: bool,
    ) -> anyhow::Result<(Child, Banner)> {
        let mut child = Command::new(bin)
            .args(["serve", "--quic-listen", quic_listen, "--http-listen", "127.0.0.1:0"])
            .args(args)
            .arg("--data-dir")
            .arg(dir.join("data"))
            // Warnings only, unless RUNNEL_BENCH_BROKER_LOG asks for more (a RUST_LOG filter).
            .env(
                "RUST_LOG",
                std::env::var("RUNNEL_BENCH_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut http, mut quic, mut fp, mut key) = (None, None, None, None);
        while let Some(line) = lines.next_line().await? {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("QUIC (runners):") {
                quic = rest.split_whitespace().next().map(str::to_owned);
            } else if let Some(rest) = t.strip_prefix("HTTP API:") {
                http = Some(rest.trim().to_owned());
            } else if let Some(rest) = t.strip_prefix("CA fingerprint:") {
                fp = Some(rest.trim().to_owned());
            } else if let Some(rest) = t.strip_prefix("Operator key file:") {
                key = Some(std::fs::read_to_string(rest.trim())?.trim().to_owned());
            }
            // The fingerprint line comes after the addresses; a cluster's first node then
            // names the operator key's file, a later node or a restart does not.
            if fp.is_some() && (key.is_some() || !expect_key) {
                break;
            }
        }
        // Keep draining stdout so the broker never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let banner = Banner {
            http: http.context("no HTTP address in banner")?,
            quic: quic.context("no QUIC address in banner")?,
            fingerprint: fp.context("no fingerprint in banner")?,
            operator_key: key,
        };
        Ok((child, banner))
    }

    /// Stops the broker (`kill`: SIGKILL, as a crash; else SIGTERM, which drains) and
    /// starts it again at once on the same QUIC address and data dir. Answers when the new
    /// process is serving.
    pub(crate) async fn restart(&mut self, kill: bool) -> anyhow::Result<()> {
        if kill {
            let _ = self.child.kill().await;
        } else {
            self.terminate().await;
        }
        let (child, banner) =
            Self::spawn(&self.bin, &self.quic, &self.args, self.dir.path(), false).await?;
        self.child = child;
        self.http = banner.http;
        Ok(())
    }

    async fn terminate(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(70), self.child.wait()).await;
        let _ = self.child.kill().await;
    }

    pub(crate) fn usage(&self) -> anyhow::Result<Usage> {
        usage(self.child.id().context("broker exited")?)
    }

    /// SIGKILL, as a crashed machine: no drain, no lease release.
    pub(crate) async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    pub(crate) async fn stop(mut self) {
        self.terminate().await;
    }
}
