//! The `runnel-broker` command line on top of the [`runnel_broker`] library, split the way
//! linkerd splits its proxy binary from `linkerd/app`: the library is the server alone, this
//! package holds what only a process needs (flags, tracing setup, signals, the demo).
//!
//! # Layout
//! - `cli`: flags, env and TOML → `Config`; tracing; banner; signals → shutdown.
//! - `demo`: `runnel-broker demo`, the guided tour with real runner processes.
#![deny(clippy::unwrap_used)]

mod cli;
mod demo;

pub use cli::{EXIT_CONFIG, main};
