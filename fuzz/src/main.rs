//! `runnel-fuzz`: see the library docs and `fuzz/README.md`.

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "runnel-fuzz", about = "mutation fuzzing of runnel's decoders and API bodies")]
struct Cli {
    /// Targets (default: all): frame, control, job, enroll, csr, api_json.
    targets: Vec<String>,
    /// Inputs per target.
    #[arg(long, default_value_t = 100_000)]
    cases: u64,
    /// RNG seed (a run is reproducible from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run only the saved corpus and crashes, no mutation.
    #[arg(long)]
    replay: bool,
    /// Write the built-in seeds into corpus/<target>/ (then commit them).
    #[arg(long)]
    write_corpus: bool,
    /// Run one input from stdin through the one target named, aborting on a panic: the
    /// harness shape afl-fuzz drives (see fuzz/README.md).
    #[arg(long)]
    stdin: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let dir = runnel_fuzz::repo_dir();
    let chosen: Vec<&runnel_fuzz::Target> = runnel_fuzz::ALL
        .iter()
        .filter(|t| cli.targets.is_empty() || cli.targets.iter().any(|n| n == t.name))
        .collect();
    if let Some(unknown) =
        cli.targets.iter().find(|n| !runnel_fuzz::ALL.iter().any(|t| t.name == n.as_str()))
    {
        eprintln!("runnel-fuzz: unknown target {unknown:?}");
        return ExitCode::from(64);
    }
    if cli.stdin {
        let [t] = chosen.as_slice() else {
            eprintln!("runnel-fuzz: --stdin takes exactly one target");
            return ExitCode::from(64);
        };
        let mut input = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut input) {
            eprintln!("runnel-fuzz: stdin: {e}");
            return ExitCode::FAILURE;
        }
        // A panic must look like a crash (a signal) to afl-fuzz, not an exit status.
        std::panic::set_hook(Box::new(|info| {
            eprintln!("{info}");
            std::process::abort();
        }));
        let ctx = runnel_fuzz::Ctx::new();
        (t.run)(&ctx, &input);
        return ExitCode::SUCCESS;
    }
    if cli.write_corpus {
        for t in &chosen {
            let d = dir.join("corpus").join(t.name);
            if let Err(e) = std::fs::create_dir_all(&d) {
                eprintln!("runnel-fuzz: {}: {e}", d.display());
                return ExitCode::FAILURE;
            }
            for (i, seed) in runnel_fuzz::seeds::of(t.name).iter().enumerate() {
                if let Err(e) = std::fs::write(d.join(format!("seed-{i}.bin")), seed) {
                    eprintln!("runnel-fuzz: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    runnel_fuzz::quiet_panics();
    let ctx = runnel_fuzz::Ctx::new();
    let mut failed = false;
    for t in chosen {
        if cli.replay {
            for sub in ["corpus", "crashes"] {
                for (path, bytes) in runnel_fuzz::files(&dir.join(sub), t.name) {
                    if let Err(why) = runnel_fuzz::run_one(t, &ctx, &bytes) {
                        println!("{}: {} still panics: {why}", t.name, path.display());
                        failed = true;
                    }
                }
            }
            continue;
        }
        let r = runnel_fuzz::fuzz(t, &ctx, cli.cases, cli.seed, &dir);
        println!(
            "{:<9} {:>9} cases in {:>7.1}s ({:>7.0}/s), {:>8} accepted, {} crashes",
            r.target,
            r.cases,
            r.secs,
            r.cases as f64 / r.secs.max(1e-9),
            r.accepted,
            r.crashes.len()
        );
        failed |= !r.crashes.is_empty();
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
