//! RunnerConnection: one per live QUIC connection of a paired runner.
//!
//! It owns the control stream (Welcome, heartbeats, renewal, drain) and opens one
//! bidirectional stream per job. Its one I/O task ([`connection_io`]) drives the control
//! stream and every job of the connection: the TenantActor hands jobs straight to that
//! task through the connection's [`Inbox`] (where the actor's control frames for the
//! runner go too), with no task spawned per job. It stops when the connection closes for
//! any reason; its TenantActor then fails whatever jobs were still on it.
//!
//! It knows nothing of its tenant's actor but a [`DerivedActorRef`] of [`ConnectionEvent`]s,
//! the way quinn-proto's connection talks back to its endpoint only through
//! `EndpointEvent`: the tree's imports point down, tenant → connection, never back.

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};
use runnel_certs::RunnerIdentity;
use runnel_protocol::{
    BrokerJobFrame, ClientControl, ErrorCode, FrameError, Hello, JobOutcome, RunnerJobFrame,
    ServerControl, Welcome, encode_job_request, read_frame, write_frame,
};
use tokio_util::task::AbortOnDropHandle;

use super::job_lane::JobLane;
use crate::dispatch::ConnId;
use crate::index::Advertised;
use crate::jobs::{Finish, JobEntry, JobState, JobTable};
use crate::metrics::names;
use crate::records::{AuditEvent, RunnerState, now_unix};
use crate::shared::Shared;
use crate::wake_gate::WakeGate;

/// How long after its run-time limit a job may take to report before the broker gives up.
pub(super) const RESULT_GRACE: Duration = Duration::from_secs(5);
/// How long a runner has to confirm a cancel.
pub(super) const CANCEL_GRACE: Duration = Duration::from_secs(5);
/// Least time between two certificate renewals on one connection (a runner renews at 2/3
/// of its certificate's life; anything faster is a misbehaving or hostile peer).
const MIN_RENEWAL_SPACING: Duration = Duration::from_secs(1);
/// Control messages queued for the writer.
const CONTROL_QUEUE: usize = 16;
/// Longest one control frame may take to write. The jobs of the connection are driven by
/// the same task, so a runner that stops reading its control stream must not stall them:
/// past this, its connection is closed.
const CONTROL_WRITE_LIMIT: Duration = Duration::from_secs(10);

/// Longest a job stream's broker half is kept open after its `Result` was read, for the
/// next job on the connection to carry its end (`RESET_STREAM` after the runner's
/// `STOP_SENDING`, else a FIN) in the same datagram. Sent at once, the end took a datagram
/// of its own whenever the next job went elsewhere, as it nearly always does in a big fleet
/// (2,000 runners: 1.97 datagrams to a runner per job, 1.04 with this and the read of the
/// runner's FIN in `drive_job`; BENCHMARKS.md, 2026-12-05 later). Below the time the runner
/// allows the broker to acknowledge its `Result`
/// (`runnel_protocol::transport::MAX_ACK_DELAY`, 5 ms), so that acknowledgement leaves with
/// the end at the latest rather than alone before it.
const STREAM_END_DELAY: Duration = Duration::from_millis(4);

/// What one connection's I/O task is handed: the jobs its TenantActor places on this runner
/// (at most the runner's capacity at a time) and the control frames its actor queues for
/// the runner (at most [`CONTROL_QUEUE`]). A lock and a wakeup rather than tokio channels:
/// a channel allocates its state and a 32-slot block up front (~0.8 KiB) on every
/// connection, idle ones included.
#[derive(Debug)]
pub(crate) struct Inbox {
    /// What was handed over and not yet taken; None once the I/O task is gone.
    queued: std::sync::Mutex<Option<Handed>>,
    ready: tokio::sync::Notify,
}

/// What [`Inbox::recv`] takes at once.
#[derive(Debug, Default)]
struct Handed {
    jobs: Vec<Arc<JobEntry>>,
    control: Vec<ServerControl>,
}

impl Handed {
    fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.control.is_empty()
    }
}

