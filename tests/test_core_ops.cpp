// Tests of the primitive ops in core/ops.h: a gradient check for every one, and forward values
// against hand-computed numbers and naive reference loops.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "core/conv_direct.h"
#include "core/error.h"
#include "core/ops.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "tests/gradcheck.h"

using lowbit::Rng;
using lowbit::Shape;
using lowbit::Tensor;
using lowbit::test::check_all_close;
using lowbit::test::check_gradients;
using lowbit::test::GradcheckOptions;
namespace ops = lowbit::ops;

namespace {

// Forward values that are exact in float32 up to a few roundings of O(1) numbers.
constexpr double kExactAtol = 1e-6;
constexpr double kExactRtol = 1e-6;
// Forward results that sum many float32 products in a different order than the reference (sgemm, im2col).
constexpr double kSumOrderAtol = 1e-4;
constexpr double kSumOrderRtol = 1e-4;
// Hand values written to 8 significant digits.
constexpr double kHandAtol = 1e-6;
// Kinks (relu at 0, max-pool ties) are kept this far from every input value: > eps of the gradient check.
constexpr float kKinkMargin = 0.1f;

// A ReLU fused into the op before it against the two ops: results[f] holds the values of the output, then of the
// tensors `names` lists after "y", from the fused op (f = 0) and from the two (f = 1). Every value has the same
// bits, and the output has zeros and non-zeros (the ReLU's kink is crossed).
void check_same_bits_across_kink(const std::vector<std::vector<float>> (&results)[2], const char* names) {
  int zeros = 0;
  for (float v : results[1][0]) zeros += v == 0.f;
  CHECK(zeros > 0);
  CHECK(zeros < static_cast<int>(results[1][0].size()));
  REQUIRE(results[0].size() == results[1].size());
  for (size_t k = 0; k < results[0].size(); ++k) {
    INFO("result ", k, " (", names, ")");
    REQUIRE(results[0][k].size() == results[1][k].size());
    CHECK(std::memcmp(results[0][k].data(), results[1][k].data(), results[0][k].size() * sizeof(float)) == 0);
  }
}
// Statistical tolerance of the dropout keep fraction over kDropoutSamples draws (~8 standard deviations).
constexpr int64_t kDropoutSamples = 100000;
constexpr double kDropoutFractionTol = 0.013;

Tensor randn(const Shape& shape, uint64_t seed) {
  Rng rng(seed);
  return Tensor::randn(shape, rng);
}

Tensor uniform(const Shape& shape, float lo, float hi, uint64_t seed) {
  Rng rng(seed);
  return Tensor::rand(shape, lo, hi, rng);
}

// Values in [kKinkMargin, 2] with a random sign: never within kKinkMargin of zero (relu's kink).
Tensor away_from_zero(const Shape& shape, uint64_t seed) {
  Rng rng(seed);
  Tensor t = Tensor::empty(shape);
  for (float& v : t.values()) v = (rng.uniform() < 0.5f ? -1.f : 1.f) * rng.uniform(kKinkMargin, 2.f);
  return t;
}

// Values in [-2, 2], none within kKinkMargin of lo or hi (clamp's kinks).
Tensor away_from_bounds(const Shape& shape, float lo, float hi, uint64_t seed) {
  Tensor t = uniform(shape, -2.f, 2.f, seed);
  for (float& v : t.values())
    if (std::abs(v - lo) < kKinkMargin || std::abs(v - hi) < kKinkMargin) v += 2 * kKinkMargin;
  return t;
}

// Distinct values spaced kKinkMargin apart in a random order: no two elements of a pooling
// window are ever within 2 * eps of each other, so the argmax never changes under perturbation.
Tensor distinct_values(const Shape& shape, uint64_t seed) {
  Tensor t = Tensor::empty(shape);
  std::vector<float> v(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = kKinkMargin * (static_cast<float>(i) - static_cast<float>(v.size()) / 2);
  Rng rng(seed);
  rng.shuffle(std::span<float>(v));
  std::copy(v.begin(), v.end(), t.data());
  return t;
}

}  // namespace

// =============================================================================================
// Gradient checks, one per primitive, in the order of the list in core/ops.h
// =============================================================================================

TEST_CASE("gradcheck 1: add, sub, mul, div, same shape and broadcast") {
  const auto check_binary = [](const char* name, Tensor (*op)(const Tensor&, const Tensor&), Tensor a, Tensor b) {
    INFO(name, " of ", lowbit::shape_str(a.shape()), " and ", lowbit::shape_str(b.shape()));
    check_gradients([op](const std::vector<Tensor>& in) { return op(in[0], in[1]); }, {a, b});
  };
  // Denominators of div stay in [0.5, 2] in magnitude so 1/b is smooth within eps.
  const auto denominator = [](const Shape& shape, uint64_t seed) {
    Tensor t = away_from_zero(shape, seed);
    for (float& v : t.values()) v = std::copysign(0.5f + 0.75f * std::abs(v), v);
    return t;
  };
  struct Case {
    Shape a, b;
  };
  const std::vector<Case> cases = {
      {{3, 4}, {3, 4}},           // same shape
      {{5, 3}, {3}},              // row vector (OUT) over (N, OUT)
      {{3}, {5, 3}},              // ... and the other way round
      {{2, 3, 4, 5}, {3, 1, 1}},  // per-channel (C, 1, 1) over (N, C, H, W)
      {{4, 1}, {1, 3}},           // both sides broadcast
      {{2, 3}, {}},               // scalar
  };
  uint64_t seed = 10;
  for (const Case& c : cases) {
    check_binary("add", ops::add, randn(c.a, seed), randn(c.b, seed + 1));
    check_binary("sub", ops::sub, randn(c.a, seed + 2), randn(c.b, seed + 3));
    check_binary("mul", ops::mul, randn(c.a, seed + 4), randn(c.b, seed + 5));
    check_binary("div", ops::div, randn(c.a, seed + 6), denominator(c.b, seed + 7));
    seed += 10;
  }
}

TEST_CASE("gradcheck 2: neg, add_scalar, mul_scalar") {
  const Tensor x = randn({3, 4}, 20);
  check_gradients([](const std::vector<Tensor>& in) { return ops::neg(in[0]); }, {x});
  check_gradients([](const std::vector<Tensor>& in) { return ops::add_scalar(in[0], 1.5f); }, {x});
  check_gradients([](const std::vector<Tensor>& in) { return ops::mul_scalar(in[0], -2.5f); }, {x});
}

TEST_CASE("gradcheck 3: matmul with every transpose combination") {
  const int64_t m = 3, k = 5, n = 4;
  for (bool trans_a : {false, true})
    for (bool trans_b : {false, true}) {
      INFO("trans_a ", trans_a, " trans_b ", trans_b);
      const Tensor a = randn(trans_a ? Shape{k, m} : Shape{m, k}, 30);
      const Tensor b = randn(trans_b ? Shape{n, k} : Shape{k, n}, 31);
      check_gradients([=](const std::vector<Tensor>& in) { return ops::matmul(in[0], in[1], trans_a, trans_b); },
                      {a, b});
    }
}

TEST_CASE("gradcheck 4: sum and mean, over everything and along an axis") {
  const Tensor x = randn({2, 3, 4}, 40);
  check_gradients([](const std::vector<Tensor>& in) { return ops::sum(in[0]); }, {x});
  check_gradients([](const std::vector<Tensor>& in) { return ops::mean(in[0]); }, {x});
  for (int64_t axis : {0, 1, 2, -1})
    for (bool keepdim : {false, true}) {
      INFO("axis ", axis, " keepdim ", keepdim);
      check_gradients([=](const std::vector<Tensor>& in) { return ops::sum(in[0], axis, keepdim); }, {x});
      check_gradients([=](const std::vector<Tensor>& in) { return ops::mean(in[0], axis, keepdim); }, {x});
    }
}

TEST_CASE("gradcheck 5: relu, clamp, exp, log") {
  // relu: inputs at least kKinkMargin from 0, so x +- eps never crosses the kink; clamp likewise.
  check_gradients([](const std::vector<Tensor>& in) { return ops::relu(in[0]); }, {away_from_zero({4, 5}, 50)});
  check_gradients([](const std::vector<Tensor>& in) { return ops::clamp(in[0], -0.5f, 1.f); },
                  {away_from_bounds({4, 5}, -0.5f, 1.f, 53)});
  check_gradients([](const std::vector<Tensor>& in) { return ops::exp(in[0]); }, {uniform({4, 5}, -2.f, 2.f, 51)});
  check_gradients([](const std::vector<Tensor>& in) { return ops::log(in[0]); }, {uniform({4, 5}, 0.5f, 3.f, 52)});
}

TEST_CASE("gradcheck 6: reshape and flatten") {
  // A non-identity consumer (mul by a fixed tensor) makes sure the gradient lands in the right element.
  const Tensor weights = randn({4, 6}, 60);
  check_gradients(
      [&](const std::vector<Tensor>& in) {
        return ops::mul(ops::reshape(in[0], {4, -1}), weights);
      },
      {randn({2, 3, 4}, 61)});
  check_gradients([](const std::vector<Tensor>& in) { return ops::flatten(in[0]); }, {randn({2, 3, 2, 2}, 62)});
}

TEST_CASE("gradcheck 7: transpose, concat") {
  check_gradients([](const std::vector<Tensor>& in) { return ops::transpose(in[0]); }, {randn({3, 5}, 70)});
  // Channels of different counts, 4-D and 2-D; two and three parts; and the other axes.
  check_gradients(
      [](const std::vector<Tensor>& in) {
        return ops::concat({in[0], in[1]}, 1);
      },
      {randn({2, 3, 2, 3}, 71), randn({2, 1, 2, 3}, 72)});
  check_gradients([](const std::vector<Tensor>& in) { return ops::concat(in, 1); },
                  {randn({2, 2, 3, 2}, 73), randn({2, 3, 3, 2}, 74), randn({2, 1, 3, 2}, 75)});
  check_gradients([](const std::vector<Tensor>& in) { return ops::concat(in, 1); },
                  {randn({3, 2}, 76), randn({3, 4}, 77), randn({3, 1}, 78)});
  check_gradients([](const std::vector<Tensor>& in) { return ops::concat(in, 0); },
                  {randn({1, 3}, 79), randn({2, 3}, 80)});
  check_gradients([](const std::vector<Tensor>& in) { return ops::concat(in, -1); },
                  {randn({2, 2, 1}, 81), randn({2, 2, 3}, 82)});
}

TEST_CASE("gradcheck 8: conv2d with stride, padding, bias and groups variants") {
  struct Case {
    int64_t n, c, h, w, out, k, stride, padding;
    bool bias;
    int64_t groups = 1;
  };
  const std::vector<Case> cases = {
      {2, 2, 5, 5, 3, 3, 1, 0, true},      // stride 1, pad 0
      {2, 2, 5, 5, 3, 3, 1, 0, false},     // ... without bias
      {1, 3, 6, 6, 2, 3, 2, 1, true},      // stride 2, pad 1
      {2, 2, 5, 7, 2, 3, 2, 1, false},     // non-square input, stride 2, pad 1, no bias
      {2, 3, 4, 3, 4, 1, 1, 0, true},      // 1x1 kernel, non-square
      {1, 2, 5, 4, 2, 1, 2, 0, false},     // 1x1 kernel, stride 2 (skips pixels: their gradient must be 0)
      {1, 1, 4, 6, 2, 2, 1, 1, true},      // even kernel with padding
      {2, 6, 5, 4, 10, 3, 1, 1, true, 2},  // groups 2, 3 input and 5 output channels per group
      {1, 6, 5, 5, 4, 1, 2, 0, false, 2},  // groups 2, 1x1 kernel, stride 2
      {2, 3, 6, 5, 3, 3, 2, 1, true, 3},   // depthwise, stride 2, pad 1
      {1, 3, 5, 5, 6, 3, 2, 1, false, 3},  // depthwise with two output channels per input channel
      {2, 2, 4, 4, 2, 3, 1, 1, true, 2},   // depthwise, stride 1, pad 1
      {2, 2, 5, 7, 3, 5, 1, 2, true},      // 5x5 kernel, pad 2: 4 junk columns between wide output rows
  };
  uint64_t seed = 80;
  for (const Case& c : cases) {
    INFO("x (", c.n, ", ", c.c, ", ", c.h, ", ", c.w, "), w (", c.out, ", ", c.c / c.groups, ", ", c.k, ", ", c.k,
         "), stride ", c.stride, ", padding ", c.padding, ", bias ", c.bias, ", groups ", c.groups);
    std::vector<Tensor> inputs = {randn({c.n, c.c, c.h, c.w}, seed),
                                  randn({c.out, c.c / c.groups, c.k, c.k}, seed + 1)};
    if (c.bias) inputs.push_back(randn({c.out}, seed + 2));
    check_gradients(
        [&](const std::vector<Tensor>& in) {
          return ops::conv2d(in[0], in[1], c.bias ? in[2] : Tensor(), c.stride, c.padding, c.groups);
        },
        inputs);
    seed += 10;
  }
}

TEST_CASE("gradcheck 9: max_pool2d, avg_pool2d, global_avg_pool2d") {
  struct Case {
    Shape x;
    int64_t kernel, stride, padding;
  };
  const std::vector<Case> cases = {
      {{2, 2, 4, 4}, 2, 2, 0},  // kernel 2 stride 2
      {{1, 2, 5, 4}, 3, 1, 0},  // kernel 3 stride 1: overlapping windows share inputs
      {{1, 1, 5, 5}, 2, 2, 0},  // the last row and column fall outside every window: gradient 0
      {{2, 1, 5, 4}, 3, 2, 1},  // padding 1: the border windows are partly in the padding
      {{1, 2, 4, 4}, 2, 1, 1},  // even kernel, padding 1
  };
  uint64_t seed = 90;
  for (const Case& c : cases) {
    INFO("x ", lowbit::shape_str(c.x), ", kernel ", c.kernel, ", stride ", c.stride, ", padding ", c.padding);
    // Distinct values kKinkMargin apart: no ties, so max-pool is differentiable at every input.
    check_gradients(
        [&](const std::vector<Tensor>& in) { return ops::max_pool2d(in[0], c.kernel, c.stride, c.padding); },
        {distinct_values(c.x, seed)});
    check_gradients(
        [&](const std::vector<Tensor>& in) { return ops::avg_pool2d(in[0], c.kernel, c.stride, c.padding); },
        {randn(c.x, seed + 1)});
    seed += 10;
  }
  check_gradients([](const std::vector<Tensor>& in) { return ops::global_avg_pool2d(in[0]); },
                  {randn({2, 3, 4, 5}, 95)});
  check_gradients([](const std::vector<Tensor>& in) { return ops::global_avg_pool2d(in[0]); },
                  {randn({3, 2, 1, 1}, 96)});
}

TEST_CASE("gradcheck 10: batch_norm, training and eval, (N, C) and (N, C, H, W)") {
  for (const Shape& x_shape : {Shape{6, 3}, Shape{2, 3, 3, 2}}) {
    const int64_t c = x_shape[1];
    const Tensor x = randn(x_shape, 100), gamma = uniform({c}, 0.5f, 2.f, 101), beta = randn({c}, 102);
    const Tensor running_mean = randn({c}, 103), running_var = uniform({c}, 0.5f, 2.f, 104);
    for (bool training : {true, false}) {
      INFO("x ", lowbit::shape_str(x_shape), ", training ", training);
      // Scratch copies of the running statistics: f must not change state between calls.
      check_gradients(
          [&](const std::vector<Tensor>& in) {
            Tensor rm = running_mean.clone(), rv = running_var.clone();
            return ops::batch_norm(in[0], in[1], in[2], rm, rv, training);
          },
          {x, gamma, beta});
    }
  }
}

TEST_CASE("gradcheck 10b: batch_norm_relu, training and eval, (N, C) and (N, C, H, W)") {
  for (const Shape& x_shape : {Shape{6, 3}, Shape{2, 3, 3, 2}}) {
    const int64_t c = x_shape[1];
    const Tensor running_mean = randn({c}, 113), running_var = uniform({c}, 0.5f, 2.f, 114);
    for (bool training : {true, false}) {
      INFO("x ", lowbit::shape_str(x_shape), ", training ", training);
      // The first seed whose pre-activations (batch_norm's outputs) are all at least kKinkMargin from ReLU's kink,
      // so that x +- eps never crosses it.
      Tensor x, gamma, beta;
      for (uint64_t seed = 200;; seed += 10) {
        x = randn(x_shape, seed), gamma = uniform({c}, 0.5f, 2.f, seed + 1), beta = randn({c}, seed + 2);
        Tensor rm = running_mean.clone(), rv = running_var.clone();
        const Tensor pre = ops::batch_norm(x, gamma, beta, rm, rv, training);
        if (std::all_of(pre.values().begin(), pre.values().end(), [](float v) { return std::abs(v) >= kKinkMargin; }))
          break;
      }
      check_gradients(
          [&](const std::vector<Tensor>& in) {
            Tensor rm = running_mean.clone(), rv = running_var.clone();
            return ops::batch_norm_relu(in[0], in[1], in[2], rm, rv, training);
          },
          {x, gamma, beta});
    }
  }
}

TEST_CASE("gradcheck 5b: add_relu, same shape and broadcast") {
  // Values of a + b at least kKinkMargin from ReLU's kink (a seed that gives them), so that +- eps never crosses it.
  for (const auto& [a_shape, b_shape] : {std::pair<Shape, Shape>{{3, 4}, {3, 4}}, {{2, 3, 2}, {2}}}) {
    INFO("a ", lowbit::shape_str(a_shape), ", b ", lowbit::shape_str(b_shape));
    Tensor a, b;
    for (uint64_t seed = 300;; seed += 10) {
      a = randn(a_shape, seed), b = randn(b_shape, seed + 1);
      const Tensor sum = ops::add(a, b);
      if (std::all_of(sum.values().begin(), sum.values().end(), [](float v) { return std::abs(v) >= kKinkMargin; }))
        break;
    }
    check_gradients([](const std::vector<Tensor>& in) { return ops::add_relu(in[0], in[1]); }, {a, b});
  }
}

TEST_CASE("add_relu is relu(add) bit for bit: values and gradients") {
  for (const auto& [a_shape, b_shape] : {std::pair<Shape, Shape>{{4, 5, 7}, {4, 5, 7}}, {{4, 5, 7}, {7}}}) {
    INFO("a ", lowbit::shape_str(a_shape), ", b ", lowbit::shape_str(b_shape));
    const Tensor a0 = randn(a_shape, 150), b0 = randn(b_shape, 151), dy = randn(a_shape, 152);
    std::vector<std::vector<float>> results[2];
    for (int fused = 0; fused < 2; ++fused) {
      Tensor a = a0.clone(), b = b0.clone();
      a.set_requires_grad(true);
      b.set_requires_grad(true);
      const Tensor y = fused ? ops::add_relu(a, b) : ops::relu(ops::add(a, b));
      y.backward(dy);
      for (const Tensor& t : {y, a.grad(), b.grad()}) results[fused].emplace_back(t.values().begin(), t.values().end());
    }
    check_same_bits_across_kink(results, "y, da, db");
  }
}

TEST_CASE("conv2d_batch_norm is batch_norm(conv2d) in eval mode bit for bit, on every way conv2d runs") {
  struct Case {
    const char* name;
    Shape x, w;
    int64_t stride, padding, groups;
  };
  // Planes whose sizes are no multiple of 16 lanes; each conv2d path once (the direct one needs AVX-512).
  const Case cases[] = {{"3 x 3 stride 1 (direct with AVX-512)", {3, 4, 9, 11}, {6, 4, 3, 3}, 1, 1, 1},
                        {"3 x 3 stride 2 (im2col + sgemm)", {3, 4, 9, 11}, {6, 4, 3, 3}, 2, 1, 1},
                        {"1 x 1 (the input is the columns)", {3, 4, 5, 7}, {6, 4, 1, 1}, 1, 0, 1},
                        {"one input channel (im2col: too few taps for direct)", {3, 1, 9, 9}, {5, 1, 3, 3}, 1, 1, 1},
                        {"depthwise", {3, 6, 9, 11}, {6, 1, 3, 3}, 1, 1, 6},
                        {"grouped", {3, 4, 7, 7}, {6, 2, 3, 3}, 1, 1, 2}};
  lowbit::NoGradGuard no_grad;
  for (const Case& c : cases)
    for (bool bias : {false, true})
      for (bool relu : {false, true}) {
        INFO(c.name, ", bias ", bias, ", relu ", relu);
        const int64_t out = c.w[0];
        const Tensor x = randn(c.x, 130), w = randn(c.w, 131), b = bias ? randn({out}, 132) : Tensor();
        const Tensor gamma = uniform({out}, 0.5f, 2.f, 133), beta = randn({out}, 134);
        Tensor rm = randn({out}, 135), rv = uniform({out}, 0.5f, 2.f, 136);
        const Tensor conv = ops::conv2d(x, w, b, c.stride, c.padding, c.groups);
        const Tensor two = relu ? ops::batch_norm_relu(conv, gamma, beta, rm, rv, false)
                                : ops::batch_norm(conv, gamma, beta, rm, rv, false);
        const Tensor one =
            ops::conv2d_batch_norm(x, w, b, c.stride, c.padding, c.groups, gamma, beta, rm, rv, 1e-5f, relu);
        REQUIRE(one.shape() == two.shape());
        CHECK(std::memcmp(one.data(), two.data(), static_cast<size_t>(one.numel()) * sizeof(float)) == 0);
      }
}

TEST_CASE("conv2d_batch_norm refuses wrong parameters, and inputs that want a gradient") {
  const Tensor x = randn({2, 4, 5, 5}, 140), w = randn({6, 4, 3, 3}, 141), ones = Tensor::ones({6});
  const Tensor short_gamma = Tensor::ones({5});
  {
    lowbit::NoGradGuard no_grad;
    CHECK_THROWS_AS(ops::conv2d_batch_norm(x, w, Tensor(), 1, 1, 1, short_gamma, ones, ones, ones, 1e-5f, false),
                    lowbit::Error);
    CHECK_THROWS_AS(
        ops::conv2d_batch_norm(x, randn({6, 3, 3, 3}, 142), Tensor(), 1, 1, 1, ones, ones, ones, ones, 1e-5f, false),
        lowbit::Error);
  }
  Tensor wg = w.clone();
  wg.set_requires_grad(true);
  CHECK_THROWS_WITH_AS(ops::conv2d_batch_norm(x, wg, Tensor(), 1, 1, 1, ones, ones, ones, ones, 1e-5f, true),
                       doctest::Contains("NoGradGuard"), lowbit::Error);
  lowbit::NoGradGuard no_grad;  // the same call without a gradient to compute runs
  CHECK(ops::conv2d_batch_norm(x, wg, Tensor(), 1, 1, 1, ones, ones, ones, ones, 1e-5f, true).shape() ==
        Shape{2, 6, 5, 5});
}

TEST_CASE("batch_norm_relu is relu(batch_norm) bit for bit: values, gradients and running statistics") {
  // Planes of 35 values (not a multiple of the 16 lanes), values around 0 so both sides of the kink occur.
  for (const Shape& x_shape : {Shape{8, 5}, Shape{3, 4, 5, 7}}) {
    for (bool training : {true, false}) {
      INFO("x ", lowbit::shape_str(x_shape), ", training ", training);
      const int64_t c = x_shape[1];
      const Tensor x0 = randn(x_shape, 120), gamma0 = uniform({c}, 0.5f, 2.f, 121), beta0 = randn({c}, 122);
      const Tensor dy = randn(x_shape, 123);
      std::vector<std::vector<float>> results[2];
      for (int fused = 0; fused < 2; ++fused) {
        Tensor x = x0.clone(), gamma = gamma0.clone(), beta = beta0.clone();
        for (Tensor* t : {&x, &gamma, &beta}) t->set_requires_grad(true);
        Tensor rm = Tensor::zeros({c}), rv = Tensor::ones({c});
        const Tensor y = fused ? ops::batch_norm_relu(x, gamma, beta, rm, rv, training)
                               : ops::relu(ops::batch_norm(x, gamma, beta, rm, rv, training));
        y.backward(dy);
        for (const Tensor& t : {y, x.grad(), gamma.grad(), beta.grad(), rm, rv})
          results[fused].emplace_back(t.values().begin(), t.values().end());
      }
      check_same_bits_across_kink(results, "y, dx, dgamma, dbeta, running mean, running var");
    }
  }
}

TEST_CASE("gradcheck 11: dropout with a fixed mask") {
  const uint64_t mask_seed = 110;
  // The same Rng seed on every call of f gives the same mask for the analytic and numeric passes.
  check_gradients(
      [&](const std::vector<Tensor>& in) {
        Rng rng(mask_seed);
        return ops::dropout(in[0], 0.4f, /*training=*/true, rng);
      },
      {randn({5, 6}, 111)});
  check_gradients([](const std::vector<Tensor>& in) { return ops::dropout(in[0], 0.4f, /*training=*/false); },
                  {randn({5, 6}, 112)});
}

TEST_CASE("gradcheck 12: log_softmax") {
  check_gradients([](const std::vector<Tensor>& in) { return ops::log_softmax(in[0]); }, {randn({4, 5}, 120)});
}

TEST_CASE("gradcheck 13: cross_entropy") {
  const std::vector<int32_t> labels = {2, 0, 4, 1};
  check_gradients([&](const std::vector<Tensor>& in) { return ops::cross_entropy(in[0], labels); },
                  {randn({4, 5}, 130)});
}

TEST_CASE("gradcheck: a composite (x * w + b, relu, log_softmax) reuses ops correctly") {
  check_gradients(
      [](const std::vector<Tensor>& in) {
        return ops::log_softmax(ops::relu(ops::add(ops::matmul(in[0], in[1], false, true), in[2])));
      },
      {randn({4, 3}, 140), randn({5, 3}, 141), uniform({5}, 3.f, 4.f, 142)});  // bias keeps relu inputs > 0
}

// =============================================================================================
// Forward values
// =============================================================================================

TEST_CASE("forward: broadcasting add and mul give the expected values") {
  const Tensor x = Tensor::from({2, 3}, {1, 2, 3, 4, 5, 6});
  const Tensor row = Tensor::from({3}, {10, 20, 30});
  check_all_close(ops::add(x, row), Tensor::from({2, 3}, {11, 22, 33, 14, 25, 36}), kExactAtol, kExactRtol, "x + row");
  const Tensor col = Tensor::from({2, 1}, {2, -1});
  check_all_close(ops::mul(x, col), Tensor::from({2, 3}, {2, 4, 6, -4, -5, -6}), kExactAtol, kExactRtol, "x * col");
  // Per-channel (C, 1, 1) over (N, C, H, W): channel c gets c * 100 added.
  const Tensor image = Tensor::zeros({2, 3, 2, 2});
  const Tensor per_channel = Tensor::from({3, 1, 1}, {0, 100, 200});
  const Tensor y = ops::add(image, per_channel);
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t i = 0; i < 2; ++i)
        for (int64_t j = 0; j < 2; ++j) CHECK(y.at({n, c, i, j}) == 100.f * static_cast<float>(c));
}

