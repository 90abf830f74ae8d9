//! TenantActor: one per tenant. Owns that tenant's connected runners and its job queue, so
//! a dispatch for one tenant cannot even name another tenant's runner.
//!
//! The decisions (admit, place, expire, revoke, a finished job) are plain methods on
//! [`TenantState`] that only touch the pool, the queue and the job table, and say which
//! connection should start which job; `handle` matches a message, calls one of them and
//! hands the starts to the connection actors. The unit tests below drive the decisions
//! without any actor or socket.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use runnel_protocol::ErrorCode;

use super::runner_connection::{
    Attach, ConnectionArgs, ConnectionEvent, ConnectionMsg, Inbox, RunnerConnection,
};
use crate::dispatch::{ConnId, Needs, Pool, Slot};
use crate::jobs::{ByJobKey, Finish, JobEntry, JobState};
use crate::records::RunnerState;
use crate::shared::Shared;

/// How often queued jobs are checked against their queue-wait limit.
const QUEUE_TICK: Duration = Duration::from_millis(100);

/// The tenant actor.
#[derive(Debug)]
pub(crate) struct TenantActor;

/// Arguments of [`TenantActor`].
#[derive(Debug)]
pub(crate) struct TenantArgs {
    /// Tenant id.
    pub tenant: String,
    /// Shared state.
    pub shared: Arc<Shared>,
}

/// Why a dispatch was refused (nothing was accepted; the caller gets an error status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DispatchRefusal {
    /// The tenant's queue is full (429).
    QueueFull,
    /// No paired runner of that owner could ever take the job (409); says why.
    NoRunner(String),
    /// The named runner is not this owner's (404).
    UnknownRunner,
}

impl DispatchRefusal {
    /// The API's error code for it, also its `runnel_dispatches_total` outcome.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::NoRunner(_) => "no_runner",
            Self::UnknownRunner => "not_found",
        }
    }
}

/// Messages to [`TenantActor`].
#[derive(Debug)]
pub(crate) enum TenantMsg {
    /// A runner connected.
    Attach(Box<Attach>),
    /// Accept a job (queue it or send it).
    Dispatch(Arc<JobEntry>, RpcReplyPort<Result<(), DispatchRefusal>>),
    /// Something happened on one of this tenant's connections.
    Connection(ConnectionEvent),
    /// A caller cancelled a job.
    Cancel(String),
    /// Close every connection of a runner; replies with how many.
    Revoke(String, RpcReplyPort<usize>),
    /// This node drains: no new job for any connection, and each runner is told to go
    /// away and reconnect after a delay drawn from `[0, window_ms]`.
    GoAway {
        /// The window the reconnect delays are spread over.
        window_ms: u32,
    },
    /// Periodic queue-timeout check.
    Tick,
    /// Make this actor fail (tests of supervision only).
    #[cfg(feature = "fault-injection")]
    Crash,
    /// Keep this actor busy, its mailbox unread, for this long (tests of the callers'
    /// time limits only).
    #[cfg(feature = "fault-injection")]
    Stall(Duration),
    /// Meet this fault in the next dispatch, once it is this actor's to decide (tests of
    /// what its caller hears only).
    #[cfg(feature = "fault-injection")]
    FaultNextDispatch(DispatchFault),
}

/// What [`TenantMsg::FaultNextDispatch`] does to the dispatch the actor takes next.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy)]
pub(crate) enum DispatchFault {
    /// Take this long before deciding (a caller whose time limit passes meanwhile).
    Slow(Duration),
    /// Fail (the actor stops, its supervisor restarts it) before deciding.
    Crash,
}

impl From<ConnectionEvent> for TenantMsg {
    fn from(e: ConnectionEvent) -> Self {
        TenantMsg::Connection(e)
    }
}

impl TryFrom<TenantMsg> for ConnectionEvent {
    type Error = TenantMsg;

    fn try_from(m: TenantMsg) -> Result<Self, TenantMsg> {
        match m {
            TenantMsg::Connection(e) => Ok(e),
            other => Err(other),
        }
    }
}

