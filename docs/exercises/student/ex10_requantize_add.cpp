// Exercise 10: your integer Add (quant/runtime/requantize.h; docs/exercises/10-integer-add.md).
#include "core/error.h"
#include "quant/runtime/requantize.h"

// Integer code only (no float, no double): this file is compiled into the integer runtime.
namespace lowbit::quant::runtime {

// One output code of an Add (eq. 10): both inputs brought to the fixed-point scale 2^(−shift), added exactly in
// 64 bits, rounded once (to nearest, ties away from zero, eq. 7):
//   clamp(zero_point + round((a_multiplier·(a − a_zero_point) + b_multiplier·(b − b_zero_point)) / 2^shift),
//         act_min, act_max)
// Multipliers in [0, 2^31), shift in [1, 62].
int8_t requantize_add(int8_t a, int32_t a_zero_point, int32_t a_multiplier, int8_t b, int32_t b_zero_point,
                      int32_t b_multiplier, int shift, int32_t zero_point, int32_t act_min, int32_t act_max) {
  // Your code here (then delete the throw).
  throw Error("exercise 10: requantize_add is not implemented yet");
}

}  // namespace lowbit::quant::runtime
