// The layers: Linear, Conv2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, Flatten, Dropout.
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

// x is (N, C, H, W), weight is (OUT, C, K, K), bias is (OUT); y is (N, OUT, OH, OW).
class Conv2d : public Module {
 public:
  Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride = 1, int64_t padding = 0,
         bool bias = true);
  Tensor forward(const Tensor& x) override;
  std::string describe() const override;
  int64_t macs(const Shape& in, const Shape& out) const override;
  int64_t in_channels, out_channels, kernel, stride, padding;
  Tensor weight, bias;
};

// Per-channel normalisation of (N, C, H, W); running_mean / running_var are buffers.
class BatchNorm2d : public Module {
 public:
  explicit BatchNorm2d(int64_t channels, float eps = 1e-5f, float momentum = 0.1f);
  Tensor forward(const Tensor& x) override;
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

}  // namespace lowbit::nn
