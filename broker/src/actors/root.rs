//! BrokerRoot: spawns TenantActors on demand and restarts the ones that fail.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::tenant::{TenantActor, TenantArgs, TenantMsg};
use crate::jobs::{Finish, JobState};
use crate::shared::Shared;

/// How long the root waits for tenant actors to stop.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The root actor.
#[derive(Debug)]
pub(crate) struct BrokerRoot;

/// Arguments of [`BrokerRoot`].
#[derive(Debug)]
pub(crate) struct RootArgs {
    /// Shared state.
    pub shared: Arc<Shared>,
}

/// Messages to [`BrokerRoot`].
#[derive(Debug)]
pub(crate) enum RootMsg {
    /// Find or spawn the actor of a tenant.
    Tenant(String, RpcReplyPort<Result<ActorRef<TenantMsg>, String>>),
}

/// State of [`BrokerRoot`].
#[derive(Debug)]
pub(crate) struct RootState {
    shared: Arc<Shared>,
    by_actor: HashMap<ActorId, String>,
}

impl RootState {
    async fn spawn_tenant(
        &mut self,
        myself: &ActorRef<RootMsg>,
        tenant: &str,
    ) -> Result<ActorRef<TenantMsg>, String> {
        let args = TenantArgs { tenant: tenant.to_owned(), shared: self.shared.clone() };
        let (actor, _) = Actor::spawn_linked(None, TenantActor, args, myself.get_cell())
            .await
            .map_err(|e| format!("spawning tenant actor: {e}"))?;
        self.by_actor.insert(actor.get_id(), tenant.to_owned());
        self.shared.tenants.insert(tenant.to_owned(), actor.clone());
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
        Ok(RootState { shared: args.shared, by_actor: HashMap::new() })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: RootMsg,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Tenant(tenant, reply) => {
                let found = state.shared.tenants.get(&tenant).map(|a| a.clone());
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
                state.shared.tenants.remove(&tenant);
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
                    state.shared.tenants.remove(&tenant);
                }
            }
            _ => {}
        }
        Ok(())
    }
}
