// Exercise 11: your depthwise int8 convolution (quant/runtime/kernels.h; docs/exercises/11-depthwise-conv.md).
#include "core/error.h"
#include "quant/runtime/int4.h"
#include "quant/runtime/kernels.h"

// Integer code only (no float, no double): this file is compiled into the integer runtime.
namespace lowbit::quant::runtime {

// x is (N, C, H, W) codes; w is (OUT, C/G, K, K) int8 (weight_bits 8) or packed int4 rows (4; read every weight
// through weight_code in int4.h); b is (OUT); acc is (N, HO·WO, OUT) int32 (eq. 5 within each group):
//   acc[n][p][o] = b[o] + Σ_{ci < C/G, kh, kw} w[o][ci][kh][kw]·(x[n][g·C/G + ci][ih][iw] − x_zero_point)
// with g = o / (OUT/G), p = oh·WO + ow, ih = oh·stride − padding + kh, iw = ow·stride − padding + kw; positions
// outside the image hold x_zero_point. Depthwise: G = C = OUT, so C/G = 1 and channel o reads channel o only.
// `threads` may be ignored (a single thread is always correct).
void qconv2d_grouped_ref(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w, int weight_bits,
                         std::span<const int32_t> b, std::span<int32_t> acc, const ConvShape& s, int threads) {
  // Your code here (then delete the throw).
  throw Error("exercise 11: qconv2d_grouped_ref is not implemented yet");
}

}  // namespace lowbit::quant::runtime
