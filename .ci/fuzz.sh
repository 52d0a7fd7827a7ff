#!/usr/bin/env bash
# Fuzzing: builds the libFuzzer targets of tests/fuzz in build-fuzz/ (clang, ASan + UBSan), writes a
# seed corpus of valid files with fuzz_seeds, then runs each target for LOWBIT_FUZZ_SECONDS (60).
# Any crash, leak, sanitizer report, timeout or allocation the input cannot justify fails the script;
# the input is kept as build-fuzz/findings/<target>-crash-... (add it to tests/fuzz/regressions/<target>/).
#   bash .ci/fuzz.sh                          (from anywhere; needs clang and libclang-rt-14-dev)
#   LOWBIT_FUZZ_SECONDS=600 bash .ci/fuzz.sh  (a longer run)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUILD=build-fuzz
SECONDS_PER_TARGET="${LOWBIT_FUZZ_SECONDS:-60}"
JOBS="${LOWBIT_JOBS:-$(nproc)}"
TARGETS=(idx checkpoint int_model)

# Inputs are at most 16 KiB, so no read can justify more than 16 MiB (a gzip stream inflates at most
# ~1032:1); -malloc_limit_mb=64 turns any single larger allocation into a finding.
FUZZ_FLAGS=(-max_len=16384 -malloc_limit_mb=64 -rss_limit_mb=2048 -timeout=30 -print_final_stats=1)

cmake -S . -B "$BUILD" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOWBIT_FUZZ=ON \
      -DLOWBIT_TESTS=OFF >/dev/null
cmake --build "$BUILD" -j "$JOBS"

rm -rf "$BUILD/seeds" "$BUILD/findings"
mkdir -p "$BUILD/findings"
"$BUILD/bin/fuzz_seeds" "$BUILD/seeds"

export ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
status=0
for target in "${TARGETS[@]}"; do
  corpus="$BUILD/corpus/$target"  # grows across runs in the same build folder
  mkdir -p "$corpus"
  dict=() regressions=()
  if [[ -f "tests/fuzz/$target.dict" ]]; then dict=(-dict="tests/fuzz/$target.dict"); fi
  if [[ -d "tests/fuzz/regressions/$target" ]]; then regressions=("tests/fuzz/regressions/$target"); fi
  echo "== fuzz_$target for ${SECONDS_PER_TARGET}s"
  if ! "$BUILD/bin/fuzz_$target" "${FUZZ_FLAGS[@]}" "${dict[@]}" -max_total_time="$SECONDS_PER_TARGET" \
       -artifact_prefix="$BUILD/findings/$target-" "$corpus" "$BUILD/seeds/$target" \
       "${regressions[@]}" > "$BUILD/findings/$target.log" 2>&1; then
    echo "!! fuzz_$target found a problem: tail of $BUILD/findings/$target.log:"
    tail -n 60 "$BUILD/findings/$target.log"
    status=1
  else
    grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$BUILD/findings/$target.log" | tail -n 2 || true
  fi
done
ls "$BUILD/findings" | grep -v '\.log$' && status=1
exit "$status"
