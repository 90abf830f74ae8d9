//! TenantActor: one per tenant. Owns that tenant's connected runners and its job queue, so
//! a dispatch for one tenant cannot even name another tenant's runner.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use runnel_certs::RunnerIdentity;
use runnel_protocol::{ErrorCode, Hello};

use super::runner_connection::{ConnectionArgs, ConnectionMsg, RunnerConnection};
use crate::dispatch::{ConnId, Needs, Pool, Slot};
use crate::jobs::{Finish, JobEntry, JobState};
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

/// A connection whose handshake and Hello are done, handed over by the accept loop.
#[derive(Debug)]
pub(crate) struct Attach {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// Identity from the verified certificate.
    pub identity: RunnerIdentity,
    /// The runner's Hello.
    pub hello: Hello,
    /// Negotiated protocol version.
    pub version: u16,
    /// The control stream.
    pub control: (quinn::SendStream, quinn::RecvStream),
}

/// Why a dispatch was refused (nothing was accepted; the caller gets an error status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DispatchRefusal {
    /// The tenant's queue is full (429).
    QueueFull,
    /// No paired runner of that owner could ever take the job (409).
    NoRunner(String),
    /// The named runner is not this owner's (404).
    UnknownRunner,
}

/// Messages to [`TenantActor`].
#[derive(Debug)]
pub(crate) enum TenantMsg {
    /// A runner connected.
    Attach(Box<Attach>),
    /// Accept a job (queue it or send it).
    Dispatch(Arc<JobEntry>, RpcReplyPort<Result<(), DispatchRefusal>>),
    /// A job on a connection ended.
    JobDone {
        /// The connection.
        conn: ConnId,
        /// The job.
        job_id: String,
    },
    /// A caller cancelled a job.
    Cancel(String),
    /// A runner asked for no new work.
    Draining(ConnId),
    /// Close every connection of a runner; replies with how many.
    Revoke(String, RpcReplyPort<usize>),
    /// Periodic queue-timeout check.
    Tick,
    /// Make this actor fail (tests of supervision only).
    #[cfg(feature = "fault-injection")]
    Crash,
}

struct Live {
    actor: ActorRef<ConnectionMsg>,
    conn: quinn::Connection,
    jobs: HashMap<String, Arc<JobEntry>>,
}

/// State of [`TenantActor`].
pub(crate) struct TenantState {
    tenant: String,
    /// This tenant's value of the `tenant` metric label (capped).
    label: String,
    shared: Arc<Shared>,
    pool: Pool,
    live: HashMap<ConnId, Live>,
    by_actor: HashMap<ActorId, ConnId>,
    queue: VecDeque<Arc<JobEntry>>,
    seq: u64,
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

impl TenantState {
    fn needs(job: &JobEntry) -> Needs<'_> {
        Needs {
            owner: &job.spec.owner,
            runner_id: job.spec.runner_id.as_deref(),
            labels: &job.spec.labels,
            kind: &job.spec.kind,
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
        let online_fit = self.pool.any_fits(&Self::needs(job));
        let could = online_fit
            || self.shared.index.any_could_match(
                &self.tenant,
                &spec.owner,
                spec.runner_id.as_deref(),
                &spec.labels,
            );
        if !could {
            return Err(DispatchRefusal::NoRunner(format!(
                "owner {:?} has no paired runner that matches this job",
                spec.owner
            )));
        }
        if self.queue.len() >= self.shared.config.queue_limit {
            return Err(DispatchRefusal::QueueFull);
        }
        Ok(())
    }

    /// Sends `job` to the best free runner; false when none is free now.
    fn try_assign(&mut self, job: &Arc<JobEntry>) -> bool {
        let Some(conn) = self.pool.pick(&Self::needs(job)) else { return false };
        let (Some(slot), Some(live)) = (self.pool.get(conn), self.live.get_mut(&conn)) else {
            return false;
        };
        if !job.mark_running(&slot.runner_id) {
            // Cancelled or finished while queued: nothing to send, but it is handled.
            return true;
        }
        self.seq += 1;
        self.pool.assign(conn, self.seq);
        live.jobs.insert(job.id.clone(), job.clone());
        if live.actor.cast(ConnectionMsg::StartJob(job.clone())).is_err() {
            live.jobs.remove(&job.id);
            self.shared
                .jobs
                .finish(job, Finish::new(JobState::RunnerLost, "runner connection gone"));
        }
        true
    }

