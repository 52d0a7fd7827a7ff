// Input normalisation x = (pixel / 255 - mean) / std: defined once, used by the data loader
// (float path) and by convert (folded into the integer graph's 256-entry input table).
#pragma once

#include <cstdint>

namespace lowbit {

struct Normalization {
  float mean = 0.f;
  float std = 1.f;
};

inline float normalize_pixel(uint8_t pixel, const Normalization& norm) {
  return (static_cast<float>(pixel) / 255.f - norm.mean) / norm.std;
}

}  // namespace lowbit
