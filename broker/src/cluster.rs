//! The cluster, on etcd: membership (a node key on a short lease, fencing by lease age) and
//! placement (one home node per tenant, claimed by a txn, its epoch the claim's revision).
//! The actor tree stays inside one process; what spans nodes is only this, in etcd.

mod membership;
mod placement;

pub use membership::JoinError;
pub(crate) use membership::{Cluster, NODES_PREFIX, NodeRecord};
pub(crate) use placement::{Home, PLACEMENT_PREFIX};
