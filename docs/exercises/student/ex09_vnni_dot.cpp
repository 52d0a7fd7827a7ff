// Exercise 09: your vpdpbusd and exact int8 dot product (quant/runtime/vnni_ref.h; docs/exercises/09-exact-vnni.md).
#include "core/error.h"
#include "quant/runtime/vnni_ref.h"

// Integer code only (no float, no double): this file is compiled into the integer runtime.
namespace lowbit::quant::runtime {

// acc + Σ_{i<4} a_i·b_i, a_i = byte i of a (bits 8i..8i+7) as u8, b_i = byte i of b as s8; the adds wrap
// modulo 2^32 like the instruction's.
int32_t dpbusd_lane(int32_t acc, uint32_t a, uint32_t b) {
  // Your code here (then delete the throw).
  throw Error("exercise 09: dpbusd_lane is not implemented yet");
}

// Σ_k x[k]·w[k], through dpbusd_lane only: u8 operand x[k] + 128, s8 operand w[k], four k per call (the last
// group padded with w = 0), then subtract 128·w_sum (w_sum = Σ_k w[k], given). Exact when the true sum fits int32.
int32_t dot_s8_via_dpbusd(std::span<const int8_t> x, std::span<const int8_t> w, int32_t w_sum) {
  // Your code here (then delete the throw).
  throw Error("exercise 09: dot_s8_via_dpbusd is not implemented yet");
}

}  // namespace lowbit::quant::runtime
