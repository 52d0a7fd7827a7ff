// Tests for the quantization math (quant/qparams.h) and requantization (quant/runtime/requantize.h)
// against double, long double and __int128 references over sweeps and edge values.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "quant/qparams.h"
#include "quant/runtime/requantize.h"

using namespace lowbit;
using namespace lowbit::quant;

namespace {

constexpr double kScaleRelTolerance = 1e-6;        // float scale vs the double reference
constexpr double kRoundTripSlackCodes = 1e-4;      // float division error, in codes, on top of s/2
constexpr double kMultiplierRelTolerance = 0x1p-31;  // |m·2^-n − M| / M (eq. 6)
constexpr int kSweepCases = 20000;
constexpr int kMaxReported = 5;  // mismatches printed per failing check

const QRange kInt8 = activation_range(8);

// Collects mismatches of a sweep; report() fails once, naming the first few and the worst.
struct Mismatches {
  int count = 0;
  double max_difference = 0;
  std::string first;
  void add(double difference, const std::string& what) {
    ++count;
    max_difference = std::max(max_difference, difference);
    if (count <= kMaxReported) first += "\n  " + what;
  }
  void report(const char* sweep) const {
    INFO(sweep, ": ", count, " mismatches, max difference ", max_difference, first);
    CHECK(count == 0);
  }
};

std::string error_of(auto&& call) {
  try {
    call();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("expected a lowbit::Error");
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// The exact rational x / 2^n rounded to nearest, ties away from zero (eq. 7), by __int128
// division and remainder: an independent formulation of rounding_right_shift_half_away.
int64_t reference_round_div_pow2(__int128 x, int n) {
  const __int128 d = static_cast<__int128>(1) << n;
  __int128 q = x / d;  // truncates toward zero
  const __int128 r = x % d;
  const __int128 twice_abs_r = r < 0 ? -2 * r : 2 * r;
  if (twice_abs_r >= d) q += x < 0 ? -1 : 1;
  return static_cast<int64_t>(q);
}

// eq. 6 with the exact reference rounding.
int32_t reference_requantize(int32_t acc, int32_t m, int n, int32_t z, int32_t lo, int32_t hi) {
  const int64_t scaled = reference_round_div_pow2(static_cast<__int128>(acc) * m, n);
  return static_cast<int32_t>(std::clamp<int64_t>(z + scaled, lo, hi));
}

int32_t random_int32(Rng& rng) { return static_cast<int32_t>(static_cast<uint32_t>(rng.next_u64())); }
int32_t random_in(Rng& rng, int64_t lo, int64_t hi) {  // uniform in [lo, hi]
  return static_cast<int32_t>(lo + static_cast<int64_t>(rng.below(static_cast<uint64_t>(hi - lo + 1))));
}

}  // namespace

// ---- ranges

TEST_CASE("activation and weight ranges for 2..8 bits; 1 and 9 bits are refused") {
  for (int bits = 2; bits <= 8; ++bits) {
    CAPTURE(bits);
    const int32_t half = 1 << (bits - 1);
    CHECK(activation_range(bits).qmin == -half);
    CHECK(activation_range(bits).qmax == half - 1);
    CHECK(weight_range(bits).qmin == -(half - 1));
    CHECK(weight_range(bits).qmax == half - 1);
  }
  CHECK(activation_range(8).qmin == -128);
  CHECK(weight_range(4).qmin == -7);
  for (int bits : {1, 9, 0, 32}) {
    CAPTURE(bits);
    CHECK(contains(error_of([&] { activation_range(bits); }), "2..8"));
    CHECK(contains(error_of([&] { weight_range(bits); }), "2..8"));
  }
}

// ---- choose_qparams, quantize, dequantize

TEST_CASE("choose_qparams asymmetric: scale matches double, 0 is exact, round trip within s/2") {
  Rng rng(1);
  Mismatches scale_errors, zero_errors, round_trip_errors, clamp_errors;
  for (int bits : {2, 4, 8}) {
    const QRange range = activation_range(bits);
    for (int i = 0; i < kSweepCases / 10; ++i) {
      // all-negative, all-positive and straddling ranges over many magnitudes
      const float magnitude = std::pow(10.f, rng.uniform(-4.f, 4.f));
      float min = magnitude * rng.uniform(-1.f, 1.f), max = magnitude * rng.uniform(-1.f, 1.f);
      if (min > max) std::swap(min, max);
      const QParams p = choose_qparams(min, max, range, false);

      const double lo = std::min(static_cast<double>(min), 0.0), hi = std::max(static_cast<double>(max), 0.0);
      const double expected_scale = std::max((hi - lo) / (range.qmax - range.qmin), static_cast<double>(kMinScale));
      const double scale_error = std::abs(p.scale - expected_scale) / expected_scale;
      if (scale_error > kScaleRelTolerance)
        scale_errors.add(scale_error, fmt::format("[{}, {}]: scale {} vs {}", min, max, p.scale, expected_scale));
      if (p.zero_point < range.qmin || p.zero_point > range.qmax || dequantize(quantize(0.f, p, range), p) != 0.f)
        zero_errors.add(p.zero_point, fmt::format("[{}, {}]: zero point {}", min, max, p.zero_point));

      for (int k = 0; k <= 16; ++k) {  // points across [lo, hi], both ends included
        const auto x = static_cast<float>(lo + (hi - lo) * k / 16);
        const double error = std::abs(static_cast<double>(dequantize(quantize(x, p, range), p)) - x);
        if (error > p.scale * (0.5 + kRoundTripSlackCodes))
          round_trip_errors.add(error / p.scale, fmt::format("[{}, {}]: x {} error {} scales", min, max, x, error / p.scale));
      }
      const float above = static_cast<float>(hi) + 10 * p.scale, below = static_cast<float>(lo) - 10 * p.scale;
      if (quantize(above, p, range) != range.qmax || quantize(below, p, range) != range.qmin)
        clamp_errors.add(1, fmt::format("[{}, {}]: outside values not clamped", min, max));
    }
  }
  scale_errors.report("scale");
  zero_errors.report("zero point / exact 0");
  round_trip_errors.report("round trip");
  clamp_errors.report("clamping");
}

TEST_CASE("choose_qparams symmetric: z = 0 and s = max(|min|, |max|) / qmax") {
  Rng rng(2);
  Mismatches errors;
  for (int bits : {4, 8}) {
    const QRange range = weight_range(bits);
    for (int i = 0; i < kSweepCases / 10; ++i) {
      const float magnitude = std::pow(10.f, rng.uniform(-4.f, 4.f));
      float min = magnitude * rng.uniform(-1.f, 1.f), max = magnitude * rng.uniform(-1.f, 1.f);
      if (min > max) std::swap(min, max);
      const QParams p = choose_qparams(min, max, range, true);
      const double amax = std::max(std::abs(static_cast<double>(min)), std::abs(static_cast<double>(max)));
      const double expected = std::max(amax / range.qmax, static_cast<double>(kMinScale));
      const double error = std::abs(p.scale - expected) / expected;
      if (p.zero_point != 0 || error > kScaleRelTolerance)
        errors.add(error, fmt::format("[{}, {}]: s {} z {} vs s {}", min, max, p.scale, p.zero_point, expected));
    }
  }
  errors.report("symmetric");
  const QParams p = choose_qparams(-1.27f, 0.5f, weight_range(8), true);
  CHECK(p.scale == doctest::Approx(0.01f));
  CHECK(quantize(-1.27f, p, weight_range(8)) == -127);
  CHECK(quantize(5.f, p, weight_range(8)) == 127);
}

TEST_CASE("choose_qparams guards: an all-zero range gets kMinScale; NaN, inf and min > max throw") {
  for (bool symmetric : {false, true}) {
    const QParams p = choose_qparams(0.f, 0.f, kInt8, symmetric);
    CHECK(p.scale == kMinScale);
    CHECK(std::isfinite(p.scale));
    CHECK(dequantize(quantize(0.f, p, kInt8), p) == 0.f);
  }
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  CHECK(contains(error_of([&] { choose_qparams(nan, 1.f, kInt8, false); }), "not finite"));
  CHECK(contains(error_of([&] { choose_qparams(-1.f, nan, kInt8, true); }), "not finite"));
  CHECK(contains(error_of([&] { choose_qparams(-inf, 1.f, kInt8, false); }), "not finite"));
  CHECK(contains(error_of([&] { choose_qparams(0.f, inf, kInt8, false); }), "not finite"));
  CHECK(contains(error_of([&] { choose_qparams(2.f, 1.f, kInt8, false); }), "greater than"));
  // The widest finite range still gives a finite scale (max − min overflows float).
  const float big = std::numeric_limits<float>::max();
  const QParams wide = choose_qparams(-big, big, kInt8, false);
  CHECK(std::isfinite(wide.scale));
  CHECK(dequantize(quantize(0.f, wide, kInt8), wide) == 0.f);
}

TEST_CASE("quantize rounds ties away from zero (eq. 7) and clamps") {
  const QParams unit{1.f, 0};
  CHECK(quantize(2.5f, unit, kInt8) == 3);
  CHECK(quantize(-2.5f, unit, kInt8) == -3);
  CHECK(quantize(0.5f, unit, kInt8) == 1);
  CHECK(quantize(-0.5f, unit, kInt8) == -1);
  CHECK(quantize(1.49f, unit, kInt8) == 1);
  CHECK(quantize(-1.51f, unit, kInt8) == -2);
  CHECK(quantize(1.25f, {0.5f, 0}, kInt8) == 3);     // r/s = 2.5
  CHECK(quantize(2.5f, {1.f, 3}, kInt8) == 6);       // the zero point is added after rounding
  CHECK(quantize(-2.5f, {1.f, -3}, kInt8) == -6);
  CHECK(quantize(1000.f, unit, kInt8) == 127);
  CHECK(quantize(-1000.f, unit, kInt8) == -128);
  CHECK(quantize(7.6f, unit, activation_range(4)) == 7);
  CHECK(dequantize(-6, {0.25f, -2}) == -1.f);        // r = s·(q − z)
}

// ---- bias

TEST_CASE("quantize_bias: code at scale s_in·s_w, overflow refused") {
  CHECK(quantize_bias(0.5f, 0.01f, 0.1f) == 500);
  CHECK(quantize_bias(-0.5f, 0.01f, 0.1f) == -500);
  CHECK(quantize_bias(0.f, 1e-6f, 1e-6f) == 0);
  CHECK(dequantize(500, bias_qparams(0.01f, 0.1f)) == doctest::Approx(0.5f));
  CHECK(bias_qparams(0.01f, 0.1f).zero_point == 0);
  CHECK(contains(error_of([] { quantize_bias(1e6f, 1e-4f, 1e-4f); }), "does not fit in int32"));
  CHECK_THROWS_AS(quantize_bias(1.f, 0.f, 0.1f), Error);
  CHECK_THROWS_AS(quantize_bias(0.f, 0.f, 0.f), Error);  // 0/0 is NaN
}

// ---- quantize_multiplier

TEST_CASE("quantize_multiplier: m in [2^30, 2^31), n in [1, 62], relative error <= 2^-31") {
  std::vector<double> reals;
  for (int i = 0; i <= 1200; ++i) reals.push_back(std::pow(10.0, -9.0 + 12.0 * i / 1200));  // 1e-9 .. 1e3
  for (double near : {0.5, 1.0, 0x1p-31, 0x1p-32, 0x1p-20, 2.0, 0x1p29})
    for (double f : {1.0 - 1e-15, 1.0 - 1e-9, 1.0, 1.0 + 1e-15, 1.0 + 1e-9}) reals.push_back(near * f);
  for (double below_pot : {0.99999999, 0.999999999999, 1.99999999, 0.49999999999}) reals.push_back(below_pot);
  reals.push_back(std::nextafter(1.0, 0.0));
  reals.push_back(std::nextafter(0x1p30, 0.0));  // rounds up to 2^30? then it must throw, checked below

  Mismatches errors;
  for (double real : reals) {
    QuantizedMultiplier q{};
    try {
      q = quantize_multiplier(real);
    } catch (const Error&) {
      if (real >= 0x1p-32 && real < 0x1p30 * (1 - 0x1p-31)) errors.add(real, fmt::format("{:.17g} threw", real));
      continue;
    }
    const long double approx = std::ldexp(static_cast<long double>(q.multiplier), -q.shift);
    const double error = static_cast<double>(std::fabs(approx - real) / real);
    if (q.multiplier < runtime::kMultiplierMin || q.shift < runtime::kShiftMin || q.shift > runtime::kShiftMax ||
        error > kMultiplierRelTolerance)
      errors.add(error, fmt::format("{:.17g}: m {} shift {} relative error {}", real, q.multiplier, q.shift, error));
  }
  errors.report("quantize_multiplier");

  CHECK(quantize_multiplier(0.5).multiplier == (int32_t{1} << 30));
  CHECK(quantize_multiplier(0.5).shift == 31);
  CHECK(quantize_multiplier(1.0).shift == 30);
  CHECK(quantize_multiplier(0x1p-32).shift == 62);
}

TEST_CASE("quantize_multiplier refuses zero, negative, NaN, inf, too small and too large") {
  for (double bad : {0.0, -0.5, -1e-9, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                     -std::numeric_limits<double>::infinity()}) {
    CAPTURE(bad);
    CHECK(contains(error_of([&] { quantize_multiplier(bad); }), "finite and positive"));
  }
  for (double bad : {0x1p-33, 1e-12, 0x1p30, 1e10}) {
    CAPTURE(bad);
    CHECK(contains(error_of([&] { quantize_multiplier(bad); }), "out of the representable range"));
  }
}

// ---- requantize (eq. 6) against the exact rational acc·m / 2^n

TEST_CASE("requantize equals the exact rounding of acc·m/2^n, ties away from zero, then clamp") {
  Rng rng(3);
  Mismatches errors, shift_errors;
  const std::vector<int32_t> special{INT32_MIN, INT32_MIN + 1, INT32_MAX, 0, 1, -1, 127, -128};
  auto check_one = [&](int32_t acc, int32_t m, int n, int32_t z, int32_t lo, int32_t hi) {
    const int32_t got = runtime::requantize(acc, m, n, z, lo, hi);
    const int32_t expected = reference_requantize(acc, m, n, z, lo, hi);
    if (got != expected)
      errors.add(std::abs(got - expected), fmt::format("acc {} m {} n {} z {} [{}, {}]: {} vs {}", acc, m, n, z, lo, hi,
                                                       got, expected));
    const int64_t shifted = runtime::rounding_right_shift_half_away(int64_t{acc} * m, n);
    const int64_t exact = reference_round_div_pow2(static_cast<__int128>(acc) * m, n);
    if (shifted != exact)
      shift_errors.add(static_cast<double>(std::abs(shifted - exact)),
                       fmt::format("acc {} m {} n {}: {} vs {}", acc, m, n, shifted, exact));
  };
  for (int i = 0; i < kSweepCases; ++i) {
    const int32_t m = random_in(rng, runtime::kMultiplierMin, runtime::kMultiplierMax);
    const int n = random_in(rng, runtime::kShiftMin, runtime::kShiftMax);
    const int32_t z = random_in(rng, -128, 127);
    const bool relu = rng.uniform() < 0.3f;  // a fused ReLU is a tighter clamp
    const int32_t lo = relu ? z : -128, hi = 127;
    // accumulators of every size, and ones whose result lands inside [-300, 300] (not all clamped)
    const double unit = std::ldexp(1.0, n) / m;  // the acc that maps to 1
    const auto in_range = static_cast<int32_t>(std::clamp(rng.uniform(-300.f, 300.f) * unit, -2147483648.0, 2147483647.0));
    for (int32_t acc : {random_int32(rng), in_range, special[static_cast<size_t>(i) % special.size()]})
      check_one(acc, m, n, z, lo, hi);
  }
  // Exact ties: m = c·2^p with c odd and acc = (2k+1)·2^(n−1−p), so acc·m = odd·2^(n−1).
  for (int i = 0; i < kSweepCases; ++i) {
    const int p = random_in(rng, 0, 30);
    const int32_t c = random_in(rng, int64_t{1} << (30 - p), (int64_t{1} << (31 - p)) - 1) | 1;
    const int32_t m = c << p;
    if (m < runtime::kMultiplierMin) continue;
    const int n = random_in(rng, p + 1, std::min(runtime::kShiftMax, p + 31));
    const int64_t k_max = std::max<int64_t>(0, ((int64_t{1} << (31 - (n - 1 - p))) - 1) / 2 - 1);
    const int64_t odd = 2 * random_in(rng, 0, std::min<int64_t>(k_max, 1000)) + 1;
    const auto acc = static_cast<int32_t>((rng.uniform() < 0.5f ? -odd : odd) << (n - 1 - p));
    REQUIRE(static_cast<__int128>(acc) * m % (static_cast<__int128>(1) << (n - 1)) == 0);
    check_one(acc, m, n, 0, -128, 127);
  }
  CHECK(runtime::requantize(5, int32_t{1} << 30, 31, 0, -128, 127) == 3);    //  2.5 →  3
  CHECK(runtime::requantize(-5, int32_t{1} << 30, 31, 0, -128, 127) == -3);  // −2.5 → −3
  errors.report("requantize");
  shift_errors.report("rounding_right_shift_half_away");
}

TEST_CASE("requantize with quantize_multiplier(M) is within 1 of round(acc·M)") {
  Rng rng(4);
  Mismatches errors;
  for (int i = 0; i < kSweepCases; ++i) {
    const double real = std::pow(10.0, rng.uniform(-6.f, 1.f));
    const QuantizedMultiplier q = quantize_multiplier(real);
    const double acc_limit = std::min(150.0 / real, 2147483647.0);
    const auto acc = static_cast<int32_t>(rng.uniform(-1.f, 1.f) * acc_limit);
    const int32_t got = runtime::requantize(acc, q.multiplier, q.shift, 0, -128, 127);
    const long double exact = static_cast<long double>(acc) * static_cast<long double>(real);
    const auto expected = static_cast<int32_t>(std::clamp(std::round(exact), -128.0L, 127.0L));
    if (std::abs(got - expected) > 1)
      errors.add(std::abs(got - expected), fmt::format("acc {} M {:.17g}: {} vs {}", acc, real, got, expected));
  }
  errors.report("requantize vs real multiplier");
}

// ---- SQNR

TEST_CASE("sqnr_db on a hand example") {
  // signal 3² + 4² = 25, noise 0.5² = 0.25: 10·log10(100) = 20 dB
  CHECK(sqnr_db({3.f, 4.f}, {3.5f, 4.f}) == doctest::Approx(20.0));
  CHECK(std::isinf(sqnr_db({1.f, 2.f}, {1.f, 2.f})));
  CHECK_THROWS_AS(sqnr_db({1.f}, {1.f, 2.f}), Error);
}