/// The I/O side of one connection: its actor and its QUIC connection (to close it).
#[derive(Debug)]
struct Link {
    actor: ActorRef<ConnectionMsg>,
    conn: quinn::Connection,
    /// Straight to the connection's I/O task, which runs its jobs.
    inbox: Arc<Inbox>,
}

/// What [`TenantState::place`] did with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    /// Assigned to this connection: the caller sends it there.
    On(ConnId),
    /// Already over (cancelled while queued): nothing to send.
    Settled,
    /// No eligible runner is free now.
    Waiting,
}

/// A job to send to a connection.
type Start = (ConnId, Arc<JobEntry>);

/// State of [`TenantActor`].
pub(crate) struct TenantState {
    tenant: String,
    /// `runnel_queue_depth` for this tenant (its `tenant` label capped), looked up once:
    /// set after every message, it had cost a registry lookup and five allocations each.
    queue_depth: metrics::Gauge,
    shared: Arc<Shared>,
    pool: Pool,
    /// Jobs sent to each connection and not yet done.
    running: HashMap<ConnId, ByJobKey<Arc<JobEntry>>>,
    queue: VecDeque<Arc<JobEntry>>,
    seq: u64,
    links: HashMap<ConnId, Link>,
    by_actor: HashMap<ActorId, ConnId>,
    /// [`TenantMsg::FaultNextDispatch`]'s fault, not yet met.
    #[cfg(feature = "fault-injection")]
    dispatch_fault: Option<DispatchFault>,
}

impl std::fmt::Debug for TenantState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantState")
            .field("tenant", &self.tenant)
            .field("runners", &self.pool.len())
            .field("queued", &self.queue.len())
            .finish()
    }
}

fn needs(job: &JobEntry) -> Needs<'_> {
    Needs {
        owner: &job.spec.owner,
        runner_id: job.spec.runner_id.as_deref(),
        labels: &job.spec.labels,
        kind: &job.spec.kind,
    }
}

// The decisions: no actor, no socket.
impl TenantState {
    fn new(tenant: String, shared: Arc<Shared>) -> Self {
        Self {
            queue_depth: metrics::gauge!(
                crate::metrics::names::QUEUE_DEPTH,
                "tenant" => shared.tenant_labels.label(&tenant)
            ),
            tenant,
            shared,
            pool: Pool::new(),
            running: HashMap::new(),
            queue: VecDeque::new(),
            seq: 0,
            links: HashMap::new(),
            by_actor: HashMap::new(),
            #[cfg(feature = "fault-injection")]
            dispatch_fault: None,
        }
    }

    /// Checks a new job against the tenant's rules before accepting it.
    fn admit(&self, job: &JobEntry) -> Result<(), DispatchRefusal> {
        let spec = &job.spec;
        if let Some(id) = &spec.runner_id {
            let ours = self.shared.index.get(id).is_some_and(|e| {
                e.tenant == self.tenant && e.owner == spec.owner && e.state != RunnerState::Pending
            });
            if !ours {
                return Err(DispatchRefusal::UnknownRunner);
            }
        }
        let needs = needs(job);
        let could =
            self.pool.any_fits(&needs) || self.shared.index.any_could_match(&self.tenant, &needs);
        if !could {
            return Err(DispatchRefusal::NoRunner(format!(
                "owner {:?} has no paired runner that matches this job (kind {:?}, labels {:?})",
                spec.owner, spec.kind, spec.labels
            )));
        }
        if self.queue.len() >= self.shared.config.queue_limit {
            return Err(DispatchRefusal::QueueFull);
        }
        Ok(())
    }

    /// Accepts a job: admits it, then assigns it to a free runner or queues it. Returns the
    /// start to send, if it was assigned at once.
    fn dispatch(&mut self, job: Arc<JobEntry>) -> Result<Option<Start>, DispatchRefusal> {
        self.admit(&job)?;
        Ok(match self.place(&job) {
            Placed::On(conn) => Some((conn, job)),
            Placed::Settled => None,
            Placed::Waiting => {
                self.queue.push_back(job);
                None
            }
        })
    }

