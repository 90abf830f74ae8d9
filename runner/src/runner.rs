//! The runner's public API ([`Runner::builder`] → [`RunnerHandle`], [`RunnerStatus`]) and
//! its connection loop: one [`crate::session`] after another, with [`crate::backoff`]
//! between them, until drained, stopped or refused for good.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use runnel_protocol::transport::Stats;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::dial::{Dialer, NotFollowed};
use crate::handler::JobHandler;
use crate::session::{SessionEnd, session};
use crate::state::StateDir;
use crate::{Exec, RunnerError};

/// Where the runner stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerStatus {
    /// Dialling (or waiting to redial).
    Connecting,
    /// Welcome received.
    Connected {
        /// Runner id from the Welcome.
        runner_id: String,
        /// How many sessions this runner has had (1 for the first).
        session: u64,
        /// When the connection attempt that made this session was due to start (wall
        /// clock): the end of the reconnect delay before it, or when the runner started.
        /// After a broker restart, these instants across a fleet show how the backoff
        /// spread the fleet's return, whatever delayed each handshake after that.
        dial_due: std::time::SystemTime,
        /// The reconnect delay the runner waited before that attempt (zero for the first).
        waited: Duration,
    },
    /// Stopped for good.
    Stopped {
        /// What ended it: "stopped" on request, else the broker's refusal.
        reason: String,
    },
}

/// Builds a [`Runner`].
pub struct RunnerBuilder {
    state: StateDir,
    handlers: HashMap<String, Arc<dyn JobHandler>>,
    capacity: u32,
    labels: BTreeMap<String, String>,
    keep_alive: Duration,
    broker_override: Option<String>,
}

/// Starts runners: [`Runner::builder`] over an enrolled state dir.
#[derive(Debug)]
pub struct Runner;

impl Runner {
    /// A builder over an enrolled state dir, with the `exec` handler installed.
    pub fn builder(state: StateDir) -> RunnerBuilder {
        let mut handlers: HashMap<String, Arc<dyn JobHandler>> = HashMap::new();
        handlers.insert("exec".into(), Arc::new(Exec::default()));
        let capacity = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(2);
        RunnerBuilder {
            state,
            handlers,
            capacity,
            labels: BTreeMap::new(),
            keep_alive: runnel_protocol::transport::DEFAULT_KEEP_ALIVE,
            broker_override: None,
        }
    }
}

impl RunnerBuilder {
    /// Installs (or replaces) the handler of a job kind.
    pub fn handler(mut self, kind: &str, h: impl JobHandler) -> Self {
        self.handlers.insert(kind.to_owned(), Arc::new(h));
        self
    }
    /// Removes the handler of a job kind (`--no-exec` removes `exec`): the runner then
    /// does not advertise it, and the broker refuses such jobs for it.
    pub fn without_handler(mut self, kind: &str) -> Self {
        self.handlers.remove(kind);
        self
    }
    /// Jobs run at once (at least 1).
    pub fn capacity(mut self, n: u32) -> Self {
        self.capacity = n.max(1);
        self
    }
    /// Labels advertised in Hello.
    pub fn labels(mut self, labels: BTreeMap<String, String>) -> Self {
        self.labels = labels;
        self
    }
    /// QUIC keep-alive interval.
    pub fn keep_alive(mut self, d: Duration) -> Self {
        self.keep_alive = d;
        self
    }
    /// Dial this `host:port` instead of the one saved at enrollment.
    pub fn broker(mut self, addr: impl Into<String>) -> Self {
        self.broker_override = Some(addr.into());
        self
    }

    /// Starts the connection loop.
    pub fn spawn(self) -> Result<RunnerHandle, RunnerError> {
        let info = self.state.info()?;
        let broker = self.broker_override.clone().unwrap_or(info.broker);
        let (status_tx, status) = watch::channel(RunnerStatus::Connecting);
        let drain = CancellationToken::new();
        let stop = CancellationToken::new();
        let live = Arc::new(std::sync::Mutex::new(None));
        let inner = Arc::new(Inner {
            state: self.state,
            handlers: self.handlers,
            capacity: self.capacity,
            labels: self.labels,
            keep_alive: self.keep_alive,
            broker,
            permits: Arc::new(Semaphore::new(self.capacity as usize)),
            draining: AtomicBool::new(false),
            epoch_seen: AtomicU64::new(0),
            drain: drain.clone(),
            stop: stop.clone(),
            status: status_tx,
            live: live.clone(),
        });
        let task = Some(tokio::spawn(run_loop(inner)));
        Ok(RunnerHandle { status, drain, stop, task, live })
    }
}

/// A running runner. Dropping the handle stops the runner (running jobs are cancelled).
#[derive(Debug)]
pub struct RunnerHandle {
    status: watch::Receiver<RunnerStatus>,
    drain: CancellationToken,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), RunnerError>>>,
    live: Live,
}

impl Drop for RunnerHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RunnerHandle {
    /// Current status.
    pub fn status(&self) -> RunnerStatus {
        self.status.borrow().clone()
    }

