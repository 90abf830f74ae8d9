//! `runnelctl`: the operator CLI, and [`Client`], the one HTTP client of the broker's API
//! (the CLI, the end-to-end tests, the demo and the bench harness all use it).
//!
//! Reads `RUNNEL_URL` and `RUNNEL_KEY`, or `--profile NAME` from
//! `$RUNNEL_CONFIG_DIR/profiles.toml` (default `~/.config/runnel/profiles.toml`):
//! ```toml
//! [default]
//! url = "http://127.0.0.1:7480"
//! key = "rk_…"
//! # for an https:// broker (--http-tls): the one CA trusted
//! ca_fingerprint = "sha256:…"
//! ```
//! `RUNNEL_CA_FINGERPRINT` / `--ca-fingerprint` set the same.
//! `--output json` prints the API's JSON; errors are one line on stderr with exit 1.

#![deny(clippy::unwrap_used)]

mod client;
mod commands;
mod table;

use std::process::ExitCode;

pub use client::{Answer, Client, CtlError};
/// The HTTP method type [`Client::call`] takes.
pub use reqwest::Method;

/// Runs the command line.
pub fn main() -> ExitCode {
    commands::main()
}