    /// Picks the best free runner for `job` and marks the job running on it.
    fn place(&mut self, job: &Arc<JobEntry>) -> Placed {
        if job.is_cancelled() {
            // Cancelled before this actor placed it (its `Cancel` comes after): it ends
            // here, without a runner's slot, a start time or a runner named.
            self.shared
                .jobs
                .finish(job, Finish::new(JobState::Cancelled, "cancelled while queued"));
            return Placed::Settled;
        }
        let Some(conn) = self.pool.pick(&needs(job)) else { return Placed::Waiting };
        let Some(slot) = self.pool.get(conn) else { return Placed::Waiting };
        if !job.mark_running(&slot.runner_id) {
            return Placed::Settled;
        }
        self.seq += 1;
        self.pool.assign(conn, self.seq);
        self.running.entry(conn).or_default().insert(job.key(), job.clone());
        Placed::On(conn)
    }

    /// Assigns queued jobs, oldest first, wherever a runner is free.
    fn drain_queue(&mut self) -> Vec<Start> {
        let mut starts = Vec::new();
        let mut waiting = VecDeque::with_capacity(self.queue.len());
        while let Some(job) = self.queue.pop_front() {
            if job.state().is_terminal() {
                continue;
            }
            match self.place(&job) {
                Placed::On(conn) => starts.push((conn, job)),
                Placed::Settled => {}
                Placed::Waiting => waiting.push_back(job),
            }
        }
        self.queue = waiting;
        starts
    }

    /// Ends queued jobs that waited past their queue-wait limit.
    fn expire_queue(&mut self, now: Instant) {
        let jobs = &self.shared.jobs;
        self.queue.retain(|job| {
            if job.state().is_terminal() {
                return false;
            }
            if now.duration_since(job.accepted) < job.spec.queue_timeout {
                return true;
            }
            jobs.finish(
                job,
                Finish::new(JobState::TimedOut, "no runner became free within the queue timeout"),
            );
            false
        });
    }

    /// A job on `conn` ended: its slot is free again, so queued work may start.
    fn job_done(&mut self, conn: ConnId, job: &JobEntry) -> Vec<Start> {
        let was_there = self.running.get_mut(&conn).is_some_and(|j| j.remove(&job.key()).is_some());
        if was_there {
            // What the end says of the runner: a cancel is the caller's doing, a lost job
            // the connection's or the node's.
            let failed = match job.state() {
                JobState::Failed | JobState::Rejected | JobState::TimedOut => Some(true),
                JobState::Succeeded => Some(false),
                _ => None,
            };
            self.pool.release(conn, failed);
        }
        self.drain_queue()
    }

    /// Ends a queued job as cancelled; running jobs see the cancel token on their stream.
    fn cancel_queued(&mut self, job_id: &str) {
        if let Some(job) =
            self.queue.iter().position(|j| j.id == job_id).and_then(|pos| self.queue.remove(pos))
        {
            self.shared
                .jobs
                .finish(&job, Finish::new(JobState::Cancelled, "cancelled while queued"));
        }
    }

    /// Adds a connection's slot to the pool; queued work may start on it.
    fn add_conn(&mut self, conn: ConnId, slot: Slot) -> Vec<Start> {
        self.pool.insert(conn, slot);
        self.drain_queue()
    }

    /// Removes a connection from the pool; its unfinished jobs are lost with it.
    fn remove_conn(&mut self, conn: ConnId, why: &str) {
        self.pool.remove(conn);
        for job in self.running.remove(&conn).unwrap_or_default().values() {
            self.shared.jobs.finish(job, Finish::new(JobState::RunnerLost, why));
        }
    }

    /// One live session per runner, the newest wins: takes the runner's older connections
    /// out of the pool (their jobs end `runner_lost`) and returns them, to be closed
    /// `replaced`. Newest wins because a runner whose NAT mapping changed reconnects
    /// before the broker has noticed that the old path died.
    fn supersede(&mut self, runner_id: &str) -> Vec<ConnId> {
        let conns = self.pool.conns_of(runner_id);
        for c in &conns {
            self.remove_conn(*c, "replaced by a newer session of the same runner");
        }
        conns
    }

