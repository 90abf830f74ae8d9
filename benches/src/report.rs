//! Human table plus one JSON line per run.

use serde_json::json;

use crate::drive::Dispatched;
use crate::proc_usage::Usage;
use crate::sim::Connected;

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// One measured row: a system under the closed-loop dispatch load.
pub(crate) struct Row {
    /// What ran (the label printed with it).
    pub(crate) label: String,
    pub(crate) jobs_per_sec: f64,
    pub(crate) p99_ms: f64,
}

/// Prints the human table and one JSON line for a dispatch phase of `system` (`runnel` or
/// `nats`); `before`/`after` are that system's server process usage around the phase.
pub(crate) fn print(
    system: &str,
    kind: &str,
    label: &str,
    d: &Dispatched,
    before: &Usage,
    after: &Usage,
    runners: Option<(usize, usize)>,
) -> Row {
    let secs = d.elapsed.as_secs_f64();
    let rate = d.ok as f64 / secs;
    let (p50, p90, p99, p999) = (
        d.hist.value_at_quantile(0.5),
        d.hist.value_at_quantile(0.9),
        d.hist.value_at_quantile(0.99),
        d.hist.value_at_quantile(0.999),
    );
    let cpu = after.cpu_secs - before.cpu_secs;
    println!("== {system} {kind}: {label}");
    println!("  jobs ok          {:>10}   ({rate:.0} jobs/s over {secs:.1}s)", d.ok);
    println!(
        "  latency ms       p50 {:.2}  p90 {:.2}  p99 {:.2}  p999 {:.2}",
        ms(p50),
        ms(p90),
        ms(p99),
        ms(p999)
    );
    println!("  errors           {:?}", d.errors);
    let per_job = |cpu: f64| 1e6 * cpu / (d.ok.max(1) as f64);
    println!(
        "  server cpu       {cpu:.2}s ({:.0}% of one core, {:.1} us/job)",
        100.0 * cpu / secs,
        per_job(cpu)
    );
    println!(
        "  harness cpu      {:.2}s ({:.0}% of one core, {:.1} us/job)",
        d.harness_cpu_secs,
        100.0 * d.harness_cpu_secs / secs,
        per_job(d.harness_cpu_secs)
    );
    println!("  server rss       {} KiB (peak {} KiB)", after.rss_kib, after.peak_rss_kib);
    if let Some((ok, failed)) = runners {
        println!("  runners          {ok} connected, {failed} failed");
    }
    for note in &d.notes {
        println!("{note}");
    }
    let line = json!({
        "bench": kind, "system": system, "label": label, "jobs_ok": d.ok, "jobs_per_sec": rate,
        "p50_ms": ms(p50), "p90_ms": ms(p90), "p99_ms": ms(p99), "p999_ms": ms(p999), "errors": d.errors,
        "server_cpu_secs": cpu, "harness_cpu_secs": d.harness_cpu_secs, "server_rss_kib": after.rss_kib, "server_peak_rss_kib": after.peak_rss_kib,
    });
    println!("{line}");
    Row { label: label.to_owned(), jobs_per_sec: rate, p99_ms: ms(p99) }
}

/// The forwarding overhead: the same load through another node than the home.
pub(crate) fn forwarding(home: &Row, via: &Row, forwarder_cpu: f64, elapsed: std::time::Duration) {
    let ratio = via.jobs_per_sec / home.jobs_per_sec.max(f64::MIN_POSITIVE);
    let secs = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    println!(
        "  forwarded/home   throughput x{ratio:.2}, p99 {:.2} ms vs {:.2} ms; forwarding node cpu {:.0}% of one core",
        via.p99_ms,
        home.p99_ms,
        100.0 * forwarder_cpu / secs
    );
    let line = json!({
        "bench": "cluster-forwarding", "throughput_ratio": ratio,
        "home_p99_ms": home.p99_ms, "forwarded_p99_ms": via.p99_ms,
        "forwarder_cpu_secs": forwarder_cpu,
    });
    println!("{line}");
}

