// The one seeded random generator: xoshiro256** with our own uniform, normal and shuffle,
// so a course's printed numbers are the same on every machine and standard library.
#pragma once

#include <array>
#include <cstdint>
#include <span>

namespace lowbit {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0);

  uint64_t next_u64();
  // Uniform float in [0, 1) with 24 random bits.
  float uniform();
  float uniform(float lo, float hi) { return lo + (hi - lo) * uniform(); }
  // Standard normal by the Box-Muller transform (one value per call; the pair's twin is discarded).
  float normal();
  // Uniform integer in [0, n) without modulo bias (Lemire's multiply-shift with rejection).
  uint64_t below(uint64_t n);
  // Fisher-Yates shuffle.
  template <typename T>
  void shuffle(std::span<T> values) {
    for (size_t i = values.size(); i > 1; --i) {
      size_t j = static_cast<size_t>(below(i));
      std::swap(values[i - 1], values[j]);
    }
  }

  using State = std::array<uint64_t, 4>;
  State state() const { return state_; }
  void set_state(const State& state) { state_ = state; }

 private:
  State state_;
};

// The generator used by code that is not handed one (weight init, dropout); seed it with manual_seed.
Rng& global_rng();
void manual_seed(uint64_t seed);

}  // namespace lowbit