TEST_CASE("forward: sum and mean along an axis") {
  const Tensor x = Tensor::from({2, 3}, {1, 2, 3, 4, 5, 6});
  check_all_close(ops::sum(x, 0), Tensor::from({3}, {5, 7, 9}), kExactAtol, kExactRtol, "sum axis 0");
  check_all_close(ops::sum(x, 1, true), Tensor::from({2, 1}, {6, 15}), kExactAtol, kExactRtol, "sum axis 1 keepdim");
  check_all_close(ops::mean(x, -1), Tensor::from({2}, {2, 5}), kExactAtol, kExactRtol, "mean axis -1");
  CHECK(ops::sum(x).item() == 21.f);
  CHECK(ops::mean(x).item() == doctest::Approx(3.5));
}

// The definition of matmul: c[i][j] = sum_p op(a)[i][p] * op(b)[p][j].
Tensor naive_matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t n = trans_b ? b.size(0) : b.size(1);
  Tensor c = Tensor::zeros({m, n});
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < k; ++p)
        acc += static_cast<double>(trans_a ? a.at({p, i}) : a.at({i, p})) * (trans_b ? b.at({j, p}) : b.at({p, j}));
      c.at({i, j}) = static_cast<float>(acc);
    }
  return c;
}

TEST_CASE("forward: matmul matches a naive triple loop, odd shapes and every transpose") {
  struct Case {
    int64_t m, k, n;
  };
  uint64_t seed = 200;
  for (const Case& s : {Case{1, 1, 1}, Case{7, 13, 5}, Case{3, 1, 4}, Case{1, 9, 1}, Case{17, 33, 9}})
    for (bool trans_a : {false, true})
      for (bool trans_b : {false, true}) {
        INFO("m ", s.m, " k ", s.k, " n ", s.n, " trans_a ", trans_a, " trans_b ", trans_b);
        const Tensor a = randn(trans_a ? Shape{s.k, s.m} : Shape{s.m, s.k}, seed++);
        const Tensor b = randn(trans_b ? Shape{s.n, s.k} : Shape{s.k, s.n}, seed++);
        check_all_close(ops::matmul(a, b, trans_a, trans_b), naive_matmul(a, b, trans_a, trans_b), kSumOrderAtol,
                        kSumOrderRtol, "matmul vs naive");
      }
  // One by hand: [[1, 2], [3, 4]] [[5, 6], [7, 8]] = [[19, 22], [43, 50]].
  check_all_close(ops::matmul(Tensor::from({2, 2}, {1, 2, 3, 4}), Tensor::from({2, 2}, {5, 6, 7, 8})),
                  Tensor::from({2, 2}, {19, 22, 43, 50}), kExactAtol, kExactRtol, "2x2 by hand");
}

