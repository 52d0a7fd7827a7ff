// Exercise 10 checks: requantize_add, one output code of the integer Add of two differently scaled inputs (eq. 10).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "core/rng.h"
#include "quant/runtime/graph.h"
#include "quant/runtime/kernels.h"
#include "quant/runtime/requantize.h"

using namespace lowbit::quant::runtime;

namespace {

// The worked Add of docs/quantization.md (eq. 10): s_a = 0.05, s_b = 0.02, s_out = 0.04, so M_a = 1.25 and
// M_b = 0.5. The larger, 1.25 = 0.625·2^1, gives m_a = 0.625·2^31 and n = 30; then m_b = 0.5·2^30.
constexpr int32_t kWorkedMa = 1342177280, kWorkedMb = 536870912;
constexpr int kWorkedShift = 30;
constexpr int32_t kCodeMin = -128, kCodeMax = 127;
constexpr int32_t kMaxMultiplier = INT32_MAX;  // 2^31 − 1

constexpr int kRandomCases = 100000;
constexpr int kMismatchesShown = 5;

// One code of the worked Add: inputs and output with the given zero points, output clamp [act_min, act_max].
int8_t worked_add(int8_t a, int32_t a_zero_point, int8_t b, int32_t b_zero_point, int32_t zero_point,
                  int32_t act_min = kCodeMin, int32_t act_max = kCodeMax) {
  return requantize_add(a, a_zero_point, kWorkedMa, b, b_zero_point, kWorkedMb, kWorkedShift, zero_point, act_min,
                        act_max);
}

// Eq. 10 written out the long way, independently of requantize.h: the exact sum in int64, C++'s quotient by 2^n
// (which truncates towards zero), and the remainder decides: at least half a step left over rounds the quotient
// away from zero (eq. 7). |sum| < 2^40, so 2·|remainder| < 2^41 cannot overflow.
int32_t expected_add(int32_t a, int32_t za, int64_t ma, int32_t b, int32_t zb, int64_t mb, int n, int32_t z_out,
                     int32_t act_min, int32_t act_max) {
  const int64_t sum = ma * (a - za) + mb * (b - zb);
  const int64_t step = int64_t{1} << n;
  int64_t quotient = sum / step;
  const int64_t remainder = sum % step;  // the sign of sum
  if (2 * std::abs(remainder) >= step) quotient += sum < 0 ? -1 : 1;
  return static_cast<int32_t>(std::clamp<int64_t>(z_out + quotient, act_min, act_max));
}

int32_t draw(lowbit::Rng& rng, int64_t lo, int64_t hi) {  // uniform in [lo, hi]
  return static_cast<int32_t>(lo + static_cast<int64_t>(rng.below(static_cast<uint64_t>(hi - lo + 1))));
}

// requantize_add against expected_add on `cases` random draws; multipliers(n) draws the two multipliers for a
// shift n drawn by shift(). Prints the first mismatches with every argument.
template <typename Shift, typename Multiplier>
void compare_random(lowbit::Rng& rng, Shift shift, Multiplier multiplier) {
  int mismatches = 0;
  for (int i = 0; i < kRandomCases; ++i) {
    const int n = shift();
    const int32_t ma = multiplier(n), mb = multiplier(n);
    const int32_t a = draw(rng, kCodeMin, kCodeMax), b = draw(rng, kCodeMin, kCodeMax);
    const int32_t za = draw(rng, kCodeMin, kCodeMax), zb = draw(rng, kCodeMin, kCodeMax);
    const int32_t z_out = draw(rng, kCodeMin, kCodeMax);
    // The clamp: none, a fused ReLU ([z_out, 127]), or any range around z_out (a ReLU6 is one).
    int32_t act_min = kCodeMin, act_max = kCodeMax;
    const uint64_t clamp = rng.below(3);
    if (clamp == 1) act_min = z_out;
    if (clamp == 2) {
      act_min = draw(rng, kCodeMin, z_out);
      act_max = draw(rng, z_out, kCodeMax);
    }
    const int32_t want = expected_add(a, za, ma, b, zb, mb, n, z_out, act_min, act_max);
    const int32_t got =
        requantize_add(static_cast<int8_t>(a), za, ma, static_cast<int8_t>(b), zb, mb, n, z_out, act_min, act_max);
    if (got != want && ++mismatches <= kMismatchesShown) {
      FAIL_CHECK("requantize_add(a = ", a, ", z_a = ", za, ", m_a = ", ma, ", b = ", b, ", z_b = ", zb, ", m_b = ", mb,
                 ", n = ", n, ", z_out = ", z_out, ", act_min = ", act_min, ", act_max = ", act_max, ") returned ", got,
                 ", expected ", want);
    }
  }
  CHECK_MESSAGE(mismatches == 0, mismatches, " of ", kRandomCases, " random cases differ");
}

}  // namespace

