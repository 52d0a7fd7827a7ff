#!/bin/sh
# tools/cortex-m/native.sh MODEL.int8.safetensors [DATA_DIR] [CC]
#
# The host-side twin of run.sh: exports the model, compiles it with CC (default cc) and
# -std=c99 -Wall -Wextra -Werror -pedantic, runs it on the whole test set, and checks every logit of every image
# against eval --logits (lowbit's integer runtime).
set -eu
if [ $# -lt 1 ] || [ $# -gt 3 ]; then
  echo "usage: $0 MODEL.int8.safetensors [DATA_DIR] [CC]" >&2
  exit 2
fi
model=$1
data=${2:-/usr/share/datasets/fashion-mnist}
cc=${3:-cc}
here=$(cd "$(dirname "$0")" && pwd)
bin=${LOWBIT_BIN:-$here/../../build/bin}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$bin/export" --format c --model "$model" --out "$work" --prefix model >/dev/null
"$cc" -std=c99 -Wall -Wextra -Werror -pedantic -O2 -I "$work" "$here/host_main.c" "$work/model.c" -o "$work/model"
python3 "$here/images_header.py" "$data" 0 --raw >"$work/images.raw"
"$work/model" "$work/images.raw" >"$work/c.txt"
"$bin/eval" --model "$model" --data "$data" --logits "$work/eval.txt" >/dev/null
if ! cmp -s "$work/c.txt" "$work/eval.txt"; then
  echo "native.sh: error: the exported C's logits differ from eval's (first differences below)" >&2
  diff "$work/eval.txt" "$work/c.txt" | head -n 10 >&2
  exit 1
fi
echo "$cc: the logits of $(wc -l <"$work/c.txt") test images are identical to eval's"
