// choose_qparams, quantize_bias, quantize_multiplier and SQNR (docs/quantization.md eqs. 2-6).
#include "quant/qparams.h"

#include <algorithm>
#include <limits>

#include "core/error.h"
#include "quant/runtime/requantize.h"

namespace lowbit::quant {

namespace {
void check_bits(int bits) {
  if (bits < 2 || bits > 8) fail("bit width {} is out of range (lowbit quantizes to 2..8 bits)", bits);
}
}  // namespace

QRange activation_range(int bits) {
  check_bits(bits);
  return {-(1 << (bits - 1)), (1 << (bits - 1)) - 1};
}

QRange weight_range(int bits) {
  check_bits(bits);
  return {-((1 << (bits - 1)) - 1), (1 << (bits - 1)) - 1};
}

// Exercise 01 (docs/exercises/01-choose-qparams.md): the student build compiles
// docs/exercises/student/ex01_choose_qparams.cpp instead of this definition.
#ifndef LOWBIT_EXERCISES
QParams choose_qparams(float min, float max, QRange range, bool symmetric) {
  if (!std::isfinite(min) || !std::isfinite(max))
    fail("choose_qparams: range [{}, {}] is not finite (the observed tensor holds NaN or inf: check the "
         "learning rate or the input data)", min, max);
  if (min > max) fail("choose_qparams: min {} is greater than max {} (nothing was observed yet?)", min, max);
  min = std::min(min, 0.f);  // 0 must be exactly representable (eq. 4)
  max = std::max(max, 0.f);
  if (symmetric) {
    const float amax = std::max(-min, max);
    return {std::max(amax / static_cast<float>(range.qmax), kMinScale), 0};
  }
  // The width in double: max − min of two finite floats can overflow float (±3e38 gives inf).
  const auto width = static_cast<double>(max) - static_cast<double>(min);
  const float scale = std::max(static_cast<float>(width / (range.qmax - range.qmin)), kMinScale);
  const float z = static_cast<float>(range.qmin) - round_half_away(min / scale);
  const auto zero_point = static_cast<int32_t>(std::clamp(z, static_cast<float>(range.qmin), static_cast<float>(range.qmax)));
  return {scale, zero_point};
}
#endif  // LOWBIT_EXERCISES

int32_t quantize_bias(float bias, float input_scale, float weight_scale) {
  const QParams p = bias_qparams(input_scale, weight_scale);
  const float q = round_half_away(bias / p.scale);
  if (!(std::fabs(q) <= static_cast<float>(kBiasRange.qmax)))
    fail("bias {} does not fit in int32 at scale {} (input scale {} x weight scale {}: the weights or the "
         "input range are degenerate)", bias, p.scale, input_scale, weight_scale);
  return quantize(bias, p, kBiasRange);
}

// Exercise 04 (docs/exercises/04-quantize-multiplier.md): the student build compiles
// docs/exercises/student/ex04_quantize_multiplier.cpp instead of this definition.
#ifndef LOWBIT_EXERCISES
QuantizedMultiplier quantize_multiplier(double real_multiplier) {
  if (!std::isfinite(real_multiplier) || real_multiplier <= 0)
    fail("requantization multiplier {} must be finite and positive (a scale is zero, negative or not finite)",
         real_multiplier);
  int exponent = 0;
  const double fraction = std::frexp(real_multiplier, &exponent);  // real = fraction·2^exponent, fraction in [0.5, 1)
  auto m = static_cast<int64_t>(std::round(fraction * 2147483648.0));  // fraction·2^31 in [2^30, 2^31]
  if (m == (int64_t{1} << 31)) {  // rounded up to 2^31: renormalise
    m /= 2;
    ++exponent;
  }
  const int shift = 31 - exponent;  // real ≈ m·2^(−31)·2^exponent = m·2^(−shift)
  if (shift < runtime::kShiftMin || shift > runtime::kShiftMax)
    fail("requantization multiplier {} is out of the representable range [2^-32, 2^30) (the layer's scales are "
         "degenerate)", real_multiplier);
  return {static_cast<int32_t>(m), shift};
}
#endif  // LOWBIT_EXERCISES

double sqnr_db(const std::vector<float>& reference, const std::vector<float>& approximation) {
  if (reference.size() != approximation.size()) fail("sqnr_db: {} vs {} values", reference.size(), approximation.size());
  double signal = 0, noise = 0;
  for (size_t i = 0; i < reference.size(); ++i) {
    signal += static_cast<double>(reference[i]) * reference[i];
    const double d = static_cast<double>(reference[i]) - approximation[i];
    noise += d * d;
  }
  if (noise == 0) return std::numeric_limits<double>::infinity();
  return 10.0 * std::log10(signal / noise);
}

}  // namespace lowbit::quant