impl Inbox {
    pub(crate) fn new() -> Arc<Self> {
        let queued = std::sync::Mutex::new(Some(Handed::default()));
        Arc::new(Self { queued, ready: tokio::sync::Notify::new() })
    }

    /// Hands `job` over; false when the connection's I/O task is gone.
    pub(crate) fn send(&self, job: Arc<JobEntry>) -> bool {
        self.hand(|h| {
            h.jobs.push(job);
            true
        })
    }

    /// Queues a control frame for the runner; false when the I/O task is gone or
    /// [`CONTROL_QUEUE`] frames are waiting already (a runner that does not read its
    /// control stream is closed by the writer's time limit, not queued for).
    fn send_control(&self, msg: ServerControl) -> bool {
        self.hand(|h| {
            let room = h.control.len() < CONTROL_QUEUE;
            if room {
                h.control.push(msg);
            }
            room
        })
    }

    fn hand(&self, put: impl FnOnce(&mut Handed) -> bool) -> bool {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        let Some(handed) = queued.as_mut() else { return false };
        let put = put(handed);
        if put {
            // A permit is kept when the task is not waiting: no wakeup is lost.
            self.ready.notify_one();
        }
        put
    }

    /// What was handed over since the last call, waiting for something. Woken, it first
    /// lets the tasks that are ready run ([`tokio::task::yield_now`]), so that jobs handed
    /// over at about the same time (by the API's connections, or the tenant's actor) are
    /// taken together and their requests share datagrams.
    async fn recv(&self) -> Handed {
        loop {
            let taken = match self.queued.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                Some(handed) => std::mem::take(handed),
                None => Handed::default(),
            };
            if !taken.is_empty() {
                return taken;
            }
            self.ready.notified().await;
            tokio::task::yield_now().await;
        }
    }

    /// Nothing more: the I/O task is gone (what a send answers from now on).
    fn close(&self) {
        *self.queued.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Closes the inbox when the I/O task ends, however it ends (also when aborted).
struct InboxGuard(Arc<Inbox>);

impl Drop for InboxGuard {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The connection actor.
#[derive(Debug)]
pub(crate) struct RunnerConnection;

/// A connection whose handshake and Hello are done, handed over by the accept loop.
#[derive(Debug)]
pub(crate) struct Attach {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// Identity from the verified certificate.
    pub identity: RunnerIdentity,
    /// The verified certificate's public key (a renewal must keep it).
    pub peer_key: Vec<u8>,
    /// The runner's Hello.
    pub hello: Hello,
    /// Negotiated protocol version.
    pub version: u16,
    /// The control stream.
    pub control: (quinn::SendStream, quinn::RecvStream),
    /// The tenant's placement epoch on this node (0 on a single node), for the Welcome.
    pub epoch: u64,
}

/// What a connection tells its tenant: all it can say upward.
#[derive(Debug)]
pub(crate) enum ConnectionEvent {
    /// A job on this connection reached its terminal state; its slot is free.
    JobDone {
        /// The connection.
        conn: ConnId,
        /// The job (its entry, not a copy of its id: no allocation per job).
        job: Arc<JobEntry>,
    },
    /// The runner asked for no new work.
    Draining(ConnId),
}

/// Arguments of [`RunnerConnection`].
#[derive(Debug)]
pub(crate) struct ConnectionArgs {
    /// Id of this connection within the tenant.
    pub conn_id: ConnId,
    /// The connection and its Hello.
    pub attach: Attach,
    /// Where this connection's events go (its tenant).
    pub tenant: DerivedActorRef<ConnectionEvent>,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// The connection's inbox: jobs to run on this runner, from its tenant.
    pub inbox: Arc<Inbox>,
}

/// Messages to [`RunnerConnection`].
#[derive(Debug)]
pub(crate) enum ConnectionMsg {
    /// A control message from the runner. Boxed, and handled in a boxed future: ractor
    /// keeps room for a message and its handler's future in every actor's boxed loop, idle
    /// ones included, and control messages come seldom (a heartbeat per interval).
    Control(Box<ClientControl>),
    /// Tell the runner to leave (this node drains) and to reconnect after this delay.
    GoAway(u32),
}

/// State of [`RunnerConnection`].
#[derive(Debug)]
pub(crate) struct ConnectionState {
    conn_id: ConnId,
    conn: quinn::Connection,
    identity: RunnerIdentity,
    tenant: DerivedActorRef<ConnectionEvent>,
    shared: Arc<Shared>,
    /// Where control frames for the runner go (the I/O task writes them).
    inbox: Arc<Inbox>,
    /// The connection's I/O task ([`connection_io`]), which also drives its jobs; aborted
    /// when the state goes, also when the actor is killed without `post_stop` (the tenant
    /// then ends the jobs still running `runner_lost`).
    io: AbortOnDropHandle<()>,
    span: tracing::Span,
    /// The `tenant` metric label.
    label: String,
    /// Lost packets already counted.
    lost_counted: u64,
    /// Where the runner's packets come from now (a NAT rebinding or a network change moves
    /// it under the live connection: QUIC migration; nothing is keyed by it).
    remote: std::net::SocketAddr,
    /// When this connection last got a renewed certificate.
    last_renewal: Option<std::time::Instant>,
    /// The public key of the certificate this connection was verified with: a renewal
    /// must keep it (None when the peer's certificate cannot be read: renewals refused).
    peer_key: Vec<u8>,
}

/// The connection goes with its actor, also when the actor is killed without `post_stop`
/// (its tenant crashed): the runner reconnects. Its I/O task is aborted with the state.
impl Drop for ConnectionState {
    fn drop(&mut self) {
        close(&self.conn, ErrorCode::GoingAway, "connection actor stopped");
    }
}

fn close(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    conn.close(code.as_u32().into(), reason.as_bytes());
}

impl Actor for RunnerConnection {
    type Msg = ConnectionMsg;
    type State = ConnectionState;
    type Arguments = ConnectionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConnectionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let Attach { conn, identity, peer_key, version, hello, control: (send, recv), epoch } =
            args.attach;
        let span = tracing::info_span!(
            "runner_conn",
            tenant = %identity.tenant,
            owner = %identity.owner,
            runner = %identity.runner,
            remote = %conn.remote_address(),
        );
        let welcome = ServerControl::Welcome(Welcome {
            version,
            runner_id: identity.runner.clone(),
            tenant: identity.tenant.clone(),
            owner: identity.owner.clone(),
            heartbeat_interval_ms: args.shared.config.heartbeat_interval.as_millis() as u32,
            epoch,
        });
        let jobs = Jobs {
            conn_id: args.conn_id,
            tenant: args.tenant.clone(),
            shared: args.shared.clone(),
        };
        let io = connection_io(
            conn.clone(),
            version,
            (send, recv),
            Box::new(welcome),
            (args.inbox.clone(), jobs),
            myself.clone(),
        );
        let io =
            AbortOnDropHandle::new(tokio::spawn(tracing::Instrument::instrument(io, span.clone())));
        let now = now_unix();
        args.shared.index.update_presence(&identity.runner, |e| {
            e.connections += 1;
            e.last_seen = Some(now);
            e.draining = false;
            e.advertised =
                Some(Advertised { labels: hello.labels.clone(), kinds: hello.kinds.clone() });
        });
        span.in_scope(|| tracing::info!("runner connected"));
        let label = args.shared.tenant_labels.label(&identity.tenant);
        metrics::gauge!(names::RUNNERS_CONNECTED, "tenant" => label.clone()).increment(1.0);
        Ok(ConnectionState {
            conn_id: args.conn_id,
            peer_key,
            remote: conn.remote_address(),
            conn,
            identity,
            tenant: args.tenant,
            shared: args.shared,
            inbox: args.inbox,
            io,
            span,
            label,
            lost_counted: 0,
            last_renewal: None,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: ConnectionMsg,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ConnectionMsg::Control(ctl) => Box::pin(state.control_message(*ctl)).await,
            ConnectionMsg::GoAway(reconnect_after_ms) => {
                let go =
                    runnel_protocol::GoAway { reason: "node draining".into(), reconnect_after_ms };
                state.inbox.send_control(ServerControl::GoAway(go));
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        close(&state.conn, ErrorCode::GoingAway, "connection actor stopped");
        state.io.abort();
        let now = now_unix();
        state.shared.index.update_presence(&state.identity.runner, |e| {
            e.connections = e.connections.saturating_sub(1);
            e.last_seen = Some(now);
        });
        state.span.in_scope(|| tracing::info!("runner disconnected"));
        metrics::gauge!(names::RUNNERS_CONNECTED, "tenant" => state.label.clone()).decrement(1.0);
        Ok(())
    }
}

/// What the I/O task needs to run the connection's jobs.
pub(super) struct Jobs {
    conn_id: ConnId,
    tenant: DerivedActorRef<ConnectionEvent>,
    pub(super) shared: Arc<Shared>,
}

impl Jobs {
    /// A job that ended: the job table and the tenant hear it.
    pub(super) fn ended(&self, job: Arc<JobEntry>, finish: Finish) {
        // At debug: at info, a busy broker would log a line per job (tens of thousands a
        // second); runnel_dispatches_total{outcome} counts them.
        tracing::debug!(job = %job.id, kind = %job.spec.kind, state = finish.state.name(), "job ended");
        self.shared.jobs.finish(&job, finish);
        let _ = self.tenant.send_message(ConnectionEvent::JobDone { conn: self.conn_id, job });
    }

    /// One job, start to end: its stream, then the job table and the tenant hear the end.
    /// Answers the stream's send half when it is still open after the `Result` (the caller
    /// ends it: see [`STREAM_END_DELAY`]).
    async fn run(&self, conn: &quinn::Connection, job: Arc<JobEntry>) -> Option<quinn::SendStream> {
        let (finish, send) = drive_job(conn, &job, &self.shared.jobs).await;
        self.ended(job, finish);
        send
    }
}

/// The connection's one I/O task: writes Welcome and then whatever the actor queues, turns
/// every control frame into a message (a bad frame closes the connection), runs every job
/// the tenant sends (each a future of this task, not a task of its own) and ends its stream
/// with the next job's request or after [`STREAM_END_DELAY`], and stops the actor when the
/// connection closes, so the actor lives exactly as long as the connection.
/// One task rather than a reader, a writer, a close watcher and a task per job: idle
/// runners are the common case and each task costs memory (BENCHMARKS.md), and a job
/// costs no spawn, no span and no hop through the actor's mailbox.
///
/// Not an `async fn`: the task is every idle connection's, and an `async fn`'s future keeps
/// its arguments apart from the locals they are moved into (~0.2 KiB here). The block below
/// uses what it captures in place.
fn connection_io(
    conn: quinn::Connection,
    version: u16,
    (mut send, recv): (quinn::SendStream, quinn::RecvStream),
    welcome: Box<ServerControl>,
    (inbox, jobs): (Arc<Inbox>, Jobs),
    me: ActorRef<ConnectionMsg>,
) -> impl Future<Output = ()> + Send {
    let inbox = InboxGuard(inbox);
    // The close and the runner's control frames come seldom; the task wakes several times
    // per job. Behind the gate they are polled only once woken (each poll of the control
    // stream takes the connection's lock).
    let gate = WakeGate::new();
    // Protocol 3: every job on one lane instead (`job_lane.rs`), behind a gate of its own:
    // polling it reads quinn's stream state under the connection's lock, so it is polled
    // only when something of its own woke it or it was handed jobs.
    let mut lane = JobLane::default();
    let lane_gate = WakeGate::new();
    async move {
        let mut writing = write_frame(&mut send, &*welcome).await.is_ok();
        drop(welcome);
        if !writing {
            close(&conn, ErrorCode::Protocol, "control stream write failed");
        }
        // A stream of frames, so that waiting for the next one is cancel-safe inside
        // select!. Made here, not captured: pinned, a captured one would be kept twice.
        let frames = futures::stream::unfold(recv, |mut r| async move {
            let next = read_frame::<ClientControl, _>(&mut r).await;
            Some((next, r))
        });
        tokio::pin!(frames);
        let closed = conn.closed();
        tokio::pin!(closed);
        let mut reading = true;
        // Boxed: FuturesUnordered keeps a stub task with room for one future, on every
        // connection, idle ones included (~1.5 KiB unboxed).
        let mut running = futures::stream::FuturesUnordered::<
            futures::future::BoxFuture<'_, Option<quinn::SendStream>>,
        >::new();
        // Send halves of ended jobs, ended (dropped) together with the next jobs' requests
        // or after STREAM_END_DELAY, whichever comes first. The timer is boxed: an idle
        // connection holds only a None.
        let mut ended: Vec<quinn::SendStream> = Vec::new();
        let mut end_by: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let mut lane_ok = true;
        loop {
            tokio::select! {
                reason = poll_fn(|cx| gate.poll(0, cx, |cx| closed.as_mut().poll(cx))) => {
                    // Every job still here fails at once on the closed connection: let each
                    // say so, then stop.
                    while running.next().await.is_some() {}
                    lane.lose_all(&jobs, "connection closed");
                    me.stop(Some(format!("connection closed: {reason}")));
                    return;
                }
                handed = inbox.0.recv() => {
                    if handed.jobs.is_empty() {
                        // Control frames alone: written below.
                    } else if version >= runnel_protocol::version::JOB_LANE {
                        lane.start(&conn, &jobs, handed.jobs);
                        lane_gate.set_due();
                    } else {
                        for job in handed.jobs {
                            running.push(Box::pin(jobs.run(&conn, job)));
                        }
                        // Start the new jobs now (their requests written), then end the
                        // ended jobs' streams: quinn's driver runs after this task, so the
                        // ends share the requests' datagrams.
                        while let Some(Some(done)) = running.next().now_or_never() {
                            ended.extend(done);
                        }
                        ended.clear();
                        end_by = None;
                    }
                    if writing && !handed.control.is_empty() {
                        // Boxed: control frames come seldom, and the writes' futures would
                        // otherwise make this task's largest state, every connection's.
                        writing = Box::pin(write_control(&conn, &mut send, handed.control)).await;
                    }
                }
                broken = poll_fn(|cx| lane_gate.poll(0, cx, |cx| lane.poll(cx, &jobs))), if lane_ok && lane.is_open() => {
                    close(&conn, broken.code, broken.reason);
                    lane_ok = false;
                }
                Some(done) = running.next(), if !running.is_empty() => {
                    if let Some(send) = done {
                        ended.push(send);
                        end_by.get_or_insert_with(|| Box::pin(tokio::time::sleep(STREAM_END_DELAY)));
                    }
                }
                Some(()) = futures::future::OptionFuture::from(end_by.as_mut()), if end_by.is_some() => {
                    ended.clear();
                    end_by = None;
                }
                next = poll_fn(|cx| gate.poll(1, cx, |cx| frames.as_mut().poll_next(cx))), if reading => match next {
                    Some(Ok(Some(msg))) => {
                        if me.cast(ConnectionMsg::Control(Box::new(msg))).is_err() {
                            return close(&conn, ErrorCode::GoingAway, "connection actor stopped");
                        }
                    }
                    Some(Ok(None)) | None => {
                        close(&conn, ErrorCode::Ok, "control stream closed");
                        reading = false;
                    }
                    Some(Err(FrameError::Io(_) | FrameError::Truncated)) => {
                        close(&conn, ErrorCode::Protocol, "control stream broken");
                        reading = false;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "bad control frame from runner; closing");
                        close(&conn, e.code(), "bad control frame");
                        reading = false;
                    }
                },
            }
        }
    }
}

/// Writes the control frames the actor queued, each within [`CONTROL_WRITE_LIMIT`]; false
/// when one could not be written (the connection is closed then).
async fn write_control(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    frames: Vec<ServerControl>,
) -> bool {
    for msg in frames {
        let written = tokio::time::timeout(CONTROL_WRITE_LIMIT, write_frame(send, &msg));
        if !matches!(written.await, Ok(Ok(()))) {
            close(conn, ErrorCode::Protocol, "control stream write failed");
            return false;
        }
    }
    true
}

impl ConnectionState {
    async fn control_message(&mut self, ctl: ClientControl) {
        match ctl {
            ClientControl::Heartbeat(hb) => {
                metrics::histogram!(names::QUIC_RTT).record(self.conn.rtt().as_secs_f64());
                let lost = self.conn.stats().path.lost_packets;
                metrics::counter!(names::QUIC_LOST_PACKETS)
                    .increment(lost.saturating_sub(self.lost_counted));
                self.lost_counted = lost;
                let remote = self.conn.remote_address();
                if remote != self.remote {
                    metrics::counter!(names::QUIC_MIGRATIONS).increment(1);
                    tracing::info!(from = %self.remote, to = %remote, "runner address changed; the connection migrated");
                    self.remote = remote;
                }
                let now = now_unix();
                self.shared.index.update_presence(&self.identity.runner, |e| {
                    e.last_seen = Some(now);
                    e.load_milli = hb.load_milli;
                    e.in_flight = hb.in_flight;
                });
            }
            ClientControl::Draining => {
                self.shared.index.update_presence(&self.identity.runner, |e| e.draining = true);
                let _ = self.tenant.send_message(ConnectionEvent::Draining(self.conn_id));
            }
            ClientControl::RenewCert { csr_pem } => {
                let too_soon = self.last_renewal.is_some_and(|t| t.elapsed() < MIN_RENEWAL_SPACING);
                let reply = if too_soon {
                    ServerControl::RenewRefused {
                        code: ErrorCode::Rejected,
                        message: "renewal requested too soon after the last one".into(),
                    }
                } else {
                    self.last_renewal = Some(std::time::Instant::now());
                    // Boxed: ractor keeps the handler's future inside every idle actor's
                    // boxed message loop, and the store writes make this path its largest
                    // by far; a renewal comes once in two thirds of a certificate's life.
                    Box::pin(self.renew(&csr_pem)).await
                };
                self.inbox.send_control(reply);
            }
            ClientControl::Hello(_) => {
                close(&self.conn, ErrorCode::Protocol, "second Hello");
            }
        }
    }

    /// Issues a new certificate for the same identity, over the live connection.
    async fn renew(&self, csr_pem: &str) -> ServerControl {
        let refuse =
            |code: ErrorCode, message: String| ServerControl::RenewRefused { code, message };
        // Only the key the connection proved it holds may be certified again: a copied
        // certificate must not become a new key's certificate (key rotation would be its
        // own, explicit step).
        match (runnel_certs::csr_public_key(csr_pem), &self.peer_key) {
            (Ok(asked), held) if asked == *held => {}
            (Err(e), _) => return refuse(ErrorCode::BadRequest, format!("bad CSR: {e}")),
            _ => {
                let id = &self.identity;
                let actor = format!("runner:{}", id.runner);
                let detail = "renewal refused: the CSR is for another key".to_string();
                let ev =
                    AuditEvent::now("denied", actor, Some(&id.tenant), Some(&id.runner), detail);
                self.shared.registry.audit_best_effort(ev).await;
                return refuse(
                    ErrorCode::BadRequest,
                    "renewal must keep the certificate's key".into(),
                );
            }
        }
        let lifetime = self.shared.config.runner_cert_validity;
        let issued = match self.shared.ca.issue_runner_cert(csr_pem, &self.identity, lifetime) {
            Ok(i) => i,
            Err(e) => return refuse(ErrorCode::BadRequest, e.to_string()),
        };
        let not_after = issued.validity.not_after.unix_timestamp();
        let serial = issued.serial_hex.clone();
        let id = &self.identity;
        let updated = self
            .shared
            .registry
            .update_runner(&id.tenant, &id.runner, |r| {
                if r.state != RunnerState::Paired {
                    return false;
                }
                r.cert_serial = Some(serial.clone());
                r.cert_not_after = Some(not_after);
                true
            })
            .await;
        match updated {
            Ok(Some(_)) => {
                // From now on only the new certificate passes the handshake.
                let digest = runnel_certs::digest(&issued.cert_der);
                self.shared.index.set_current_cert(&id.runner, &issued.serial_hex, digest);
                let detail = format!("serial {}", issued.serial_hex);
                let actor = format!("runner:{}", id.runner);
                let ev =
                    AuditEvent::now("renewed", actor, Some(&id.tenant), Some(&id.runner), detail);
                self.shared.registry.audit_best_effort(ev).await;
                ServerControl::RenewedCert { cert_pem: issued.cert_pem, not_after_unix: not_after }
            }
            Ok(None) => refuse(ErrorCode::Revoked, "runner is not paired".into()),
            Err(e) => refuse(ErrorCode::Internal, e.to_string()),
        }
    }
}

pub(super) fn outcome_state(o: JobOutcome) -> JobState {
    match o {
        JobOutcome::Succeeded => JobState::Succeeded,
        JobOutcome::Failed => JobState::Failed,
        JobOutcome::Cancelled => JobState::Cancelled,
        JobOutcome::TimedOut => JobState::TimedOut,
        JobOutcome::Rejected => JobState::Rejected,
    }
}

/// Runs one job over its own stream and says how it ended, with the stream's send half
/// when the runner answered (still open: the caller ends it, see [`STREAM_END_DELAY`]).
/// Every step is bounded by the job's run timeout (plus [`RESULT_GRACE`]) and answers
/// cancel, opening the stream and sending the request included: a runner that grants no
/// stream or flow credit cannot keep a job `running`.
async fn drive_job(
    conn: &quinn::Connection,
    job: &JobEntry,
    table: &JobTable,
) -> (Finish, Option<quinn::SendStream>) {
    let lost = |m: String| (Finish::new(JobState::RunnerLost, m), None);
    // One timer for the whole job (reset, never re-registered, per frame).
    let deadline = tokio::time::sleep(job.spec.timeout + RESULT_GRACE);
    tokio::pin!(deadline);
    // Encoded from the entry itself: no copy of the id, kind and payload per job.
    let timeout_ms = job.spec.timeout.as_millis() as u64;
    let request = match job
        .with_payload(|payload| encode_job_request(&job.id, &job.spec.kind, payload, timeout_ms))
    {
        Ok(bytes) => bytes,
        Err(e) => return lost(format!("could not encode job: {e}")),
    };
    let start = async {
        let (mut send, recv) =
            conn.open_bi().await.map_err(|e| format!("could not open job stream: {e}"))?;
        send.write_all(&request).await.map_err(|e| format!("could not send job: {e}"))?;
        Ok::<_, String>((send, recv))
    };
    let (mut send, recv) = tokio::select! {
        started = start => match started {
            Ok(s) => s,
            Err(m) => return lost(m),
        },
        _ = job.cancelled() => {
            let f = Finish::new(JobState::Cancelled, "cancelled before the runner took the job");
            return (f, None);
        }
        _ = &mut deadline => {
            let f = Finish::new(
                JobState::TimedOut,
                "the runner did not take the job stream within the run timeout",
            );
            return (f, None);
        }
    };
    // A stream of frames, so that waiting for the next one is cancel-safe inside select!.
    let frames = futures::stream::unfold(recv, |mut r| async move {
        let next = read_frame::<RunnerJobFrame, _>(&mut r).await;
        Some((next, r))
    });
    tokio::pin!(frames);
    let mut cancel_sent = false;
    loop {
        tokio::select! {
            next = frames.next() => match next {
                Some(Ok(Some(RunnerJobFrame::Output { data, .. }))) => {
                    table.append_output(job, data);
                }
                Some(Ok(Some(RunnerJobFrame::Result(r)))) => {
                    let f = Finish {
                        state: outcome_state(r.outcome),
                        exit_code: r.exit_code,
                        message: r.message,
                        output_truncated: r.output_truncated,
                    };
                    // The runner's end of the stream (its FIN) usually came with the
                    // Result: read it if it is here. A receive half dropped before its end
                    // was read sends the runner a STOP_SENDING (quinn cannot tell a
                    // finished stream from one still missing data), one more frame per
                    // job, and at once, in a datagram of its own (BENCHMARKS.md).
                    let _ = frames.next().now_or_never();
                    return (f, Some(send));
                }
                Some(Ok(None)) | None => return lost("job stream ended without a result".into()),
                Some(Err(FrameError::Io(e))) => return lost(format!("job stream: {e}")),
                Some(Err(FrameError::Truncated)) => return lost("job stream cut mid-frame".into()),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "bad job frame from runner; closing");
                    close(conn, e.code(), "bad job frame");
                    return lost(format!("runner sent a bad frame: {e}"));
                }
            },
            _ = job.cancelled(), if !cancel_sent => {
                cancel_sent = true;
                // Bounded: a runner that grants no flow credit must not hold the cancel.
                let cancel = write_frame(&mut send, &BrokerJobFrame::Cancel);
                let _ = tokio::time::timeout(CANCEL_GRACE, cancel).await;
                let grace = tokio::time::Instant::now() + CANCEL_GRACE;
                if grace < deadline.deadline() {
                    deadline.as_mut().reset(grace);
                }
            }
            _ = &mut deadline => {
                let code = if cancel_sent { ErrorCode::Cancelled } else { ErrorCode::Timeout };
                let _ = send.reset(code.as_u32().into());
                let f = if cancel_sent {
                    Finish::new(JobState::Cancelled, "runner did not confirm the cancel in time")
                } else {
                    Finish::new(JobState::TimedOut, "no result within the run timeout")
                };
                return (f, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Budget;

    fn job(t: &JobTable) -> Arc<JobEntry> {
        t.create("t", crate::jobs::tests::spec(), None).expect("within budget")
    }

    #[tokio::test]
    async fn the_inbox_hands_over_every_job_and_frame_once_and_refuses_after_close() {
        let budget = Budget {
            retention: 10,
            retention_age: Duration::from_secs(60),
            bytes: 1 << 20,
            unfinished: 10,
        };
        let t = JobTable::new(budget);
        let inbox = Inbox::new();
        // Sent before anyone waits: kept, and the wakeup with them.
        let (a, b) = (job(&t), job(&t));
        assert!(inbox.send(a.clone()) && inbox.send(b.clone()));
        let got = inbox.recv().await;
        assert_eq!(
            got.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
            [a.id.clone(), b.id.clone()]
        );
        assert!(got.control.is_empty());
        // Sent while the task waits: it wakes.
        let waiter = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.recv().await })
        };
        tokio::task::yield_now().await;
        let c = job(&t);
        assert!(inbox.send(c.clone()));
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!(got.jobs.len(), 1);
        assert_eq!(got.jobs[0].id, c.id);
        // A control frame alone wakes the task too.
        let waiter = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.recv().await })
        };
        tokio::task::yield_now().await;
        let go = |ms| {
            ServerControl::GoAway(runnel_protocol::GoAway {
                reason: "node draining".into(),
                reconnect_after_ms: ms,
            })
        };
        assert!(inbox.send_control(go(0)));
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert!(got.jobs.is_empty());
        assert!(matches!(got.control[..], [ServerControl::GoAway(_)]));
        // Control frames are bounded (a runner that reads none is not queued for without
        // end), in order, and jobs are not.
        for i in 0..CONTROL_QUEUE {
            assert!(inbox.send_control(go(i as u32)), "frame {i} of {CONTROL_QUEUE}");
        }
        assert!(!inbox.send_control(go(99)), "past CONTROL_QUEUE");
        assert!(inbox.send(a.clone()));
        let got = inbox.recv().await;
        let order: Vec<u32> = got
            .control
            .iter()
            .map(|m| match m {
                ServerControl::GoAway(g) => g.reconnect_after_ms,
                _ => u32::MAX,
            })
            .collect();
        assert_eq!(order, (0..CONTROL_QUEUE as u32).collect::<Vec<_>>());
        assert_eq!(got.jobs.len(), 1);
        // Taken, there is room again.
        assert!(inbox.send_control(go(0)));
        // Gone: the tenant is told, so the job goes elsewhere; frames are refused too.
        drop(InboxGuard(inbox.clone()));
        assert!(!inbox.send(a));
        assert!(!inbox.send_control(go(0)));
    }
}
