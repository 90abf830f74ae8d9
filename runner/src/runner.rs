//! The runner's connection loop.
//!
//! `connect → Hello → Welcome → serve` and, when the connection ends, reconnect with
//! exponential backoff and full jitter. A runner is *connected* only once the broker's
//! Welcome arrives: with TLS 1.3 a client's handshake can complete before the broker has
//! refused its certificate, so `connect` succeeding proves nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use runnel_certs::{ca::CLOCK_SKEW, key, parse_cert, pem};
use runnel_protocol::{
    BrokerJobFrame, ClientControl, ErrorCode, Heartbeat, Hello, JobOutcome, PROTOCOL_VERSION,
    RunnerJobFrame, ServerControl, read_frame, version::MIN_PROTOCOL_VERSION, write_frame,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::handler::{self, Job, JobHandler};
use crate::state::StateDir;
use crate::tls::{client_endpoint, resolve, runner_config};
use crate::{Exec, RunnerError};

/// First reconnect delay ceiling.
const BACKOFF_START: Duration = Duration::from_millis(200);
/// Largest reconnect delay ceiling.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Time the broker has to answer Hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the broker has to send the job on a new stream.
const JOB_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Default QUIC keep-alive.
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(4);
/// Output frames buffered per job before the handler waits.
const OUTPUT_QUEUE: usize = 32;
/// Never ask for a new certificate more often than this.
const MIN_RENEW_SPACING: Duration = Duration::from_secs(1);

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
    },
    /// Stopped for good.
    Stopped {
        /// Why.
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

/// Entry point.
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
            keep_alive: DEFAULT_KEEP_ALIVE,
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
        let inner = Arc::new(Inner {
            state: self.state,
            handlers: self.handlers,
            capacity: self.capacity,
            labels: self.labels,
            keep_alive: self.keep_alive,
            broker,
            slots: Arc::new(Semaphore::new(self.capacity as usize)),
            draining: AtomicBool::new(false),
            drain: drain.clone(),
            stop: stop.clone(),
            status: status_tx,
        });
        let task = Some(tokio::spawn(run_loop(inner)));
        Ok(RunnerHandle { status, drain, stop, task })
    }
}

/// A running runner. Dropping the handle stops the runner (running jobs are cancelled).
#[derive(Debug)]
pub struct RunnerHandle {
    status: watch::Receiver<RunnerStatus>,
    drain: CancellationToken,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), RunnerError>>>,
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
            Some(t) => t.await.map_err(|e| RunnerError::Connection(e.to_string()))?,
            None => Ok(()),
        }
    }
}

struct Inner {
    state: StateDir,
    handlers: HashMap<String, Arc<dyn JobHandler>>,
    capacity: u32,
    labels: BTreeMap<String, String>,
    keep_alive: Duration,
    broker: String,
    slots: Arc<Semaphore>,
    draining: AtomicBool,
    drain: CancellationToken,
    stop: CancellationToken,
    status: watch::Sender<RunnerStatus>,
}

/// How a session ended.
enum SessionEnd {
    /// Drained or stopped on request: do not reconnect.
    Finished,
    /// The broker refused this runner for good.
    Fatal(String),
    /// Anything else: reconnect. `welcomed` says whether the session got that far.
    Retry { reason: String, welcomed: bool },
}

fn is_revocation(e: &quinn::ConnectionError) -> bool {
    match e {
        // The broker closed a live connection because the runner was revoked.
        quinn::ConnectionError::ApplicationClosed(c) => {
            c.error_code == ErrorCode::Revoked.as_u32().into()
        }
        // The TLS alert certificate_revoked (44) in the handshake: QUIC crypto error 0x100+44.
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code) == 0x100 + 44,
        _ => false,
    }
}

async fn run_loop(inner: Arc<Inner>) -> Result<(), RunnerError> {
    let mut ceiling = BACKOFF_START;
    let mut sessions = 0u64;
    loop {
        let _ = inner.status.send(RunnerStatus::Connecting);
        match session(&inner, &mut sessions).await {
            SessionEnd::Finished => {
                let _ = inner.status.send(RunnerStatus::Stopped { reason: "stopped".into() });
                return Ok(());
            }
            SessionEnd::Fatal(reason) => {
                tracing::error!(%reason, "broker refused this runner; not reconnecting");
                let _ = inner.status.send(RunnerStatus::Stopped { reason: reason.clone() });
                return Err(RunnerError::Refused(reason));
            }
            SessionEnd::Retry { reason, welcomed } => {
                if welcomed {
                    ceiling = BACKOFF_START;
                }
                // Full jitter: anywhere in [0, ceiling], so a fleet does not reconnect in step.
                let delay =
                    Duration::from_millis(rand::rng().random_range(0..=ceiling.as_millis() as u64));
                tracing::info!(%reason, delay_ms = delay.as_millis() as u64, "reconnecting");
                ceiling = (ceiling * 2).min(BACKOFF_MAX);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = inner.stop.cancelled() => return Ok(()),
                    _ = inner.drain.cancelled() => return Ok(()),
                }
            }
        }
    }
}

