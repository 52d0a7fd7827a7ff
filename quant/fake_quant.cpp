// fake_quantize (forward + STE backward), its learned-step-size twin, and the FakeQuantize module.
#include "quant/fake_quant.h"

#include <cmath>

#include "core/error.h"

namespace lowbit::quant {

namespace {
// Values per channel when params are per channel along axis 0, or the whole tensor.
int64_t values_per_param(const Tensor& x, size_t params) {
  if (params == 1) return x.numel();
  if (x.dim() < 1 || x.size(0) != static_cast<int64_t>(params))
    fail("fake_quantize: {} per-channel parameters for a tensor of shape {}", params, shape_str(x.shape()));
  return x.numel() / static_cast<int64_t>(params);
}
}  // namespace

// Exercise 03 (docs/exercises/03-fake-quant-ste.md): the student build compiles
// docs/exercises/student/ex03_fake_quantize.cpp instead of this definition.
#ifndef LOWBIT_EXERCISES
Tensor fake_quantize(const Tensor& x, const std::vector<QParams>& params, QRange range) {
  const int64_t inner = values_per_param(x, params.size());
  Tensor y = Tensor::empty(x.shape());
  auto inside = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(x.numel()));
  const float* px = x.data();
  float* py = y.data();
#pragma omp parallel for if (x.numel() > (1 << 15))
  for (int64_t i = 0; i < x.numel(); ++i) {
    const QParams p = params[static_cast<size_t>(i / inner)];
    const float unclamped = round_half_away(px[i] / p.scale) + static_cast<float>(p.zero_point);
    const bool in_range = unclamped >= static_cast<float>(range.qmin) && unclamped <= static_cast<float>(range.qmax);
    (*inside)[static_cast<size_t>(i)] = in_range;
    py[i] = dequantize(quantize(px[i], p, range), p);
  }
  return record(y, "fake_quantize", {x}, [inside](const Tensor& dy) {
    Tensor dx = Tensor::empty(dy.shape());
    for (int64_t i = 0; i < dy.numel(); ++i) dx.data()[i] = (*inside)[static_cast<size_t>(i)] ? dy.data()[i] : 0.f;
    return std::vector<Tensor>{dx};
  });
}
#endif  // LOWBIT_EXERCISES

Tensor fake_quantize_lsq(const Tensor& x, const Tensor& scale, const std::vector<int32_t>& zero_points, QRange range) {
  const size_t channels = static_cast<size_t>(scale.numel());
  if (zero_points.size() != channels) fail("fake_quantize_lsq: {} zero points for {} scales", zero_points.size(), channels);
  const int64_t inner = values_per_param(x, channels);
  Tensor y = Tensor::empty(x.shape());
  // Per value: d y / d x (0 or 1) and d y / d s (before the gradient scale g).
  auto dydx = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(x.numel()));
  auto dyds = std::make_shared<std::vector<float>>(static_cast<size_t>(x.numel()));
  for (int64_t i = 0; i < x.numel(); ++i) {
    const auto c = static_cast<size_t>(i / inner);
    const QParams p{scale.data()[c], zero_points[c]};
    if (!(p.scale > 0.f)) fail("fake_quantize_lsq: learned scale {} is not positive (lower the learning rate)", p.scale);
    const float v = x.data()[i] / p.scale;
    const float q = round_half_away(v) + static_cast<float>(p.zero_point);
    const auto idx = static_cast<size_t>(i);
    if (q < static_cast<float>(range.qmin)) {
      (*dydx)[idx] = 0;
      (*dyds)[idx] = static_cast<float>(range.qmin - p.zero_point);
    } else if (q > static_cast<float>(range.qmax)) {
      (*dydx)[idx] = 0;
      (*dyds)[idx] = static_cast<float>(range.qmax - p.zero_point);
    } else {
      (*dydx)[idx] = 1;
      (*dyds)[idx] = round_half_away(v) - v;
    }
    y.data()[i] = dequantize(quantize(x.data()[i], p, range), p);
  }
  const float g = 1.f / std::sqrt(static_cast<float>(inner) * static_cast<float>(range.qmax));
  return record(y, "fake_quantize_lsq", {x, scale}, [dydx, dyds, inner, channels, g](const Tensor& dy) {
    Tensor dx = Tensor::empty(dy.shape());
    Tensor ds = Tensor::zeros({static_cast<int64_t>(channels)});
    for (int64_t i = 0; i < dy.numel(); ++i) {
      const auto idx = static_cast<size_t>(i);
      dx.data()[i] = (*dydx)[idx] ? dy.data()[i] : 0.f;
      ds.data()[i / inner] += dy.data()[i] * (*dyds)[idx] * g;
    }
    return std::vector<Tensor>{dx, ds};
  });
}

