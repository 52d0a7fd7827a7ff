// Exercise 05 checks: the integer rounding shift (eq. 7) and requantize, one int32 accumulator to an int8 code (eq. 6).
#include <doctest/doctest.h>

#include <cstdint>

#include "quant/runtime/requantize.h"

using namespace lowbit::quant::runtime;

namespace {

constexpr int32_t kTwoTo30 = int32_t{1} << 30;  // with shift 31: M = 0.5
constexpr int64_t kTwoTo60 = int64_t{1} << 60;

}  // namespace

TEST_CASE("rounding_right_shift_half_away: x / 2^n to nearest, ties away from zero") {
  CHECK(rounding_right_shift_half_away(5, 1) == 3);    //  2.5  →  3
  CHECK(rounding_right_shift_half_away(-5, 1) == -3);  // −2.5  → −3 (not −2)
  CHECK(rounding_right_shift_half_away(3, 1) == 2);    //  1.5  →  2
  CHECK(rounding_right_shift_half_away(-3, 2) == -1);  // −0.75 → −1
  CHECK(rounding_right_shift_half_away(-2, 2) == -1);  // −0.5  → −1
  CHECK(rounding_right_shift_half_away(-1, 2) == 0);   // −0.25 →  0
  CHECK(rounding_right_shift_half_away(1, 2) == 0);    //  0.25 →  0
  CHECK(rounding_right_shift_half_away(6, 2) == 2);    //  1.5  →  2
  CHECK(rounding_right_shift_half_away(0, 5) == 0);
  CHECK(rounding_right_shift_half_away(1003, 3) == 125);    //  125.375
  CHECK(rounding_right_shift_half_away(1004, 3) == 126);    //  125.5
  CHECK(rounding_right_shift_half_away(-1004, 3) == -126);  // −125.5
  CHECK(rounding_right_shift_half_away(-1003, 3) == -125);  // −125.375
}

TEST_CASE("rounding_right_shift_half_away: no overflow up to |x| = 2^62 with n = 62") {
  CHECK(rounding_right_shift_half_away(4 * kTwoTo60, 62) == 1);       //  1
  CHECK(rounding_right_shift_half_away(-4 * kTwoTo60, 62) == -1);     // −1
  CHECK(rounding_right_shift_half_away(3 * kTwoTo60, 62) == 1);       //  0.75
  CHECK(rounding_right_shift_half_away(2 * kTwoTo60, 62) == 1);       //  0.5, a tie
  CHECK(rounding_right_shift_half_away(-2 * kTwoTo60, 62) == -1);     // −0.5, a tie
  CHECK(rounding_right_shift_half_away(2 * kTwoTo60 - 1, 62) == 0);   //  just under 0.5
  CHECK(rounding_right_shift_half_away(-2 * kTwoTo60 + 1, 62) == 0);  // −(just under 0.5)
}

TEST_CASE("requantize with M = 0.5 (m = 2^30, n = 31): out = clamp(z + round(acc / 2), act_min, act_max)") {
  CHECK(requantize(100, kTwoTo30, 31, 3, -128, 127) == 53);      // 3 + 50
  CHECK(requantize(5, kTwoTo30, 31, 0, -128, 127) == 3);         //  2.5 →  3
  CHECK(requantize(-5, kTwoTo30, 31, 0, -128, 127) == -3);       // −2.5 → −3
  CHECK(requantize(-5, kTwoTo30, 31, -10, -128, 127) == -13);    // the zero point is added after rounding
  CHECK(requantize(100, kTwoTo30, 31, 3, 0, 40) == 40);          // clamped to act_max
  CHECK(requantize(1000, kTwoTo30, 31, 0, -128, 127) == 127);    // 500 saturates
  CHECK(requantize(-1000, kTwoTo30, 31, 0, -128, 127) == -128);  // −500 saturates
}

TEST_CASE("the worked example of docs/quantization.md: m = 1759218560, n = 40, z_out = −20, fused ReLU") {
  // act_min = max(−128, z_out) = −20: real values below 0 are clamped to 0.
  CHECK(requantize(7531, 1759218560, 40, -20, -20, 127) == -8);    // 12.0496 steps → −20 + 12
  CHECK(requantize(-7531, 1759218560, 40, -20, -20, 127) == -20);  // −20 − 12 = −32 → the ReLU clamp
  CHECK(requantize(937, 1759218560, 40, 0, -128, 127) == 1);       // 1.4992: one rounding gives 1, two would give 2
}

TEST_CASE("the product acc·m needs 64 bits: the largest accumulators and multipliers") {
  constexpr int32_t kMaxAcc = INT32_MAX, kMinAcc = INT32_MIN, kMaxMultiplier = INT32_MAX;
  // (2^31 − 1)² / 2^62 = 0.9999999995 → 1;  −2^31·(2^31 − 1) / 2^62 = −(1 − 2^−31) → −1.
  CHECK(requantize(kMaxAcc, kMaxMultiplier, 62, 0, -128, 127) == 1);
  CHECK(requantize(kMinAcc, kMaxMultiplier, 62, -128, -128, 127) == -128);
  CHECK(requantize(kMinAcc, kMaxMultiplier, 62, 0, -128, 127) == -1);
  // acc·M ≈ 2^60 would wrap in 32 bits; it saturates.
  CHECK(requantize(kMaxAcc, kTwoTo30, 1, 0, -128, 127) == 127);
  CHECK(requantize(kMinAcc, kTwoTo30, 1, 0, -128, 127) == -128);
}