TEST_CASE("the worked Add of docs/quantization.md: 1.25·7 + 0.5·(−3) = 7.25 steps → 7, z_out = −10 → −3") {
  // a − z_a = 9 − 2 = 7 (real 0.35), b − z_b = −8 − (−5) = −3 (real −0.06): real sum 0.29, code −10 + 7 (real 0.28).
  CHECK(worked_add(9, 2, -8, -5, -10) == -3);
  // Codes equal to their zero points are real 0 + 0: the output's zero point.
  CHECK(worked_add(2, 2, -5, -5, -10) == -10);
  CHECK(worked_add(-128, -128, 127, 127, 55) == 55);
}

TEST_CASE("the Add of docs/tutorial.md step 8, on a trained resnet8's own numbers") {
  // z_0 = 3, z_1 = 10, z_out = −128 with a fused ReLU (act_min = z_out); m_0 = 724219136, m_1 = 1744605056, n = 30.
  // a = 43, b = 35: m_0·40 + m_1·25 = 72583891840 = 67.6 · 2^30 → 68, and −128 + 68 = −60.
  CHECK(requantize_add(43, 3, 724219136, 35, 10, 1744605056, 30, -128, -128, 127) == -60);
}

TEST_CASE("each zero point is subtracted from its own input") {
  // z_out = 7: a − z_a = 0 − 4 = −4 → 1.25·(−4) = −5; b − z_b = 0 − (−6) = 6 → 0.5·6 = 3; 7 − 5 + 3 = 5.
  CHECK(worked_add(0, 4, 0, -6, 7) == 5);
  // The same codes with the zero points swapped: a − z_a = 6 → 7.5, b − z_b = −4 → −2; 7 + 5.5 → 7 + 6 = 13.
  CHECK(worked_add(0, -6, 0, 4, 7) == 13);
  // a − z_a spans [−255, 255]: 1.25·(−255) + 0.5·255 = −191.25 → −191, and 100 − 191 = −91.
  CHECK(worked_add(-128, 127, 127, -128, 100) == -91);
}

TEST_CASE("one rounding, to nearest, ties away from zero, of the exact sum") {
  CHECK(worked_add(2, 0, 0, 0, 0) == 3);    //  1.25·2 = 2.5, a tie → 3
  CHECK(worked_add(-2, 0, 0, 0, 0) == -3);  //  −2.5 → −3 (not −2)
  CHECK(worked_add(0, 0, 1, 0, 0) == 1);    //  0.5·1 = 0.5 → 1
  CHECK(worked_add(0, 0, -1, 0, 0) == -1);  //  −0.5 → −1
  CHECK(worked_add(3, 0, -1, 0, 0) == 3);   //  3.75 − 0.5 = 3.25 → 3
  CHECK(worked_add(1, 0, 1, 0, 0) == 2);    //  1.25 + 0.5 = 1.75 → 2
  CHECK(worked_add(-1, 0, 0, 0, 0) == -1);  // −1.25 → −1
  // Rounding each term on its own would give round(2.5) + round(0.5) = 4; the sum is exactly 3.
  CHECK(worked_add(2, 0, 1, 0, 0) == 3);
  CHECK(worked_add(-2, 0, -1, 0, 0) == -3);  // not −4
  // The tie is decided before the zero point is added: −2.5 → −3, then z_out = 10 gives 7 (not 8).
  CHECK(worked_add(-2, 0, 0, 0, 10) == 7);
}

TEST_CASE("saturation at both ends of the code range") {
  // 1.25·255 + 0.5·255 = 446.25 steps: far above 127.
  CHECK(worked_add(127, -128, 127, -128, 0) == 127);
  CHECK(worked_add(-128, 127, -128, 127, 0) == -128);  // −446.25
  // 1.25·80 = 100 fits the range on its own; z_out = 50 pushes it out: 150 → 127.
  CHECK(worked_add(80, 0, 0, 0, 50) == 127);
  CHECK(worked_add(-80, 0, 0, 0, -50) == -128);  // −150 → −128
  CHECK(worked_add(62, 0, 0, 0, 50) == 127);     // 77.5 → 78, 128 → 127: one past the end
  CHECK(worked_add(61, 0, 0, 0, 50) == 126);     // 76.25 → 76
}