// The definition of conv2d: y[n][o][oy][ox] = b[o] + sum_{c, ki, kj} w[o][c - c0][ki][kj] * x[n][c][iy][ix],
// iy = oy * stride - padding + ki (and likewise ix), with x = 0 outside the image; c runs over the
// input channels [c0, c0 + C / groups) of o's group, c0 = (o / (OUT / groups)) * C / groups.
Tensor naive_conv2d(const Tensor& x, const Tensor& w, const Tensor& b, int64_t stride, int64_t padding,
                    int64_t groups = 1) {
  const int64_t n = x.size(0), c = x.size(1) / groups, h = x.size(2), wd = x.size(3), out = w.size(0), k = w.size(2);
  const int64_t oh = (h + 2 * padding - k) / stride + 1, ow = (wd + 2 * padding - k) / stride + 1;
  Tensor y = Tensor::zeros({n, out, oh, ow});
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t oy = 0; oy < oh; ++oy)
        for (int64_t ox = 0; ox < ow; ++ox) {
          double acc = b.defined() ? b.at({o}) : 0.0;
          const int64_t c0 = o / (out / groups) * c;
          for (int64_t ci = 0; ci < c; ++ci)
            for (int64_t ki = 0; ki < k; ++ki)
              for (int64_t kj = 0; kj < k; ++kj) {
                const int64_t iy = oy * stride - padding + ki, ix = ox * stride - padding + kj;
                if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;
                acc += static_cast<double>(w.at({o, ci, ki, kj})) * x.at({ni, c0 + ci, iy, ix});
              }
          y.at({ni, o, oy, ox}) = static_cast<float>(acc);
        }
  return y;
}