/// One runnel row against the better NATS row of the same run.
pub(crate) struct Ratio {
    /// The runnel row's label.
    pub(crate) label: String,
    /// runnel's throughput over NATS's.
    pub(crate) throughput: f64,
    /// runnel's p99 over NATS's.
    pub(crate) p99: f64,
}

/// Each runnel row's ratios to the better NATS row (the higher throughput), or why there
/// are none.
pub(crate) fn compare(runnel: &[Row], nats: Result<&[Row], &str>) -> Vec<Ratio> {
    let best =
        nats.map(|rows| rows.iter().max_by(|a, b| a.jobs_per_sec.total_cmp(&b.jobs_per_sec)));
    let n = match best {
        Ok(Some(n)) => n,
        Ok(None) => {
            println!("== runnel / nats: no NATS row");
            return Vec::new();
        }
        Err(why) => {
            println!("== runnel / nats: skipped: {why}");
            println!("{}", json!({ "bench": "compare_nats", "skipped": why }));
            return Vec::new();
        }
    };
    let mut ratios = Vec::new();
    println!("== runnel / nats (the better NATS row: {:.0} jobs/s, {})", n.jobs_per_sec, n.label);
    for r in runnel {
        let tput = r.jobs_per_sec / n.jobs_per_sec.max(f64::MIN_POSITIVE);
        let p99 = r.p99_ms / n.p99_ms.max(f64::MIN_POSITIVE);
        println!("  {}", r.label);
        println!("    throughput     {tput:.2}x   (>= 1.0 means runnel dispatches more)");
        println!("    p99 latency    {p99:.2}x   (<= 1.0 means runnel's tail is shorter)");
        println!(
            "{}",
            json!({ "bench": "compare_nats", "runnel": r.label, "nats": n.label,
                    "throughput_ratio": tput, "p99_ratio": p99,
                    "runnel_jobs_per_sec": r.jobs_per_sec, "nats_jobs_per_sec": n.jobs_per_sec,
                    "runnel_p99_ms": r.p99_ms, "nats_p99_ms": n.p99_ms })
        );
        ratios.push(Ratio { label: r.label.clone(), throughput: tput, p99 });
    }
    ratios
}

/// The `q` quantile (0 = min, 0.5 = median, 1 = max) of `sorted`, the nearest sample.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied()
}

/// The median of `v` (sorted in place).
pub(crate) fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    quantile(v, 0.5)
}

/// Each runnel row's ratios over `runs` (each a whole `compare-nats` run: its own broker,
/// its own nats-server), and their medians: BENCHMARKS.md quotes the median of three.
pub(crate) fn compare_runs(runs: &[Vec<Ratio>]) {
    let labels: Vec<&str> =
        runs.first().map(|r| r.iter().map(|x| x.label.as_str()).collect()).unwrap_or_default();
    println!("== runnel / nats over {} runs (median)", runs.len());
    for label in labels {
        let of = |f: fn(&Ratio) -> f64| -> Vec<f64> {
            runs.iter().flatten().filter(|r| r.label == label).map(f).collect()
        };
        let (mut tput, mut p99) = (of(|r| r.throughput), of(|r| r.p99));
        let each: Vec<String> = tput.iter().map(|t| format!("{t:.3}")).collect();
        let line = json!({ "bench": "compare_nats_runs", "runnel": label, "runs": tput.len(),
                           "throughput_ratios": tput.clone(), "p99_ratios": p99.clone(),
                           "median_throughput_ratio": median(&mut tput),
                           "median_p99_ratio": median(&mut p99) });
        println!("  {label}");
        println!(
            "    throughput     {:.3}x median   ({})",
            median(&mut tput).unwrap_or(f64::NAN),
            each.join(", ")
        );
        println!("    p99 latency    {:.3}x median", median(&mut p99).unwrap_or(f64::NAN));
        println!("{line}");
    }
}