fn retry(reason: impl std::fmt::Display) -> SessionEnd {
    SessionEnd::Retry { reason: reason.to_string(), welcomed: false }
}

/// When the current certificate should be renewed: after 2/3 of its life.
fn renew_at(cert_pem: &str) -> Option<std::time::SystemTime> {
    let der = pem::certs_from_pem(cert_pem).ok()?.into_iter().next()?;
    let parsed = parse_cert(&der).ok()?;
    let issued = parsed.not_before + CLOCK_SKEW;
    let life: time::Duration = parsed.not_after - issued;
    let at: time::OffsetDateTime = issued + (life * 2) / 3;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(at.unix_timestamp().max(0) as u64))
}

async fn session(inner: &Arc<Inner>, sessions: &mut u64) -> SessionEnd {
    let st = &inner.state;
    let loaded = (|| -> Result<_, RunnerError> {
        let ca = pem::certs_from_pem(&st.read(&st.ca_path())?)?.into_iter().next();
        let cert_pem = st.read(&st.cert_path())?;
        let chain = pem::certs_from_pem(&cert_pem)?;
        let key = pem::private_key_from_pem(&st.read(&st.key_path())?)?;
        Ok((ca, cert_pem, chain, key))
    })();
    let (ca, cert_pem, chain, key) = match loaded {
        Ok((Some(ca), c, ch, k)) => (ca, c, ch, k),
        Ok((None, ..)) => return SessionEnd::Fatal("state dir has no CA".into()),
        Err(e) => return SessionEnd::Fatal(e.to_string()),
    };
    let max_streams = inner.capacity * 2 + 8;
    let cfg = match runner_config(ca, chain, key, inner.keep_alive, max_streams) {
        Ok(c) => c,
        Err(e) => return SessionEnd::Fatal(e.to_string()),
    };
    let (addr, server_name) = match resolve(&inner.broker).await {
        Ok(x) => x,
        Err(e) => return retry(e),
    };
    let endpoint = match client_endpoint(addr) {
        Ok(e) => e,
        Err(e) => return retry(e),
    };
    let connecting = match endpoint.connect_with(cfg, addr, &server_name) {
        Ok(c) => c,
        Err(e) => return retry(e),
    };
    let conn = tokio::select! {
        c = connecting => match c {
            Ok(c) => c,
            Err(e) if is_revocation(&e) => return SessionEnd::Fatal(format!("runner revoked: {e}")),
            Err(e) => return retry(format!("connect: {e}")),
        },
        _ = inner.stop.cancelled() => return SessionEnd::Finished,
    };
    let end = serve_connection(inner, &conn, sessions, &cert_pem).await;
    endpoint.wait_idle().await;
    end
}

