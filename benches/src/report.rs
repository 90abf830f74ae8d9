//! Human table plus one JSON line per run.

use serde_json::json;

use crate::broker_proc::Usage;
use crate::sim::{Connected, Dispatched};

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub(crate) fn print(
    kind: &str,
    label: &str,
    d: &Dispatched,
    before: &Usage,
    after: &Usage,
    c: Option<&Connected>,
) {
    let secs = d.elapsed.as_secs_f64();
    let rate = d.ok as f64 / secs;
    let (p50, p99, p999) = (
        d.hist.value_at_quantile(0.5),
        d.hist.value_at_quantile(0.99),
        d.hist.value_at_quantile(0.999),
    );
    let cpu = after.cpu_secs - before.cpu_secs;
    println!("== runnel {kind}: {label}");
    println!("  jobs ok          {:>10}   ({rate:.0} jobs/s over {secs:.1}s)", d.ok);
    println!("  latency ms       p50 {:.2}  p99 {:.2}  p999 {:.2}", ms(p50), ms(p99), ms(p999));
    println!("  errors           {:?}", d.errors);
    println!("  broker cpu       {cpu:.2}s ({:.0}% of one core)", 100.0 * cpu / secs);
    println!("  broker rss       {} KiB (peak {} KiB)", after.rss_kib, after.peak_rss_kib);
    if let Some(c) = c {
        println!("  runners          {} connected, {} failed", c.conns.len(), c.failed);
    }
    let line = json!({
        "bench": kind, "label": label, "jobs_ok": d.ok, "jobs_per_sec": rate,
        "p50_ms": ms(p50), "p99_ms": ms(p99), "p999_ms": ms(p999), "errors": d.errors,
        "broker_cpu_secs": cpu, "broker_rss_kib": after.rss_kib, "broker_peak_rss_kib": after.peak_rss_kib,
    });
    println!("{line}");
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

pub(crate) fn connect(n: &usize, c: &Connected, idle: &Usage, with_all: &Usage) {
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
    println!("  broker cpu       {:.2}s for the handshakes", with_all.cpu_secs - idle.cpu_secs);
    println!(
        "{}",
        json!({ "bench": "connect_scale", "runners": c.conns.len(), "failed": c.failed, "online_secs": took,
                "handshakes_per_sec": c.conns.len() as f64 / took, "rss_per_runner_bytes": per })
    );
}
