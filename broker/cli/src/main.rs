//! `runnel-broker`: see [`runnel_broker_cli`].

/// jemalloc, not glibc's malloc: a dispatch allocates ~50 times across tasks on different
/// threads, and glibc's per-thread cache stops at 1,032 bytes, past which it takes its
/// locked slow path and consolidates fastbins. jemalloc's thread caches and size classes
/// took 12% off the broker's CPU per job (BENCHMARKS.md, 2026-12-05), for about 1 KiB more
/// RSS per idle runner.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    runnel_broker_cli::main()
}
