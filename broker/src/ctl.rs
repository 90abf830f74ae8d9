//! `runnelctl`: the operator CLI, a client of the HTTP API.
//!
//! Reads `RUNNEL_URL` and `RUNNEL_KEY`, or `--profile NAME` from
//! `$RUNNEL_CONFIG_DIR/profiles.toml` (default `~/.config/runnel/profiles.toml`):
//! ```toml
//! [default]
//! url = "http://127.0.0.1:7480"
//! key = "rk_…"
//! ```
//! `--output json` prints the API's JSON; errors are one line on stderr with exit 1.

mod client;
mod commands;
mod table;

use std::process::ExitCode;

pub use client::{Client, CtlError};

/// Runs the command line.
pub fn main() -> ExitCode {
    commands::main()
}
