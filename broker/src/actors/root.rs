//! BrokerRoot: spawns TenantActors on demand and restarts the ones that fail; and
//! [`Tenants`], the typed directory (tenant → `ActorRef<TenantMsg>`) it keeps, through which
//! the API and the accept loop find a tenant's actor.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::tenant::{TenantActor, TenantArgs, TenantMsg};
use crate::jobs::{Finish, JobState};
use crate::shared::{ACTOR_CALL_TIMEOUT, Shared};

/// How long the root waits for tenant actors to stop.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Why a tenant's actor could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TenantUnavailable {
    /// The actor tree has not started yet.
    #[error("broker is starting")]
    Starting,
    /// The root did not answer within [`ACTOR_CALL_TIMEOUT`].
    #[error("root actor did not answer in time")]
    Timeout,
    /// The root is gone (the broker is stopping).
    #[error("root actor unavailable: {0}")]
    RootGone(String),
    /// Spawning the tenant's actor failed.
    #[error("spawning tenant actor: {0}")]
    Spawn(#[from] ractor::SpawnErr),
}

/// The typed directory of tenant actors: found without downcasting untyped cells, spawned
/// only by the root (so never twice for one tenant).
#[derive(Debug, Default)]
pub(crate) struct Tenants {
    map: DashMap<String, ActorRef<TenantMsg>>,
    root: OnceLock<ActorRef<RootMsg>>,
}

impl Tenants {
    /// An empty directory with no root yet.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records the root, once, when the tree has started.
    pub(crate) fn set_root(&self, root: ActorRef<RootMsg>) {
        let _ = self.root.set(root);
    }

    /// Whether the actor tree is up.
    pub(crate) fn started(&self) -> bool {
        self.root.get().is_some()
    }

    /// The tenants whose actors run now.
    pub(crate) fn running(&self) -> Vec<String> {
        self.map.iter().map(|e| e.key().clone()).collect()
    }

    /// The tenant's actor if it runs now (never spawns one).
    pub(crate) fn get(&self, tenant: &str) -> Option<ActorRef<TenantMsg>> {
        self.map.get(tenant).map(|a| a.clone())
    }

    /// The tenant's actor, spawned on first use (through the root, so never twice).
    pub(crate) async fn actor(
        &self,
        tenant: &str,
    ) -> Result<ActorRef<TenantMsg>, TenantUnavailable> {
        if let Some(a) = self.get(tenant) {
            return Ok(a);
        }
        let root = self.root.get().ok_or(TenantUnavailable::Starting)?;
        let t = tenant.to_owned();
        match root.call(|reply| RootMsg::Tenant(t, reply), Some(ACTOR_CALL_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            Ok(_) => Err(TenantUnavailable::Timeout),
            Err(e) => Err(TenantUnavailable::RootGone(e.to_string())),
        }
    }
}

/// The root actor.
#[derive(Debug)]
pub(crate) struct BrokerRoot;

/// Arguments of [`BrokerRoot`].
#[derive(Debug)]
pub(crate) struct RootArgs {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// The directory this root keeps.
    pub tenants: Arc<Tenants>,
}

/// Messages to [`BrokerRoot`].
#[derive(Debug)]
pub(crate) enum RootMsg {
    /// Find or spawn the actor of a tenant.
    Tenant(String, RpcReplyPort<Result<ActorRef<TenantMsg>, TenantUnavailable>>),
}

/// State of [`BrokerRoot`].
#[derive(Debug)]
pub(crate) struct RootState {
    shared: Arc<Shared>,
    tenants: Arc<Tenants>,
    by_actor: HashMap<ActorId, String>,
}

impl RootState {
    async fn spawn_tenant(
        &mut self,
        myself: &ActorRef<RootMsg>,
        tenant: &str,
    ) -> Result<ActorRef<TenantMsg>, TenantUnavailable> {
        let args = TenantArgs { tenant: tenant.to_owned(), shared: self.shared.clone() };
        let (actor, _) = Actor::spawn_linked(None, TenantActor, args, myself.get_cell()).await?;
        self.by_actor.insert(actor.get_id(), tenant.to_owned());
        self.tenants.map.insert(tenant.to_owned(), actor.clone());
        Ok(actor)
    }
}

impl Actor for BrokerRoot {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: RootArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(RootState { shared: args.shared, tenants: args.tenants, by_actor: HashMap::new() })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: RootMsg,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Tenant(tenant, reply) => {
                let found = state.tenants.get(&tenant);
                let result = match found {
                    Some(a) => Ok(a),
                    None => state.spawn_tenant(&myself, &tenant).await,
                };
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        _state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        myself.stop_children_and_wait(Some("broker stopping".into()), Some(SHUTDOWN_WAIT)).await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(tenant) = state.by_actor.remove(&cell.get_id()) else { return Ok(()) };
                tracing::error!(%tenant, error = %err, "tenant actor failed; restarting it");
                state.tenants.map.remove(&tenant);
                // Its connections can no longer be served: close them (runners reconnect
                // with backoff to the new actor) and settle every job it held.
                cell.stop_children(Some("tenant actor restarted".into()));
                for job in state.shared.jobs.unfinished(&tenant) {
                    let f = if job.state() == JobState::Running {
                        Finish::new(JobState::RunnerLost, "tenant actor restarted")
                    } else {
                        Finish::new(JobState::Failed, "tenant actor restarted before dispatch")
                    };
                    state.shared.jobs.finish(&job, f);
                }
                if let Err(e) = state.spawn_tenant(&myself, &tenant).await {
                    tracing::error!(%tenant, error = %e, "could not restart tenant actor");
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(tenant) = state.by_actor.remove(&cell.get_id()) {
                    state.tenants.map.remove(&tenant);
                }
            }
            _ => {}
        }
        Ok(())
    }
}