    /// Takes every connection of a revoked runner out of the pool (its jobs end
    /// `runner_lost`); returns them so the caller closes them.
    fn revoke(&mut self, runner_id: &str) -> Vec<ConnId> {
        let conns = self.pool.conns_of(runner_id);
        for c in &conns {
            self.remove_conn(*c, "runner revoked");
        }
        conns
    }
}

// The I/O side: connection actors and their QUIC connections.
impl TenantState {
    /// Sends each job to its connection's actor; when that actor is gone the connection
    /// leaves the pool and its jobs end `runner_lost` at once.
    fn start(&mut self, starts: impl IntoIterator<Item = Start>) {
        // No list for the usual one job that is sent: one only for the retries.
        let mut retry = self.send_each(starts);
        while !retry.is_empty() {
            retry = self.send_each(retry);
        }
    }

    /// Hands each job to its connection's I/O task; answers the jobs that then go elsewhere.
    fn send_each(&mut self, starts: impl IntoIterator<Item = Start>) -> Vec<Start> {
        let mut retry = Vec::new();
        for (conn, job) in starts {
            let sent = self.links.get(&conn).is_some_and(|l| l.inbox.send(job));
            if !sent {
                // The connection's actor is gone (its exit not yet seen): take the
                // connection out now, so nothing else is placed on it. Its jobs, this
                // one included, end `runner_lost`; queued work may go elsewhere.
                self.remove_conn(conn, "runner connection gone");
                self.forget_link(conn);
                retry.extend(self.drain_queue());
            }
        }
        retry
    }

    fn close(&self, conn: ConnId, code: ErrorCode, reason: &str) {
        if let Some(l) = self.links.get(&conn) {
            l.conn.close(code.as_u32().into(), reason.as_bytes());
        }
    }

    fn forget_link(&mut self, conn: ConnId) {
        if let Some(l) = self.links.remove(&conn) {
            self.by_actor.remove(&l.actor.get_id());
        }
    }

    async fn attach(&mut self, myself: &ActorRef<TenantMsg>, a: Attach) {
        let id = &a.identity;
        // Serialised with Revoke by this mailbox: a runner revoked after its handshake but
        // before this point is turned away here.
        if self.shared.index.check(&id.runner, &id.tenant, &id.owner).is_err() {
            a.conn.close(ErrorCode::Revoked.as_u32().into(), b"revoked");
            return;
        }
        let replaced = self.supersede(&id.runner);
        for c in &replaced {
            self.close(*c, ErrorCode::Replaced, "replaced by a newer session");
            self.forget_link(*c);
        }
        if !replaced.is_empty() {
            metrics::counter!(crate::metrics::names::SESSIONS_REPLACED)
                .increment(replaced.len() as u64);
            tracing::info!(runner = %id.runner, remote = %a.conn.remote_address(), "newer session replaces the old one");
            let detail = format!(
                "session from {} replaced {} older one(s)",
                a.conn.remote_address(),
                replaced.len()
            );
            let ev = crate::records::AuditEvent::now(
                "replaced",
                format!("runner:{}", id.runner),
                Some(&id.tenant),
                Some(&id.runner),
                detail,
            );
            self.shared.registry.audit_best_effort(ev).await;
        }
        let record_labels = self.shared.index.get(&id.runner).map(|e| e.labels).unwrap_or_default();
        let mut labels = a.hello.labels.clone();
        labels.extend(record_labels);
        let conn_id = self.shared.next_conn_id();
        let slot = Slot {
            runner_id: id.runner.as_str().into(),
            owner: id.owner.clone(),
            labels,
            kinds: a.hello.kinds.clone(),
            capacity: a.hello.capacity,
            in_flight: 0,
            draining: false,
            last_assigned: 0,
            last_failed: false,
        };
        let conn = a.conn.clone();
        let inbox = Inbox::new();
        let args = ConnectionArgs {
            conn_id,
            attach: a,
            tenant: myself.get_derived(),
            shared: self.shared.clone(),
            inbox: inbox.clone(),
        };
        match Actor::spawn_linked(None, RunnerConnection, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.by_actor.insert(actor.get_id(), conn_id);
                self.links.insert(conn_id, Link { actor, conn, inbox });
                let starts = self.add_conn(conn_id, slot);
                self.start(starts);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not start runner connection actor");
                conn.close(ErrorCode::Internal.as_u32().into(), b"internal error");
            }
        }
    }
}

