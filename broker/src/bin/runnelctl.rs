//! `runnelctl`: see [`runnel_broker::ctl`].

fn main() -> std::process::ExitCode {
    runnel_broker::ctl::main()
}
