#!/usr/bin/env bash
# The exercise checks (docs/exercises/) can never drift from the code:
#   1. in the default build (build/, already built), every exercise check passes against the real functions;
#   2. in the student build (build-exercises/, -DLOWBIT_EXERCISES=ON, only the checks and what they link),
#      every exercise check fails, with its stub's "not implemented yet" message, and with no other exercise's
#      (a check that reaches another exercise's stub depends on that exercise: each must depend on its own only,
#      so that a student can do them in any order).
# Usage, from anywhere:  bash .ci/exercises.sh      (after bash tools/setup.sh test, or any build of build/)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
JOBS="$(nproc)"
STUDENT=build-exercises
MIN_EXERCISES=11

fail() { echo "exercises: $*" >&2; exit 1; }

mapfile -t checks < <(find tests/exercises -name 'test_ex*.cpp' -printf '%f\n' | sed 's/\.cpp$//' | sort)
(( ${#checks[@]} >= MIN_EXERCISES )) || fail "found ${#checks[@]} checks in tests/exercises, expected at least $MIN_EXERCISES"
echo "== ${#checks[@]} exercise checks: ${checks[*]}"

echo "== default build: every exercise check passes against the real functions"
[[ -d build ]] || fail "no build/ here: build the default variant first (bash tools/setup.sh test)"
cmake --build build --target exercise_tests -j "$JOBS" >/dev/null
ctest --test-dir build -L exercise --output-on-failure
listed=$(ctest --test-dir build -N -L exercise | grep -c 'test_ex' || true)
(( listed == ${#checks[@]} )) || fail "ctest lists $listed tests labelled exercise, expected ${#checks[@]}"

echo "== student build ($STUDENT/, LOWBIT_EXERCISES=ON): every exercise check fails with its stub's message"
cmake -S . -B "$STUDENT" -DCMAKE_BUILD_TYPE=Release -DLOWBIT_EXERCISES=ON -DLOWBIT_TESTS=ON -DLOWBIT_WERROR=ON \
      >/dev/null
cmake --build "$STUDENT" --target exercise_tests -j "$JOBS"
wrong=0
for check in "${checks[@]}"; do
  number=${check#test_ex}
  number=${number%%_*}
  status=0
  output=$(ctest --test-dir "$STUDENT" -L exercise -R "^$check\$" --output-on-failure 2>&1) || status=$?
  if (( status == 0 )) || ! grep -q "1 tests failed out of 1" <<<"$output"; then
    echo "  $check: did not fail in the student build (ctest exit $status):"
    tail -n 20 <<<"$output" | sed 's/^/    /'
    wrong=$((wrong + 1))
  elif ! grep -q "exercise $number: .* is not implemented yet" <<<"$output"; then
    echo "  $check: failed, but without \"exercise $number: ... is not implemented yet\" (exit $status):"
    tail -n 20 <<<"$output" | sed 's/^/    /'
    wrong=$((wrong + 1))
  elif others=$(grep -o -E "exercise [0-9]+: [^ ]+ is not implemented yet" <<<"$output" |
                 grep -v "^exercise $number:" | sort -u) && [[ -n "$others" ]]; then
    echo "  $check: also fails on another exercise's stub (each check must depend on its own exercise only):"
    sed 's/^/    /' <<<"$others"
    wrong=$((wrong + 1))
  else
    echo "  $check fails as it must: $(grep -o -m1 "exercise $number: .* is not implemented yet" <<<"$output")"
  fi
done
(( wrong == 0 )) || fail "$wrong of ${#checks[@]} checks did not fail as expected in the student build"
echo "== exercises: all ${#checks[@]} checks pass in the default build and fail in the student build"