TEST_CASE("forward: conv2d matches a naive direct convolution") {
  struct Case {
    int64_t n, c, h, w, out, k, stride, padding;
    bool bias;
  };
  const std::vector<Case> cases = {
      {1, 1, 5, 5, 1, 3, 1, 0, false},  // the textbook case
      {2, 3, 7, 6, 4, 3, 2, 1, true},   // non-square, stride 2, pad 1
      {2, 2, 5, 7, 3, 1, 1, 0, true},   // 1x1 kernel
      {1, 3, 8, 8, 2, 5, 3, 2, true},   // big kernel, stride 3, pad 2
      {3, 4, 6, 5, 3, 2, 2, 0, false},  // even kernel, remainder rows dropped
      {1, 2, 3, 3, 2, 3, 1, 1, true},   // "same" padding
      {2, 1, 1, 1, 2, 3, 1, 1, false},  // 1x1 image, all but the centre tap in the padding
      {2, 3, 9, 6, 5, 5, 1, 2, true},   // 5x5, pad 2, stride 1 (wide columns, 4 junk per row)
      {1, 2, 4, 9, 3, 3, 1, 0, false},  // stride 1, no padding: the planes are the input
  };
  uint64_t seed = 300;
  for (const Case& c : cases) {
    INFO("x (", c.n, ", ", c.c, ", ", c.h, ", ", c.w, "), w (", c.out, ", ", c.c, ", ", c.k, ", ", c.k, "), stride ",
         c.stride, ", padding ", c.padding, ", bias ", c.bias);
    const Tensor x = randn({c.n, c.c, c.h, c.w}, seed), w = randn({c.out, c.c, c.k, c.k}, seed + 1);
    const Tensor b = c.bias ? randn({c.out}, seed + 2) : Tensor();
    check_all_close(ops::conv2d(x, w, b, c.stride, c.padding), naive_conv2d(x, w, b, c.stride, c.padding),
                    kSumOrderAtol, kSumOrderRtol, "conv2d vs naive");
    seed += 10;
  }
  // One by hand: a 3x3 image of 1..9, a 2x2 kernel of ones, bias 0.5: each output sums a 2x2 window.
  const Tensor x = Tensor::from({1, 1, 3, 3}, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  check_all_close(ops::conv2d(x, Tensor::ones({1, 1, 2, 2}), Tensor::from({1}, {0.5f})),
                  Tensor::from({1, 1, 2, 2}, {12.5f, 16.5f, 24.5f, 28.5f}), kExactAtol, kExactRtol, "2x2 box filter");
}

// Channels [first, first + count) of a (N, C, ...) or (OUT, ...) tensor, as a copy.
Tensor channel_slice(const Tensor& t, int64_t axis, int64_t first, int64_t count) {
  Shape shape = t.shape();
  const int64_t outer = axis == 0 ? 1 : shape[0], len = shape[static_cast<size_t>(axis)];
  const int64_t inner = t.numel() / (outer * len);
  shape[static_cast<size_t>(axis)] = count;
  Tensor out = Tensor::empty(shape);
  for (int64_t o = 0; o < outer; ++o)
    std::copy_n(t.data() + (o * len + first) * inner, count * inner, out.data() + o * count * inner);
  return out;
}

// The adjoint of the definition: dx[n][c][iy][ix] = sum_{o, ki, kj} w[o][c][ki][kj] * dy[n][o][oy][ox] over the
// outputs (oy, ox) whose tap (ki, kj) is (iy, ix); one group, stride 1.
Tensor naive_conv2d_dx(const Tensor& dy, const Tensor& w, const Shape& x_shape, int64_t padding) {
  const int64_t n = x_shape[0], c = x_shape[1], h = x_shape[2], wd = x_shape[3], out = w.size(0), k = w.size(2);
  const int64_t oh = dy.size(2), ow = dy.size(3);
  std::vector<double> dx(static_cast<size_t>(n * c * h * wd), 0.0);
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t oy = 0; oy < oh; ++oy)
        for (int64_t ox = 0; ox < ow; ++ox)
          for (int64_t ci = 0; ci < c; ++ci)
            for (int64_t ki = 0; ki < k; ++ki)
              for (int64_t kj = 0; kj < k; ++kj) {
                const int64_t iy = oy - padding + ki, ix = ox - padding + kj;
                if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;
                dx[static_cast<size_t>(((ni * c + ci) * h + iy) * wd + ix)] +=
                    static_cast<double>(w.at({o, ci, ki, kj})) * dy.at({ni, o, oy, ox});
              }
  Tensor result = Tensor::empty(x_shape);
  std::transform(dx.begin(), dx.end(), result.data(), [](double v) { return static_cast<float>(v); });
  return result;
}

