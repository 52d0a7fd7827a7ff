// Exercise 04 checks: quantize_multiplier writes M = s_in·s_w/s_out as m·2^(−n), m in [2^30, 2^31) (eq. 6).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "core/error.h"
#include "quant/qparams.h"
#include "quant/runtime/requantize.h"

using namespace lowbit;
using quant::QuantizedMultiplier;

namespace {

constexpr int32_t kTwoTo30 = int32_t{1} << 30;
// |m·2^(−n) − M| <= M·2^(−31): m >= 2^30 and the rounding moves it by at most 1/2.
const double kMaxRelativeError = std::ldexp(1.0, -31);

void check_multiplier(double real_multiplier, int32_t multiplier, int shift) {
  CAPTURE(real_multiplier);
  const QuantizedMultiplier q = quant::quantize_multiplier(real_multiplier);
  CHECK(q.multiplier == multiplier);
  CHECK(q.shift == shift);
}

}  // namespace

TEST_CASE("hand values: frexp gives M = f·2^e, then m = round(f·2^31) and n = 31 − e") {
  check_multiplier(0.5, kTwoTo30, 31);     // f = 0.5,  e = 0
  check_multiplier(0.75, 1610612736, 31);  // f = 0.75, e = 0: 0.75·2^31
  check_multiplier(1.0, kTwoTo30, 30);     // f = 0.5,  e = 1
  check_multiplier(3.0, 1610612736, 29);   // f = 0.75, e = 2
  check_multiplier(0.1, 1717986918, 34);   // f = 0.8,  e = −3: 0.8·2^31 = 1717986918.4 → 1717986918
  check_multiplier(0.3, 1288490189, 32);   // f = 0.6,  e = −1: 0.6·2^31 = 1288490188.8 → 1288490189
}

TEST_CASE("the worked example of docs/quantization.md: s_in 0.02, s_w 0.004, s_out 0.05 → m 1759218560, n 40") {
  // The scales are float32 values, multiplied in double, and M is stored as float32 as convert() does:
  // M = 0.00160000001639... → float32 0.00159999995958 = 0.81919997931 · 2^−9.
  const auto stored = static_cast<float>(static_cast<double>(0.02f) * static_cast<double>(0.004f) /
                                         static_cast<double>(0.05f));
  check_multiplier(static_cast<double>(stored), 1759218560, 40);
  // The unrounded double M gives a slightly different mantissa: the float32 step matters.
  check_multiplier(static_cast<double>(0.02f) * static_cast<double>(0.004f) / static_cast<double>(0.05f), 1759218622,
                   40);
}

TEST_CASE("a mantissa that rounds up to 2^31 is halved and the shift goes down by one") {
  // M = 1 − 2^−40: f·2^31 = 2^31 − 2^−9 rounds to 2^31, which does not fit; 2^30·2^−30 = 1.
  check_multiplier(1.0 - std::ldexp(1.0, -40), kTwoTo30, 30);
}

TEST_CASE("every result is in range and within 2^−31 relative of M, from M = 2^−32 to just under 2^30") {
  int checked = 0;
  for (double m_real = std::ldexp(1.0, -32); m_real < std::ldexp(1.0, 30); m_real *= 1.37) {
    CAPTURE(m_real);
    const QuantizedMultiplier q = quant::quantize_multiplier(m_real);
    CHECK(q.multiplier >= quant::runtime::kMultiplierMin);
    CHECK(q.shift >= quant::runtime::kShiftMin);
    CHECK(q.shift <= quant::runtime::kShiftMax);
    const double represented = std::ldexp(static_cast<double>(q.multiplier), -q.shift);
    CHECK(std::fabs(represented - m_real) <= kMaxRelativeError * m_real);
    ++checked;
  }
  CHECK(checked > 100);
}

TEST_CASE("the ends of the range: n = 62 for M = 2^−32, n = 1 for M = 2^29 and for 2^30 − 1") {
  check_multiplier(std::ldexp(1.0, -32), kTwoTo30, 62);
  check_multiplier(std::ldexp(1.0, 29), kTwoTo30, 1);
  check_multiplier(std::ldexp(1.0, 30) - 1, 2147483646, 1);  // f = 1 − 2^−30: m = 2^31 − 2
}

TEST_CASE("M outside [2^−32, 2^30), zero, negative or not finite throws lowbit::Error") {
  CHECK_THROWS_WITH_AS(quant::quantize_multiplier(std::ldexp(1.0, -33)),
                       doctest::Contains("out of the representable range"), Error);
  CHECK_THROWS_WITH_AS(quant::quantize_multiplier(std::ldexp(1.0, 30)),
                       doctest::Contains("out of the representable range"), Error);
  CHECK_THROWS_WITH_AS(quant::quantize_multiplier(0.0), doctest::Contains("finite and positive"), Error);
  CHECK_THROWS_WITH_AS(quant::quantize_multiplier(-0.5), doctest::Contains("finite and positive"), Error);
  CHECK_THROWS_WITH_AS(quant::quantize_multiplier(std::numeric_limits<double>::quiet_NaN()),
                       doctest::Contains("finite and positive"), Error);
  CHECK_THROWS_WITH_AS(quant::quantize_multiplier(std::numeric_limits<double>::infinity()),
                       doctest::Contains("finite and positive"), Error);
}
