#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer's coverage instrumentation on the stable toolchain
# and runs them. See FUZZING.md.
#
#   fuzz/run.sh build                 build every target
#   fuzz/run.sh seeds                 write valid inputs to fuzz/seeds/<target>/
#   fuzz/run.sh run TARGET [RUNS]     fuzz TARGET for RUNS executions (default 10,000,000),
#                                     growing fuzz/work/<target>/ from its corpus and seeds
#   fuzz/run.sh minimize TARGET       merge what the run found into fuzz/corpus/<target>/
#   fuzz/run.sh all [RUNS]            build, seeds, then run and minimize every target in turn
#
# Extra libFuzzer flags go in LIBFUZZER_FLAGS (for example "-max_total_time=600").
set -euo pipefail
cd "$(dirname "$0")"
TARGETS="frame dm mailbox group blob presence keys envelope invite group_chain manifest bundle"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
# The instrumented build has a target directory of its own (FUZZ_TARGET_DIR); the seeds are
# written by an ordinary workspace build.
FUZZ_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
BIN="$FUZZ_TARGET_DIR/$TRIPLE/release"

build() {
    # The flags cargo-fuzz passes, without a sanitizer (kith forbids unsafe code, and ASan
    # needs a nightly compiler). Host code (build scripts, proc macros) is left alone by
    # naming the target triple.
    RUSTFLAGS="-Cpasses=sancov-module \
        -Cllvm-args=-sanitizer-coverage-level=4 \
        -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
        -Cllvm-args=-sanitizer-coverage-pc-table \
        -Cllvm-args=-sanitizer-coverage-trace-compares \
        --cfg fuzzing -Cdebug-assertions -Coverflow-checks \
        --cfg curve25519_dalek_backend=\"avx512\"" \
        CARGO_TARGET_DIR="$FUZZ_TARGET_DIR" cargo build --locked --release --target "$TRIPLE" --bins
}

seeds() {
    (cd .. && cargo run --locked -q -p kith-net --example fuzz_seeds -- fuzz/seeds)
}

run() {
    local target="$1" runs="${2:-10000000}"
    mkdir -p "work/$target" "corpus/$target" "seeds/$target" "artifacts/$target"
    # shellcheck disable=SC2086
    "$BIN/$target" -runs="$runs" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="artifacts/$target/" ${LIBFUZZER_FLAGS:-} \
        "work/$target" "corpus/$target" "seeds/$target"
}

minimize() {
    local target="$1"
    local fresh="corpus/$target.new"
    rm -rf "$fresh" && mkdir -p "$fresh"
    # The fewest inputs that still reach every edge (not every counter or comparison): what
    # is committed and replayed by `cargo test`.
    "$BIN/$target" -merge=1 -set_cover_merge=1 -use_counters=0 -use_value_profile=0 \
        -max_len=65536 "$fresh" "corpus/$target" "seeds/$target" "work/$target"
    rm -rf "corpus/$target" && mv "$fresh" "corpus/$target"
}

case "${1:-}" in
    build) build ;;
    seeds) seeds ;;
    run) run "$2" "${3:-}" ;;
    minimize) minimize "$2" ;;
    all)
        build
        seeds
        for t in $TARGETS; do
            run "$t" "${2:-}"
            minimize "$t"
        done
        ;;
    *) sed -n '2,13p' "$0"; exit 2 ;;
esac
