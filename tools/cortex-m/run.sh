#!/bin/sh
# tools/cortex-m/run.sh [--board BOARD] MODEL.int8.safetensors [DATA_DIR] [IMAGES]
#
# Runs an integer model on an emulated Cortex-M without an FPU and checks it against eval, bit for bit:
#   1. export --format c writes model.c / model.h,
#   2. arm-none-eabi-gcc compiles them with startup.c and main.c for BOARD (-mfloat-abi=soft, no C library):
#        microbit     BBC micro:bit, Cortex-M0, 256 KB flash, 16 KB RAM       (microbit.ld)
#        mps2-an385   Arm MPS2, Cortex-M3, 4 MB + 4 MB (the default)          (mps2.ld)
#        mps2-an386   Arm MPS2, Cortex-M4 (its FPU unused), 4 MB + 4 MB       (mps2.ld)
#      A model that does not fit the board's flash or RAM is refused here, with what it needs and what the
#      board has;
#   3. check_no_float.sh proves with arm-none-eabi-nm that no floating-point routine (__aeabi_fmul,
#      __aeabi_dadd, ...) is linked; arm-none-eabi-size prints the firmware's sections;
#   4. qemu-system-arm runs the first IMAGES test images (default 100); each firmware prints
#      "image I: L0 ... L9 class C" through semihosting, then how deep its stack went. The images are const data
#      in flash next to the model: when they do not all fit, they run in several firmwares, as many per
#      firmware as fit;
#   5. eval --logits prints the same lines from lowbit's own integer runtime; the two must be identical.
# Needs: gcc-arm-none-eabi, qemu-system-arm, python3 and a build of lowbit (build/bin, or set LOWBIT_BIN).
# Set KEEP=DIR to keep the generated files and the firmware in DIR.
set -eu

board=mps2-an385
if [ "${1:-}" = --board ]; then
  [ $# -ge 2 ] || { echo "usage: $0 [--board BOARD] MODEL.int8.safetensors [DATA_DIR] [IMAGES]" >&2; exit 2; }
  board=$2
  shift 2
fi
if [ $# -lt 1 ] || [ $# -gt 3 ]; then
  echo "usage: $0 [--board microbit|mps2-an385|mps2-an386] MODEL.int8.safetensors [DATA_DIR] [IMAGES]" >&2
  exit 2
fi
model=$1
data=${2:-/usr/share/datasets/fashion-mnist}
count=${3:-100}
here=$(cd "$(dirname "$0")" && pwd)
bin=${LOWBIT_BIN:-$here/../../build/bin}

# The board: QEMU machine, core, linker script, and the flash and RAM the linker script gives.
case $board in
  microbit)   cpu=cortex-m0; script=microbit.ld; flash=262144; ram=16384 ;;
  mps2-an385) cpu=cortex-m3; script=mps2.ld; flash=4194304; ram=4194304 ;;
  mps2-an386) cpu=cortex-m4; script=mps2.ld; flash=4194304; ram=4194304 ;;
  *) echo "run.sh: error: unknown board '$board' (microbit, mps2-an385 or mps2-an386)" >&2; exit 2 ;;
esac
stack_reserve=1024 # STACK_RESERVE in sections.ld

for tool in arm-none-eabi-gcc arm-none-eabi-nm arm-none-eabi-size qemu-system-arm python3; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "run.sh: error: $tool not found (apt-get install gcc-arm-none-eabi qemu-system-arm python3)" >&2
    exit 1
  }
done
[ -x "$bin/export" ] && [ -x "$bin/eval" ] || {
  echo "run.sh: error: $bin/export or $bin/eval missing (build lowbit first, or set LOWBIT_BIN)" >&2
  exit 1
}

if [ -n "${KEEP:-}" ]; then
  work=$KEEP
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi

# 1. The model as C.
"$bin/export" --format c --model "$model" --out "$work" --prefix model
macro() { awk -v name="$1" '$1 == "#define" && $2 == name { print $3 }' "$work/model.h"; }
arena=$(macro MODEL_ARENA_BYTES)
lower_bound=$(macro MODEL_ARENA_LOWER_BOUND)
image_bytes=$(macro MODEL_INPUT_BYTES)

