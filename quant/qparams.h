// The quantization math of the float side: ranges, choose_qparams, quantize / dequantize,
// quantize_multiplier. Every equation is derived once in docs/quantization.md (cited as eq. N);
// the integer side of the same equations is quant/runtime/requantize.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace lowbit::quant {

// The integer codes a b-bit quantity may take.
struct QRange {
  int32_t qmin, qmax;
};
// Activations, asymmetric: [-2^(b-1), 2^(b-1) - 1], e.g. 8 bits [-128, 127], 4 bits [-8, 7] (eq. 2).
QRange activation_range(int bits);
// Weights, symmetric: [-(2^(b-1) - 1), 2^(b-1) - 1], e.g. 8 bits [-127, 127], 4 bits [-7, 7] (eq. 3).
QRange weight_range(int bits);

// Scale and zero point of one tensor or one channel: r = s·(q − z) (eq. 1).
struct QParams {
  float scale = 1.f;
  int32_t zero_point = 0;
};

// The smallest scale we hand out; a range of width 0 (all values equal) gets this scale.
inline constexpr float kMinScale = 1e-8f;

// Chooses s and z so that [min, max] (widened to contain 0, so that 0 is exactly representable)
// maps onto [qmin, qmax] (eq. 4). Symmetric: z = 0, s = max(|min|, |max|) / qmax.
// Throws lowbit::Error for NaN or infinite bounds or min > max.
QParams choose_qparams(float min, float max, QRange range, bool symmetric);

// Rounds to nearest, ties away from zero (eq. 7): the project's one rounding rule.
inline float round_half_away(float x) { return std::round(x); }

// q = clamp(round(r / s) + z, qmin, qmax) (eq. 1 inverted).
inline int32_t quantize(float r, QParams p, QRange range) {
  const float q = round_half_away(r / p.scale) + static_cast<float>(p.zero_point);
  return static_cast<int32_t>(std::fmin(std::fmax(q, static_cast<float>(range.qmin)), static_cast<float>(range.qmax)));
}
inline float dequantize(int32_t q, QParams p) { return p.scale * static_cast<float>(q - p.zero_point); }

// Bias codes are int32 with scale s_in·s_w[c] (a float product, computed the same way by the
// fake-quant model and by convert) and zero point 0 (eq. 5). The range stops short of the int32
// limits so that every code is exactly representable as a float.
inline constexpr QRange kBiasRange{-2147483520, 2147483520};
inline QParams bias_qparams(float input_scale, float weight_scale) { return {input_scale * weight_scale, 0}; }
// The int32 bias code; throws if the bias would be clamped (degenerate scales).
int32_t quantize_bias(float bias, float input_scale, float weight_scale);

// The requantization multiplier M = s_in·s_w / s_out as m·2^(−n) with m in [2^30, 2^31) and
// n in [1, 62] (eq. 6). Throws lowbit::Error when M is not finite, not positive, or out of range.
struct QuantizedMultiplier {
  int32_t multiplier;
  int shift;
};
QuantizedMultiplier quantize_multiplier(double real_multiplier);

// Signal-to-quantization-noise ratio in dB: 10·log10(Σ x² / Σ (x − x̂)²).
double sqnr_db(const std::vector<float>& reference, const std::vector<float>& approximation);

}  // namespace lowbit::quant
