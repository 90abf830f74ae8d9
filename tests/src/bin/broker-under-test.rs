//! The real `runnel-broker` command line, built inside this package so end-to-end tests can
//! start it as a child process (`CARGO_BIN_EXE_broker-under-test`).

fn main() -> std::process::ExitCode {
    runnel_broker_cli::main()
}
