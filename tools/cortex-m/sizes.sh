#!/bin/sh
# tools/cortex-m/sizes.sh MODEL.safetensors...
#
# Flash and RAM of each integer model on a Cortex-M0 (QEMU microbit) and a Cortex-M3 (QEMU mps2-an385), as the
# markdown table of README.md and docs/deploy.md. For each model, run.sh builds and runs a firmware with one
# test image on both boards (and checks its logits against eval); then, from the model's object file model.o:
#   flash       arm-none-eabi-size's text of model.o = the constants (.rodata: weights, biases, requantization
#               constants, input table) + the code (.text); its data and bss are 0 (no mutable global state)
#   arena       MODEL_ARENA_BYTES, next to MODEL_ARENA_LOWER_BOUND (the largest set of bytes live at once)
#   stack       the deepest the stack went in the firmware (startup.c paints it, main.c measures it): model_run
#               and main.c's printing together
#   RAM         arena + stack
# A model that does not fit the microbit (256 KB flash, 16 KB RAM) says so in the last column.
# Set DATA=DIR for another data set (default Fashion-MNIST), LOWBIT_BIN as for run.sh.
set -eu
if [ $# -lt 1 ]; then
  echo "usage: $0 MODEL.safetensors... (integer models: *.int8.safetensors, *.w4a8.safetensors, ...)" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
data=${DATA:-/usr/share/datasets/fashion-mnist}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# section_bytes OBJECT PATTERN: the bytes of the sections of OBJECT whose names match PATTERN (awk regex).
section_bytes() { arm-none-eabi-size -A "$1" | awk -v p="$2" '$1 ~ p { n += $2 } END { print n + 0 }'; }
# thousands N: N with commas (1234567 → 1,234,567), as the tables print numbers.
thousands() { echo "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }

echo "| model | mode | arena | lower bound | stack M0 / M3 | RAM (M0) | constants | code M0 / M3 | flash M0 / M3 | data / bss | microbit |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
for model in "$@"; do
  [ -f "$model" ] || { echo "sizes.sh: error: $model does not exist" >&2; exit 1; }
  for board in microbit mps2-an385; do
    rm -rf "$work/$board"
    status=0
    KEEP="$work/$board" "$here/run.sh" --board "$board" "$model" "$data" 1 >"$work/$board.log" 2>&1 || status=$?
    if [ $status -ne 0 ] && ! grep -q "does not fit the $board" "$work/$board.log"; then
      cat "$work/$board.log" >&2
      echo "sizes.sh: error: run.sh --board $board $model failed" >&2
      exit 1
    fi
  done
  # export's first line: "wrote DIR/model.c and DIR/model.h: model NAME (MODE), ..."
  name=$(sed -n 's/.*: model \([^ ]*\) (\([^)]*\)).*/\1/p' "$work/mps2-an385.log" | head -n 1)
  mode=$(sed -n 's/.*: model \([^ ]*\) (\([^)]*\)).*/\2/p' "$work/mps2-an385.log" | head -n 1)
  macro() { awk -v name="$1" '$1 == "#define" && $2 == name { print $3 }' "$work/mps2-an385/model.h"; }
  arena=$(macro MODEL_ARENA_BYTES)
  lower_bound=$(macro MODEL_ARENA_LOWER_BOUND)
  constants=$(section_bytes "$work/mps2-an385/model.o" '^\.rodata')
  code_m3=$(section_bytes "$work/mps2-an385/model.o" '^\.text')
  code_m0=$(section_bytes "$work/microbit/model.o" '^\.text')
  data_bss=$(arm-none-eabi-size "$work/mps2-an385/model.o" | awk 'NR == 2 { print $2 " / " $3 }')
  stack_m3=$(sed -n 's/.*stack used: \([0-9]*\) bytes.*/\1/p' "$work/mps2-an385.log")
  if grep -q "does not fit" "$work/microbit.log"; then
    stack_m0=–
    ram_m0=–
    fits="no: needs $(thousands "$(sed -n 's/.*it needs \([0-9]*\) bytes of flash.*/\1/p' "$work/microbit.log")") bytes of flash"
  else
    stack_m0=$(sed -n 's/.*stack used: \([0-9]*\) bytes.*/\1/p' "$work/microbit.log")
    ram_m0=$(thousands $((arena + stack_m0)))
    fits=yes
  fi
  echo "| $name | $mode | $(thousands "$arena") | $(thousands "$lower_bound") | $stack_m0 / $stack_m3 | $ram_m0 |" \
    "$(thousands "$constants") | $(thousands "$code_m0") / $(thousands "$code_m3") |" \
    "$(thousands $((constants + code_m0))) / $(thousands $((constants + code_m3))) | $data_bss | $fits |"
done