    /// Assigns queued jobs, oldest first, wherever a runner is free.
    fn drain_queue(&mut self) {
        let mut waiting = VecDeque::with_capacity(self.queue.len());
        while let Some(job) = self.queue.pop_front() {
            if job.state().is_terminal() || self.try_assign(&job) {
                continue;
            }
            waiting.push_back(job);
        }
        self.queue = waiting;
    }

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

    /// Removes a connection from the pool; its unfinished jobs are lost with it.
    fn remove_conn(&mut self, conn: ConnId, why: &str) {
        self.pool.remove(conn);
        if let Some(live) = self.live.remove(&conn) {
            self.by_actor.remove(&live.actor.get_id());
            for job in live.jobs.values() {
                self.shared.jobs.finish(job, Finish::new(JobState::RunnerLost, why));
            }
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
        let record_labels = self.shared.index.get(&id.runner).map(|e| e.labels).unwrap_or_default();
        let mut labels = a.hello.labels.clone();
        labels.extend(record_labels);
        let conn_id = self.shared.next_conn_id();
        let slot = Slot {
            runner_id: id.runner.clone(),
            owner: id.owner.clone(),
            labels,
            kinds: a.hello.kinds.clone(),
            capacity: a.hello.capacity,
            in_flight: 0,
            draining: false,
            last_assigned: 0,
        };
        let conn = a.conn.clone();
        let args = ConnectionArgs {
            conn_id,
            attach: a,
            tenant: myself.clone(),
            shared: self.shared.clone(),
        };
        match Actor::spawn_linked(None, RunnerConnection, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.by_actor.insert(actor.get_id(), conn_id);
                self.live.insert(conn_id, Live { actor, conn, jobs: HashMap::new() });
                self.pool.insert(conn_id, slot);
                self.drain_queue();
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
        let label = args.shared.tenant_labels.label(&args.tenant);
        Ok(TenantState {
            label,
            tenant: args.tenant,
            shared: args.shared,
            pool: Pool::new(),
            live: HashMap::new(),
            by_actor: HashMap::new(),
            queue: VecDeque::new(),
            seq: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: TenantMsg,
        state: &mut TenantState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TenantMsg::Attach(a) => state.attach(&myself, *a).await,
            TenantMsg::Dispatch(job, reply) => {
                let verdict = state.admit(&job);
                if verdict.is_ok() && !state.try_assign(&job) {
                    state.queue.push_back(job);
                }
                let _ = reply.send(verdict);
            }
            TenantMsg::JobDone { conn, job_id } => {
                if let Some(live) = state.live.get_mut(&conn) {
                    live.jobs.remove(&job_id);
                }
                state.pool.release(conn);
                state.drain_queue();
            }
            TenantMsg::Cancel(job_id) => {
                // Running jobs see the cancel token on their stream; queued ones end here.
                if let Some(job) = state
                    .queue
                    .iter()
                    .position(|j| j.id == job_id)
                    .and_then(|pos| state.queue.remove(pos))
                {
                    let f = Finish::new(JobState::Cancelled, "cancelled while queued");
                    state.shared.jobs.finish(&job, f);
                }
            }
            TenantMsg::Draining(conn) => {
                state.pool.drain(conn);
            }
            TenantMsg::Revoke(runner_id, reply) => {
                let conns = state.pool.conns_of(&runner_id);
                for c in &conns {
                    if let Some(live) = state.live.get(c) {
                        live.conn.close(ErrorCode::Revoked.as_u32().into(), b"revoked");
                    }
                    state.remove_conn(*c, "runner revoked");
                }
                let _ = reply.send(conns.len());
            }
            TenantMsg::Tick => {
                state.expire_queue(Instant::now());
            }
            #[cfg(feature = "fault-injection")]
            TenantMsg::Crash => return Err("fault injected".into()),
        }
        metrics::gauge!(crate::metrics::names::QUEUE_DEPTH, "tenant" => state.label.clone())
            .set(state.queue.len() as f64);
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
        if let Some(conn) = state.by_actor.remove(&cell.get_id()) {
            state.remove_conn(conn, &why);
            state.drain_queue();
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