// The gradient of the weights: dw[o][c][ki][kj] = sum_{n, oy, ox} dy[n][o][oy][ox] * x[n][c][iy][ix], with
// iy = oy - padding + ki (and likewise ix), x = 0 outside the image; one group, stride 1.
Tensor naive_conv2d_dw(const Tensor& dy, const Tensor& x, const Shape& w_shape, int64_t padding) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), wd = x.size(3), out = w_shape[0], k = w_shape[2];
  const int64_t oh = dy.size(2), ow = dy.size(3);
  Tensor dw = Tensor::empty(w_shape);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t ki = 0; ki < k; ++ki)
        for (int64_t kj = 0; kj < k; ++kj) {
          double acc = 0;
          for (int64_t ni = 0; ni < n; ++ni)
            for (int64_t oy = 0; oy < oh; ++oy)
              for (int64_t ox = 0; ox < ow; ++ox) {
                const int64_t iy = oy - padding + ki, ix = ox - padding + kj;
                if (iy < 0 || iy >= h || ix < 0 || ix >= wd) continue;
                acc += static_cast<double>(dy.at({ni, o, oy, ox})) * x.at({ni, ci, iy, ix});
              }
          dw.at({o, ci, ki, kj}) = static_cast<float>(acc);
        }
  return dw;
}

