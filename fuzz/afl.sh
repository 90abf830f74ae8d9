#!/usr/bin/env bash
# Coverage-guided fuzzing on stable Rust with Debian's afl++ (apt-get install afl++):
# the harness (`runnel-fuzz --stdin TARGET`) is built with LLVM's SanitizerCoverage
# (trace-pc-guard) and linked with afl++'s runtime, /usr/lib/afl/afl-compiler-rt.o, into
# target/afl; afl-fuzz then runs each target for SECONDS from fuzz/corpus/<target>.
# New queue entries are copied into fuzz/corpus/<target>/ (afl-*), crashes into
# fuzz/crashes/<target>/ (commit both). Usage: fuzz/afl.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame control job enroll csr api_json)
rt=/usr/lib/afl/afl-compiler-rt.o
command -v afl-fuzz >/dev/null && [ -f "$rt" ] || { echo "needs Debian's afl++ (apt-get install afl++)"; exit 1; }
RUSTFLAGS="-C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=3 \
  -C llvm-args=-sanitizer-coverage-trace-pc-guard -C llvm-args=-sanitizer-coverage-prune-blocks=0 \
  -C opt-level=3 -C debug-assertions -C overflow-checks -C link-arg=$rt" \
  CARGO_TARGET_DIR=target/afl cargo build -q -p runnel-fuzz
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for t in "${targets[@]}"; do
  echo "== afl-fuzz $t for ${secs}s"
  AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
    afl-fuzz -V "$secs" -i "fuzz/corpus/$t" -o "$out/$t" -- target/afl/debug/runnel-fuzz --stdin "$t" \
    >"$out/$t.log" 2>&1 || { tail -20 "$out/$t.log"; exit 1; }
  grep -a "Statistics" "$out/$t.log" | sed 's/\x1b\[[0-9;]*m//g' || true
  mkdir -p "fuzz/corpus/$t" "fuzz/crashes/$t"
  for f in "$out/$t"/default/queue/id:*; do
    [ -f "$f" ] || continue
    case "$f" in *orig:*) continue ;; esac
    cp "$f" "fuzz/corpus/$t/afl-$(sha256sum "$f" | cut -c1-16).bin"
  done
  for f in "$out/$t"/default/crashes/id:*; do
    [ -f "$f" ] || continue
    cp "$f" "fuzz/crashes/$t/$(sha256sum "$f" | cut -c1-16).bin"
    echo "CRASH saved: fuzz/crashes/$t/$(sha256sum "$f" | cut -c1-16).bin"
  done
done
