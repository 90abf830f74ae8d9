//! N real runners in one process (`runnel_tests::fleet`), for the NAT lab's reconnect-storm
//! tests: it enrolls them through the broker's API and QUIC port, starts them, and prints
//! one JSON line per event on stdout, until it is killed:
//! `{"enrolled":N}`, then `{"runner":I,"session":S,"at_ms":UNIX_MS,"due_ms":UNIX_MS,"waited_ms":MS}`
//! at each Welcome (`due_ms`: when the runner's dial for it was due, after waiting
//! `waited_ms`).
//!
//! Configured by environment: FLEET_API (http URL), FLEET_KEY (a tenant admin key),
//! FLEET_BROKER (host:port), FLEET_FINGERPRINT, FLEET_RUNNERS, FLEET_DIR.

use std::io::Write;
use std::process::ExitCode;
use std::time::UNIX_EPOCH;

fn var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

async fn run() -> Result<(), String> {
    let api = runnel_ctl::Client::new(&var("FLEET_API")?, &var("FLEET_KEY")?);
    let broker = var("FLEET_BROKER")?;
    let n: usize = var("FLEET_RUNNERS")?.parse().map_err(|e| format!("FLEET_RUNNERS: {e}"))?;
    let dir = std::path::PathBuf::from(var("FLEET_DIR")?);
    let fp = var("FLEET_FINGERPRINT")?;
    let states = runnel_tests::fleet::enroll_fleet(&api, &broker, &fp, n, &dir, 16)
        .await
        .map_err(|e| format!("enrollment: {e:#}"))?;
    let say = |line: serde_json::Value| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    };
    say(serde_json::json!({ "enrolled": states.len() }));
    let (_handles, mut events) =
        runnel_tests::fleet::run_fleet(states).map_err(|e| format!("start: {e:#}"))?;
    while let Some(c) = futures::StreamExt::next(&mut events).await {
        let ms = |t: std::time::SystemTime| {
            t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
        };
        let line = serde_json::json!({
            "runner": c.runner, "session": c.session, "at_ms": ms(c.at), "due_ms": ms(c.due),
            "waited_ms": c.waited.as_millis() as u64,
        });
        if !say(line) {
            break;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    runnel_tests::bin_main("fleet-under-test", run)
}
