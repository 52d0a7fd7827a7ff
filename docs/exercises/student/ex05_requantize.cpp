// Exercise 05: your integer requantization (quant/runtime/requantize.h; docs/exercises/05-requantize.md).
#include "core/error.h"
#include "quant/runtime/requantize.h"

// Integer code only (no float, no double): this file is compiled into the integer runtime.
namespace lowbit::quant::runtime {

// x / 2^n rounded to nearest, ties away from zero (eq. 7). n in [1, 62], |x| <= 2^62.
int64_t rounding_right_shift_half_away(int64_t x, int n) {
  // Your code here (then delete the throw).
  throw Error("exercise 05: rounding_right_shift_half_away is not implemented yet");
}

// clamp(zero_point + round(acc · multiplier / 2^shift), act_min, act_max) with one rounding, in 64 bits (eq. 6).
int8_t requantize(int32_t acc, int32_t multiplier, int shift, int32_t zero_point, int32_t act_min, int32_t act_max) {
  // Your code here (then delete the throw).
  throw Error("exercise 05: requantize is not implemented yet");
}

}  // namespace lowbit::quant::runtime
