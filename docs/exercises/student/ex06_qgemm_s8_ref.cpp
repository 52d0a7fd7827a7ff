// Exercise 06: your int8 GEMM with a zero point (quant/runtime/kernels.h; docs/exercises/06-int8-gemm.md).
#include "core/error.h"
#include "quant/runtime/kernels.h"

// Integer code only (no float, no double): this file is compiled into the integer runtime.
namespace lowbit::quant::runtime {

// x is (N, IN) codes, w is (OUT, IN) int8, b is (OUT); y is (N, OUT) int32 (eq. 5):
//   y[n][o] = b[o] + Σ_k w[o][k]·(x[n][k] − x_zero_point)
// `threads` may be ignored (a single thread is always correct).
void qgemm_s8_ref(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w,
                  std::span<const int32_t> b, std::span<int32_t> y, int64_t n, int64_t in, int64_t out, int threads) {
  // Your code here (then delete the throw).
  throw Error("exercise 06: qgemm_s8_ref is not implemented yet");
}

}  // namespace lowbit::quant::runtime
