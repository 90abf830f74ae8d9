//! `runnel-broker`: see [`runnel_broker::cli`].

fn main() -> std::process::ExitCode {
    runnel_broker::cli::main()
}
