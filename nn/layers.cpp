// Layer implementations: parameters, initialisation, forward (backward comes from core ops).
#include "nn/layers.h"

#include <cmath>

#include "core/error.h"

namespace lowbit::nn {

void kaiming_uniform_(Tensor& weight, int64_t fan_in, Rng& rng) {
  const float bound = 1.f / std::sqrt(static_cast<float>(fan_in));
  for (float& v : weight.values()) v = rng.uniform(-bound, bound);
}

// ---- Linear

Linear::Linear(int64_t in_features, int64_t out_features, bool with_bias)
    : in_features(in_features), out_features(out_features) {
  if (in_features < 1 || out_features < 1) fail("Linear({}, {}): sizes must be positive", in_features, out_features);
  weight = register_parameter("weight", Tensor::empty({out_features, in_features}));
  kaiming_uniform_(weight, in_features);
  if (with_bias) {
    bias = register_parameter("bias", Tensor::empty({out_features}));
    kaiming_uniform_(bias, in_features);
  }
}

Tensor Linear::forward(const Tensor& x) {
  if (x.dim() != 2 || x.size(1) != in_features)
    fail("Linear({}, {}): input of shape {} (expected (N, {}))", in_features, out_features, shape_str(x.shape()),
         in_features);
  Tensor y = ops::matmul(x, weight, false, true);
  return bias.defined() ? ops::add(y, bias) : y;
}

std::string Linear::describe() const {
  return fmt::format("Linear({}, {}{})", in_features, out_features, bias.defined() ? "" : ", bias=false");
}

int64_t Linear::macs(const Shape& in, const Shape&) const { return in[0] * in_features * out_features; }

// ---- Conv2d

Conv2d::Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride, int64_t padding,
               bool with_bias)
    : in_channels(in_channels), out_channels(out_channels), kernel(kernel), stride(stride), padding(padding) {
  if (in_channels < 1 || out_channels < 1 || kernel < 1 || stride < 1 || padding < 0)
    fail("Conv2d({}, {}, kernel={}, stride={}, padding={}): bad configuration", in_channels, out_channels, kernel,
         stride, padding);
  const int64_t fan_in = in_channels * kernel * kernel;
  weight = register_parameter("weight", Tensor::empty({out_channels, in_channels, kernel, kernel}));
  kaiming_uniform_(weight, fan_in);
  if (with_bias) {
    bias = register_parameter("bias", Tensor::empty({out_channels}));
    kaiming_uniform_(bias, fan_in);
  }
}

Tensor Conv2d::forward(const Tensor& x) { return ops::conv2d(x, weight, bias, stride, padding); }

std::string Conv2d::describe() const {
  return fmt::format("Conv2d({}, {}, kernel={}{}{}{})", in_channels, out_channels, kernel,
                     stride != 1 ? fmt::format(", stride={}", stride) : "",
                     padding != 0 ? fmt::format(", padding={}", padding) : "", bias.defined() ? "" : ", bias=false");
}

int64_t Conv2d::macs(const Shape&, const Shape& out) const {
  return out[0] * out[1] * out[2] * out[3] * in_channels * kernel * kernel;
}

// ---- BatchNorm2d

BatchNorm2d::BatchNorm2d(int64_t channels, float eps, float momentum)
    : channels(channels), eps(eps), momentum(momentum) {
  weight = register_parameter("weight", Tensor::ones({channels}));
  bias = register_parameter("bias", Tensor::zeros({channels}));
  running_mean = register_buffer("running_mean", Tensor::zeros({channels}));
  running_var = register_buffer("running_var", Tensor::ones({channels}));
}

Tensor BatchNorm2d::forward(const Tensor& x) {
  return ops::batch_norm(x, weight, bias, running_mean, running_var, is_training(), momentum, eps);
}

std::string BatchNorm2d::describe() const { return fmt::format("BatchNorm2d({})", channels); }

// ---- the rest

std::string MaxPool2d::describe() const {
  return stride == kernel ? fmt::format("MaxPool2d({})", kernel) : fmt::format("MaxPool2d({}, stride={})", kernel, stride);
}
std::string AvgPool2d::describe() const {
  return stride == kernel ? fmt::format("AvgPool2d({})", kernel) : fmt::format("AvgPool2d({}, stride={})", kernel, stride);
}
std::string Dropout::describe() const { return fmt::format("Dropout({})", p); }

}  // namespace lowbit::nn
