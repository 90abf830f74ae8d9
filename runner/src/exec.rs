//! The built-in `exec` kind: runs a program in its own process group, streams stdout and
//! stderr, caps output, and kills the whole group on cancel or timeout.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use runnel_protocol::{ExecSpec, JobOutcome, JobResult, OutputStream, limits::MAX_OUTPUT_CHUNK};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::handler::{self, Job, JobHandler};

/// Default cap on the output one job may send.
pub(crate) const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;
/// Time between SIGTERM and SIGKILL on cancel.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// `PATH` of a job when the runner has none.
const FALLBACK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The `exec` handler.
///
/// A job gets a minimal environment (`PATH`, `HOME` and `TMPDIR` pointing at its own temp
/// dir, `LANG`) plus the job's `env`, never the runner's own variables (tokens, cloud
/// credentials) unless `inherit_env`. It runs in a fresh temp dir, removed afterwards,
/// unless the job names a `cwd`: never in the runner's working directory, where its key
/// may be.
#[derive(Debug, Clone)]
pub struct Exec {
    /// Output cap in bytes (stdout and stderr together); the rest is dropped and the
    /// result marked truncated.
    pub max_output: usize,
    /// Pass the runner's whole environment to jobs (`--exec-inherit-env`).
    pub inherit_env: bool,
    /// When set, only these programs may run (`--exec-allow`, compared with the job's
    /// `program` exactly); others are rejected without running.
    pub allow: Option<Vec<String>>,
}

impl Default for Exec {
    fn default() -> Self {
        Self { max_output: DEFAULT_MAX_OUTPUT, inherit_env: false, allow: None }
    }
}

fn signal_group(pid: Option<u32>, sig: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // The group may be gone already; that is fine.
        let _ = killpg(Pid::from_raw(pid), sig);
    }
}

async fn pump<R: AsyncRead + Unpin>(
    mut from: R,
    stream: OutputStream,
    job: &Job,
    budget: &AtomicUsize,
    truncated: &AtomicBool,
) {
    let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Take what the budget allows; keep reading (and dropping) so the child never
        // blocks on a full pipe.
        let allowed = budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| Some(left.saturating_sub(n)))
            .unwrap_or(0)
            .min(n);
        if allowed < n {
            truncated.store(true, Ordering::Relaxed);
        }
        if allowed > 0 && !job.output(stream, &buf[..allowed]).await {
            return;
        }
    }
}

#[async_trait::async_trait]
impl JobHandler for Exec {
    async fn run(&self, job: Job) -> JobResult {
        let spec: ExecSpec = match postcard::from_bytes(&job.payload) {
            Ok(s) => s,
            Err(e) => return handler::rejected(format!("bad exec payload: {e}")),
        };
        if self.allow.as_ref().is_some_and(|allow| !allow.contains(&spec.program)) {
            return handler::rejected(format!("program {:?} is not allowed here", spec.program));
        }
        // The job's own directory (unless it named one), removed when the job ends.
        let scratch = match tempfile::Builder::new().prefix("runnel-job-").tempdir() {
            Ok(d) => d,
            Err(e) => return handler::failed(format!("could not create the job's directory: {e}")),
        };
        let mut cmd = tokio::process::Command::new(&spec.program);
        if !self.inherit_env {
            let path = std::env::var_os("PATH").unwrap_or_else(|| FALLBACK_PATH.into());
            cmd.env_clear()
                .env("PATH", path)
                .env("HOME", scratch.path())
                .env("TMPDIR", scratch.path())
                .env("LANG", "C.UTF-8");
        }
        cmd.current_dir(scratch.path());
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return handler::failed(format!("could not start {:?}: {e}", spec.program)),
        };
        let pid = child.id();
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            signal_group(pid, Signal::SIGKILL);
            return handler::failed("could not capture output");
        };
        let budget = AtomicUsize::new(self.max_output);
        let truncated = AtomicBool::new(false);
        let run = async {
            let status = child.wait().await;
            // The main process is done: stragglers it left in its group go too, so their
            // open pipes cannot keep the job alive.
            signal_group(pid, Signal::SIGKILL);
            status
        };
        let pumps = async {
            tokio::join!(
                pump(out, OutputStream::Stdout, &job, &budget, &truncated),
                pump(err, OutputStream::Stderr, &job, &budget, &truncated)
            )
        };
        let both = async { tokio::join!(run, pumps).0 };
        tokio::pin!(both);
        let mut was_cancelled = false;
        let status = tokio::select! {
            s = &mut both => s,
            _ = job.cancelled() => {
                was_cancelled = true;
                signal_group(pid, Signal::SIGTERM);
                match tokio::time::timeout(KILL_GRACE, &mut both).await {
                    Ok(s) => s,
                    Err(_) => {
                        signal_group(pid, Signal::SIGKILL);
                        both.await
                    }
                }
            }
        };
        let mut result = match status {
            Err(e) => handler::failed(format!("waiting for the process: {e}")),
            Ok(_) if was_cancelled => handler::cancelled("process group killed"),
            Ok(s) => match s.code() {
                Some(0) => JobResult { exit_code: Some(0), ..handler::succeeded() },
                Some(c) => {
                    JobResult { exit_code: Some(c), ..handler::failed(format!("exit status {c}")) }
                }
                None => {
                    use std::os::unix::process::ExitStatusExt;
                    handler::failed(format!("killed by signal {}", s.signal().unwrap_or(0)))
                }
            },
        };
        result.output_truncated = truncated.load(Ordering::Relaxed);
        if result.outcome == JobOutcome::Succeeded && result.output_truncated {
            result.message = format!("output cut at {} bytes", self.max_output);
        }
        result
    }
}
