//! The HTTP API (axum, JSON). The tenant of every call comes from the API key, never from
//! the path or the body; another tenant's resources answer 404.
//!
//! | route | who |
//! |---|---|
//! | `POST/GET /v1/tenants` | operator |
//! | `POST /v1/tenants/{t}/keys` | operator, or admin of `t` |
//! | `POST /v1/runners`, `DELETE /v1/runners/{id}` | admin |
//! | `GET /v1/runners[/{id}]` | admin, dispatcher, member (own owner) |
//! | `POST/GET /v1/jobs`, `POST /v1/jobs/batch`, `GET /v1/jobs/{id}[/output]`, `POST /v1/jobs/{id}/cancel` | admin, dispatcher, member (own owner) |
//! | `GET /v1/audit` | operator (cluster events), admin (tenant events) |
//! | `GET /v1/cluster` | operator: nodes, addresses, lease state |
//! | `POST /v1/cluster/rebalance` | operator: move tenants to their rendezvous node (draining) |
//! | `GET /healthz`, `GET /readyz`, `GET /metrics` | anyone (keep the HTTP port private) |

mod answers;
mod auth;
mod cluster;
mod error;
#[cfg(feature = "bench-internals")]
pub(crate) mod fuzz;
mod health;
mod jobs;
mod keys;
mod limits;
mod runners;
mod serve;
mod tenants;
mod tls;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::{delete, get, post};

pub(crate) use answers::AnswerBudgets;
pub(crate) use auth::{Caller, authenticate, still_good};
pub(crate) use error::{ApiError, ApiJson};
pub(crate) use jobs::checked_spec;
pub(crate) use limits::RateLimits;
pub(crate) use serve::serve;
pub(crate) use tls::acceptor as tls_acceptor;

use crate::actors::Tenants;
use crate::shared::Shared;

/// The router's state; handlers take the part they need (`State<Arc<Shared>>`,
/// `State<Arc<Tenants>>`).
#[derive(Debug, Clone)]
pub(crate) struct App {
    shared: Arc<Shared>,
    tenants: Arc<Tenants>,
}

impl FromRef<App> for Arc<Shared> {
    fn from_ref(app: &App) -> Self {
        app.shared.clone()
    }
}

impl FromRef<App> for Arc<Tenants> {
    fn from_ref(app: &App) -> Self {
        app.tenants.clone()
    }
}

/// Largest request body accepted.
pub(crate) const MAX_BODY: usize = 512 * 1024;

/// The router.
pub(crate) fn router(shared: Arc<Shared>, tenants: Arc<Tenants>) -> Router {
    Router::new()
        .route("/v1/tenants", post(tenants::create).get(tenants::list))
        .route("/v1/tenants/{tenant}/keys", post(keys::create).get(keys::list))
        .route("/v1/tenants/{tenant}/keys/{id}", delete(keys::revoke))
        .route("/v1/operator-keys", post(keys::create_operator).get(keys::list_operator))
        .route("/v1/operator-keys/{id}", delete(keys::revoke_operator))
        .route("/v1/runners", post(runners::create).get(runners::list))
        .route("/v1/runners/{id}", get(runners::get).delete(runners::revoke))
        .route("/v1/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/jobs/batch", post(jobs::create_batch))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/output", get(jobs::output))
        .route("/v1/audit", get(tenants::audit))
        .route("/v1/cluster", get(cluster::status))
        .route("/v1/cluster/rebalance", post(cluster::rebalance))
        .route("/metrics", get(health::metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(App { shared, tenants })
}