TEST_CASE("conv2d without im2col (stride 1, AVX-512): forward, dx and dw match the definition") {
  namespace detail = lowbit::ops::detail;
  struct Case {
    int64_t n, c, h, w, out, k, padding;
  };
  const std::vector<Case> cases = {
      {2, 3, 9, 6, 5, 5, 2},      // 5 output channels: a block of 4 and one of 1 (3 zero weights)
      {1, 16, 28, 28, 16, 3, 1},  // resnet8's first block: 30 x 28 wide outputs, 53 vectors (6 + ... + 5)
      {2, 6, 14, 14, 16, 5, 0},   // lenet5's second conv; dx pads dy (10 x 10) by 4
      {1, 2, 4, 9, 3, 3, 0},      // no padding: the planes are a copy of the input
      {1, 4, 7, 7, 7, 2, 1},      // even kernel
      {1, 1, 11, 13, 2, 7, 3},    // 7 x 7, one input channel (49 taps)
      {3, 9, 1, 17, 4, 3, 1},     // one-row images, 17 wide: a vector crosses into the next plane
      {2, 5, 6, 5, 70, 3, 1},     // 70 output channels: dw in 64 + 16 (6 zero) channels
      {2, 3, 8, 8, 1, 5, 2},      // one output channel
  };
  uint64_t seed = 900;
  bool ran = false, dw_ran = false;
  for (const Case& c : cases) {
    INFO("x (", c.n, ", ", c.c, ", ", c.h, ", ", c.w, "), w (", c.out, ", ", c.c, ", ", c.k, ", ", c.k, "), padding ",
         c.padding);
    const detail::DirectConvShape shape{c.c, c.h, c.w, c.out, c.k, c.padding};
    const Tensor x = randn({c.n, c.c, c.h, c.w}, seed), w = randn({c.out, c.c, c.k, c.k}, seed + 1);
    const Tensor b = randn({c.out}, seed + 2);
    const Tensor want = naive_conv2d(x, w, b, 1, c.padding);
    if (detail::direct_conv_pays(shape)) {  // the kernel alone, image by image
      ran = true;
      const std::vector<float> packed = detail::pack_direct_weights(w.data(), shape);
      Tensor scratch = Tensor::empty({detail::direct_conv_scratch(shape)}), y = Tensor::empty(want.shape());
      const int64_t x_image = c.c * c.h * c.w, y_image = y.numel() / c.n;
      for (int64_t i = 0; i < c.n; ++i)
        detail::conv_direct(x.data() + i * x_image, packed, b.data(), y.data() + i * y_image, shape, scratch.data());
      check_all_close(y, want, kSumOrderAtol, kSumOrderRtol, "conv_direct vs naive");
    }
    // Through ops::conv2d, which takes the direct paths for these shapes where the CPU has AVX-512 (dw for
    // K = 3 and 5 only).
    Tensor xg = x.clone().set_requires_grad(true), wg = w.clone().set_requires_grad(true);
    const Tensor y = ops::conv2d(xg, wg, b, 1, c.padding);
    check_all_close(y, want, kSumOrderAtol, kSumOrderRtol, "conv2d vs naive");
    const Tensor dy = randn(y.shape(), seed + 3);
    y.backward(dy);
    check_all_close(xg.grad(), naive_conv2d_dx(dy, w, x.shape(), c.padding), kSumOrderAtol, kSumOrderRtol,
                    "conv2d dx vs naive");
    check_all_close(wg.grad(), naive_conv2d_dw(dy, x, w.shape(), c.padding), kSumOrderAtol, kSumOrderRtol,
                    "conv2d dw vs naive");
    dw_ran = dw_ran || detail::direct_dw_pays(shape);
    seed += 10;
  }
  CHECK(ran == dw_ran);  // both run where the CPU has AVX-512, on some of these shapes
  const std::string path = ran ? "conv_direct and conv_direct_dw ran (this CPU has AVX-512F)"
                               : "conv_direct skipped: this CPU lacks AVX-512F, conv2d ran im2col + sgemm only";
  MESSAGE(path);
}

TEST_CASE("forward: grouped conv2d is the concat of separate convs on channel slices") {
  struct Case {
    int64_t n, c, h, w, out, k, stride, padding, groups;
  };
  uint64_t seed = 350;
  for (const Case& c :
       {Case{2, 6, 7, 6, 4, 3, 1, 1, 2}, Case{1, 9, 6, 6, 6, 3, 2, 1, 3}, Case{2, 4, 5, 5, 8, 1, 1, 0, 4}}) {
    INFO("x (", c.n, ", ", c.c, ", ", c.h, ", ", c.w, "), OUT ", c.out, ", K ", c.k, ", groups ", c.groups);
    const Tensor x = randn({c.n, c.c, c.h, c.w}, seed), w = randn({c.out, c.c / c.groups, c.k, c.k}, seed + 1);
    const Tensor b = randn({c.out}, seed + 2);
    std::vector<Tensor> parts;
    const int64_t group_c = c.c / c.groups, group_out = c.out / c.groups;
    for (int64_t gi = 0; gi < c.groups; ++gi)
      parts.push_back(ops::conv2d(channel_slice(x, 1, gi * group_c, group_c),
                                  channel_slice(w, 0, gi * group_out, group_out),
                                  channel_slice(b, 0, gi * group_out, group_out), c.stride, c.padding));
    const Tensor y = ops::conv2d(x, w, b, c.stride, c.padding, c.groups);
    check_all_close(y, ops::concat(parts, 1), kSumOrderAtol, kSumOrderRtol, "grouped vs concat of convs");
    check_all_close(y, naive_conv2d(x, w, b, c.stride, c.padding, c.groups), kSumOrderAtol, kSumOrderRtol,
                    "grouped vs naive");
    seed += 10;
  }
}

TEST_CASE("forward: depthwise conv2d matches a direct loop") {
  struct Case {
    int64_t n, c, h, w, out, k, stride, padding;
    bool bias;
  };
  const std::vector<Case> cases = {
      {2, 3, 7, 6, 3, 3, 1, 1, true},   // stride 1, "same" padding
      {2, 4, 8, 7, 4, 3, 2, 1, false},  // stride 2, pad 1, odd width
      {1, 2, 5, 5, 6, 3, 1, 0, true},   // three output channels per input channel, no padding
      {1, 3, 9, 9, 3, 5, 3, 2, true},   // big kernel, stride 3, pad 2
      {2, 2, 1, 1, 2, 3, 1, 1, false},  // 1x1 image, all but the centre tap in the padding
      // Rows of more than 16 outputs (core/conv_direct.h's kernel: vectors of 16, the last one partly empty).
      {2, 3, 28, 28, 3, 3, 1, 1, true},   // 28 outputs a row: 16 + 12
      {1, 2, 14, 37, 2, 3, 2, 1, false},  // stride 2, 19 outputs a row, odd width
      {1, 2, 9, 34, 4, 5, 2, 2, true},    // stride 2, K 5, 17 outputs a row, two outputs per channel
      {1, 1, 4, 17, 1, 3, 2, 0, true},    // stride 2: the last window ends at the last column of the plane
      {1, 2, 6, 32, 2, 3, 1, 0, false},   // 30 outputs a row, no padding
  };
  MESSAGE("depthwise forward on the AVX-512 kernel (stride 1 and 2): ",
          std::string(lowbit::ops::detail::depthwise_direct_runs(1) ? "yes" : "no, this CPU lacks AVX-512F"));
  uint64_t seed = 380;
  for (const Case& c : cases) {
    INFO("x (", c.n, ", ", c.c, ", ", c.h, ", ", c.w, "), OUT ", c.out, ", K ", c.k, ", stride ", c.stride,
         ", padding ", c.padding);
    const Tensor x = randn({c.n, c.c, c.h, c.w}, seed), w = randn({c.out, 1, c.k, c.k}, seed + 1);
    const Tensor b = c.bias ? randn({c.out}, seed + 2) : Tensor();
    check_all_close(ops::conv2d(x, w, b, c.stride, c.padding, c.c), naive_conv2d(x, w, b, c.stride, c.padding, c.c),
                    kSumOrderAtol, kSumOrderRtol, "depthwise vs naive");
    seed += 10;
  }
  CHECK_THROWS_AS(ops::conv2d(randn({1, 4, 3, 3}, 1), randn({4, 2, 1, 1}, 2), Tensor(), 1, 0, 3), lowbit::Error);
  CHECK_THROWS_AS(ops::conv2d(randn({1, 4, 3, 3}, 1), randn({4, 1, 1, 1}, 2), Tensor(), 1, 0, 2), lowbit::Error);
}

