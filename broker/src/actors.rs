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
//!   find or spawn the tenant's actor ([`Tenants`], the typed directory the root keeps) →
//!   hand it the connection.
//!
//! Imports point down the tree: `root` → `tenant` → `runner_connection`. A connection
//! reports upward only through `ConnectionEvent` (a ractor `DerivedActorRef`), and a
//! connection's tasks (its I/O task, one per running job) are owned by its state, so a
//! killed actor leaves none running.

mod job_lane;
mod root;
mod runner_connection;
mod tenant;

pub(crate) use root::{BrokerRoot, RootArgs, RootMsg, Tenants};
pub(crate) use runner_connection::Attach;
#[cfg(feature = "fault-injection")]
pub(crate) use tenant::DispatchFault;
pub(crate) use tenant::{DispatchRefusal, TenantMsg};
