// Tests of the integer rounding, requantization and int4 packing of the runtime against exact references.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "core/rng.h"
#include "quant/runtime/int4.h"
#include "quant/runtime/requantize.h"

namespace rt = lowbit::quant::runtime;

namespace {

constexpr int kRandomCases = 200000;
constexpr int kMaxReportedMismatches = 5;

// x / 2^n, ties away from zero, in 128-bit integers: the definition, written differently.
int64_t shift_reference(int64_t x, int n) {
  const __int128 denom = __int128{1} << n;
  const __int128 mag = x < 0 ? -__int128{x} : __int128{x};
  const __int128 q = (2 * mag + denom) / (2 * denom);  // floor(mag / denom + 1/2)
  return static_cast<int64_t>(x < 0 ? -q : q);
}

// The same output computed with long double real arithmetic (exact here: 64-bit mantissa, |acc·m| < 2^62
// and a division by a power of two), rounding ties away from zero.
int8_t requantize_reference(int32_t acc, int32_t m, int n, int32_t z, int32_t lo, int32_t hi) {
  const long double real = static_cast<long double>(acc) * m / static_cast<long double>(__int128{1} << n);
  const long double mag = real < 0 ? -real : real;
  long double rounded = static_cast<long double>(static_cast<int64_t>(mag + 0.5L));
  if (real < 0) rounded = -rounded;
  long double q = z + rounded;
  q = q < lo ? lo : (q > hi ? hi : q);
  return static_cast<int8_t>(q);
}

int32_t random_in(lowbit::Rng& rng, int64_t lo, int64_t hi) {
  return static_cast<int32_t>(lo + static_cast<int64_t>(rng.below(static_cast<uint64_t>(hi - lo + 1))));
}

}  // namespace

