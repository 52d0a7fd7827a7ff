// Exercise 03: your fake_quantize, forward and STE backward (quant/fake_quant.h; docs/exercises/03-fake-quant-ste.md).
#include "core/error.h"
#include "quant/fake_quant.h"

namespace lowbit::quant {

// y = dequantize(quantize(x)) with params[0] for the whole tensor, or params[c] for row c along axis 0.
// Backward (record it with lowbit::record): dx = dy where round(x/s) + z is inside [qmin, qmax], else 0.
Tensor fake_quantize(const Tensor& x, const std::vector<QParams>& params, QRange range) {
  // Your code here (then delete the throw).
  throw Error("exercise 03: fake_quantize is not implemented yet");
}

}  // namespace lowbit::quant
