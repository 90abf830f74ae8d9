//! The actor tree of one broker process (ractor).
//!
//! ```text
//! BrokerRoot ──supervises──► TenantActor (one per tenant) ──supervises──► RunnerConnection (one per QUIC connection)
//! ```
//!
//! - **RunnerConnection exits** (runner closed, idle timeout, revoked, protocol error): its
//!   TenantActor removes it from the pool, fails its in-flight jobs as `runner_lost`, and
//!   keeps running. ractor's default (a supervisor stops when a child exits) is overridden.
//! - **TenantActor fails**: BrokerRoot closes that tenant's connections (runners reconnect
//!   with backoff), fails its unfinished jobs, and starts a fresh TenantActor. No other
//!   tenant notices.
//! - The accept loop stays outside the tree: handshake → identity from the certificate →
//!   find or spawn the tenant's actor → hand it the connection.

mod root;
mod runner_connection;
mod tenant;

pub(crate) use root::{BrokerRoot, RootArgs, RootMsg};
pub(crate) use tenant::{Attach, DispatchRefusal, TenantMsg};
