// Exercise 06 checks: qgemm_s8_ref, int8 weights times int8 codes with an input zero point into int32 (eq. 5).
#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "quant/runtime/kernels.h"

using namespace lowbit::quant::runtime;

namespace {

// A value qgemm_s8_ref must overwrite.
constexpr int32_t kGarbage = 123456789;

// y = qgemm_s8_ref(x, z_in, w, b) for x (N, IN), w (OUT, IN), b (OUT); y (N, OUT).
std::vector<int32_t> gemm(const std::vector<int8_t>& x, int32_t x_zero_point, const std::vector<int8_t>& w,
                          const std::vector<int32_t>& b, int64_t n, int64_t in, int64_t out, int threads = 1) {
  std::vector<int32_t> y(static_cast<size_t>(n * out), kGarbage);
  qgemm_s8_ref(x, x_zero_point, w, b, y, n, in, out, threads);
  return y;
}

}  // namespace

TEST_CASE("one output: y = b + w·(x − z_in)") {
  // 10 + (−3)·(7 − 2) = −5
  CHECK(gemm({7}, 2, {-3}, {10}, 1, 1, 1) == std::vector<int32_t>{-5});
}

TEST_CASE("hand example: N = 2, IN = 3, OUT = 2, z_in = 3") {
  const std::vector<int8_t> x = {3,  5, -1,   // row 0: x − z_in = (0, 2, −4)
                                 10, 3, 0};   // row 1: x − z_in = (7, 0, −3)
  const std::vector<int8_t> w = {1,   -2, 4,  // channel 0
                                 127, 0,  -127};
  const std::vector<int32_t> b = {10, -5};
  const std::vector<int32_t> expected = {
      10 + 0 - 4 - 16,     // y[0][0] = −10
      -5 + 0 + 0 + 508,    // y[0][1] = 503
      10 + 7 + 0 - 12,     // y[1][0] = 5
      -5 + 889 + 0 + 381,  // y[1][1] = 1265
  };
  CHECK(gemm(x, 3, w, b, 2, 3, 2) == expected);
}

TEST_CASE("codes equal to the zero point are the real value 0 and add nothing") {
  const std::vector<int8_t> x = {-7, -7, -7, -7};  // (1, 4), all z_in
  const std::vector<int8_t> w = {127, -127, 5, 1, 2, 3, 4, 5};
  CHECK(gemm(x, -7, w, {42, -42}, 1, 4, 2) == std::vector<int32_t>{42, -42});
}

TEST_CASE("x − z_in spans [−255, 255]: it must be computed in int32, not int8") {
  // x = −128 with z_in = 127: x − z = −255. w = ±127: each product is ∓32385, four of them 129540.
  const std::vector<int8_t> x = {-128, -128, -128, -128};
  const std::vector<int8_t> w = {127, 127, 127, 127, -127, -127, -127, -127};
  CHECK(gemm(x, 127, w, {1000, 1000}, 1, 4, 2) == std::vector<int32_t>{1000 - 129540, 1000 + 129540});
  // x = 127 with z_in = −128: x − z = 255.
  CHECK(gemm({127, 127}, -128, {-127, 127}, {0}, 1, 2, 1) == std::vector<int32_t>{0});
}

TEST_CASE("the result does not depend on the thread count") {
  constexpr int64_t kN = 7, kIn = 13, kOut = 5;
  std::vector<int8_t> x(kN * kIn), w(kOut * kIn);
  std::vector<int32_t> b(kOut);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<int8_t>(static_cast<int>((i * 37 + 11) % 256) - 128);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<int8_t>(static_cast<int>((i * 53 + 5) % 255) - 127);
  for (size_t o = 0; o < b.size(); ++o) b[o] = static_cast<int32_t>(o * 1000) - 2000;
  const std::vector<int32_t> one = gemm(x, -5, w, b, kN, kIn, kOut, 1);
  CHECK(one == gemm(x, -5, w, b, kN, kIn, kOut, 2));
  CHECK(one == gemm(x, -5, w, b, kN, kIn, kOut, 3));
  for (const int32_t v : one) CHECK(v != kGarbage);  // every output was written
}
