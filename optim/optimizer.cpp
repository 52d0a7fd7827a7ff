// Optimizers (SGD, Adam, AdamW) with resumable state, and gradient-norm clipping.
#include "optim/optimizer.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "core/error.h"

namespace lowbit::optim {

// ============================================================================ Optimizer

Optimizer::Optimizer(std::vector<Tensor> params, float lr, std::vector<std::string> buffer_names)
    : params_(std::move(params)), lr_(lr), buffer_names_(std::move(buffer_names)) {
  if (params_.empty()) fail("optimizer: got an empty parameter list; pass the model's parameters");
  std::unordered_set<const TensorImpl*> seen;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i];
    if (!p.defined()) fail("optimizer: parameter {} is an undefined tensor", i);
    if (p.grad_fn()) fail("optimizer: parameter {} is not a leaf tensor; optimize the leaves it was made from", i);
    if (!seen.insert(p.impl().get()).second) fail("optimizer: parameter {} appears more than once in the list", i);
  }
  buffers_.assign(params_.size(), std::vector<Tensor>(buffer_names_.size()));
}

void Optimizer::zero_grad() {
  for (Tensor& p : params_) p.zero_grad();
}

void Optimizer::set_lr(float lr) {
  if (!(lr >= 0.f) || !std::isfinite(lr)) fail("optimizer: learning rate must be finite and >= 0, got {}", lr);
  lr_ = lr;
}

Shape Optimizer::buffer_shape(size_t i, size_t k) const {
  return buffer_names_[k] == "step" ? Shape{} : params_[i].shape();
}

StateTensors Optimizer::state() const {
  StateTensors out;
  for (size_t i = 0; i < params_.size(); ++i)
    for (size_t k = 0; k < buffer_names_.size(); ++k)
      if (buffers_[i][k].defined()) out.emplace_back(fmt::format("optim.{}.{}", i, buffer_names_[k]), buffers_[i][k]);
  return out;
}

void Optimizer::load_state(const StateTensors& state, int64_t steps) {
  if (steps < 0) fail("optimizer load_state: step count must be >= 0, got {}", steps);
  std::vector<std::vector<Tensor>> loaded(params_.size(), std::vector<Tensor>(buffer_names_.size()));
  for (const auto& [name, tensor] : state) {
    // "optim.<i>.<buffer>"
    const std::string prefix = "optim.";
    const size_t dot = name.find('.', prefix.size());
    if (!name.starts_with(prefix) || dot == std::string::npos || dot == prefix.size())
      fail("optimizer load_state: '{}' is not of the form optim.<index>.<buffer>", name);
    const std::string index_text = name.substr(prefix.size(), dot - prefix.size());
    if (index_text.find_first_not_of("0123456789") != std::string::npos || index_text.size() > 9)
      fail("optimizer load_state: '{}' has a bad parameter index '{}'", name, index_text);
    const size_t i = std::stoul(index_text);
    if (i >= params_.size())
      fail("optimizer load_state: '{}' refers to parameter {} but the optimizer has {} parameters; "
           "was the state saved for another model?",
           name, i, params_.size());
    const std::string buffer_name = name.substr(dot + 1);
    size_t k = 0;
    while (k < buffer_names_.size() && buffer_names_[k] != buffer_name) ++k;
    if (k == buffer_names_.size())
      fail("optimizer load_state: '{}' names buffer '{}', which this optimizer does not keep; "
           "was the state saved by another optimizer or with other options?",
           name, buffer_name);
    if (loaded[i][k].defined()) fail("optimizer load_state: '{}' appears twice", name);
    if (!tensor.defined()) fail("optimizer load_state: '{}' is an undefined tensor", name);
    if (tensor.shape() != buffer_shape(i, k))
      fail("optimizer load_state: '{}' has shape {} but parameter {} needs {}; was the state saved for another model?",
           name, shape_str(tensor.shape()), i, shape_str(buffer_shape(i, k)));
    loaded[i][k] = tensor.clone();
  }
  for (size_t i = 0; i < params_.size(); ++i)
    for (size_t k = 0; k < buffer_names_.size(); ++k)
      if (loaded[i][k].defined() != loaded[i][0].defined())
        fail("optimizer load_state: parameter {} has '{}' but not '{}'", i,
             buffer_names_[loaded[i][k].defined() ? k : 0], buffer_names_[loaded[i][k].defined() ? 0 : k]);
  buffers_ = std::move(loaded);
  steps_ = steps;
}

