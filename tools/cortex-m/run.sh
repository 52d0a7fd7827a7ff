#!/bin/sh
# tools/cortex-m/run.sh MODEL.int8.safetensors [DATA_DIR] [IMAGES]
#
# Runs an integer model on an emulated Cortex-M3 without an FPU and checks it against eval, bit for bit:
#   1. export --format c writes model.c / model.h,
#   2. arm-none-eabi-gcc builds them with startup.c, main.c and the first IMAGES test images (default 100)
#      for QEMU's mps2-an385 board (-mcpu=cortex-m3 -mfloat-abi=soft, no C library),
#   3. arm-none-eabi-nm proves that no floating-point routine (__aeabi_fmul, __aeabi_dadd, ...) is linked,
#   4. qemu-system-arm runs it; it prints "image I: L0 ... L9 class C" through semihosting,
#   5. eval --logits prints the same lines from lowbit's own integer runtime; the two must be identical.
# Needs: gcc-arm-none-eabi, qemu-system-arm, python3 and a build of lowbit (build/bin, or set LOWBIT_BIN).
# Set KEEP=DIR to keep the generated files and the firmware in DIR.
set -eu

if [ $# -lt 1 ] || [ $# -gt 3 ]; then
  echo "usage: $0 MODEL.int8.safetensors [DATA_DIR] [IMAGES]" >&2
  exit 2
fi
model=$1
data=${2:-/usr/share/datasets/fashion-mnist}
count=${3:-100}
here=$(cd "$(dirname "$0")" && pwd)
bin=${LOWBIT_BIN:-$here/../../build/bin}
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

# 1. The model as C, and the test images as a header.
"$bin/export" --format c --model "$model" --out "$work" --prefix model
python3 "$here/images_header.py" "$data" "$count" >"$work/images.h"

# 2. Cross-compile: Cortex-M3, Thumb, software floating point (there is no FPU; there must be no float either).
arm-none-eabi-gcc -mcpu=cortex-m3 -mthumb -mfloat-abi=soft -std=c99 -O2 -Wall -Wextra -Werror \
  -ffreestanding -nostdlib -T "$here/mps2-an385.ld" -I "$here" -I "$work" \
  "$here/startup.c" "$here/main.c" "$work/model.c" -lgcc -o "$work/model.elf"

# 3. No floating-point routine of libgcc may be linked (their names: __aeabi_f…, __aeabi_d…, __aeabi_cf…,
#    conversions …2f / …2d, and the GNU names __addsf3, __muldf3, __floatsisf, __fixdfsi, …).
float_symbols=$(arm-none-eabi-nm "$work/model.elf" |
  awk '{print $NF}' | grep -E '^__aeabi_(c?[fd][a-z0-9]+|[a-z0-9]*2[fd])$|^__[a-z]+[sdt]f[23]$|^__(float|fix)' || true)
if [ -n "$float_symbols" ]; then
  echo "run.sh: error: floating-point routines linked into $work/model.elf: $float_symbols" >&2
  exit 1
fi
echo "no floating-point routine linked"
arm-none-eabi-size "$work/model.elf"

# 4. Run it under QEMU (bounded in time); the semihosting output goes to qemu.txt.
rm -f "$work/qemu.txt"
timeout 600 qemu-system-arm -M mps2-an385 -cpu cortex-m3 -nographic -monitor none -serial none \
  -semihosting-config enable=on,target=native,chardev=semihosting -chardev file,id=semihosting,path="$work/qemu.txt" \
  -kernel "$work/model.elf" || {
  echo "run.sh: error: qemu-system-arm failed or timed out (exit status $?)" >&2
  exit 1
}

# 5. The same images through lowbit's integer runtime.
"$bin/eval" --model "$model" --data "$data" --logits "$work/eval.txt" >/dev/null
head -n "$count" "$work/eval.txt" >"$work/eval_head.txt"
lines=$(wc -l <"$work/qemu.txt")
if [ "$lines" -ne "$(wc -l <"$work/eval_head.txt")" ] || ! cmp -s "$work/qemu.txt" "$work/eval_head.txt"; then
  echo "run.sh: error: the Cortex-M logits differ from eval's (first differences below)" >&2
  diff "$work/eval_head.txt" "$work/qemu.txt" | head -n 10 >&2
  exit 1
fi
echo "Cortex-M3 (QEMU mps2-an385): the logits of $lines test images are identical to eval's"
