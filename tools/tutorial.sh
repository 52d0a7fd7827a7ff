#!/usr/bin/env bash
# Runs every command of docs/tutorial.md and writes what each one printed into the tutorial, or checks it.
#
#   bash tools/tutorial.sh                     the real run (Fashion-MNIST, lenet5, a few minutes on one core):
#                                              rewrites the output blocks between <!-- out:NAME --> and
#                                              <!-- /out:NAME --> in docs/tutorial.md
#   bash tools/tutorial.sh --reduced           (CI; LOWBIT_TUTORIAL_KEEP=1 keeps its folder) the same commands on
#                                              2000 training / 500 test images with one epoch, well under 2
#                                              minutes: leaves tutorial.md alone and fails when a command fails or
#                                              a DETERMINISTIC number of the tutorial (parameter counts, sizes in
#                                              bytes, calibration counts, the bit-width sweep's sizes, ...) differs
#                                              from what this run printed, or when step 3's worked arithmetic does
#                                              not follow from its scale and zero point; it prints each line that
#                                              differs, the tutorial's and this run's
#   bash tools/tutorial.sh --reduced --update  the same, but writes this run's deterministic numbers into
#                                              docs/tutorial.md (the other numbers stay): the one command to run
#                                              after a change that moves them, such as a new integer file format
#
# Which numbers are deterministic, and which are training noise (accuracies, losses, ranges, timings, ...) or
# depend on the reduced data (image counts, epochs), is spelled out in tools/tutorial_check.py. Integer model
# sizes are compared within 1%: a layer's biases are stored as int16 only when all of them fit.
#
# Needs a build in build/ (or $LOWBIT_BUILD_DIR), /usr/bin/python3, and for step 10 gcc-arm-none-eabi and
# qemu-system-arm (tools/cortex-m/run.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${LOWBIT_BUILD_DIR:-$ROOT/build}"
TUTORIAL="$ROOT/docs/tutorial.md"
PYTHON=/usr/bin/python3
FASHION=/usr/share/datasets/fashion-mnist

MODE=full
CHECK=check
case "${1:-}/${2:-}" in
  --reduced/) MODE=reduced ;;
  --reduced/--update) MODE=reduced; CHECK=update ;;
  /) ;;
  *) echo "usage: bash tools/tutorial.sh [--reduced [--update]]" >&2; exit 2 ;;
esac

for program in train inspect quantize eval export; do
  if [[ ! -x "$BUILD/bin/$program" ]]; then
    echo "tutorial.sh: $BUILD/bin/$program is missing (build first: bash tools/setup.sh test)" >&2
    exit 1
  fi
done
if [[ ! -f "$FASHION/train-images-idx3-ubyte.gz" ]]; then
  echo "tutorial.sh: Fashion-MNIST is not in $FASHION (apt-get install dataset-fashion-mnist)" >&2
  exit 1
fi

# The knobs the two modes differ in; the full values appear literally in the tutorial's commands.
if [[ $MODE == full ]]; then
  WORK="$ROOT/out/tutorial"
  rm -rf "$WORK"
  mkdir -p "$WORK"
  EPOCHS=3
  DATA_FLAG=()
else
  WORK="$(mktemp -d /tmp/lowbit-tutorial.XXXXXX)"
  if [[ "${LOWBIT_TUTORIAL_KEEP:-0}" == 1 ]]; then echo "tutorial.sh: keeping $WORK" >&2; else trap 'rm -rf "$WORK"' EXIT; fi
  EPOCHS=1
  # The first 2000 training and 500 test images of Fashion-MNIST, as plain IDX files.
  mkdir -p "$WORK/data"
  "$PYTHON" - "$FASHION" "$WORK/data" <<'EOF'
import gzip, struct, sys
src, dst = sys.argv[1], sys.argv[2]
for split, keep in (("train", 2000), ("t10k", 500)):
    for what, kind in (("images", "idx3-ubyte"), ("labels", "idx1-ubyte")):
        raw = gzip.open(f"{src}/{split}-{what}-{kind}.gz").read()
        dims = 3 if what == "images" else 1
        header = list(struct.unpack(f">{1 + dims}I", raw[: 4 * (1 + dims)]))
        per = header[2] * header[3] if what == "images" else 1
        header[1] = keep
        body = raw[4 * (1 + dims) : 4 * (1 + dims) + keep * per]
        open(f"{dst}/{split}-{what}-{kind}", "wb").write(struct.pack(f">{1 + dims}I", *header) + body)
