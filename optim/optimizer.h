// Optimizers (SGD, Adam, AdamW) with resumable state, and gradient-norm clipping.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace lowbit::optim {

// Named buffers, the layout checkpoints store ("optim.<param index>.<buffer>").
using StateTensors = std::vector<std::pair<std::string, Tensor>>;

// ============================================================================ Optimizer
// The base of every optimizer: the parameters, the learning rate, the step count and the
// per-parameter buffers (momentum, moments). A parameter whose grad is undefined when step()
// runs is skipped: its values and buffers stay as they are.
class Optimizer {
 public:
  // `params` are leaf tensors (no grad_fn), each listed once; `buffer_names` are the buffers a
  // subclass keeps per parameter (a buffer named "step" is a scalar, the others have the
  // parameter's shape). Throws lowbit::Error on an empty list, a non-leaf or a duplicate.
  Optimizer(std::vector<Tensor> params, float lr, std::vector<std::string> buffer_names);
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  virtual void step() = 0;  // one update of every parameter that has a gradient
  void zero_grad();         // drops every parameter's gradient

  float lr() const { return lr_; }
  void set_lr(float lr);  // lr >= 0 (a schedule may reach 0)
  int64_t steps() const { return steps_; }  // how many times step() has run
  const std::vector<Tensor>& params() const { return params_; }

  // The buffers themselves (not copies; save them before the next step()), named
  // "optim.<i>.<buffer>" where <i> indexes `params`. A parameter that has not been updated yet
  // has no buffers. The step count is not in here: the caller stores steps() in its metadata.
  StateTensors state() const;
  // Replaces the buffers by copies of `state` (as returned by state()) and the step count by
  // `steps`. Throws lowbit::Error naming the offending entry on an unknown name, an index out of
  // range, a duplicate, a wrong shape or a parameter with only some of its buffers.
  void load_state(const StateTensors& state, int64_t steps);

 protected:
  // buffers_[i][k] is buffer k (in buffer_names_ order) of parameter i; undefined until the
  // first step() that updates parameter i.
  Tensor& buffer(size_t i, size_t k) { return buffers_[i][k]; }
  Shape buffer_shape(size_t i, size_t k) const;

  std::vector<Tensor> params_;
  float lr_;
  int64_t steps_ = 0;

 private:
  std::vector<std::string> buffer_names_;
  std::vector<std::vector<Tensor>> buffers_;
};

// ============================================================================ SGD
// torch.optim.SGD. For each parameter p with gradient g:
//   g = g + weight_decay * p
//   if momentum != 0:
//     buf = g                                          (first update of p)
//     buf = momentum * buf + (1 - dampening) * g       (later updates)
//     g = nesterov ? g + momentum * buf : buf
//   p = p - lr * g
// Buffer (when momentum != 0): "momentum_buffer".
class SGD : public Optimizer {
 public:
  struct Options {
    float lr = 0.1f;
    float momentum = 0.f;
    float dampening = 0.f;
    bool nesterov = false;
    float weight_decay = 0.f;
  };
  // Throws lowbit::Error unless lr > 0, momentum >= 0, dampening >= 0, weight_decay >= 0, and
  // (for nesterov) momentum > 0 with dampening == 0.
  SGD(std::vector<Tensor> params, Options options);
  void step() override;
  const Options& options() const { return options_; }

 private:
  Options options_;
};

// ============================================================================ Adam and AdamW
// torch.optim.Adam. For each parameter p with gradient g, at its t-th update (t = 1, 2, ...):
//   g = g + weight_decay * p                           (Adam: L2 penalty in the gradient)
//   p = p - lr * weight_decay * p                      (AdamW: decoupled decay instead)
//   m = beta1 * m + (1 - beta1) * g                    (m, v start at 0)
//   v = beta2 * v + (1 - beta2) * g * g
//   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// Buffers: "step" (t, a scalar, counted per parameter as in PyTorch), "exp_avg" (m),
// "exp_avg_sq" (v).
class Adam : public Optimizer {
 public:
  struct Options {
    float lr = 1e-3f;
    float beta1 = 0.9f;
    float beta2 = 0.999f;
    float eps = 1e-8f;
    float weight_decay = 0.f;
  };
  // Throws lowbit::Error unless lr > 0, 0 <= beta1, beta2 < 1, eps >= 0, weight_decay >= 0.
  Adam(std::vector<Tensor> params, Options options);
  void step() override;
  const Options& options() const { return options_; }

 protected:
  Adam(std::vector<Tensor> params, Options options, bool decoupled_weight_decay);

 private:
  Options options_;
  bool decoupled_weight_decay_;
};

// torch.optim.AdamW: Adam with the weight decay applied to the parameter, not the gradient.
class AdamW : public Adam {
 public:
  struct Options {
    float lr = 1e-3f;
    float beta1 = 0.9f;
    float beta2 = 0.999f;
    float eps = 1e-8f;
    float weight_decay = 1e-2f;
  };
  AdamW(std::vector<Tensor> params, Options options);
};

// ============================================================================ Gradient clipping
// torch.nn.utils.clip_grad_norm_: the L2 norm of all gradients together (summed in double;
// parameters without a gradient are skipped). When coef = max_norm / (norm + 1e-6) is below 1
// (that is, norm + 1e-6 > max_norm), every gradient is multiplied by coef in place.
// Returns the norm before clipping. Throws lowbit::Error if max_norm < 0.
float clip_grad_norm(const std::vector<Tensor>& params, float max_norm);

}  // namespace lowbit::optim
