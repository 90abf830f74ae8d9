//! The real `runnelctl` command line, built inside this package so end-to-end tests can run
//! it as a child process (`CARGO_BIN_EXE_ctl-under-test`).

fn main() -> std::process::ExitCode {
    runnel_ctl::main()
}
