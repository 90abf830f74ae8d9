//! `reconnect`: N real runners (`runnel_tests::fleet`: the runner library itself, each with
//! its own QUIC endpoint and full-jitter backoff) on one broker, which is restarted twice:
//! killed (SIGKILL, started again at once: the runners notice at their idle timeout and
//! back off), then drained (SIGTERM: GoAway, each runner with its own delay in the window,
//! started again at once). For each: when 50%, 99% and all runners were back, the peak
//! handshakes in a 100 ms window, and the new broker's CPU during the storm.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use runnel_ctl::Client;
use runnel_tests::fleet::{Storm, enroll_fleet, run_fleet, since, until_back};
use serde_json::json;

use crate::broker_proc::BrokerProc;

/// Longest wait for a fleet to be back after one restart.
const BACK_LIMIT: Duration = Duration::from_secs(180);

pub(crate) async fn run(
    bin: Option<&std::path::Path>,
    runners: usize,
    idle_timeout: &str,
    goaway_window: &str,
) -> anyhow::Result<()> {
    let extra: Vec<String> = [
        ("--idle-timeout", idle_timeout),
        ("--heartbeat-interval", "2s"),
        ("--goaway-window", goaway_window),
        ("--drain-timeout", "30s"),
    ]
    .into_iter()
    .flat_map(|(f, v)| [f.to_owned(), v.to_owned()])
    .collect();
    let mut b = BrokerProc::start_with(bin, "127.0.0.1:0", &extra, None).await?;
    let operator = Client::new(&b.http, &b.operator_key);
    operator.post("/v1/tenants", json!({ "id": "storm" })).await?;
    let admin = operator.post("/v1/tenants/storm/keys", json!({ "role": "admin" })).await?["key"]
        .as_str()
        .context("admin key")?
        .to_owned();
    let dir = tempfile::tempdir()?;
    let t0 = Instant::now();
    let admin = operator.with_key(&admin);
    let states = enroll_fleet(&admin, &b.quic, &b.fingerprint, runners, dir.path(), 64).await?;
    eprintln!("enrolled {runners} runners in {:.1}s", t0.elapsed().as_secs_f64());
    let (_handles, mut events) = run_fleet(states)?;
    until_back(&mut events, runners, 1, BACK_LIMIT).await?;

    for (session, mode) in [(2, "kill"), (3, "goaway")] {
        let t = SystemTime::now();
        b.restart(mode == "kill").await?;
        let up = SystemTime::now().duration_since(t).unwrap_or_default();
        let before = b.usage()?;
        let back = until_back(&mut events, runners, session, BACK_LIMIT).await?;
        let after = b.usage()?;
        let storm = Storm::of(since(t, back.iter().map(|c| c.at)));
        let dials = Storm::of(since(t, back.iter().map(|c| c.due)));
        let cpu = after.cpu_secs - before.cpu_secs;
        let storm_secs = storm.all.saturating_sub(up).as_secs_f64().max(0.001);
        println!(
            "== runnel reconnect ({mode}): {runners} runners, broker down+up in {} ms",
            up.as_millis()
        );
        println!(
            "  back           50% {} ms   99% {} ms   all {} ms",
            storm.p50.as_millis(),
            storm.p99.as_millis(),
            storm.all.as_millis()
        );
        println!(
            "  peak           {} handshakes in 100 ms ({:.1}% of the fleet)",
            storm.peak_100ms,
            storm.peak_fraction() * 100.0
        );
        println!(
            "  dials due      peak {} in 100 ms ({:.1}%): when the runners' backoff let them dial",
            dials.peak_100ms,
            dials.peak_fraction() * 100.0
        );
        println!(
            "  broker cpu     {cpu:.2}s during the storm ({:.0}% of one core)",
            100.0 * cpu / storm_secs
        );
        let mut line = storm.json();
        line["bench"] = json!("reconnect");
        line["mode"] = json!(mode);
        line["restart_ms"] = json!(up.as_millis() as u64);
        line["dials_due_peak_fraction"] = json!(dials.peak_fraction());
        line["broker_cpu_secs"] = json!((cpu * 100.0).round() / 100.0);
        line["broker_rss_kib"] = json!(after.rss_kib);
        println!("{line}");
    }
    b.stop().await;
    Ok(())
}
