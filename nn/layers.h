// The layers: Linear, Conv2d (grouped and depthwise too), BatchNorm2d, ReLU, ReLU6, MaxPool2d, AvgPool2d,
// GlobalAvgPool2d, Flatten, Dropout, Add, Concat. Each is also a layer kind of model descriptions, registered
// next to its class in nn/layers.cpp (nn/kinds.h).
#pragma once

#include "core/ops.h"
#include "nn/module.h"

namespace lowbit::nn {

// Kaiming-uniform initialisation as PyTorch does it for Linear and Conv2d (a = sqrt(5)):
// weight ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
void kaiming_uniform_(Tensor& weight, int64_t fan_in, Rng& rng = global_rng());

// x is (N, IN), weight is (OUT, IN), bias is (OUT); y is (N, OUT).
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias = true);
  Tensor forward(const Tensor& x) override;
  std::string describe() const override;
  int64_t macs(const Shape& in, const Shape& out) const override;
  int64_t in_features, out_features;
  Tensor weight, bias;  // bias undefined when disabled
};

// x is (N, C, H, W), weight is (OUT, C / groups, K, K), bias is (OUT); y is (N, OUT, OH, OW).
// groups splits the channels into that many independent convolutions (groups = C = OUT: depthwise).
class Conv2d : public Module {
 public:
  Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride = 1, int64_t padding = 0,
         bool bias = true, int64_t groups = 1);
  Tensor forward(const Tensor& x) override;
  std::string describe() const override;
  int64_t macs(const Shape& in, const Shape& out) const override;
  int64_t in_channels, out_channels, kernel, stride, padding, groups;
  Tensor weight, bias;
};

// Per-channel normalisation of (N, C, H, W); running_mean / running_var are buffers.
class BatchNorm2d : public Module {
 public:
  explicit BatchNorm2d(int64_t channels, float eps = 1e-5f, float momentum = 0.1f);
  Tensor forward(const Tensor& x) override;
  Tensor forward_relu(const Tensor& x);  // ReLU(forward(x)) as one op (ops::batch_norm_relu)
  std::string describe() const override;
  int64_t channels;
  float eps, momentum;
  Tensor weight, bias, running_mean, running_var;
};

class ReLU : public Module {
 public:
  Tensor forward(const Tensor& x) override { return ops::relu(x); }
  std::string describe() const override { return "ReLU"; }
};

// min(max(x, 0), 6), MobileNet's activation.
class ReLU6 : public Module {
 public:
  Tensor forward(const Tensor& x) override { return ops::clamp(x, 0.f, 6.f); }
  std::string describe() const override { return "ReLU6"; }
};

class MaxPool2d : public Module {
 public:
  explicit MaxPool2d(int64_t kernel, int64_t stride = 0) : kernel(kernel), stride(stride ? stride : kernel) {}
  Tensor forward(const Tensor& x) override { return ops::max_pool2d(x, kernel, stride); }
  std::string describe() const override;
  int64_t kernel, stride;
};

class AvgPool2d : public Module {
 public:
  explicit AvgPool2d(int64_t kernel, int64_t stride = 0) : kernel(kernel), stride(stride ? stride : kernel) {}
  Tensor forward(const Tensor& x) override { return ops::avg_pool2d(x, kernel, stride); }
  std::string describe() const override;
  int64_t kernel, stride;
};

// x is (N, C, H, W); y is (N, C, 1, 1), the mean of each channel.
class GlobalAvgPool2d : public Module {
 public:
  Tensor forward(const Tensor& x) override { return ops::global_avg_pool2d(x); }
  std::string describe() const override { return "GlobalAvgPool2d"; }
};

class Flatten : public Module {
 public:
  Tensor forward(const Tensor& x) override { return ops::flatten(x); }
  std::string describe() const override { return "Flatten"; }
};

class Dropout : public Module {
 public:
  explicit Dropout(float p = 0.5f) : p(p) {}
  Tensor forward(const Tensor& x) override { return ops::dropout(x, p, is_training()); }
  std::string describe() const override;
  float p;
};

// The sum of two inputs of the same shape: the residual connection.
class Add : public Module {
 public:
  Tensor forward(const Tensor& x) override;  // refuses: Add takes two inputs
  Tensor forward_inputs(std::span<const Tensor> inputs) override;
  std::string describe() const override { return "Add"; }
};

// Two or more (N, C_i, H, W) inputs joined along the channels: y is (N, Σ C_i, H, W).
class Concat : public Module {
 public:
  Tensor forward(const Tensor& x) override;  // refuses: Concat takes two or more inputs
  Tensor forward_inputs(std::span<const Tensor> inputs) override;
  std::string describe() const override { return "Concat"; }
};

}  // namespace lowbit::nn
