#!/bin/sh
# tools/cortex-m/check_no_float.sh FIRMWARE.elf
#
# Fails (exit 1, naming them) if a floating-point routine of libgcc is linked into the firmware. On a core
# without an FPU, compiled with -mfloat-abi=soft, every float or double operation becomes a call to one of them:
# the ARM EABI names __aeabi_f… and __aeabi_d… (fmul, dadd, fcmplt, …), __aeabi_cf…/__aeabi_cd… (compares),
# the conversions …2f / …2d (i2f, ul2d, …), and the GNU names __addsf3, __muldf3, __floatsisf, __fixdfsi, ….
# An integer-only model links none of them (it may link integer helpers: __aeabi_idiv, __aeabi_lmul, …).
set -eu
if [ $# -ne 1 ]; then
  echo "usage: $0 FIRMWARE.elf" >&2
  exit 2
fi
float_symbols=$(arm-none-eabi-nm "$1" | awk '{print $NF}' |
  grep -E '^__aeabi_(c?[fd][a-z0-9]+|[a-z0-9]*2[fd])$|^__[a-z]+[sdt]f[23]$|^__(float|fix)' || true)
if [ -n "$float_symbols" ]; then
  echo "check_no_float.sh: error: floating-point routines linked into $1:" $float_symbols >&2
  exit 1
fi
echo "no floating-point routine linked (arm-none-eabi-nm $(basename "$1"))"