pub(crate) fn revoke(h: &hdrhistogram::Histogram<u64>, failed: usize) {
    let (p50, p99, max) = (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max());
    println!("== runnel revoke: DELETE /v1/runners/{{id}} -> runner sees its connection closed");
    println!("  revoked          {} ({} failed or not closed within 10s)", h.len(), failed);
    println!("  latency ms       p50 {:.2}  p99 {:.2}  max {:.2}", ms(p50), ms(p99), ms(max));
    let line = json!({ "bench": "revoke", "revoked": h.len(), "failed": failed,
                       "p50_ms": ms(p50), "p99_ms": ms(p99), "max_ms": ms(max) });
    println!("{line}");
}

/// kill -9 → first successful dispatch, one sample per failover.
pub(crate) fn failover(samples: &[std::time::Duration]) {
    let mut secs: Vec<f64> = samples.iter().map(std::time::Duration::as_secs_f64).collect();
    secs.sort_by(f64::total_cmp);
    let (min, p50, max) = (quantile(&secs, 0.0), quantile(&secs, 0.5), quantile(&secs, 1.0));
    let all: Vec<String> = secs.iter().map(|s| format!("{s:.2}")).collect();
    println!("== runnel failover: kill -9 the home -> first successful dispatch via another node");
    println!("  runs             {}   ({} s)", secs.len(), all.join(", "));
    if let (Some(min), Some(p50), Some(max)) = (min, p50, max) {
        println!("  seconds          min {min:.2}  median {p50:.2}  max {max:.2}");
    }
    let line = json!({ "bench": "cluster-failover", "runs": secs.len(), "seconds": secs,
                       "min_s": min, "median_s": p50, "max_s": max });
    println!("{line}");
}

pub(crate) fn connect(
    n: &usize,
    c: &Connected,
    idle: &Usage,
    with_all: &Usage,
    idle_cpu: f64,
    crypto_floor: [std::time::Duration; 2],
) {
    let took = c.took.as_secs_f64();
    let per = (with_all.rss_kib.saturating_sub(idle.rss_kib)) as f64 * 1024.0
        / c.conns.len().max(1) as f64;
    println!("== runnel connect: {n} idle runners");
    println!(
        "  all online in    {took:.2}s  ({:.0} handshakes/s incl. Hello/Welcome)",
        c.conns.len() as f64 / took
    );
    println!(
        "  broker rss       {} KiB before, {} KiB with all connected",
        idle.rss_kib, with_all.rss_kib
    );
    println!("  rss per runner   {:.1} KiB", per / 1024.0);
    let hs_cpu = with_all.cpu_secs - idle.cpu_secs;
    let per_hs_ms = 1000.0 * hs_cpu / c.conns.len().max(1) as f64;
    println!("  broker cpu       {hs_cpu:.2}s for the handshakes ({per_hs_ms:.3} ms each)");
    let [before_ms, after_ms] = crypto_floor.map(|d| d.as_secs_f64() * 1000.0);
    let floor_ms = (before_ms + after_ms) / 2.0;
    let over_floor = per_hs_ms / floor_ms.max(f64::MIN_POSITIVE);
    println!(
        "  crypto floor     {floor_ms:.3} ms per handshake ({before_ms:.3} before, {after_ms:.3} \
         after; X25519, Ed25519 sign and verify, ring, in this process's CPU time)"
    );
    println!("  handshake        {over_floor:.2}x the crypto floor");
    println!(
        "  idle broker cpu  {:.1}% of one core with all connected and no jobs",
        100.0 * idle_cpu
    );
    println!(
        "{}",
        json!({ "bench": "connect_scale", "runners": c.conns.len(), "failed": c.failed, "online_secs": took,
                "handshakes_per_sec": c.conns.len() as f64 / took, "rss_per_runner_bytes": per,
                "broker_cpu_per_handshake_ms": per_hs_ms, "idle_cpu_cores": idle_cpu,
                "crypto_floor_ms": floor_ms, "handshake_over_crypto_floor": over_floor })
    );
}