async fn serve_connection(
    inner: &Arc<Inner>,
    conn: &quinn::Connection,
    sessions: &mut u64,
    cert_pem: &str,
) -> SessionEnd {
    let closed_why = |e: &quinn::ConnectionError| {
        if is_revocation(e) { SessionEnd::Fatal(format!("runner revoked: {e}")) } else { retry(e) }
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return closed_why(&e),
    };
    let hello = ClientControl::Hello(Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        runner_version: env!("CARGO_PKG_VERSION").into(),
        labels: inner.labels.clone(),
        capacity: inner.capacity,
        kinds: inner.handlers.keys().cloned().collect(),
    });
    if let Err(e) = write_frame(&mut send, &hello).await {
        return retry(format!("sending Hello: {e}"));
    }
    let welcome = match tokio::time::timeout(
        WELCOME_TIMEOUT,
        read_frame::<ServerControl, _>(&mut recv),
    )
    .await
    {
        Ok(Ok(Some(ServerControl::Welcome(w)))) => w,
        Ok(Ok(Some(ServerControl::Error { code, message }))) => {
            return SessionEnd::Fatal(format!("broker refused the session ({code}): {message}"));
        }
        Ok(Ok(_)) => return retry("broker closed the control stream before Welcome"),
        Ok(Err(e)) => {
            // Most likely the broker refused our certificate: the close reason says why.
            return match conn.close_reason() {
                Some(reason) => closed_why(&reason),
                None => retry(format!("waiting for Welcome: {e}")),
            };
        }
        Err(_) => return retry("no Welcome in time"),
    };
    *sessions += 1;
    tracing::info!(runner = %welcome.runner_id, tenant = %welcome.tenant, owner = %welcome.owner, "connected");
    let _ = inner
        .status
        .send(RunnerStatus::Connected { runner_id: welcome.runner_id.clone(), session: *sessions });

    // Control writer: heartbeats, renewal requests, the drain notice.
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ClientControl>(8);
    let writer = tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            if write_frame(&mut send, &m).await.is_err() {
                return;
            }
        }
    });
    let heartbeat_every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    let hb_tx = ctl_tx.clone();
    let hb_slots = inner.slots.clone();
    let capacity = inner.capacity;
    let heartbeats = tokio::spawn(async move {
        let mut tick = tokio::time::interval(heartbeat_every);
        loop {
            tick.tick().await;
            let in_flight = capacity.saturating_sub(hb_slots.available_permits() as u32);
            let hb = ClientControl::Heartbeat(Heartbeat { in_flight, load_milli: load_milli() });
            if hb_tx.send(hb).await.is_err() {
                return;
            }
        }
    });
    // Control reader: renewed certificates, GoAway, errors.
    let renewal = tokio::spawn(renewal_loop(
        inner.clone(),
        ctl_tx.clone(),
        cert_pem.to_owned(),
        recv,
        conn.clone(),
    ));
    let tasks = [writer, heartbeats, renewal];

    let mut jobs = tokio::task::JoinSet::new();
    let end = loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let inner = inner.clone();
                    jobs.spawn(async move { serve_job(&inner, send, recv).await });
                }
                Err(e) => break SessionEnd::Retry { reason: e.to_string(), welcomed: true },
            },
            _ = inner.drain.cancelled(), if !inner.draining.load(Ordering::Relaxed) => {
                inner.draining.store(true, Ordering::Relaxed);
                tracing::info!(in_flight = jobs.len(), "draining: finishing running jobs, refusing new ones");
                let _ = ctl_tx.send(ClientControl::Draining).await;
            }
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
            _ = std::future::ready(()), if inner.draining.load(Ordering::Relaxed) && jobs.is_empty() => {
                conn.close(ErrorCode::Ok.as_u32().into(), b"drained");
                break SessionEnd::Finished;
            }
            _ = inner.stop.cancelled() => {
                conn.close(ErrorCode::GoingAway.as_u32().into(), b"runner stopping");
                break SessionEnd::Finished;
            }
        }
    };
    for t in tasks {
        t.abort();
    }
    jobs.abort_all();
    match (&end, conn.close_reason()) {
        (SessionEnd::Retry { .. }, Some(reason)) if is_revocation(&reason) => {
            SessionEnd::Fatal(format!("runner revoked: {reason}"))
        }
        _ => end,
    }
}

/// Reads control frames from the broker and renews the certificate in time.
async fn renewal_loop(
    inner: Arc<Inner>,
    ctl: mpsc::Sender<ClientControl>,
    mut cert_pem: String,
    mut recv: quinn::RecvStream,
    conn: quinn::Connection,
) {
    let st = &inner.state;
    let mut pending = false;
    loop {
        let due = renew_at(&cert_pem)
            .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok())
            .unwrap_or(Duration::ZERO)
            .max(MIN_RENEW_SPACING);
        tokio::select! {
            _ = tokio::time::sleep(due), if !pending => {
                let csr = st.read(&st.key_path()).and_then(|k| Ok(key::csr_pem(&key::key_from_pem(&k)?)?));
                match csr {
                    Ok(csr_pem) => {
                        pending = ctl.send(ClientControl::RenewCert { csr_pem }).await.is_ok();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build a renewal request");
                        return;
                    }
                }
            }
            frame = read_frame::<ServerControl, _>(&mut recv) => match frame {
                Ok(Some(ServerControl::RenewedCert { cert_pem: new, not_after_unix })) => {
                    match pem::write_public(&st.cert_path(), &new) {
                        Ok(()) => tracing::info!(not_after_unix, "certificate renewed"),
                        Err(e) => tracing::error!(error = %e, "could not save renewed certificate"),
                    }
                    cert_pem = new;
                    pending = false;
                }
                Ok(Some(ServerControl::RenewRefused { code, message })) => {
                    tracing::warn!(%code, %message, "renewal refused");
                    return;
                }
                Ok(Some(ServerControl::GoAway(g))) => {
                    tracing::info!(reason = %g.reason, "broker asked us to go away");
                    tokio::time::sleep(Duration::from_millis(u64::from(g.reconnect_after_ms))).await;
                    conn.close(ErrorCode::Ok.as_u32().into(), b"go away");
                    return;
                }
                Ok(Some(ServerControl::Error { code, message })) => {
                    tracing::warn!(%code, %message, "broker reported an error");
                }
                Ok(Some(other)) => tracing::debug!(?other, "ignoring control message"),
                Ok(None) | Err(_) => return,
            },
        }
    }
}