    /// What the connection to the broker has carried since it was dialled; `None` while
    /// there is none.
    pub fn stats(&self) -> Option<Stats> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.as_ref().map(|c| Stats::from(&c.stats()))
    }

    /// A receiver of status changes.
    pub fn watch(&self) -> watch::Receiver<RunnerStatus> {
        self.status.clone()
    }

    /// Waits until connected (Welcome received) or `limit` passes.
    pub async fn wait_connected(&self, limit: Duration) -> Result<(), RunnerStatus> {
        let mut rx = self.status.clone();
        let ok = tokio::time::timeout(
            limit,
            rx.wait_for(|s| {
                matches!(s, RunnerStatus::Connected { .. } | RunnerStatus::Stopped { .. })
            }),
        )
        .await;
        match ok {
            Ok(Ok(s)) if matches!(*s, RunnerStatus::Connected { .. }) => Ok(()),
            _ => Err(self.status()),
        }
    }

    /// Graceful stop: refuse new jobs, let running ones finish, then close.
    pub fn drain(&self) {
        self.drain.cancel();
    }

    /// Stops now: running jobs are cancelled and the connection closed.
    pub async fn shutdown(self) -> Result<(), RunnerError> {
        self.stop.cancel();
        self.join().await
    }

    /// Waits for the runner to stop by itself (after [`RunnerHandle::drain`] or a fatal
    /// refusal).
    pub async fn join(mut self) -> Result<(), RunnerError> {
        match self.task.take() {
            Some(t) => match t.await {
                Ok(r) => r,
                Err(e) if e.is_panic() => Err(RunnerError::Panicked(panic_message(e.into_panic()))),
                Err(e) => Err(RunnerError::connection(e)),
            },
            None => Ok(()),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) state: StateDir,
    pub(crate) handlers: HashMap<String, Arc<dyn JobHandler>>,
    pub(crate) capacity: u32,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) keep_alive: Duration,
    pub(crate) broker: String,
    /// One permit per job the runner may run at once (its advertised capacity).
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) draining: AtomicBool,
    /// The highest placement epoch a Welcome has carried: an older one comes from a node
    /// that lost its claim on this runner's tenant, and is refused.
    pub(crate) epoch_seen: AtomicU64,
    pub(crate) drain: CancellationToken,
    pub(crate) stop: CancellationToken,
    pub(crate) status: watch::Sender<RunnerStatus>,
    /// The connection of the session now (for [`RunnerHandle::stats`]).
    pub(crate) live: Live,
}

/// The connection of the session now, if there is one.
pub(crate) type Live = Arc<std::sync::Mutex<Option<quinn::Connection>>>;

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => {
            p.downcast_ref::<&str>().map_or_else(|| "non-text panic".into(), |s| s.to_string())
        }
    }
}

async fn run_loop(inner: Arc<Inner>) -> Result<(), RunnerError> {
    let mut backoff = Backoff::new();
    let mut sessions = 0u64;
    let mut dialer = Dialer::new(
        crate::tls::broker_addrs(&inner.broker).into_iter().map(str::to_owned).collect(),
    );
    // When the next attempt is due (see `RunnerStatus::Connected::dial_due`).
    let mut dial_due = std::time::SystemTime::now();
    let mut waited = Duration::ZERO;
    loop {
        let _ = inner.status.send(RunnerStatus::Connecting);
        let dial = dialer.address(Instant::now());
        // (why it ended, whether it got as far as Welcome, whether `dial` stopped answering)
        let (reason, welcomed, silent) = match session(
            &inner,
            &dial,
            &mut sessions,
            (dial_due, waited),
        )
        .await
        {
            SessionEnd::Finished => {
                let _ = inner.status.send(RunnerStatus::Stopped { reason: "stopped".into() });
                return Ok(());
            }
            SessionEnd::Fatal(reason) => {
                tracing::error!(%reason, "broker refused this runner; not reconnecting");
                let _ = inner.status.send(RunnerStatus::Stopped { reason: reason.clone() });
                return Err(RunnerError::Refused(reason));
            }
            SessionEnd::Redirect(addr) => {
                match dialer.redirected(&dial, addr.clone(), Instant::now()) {
                    Ok(()) => {
                        tracing::info!(from = %dial, to = %addr, "redirected to the tenant's home node");
                        (dial_due, waited) = (std::time::SystemTime::now(), Duration::ZERO);
                        continue;
                    }
                    Err(NotFollowed::HomeJustFailed(reason)) => {
                        backoff.awaiting_failover();
                        (reason, false, false)
                    }
                    Err(other) => (other.into_reason(), false, false),
                }
            }
            SessionEnd::Retry { reason, welcomed } => (reason, welcomed, false),
            SessionEnd::Silent { reason, welcomed } => (reason, welcomed, true),
            SessionEnd::Busy(reason) => {
                backoff.spread();
                (reason, false, false)
            }
            SessionEnd::GoAway(delay) => {
                // The broker chose the delay (spread over its window): no backoff, and the
                // node that sent us away is not dialled first.
                dialer.move_on();
                // Should the broker not be back when the delay is up, the fleet must not
                // then pile onto its successor in step: the lost-session spread.
                backoff.after_lost_session();
                tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting after GoAway");
                (dial_due, waited) = (std::time::SystemTime::now() + delay, delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = inner.stop.cancelled() => return Ok(()),
                    _ = inner.drain.cancelled() => return Ok(()),
                }
                continue;
            }
        };
        if silent {
            dialer.unreachable(dial, Instant::now());
        } else {
            dialer.move_on();
        }
        if welcomed {
            backoff.after_lost_session();
        }
        let delay = backoff.next_delay(&mut rand::rng());
        (dial_due, waited) = (std::time::SystemTime::now() + delay, delay);
        tracing::info!(%reason, delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = inner.stop.cancelled() => return Ok(()),
            _ = inner.drain.cancelled() => return Ok(()),
        }
    }
}
