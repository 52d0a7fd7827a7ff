// Exercise 03 checks: fake_quantize rounds onto the grid; its backward is the straight-through estimator.
#include <doctest/doctest.h>

#include <vector>

#include "core/error.h"
#include "core/ops.h"
#include "core/tensor.h"
#include "gradcheck.h"
#include "quant/fake_quant.h"

using namespace lowbit;
using lowbit::test::check_all_close;
using lowbit::test::to_doubles;

namespace {

// Outputs are s·(q − z) with small integers and scales of 0.5 or 0.25: exact in float.
constexpr double kExactAtol = 1e-7;

constexpr quant::QRange kRange4{-8, 7};  // 4-bit activations (eq. 2)
// s = 0.5, z = −3: the representable reals are 0.5·(q + 3) for q in [−8, 7], that is [−2.5, 5.0].
constexpr quant::QParams kHalfStep{0.5f, -3};

}  // namespace

TEST_CASE("forward per tensor: y = s·(clamp(round(x/s) + z, qmin, qmax) − z)") {
  const Tensor x = Tensor::from({9}, {0.74f, 0.75f, -0.75f, 1.2f, 5.f, 5.24f, 5.25f, -2.5f, -2.76f});
  const std::vector<double> expected = {
      0.5,   // 1.48 → 1, q = −2
      1.0,   // 1.5 is a tie → away from zero → 2, q = −1
      -1.0,  // −1.5 → −2, q = −5
      1.0,   // 2.4 → 2
      5.0,   // 10, q = 7 = qmax: inside
      5.0,   // 10.48 → 10, q = 7: inside
      5.0,   // 10.5 → 11, q = 8 → clamped to 7
      -2.5,  // −5, q = −8 = qmin: inside
      -2.5,  // −5.52 → −6, q = −9 → clamped to −8
  };
  const Tensor y = quant::fake_quantize(x, {kHalfStep}, kRange4);
  CHECK(y.shape() == x.shape());
  check_all_close(to_doubles(y), expected, kExactAtol, 0, "fake_quantize forward");
}

TEST_CASE("backward per tensor: dx = dy where round(x/s) + z is inside [qmin, qmax], else 0") {
  // The same values: inside, inside, inside, inside, at qmax, inside, clamped, at qmin, clamped.
  Tensor x = Tensor::from({9}, {0.74f, 0.75f, -0.75f, 1.2f, 5.f, 5.24f, 5.25f, -2.5f, -2.76f}).set_requires_grad(true);
  const Tensor dy = Tensor::from({9}, {1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f});
  quant::fake_quantize(x, {kHalfStep}, kRange4).backward(dy);
  REQUIRE(x.grad().defined());
  // 5.24: x/s + z = 7.48 lies above qmax = 7, but its rounded code 7 does not: the rounded code decides.
  check_all_close(to_doubles(x.grad()), {1, 2, 3, 4, 5, 6, 0, 8, 0}, kExactAtol, 0, "STE gradient");
}

TEST_CASE("values far outside the range get no gradient; the gradient reaches earlier ops") {
  Tensor x = Tensor::from({4}, {100.f, -100.f, 1.f, 0.f}).set_requires_grad(true);
  const Tensor doubled = ops::mul_scalar(x, 2.f);  // 200, −200, 2, 0
  const Tensor y = quant::fake_quantize(doubled, {kHalfStep}, kRange4);
  check_all_close(to_doubles(y), {5.0, -2.5, 2.0, 0.0}, kExactAtol, 0, "forward");
  y.backward(Tensor::from({4}, {1.f, 1.f, 1.f, 1.f}));
  // d(2x)/dx = 2 where the STE passes.
  check_all_close(to_doubles(x.grad()), {0, 0, 2, 2}, kExactAtol, 0, "gradient through mul");
}

TEST_CASE("per channel along axis 0: row c uses params[c], in the forward and the backward") {
  // Row 0: s = 0.5, z = −3 as above. Row 1: s = 0.25, z = 0, reals 0.25·q in [−2.0, 1.75].
  Tensor x = Tensor::from({2, 3}, {0.75f, 5.25f, -2.5f, -2.f, -2.125f, 0.125f}).set_requires_grad(true);
  const Tensor y = quant::fake_quantize(x, {kHalfStep, {0.25f, 0}}, kRange4);
  const std::vector<double> expected = {
      1.0,  5.0, -2.5,  // row 0: tie → 2; 11 clamped to 7; −5 → −8 = qmin
      -2.0,             // −8 = qmin: inside
      -2.0,             // −8.5 is a tie → −9 → clamped to −8
      0.25,             // 0.5 is a tie → 1
  };
  check_all_close(to_doubles(y), expected, kExactAtol, 0, "per-channel forward");
  y.backward(Tensor::from({2, 3}, {1.f, 1.f, 1.f, 1.f, 1.f, 1.f}));
  check_all_close(to_doubles(x.grad()), {1, 0, 1, 1, 0, 1}, kExactAtol, 0, "per-channel STE gradient");
}

TEST_CASE("a parameter count that is neither 1 nor x.size(0) throws lowbit::Error") {
  const Tensor x = Tensor::zeros({2, 3});
  CHECK_THROWS_AS(quant::fake_quantize(x, {kHalfStep, kHalfStep, kHalfStep}, kRange4), Error);
}