/// 1-minute load average × 1000, from /proc (0 where unavailable).
fn load_milli() -> u32 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()))
        .map(|l| (l * 1000.0) as u32)
        .unwrap_or(0)
}

/// Serves one job stream: read the Job, run its handler, stream output, send the Result.
async fn serve_job(inner: &Arc<Inner>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let req =
        match tokio::time::timeout(JOB_FRAME_TIMEOUT, read_frame::<BrokerJobFrame, _>(&mut recv))
            .await
        {
            Ok(Ok(Some(BrokerJobFrame::Job(r)))) => r,
            _ => {
                let _ = send.reset(ErrorCode::Protocol.as_u32().into());
                return;
            }
        };
    let span = tracing::info_span!("job", job = %req.job_id, kind = %req.kind);
    let _enter = span.enter();
    let refuse = |why: &str| RunnerJobFrame::Result(handler::rejected(why));
    let (handler, permit) =
        match (inner.handlers.get(&req.kind), inner.slots.clone().try_acquire_owned()) {
            _ if inner.draining.load(Ordering::Relaxed) => {
                let _ = write_frame(&mut send, &refuse("runner is draining")).await;
                let _ = send.finish();
                return;
            }
            (None, _) => {
                let _ =
                    write_frame(&mut send, &refuse(&format!("no handler for kind {:?}", req.kind)))
                        .await;
                let _ = send.finish();
                return;
            }
            (_, Err(_)) => {
                let _ = write_frame(&mut send, &refuse("runner is at capacity")).await;
                let _ = send.finish();
                return;
            }
            (Some(h), Ok(p)) => (h.clone(), p),
        };
    drop(_enter);
    let cancel = CancellationToken::new();
    let (frames_tx, mut frames_rx) = mpsc::channel::<RunnerJobFrame>(OUTPUT_QUEUE);
    // Broker → runner after the Job: Cancel, or the stream breaking (also a cancel).
    let listen_cancel = cancel.clone();
    let listener = tokio::spawn(async move {
        match read_frame::<BrokerJobFrame, _>(&mut recv).await {
            Ok(None) => {}
            _ => listen_cancel.cancel(),
        }
    });
    // Runner → broker: output frames, then the Result.
    let writer = tokio::spawn(async move {
        while let Some(frame) = frames_rx.recv().await {
            let last = matches!(frame, RunnerJobFrame::Result(_));
            if write_frame(&mut send, &frame).await.is_err() {
                return;
            }
            if last {
                let _ = send.finish();
                // Keep the stream until the broker has it.
                let _ = send.stopped().await;
                return;
            }
        }
    });
    let timeout = Duration::from_millis(req.timeout_ms);
    let timed_out = Arc::new(AtomicBool::new(false));
    let timer = {
        let cancel = cancel.clone();
        let timed_out = timed_out.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            timed_out.store(true, Ordering::Relaxed);
            cancel.cancel();
        })
    };
    let job = Job {
        id: req.job_id,
        kind: req.kind,
        payload: req.payload,
        timeout,
        frames: frames_tx.clone(),
        cancel: cancel.clone(),
    };
    let stop = inner.stop.clone();
    let run = handler.run(job);
    tokio::pin!(run);
    let mut result = tokio::select! {
        r = &mut run => r,
        _ = stop.cancelled() => { cancel.cancel(); run.await }
    };
    timer.abort();
    listener.abort();
    if timed_out.load(Ordering::Relaxed) && result.outcome == JobOutcome::Cancelled {
        result.outcome = JobOutcome::TimedOut;
        result.message = format!("run timeout of {timeout:?} passed; process group killed");
    }
    // Free the slot before the broker can see the Result: the broker counts the job done
    // when the Result arrives and may send the next one at once.
    drop(permit);
    let _ = frames_tx.send(RunnerJobFrame::Result(result)).await;
    drop(frames_tx);
    let _ = writer.await;
}