// ============================================================================ SGD

namespace {

// p, g, buf are (n); buf is null without momentum. One torch.optim.SGD update of one parameter.
void sgd_update(float* p, const float* g, float* buf, bool first_update, int64_t n, const SGD::Options& o, float lr) {
#pragma omp parallel for if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    float d = g[i] + o.weight_decay * p[i];
    if (buf) {
      buf[i] = first_update ? d : o.momentum * buf[i] + (1.f - o.dampening) * d;
      d = o.nesterov ? d + o.momentum * buf[i] : buf[i];
    }
    p[i] -= lr * d;
  }
}

}  // namespace

SGD::SGD(std::vector<Tensor> params, Options options)
    : Optimizer(std::move(params), options.lr,
                options.momentum != 0.f ? std::vector<std::string>{"momentum_buffer"} : std::vector<std::string>{}),
      options_(options) {
  const Options& o = options_;
  if (!(o.lr > 0.f)) fail("SGD: lr must be > 0, got {}", o.lr);
  if (!(o.momentum >= 0.f)) fail("SGD: momentum must be >= 0, got {}", o.momentum);
  if (!(o.dampening >= 0.f)) fail("SGD: dampening must be >= 0, got {}", o.dampening);
  if (!(o.weight_decay >= 0.f)) fail("SGD: weight_decay must be >= 0, got {}", o.weight_decay);
  if (o.nesterov && (o.momentum <= 0.f || o.dampening != 0.f))
    fail("SGD: nesterov needs momentum > 0 and dampening == 0, got momentum {} and dampening {}", o.momentum,
         o.dampening);
}

void SGD::step() {
  NoGradGuard no_grad;
  const bool has_momentum = options_.momentum != 0.f;
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor grad = params_[i].grad();
    if (!grad.defined()) continue;
    bool first_update = false;
    float* buf = nullptr;
    if (has_momentum) {
      Tensor& momentum_buffer = buffer(i, 0);
      first_update = !momentum_buffer.defined();
      if (first_update) momentum_buffer = Tensor::zeros(params_[i].shape());
      buf = momentum_buffer.data();
    }
    sgd_update(params_[i].data(), grad.data(), buf, first_update, params_[i].numel(), options_, lr_);
  }
  ++steps_;
}

// ============================================================================ Adam and AdamW

namespace {

// p, g, m, v are (n). One Adam update of one parameter; the scalars are precomputed by the caller:
// l2 is Adam's weight decay (0 for AdamW), decay is AdamW's factor 1 - lr * weight_decay (1 for
// Adam), step_size = lr / (1 - beta1^t), bias2_sqrt = sqrt(1 - beta2^t).
void adam_update(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v, int64_t n,
                 const Adam::Options& o, float l2, float decay, float step_size, float bias2_sqrt) {
  // Options copied into locals: through the reference, every store to p, m or v might change them,
  // and the loop would neither keep them in registers nor vectorise (it was 11% of convbn's training).
  const float beta1 = o.beta1, beta2 = o.beta2, eps = o.eps;
#pragma omp parallel for if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] + l2 * p[i];
    m[i] = beta1 * m[i] + (1.f - beta1) * gi;
    v[i] = beta2 * v[i] + (1.f - beta2) * gi * gi;
    p[i] = p[i] * decay - step_size * m[i] / (std::sqrt(v[i]) / bias2_sqrt + eps);
  }
}

}  // namespace

Adam::Adam(std::vector<Tensor> params, Options options) : Adam(std::move(params), options, false) {}

