// Exercise 04: your quantize_multiplier (quant/qparams.h; the task is docs/exercises/04-quantize-multiplier.md).
#include "core/error.h"
#include "quant/qparams.h"
#include "quant/runtime/requantize.h"

namespace lowbit::quant {

// M = m·2^(−n) with m in [2^30, 2^31) and n in [runtime::kShiftMin, runtime::kShiftMax] (eq. 6).
QuantizedMultiplier quantize_multiplier(double real_multiplier) {
  // Your code here (then delete the throw).
  throw Error("exercise 04: quantize_multiplier is not implemented yet");
}

}  // namespace lowbit::quant
