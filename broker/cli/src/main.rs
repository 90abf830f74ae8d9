//! `runnel-broker`: see [`runnel_broker_cli`].

fn main() -> std::process::ExitCode {
    runnel_broker_cli::main()
}
