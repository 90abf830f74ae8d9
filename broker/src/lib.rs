//! runnel-broker: the server runners dial and platforms dispatch through, as a library.
//! The `runnel-broker` binary (package `runnel-broker-cli`) only parses flags and calls
//! [`Broker::spawn`]; tests and the bench harness start brokers the same way.
//!
//! # Layout
//! - `broker`: [`Broker::spawn`] wires everything and returns a [`BrokerHandle`].
//! - `config`: [`Config`], its defaults as named constants, validation, the TOML file.
//! - `data_dir`: first-start initialisation (CA, store, operator key), in files or etcd.
//! - `cluster`: membership on etcd (a node key on a short lease, fencing by lease age).
//! - `endpoint`: QUIC/TLS setup and the accept loop (outside the actor tree).
//! - `verifier`: the pairing check inside the TLS handshake.
//! - `index`: the in-memory runner index the verifier reads (never the store).
//! - `enroll`: `runnel-enroll/1`: one-time token + CSR → runner certificate.
//! - `actors`: `BrokerRoot → TenantActor → RunnerConnection` (see its docs for failure
//!   handling).
//! - `dispatch`: the runner-selection decision, as plain data structures.
//! - `jobs`: job table, states, output buffers, retention.
//! - [`metrics`]: Prometheus metric names, buckets, the tenant-label cap.
//! - `store` and `records`: the durable KV (redb, or etcd for a cluster) and the typed
//!   records on it.
//! - `audit`: anonymous refusals counted per window, written as one event each.
//! - `secret`: API keys and tokens (salted SHA-256, constant-time checks).
//! - `api`: the HTTP API (axum).
//! - `homed`: the calls that need a tenant's home (dispatch, jobs, closing connections):
//!   run here, or forwarded to the home through `peer` (`runnel-peer/1`, node certs).
//! - `shared`: the state every part of one process shares.
//!
//! Modules are private; this file re-exports the public API. The criterion benches reach a
//! few internals through the `bench-internals` feature (module `bench_internals`).
#![deny(clippy::unwrap_used)]

mod actors;
mod api;
mod audit;
mod broker;
mod call_lane;
mod cluster;
mod config;
mod data_dir;
mod deadline;
mod dispatch;
mod endpoint;
mod enroll;
mod homed;
mod index;
mod jobs;
pub mod metrics;
mod native;
mod open_counts;
mod peer;
mod rate;
mod records;
mod secret;
mod shared;
mod store;
mod verifier;
mod wake_gate;

pub use broker::{Broker, BrokerHandle, SpawnError};
pub use cluster::JoinError;
pub use config::{Config, ConfigError, FileConfig, HttpTls, default_node_id, parse_duration};

/// Internals the micro-benchmarks measure in isolation and the fuzz targets drive (feature
/// `bench-internals`; not a stable API).
#[cfg(feature = "bench-internals")]
pub mod bench_internals {
    /// The API's JSON bodies, for the `api_json` fuzz target.
    pub use crate::api::fuzz::{Body, check_body};
    pub use crate::dispatch::{Needs, Pool, Slot};
    pub use crate::index::RunnerIndex;
    pub use crate::records::{RunnerRecord, RunnerState};
    pub use crate::verifier::{Denial, HandshakeRefusal, PairingVerifier};
}
