// Exercise 05: your rounding_right_shift_half_away and requantize (quant/runtime/requantize.h; the task is
// docs/exercises/05-requantize.md). Integer code only: this file is compiled into the integer runtime.
#include "core/error.h"
#include "quant/runtime/requantize.h"

namespace lowbit::quant::runtime {

// x / 2^n rounded to nearest, ties away from zero (eq. 7). n in [1, 62], |x| <= 2^62.
int64_t rounding_right_shift_half_away(int64_t x, int n) {
  throw Error("exercise 05: rounding_right_shift_half_away is not implemented yet");
}

// clamp(zero_point + round(acc · multiplier / 2^shift), act_min, act_max) with one rounding, in 64 bits (eq. 6).
int8_t requantize(int32_t acc, int32_t multiplier, int shift, int32_t zero_point, int32_t act_min, int32_t act_max) {
  throw Error("exercise 05: requantize is not implemented yet");
}

}  // namespace lowbit::quant::runtime
