//! runnel-broker: the server runners dial and platforms dispatch through.
//!
//! # Layout
//! - [`broker`]: [`Broker::spawn`] wires everything and returns a [`BrokerHandle`].
//! - [`config`]: flags, env, TOML file, defaults, validation.
//! - [`data_dir`]: first-start initialisation (CA, store, operator key).
//! - [`endpoint`]: QUIC/TLS setup and the accept loop (outside the actor tree).
//! - [`verifier`]: the pairing check inside the TLS handshake.
//! - [`index`]: the in-memory runner index the verifier reads (never the store).
//! - [`enroll`]: `runnel-enroll/1`: one-time token + CSR → runner certificate.
//! - [`actors`]: `BrokerRoot → TenantActor → RunnerConnection` (see its docs for failure
//!   handling).
//! - [`dispatch`]: the runner-selection decision, as a plain function.
//! - [`jobs`]: job table, states, output buffers, retention.
//! - [`metrics`]: Prometheus metric names, buckets, the tenant-label cap.
//! - [`store`] and [`records`]: the durable KV (redb) and the typed records on it.
//! - [`secret`]: API keys and tokens (salted SHA-256, constant-time checks).
//! - [`api`]: the HTTP API (axum).
//! - [`cli`]: the `runnel-broker` command line; `main.rs` only calls it.
//! - [`ctl`]: `runnelctl`, the operator CLI over the HTTP API.
#![deny(clippy::unwrap_used)]

pub mod actors;
pub mod api;
pub mod broker;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod data_dir;
pub mod demo;
pub mod dispatch;
pub mod endpoint;
pub mod enroll;
pub mod index;
pub mod jobs;
pub mod metrics;
pub mod records;
pub mod secret;
pub mod shared;
pub mod store;
pub mod verifier;

pub use broker::{Broker, BrokerHandle};
pub use config::Config;
