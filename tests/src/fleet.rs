//! A fleet of real runners in one process, for reconnect storms: each runner is the real
//! `runnel_runner::Runner` (its own QUIC endpoint, its own backoff with full jitter, GoAway
//! handling), enrolled for real through the API and `runnel-enroll/1`. The NAT lab runs it
//! as the `fleet-under-test` child process behind the NAT; `runnel-bench reconnect` runs it
//! in-process on loopback. [`Storm`] summarises when the runners came back.

use std::path::Path;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use runnel_runner::{Runner, RunnerHandle, RunnerStatus, StateDir};
use serde_json::json;
use tokio::sync::mpsc;

/// Owner of every fleet runner.
pub const FLEET_OWNER: &str = "fleet";

/// Enrollment attempts per runner beyond the first.
const ENROLL_ATTEMPTS: u64 = 10;

/// Creates `n` runners (owner [`FLEET_OWNER`]) with `admin` (a tenant admin client) and
/// enrolls each at `broker` into its own state dir under `dir`, `parallel` at a time.
pub async fn enroll_fleet(
    admin: &runnel_ctl::Client,
    broker: &str,
    fingerprint: &str,
    n: usize,
    dir: &Path,
    parallel: usize,
) -> anyhow::Result<Vec<StateDir>> {
    futures::stream::iter(0..n)
        .map(|i| {
            let state = StateDir::new(dir.join(format!("r{i}")));
            async move {
                let v = admin
                    .post("/v1/runners", json!({ "owner": FLEET_OWNER, "name": format!("f{i}") }))
                    .await?;
                let token = v["token"].as_str().ok_or_else(|| anyhow::anyhow!("no token: {v}"))?;
                // Hundreds of enrollments from one address meet the broker's intake limits
                // (a refused handshake, "try again"): the token is not spent, try again.
                let mut attempt = 0u64;
                loop {
                    match runnel_runner::enroll(broker, fingerprint, token, &state).await {
                        Ok(_) => return Ok::<_, anyhow::Error>(state),
                        Err(e) if attempt < ENROLL_ATTEMPTS => {
                            attempt += 1;
                            let pause = Duration::from_millis(100 * attempt);
                            if attempt == 1 {
                                eprintln!(
                                    "fleet: runner {i}: enrollment refused ({e}); trying again"
                                );
                            }
                            tokio::time::sleep(pause).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        })
        .buffered(parallel.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// One runner's session started (Welcome received).
#[derive(Debug, Clone, Copy)]
pub struct Connected {
    /// Index of the runner in the fleet.
    pub runner: usize,
    /// Its session count (1 for the first connection).
    pub session: u64,
    /// Wall clock (so that another process can line it up with its own events).
    pub at: SystemTime,
    /// When the runner's dial for this session was due (`RunnerStatus::Connected::dial_due`).
    pub due: SystemTime,
    /// The reconnect delay it waited before that dial.
    pub waited: Duration,
}

/// Every session start of a fleet, in order.
pub type Events = std::pin::Pin<Box<dyn futures::Stream<Item = Connected> + Send>>;

/// Starts every runner (capacity 1, the `exec` handler). Each `Connected` status comes out
/// of the stream; dropping the handles stops the runners.
pub fn run_fleet(states: Vec<StateDir>) -> anyhow::Result<(Vec<RunnerHandle>, Events)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Connected>();
    let mut handles = Vec::with_capacity(states.len());
    for (runner, state) in states.into_iter().enumerate() {
        let handle = Runner::builder(state).capacity(1).spawn()?;
        let mut watch = handle.watch();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                if let RunnerStatus::Connected { session, dial_due: due, waited, .. } =
                    *watch.borrow_and_update()
                    && session != last
                {
                    last = session;
                    let at = SystemTime::now();
                    if tx.send(Connected { runner, session, at, due, waited }).is_err() {
                        return;
                    }
                }
                if watch.changed().await.is_err() {
                    return;
                }
            }
        });
        handles.push(handle);
    }
    Ok((handles, Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))))
}