TEST_CASE("rounding_right_shift_half_away rounds to nearest, ties away from zero") {
  CHECK(rt::rounding_right_shift_half_away(3, 1) == 2);    //  1.5 →  2
  CHECK(rt::rounding_right_shift_half_away(-3, 1) == -2);  // −1.5 → −2
  CHECK(rt::rounding_right_shift_half_away(1, 1) == 1);    //  0.5 →  1
  CHECK(rt::rounding_right_shift_half_away(-1, 1) == -1);  // −0.5 → −1
  CHECK(rt::rounding_right_shift_half_away(5, 2) == 1);    //  1.25 → 1
  CHECK(rt::rounding_right_shift_half_away(-7, 2) == -2);  // −1.75 → −2
  // Extremes: the largest products acc·m and both shift ends.
  const int64_t big = int64_t{INT32_MIN} * INT32_MAX;
  for (const int64_t x : {big, -big, int64_t{INT32_MAX} * INT32_MAX, int64_t{0}, int64_t{-1}, int64_t{1}}) {
    for (const int n : {1, 2, 31, 61, 62}) {
      CHECK_MESSAGE(rt::rounding_right_shift_half_away(x, n) == shift_reference(x, n), "x = ", x, ", n = ", n);
    }
  }
  // Exact ties at every shift.
  for (int n = 1; n <= 62; ++n) {
    const int64_t half = int64_t{1} << (n - 1);  // 0.5 · 2^n
    CHECK(rt::rounding_right_shift_half_away(half, n) == 1);
    CHECK(rt::rounding_right_shift_half_away(-half, n) == -1);
    if (n <= 61) {
      CHECK(rt::rounding_right_shift_half_away(3 * half, n) == 2);    //  1.5 →  2
      CHECK(rt::rounding_right_shift_half_away(-3 * half, n) == -2);  // −1.5 → −2
    }
  }
  lowbit::Rng rng(7);
  int mismatches = 0;
  for (int i = 0; i < kRandomCases; ++i) {
    const auto x = static_cast<int64_t>(rng.next_u64()) >> random_in(rng, 1, 63);
    const int n = random_in(rng, 1, 62);
    if (rt::rounding_right_shift_half_away(x, n) != shift_reference(x, n) && ++mismatches <= kMaxReportedMismatches) {
      std::printf("x %lld n %d: got %lld want %lld\n", static_cast<long long>(x), n,
                  static_cast<long long>(rt::rounding_right_shift_half_away(x, n)),
                  static_cast<long long>(shift_reference(x, n)));
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("rounding_divide_half_away matches the exact quotient") {
  for (int32_t count = 1; count <= 50; ++count) {
    for (int32_t sum = -2000; sum <= 2000; ++sum) {
      const long double q = static_cast<long double>(sum) / count;
      const long double mag = q < 0 ? -q : q;
      auto want = static_cast<int32_t>(static_cast<int64_t>(mag + 0.5L));
      if (q < 0) want = -want;
      REQUIRE_MESSAGE(rt::rounding_divide_half_away(sum, count) == want, sum, " / ", count);
    }
  }
}

TEST_CASE("HalfAwayDivider == rounding_divide_half_away for every count up to 4096 and up to 2^23 sampled") {
  lowbit::Rng rng(23);
  std::vector<int32_t> counts;
  for (int32_t count = 1; count <= 4096; ++count) counts.push_back(count);
  for (int k = 0; k < 2000; ++k) counts.push_back(1 + static_cast<int32_t>(rng.below(uint64_t{1} << 23)));
  for (const int32_t count : {(1 << 23) - 1, 1 << 23, (1 << 22) + 1, 3 << 21}) counts.push_back(count);
  int64_t mismatches = 0, checked = 0;
  for (const int32_t count : counts) {
    const rt::HalfAwayDivider divide(count);
    // Sums near multiples of count and of count/2 (the ties), the int32 ends, and random ones.
    std::vector<int64_t> sums = {INT32_MIN, INT32_MIN + 1, INT32_MAX, INT32_MAX - 1, 0, 1, -1};
    for (const int64_t j : {1, 2, 3, 255, 1000}) {
      for (int64_t d = -2; d <= 2; ++d) {
        sums.push_back(j * count + d);
        sums.push_back(-j * count + d);
        sums.push_back(j * count + count / 2 + d);
        sums.push_back(-(j * count + count / 2) + d);
      }
    }
    for (int k = 0; k < 8; ++k) sums.push_back(static_cast<int32_t>(rng.next_u64()));
    for (const int64_t wide : sums) {
      if (wide < INT32_MIN || wide > INT32_MAX) continue;
      const auto sum = static_cast<int32_t>(wide);
      mismatches += divide(sum) != rt::rounding_divide_half_away(sum, count);
      ++checked;
    }
  }
  CHECK(mismatches == 0);
  CHECK(checked > 6000 * 40);
}

TEST_CASE("requantize matches a long double reference on random sweeps and edges") {
  const std::vector<int32_t> accs = {INT32_MIN, INT32_MIN + 1, -1, 0, 1, INT32_MAX - 1, INT32_MAX};
  const std::vector<int32_t> multipliers = {rt::kMultiplierMin, rt::kMultiplierMin + 1, INT32_MAX - 1, INT32_MAX};
  int mismatches = 0;
  const auto check = [&](int32_t acc, int32_t m, int n, int32_t z, int32_t lo, int32_t hi) {
    const int8_t got = rt::requantize(acc, m, n, z, lo, hi);
    const int8_t want = requantize_reference(acc, m, n, z, lo, hi);
    if (got != want && ++mismatches <= kMaxReportedMismatches) {
      std::printf("acc %d m %d n %d z %d [%d, %d]: got %d want %d\n", acc, m, n, z, lo, hi, got, want);
    }
  };
  for (const int32_t acc : accs) {
    for (const int32_t m : multipliers) {
      for (const int n : {1, 2, 30, 31, 32, 40, 61, 62}) {
        for (const int32_t z : {-128, -5, 0, 127}) check(acc, m, n, z, -128, 127);
      }
    }
  }
  // Exact ties: acc·2^30·2^−31 = acc/2 for odd acc.
  for (int32_t acc = -301; acc <= 301; acc += 2) check(acc, rt::kMultiplierMin, 31, 0, -128, 127);
  CHECK(rt::requantize(3, rt::kMultiplierMin, 31, 0, -128, 127) == 2);    //  1.5 →  2
  CHECK(rt::requantize(-3, rt::kMultiplierMin, 31, 0, -128, 127) == -2);  // −1.5 → −2
  // Fused ReLU: act_min = z_out clamps every negative real value to the code of 0.
  CHECK(rt::requantize(-1000, rt::kMultiplierMin, 31, 10, 10, 127) == 10);
  lowbit::Rng rng(11);
  for (int i = 0; i < kRandomCases; ++i) {
    const auto acc = static_cast<int32_t>(static_cast<int64_t>(rng.next_u64()) >> (32 + random_in(rng, 0, 31)));
    const int32_t m = random_in(rng, rt::kMultiplierMin, INT32_MAX);
    const int n = random_in(rng, 1, 62);
    const int32_t lo = random_in(rng, -128, 127);
    const int32_t hi = random_in(rng, lo, 127);
    check(acc, m, n, random_in(rng, lo, hi), lo, hi);
  }
  CHECK(mismatches == 0);
}

TEST_CASE("int4 pack and unpack round trip, odd lengths included") {
  lowbit::Rng rng(3);
  for (size_t count = 0; count <= 33; ++count) {
    std::vector<int8_t> codes(count);
    for (auto& c : codes) c = static_cast<int8_t>(random_in(rng, rt::kInt4Min, rt::kInt4Max));
    std::vector<int8_t> packed(rt::int4_packed_size(count), 0x55);
    rt::pack_int4(codes, packed);
    std::vector<int8_t> back(count);
    rt::unpack_int4(packed, back);
    CHECK(back == codes);
    for (size_t i = 0; i < count; ++i) {
      // Low nibble = even index, high nibble = odd index.
      const auto byte = static_cast<uint8_t>(packed[i / 2]);
      CHECK(((i % 2 == 0 ? byte : byte >> 4) & 0x0F) == (static_cast<uint8_t>(codes[i]) & 0x0F));
    }
    if (count % 2 == 1) CHECK((static_cast<uint8_t>(packed.back()) >> 4) == 0);  // padding nibble is 0
  }
  const std::vector<int8_t> all = {-8, -7, -1, 0, 1, 6, 7};
  std::vector<int8_t> packed(rt::int4_packed_size(all.size()));
  rt::pack_int4(all, packed);
  CHECK(static_cast<uint8_t>(packed[0]) == 0x98);  // −8 = 0x8 low, −7 = 0x9 high
  std::vector<int8_t> back(all.size());
  rt::unpack_int4(packed, back);
  CHECK(back == all);
}