Adam::Adam(std::vector<Tensor> params, Options options, bool decoupled_weight_decay)
    : Optimizer(std::move(params), options.lr, {"step", "exp_avg", "exp_avg_sq"}),
      options_(options),
      decoupled_weight_decay_(decoupled_weight_decay) {
  const char* name = decoupled_weight_decay ? "AdamW" : "Adam";
  const Options& o = options_;
  if (!(o.lr > 0.f)) fail("{}: lr must be > 0, got {}", name, o.lr);
  if (!(o.beta1 >= 0.f && o.beta1 < 1.f)) fail("{}: beta1 must be in [0, 1), got {}", name, o.beta1);
  if (!(o.beta2 >= 0.f && o.beta2 < 1.f)) fail("{}: beta2 must be in [0, 1), got {}", name, o.beta2);
  if (!(o.eps >= 0.f)) fail("{}: eps must be >= 0, got {}", name, o.eps);
  if (!(o.weight_decay >= 0.f)) fail("{}: weight_decay must be >= 0, got {}", name, o.weight_decay);
}

void Adam::step() {
  NoGradGuard no_grad;
  const Options& o = options_;
  const float l2 = decoupled_weight_decay_ ? 0.f : o.weight_decay;
  const float decay = decoupled_weight_decay_ ? 1.f - lr_ * o.weight_decay : 1.f;
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor grad = params_[i].grad();
    if (!grad.defined()) continue;
    Tensor& step = buffer(i, 0);
    Tensor& exp_avg = buffer(i, 1);
    Tensor& exp_avg_sq = buffer(i, 2);
    if (!step.defined()) {
      step = Tensor::scalar(0.f);
      exp_avg = Tensor::zeros(params_[i].shape());
      exp_avg_sq = Tensor::zeros(params_[i].shape());
    }
    const double t = ++step.data()[0];
    const double bias1 = 1.0 - std::pow(static_cast<double>(o.beta1), t);
    const double bias2 = 1.0 - std::pow(static_cast<double>(o.beta2), t);
    const float step_size = static_cast<float>(lr_ / bias1);
    const float bias2_sqrt = static_cast<float>(std::sqrt(bias2));
    adam_update(params_[i].data(), grad.data(), exp_avg.data(), exp_avg_sq.data(), params_[i].numel(), o, l2, decay,
                step_size, bias2_sqrt);
  }
  ++steps_;
}

AdamW::AdamW(std::vector<Tensor> params, Options options)
    : Adam(std::move(params),
           Adam::Options{.lr = options.lr,
                         .beta1 = options.beta1,
                         .beta2 = options.beta2,
                         .eps = options.eps,
                         .weight_decay = options.weight_decay},
           true) {}

// ============================================================================ Gradient clipping

namespace {

// g is (n). The sum of g[i]^2 in double, over fixed blocks summed in order, so the result does
// not depend on the number of threads.
double sum_of_squares(const float* g, int64_t n) {
  constexpr int64_t kBlock = 1 << 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
#pragma omp parallel for if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) partial[b] += static_cast<double>(g[i]) * g[i];
  double sum = 0.0;
  for (double s : partial) sum += s;
  return sum;
}

}  // namespace

float clip_grad_norm(const std::vector<Tensor>& params, float max_norm) {
  if (!(max_norm >= 0.f)) fail("clip_grad_norm: max_norm must be >= 0, got {}", max_norm);
  NoGradGuard no_grad;
  double sum_sq = 0.0;
  for (const Tensor& p : params)
    if (p.grad().defined()) sum_sq += sum_of_squares(p.grad().data(), p.grad().numel());
  const double norm = std::sqrt(sum_sq);
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    const float scale = static_cast<float>(coef);
    for (const Tensor& p : params) {
      Tensor grad = p.grad();
      if (!grad.defined()) continue;
      float* g = grad.data();
      const int64_t n = grad.numel();
#pragma omp parallel for if (n > (1 << 16))
      for (int64_t i = 0; i < n; ++i) g[i] *= scale;
    }
  }
  return static_cast<float>(norm);
}

}  // namespace lowbit::optim
