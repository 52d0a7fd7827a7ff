// Seeded random integers and int8 codes for the integer-runtime tests (one definition for every test file).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/rng.h"

namespace lowbit::test {

// A uniform integer in [lo, hi].
inline int32_t random_in(lowbit::Rng& rng, int64_t lo, int64_t hi) {
  return static_cast<int32_t>(lo + static_cast<int64_t>(rng.below(static_cast<uint64_t>(hi - lo + 1))));
}

// count codes, each uniform in [lo, hi].
inline std::vector<int8_t> random_codes(lowbit::Rng& rng, size_t count, int lo, int hi) {
  std::vector<int8_t> v(count);
  for (auto& c : v) c = static_cast<int8_t>(random_in(rng, lo, hi));
  return v;
}

}  // namespace lowbit::test
