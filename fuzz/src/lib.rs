//! runnel-fuzz: a mutation fuzzer for what strangers and peers send the broker — frames,
//! control/job/enroll/peer messages, enrollment CSRs, API JSON bodies.
//!
//! Two drivers over the same targets: this seeded mutation runner (not coverage-guided:
//! deterministic mutations of built-in seeds and of `corpus/<target>/`; inputs a target
//! *accepts* join the pool, so mutation reaches deeper structure than random bytes do), and
//! afl-fuzz through `runnel-fuzz --stdin TARGET` built with SanitizerCoverage
//! (`fuzz/afl.sh`, see `fuzz/README.md`). A panic — or a broken property, which the targets assert — is saved to
//! `crashes/<target>/<sha256 prefix>.bin`; `replay` runs every saved file again.
//!
//! # Layout
//! - `targets`: the targets and the properties they check.
//! - `mutate`: the mutator.
//! - `seeds`: one valid input of each shape per target.

#![deny(clippy::unwrap_used)]

pub mod mutate;
pub mod seeds;
pub mod targets;

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use targets::{ALL, Ctx, Outcome, Target};

/// Most inputs kept in a target's pool.
const POOL_CAP: usize = 4096;

/// The repository's fuzz directory (`corpus/`, `crashes/`).
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What one run of a target found.
#[derive(Debug)]
pub struct Report {
    /// Target name.
    pub target: &'static str,
    /// Inputs run.
    pub cases: u64,
    /// Inputs the target accepted.
    pub accepted: u64,
    /// Inputs that panicked (saved under `crashes/`).
    pub crashes: Vec<PathBuf>,
    /// Seconds taken.
    pub secs: f64,
}

/// The files of `dir/<target>/` (none if it does not exist).
pub fn files(dir: &Path, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir.join(target))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok().map(|b| (e.path(), b)))
        .collect();
    out.sort();
    out
}

/// Runs `input` through `t`; Err holds the panic message.
pub fn run_one(t: &Target, ctx: &Ctx, input: &[u8]) -> Result<Outcome, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(ctx, input))).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".to_owned())
    })
}

/// Saves a crashing input under `dir/crashes/<target>/`; answers its path.
fn save_crash(dir: &Path, target: &str, input: &[u8]) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, input);
    let name = format!("{}.bin", hex::encode(&digest.as_ref()[..8]));
    let path = dir.join("crashes").join(target).join(name);
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::write(&path, input);
    path
}

/// `cases` mutated inputs through `t`, from seed `seed`; crashes go under `dir`.
pub fn fuzz(t: &Target, ctx: &Ctx, cases: u64, seed: u64, dir: &Path) -> Report {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pool = seeds::of(t.name);
    pool.extend(files(&dir.join("corpus"), t.name).into_iter().map(|(_, b)| b));
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let started = Instant::now();
    let (mut accepted, mut crashes) = (0, Vec::new());
    for _ in 0..cases {
        let a = &pool[rng.random_range(0..pool.len())];
        let b = &pool[rng.random_range(0..pool.len())];
        let input = mutate::mutate(&mut rng, a, b);
        match run_one(t, ctx, &input) {
            Ok(Outcome::Accepted) => {
                accepted += 1;
                // Keep some accepted variants: they are the way into deeper states.
                if pool.len() < POOL_CAP && rng.random_range(0..8) == 0 {
                    pool.push(input);
                }
            }
            Ok(Outcome::Refused) => {}
            Err(why) => {
                let path = save_crash(dir, t.name, &input);
                eprintln!("{}: CRASH {why} -> {}", t.name, path.display());
                crashes.push(path);
            }
        }
    }
    Report { target: t.name, cases, accepted, crashes, secs: started.elapsed().as_secs_f64() }
}

/// Silences the default panic message (a crash is reported once, with its file).
pub fn quiet_panics() {
    std::panic::set_hook(Box::new(|_| {}));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every corpus file and every crash ever saved still runs clean (crashes stay in the
    /// repository as regression inputs once fixed).
    #[test]
    fn the_corpus_and_every_saved_crash_replay_clean() {
        let ctx = Ctx::new();
        for t in ALL {
            for sub in ["corpus", "crashes"] {
                for (path, bytes) in files(&repo_dir().join(sub), t.name) {
                    assert!(run_one(t, &ctx, &bytes).is_ok(), "{} panics", path.display());
                }
            }
        }
    }

    /// A short run of each target (CI's smoke; the long runs are by hand, see README).
    #[test]
    fn a_short_run_of_every_target_finds_nothing() {
        quiet_panics();
        let ctx = Ctx::new();
        let scratch = std::env::temp_dir().join(format!("runnel-fuzz-{}", std::process::id()));
        for t in ALL {
            let r = fuzz(t, &ctx, 3_000, 7, &scratch);
            assert!(r.crashes.is_empty(), "{}: {:?}", t.name, r.crashes);
            assert!(r.accepted > 0, "{}: nothing accepted in {} cases", t.name, r.cases);
        }
        let _ = std::fs::remove_dir_all(scratch);
    }

    /// The targets check properties, not only "no panic": a broken one is a crash.
    #[test]
    fn a_broken_property_counts_as_a_crash() {
        fn broken(_: &Ctx, _: &[u8]) -> Outcome {
            panic!("property broken")
        }
        let t = Target { name: "broken", run: broken };
        let ctx = Ctx::new();
        assert_eq!(run_one(&t, &ctx, b"x").err().as_deref(), Some("property broken"));
    }
}
