// Test helpers: compare tensors with a readable failure report, and check backward() against
// central finite differences. Every differentiable op and module test goes through check_gradients.
#pragma once

#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/ops.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace lowbit::test {

// How many mismatching pairs a failure report lists before "...".
inline constexpr int kReportedMismatches = 6;

// Elementwise |actual - expected| <= atol + rtol * |expected|. On failure the report names `what`,
// the shapes, the first mismatching pairs (flat index: actual vs expected) and the max difference.
// Both sides are given as plain vectors so it works for tensors, gradients and hand-written values.
inline void check_all_close(const std::vector<double>& actual, const std::vector<double>& expected, double atol,
                            double rtol, const std::string& what) {
  if (actual.size() != expected.size()) {
    FAIL_CHECK(what << ": " << actual.size() << " values, expected " << expected.size());
    return;
  }
  std::string pairs;
  int mismatches = 0;
  double max_diff = 0;
  size_t max_at = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double diff = std::abs(actual[i] - expected[i]);
    const bool bad = !(diff <= atol + rtol * std::abs(expected[i]));  // NaN counts as a mismatch
    if (!(diff <= max_diff)) max_diff = diff, max_at = i;
    if (!bad) continue;
    if (mismatches < kReportedMismatches)
      pairs += fmt::format("\n    [{}] actual {:.7g} vs expected {:.7g} (diff {:.3g})", i, actual[i], expected[i], diff);
    ++mismatches;
  }
  if (mismatches > kReportedMismatches) pairs += "\n    ...";
  CHECK_MESSAGE(mismatches == 0, what << ": " << mismatches << " of " << actual.size()
                                      << " values differ (atol " << atol << ", rtol " << rtol << ")" << pairs
                                      << "\n    max difference " << max_diff << " at [" << max_at << "]");
}

inline std::vector<double> to_doubles(const Tensor& t) {
  return std::vector<double>(t.values().begin(), t.values().end());
}

inline void check_all_close(const Tensor& actual, const Tensor& expected, double atol, double rtol,
                            const std::string& what) {
  if (actual.shape() != expected.shape()) {
    FAIL_CHECK(what << ": shape " << shape_str(actual.shape()) << ", expected " << shape_str(expected.shape()));
    return;
  }
  check_all_close(to_doubles(actual), to_doubles(expected), atol, rtol, what + " " + shape_str(actual.shape()));
}

// ---------------------------------------------------------------------------------------------
// Finite-difference gradient check
//
// Checks d(sum(f(inputs) * probe))/d(input) from backward() against central differences, for
// every element of every input. A fixed random `probe` (seeded, standard normal) weights the
// output, so every output element's gradient matters and errors cannot cancel in a plain sum.
//
// Why these defaults. The forward runs in float32. For a loss L of size |L| the central difference
//   (L(x + eps) - L(x - eps)) / (2 eps)
// has truncation error ~ eps^2 |L'''| / 6 ~ 2e-5 for eps = 1e-2 and O(1) third derivatives, and
// float rounding error ~ 1e-7 |L| / eps ~ 1e-5 |L|. eps = 1e-2 balances the two for |L| of order
// 1..10; atol = 2e-3 and rtol = 2e-2 leave a margin of ~10x above both. L itself is accumulated in
// double, and the step is the one actually taken in float ((x + eps) - (x - eps)), so neither adds error.
//
// Contract for f: a pure function of `inputs` — no state that changes between calls (reset any Rng
// inside f, give batch_norm scratch running statistics). Inputs must be differentiable at every
// point within eps of their values: tests build inputs away from kinks (relu at 0, max-pool ties)
// rather than skipping elements here.
struct GradcheckOptions {
  double eps = 1e-2;
  double atol = 2e-3;
  double rtol = 2e-2;
  uint64_t seed = 1;  // of the probe
};

using GradcheckFn = std::function<Tensor(const std::vector<Tensor>&)>;

inline void check_gradients(const GradcheckFn& f, std::vector<Tensor> inputs, GradcheckOptions options = {}) {
  for (Tensor& t : inputs) t = t.clone().set_requires_grad(true);  // fresh leaves; the caller's tensors stay untouched

  // Analytic: backward() seeded with the probe is exactly d(sum(y * probe))/d(inputs).
  Tensor y = f(inputs);
  REQUIRE_MESSAGE(y.requires_grad(), "check_gradients: f's output does not depend on any input");
  Rng probe_rng(options.seed);
  const Tensor probe = Tensor::randn(y.shape(), probe_rng);
  y.backward(probe);

  const auto loss = [&]() {
    NoGradGuard no_grad;
    const Tensor out = f(inputs);
    REQUIRE_MESSAGE(out.shape() == probe.shape(), "check_gradients: f changed its output shape");
    double total = 0;
    for (int64_t i = 0; i < out.numel(); ++i) total += static_cast<double>(out.data()[i]) * probe.data()[i];
    return total;
  };

  for (size_t k = 0; k < inputs.size(); ++k) {
    Tensor& x = inputs[k];
    std::vector<double> numeric(static_cast<size_t>(x.numel()));
    for (int64_t i = 0; i < x.numel(); ++i) {
      const float original = x.data()[i];
      const float plus = original + static_cast<float>(options.eps);
      const float minus = original - static_cast<float>(options.eps);
      x.data()[i] = plus;
      const double loss_plus = loss();
      x.data()[i] = minus;
      const double loss_minus = loss();
      x.data()[i] = original;
      numeric[static_cast<size_t>(i)] = (loss_plus - loss_minus) / (static_cast<double>(plus) - minus);
    }
    const Tensor grad = x.grad();
    const std::vector<double> analytic =
        grad.defined() ? to_doubles(grad) : std::vector<double>(numeric.size(), 0.0);  // none flowed: all zero
    check_all_close(analytic, numeric, options.atol, options.rtol,
                    fmt::format("gradient of input {} {} (analytic vs numeric){}", k, shape_str(x.shape()),
                                grad.defined() ? "" : " [no gradient reached this input]"));
  }
}

}  // namespace lowbit::test
