//! The QUIC intake under a flood: the same closed-loop dispatch through R connected
//! runners, once quiet and once while `attackers` concurrent strangers open connections
//! (a handshake, then gone) and try enrollments with a token that does not exist, as fast
//! as they can. The broker runs with the production intake limits (Retry past 500
//! incoming/s, 200 connections/s and 20 enrollment attempts/s per source, 1024 intakes,
//! 64 enrollments).
//! Prints both rows, the flood's size, the broker's limit counters, and the p99 and
//! throughput ratios (flood / quiet).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use runnel_protocol::{EnrollRequest, EnrollResponse, read_frame, write_frame};
use serde_json::json;

use crate::broker_proc::BrokerProc;
use crate::report;
use crate::sim::Fleet;

/// What the flood did.
#[derive(Default)]
struct Counts {
    attempts: AtomicU64,
    handshakes: AtomicU64,
    enrollments_answered: AtomicU64,
}

/// One stranger: connect with the enrollment ALPN; every sixth attempt sends a bad
/// enrollment and reads the refusal, the others leave right after the handshake.
async fn attempt(
    ep: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    n: u64,
    c: &Counts,
) {
    c.attempts.fetch_add(1, Ordering::Relaxed);
    let Ok(connecting) = ep.connect_with(cfg, addr, "localhost") else { return };
    let Ok(conn) = connecting.await else { return };
    c.handshakes.fetch_add(1, Ordering::Relaxed);
    if n.is_multiple_of(6) {
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            let req = EnrollRequest {
                version: runnel_protocol::PROTOCOL_VERSION,
                token: "rt_0000000000000000_not-a-real-secret".into(),
                csr_pem: "not a csr".into(),
            };
            write_frame(&mut send, &req).await.ok()?;
            send.finish().ok()?;
            read_frame::<EnrollResponse, _>(&mut recv).await.ok().flatten()
        };
        if let Some(EnrollResponse::Refused { .. }) = exchange.await {
            c.enrollments_answered.fetch_add(1, Ordering::Relaxed);
        }
    }
    conn.close(0u32.into(), b"");
}

/// Starts `attackers` loops of [`attempt`]; they run until the set is aborted.
fn flood(
    b: &BrokerProc,
    attackers: usize,
) -> anyhow::Result<(tokio::task::JoinSet<()>, Arc<Counts>)> {
    let pin = runnel_certs::parse_fingerprint(&b.fingerprint)?;
    let cfg = runnel_runner::tls::enroll_config(pin)?;
    let addr: SocketAddr = b.quic.parse()?;
    let counts = Arc::new(Counts::default());
    let mut tasks = tokio::task::JoinSet::new();
    for a in 0..attackers {
        // A socket per attacker: many source ports, as a botnet behind one NAT looks.
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        let (cfg, counts) = (cfg.clone(), counts.clone());
        tasks.spawn(async move {
            let mut n = a as u64;
            loop {
                let one = attempt(&ep, cfg.clone(), addr, n, &counts);
                let _ = tokio::time::timeout(Duration::from_secs(10), one).await;
                n += attackers as u64;
            }
        });
    }
    Ok((tasks, counts))
}

/// The value of one series of the broker's `/metrics` (0 when absent).
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs the quiet phase, then the flood phase, and prints both and their ratio.
pub(crate) async fn run(
    common: &crate::Common,
    runners: usize,
    attackers: usize,
) -> anyhow::Result<()> {
    // The intake limits at their production defaults (the bench's own defaults turn the
    // enrollment rate off so that large fleets enroll fast).
    let extra: Vec<String> = [
        "--enroll-rate-per-source",
        "20",
        "--max-enrollments",
        "64",
        "--quic-rate-per-source",
        "200",
    ]
    .map(String::from)
    .into();
    let broker =
        BrokerProc::start_with(common.broker_bin.as_deref(), "127.0.0.1:0", &extra, None).await?;
    let fleet = Fleet::enroll(&broker, 1, runners, 16).await?;
    let connected = fleet.connect(common.endpoints, common.runner_capacity, 64).await?;
    let label = |phase: &str| {
        format!("runners={runners} c={} d={}s flood={phase}", common.concurrency, common.duration)
    };

    let before = broker.usage()?;
    let quiet = common.dispatch(&broker, &fleet).await;
    let after = broker.usage()?;
    let quiet_row = report::print("runnel", "flood", &label("off"), &quiet, &before, &after, None);

    let before = broker.usage()?;
    let t0 = Instant::now();
    let (mut attackers_set, counts) = flood(&broker, attackers)?;
    let loud = common.dispatch(&broker, &fleet).await;
    attackers_set.abort_all();
    while attackers_set.join_next().await.is_some() {}
    let flood_secs = t0.elapsed().as_secs_f64();
    let after = broker.usage()?;
    let label_on = label(&format!("{attackers} attackers"));
    let loud_row = report::print("runnel", "flood", &label_on, &loud, &before, &after, None);

    let lost = connected.conns.iter().filter(|l| l.conn.close_reason().is_some()).count();
    let metrics = runnel_ctl::Client::new(&broker.http, &broker.operator_key)
        .text("/metrics")
        .await
        .context("metrics")?;
    let limited = |which: &str| {
        series(&metrics, &format!("runnel_quic_intake_limited_total{{limit=\"{which}\"}}"))
    };
    let (attempts, handshakes, answered) = (
        counts.attempts.load(Ordering::Relaxed),
        counts.handshakes.load(Ordering::Relaxed),
        counts.enrollments_answered.load(Ordering::Relaxed),
    );
    let p99_ratio = loud_row.p99_ms / quiet_row.p99_ms.max(f64::MIN_POSITIVE);
    let tput_ratio = loud_row.jobs_per_sec / quiet_row.jobs_per_sec.max(f64::MIN_POSITIVE);
    println!("== runnel flood / quiet");
    println!(
        "  flood            {attempts} connection attempts ({:.0}/s), {handshakes} handshakes, \
         {answered} bad enrollments refused",
        attempts as f64 / flood_secs
    );
    println!(
        "  broker limits    retry {:.0}, source {:.0}, handshakes {:.0}, enrollments {:.0}, \
         enroll_rate {:.0}",
        limited("retry"),
        limited("source"),
        limited("handshakes"),
        limited("enrollments"),
        limited("enroll_rate")
    );
    println!("  runners lost     {lost} of {}", connected.conns.len());
    println!("  p99 latency      {p99_ratio:.2}x   throughput {tput_ratio:.2}x   (flood / quiet)");
    let line = json!({
        "bench": "flood-compare", "p99_ratio": p99_ratio, "throughput_ratio": tput_ratio,
        "quiet_p99_ms": quiet_row.p99_ms, "flood_p99_ms": loud_row.p99_ms,
        "attempts": attempts, "attempts_per_sec": attempts as f64 / flood_secs,
        "handshakes": handshakes, "bad_enrollments_refused": answered, "runners_lost": lost,
        "limited": { "retry": limited("retry"), "source": limited("source"), "handshakes": limited("handshakes"),
                     "enrollments": limited("enrollments"), "enroll_rate": limited("enroll_rate") },
    });
    println!("{line}");
    drop(connected);
    broker.stop().await;
    Ok(())
}
