//! `runnel-runner`: see [`runnel_runner::cli`].

fn main() -> std::process::ExitCode {
    runnel_runner::cli::main()
}