# 2. Cross-compile for the board's core: Thumb, software floating point (there is no FPU; there must be no
#    float either). The model and the start-up code once; main.c with each batch of images.
cflags="-mcpu=$cpu -mthumb -mfloat-abi=soft -std=c99 -O2 -Wall -Wextra -Werror -ffreestanding"
# shellcheck disable=SC2086 # $cflags is a list of flags
arm-none-eabi-gcc $cflags -c "$work/model.c" -o "$work/model.o"
# shellcheck disable=SC2086
arm-none-eabi-gcc $cflags -c "$here/startup.c" -o "$work/startup.o"
link() { # link FIRST COUNT: firmware.elf with test images FIRST .. FIRST + COUNT − 1
  python3 "$here/images_header.py" "$data" "$2" --first "$1" >"$work/images.h"
  # shellcheck disable=SC2086
  arm-none-eabi-gcc $cflags -nostdlib -T "$here/$script" -L "$here" -I "$here" -I "$work" \
    "$work/startup.o" "$here/main.c" "$work/model.o" -lgcc -o "$work/firmware.elf" 2>"$work/link.txt"
}

# Does the model fit the board? Flash: its code and constants; RAM: its arena (main.c's only buffer) and the
# stack. A firmware with one image must link; the linker checks both (sections.ld).
if ! link 0 1; then
  model_flash=$(arm-none-eabi-size "$work/model.o" | awk 'NR == 2 { print $1 + $2 }')
  echo "run.sh: error: the model does not fit the $board: it needs $model_flash bytes of flash (model.o: code +" \
    "constants) and $arena bytes of RAM for its arena plus a stack of up to $stack_reserve; the board has $flash" \
    "bytes of flash and $ram bytes of RAM. The linker said: $(grep -o -m1 -E "region .* overflowed by [0-9]+ bytes|RAM overflow.*" "$work/link.txt" || head -n 1 "$work/link.txt")" >&2
  exit 1
fi
# How many images fit next to the model: the flash left after a firmware with one image.
used=$(arm-none-eabi-size "$work/firmware.elf" | awk 'NR == 2 { print $1 + $2 }')
per_firmware=$(((flash - used) / image_bytes + 1))
[ "$per_firmware" -lt "$count" ] || per_firmware=$count

# 3. No floating-point routine, and the sizes.
"$here/check_no_float.sh" "$work/firmware.elf"
arm-none-eabi-size "$work/model.o" "$work/firmware.elf"
echo "RAM: arena $arena bytes (lower bound $lower_bound), .data + .bss of the firmware with one image above"

# 4. Run the images under QEMU (at most 10 minutes per firmware); the semihosting output goes to qemu.txt.
: >"$work/logits.txt"
stack=0
first=0
started=$(date +%s)
while [ "$first" -lt "$count" ]; do
  n=$((count - first < per_firmware ? count - first : per_firmware))
  link "$first" "$n" || { cat "$work/link.txt" >&2; exit 1; }
  rm -f "$work/qemu.txt"
  timeout 600 qemu-system-arm -M "$board" -cpu "$cpu" -nographic -monitor none -serial none \
    -semihosting-config enable=on,target=native,chardev=semihosting -chardev file,id=semihosting,path="$work/qemu.txt" \
    -kernel "$work/firmware.elf" || {
    echo "run.sh: error: qemu-system-arm failed or timed out (exit status $?) on images $first.. of the $board:" >&2
    tail -n 3 "$work/qemu.txt" >&2
    exit 1
  }
  grep '^image ' "$work/qemu.txt" >>"$work/logits.txt" || true
  used_now=$(awk '$1 == "stack:" { print $2 }' "$work/qemu.txt")
  [ "${used_now:-0}" -le "$stack" ] || stack=$used_now
  first=$((first + n))
done
seconds=$(($(date +%s) - started))
firmwares=$(((count + per_firmware - 1) / per_firmware))
echo "ran $count images in $firmwares firmware(s) of up to $per_firmware images in ${seconds}s;" \
  "stack used: $stack bytes; RAM: arena $arena + stack $stack = $((arena + stack)) bytes"

# 5. The same images through lowbit's integer runtime.
"$bin/eval" --model "$model" --data "$data" --logits "$work/eval.txt" >/dev/null
head -n "$count" "$work/eval.txt" >"$work/eval_head.txt"
lines=$(wc -l <"$work/logits.txt")
if [ "$lines" -ne "$(wc -l <"$work/eval_head.txt")" ] || ! cmp -s "$work/logits.txt" "$work/eval_head.txt"; then
  echo "run.sh: error: the Cortex-M logits differ from eval's (first differences below)" >&2
  diff "$work/eval_head.txt" "$work/logits.txt" | head -n 10 >&2
  exit 1
fi
echo "$cpu (QEMU $board): the logits of $lines test images are identical to eval's"