TEST_CASE("max_pool2d 2x2: ties and odd sizes, forward and gradient against a loop written here") {
  // Values in {0, 1, 2} make ties in most windows: the first maximum in row-major order must win, in
  // the forward's argmax and so in the gradient (the 2 x 2 case has its own branch-free loops, and its own
  // loops without the argmax when no graph is recorded).
  Rng rng(7);
  // 28 x 28 and 13 x 37: many windows per plane, so the inference loop's vectors and their tails both run.
  for (const auto& [h, w] : {std::pair<int64_t, int64_t>{4, 6}, {5, 7}, {2, 2}, {6, 3}, {28, 28}, {13, 37}}) {
    Tensor x = Tensor::empty({2, 3, h, w});
    for (int64_t i = 0; i < x.numel(); ++i) x.data()[i] = static_cast<float>(static_cast<int>(rng.uniform() * 3.f));
    Tensor dy = Tensor::empty({2, 3, h / 2, w / 2});
    for (int64_t i = 0; i < dy.numel(); ++i) dy.data()[i] = static_cast<float>(i + 1);
    Tensor want_y = Tensor::empty(dy.shape()), want_dx = Tensor::zeros(x.shape());
    for (int64_t plane = 0; plane < 6; ++plane)
      for (int64_t oy = 0; oy < h / 2; ++oy)
        for (int64_t ox = 0; ox < w / 2; ++ox) {
          int64_t best = plane * h * w + 2 * oy * w + 2 * ox;
          for (int64_t ki = 0; ki < 2; ++ki)
            for (int64_t kj = 0; kj < 2; ++kj) {
              const int64_t i = plane * h * w + (2 * oy + ki) * w + 2 * ox + kj;
              if (x.data()[i] > x.data()[best]) best = i;
            }
          const int64_t o = (plane * (h / 2) + oy) * (w / 2) + ox;
          want_y.data()[o] = x.data()[best];
          want_dx.data()[best] += dy.data()[o];
        }
    Tensor leaf = x.clone().set_requires_grad(true);
    const Tensor y = ops::max_pool2d(leaf, 2, 2);
    check_all_close(y, want_y, 0, 0, "2x2 max with ties");
    ops::sum(ops::mul(y, dy)).backward();
    check_all_close(leaf.grad(), want_dx, 0, 0, "2x2 max gradient with ties");
    // Nothing to differentiate (inference): the loop without the argmax, the same maxima.
    lowbit::NoGradGuard no_grad;
    check_all_close(ops::max_pool2d(leaf, 2, 2), want_y, 0, 0, "2x2 max without a graph");
    check_all_close(ops::max_pool2d(x, 2, 2), want_y, 0, 0, "2x2 max of a tensor without gradient");
  }
}

TEST_CASE("forward: clamp, concat and global_avg_pool2d by hand") {
  const Tensor x = Tensor::from({1, 6}, {-1, 0, 3, 6, 7, 5.5f});
  check_all_close(ops::clamp(x, 0, 6), Tensor::from({1, 6}, {0, 0, 3, 6, 6, 5.5f}), kExactAtol, kExactRtol, "relu6");
  // At lo and hi exactly the gradient is 0, as PyTorch's relu6 / hardtanh: (0, 0, 1, 0, 0, 1).
  Tensor leaf = x.clone().set_requires_grad(true);
  ops::sum(ops::clamp(leaf, 0, 6)).backward();
  check_all_close(leaf.grad(), Tensor::from({1, 6}, {0, 0, 1, 0, 0, 1}), 0, 0, "relu6 gradient at the bounds");

  const Tensor a = Tensor::from({2, 1, 1, 2}, {1, 2, 3, 4}),
               b = Tensor::from({2, 2, 1, 2}, {5, 6, 7, 8, 9, 10, 11, 12});
  check_all_close(ops::concat({a, b}, 1), Tensor::from({2, 3, 1, 2}, {1, 2, 5, 6, 7, 8, 3, 4, 9, 10, 11, 12}),
                  kExactAtol, kExactRtol, "concat along channels");
  CHECK_THROWS_AS(ops::concat({a, Tensor::zeros({2, 1, 2, 2})}, 1), lowbit::Error);
  CHECK_THROWS_AS(ops::concat({a, Tensor::zeros({2, 1, 2})}, 1), lowbit::Error);

  const Tensor planes = Tensor::from({1, 2, 2, 2}, {1, 2, 3, 4, -1, 0, 0, 5});
  check_all_close(ops::global_avg_pool2d(planes), Tensor::from({1, 2, 1, 1}, {2.5f, 1.f}), kExactAtol, kExactRtol,
                  "global average");
}

TEST_CASE("forward: max_pool2d and avg_pool2d by hand") {
  // x is one 4x4 plane holding 0..15 row by row.
  std::vector<float> ramp(16);
  std::iota(ramp.begin(), ramp.end(), 0.f);
  const Tensor x = Tensor::from({1, 1, 4, 4}, ramp);
  check_all_close(ops::max_pool2d(x, 2, 2), Tensor::from({1, 1, 2, 2}, {5, 7, 13, 15}), kExactAtol, kExactRtol,
                  "max k2 s2");
  check_all_close(ops::avg_pool2d(x, 2, 2), Tensor::from({1, 1, 2, 2}, {2.5f, 4.5f, 10.5f, 12.5f}), kExactAtol,
                  kExactRtol, "avg k2 s2");
  check_all_close(ops::max_pool2d(x, 3, 1), Tensor::from({1, 1, 2, 2}, {10, 11, 14, 15}), kExactAtol, kExactRtol,
                  "max k3 s1");
  check_all_close(ops::avg_pool2d(x, 3, 1), Tensor::from({1, 1, 2, 2}, {5, 6, 9, 10}), kExactAtol, kExactRtol,
                  "avg k3 s1");
  // Negative values: the max must not be clamped at 0.
  const Tensor neg = ops::mul_scalar(x, -1.f);
  check_all_close(ops::max_pool2d(neg, 2, 2), Tensor::from({1, 1, 2, 2}, {0, -2, -8, -10}), kExactAtol, kExactRtol,
                  "max of negatives");
  // Two planes (N = 1, C = 2) are pooled independently.
  Tensor two = Tensor::zeros({1, 2, 2, 2});
  for (int i = 0; i < 4; ++i) two.data()[i] = static_cast<float>(i), two.data()[4 + i] = static_cast<float>(10 - i);
  check_all_close(ops::max_pool2d(two, 2, 2), Tensor::from({1, 2, 1, 1}, {3, 10}), kExactAtol, kExactRtol,
                  "two planes");
  // Padding 1, kernel 3, stride 2 on the 4x4 ramp: windows centred on (0, 0), (0, 2), (2, 0), (2, 2).
  // The max skips the padding (so it holds for the negated ramp too); the average divides by 9.
  check_all_close(ops::max_pool2d(x, 3, 2, 1), Tensor::from({1, 1, 2, 2}, {5, 7, 13, 15}), kExactAtol, kExactRtol,
                  "max k3 s2 p1");
  check_all_close(ops::max_pool2d(neg, 3, 2, 1), Tensor::from({1, 1, 2, 2}, {0, -1, -4, -5}), kExactAtol, kExactRtol,
                  "max k3 s2 p1 of negatives");
  check_all_close(ops::avg_pool2d(x, 3, 2, 1), Tensor::from({1, 1, 2, 2}, {10.f / 9, 24.f / 9, 51.f / 9, 90.f / 9}),
                  kExactAtol, kExactRtol, "avg k3 s2 p1");
  CHECK_THROWS_AS(ops::max_pool2d(x, 2, 2, 2), lowbit::Error);  // padding above kernel / 2
}

