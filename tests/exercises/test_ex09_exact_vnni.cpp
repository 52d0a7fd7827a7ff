// Exercise 09 checks: dpbusd_lane (vpdpbusd, one lane) and the exact int8 dot product on it (vnni_ref.h).
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "core/rng.h"
#include "quant/runtime/vnni_ref.h"

using namespace lowbit::quant::runtime;

namespace {

constexpr int kRandomCases = 2000;

// Four bytes as one 32-bit lane, byte 0 in bits 0-7 (as the instruction reads memory on x86, little-endian).
constexpr uint32_t lane(int b0, int b1, int b2, int b3) {
  return uint32_t{static_cast<uint8_t>(b0)} | uint32_t{static_cast<uint8_t>(b1)} << 8 |
         uint32_t{static_cast<uint8_t>(b2)} << 16 | uint32_t{static_cast<uint8_t>(b3)} << 24;
}

// The plain definition: Σ_k x[k]·w[k] in 64 bits.
int64_t plain_dot(const std::vector<int8_t>& x, const std::vector<int8_t>& w) {
  int64_t sum = 0;
  for (size_t k = 0; k < x.size(); ++k) sum += int64_t{x[k]} * w[k];
  return sum;
}

int32_t weight_sum(const std::vector<int8_t>& w) {
  int32_t sum = 0;
  for (const int8_t v : w) sum += v;
  return sum;
}

int32_t vnni_dot(const std::vector<int8_t>& x, const std::vector<int8_t>& w) {
  return dot_s8_via_dpbusd(x, w, weight_sum(w));
}

}  // namespace

TEST_CASE("dpbusd_lane: acc + four u8 × s8 products") {
  // a = (1, 2, 3, 4), b = (1, −1, 2, −2): 1 − 2 + 6 − 8 = −3
  CHECK(dpbusd_lane(0, lane(1, 2, 3, 4), lane(1, -1, 2, -2)) == -3);
  CHECK(dpbusd_lane(10, lane(1, 2, 3, 4), lane(1, -1, 2, -2)) == 7);
  CHECK(dpbusd_lane(-5, 0, lane(9, 9, 9, 9)) == -5);
}

TEST_CASE("dpbusd_lane: the bytes of a are unsigned (0xFF is 255), those of b signed (0x80 is −128)") {
  CHECK(dpbusd_lane(0, lane(0xFF, 0, 0, 0), lane(1, 0, 0, 0)) == 255);
  CHECK(dpbusd_lane(0, lane(1, 0, 0, 0), lane(0xFF, 0, 0, 0)) == -1);
  CHECK(dpbusd_lane(0, lane(0xFF, 0xFF, 0xFF, 0xFF), lane(0x80, 0x80, 0x80, 0x80)) == 4 * 255 * -128);  // −130560
  CHECK(dpbusd_lane(0, lane(0xFF, 0xFF, 0xFF, 0xFF), lane(0x7F, 0x7F, 0x7F, 0x7F)) == 4 * 255 * 127);   // 129540
  // Byte i of a meets byte i of b, not another.
  CHECK(dpbusd_lane(0, lane(0, 0, 0, 2), lane(0, 0, 0, 3)) == 6);
  CHECK(dpbusd_lane(0, lane(0, 0, 0, 2), lane(3, 0, 0, 0)) == 0);
}

TEST_CASE("dpbusd_lane: the add wraps modulo 2^32 (vpdpbusd), it does not saturate (vpdpbusds)") {
  constexpr int32_t kMax = std::numeric_limits<int32_t>::max();
  constexpr int32_t kMin = std::numeric_limits<int32_t>::min();
  CHECK(dpbusd_lane(kMax, lane(1, 0, 0, 0), lane(1, 0, 0, 0)) == kMin);
  CHECK(dpbusd_lane(kMin, lane(1, 0, 0, 0), lane(-1, 0, 0, 0)) == kMax);
}

TEST_CASE("dot_s8_via_dpbusd: x shifted to u8, then 128·Σw subtracted, equals the plain dot product") {
  // x = (−128, 127, 0, 5, −3), w = (1, 2, −3, 4, 5): −128 + 254 + 0 + 20 − 15 = 131.
  // Shifted: x + 128 = (0, 255, 128, 133, 125), Σ (x + 128)·w = 1283, Σw = 9: 1283 − 128·9 = 131.
  CHECK(vnni_dot({-128, 127, 0, 5, -3}, {1, 2, -3, 4, 5}) == 131);
  CHECK(vnni_dot({}, {}) == 0);
  CHECK(vnni_dot({-1}, {-1}) == 1);  // one value: a group of one, padded with three zero weights
  CHECK(vnni_dot({7, -7}, {3, 3}) == 0);
  CHECK(vnni_dot({1, 2, 3}, {-4, 5, -6}) == -12);
}

TEST_CASE("dot_s8_via_dpbusd on random values, every length from 1 to 67 (tails of 1, 2 and 3)") {
  lowbit::Rng rng(9);
  for (int c = 0; c < kRandomCases; ++c) {
    const size_t k = 1 + static_cast<size_t>(rng.below(67));
    std::vector<int8_t> x(k), w(k);
    for (size_t i = 0; i < k; ++i) {
      x[i] = static_cast<int8_t>(static_cast<int>(rng.below(256)) - 128);
      w[i] = static_cast<int8_t>(static_cast<int>(rng.below(256)) - 128);
    }
    CAPTURE(k);
    REQUIRE(vnni_dot(x, w) == plain_dot(x, w));
  }
}

TEST_CASE("extreme values: all −128 or 127, and sums of (x + 128)·w that leave int32 on the way") {
  for (const int xv : {-128, 127, 0, -1})
    for (const int wv : {-128, 127, -127, 1}) {
      CAPTURE(xv);
      CAPTURE(wv);
      const std::vector<int8_t> x(4099, static_cast<int8_t>(xv)), w(4099, static_cast<int8_t>(wv));
      CHECK(vnni_dot(x, w) == plain_dot(x, w));
    }
  // K = 70000 codes 127 times weights 127: Σ (x + 128)·w = 255·127·70000 = 2,266,950,000 > 2^31 − 1, but the
  // true sum, 127·127·70000 = 1,129,030,000, fits: wrapping adds still give it exactly.
  const std::vector<int8_t> x(70000, 127), w(70000, 127);
  CHECK(vnni_dot(x, w) == 1129030000);
  // The same with a negative result: x = −128 (u8 0) and w = 127 give −128·127·70000 = −1,137,920,000.
  const std::vector<int8_t> low(70000, -128);
  CHECK(vnni_dot(low, w) == -1137920000);
}