// ---------------------------------------------------------------------------------------------
// FakeQuantize

FakeQuantize::FakeQuantize(std::unique_ptr<Observer> observer, int64_t channels, bool learn_scale)
    : observer_(std::move(observer)), learn_scale_(learn_scale) {
  scale_ = learn_scale ? register_parameter("scale", Tensor::ones({channels}))
                       : register_buffer("scale", Tensor::ones({channels}));
  zero_point_ = register_buffer("zero_point", Tensor::zeros({channels}));
  calibrated_ = register_buffer("calibrated", Tensor::zeros({1}));
}

int FakeQuantize::bits() const {
  const QRange r = range();
  int bits = 0;
  while ((int64_t{1} << bits) < static_cast<int64_t>(r.qmax) - r.qmin + 1) ++bits;
  return bits;
}

void FakeQuantize::update_from_observer() {
  const std::vector<QParams> params = observer_->qparams();
  if (static_cast<int64_t>(params.size()) != scale_.numel())
    fail("FakeQuantize: observer proposed {} qparams for {} channels", params.size(), scale_.numel());
  for (size_t c = 0; c < params.size(); ++c) {
    scale_.data()[c] = params[c].scale;
    zero_point_.data()[c] = static_cast<float>(params[c].zero_point);
  }
  calibrated_.data()[0] = 1.f;
}

Tensor FakeQuantize::forward(const Tensor& x) {
  // A learned scale takes its first value from the observer, then only learns.
  const bool observe = is_training() && observe_enabled && !(learn_scale_ && calibrated());
  if (observe) {
    observer_->observe(x);
    update_from_observer();
  }
  if (!fake_quant_enabled) return x;
  if (!calibrated())
    fail("fake-quant node has no quantization parameters yet (calibrate the model or train a step first)");
  if (learn_scale_) {
    std::vector<int32_t> zero_points(static_cast<size_t>(zero_point_.numel()));
    for (size_t c = 0; c < zero_points.size(); ++c) zero_points[c] = static_cast<int32_t>(zero_point_.data()[c]);
    return fake_quantize_lsq(x, scale_, zero_points, range());
  }
  return fake_quantize(x, qparams(), range());
}

std::vector<QParams> FakeQuantize::qparams() const {
  if (!calibrated())
    fail("fake-quant node has no quantization parameters yet (calibrate the model or train a step first)");
  std::vector<QParams> out(static_cast<size_t>(scale_.numel()));
  for (size_t c = 0; c < out.size(); ++c)
    out[c] = {scale_.data()[c], static_cast<int32_t>(zero_point_.data()[c])};
  return out;
}

QParams FakeQuantize::qparams_per_tensor() const {
  auto params = qparams();
  if (params.size() != 1) fail("FakeQuantize: expected per-tensor qparams, found {} channels", params.size());
  return params[0];
}

std::string FakeQuantize::describe() const {
  return fmt::format("FakeQuantize({}, {} bits{}{})", observer_->name(), bits(),
                     scale_.numel() > 1 ? ", per-channel" : "", learn_scale_ ? ", learned scale" : "");
}

}  // namespace lowbit::quant