impl Actor for TenantActor {
    type Msg = TenantMsg;
    type State = TenantState;
    type Arguments = TenantArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: TenantArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(QUEUE_TICK, || TenantMsg::Tick);
        Ok(TenantState::new(args.tenant, args.shared))
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: TenantMsg,
        state: &mut TenantState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TenantMsg::Attach(a) => state.attach(&myself, *a).await,
            // A caller that stopped waiting (its time limit passed while this actor was
            // busy) has answered 503 and discarded the job: it must not run. Once taken,
            // its caller waits for this verdict, however long the limit was.
            TenantMsg::Dispatch(job, _) if !job.take_dispatch() => {}
            TenantMsg::Dispatch(job, reply) => {
                #[cfg(feature = "fault-injection")]
                match state.dispatch_fault.take() {
                    Some(DispatchFault::Slow(d)) => tokio::time::sleep(d).await,
                    Some(DispatchFault::Crash) => return Err("fault injected in a dispatch".into()),
                    None => {}
                }
                let verdict = state.dispatch(job.clone());
                if let Err(refusal) = &verdict {
                    // A refused job leaves the table, and is counted, here, before its
                    // caller hears: the caller may be gone (its client hung up).
                    state.shared.jobs.discard(&job);
                    crate::metrics::dispatch_outcome(refusal.code());
                }
                let _ = reply.send(verdict.as_ref().map(|_| ()).map_err(Clone::clone));
                // An accepted job runs even when its caller is gone: as if its client had
                // hung up a moment after the answer.
                if let Ok(start) = verdict {
                    state.start(start);
                }
            }
            TenantMsg::Connection(ConnectionEvent::JobDone { conn, job }) => {
                let starts = state.job_done(conn, &job);
                state.start(starts);
            }
            TenantMsg::Connection(ConnectionEvent::Draining(conn)) => state.pool.drain(conn),
            TenantMsg::Cancel(job_id) => state.cancel_queued(&job_id),
            TenantMsg::Revoke(runner_id, reply) => {
                let conns = state.revoke(&runner_id);
                for c in &conns {
                    state.close(*c, ErrorCode::Revoked, "revoked");
                    state.forget_link(*c);
                }
                let _ = reply.send(conns.len());
            }
            TenantMsg::GoAway { window_ms } => {
                use rand::Rng;
                let mut rng = rand::rng();
                for (conn, link) in &state.links {
                    state.pool.drain(*conn);
                    let _ = link.actor.cast(ConnectionMsg::GoAway(rng.random_range(0..=window_ms)));
                }
            }
            TenantMsg::Tick => state.expire_queue(Instant::now()),
            #[cfg(feature = "fault-injection")]
            TenantMsg::Crash => return Err("fault injected".into()),
            #[cfg(feature = "fault-injection")]
            TenantMsg::Stall(d) => tokio::time::sleep(d).await,
            #[cfg(feature = "fault-injection")]
            TenantMsg::FaultNextDispatch(f) => state.dispatch_fault = Some(f),
        }
        state.queue_depth.set(state.queue.len() as f64);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut TenantState,
    ) -> Result<(), ActorProcessingErr> {
        // Overrides ractor's default of stopping when a child exits: a lost runner is
        // routine, the tenant keeps serving its other runners.
        let (cell, why) = match evt {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "runner disconnected".into()))
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                (cell, format!("runner connection failed: {err}"))
            }
            _ => return Ok(()),
        };
        if let Some(conn) = state.by_actor.get(&cell.get_id()).copied() {
            state.forget_link(conn);
            state.remove_conn(conn, &why);
            let starts = state.drain_queue();
            state.start(starts);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut TenantState,
    ) -> Result<(), ActorProcessingErr> {
        myself.stop_children(Some("tenant stopping".into()));
        for job in state.queue.drain(..) {
            state.shared.jobs.finish(&job, Finish::new(JobState::Failed, "broker shutting down"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use runnel_certs::ClusterCa;

    use super::*;
    use crate::config::Config;
    use crate::index::{Advertised, RunnerIndex};
    use crate::jobs::JobSpec;
    use crate::records::{Registry, RunnerRecord};
    use crate::store::RedbStore;

    /// A tenant state on a real (temporary) redb store, with `queue_limit`.
    fn state(dir: &tempfile::TempDir, queue_limit: usize) -> TenantState {
        let config = Config { queue_limit, ..Config::loopback(dir.path()) };
        let store = Arc::new(RedbStore::open(&dir.path().join("runnel.redb")).expect("store"));
        let shared = Shared::new(
            config,
            Registry::new(store),
            Arc::new(RunnerIndex::new()),
            ClusterCa::generate("runnel").expect("ca"),
            "127.0.0.1:7443".into(),
            None,
            None,
        );
        TenantState::new("t".into(), Arc::new(shared))
    }

    fn pair(s: &TenantState, tenant: &str, owner: &str, runner: &str, kinds: Option<&[&str]>) {
        s.shared.index.apply(&RunnerRecord {
            id: runner.into(),
            tenant: tenant.into(),
            owner: owner.into(),
            name: runner.into(),
            labels: BTreeMap::new(),
            state: RunnerState::Paired,
            created_at: 0,
            enrolled_at: Some(0),
            revoked_at: None,
            cert_serial: None,
            cert_not_after: None,
            last_seen: None,
        });
        if let Some(kinds) = kinds {
            let kinds = kinds.iter().map(|k| k.to_string()).collect();
            s.shared.index.update_presence(runner, |e| {
                e.advertised = Some(Advertised { labels: BTreeMap::new(), kinds })
            });
        }
    }

    fn slot(runner: &str, owner: &str, capacity: u32) -> Slot {
        Slot {
            runner_id: runner.into(),
            owner: owner.into(),
            labels: BTreeMap::new(),
            kinds: vec!["exec".into()],
            capacity,
            in_flight: 0,
            draining: false,
            last_assigned: 0,
            last_failed: false,
        }
    }

    fn job(s: &TenantState, owner: &str, kind: &str, runner: Option<&str>) -> Arc<JobEntry> {
        s.shared
            .jobs
            .create(
                "t",
                JobSpec {
                    owner: owner.into(),
                    runner_id: runner.map(str::to_owned),
                    labels: BTreeMap::new(),
                    kind: kind.into(),
                    payload: Vec::new(),
                    timeout: Duration::from_secs(60),
                    queue_timeout: Duration::from_millis(200),
                },
                None,
            )
            .expect("within the budget")
    }

    #[test]
    fn admit_refuses_what_no_runner_of_the_owner_could_ever_take() {
        let dir = tempfile::tempdir().expect("dir");
        let s = state(&dir, 10);
        // No runner at all.
        let no = s.admit(&job(&s, "alice", "exec", None));
        assert!(matches!(no, Err(DispatchRefusal::NoRunner(_))), "{no:?}");
        // Another tenant's runner with the same owner name does not count.
        pair(&s, "other", "alice", "r-other", None);
        assert!(matches!(
            s.admit(&job(&s, "alice", "exec", None)),
            Err(DispatchRefusal::NoRunner(_))
        ));
        assert_eq!(
            s.admit(&job(&s, "alice", "exec", Some("r-other"))),
            Err(DispatchRefusal::UnknownRunner)
        );
        // A paired runner never seen since start may serve anything.
        pair(&s, "t", "alice", "r1", None);
        assert_eq!(s.admit(&job(&s, "alice", "gpu", None)), Ok(()));
        // Once it said Hello with only `exec`, a `gpu` job is refused at once, naming it.
        pair(&s, "t", "alice", "r1", Some(&["exec"]));
        assert_eq!(s.admit(&job(&s, "alice", "exec", None)), Ok(()));
        match s.admit(&job(&s, "alice", "gpu", None)) {
            Err(DispatchRefusal::NoRunner(why)) => assert!(why.contains("\"gpu\""), "{why}"),
            other => panic!("expected no_runner, got {other:?}"),
        }
        // Bob's job cannot use alice's runner, not even by naming it.
        assert!(matches!(
            s.admit(&job(&s, "bob", "exec", None)),
            Err(DispatchRefusal::NoRunner(_))
        ));
        assert_eq!(
            s.admit(&job(&s, "bob", "exec", Some("r1"))),
            Err(DispatchRefusal::UnknownRunner)
        );
    }

    #[test]
    fn a_full_queue_refuses_and_accepts_again_once_it_drains() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = state(&dir, 2);
        pair(&s, "t", "alice", "r1", None);
        for _ in 0..2 {
            assert_eq!(s.dispatch(job(&s, "alice", "exec", None)).map(|x| x.is_some()), Ok(false));
        }
        assert_eq!(
            s.dispatch(job(&s, "alice", "exec", None)).err(),
            Some(DispatchRefusal::QueueFull)
        );
        // A runner arrives: both queued jobs go to it (capacity 2), the queue has room again.
        let starts = s.add_conn(1, slot("r1", "alice", 2));
        assert_eq!(starts.len(), 2);
        assert!(starts.iter().all(|(c, j)| *c == 1 && j.state() == JobState::Running));
        assert!(s.dispatch(job(&s, "alice", "exec", None)).is_ok());
    }

    /// Alice's runners r1 (connection 1) and r2 (connection 2), one job at a time each.
    fn two_runners(dir: &tempfile::TempDir) -> TenantState {
        let mut s = state(dir, 10);
        pair(&s, "t", "alice", "r1", None);
        pair(&s, "t", "alice", "r2", None);
        assert!(s.add_conn(1, slot("r1", "alice", 1)).is_empty());
        assert!(s.add_conn(2, slot("r2", "alice", 1)).is_empty());
        s
    }

    #[test]
    fn place_prefers_the_least_loaded_runner_and_waits_when_all_are_busy() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = two_runners(&dir);
        let (a, b, c) = (
            job(&s, "alice", "exec", None),
            job(&s, "alice", "exec", None),
            job(&s, "alice", "exec", None),
        );
        let first = s.dispatch(a.clone()).expect("admit").expect("started").0;
        let second = s.dispatch(b).expect("admit").expect("started").0;
        assert_ne!(first, second, "the idle runner is preferred");
        assert_eq!(s.dispatch(c.clone()).expect("admit").map(|x| x.0), None, "both busy: queued");
        assert_eq!(c.state(), JobState::Queued);
        // The first job ends: the queued one starts on the runner it freed.
        let starts = s.job_done(first, &a);
        assert_eq!(
            starts.iter().map(|(c, j)| (*c, j.id.clone())).collect::<Vec<_>>(),
            [(first, c.id.clone())]
        );
        // A second JobDone for the same job frees nothing (no double release).
        assert!(s.job_done(first, &a).is_empty());
        assert_eq!(s.pool.get(first).map(|x| x.in_flight), Some(1));
    }

    #[test]
    fn a_runner_whose_job_failed_goes_behind_its_equals_and_a_cancel_says_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = two_runners(&dir);
        let start = |s: &mut TenantState| {
            let j = job(s, "alice", "exec", None);
            let conn = s.dispatch(j.clone()).expect("admit").expect("started").0;
            (conn, j)
        };
        let end = |s: &mut TenantState, (conn, j): (ConnId, Arc<JobEntry>), state: JobState| {
            s.shared.jobs.finish(&j, Finish::new(state, "test"));
            assert!(s.job_done(conn, &j).is_empty());
            conn
        };
        let one = start(&mut s);
        let first = end(&mut s, one, JobState::Succeeded);
        let again = start(&mut s);
        assert_eq!(end(&mut s, again, JobState::Succeeded), first, "the most recent again");
        for failure in [JobState::Failed, JobState::Rejected, JobState::TimedOut] {
            let on_first = start(&mut s);
            assert_eq!(end(&mut s, on_first, failure), first);
            let next = start(&mut s);
            let other = end(&mut s, next, JobState::Succeeded);
            assert_ne!(other, first, "after {failure:?} it went behind");
            // With the other busy it still takes work (fewest in flight comes first), and
            // a success puts it back in front: it is the most recent again.
            let busy = start(&mut s);
            let back = start(&mut s);
            assert_eq!(end(&mut s, back, JobState::Succeeded), first);
            end(&mut s, busy, JobState::Succeeded);
            let next = start(&mut s);
            assert_eq!(end(&mut s, next, JobState::Succeeded), first, "back in front");
        }
        // The first runner fails; then, with the other busy, one of its jobs is cancelled.
        // A cancel is the caller's doing: the runner stays behind its equals.
        let on_first = start(&mut s);
        end(&mut s, on_first, JobState::Failed);
        let busy = start(&mut s);
        assert_ne!(busy.0, first);
        let cancelled = start(&mut s);
        assert_eq!(end(&mut s, cancelled, JobState::Cancelled), first);
        assert!(s.pool.get(first).is_some_and(|r| r.last_failed), "still behind");
        end(&mut s, busy, JobState::Succeeded);
        let next = start(&mut s);
        assert_ne!(end(&mut s, next, JobState::Succeeded), first);
    }

    #[test]
    fn expire_queue_times_out_only_jobs_past_their_queue_limit() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = state(&dir, 10);
        pair(&s, "t", "alice", "r1", None);
        let old = job(&s, "alice", "exec", None);
        s.dispatch(old.clone()).expect("admit");
        s.expire_queue(old.accepted + Duration::from_millis(100));
        assert_eq!(old.state(), JobState::Queued, "inside its 200 ms queue limit");
        s.expire_queue(old.accepted + Duration::from_millis(250));
        assert_eq!(old.state(), JobState::TimedOut);
        assert!(s.queue.is_empty());
        // A job cancelled while queued is cancelled, and leaves the queue.
        let c = job(&s, "alice", "exec", None);
        s.dispatch(c.clone()).expect("admit");
        s.cancel_queued(&c.id);
        assert_eq!(c.state(), JobState::Cancelled);
        assert!(s.queue.is_empty());
    }

    #[test]
    fn a_newer_session_supersedes_only_that_runners_older_ones() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = state(&dir, 10);
        pair(&s, "t", "alice", "r1", None);
        pair(&s, "t", "alice", "r2", None);
        s.add_conn(1, slot("r1", "alice", 1));
        s.add_conn(2, slot("r2", "alice", 1));
        let a = job(&s, "alice", "exec", Some("r1"));
        s.dispatch(a.clone()).expect("admit");
        assert_eq!(s.supersede("r1"), vec![1]);
        assert_eq!(a.state(), JobState::RunnerLost);
        assert!(s.pool.get(1).is_none() && s.pool.get(2).is_some());
        s.add_conn(3, slot("r1", "alice", 1));
        assert!(s.supersede("r9").is_empty());
        assert_eq!(s.supersede("r1"), vec![3]);
    }

    #[test]
    fn revoke_takes_only_that_runners_connections_and_loses_their_jobs() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = state(&dir, 10);
        pair(&s, "t", "alice", "r1", None);
        pair(&s, "t", "alice", "r2", None);
        s.add_conn(1, slot("r1", "alice", 1));
        s.add_conn(2, slot("r2", "alice", 1));
        let (a, b) = (job(&s, "alice", "exec", Some("r1")), job(&s, "alice", "exec", Some("r2")));
        s.dispatch(a.clone()).expect("admit");
        s.dispatch(b.clone()).expect("admit");
        assert_eq!(s.revoke("r1"), vec![1]);
        assert_eq!(a.state(), JobState::RunnerLost);
        assert_eq!(b.state(), JobState::Running, "the other runner's job is untouched");
        assert!(s.pool.get(1).is_none() && s.pool.get(2).is_some());
        assert!(s.revoke("r1").is_empty(), "revoking again closes nothing");
    }
}
