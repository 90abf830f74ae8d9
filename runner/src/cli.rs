//! The `runnel-runner` command line: `enroll` once, then `run`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{Runner, RunnerError, StateDir, enroll};

/// Exit status for bad flags (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit status when the broker refuses this runner for good (revoked): re-enroll.
const EXIT_REFUSED: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "runnel-runner",
    version,
    about = "runnel runner: dials out to a broker and runs jobs"
)]
struct Cli {
    /// Log format: pretty or json (RUST_LOG sets the level).
    #[arg(long, global = true, env = "RUNNEL_LOG_FORMAT", default_value = "pretty")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pair this machine with a broker using a one-time token.
    Enroll {
        /// Broker host:port.
        #[arg(long, env = "RUNNEL_BROKER")]
        broker: String,
        /// sha256:<hex> of the cluster CA (from the enroll command).
        #[arg(long, env = "RUNNEL_CA_FINGERPRINT")]
        ca_fingerprint: String,
        /// The one-time enrollment token.
        #[arg(long, env = "RUNNEL_TOKEN", hide_env_values = true)]
        token: String,
        /// Where to keep the key and certificate (default: /var/lib/runnel-runner as root,
        /// else $XDG_STATE_HOME/runnel-runner; never inside a job's working directory).
        #[arg(long, env = "RUNNEL_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Connect and serve jobs until SIGTERM/SIGINT (which drain: running jobs finish).
    Run {
        /// The enrolled state dir (default as for `enroll`).
        #[arg(long, env = "RUNNEL_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Jobs run at once (default: number of CPUs).
        #[arg(long, env = "RUNNEL_CAPACITY")]
        capacity: Option<u32>,
        /// Label key=value advertised to the broker (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Override the broker host:port saved at enrollment.
        #[arg(long, env = "RUNNEL_BROKER")]
        broker: Option<String>,
        /// Give `exec` jobs the runner's whole environment (default: a minimal one plus
        /// the job's own `env`).
        #[arg(long, env = "RUNNEL_EXEC_INHERIT_ENV")]
        exec_inherit_env: bool,
        /// Only this program may be run by `exec` jobs (repeatable; exact match of the
        /// job's `program`). Without it any program may run.
        #[arg(long = "exec-allow", value_name = "PROGRAM", conflicts_with = "no_exec")]
        exec_allow: Vec<String>,
        /// Serve no `exec` jobs at all (the runner stays connected; such jobs are refused).
        #[arg(long, env = "RUNNEL_NO_EXEC")]
        no_exec: bool,
        /// QUIC keep-alive from the runner's side (default 6s): a PING after this long
        /// without a packet from the broker, which keeps the NAT mapping in front of the
        /// runner alive, so it must be shorter than that NAT's UDP timeout (often 30 s,
        /// sometimes less). Heartbeats (every 5 s by default) refresh the mapping too, so
        /// with the defaults the PING is never needed. 100ms to 10m.
        #[arg(long, env = "RUNNEL_KEEP_ALIVE", value_parser = parse_keep_alive)]
        keep_alive: Option<std::time::Duration>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("label {s:?} must be key=value"))?;
    if k.is_empty() {
        return Err(format!("label {s:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn parse_keep_alive(s: &str) -> Result<std::time::Duration, String> {
    let d = runnel_protocol::duration::parse_duration(s)?;
    let range = std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(600);
    if range.contains(&d) {
        Ok(d)
    } else {
        Err(format!("keep-alive {s:?} out of range (100ms to 10m)"))
    }
}

fn init_tracing(format: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        "pretty" => b.try_init().map_err(|e| e.to_string()),
        "json" => b.json().try_init().map_err(|e| e.to_string()),
        other => Err(format!("unknown log format {other:?} (use pretty or json)")),
    }
}

async fn drain_on_signal(handle: &crate::RunnerHandle) {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("signal received: draining");
    handle.drain();
}

/// Prints a line on stdout; a closed stdout (`… | head -1`) is not an error worth a panic.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

fn state_dir(flag: Option<PathBuf>) -> Result<PathBuf, RunnerError> {
    flag.map_or_else(StateDir::default_path, Ok)
}

/// Runs the command line; returns the exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_tracing(&cli.log_format) {
        eprintln!("runnel-runner: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runnel-runner: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match cli.command {
            Command::Enroll { broker, ca_fingerprint, token, state_dir: dir } => {
                let state_dir = match state_dir(dir) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("runnel-runner: {e}");
                        return ExitCode::from(EXIT_USAGE);
                    }
                };
                match enroll(&broker, &ca_fingerprint, &token, &StateDir::new(&state_dir)).await {
                    Ok(e) => {
                        say(&format!("enrolled runner {} (tenant {}, owner {})", e.runner_id, e.tenant, e.owner));
                        say(&format!("start it with: runnel-runner run --state-dir {}", state_dir.display()));
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("runnel-runner: enrollment failed: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Run { state_dir: dir, capacity, labels, broker, exec_inherit_env, exec_allow, no_exec, keep_alive } => {
                let state_dir = match state_dir(dir) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("runnel-runner: {e}");
                        return ExitCode::from(EXIT_USAGE);
                    }
                };
                let exec = crate::Exec {
                    inherit_env: exec_inherit_env,
                    allow: (!exec_allow.is_empty()).then_some(exec_allow),
                    ..crate::Exec::default()
                };
                let mut b = Runner::builder(StateDir::new(&state_dir))
                    .handler("exec", exec)
                    .labels(labels.into_iter().collect::<BTreeMap<_, _>>());
                if no_exec {
                    b = b.without_handler("exec");
                }
                if let Some(c) = capacity {
                    b = b.capacity(c);
                }
                if let Some(addr) = broker {
                    b = b.broker(addr);
                }
                if let Some(k) = keep_alive {
                    b = b.keep_alive(k);
                }
                let handle = match b.spawn() {
                    Ok(h) => h,
                    Err(e) => {
                        eprintln!("runnel-runner: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let watch = handle.watch();
                tokio::select! {
                    _ = drain_on_signal(&handle) => {}
                    _ = async { let mut w = watch; let _ = w.wait_for(|s| matches!(s, crate::RunnerStatus::Stopped { .. })).await; } => {}
                }
                match handle.join().await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(RunnerError::Refused(why)) => {
                        eprintln!("runnel-runner: {why}; enroll again with a new token");
                        ExitCode::from(EXIT_REFUSED)
                    }
                    Err(e) => {
                        eprintln!("runnel-runner: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_keep_alive;

    #[test]
    fn keep_alive_parses_like_the_brokers_durations_and_refuses_the_useless_ones() {
        assert_eq!(parse_keep_alive("4s"), Ok(Duration::from_secs(4)));
        assert_eq!(parse_keep_alive("250ms"), Ok(Duration::from_millis(250)));
        // 0 would spin, an hour is longer than any NAT keeps a UDP mapping.
        for bad in ["0", "50ms", "1h", "soon", ""] {
            assert!(parse_keep_alive(bad).is_err(), "{bad:?} accepted");
        }
    }
}
