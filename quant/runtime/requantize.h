// Integer rounding and fixed-point requantization to int8 codes: of int32 accumulators, and of an Add's two inputs.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lowbit::quant::runtime {

// The equations (derived in docs/quantization.md):
//   eq. 1  r = s·(q − z)                                   real value of a code q
//   eq. 5  acc[c] = bias[c] + Σ_k w[c,k]·(x[k] − z_in)      int32 accumulator
//   eq. 6  out = clamp(z_out + round(acc·m·2^(−n)), act_min, act_max)
//          with M = s_in·s_w[c]/s_out ≈ m·2^(−n), m in [2^30, 2^31), n in [1, 62]
//   eq. 7  round(·) rounds to nearest, ties away from zero.
//   eq. 10 out = clamp(z_out + round((m_a·(a − z_a) + m_b·(b − z_b))·2^(−n)), act_min, act_max)   an Add
//          with m_i·2^(−n) ≈ M_i = s_i/s_out, one shared n (rescale_from_scales)

inline constexpr int32_t kMultiplierMin = int32_t{1} << 30;  // m in [2^30, 2^31 − 1]
inline constexpr int32_t kMultiplierMax = INT32_MAX;
inline constexpr int kShiftMin = 1;  // n in [1, 62]
inline constexpr int kShiftMax = 62;

// sum / count rounded to nearest, ties away from zero (docs/quantization.md eq. 7). count > 0.
constexpr int32_t rounding_divide_half_away(int32_t sum, int32_t count) {
  const int64_t twice = 2 * int64_t{sum};
  const int64_t q = twice >= 0 ? (twice + count) / (2 * int64_t{count}) : -((-twice + count) / (2 * int64_t{count}));
  return static_cast<int32_t>(q);
}

// rounding_divide_half_away(sum, count) for many sums and one count <= 2^23 (the most positions validate()
// allows), a multiply in place of each division (GlobalAvgPool2d's channels on the fast paths). With
// n = 2·|sum| + count < 2^33 and D = 2·count <= 2^24, the quotient ⌊n / D⌋ is the high 64 bits of n·m for
// m = ⌈2^64 / D⌉ = (2^64 + e) / D, 0 <= e < D: n·m / 2^64 = n / D + n·e / (D·2^64), and the second term is
// below 1/D, too small to reach the next integer, while n·D < 2^64 (here n·D < 2^57).
class HalfAwayDivider {
 public:
  explicit constexpr HalfAwayDivider(int32_t count)
      : count_(static_cast<uint64_t>(count)), m_(~uint64_t{0} / (2 * static_cast<uint64_t>(count)) + 1) {}
  constexpr int32_t operator()(int32_t sum) const {
    const uint64_t magnitude = sum < 0 ? uint64_t{0} - static_cast<uint64_t>(int64_t{sum}) : static_cast<uint64_t>(sum);
    const auto q = static_cast<int64_t>(static_cast<unsigned __int128>(2 * magnitude + count_) * m_ >> 64);
    return static_cast<int32_t>(sum < 0 ? -q : q);
  }

 private:
  uint64_t count_, m_;
};

// Exercise 05 (docs/exercises/05-requantize.md): the student build only declares the next two
// functions and compiles docs/exercises/student/ex05_requantize.cpp instead.
#ifdef LOWBIT_EXERCISES
int64_t rounding_right_shift_half_away(int64_t x, int n);
int8_t requantize(int32_t acc, int32_t multiplier, int shift, int32_t zero_point, int32_t act_min, int32_t act_max);
#else
// x / 2^n rounded to nearest, ties away from zero (docs/quantization.md eq. 7). n in [1, 62]:
//   x >= 0 ? (x + 2^(n−1)) >> n : −((−x + 2^(n−1)) >> n)
// so −2.5 → −3 like +2.5 → +3. Written without a branch (signs of accumulators are unpredictable):
// with sign = 0 or −1, (x ^ sign) − sign is |x|, and (r ^ sign) − sign gives r back its sign.
// No overflow for |x| <= 2^62 (all acc·m products): |x| + 2^61 < 2^63.
constexpr int64_t rounding_right_shift_half_away(int64_t x, int n) {
  const int64_t half = int64_t{1} << (n - 1);
  const int64_t sign = x >> 63;  // 0 for x >= 0, −1 for x < 0
  const int64_t magnitude_rounded = (((x ^ sign) - sign) + half) >> n;
  return (magnitude_rounded ^ sign) - sign;
}