/// Reads `events` until each of the `n` runners has reached session `session` (counted from
/// 1); answers each runner's first such event. Fails after `limit`, saying how many had.
pub async fn until_back(
    events: &mut (impl futures::Stream<Item = Connected> + Unpin),
    n: usize,
    session: u64,
    limit: Duration,
) -> anyhow::Result<Vec<Connected>> {
    let mut back: Vec<Option<Connected>> = vec![None; n];
    let mut left = n;
    let deadline = tokio::time::Instant::now() + limit;
    while left > 0 {
        let Ok(next) = tokio::time::timeout_at(deadline, events.next()).await else {
            anyhow::bail!(
                "only {} of {n} runners reached session {session} in {limit:?}",
                n - left
            );
        };
        let c = next.ok_or_else(|| anyhow::anyhow!("the fleet stopped"))?;
        if let Some(slot) = back.get_mut(c.runner).filter(|a| a.is_none() && c.session >= session) {
            *slot = Some(c);
            left -= 1;
        }
    }
    Ok(back.into_iter().flatten().collect())
}

/// Each time in `at` as the time since `t0`.
pub fn since(t0: SystemTime, at: impl IntoIterator<Item = SystemTime>) -> Vec<Duration> {
    at.into_iter().map(|t| t.duration_since(t0).unwrap_or_default()).collect()
}

/// When a fleet came back after a restart: times since the restart began.
#[derive(Debug, Clone, PartialEq)]
pub struct Storm {
    /// Runners counted.
    pub total: usize,
    /// Time until half were back.
    pub p50: Duration,
    /// Time until 99% were back.
    pub p99: Duration,
    /// Time until all were back.
    pub all: Duration,
    /// Most reconnects (handshakes completed) in any 100 ms window.
    pub peak_100ms: usize,
}

impl Storm {
    /// From each runner's time back (since the restart began).
    pub fn of(mut back: Vec<Duration>) -> Self {
        back.sort();
        let total = back.len();
        let at = |q: f64| {
            let i = ((total as f64 * q).ceil() as usize).clamp(1, total.max(1)) - 1;
            back.get(i).copied().unwrap_or_default()
        };
        // Sliding 100 ms window over the sorted times.
        let (mut peak, mut lo) = (0, 0);
        for hi in 0..total {
            while back[hi] - back[lo] >= Duration::from_millis(100) {
                lo += 1;
            }
            peak = peak.max(hi - lo + 1);
        }
        Self { total, p50: at(0.5), p99: at(0.99), all: at(1.0), peak_100ms: peak }
    }

    /// The peak window's share of the fleet.
    pub fn peak_fraction(&self) -> f64 {
        self.peak_100ms as f64 / self.total.max(1) as f64
    }

    /// One JSON line (times in ms).
    pub fn json(&self) -> serde_json::Value {
        json!({
            "runners": self.total,
            "p50_ms": self.p50.as_millis() as u64,
            "p99_ms": self.p99.as_millis() as u64,
            "all_ms": self.all.as_millis() as u64,
            "peak_handshakes_per_100ms": self.peak_100ms,
            "peak_fraction": (self.peak_fraction() * 1000.0).round() / 1000.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storm_percentiles_and_the_peak_window() {
        let ms = Duration::from_millis;
        // 10 runners: five within 50 ms, the rest a second apart.
        let back = [0, 10, 20, 30, 49, 1000, 2000, 3000, 4000, 5000].map(ms).to_vec();
        let s = Storm::of(back);
        assert_eq!((s.total, s.peak_100ms), (10, 5));
        assert_eq!((s.p50, s.p99, s.all), (ms(49), ms(5000), ms(5000)));
        assert!((s.peak_fraction() - 0.5).abs() < 1e-9);
        // A window is 100 ms wide: 0 and 100 are not in one.
        assert_eq!(Storm::of(vec![ms(0), ms(100)]).peak_100ms, 1);
        assert_eq!(Storm::of(vec![]).total, 0);
    }
}
