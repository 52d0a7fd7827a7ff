#!/usr/bin/env bash
# Runs every command of docs/tutorial.md and writes what each one printed into the tutorial.
#
#   bash tools/tutorial.sh            the real run (Fashion-MNIST, lenet5, a few minutes on one core):
#                                     rewrites the output blocks between <!-- out:NAME --> and
#                                     <!-- /out:NAME --> in docs/tutorial.md
#   bash tools/tutorial.sh --reduced  (LOWBIT_TUTORIAL_KEEP=1 keeps its folder) the same commands on 2000 training / 500 test images with one
#                                     epoch (for CI, well under 2 minutes): leaves tutorial.md alone and
#                                     fails when a command fails or prints lines the tutorial's blocks
#                                     do not have (the first word of each line, digits masked)
#
# Needs a build in build/ (or $LOWBIT_BUILD_DIR) and /usr/bin/python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${LOWBIT_BUILD_DIR:-$ROOT/build}"
TUTORIAL="$ROOT/docs/tutorial.md"
PYTHON=/usr/bin/python3
FASHION=/usr/share/datasets/fashion-mnist

MODE=full
case "${1:-}" in
  --reduced) MODE=reduced ;;
  "") ;;
  *) echo "usage: bash tools/tutorial.sh [--reduced]" >&2; exit 2 ;;
esac

for program in train inspect quantize eval; do
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

# ---- into the tutorial (full) or checked against it (reduced)

"$PYTHON" - "$TUTORIAL" "$WORK/outputs" "$MODE" <<'EOF'
import os, re, sys
tutorial, outputs, mode = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(tutorial).read()
block = re.compile(r"(<!-- out:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /out:(?P=name) -->)", re.S)

def shape(body):
    """The first word of every line, numbers masked as #, in order of first appearance."""
    seen = []
    for line in body.splitlines():
        words = line.split()
        if not words or words[0].startswith("```"):
            continue
        word = re.sub(r"[-+]?[0-9][0-9.eE+-]*%?", "#", words[0])
        if word not in seen:
            seen.append(word)
    return seen

names = sorted(f[:-4] for f in os.listdir(outputs))
found = {m.group("name") for m in block.finditer(text)}
missing = [n for n in names if n not in found]
if missing:
    sys.exit(f"tutorial.sh: {tutorial} has no <!-- out:NAME --> block for: {', '.join(missing)}")

if mode == "full":
    def fill(m):
        out = open(os.path.join(outputs, m.group("name") + ".txt")).read().rstrip("\n")
        return m.group(1) + "```text\n" + out + "\n```\n" + m.group(4)
    open(tutorial, "w").write(block.sub(fill, text))
    print(f"tutorial.sh: wrote {len(names)} output blocks into {tutorial}")
else:
    bad = []
    for m in block.finditer(text):
        name = m.group("name")
        got = shape(open(os.path.join(outputs, name + ".txt")).read())
        want = shape(m.group("body"))
        if got != want:
            bad.append(f"  {name}: the tutorial's lines start with {want}\n  {' ' * len(name)}  this run's lines with    {got}")
    if bad:
        sys.exit("tutorial.sh: the output no longer matches docs/tutorial.md (run bash tools/tutorial.sh and commit):\n"
                 + "\n".join(bad))
    print(f"tutorial.sh: all {len(names)} steps ran and match the tutorial's blocks")
EOF
