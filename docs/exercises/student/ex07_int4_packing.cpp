// Exercise 07: your int4 packing (quant/runtime/int4.h; docs/exercises/07-int4-packing.md).
#include "core/error.h"
#include "quant/runtime/int4.h"

// Integer code only (no float, no double): this file is compiled into the integer runtime.
namespace lowbit::quant::runtime {

// One byte from two codes in [−8, 7]: low in bits 0-3, high in bits 4-7, each as a 4-bit two's complement.
int8_t pack_int4_pair(int8_t low, int8_t high) {
  // Your code here (then delete the throw).
  throw Error("exercise 07: pack_int4_pair is not implemented yet");
}

// Nibble 0 (bits 0-3) or 1 (bits 4-7) of byte, sign-extended to a code in [−8, 7].
int8_t unpack_int4_nibble(int8_t byte, int nibble) {
  // Your code here (then delete the throw).
  throw Error("exercise 07: unpack_int4_nibble is not implemented yet");
}

}  // namespace lowbit::quant::runtime