EOF
  DATA_FLAG=(--data "$WORK/data")
fi
CALIB=1000
IMAGES=1000
cd "$WORK"
mkdir -p "$WORK/outputs"

# step NAME PROGRAM ARGS...: runs build/bin/PROGRAM ARGS in $WORK and keeps "$ command" plus
# everything it printed (stdout and stderr, as a student sees it) in outputs/NAME.
step() {
  local name=$1 program=$2
  shift 2
  local shown="build/bin/$program $*"
  echo "== $name: $shown" >&2
  local started=$SECONDS
  if ! { echo "\$ $shown"; "$BUILD/bin/$program" "$@" "${DATA_FLAG[@]}" 2>&1; } >"outputs/$name.txt"; then
    cat "outputs/$name.txt" >&2
    echo "tutorial.sh: step $name failed: $shown" >&2
    exit 1
  fi
  echo "   ($((SECONDS - started))s)" >&2
}

# script NAME SHOWN COMMAND...: like step, for a command that is not one of build/bin's programs; SHOWN is the
# command as the tutorial prints it, COMMAND what runs (the same, with this run's data folder).
script() {
  local name=$1 shown=$2
  shift 2
  echo "== $name: $shown" >&2
  local started=$SECONDS
  if ! { echo "\$ $shown"; "$@" 2>&1; } >"outputs/$name.txt"; then
    cat "outputs/$name.txt" >&2
    echo "tutorial.sh: step $name failed: $shown" >&2
    exit 1
  fi
  echo "   ($((SECONDS - started))s)" >&2
}
DATA_DIR="${DATA_FLAG[1]:-$FASHION}"

# ---- the commands of docs/tutorial.md, in order

step train-float train --model lenet5 --epochs "$EPOCHS" --threads 1 --log lenet5.jsonl --out lenet5.safetensors
step step1 inspect --model lenet5.safetensors --log lenet5.jsonl --calib "$CALIB" --images "$IMAGES" --threads 1 \
  --out lenet5.report.html
step step2 inspect --model lenet5.safetensors --sweep --calib "$CALIB" --images "$IMAGES" --threads 1
step step3 inspect --model lenet5.safetensors --layer layers.3 --bits w4a8 --threads 1
step step4 train --from lenet5.safetensors --qat --bits w4a4 --qat-epochs 1 --threads 1 --out lenet5.w4a4.qat.safetensors
step step5-minmax quantize --model lenet5.safetensors --bits w4a4 --observer minmax --threads 1
step step5-percentile quantize --model lenet5.safetensors --bits w4a4 --observer percentile --threads 1
step step5-mse quantize --model lenet5.safetensors --bits w4a4 --observer mse --threads 1
step step6 train --from lenet5.safetensors --qat --bits w4a4 --observer mse --freeze-observers-after 0 \
  --qat-epochs 1 --threads 1 --out lenet5.w4a4.ptq-qat.safetensors
step step7 train --model resnet8 --dry-run --qat --threads 1 --out resnet8.qat.safetensors
script step8 "python3 tools/explain_add.py resnet8.qat.int8.safetensors b2_add" \
  "$PYTHON" "$ROOT/tools/explain_add.py" resnet8.qat.int8.safetensors b2_add
step step9 train --model dsconv --summary --dry-run --qat --threads 1 --out dsconv.qat.safetensors
script step10 "KEEP=m3 sh tools/cortex-m/run.sh lenet5.w4a4.qat.w4a4.safetensors $FASHION 20" \
  env KEEP=m3 LOWBIT_BIN="$BUILD/bin" sh "$ROOT/tools/cortex-m/run.sh" lenet5.w4a4.qat.w4a4.safetensors "$DATA_DIR" 20

# ---- into the tutorial (full) or checked against it (reduced)

if [[ $MODE == full ]]; then
  "$PYTHON" "$ROOT/tools/tutorial_check.py" write "$TUTORIAL" "$WORK/outputs"
else
  "$PYTHON" "$ROOT/tools/tutorial_check.py" "$CHECK" "$TUTORIAL" "$WORK/outputs"
fi