TEST_CASE("forward: batch_norm normalizes and updates the running statistics") {
  constexpr float kMomentum = 0.1f, kEps = 1e-5f;
  // x is (N, C) = (4, 2): channel 0 holds 1, 2, 3, 4; channel 1 holds 10, 10, 14, 14.
  const Tensor x = Tensor::from({4, 2}, {1, 10, 2, 10, 3, 14, 4, 14});
  const Tensor gamma = Tensor::from({2}, {2, 1}), beta = Tensor::from({2}, {0.5f, -1});
  Tensor running_mean = Tensor::zeros({2}), running_var = Tensor::ones({2});
  const Tensor y = ops::batch_norm(x, gamma, beta, running_mean, running_var, true, kMomentum, kEps);
  // channel 0: mean 2.5, biased var 1.25, unbiased var 5/3.  channel 1: mean 12, biased var 4, unbiased 16/3.
  // running = 0.9 * running + 0.1 * batch statistic (the variance unbiased).
  check_all_close(running_mean, Tensor::from({2}, {0.25f, 1.2f}), kHandAtol, kExactRtol, "running mean");
  check_all_close(running_var, Tensor::from({2}, {0.9f + 0.1f * 5.f / 3.f, 0.9f + 0.1f * 16.f / 3.f}), kHandAtol,
                  kExactRtol, "running var");
  // y = gamma * (x - mean) / sqrt(biased var + eps) + beta.
  std::vector<double> expected;
  for (int64_t i = 0; i < 4; ++i) {
    expected.push_back(2.0 * (x.at({i, 0}) - 2.5) / std::sqrt(1.25 + kEps) + 0.5);
    expected.push_back(1.0 * (x.at({i, 1}) - 12.0) / std::sqrt(4.0 + kEps) - 1.0);
  }
  check_all_close(lowbit::test::to_doubles(y), expected, kHandAtol, kExactRtol, "training output");
  // A second step moves the running statistics again.
  ops::batch_norm(x, gamma, beta, running_mean, running_var, true, kMomentum, kEps);
  check_all_close(running_mean, Tensor::from({2}, {0.9f * 0.25f + 0.25f, 0.9f * 1.2f + 1.2f}), kHandAtol, kExactRtol,
                  "running mean after two steps");
  // Eval mode uses the running statistics and leaves them alone.
  const Tensor before_mean = running_mean.clone(), before_var = running_var.clone();
  const Tensor ye = ops::batch_norm(x, gamma, beta, running_mean, running_var, false, kMomentum, kEps);
  check_all_close(running_mean, before_mean, 0, 0, "running mean untouched in eval");
  check_all_close(running_var, before_var, 0, 0, "running var untouched in eval");
  std::vector<double> expected_eval;
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t c = 0; c < 2; ++c)
      expected_eval.push_back(gamma.at({c}) * (x.at({i, c}) - before_mean.at({c})) /
                                  std::sqrt(static_cast<double>(before_var.at({c})) + kEps) +
                              beta.at({c}));
  check_all_close(lowbit::test::to_doubles(ye), expected_eval, kHandAtol, kExactRtol, "eval output");
  // (N, C, H, W): statistics are over N, H and W per channel.
  const Tensor image = Tensor::from({2, 1, 1, 2}, {1, 3, 5, 7});
  Tensor rm = Tensor::zeros({1}), rv = Tensor::zeros({1});
  ops::batch_norm(image, Tensor::ones({1}), Tensor::zeros({1}), rm, rv, true, 1.f, kEps);  // momentum 1: = batch
  CHECK(rm.item() == doctest::Approx(4.0));
  CHECK(rv.item() == doctest::Approx(20.0 / 3.0));  // squared deviations 9 + 1 + 1 + 9 over m - 1 = 3
}

TEST_CASE("forward: dropout zeroes about p of the values and scales the rest") {
  constexpr float kP = 0.3f;
  const Tensor x = Tensor::ones({kDropoutSamples});
  Rng rng(7);
  const Tensor y = ops::dropout(x, kP, true, rng);
  int64_t kept = 0;
  bool values_ok = true;
  for (float v : y.values()) {
    if (v != 0.f) ++kept;
    values_ok = values_ok && (v == 0.f || std::abs(v - 1.f / (1.f - kP)) < 1e-6f);
  }
  CHECK(values_ok);
  CHECK(std::abs(static_cast<double>(kept) / kDropoutSamples - (1 - kP)) < kDropoutFractionTol);
  // The same seed gives the same mask; eval mode is the identity.
  Rng again(7);
  check_all_close(ops::dropout(x, kP, true, again), y, 0, 0, "same seed, same mask");
  check_all_close(ops::dropout(x, kP, false, rng), x, 0, 0, "eval is identity");
  CHECK_THROWS_AS(ops::dropout(x, 1.f, true, rng), lowbit::Error);
}

TEST_CASE("forward: log_softmax rows sum to 1 after exp, stably for large logits") {
  const Tensor x = Tensor::from({3, 4}, {1, 2, 3, 4, -5, 0, 5, 0.5f, 1000, 1001, 999, 1000});
  const Tensor y = ops::log_softmax(x);
  const Tensor row_sums = ops::sum(ops::exp(y), 1);
  check_all_close(row_sums, Tensor::ones({3}), kHandAtol, kExactRtol, "sum of exp(log_softmax) per row");
  // By hand: log_softmax([1, 2, 3, 4])[3] = 4 - log(e + e^2 + e^3 + e^4) = -0.44018970.
  CHECK(y.at({0, 3}) == doctest::Approx(-0.44018970).epsilon(1e-6));
  // Logits near 1000 do not overflow: log_softmax(1000, 1001, 999, 1000)[1] = -log(1 + 2/e + 1/e^2) = -0.62652338.
  CHECK(y.at({2, 1}) == doctest::Approx(-0.62652338).epsilon(1e-6));
}

TEST_CASE("forward: cross_entropy against a hand value") {
  // Row 0: logits (1, 2, 3), label 2: loss log(e + e^2 + e^3) - 3 = 0.40760596.
  // Row 1: logits (0, 0, 0), label 0: loss log 3 = 1.09861229.  Mean 0.75310912.
  const Tensor logits = Tensor::from({2, 3}, {1, 2, 3, 0, 0, 0});
  const std::vector<int32_t> labels = {2, 0};
  CHECK(ops::cross_entropy(logits, labels).item() == doctest::Approx(0.75310912).epsilon(1e-6));
  // It equals the mean negative log-likelihood of log_softmax.
  const Tensor logp = ops::log_softmax(logits);
  CHECK(ops::cross_entropy(logits, labels).item() ==
        doctest::Approx(-(logp.at({0, 2}) + logp.at({1, 0})) / 2).epsilon(1e-6));
  const std::vector<int32_t> bad = {2, 3};
  CHECK_THROWS_AS(ops::cross_entropy(logits, bad), lowbit::Error);
}
