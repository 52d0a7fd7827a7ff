// Exercise 01 checks: choose_qparams turns an observed range into a scale and a zero point (eq. 4).
#include <doctest/doctest.h>

#include <limits>

#include "core/error.h"
#include "quant/qparams.h"

using namespace lowbit;
using quant::QParams;
using quant::QRange;

namespace {

// Scales are one float division away from the real numbers written below.
constexpr double kScaleRtol = 1e-6;

constexpr QRange kInt8Activations{-128, 127};  // eq. 2, 8 bits
constexpr QRange kInt4Activations{-8, 7};      // eq. 2, 4 bits
constexpr QRange kInt8Weights{-127, 127};      // eq. 3, 8 bits
constexpr QRange kInt4Weights{-7, 7};          // eq. 3, 4 bits

void check_qparams(QParams actual, double scale, int32_t zero_point) {
  CHECK(actual.scale == doctest::Approx(scale).epsilon(kScaleRtol));
  CHECK(actual.zero_point == zero_point);
}

}  // namespace

TEST_CASE("asymmetric int8: [-1, 3] → s = 4/255, z = qmin − round(−1/s) = −128 + 64 = −64") {
  const QParams p = quant::choose_qparams(-1.f, 3.f, kInt8Activations, false);
  check_qparams(p, 4.0 / 255, -64);
  // The range's ends land on the ends of the code range, and 0 on z exactly.
  CHECK(quant::quantize(-1.f, p, kInt8Activations) == -128);
  CHECK(quant::quantize(3.f, p, kInt8Activations) == 127);
  CHECK(quant::dequantize(p.zero_point, p) == 0.f);
}

TEST_CASE("asymmetric int4: [-0.5, 1.0] → s = 1.5/15 = 0.1, z = −8 − round(−5) = −3") {
  check_qparams(quant::choose_qparams(-0.5f, 1.f, kInt4Activations, false), 0.1, -3);
}

TEST_CASE("the range is widened to contain 0, so that 0 is exactly representable") {
  // All positive: [0.3, 2.55] → [0, 2.55], s = 0.01, and 0 sits on qmin.
  check_qparams(quant::choose_qparams(0.3f, 2.55f, kInt8Activations, false), 0.01, -128);
  // All negative: [−2.55, −0.5] → [−2.55, 0], s = 0.01, z = −128 − round(−255) = 127: 0 sits on qmax.
  check_qparams(quant::choose_qparams(-2.55f, -0.5f, kInt8Activations, false), 0.01, 127);
}

TEST_CASE("symmetric: z = 0 and s = max(|min|, |max|) / qmax") {
  check_qparams(quant::choose_qparams(-0.5f, 1.27f, kInt8Weights, true), 1.27 / 127, 0);  // 0.01
  check_qparams(quant::choose_qparams(-2.54f, 1.f, kInt8Weights, true), 2.54 / 127, 0);   // 0.02
  check_qparams(quant::choose_qparams(-0.7f, 0.35f, kInt4Weights, true), 0.7 / 7, 0);     // 0.1
  check_qparams(quant::choose_qparams(0.2f, 0.7f, kInt4Weights, true), 0.7 / 7, 0);       // widened to [0, 0.7]
}

TEST_CASE("a range of width 0 gets the smallest scale, kMinScale, instead of 0") {
  const QParams asymmetric = quant::choose_qparams(0.f, 0.f, kInt8Activations, false);
  CHECK(asymmetric.scale == quant::kMinScale);
  CHECK(asymmetric.zero_point == -128);
  const QParams symmetric = quant::choose_qparams(0.f, 0.f, kInt8Weights, true);
  CHECK(symmetric.scale == quant::kMinScale);
  CHECK(symmetric.zero_point == 0);
}

TEST_CASE("max − min does not overflow float: [−1e38, 3e38] → s = 4e38/255, z = −64") {
  const QParams p = quant::choose_qparams(-1e38f, 3e38f, kInt8Activations, false);
  check_qparams(p, 4e38 / 255, -64);
}

TEST_CASE("NaN or infinite bounds and min > max throw lowbit::Error with a hint") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(quant::choose_qparams(nan, 1.f, kInt8Activations, false), doctest::Contains("not finite"),
                       Error);
  CHECK_THROWS_WITH_AS(quant::choose_qparams(-1.f, inf, kInt8Activations, false), doctest::Contains("not finite"),
                       Error);
  CHECK_THROWS_WITH_AS(quant::choose_qparams(-inf, 1.f, kInt8Weights, true), doctest::Contains("not finite"), Error);
  CHECK_THROWS_WITH_AS(quant::choose_qparams(2.f, 1.f, kInt8Activations, false), doctest::Contains("greater than"),
                       Error);
}