TEST_CASE("a fused ReLU or ReLU6 is the clamp [act_min, act_max]") {
  // ReLU: act_min = z_out, real 0. −20 − 5 = −25 → −20.
  CHECK(worked_add(-4, 0, 0, 0, -20, -20, 127) == -20);
  CHECK(worked_add(4, 0, 0, 0, -20, -20, 127) == -15);  // positive sums pass: −20 + 5
  // ReLU6 with s_out = 0.04: act_max = z_out + 6 / 0.04 = −128 + 150 = 22.
  CHECK(worked_add(127, -33, 0, 0, -128, -128, 22) == 22);  // 1.25·160 = 200 steps, the real 8.0 → 6.0
  CHECK(worked_add(100, 0, 4, 0, -128, -128, 22) == -1);    // 125 + 2 = 127 steps, the real 5.08: kept
  CHECK(worked_add(-10, 0, 0, 0, -128, -128, 22) == -128);  // negative: real 0
}

TEST_CASE("a multiplier of 0: an input below half an output step adds nothing") {
  CHECK(requantize_add(100, 0, kWorkedMa, 127, -128, 0, kWorkedShift, 0, kCodeMin, kCodeMax) == 125);  // 1.25·100
  CHECK(requantize_add(100, 0, 0, 127, -128, 0, kWorkedShift, -7, kCodeMin, kCodeMax) == -7);
}

TEST_CASE("the sum needs 64 bits: the largest multipliers and differences") {
  // 2·255·(2^31 − 1) = 1095216659970, just under 2^40: each product alone overflows int32.
  CHECK(requantize_add(127, -128, kMaxMultiplier, 127, -128, kMaxMultiplier, 40, 0, kCodeMin, kCodeMax) == 1);
  CHECK(requantize_add(-128, 127, kMaxMultiplier, -128, 127, kMaxMultiplier, 40, 0, kCodeMin, kCodeMax) == -1);
  CHECK(requantize_add(127, -128, kMaxMultiplier, 127, -128, kMaxMultiplier, 39, 0, kCodeMin, kCodeMax) == 2);
  CHECK(requantize_add(127, -128, kMaxMultiplier, -128, 127, kMaxMultiplier, 40, 0, kCodeMin, kCodeMax) == 0);
  // n = 1: 2^40 / 2 saturates; n = 62: the sum is a tiny fraction of a step.
  CHECK(requantize_add(127, -128, kMaxMultiplier, 127, -128, kMaxMultiplier, 1, 0, kCodeMin, kCodeMax) == 127);
  CHECK(requantize_add(-128, 127, kMaxMultiplier, -128, 127, kMaxMultiplier, 1, 0, kCodeMin, kCodeMax) == -128);
  CHECK(requantize_add(127, -128, kMaxMultiplier, 127, -128, kMaxMultiplier, 62, 3, kCodeMin, kCodeMax) == 3);
}

TEST_CASE("random inputs against eq. 10 written out with a quotient and a remainder") {
  lowbit::Rng rng(10);
  SUBCASE("any multipliers in [0, 2^31), shifts that keep most sums inside the code range") {
    compare_random(
        rng, [&] { return rng.below(8) == 0 ? draw(rng, kShiftMin, kShiftMax) : draw(rng, 28, 40); },
        [&](int) { return draw(rng, 0, kMaxMultiplier); });
  }
  SUBCASE("multipliers on a grid of quarter steps (m = j·2^(n−2)): ties are common") {
    compare_random(
        rng, [&] { return draw(rng, 2, 30); }, [&](int n) { return draw(rng, 0, 7) * (int32_t{1} << (n - 2)); });
  }
}

TEST_CASE("the runtime's reference Add kernel, qadd on the Ref path, computes requantize_add for every element") {
  Rescale r;
  r.zero_points = {2, -5};
  r.multipliers = {kWorkedMa, kWorkedMb};
  r.shift = kWorkedShift;
  Requant rq;
  rq.zero_point = -10;
  rq.act_min = -10;  // a fused ReLU
  // One element directly first: an exception thrown inside qadd's OpenMP loop could not reach the test (it aborts).
  REQUIRE(requantize_add(9, 2, kWorkedMa, -8, -5, kWorkedMb, kWorkedShift, -10, -10, 127) == -3);
  const std::vector<int8_t> a = {9, 2, 4, 0, 127, -128}, b = {-8, -5, -5, -4, 127, -128};
  std::vector<int8_t> y(a.size());
  qadd(a, b, r, rq, y, 1, KernelPath::Ref);  // the other paths do the same steps 4 elements at a time (AVX2)
  // 7.25 → 7; 0; 2.5 → 3; −2.5 + 0.5 = −2 → the ReLU; 156.25 + 66 saturates; −162.5 − 61.5 → the ReLU.
  CHECK(y == std::vector<int8_t>{-3, -10, -7, -10, 127, -10});
}
