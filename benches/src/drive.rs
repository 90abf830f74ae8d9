//! The closed-loop load shape both systems are measured with: C workers, each sending one
//! request, waiting for its answer and sending the next, until the deadline.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::proc_usage::usage;

/// What a dispatch phase measured.
pub(crate) struct Dispatched {
    /// Latency of successful requests, microseconds.
    pub(crate) hist: Histogram<u64>,
    pub(crate) ok: u64,
    /// Failed requests by kind (`http:429`, `timeout`, ...).
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) elapsed: Duration,
    /// CPU seconds the harness itself (this process: requesters and simulated runners)
    /// spent in the phase. On a machine whose cores the harness shares with the server,
    /// throughput is bounded by both, so the report prints it per job next to the server's.
    pub(crate) harness_cpu_secs: f64,
    /// More lines for the report, printed under the row (what one API's phase counts).
    pub(crate) notes: Vec<String>,
}

/// A latency histogram in microseconds, 1 µs to 60 s, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds are valid")
}

/// Runs `concurrency` workers for `len`. `op(worker, seq)` performs one request and returns
/// how many jobs it completed (more than one for a batch, each counted with the request's
/// latency), or `Err(kind)` when it failed; only successes count toward throughput and
/// latency.
pub(crate) async fn closed_loop<F, Fut>(concurrency: usize, len: Duration, op: F) -> Dispatched
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<u64, String>> + Send,
{
    let own_cpu = || usage(std::process::id()).map(|u| u.cpu_secs).unwrap_or(0.0);
    let cpu0 = own_cpu();
    let t0 = Instant::now();
    let deadline = t0 + len;
    let mut workers = JoinSet::new();
    for w in 0..concurrency {
        let op = op.clone();
        workers.spawn(async move {
            let (mut hist, mut ok, mut errors) = (histogram(), 0u64, BTreeMap::new());
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let s = Instant::now();
                match op(w, seq).await {
                    Ok(jobs) => {
                        let _ = hist.record_n(s.elapsed().as_micros() as u64, jobs);
                        ok += jobs;
                    }
                    Err(kind) => *errors.entry(kind).or_insert(0u64) += 1,
                }
                seq += 1;
            }
            (hist, ok, errors)
        });
    }
    let (mut hist, mut ok, mut errors) = (histogram(), 0u64, BTreeMap::new());
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok((h, n, e)) => {
                let _ = hist.add(&h);
                ok += n;
                for (k, v) in e {
                    *errors.entry(k).or_insert(0) += v;
                }
            }
            Err(_) => *errors.entry("worker_panicked".to_string()).or_insert(0) += 1,
        }
    }
    let elapsed = t0.elapsed();
    Dispatched { hist, ok, errors, elapsed, harness_cpu_secs: own_cpu() - cpu0, notes: Vec::new() }
}