// One int32 accumulator to an int8 code with a single rounding in 64 bits (docs/quantization.md eq. 6):
//   out = clamp(z_out + rounding_right_shift_half_away((int64)acc·m, n), act_min, act_max).
// |acc·m| <= 2^31·(2^31 − 1) < 2^62, so the product is exact in int64.
constexpr int8_t requantize(int32_t acc, int32_t multiplier, int shift, int32_t zero_point, int32_t act_min,
                            int32_t act_max) {
  const int64_t scaled = rounding_right_shift_half_away(int64_t{acc} * multiplier, shift);
  return static_cast<int8_t>(std::clamp<int64_t>(zero_point + scaled, act_min, act_max));
}
#endif  // LOWBIT_EXERCISES

// Exercise 10 (docs/exercises/10-integer-add.md): the student build only declares the next function and
// compiles docs/exercises/student/ex10_requantize_add.cpp instead.
#ifdef LOWBIT_EXERCISES
int8_t requantize_add(int8_t a, int32_t a_zero_point, int32_t a_multiplier, int8_t b, int32_t b_zero_point,
                      int32_t b_multiplier, int shift, int32_t zero_point, int32_t act_min, int32_t act_max);
#else
// One output code of an Add of two differently scaled inputs (docs/quantization.md eq. 10): both brought to the
// fixed-point scale 2^(−n), added exactly, rounded once (eq. 7):
//   out = clamp(z_out + rounding_right_shift_half_away(m_a·(a − z_a) + m_b·(b − z_b), n), act_min, act_max).
// |q − z| <= 255 and m < 2^31: the sum stays below 2^40, exact in int64.
constexpr int8_t requantize_add(int8_t a, int32_t a_zero_point, int32_t a_multiplier, int8_t b, int32_t b_zero_point,
                                int32_t b_multiplier, int shift, int32_t zero_point, int32_t act_min, int32_t act_max) {
  const int64_t sum = int64_t{a_multiplier} * (a - a_zero_point) + int64_t{b_multiplier} * (b - b_zero_point);
  return static_cast<int8_t>(
      std::clamp<int64_t>(zero_point + rounding_right_shift_half_away(sum, shift), act_min, act_max));
}
#endif  // LOWBIT_EXERCISES

// Worked examples, checked by the compiler.
static_assert(rounding_divide_half_away(3, 2) == 2 && rounding_divide_half_away(-3, 2) == -2);
static_assert(rounding_divide_half_away(4, 3) == 1 && rounding_divide_half_away(-5, 3) == -2);
static_assert(HalfAwayDivider(2)(3) == 2 && HalfAwayDivider(2)(-3) == -2 && HalfAwayDivider(3)(-5) == -2);
// Exercise 05: the student's versions are not constexpr.
#ifndef LOWBIT_EXERCISES
static_assert(rounding_right_shift_half_away(5, 1) == 3);    //  2.5 →  3
static_assert(rounding_right_shift_half_away(-5, 1) == -3);  // −2.5 → −3
static_assert(rounding_right_shift_half_away(-3, 2) == -1);  // −0.75 → −1
static_assert(rounding_right_shift_half_away(-2, 2) == -1);  // −0.5 → −1
static_assert(rounding_right_shift_half_away(-1, 2) == 0);   // −0.25 → 0

static_assert(requantize(100, int32_t{1} << 30, 31, 3, -128, 127) == 53);  // M = 2^30·2^−31 = 0.5: 3 + 50
static_assert(requantize(100, int32_t{1} << 30, 31, 3, 0, 40) == 40);      // clamped to act_max
#endif
// Exercise 10: the student's version is not constexpr. The worked Add of docs/quantization.md: M_a = 1.25 and
// M_b = 0.5 (n = 30), a − z_a = 7 and b − z_b = −3: 7.25 output steps → 7, and z_out = −10 gives −3.
#ifndef LOWBIT_EXERCISES
static_assert(requantize_add(9, 2, 1342177280, -8, -5, 536870912, 30, -10, -128, 127) == -3);
#endif

}  // namespace lowbit::quant::runtime
