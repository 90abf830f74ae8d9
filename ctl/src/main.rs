//! `runnelctl`: parses flags and runs one subcommand (see [`runnel_ctl`]).

fn main() -> std::process::ExitCode {
    runnel_ctl::main()
}
