// Tensor factories, element access, views, printing, and the autograd engine (record + backward).
#include "core/tensor.h"

#include <algorithm>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "core/ops.h"

namespace lowbit {

std::string shape_str(const Shape& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) fail("shape {} has a negative dimension", shape_str(shape));
    if (__builtin_mul_overflow(n, d, &n)) fail("shape {} has too many elements", shape_str(shape));
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// factories

Tensor Tensor::empty(const Shape& shape) {
  auto impl = std::make_shared<TensorImpl>();
  impl->shape = shape;
  impl->storage = std::make_shared<Storage>(shape_numel(shape));
  return Tensor(std::move(impl));
}

Tensor Tensor::zeros(const Shape& shape) { return full(shape, 0.f); }

Tensor Tensor::ones(const Shape& shape) { return full(shape, 1.f); }

Tensor Tensor::full(const Shape& shape, float value) {
  Tensor t = empty(shape);
  std::fill(t.values().begin(), t.values().end(), value);
  return t;
}

Tensor Tensor::from(const Shape& shape, std::vector<float> values) {
  if (static_cast<int64_t>(values.size()) != shape_numel(shape))
    fail("Tensor::from: shape {} needs {} values, got {}", shape_str(shape), shape_numel(shape),
         values.size());
  Tensor t = empty(shape);
  std::copy(values.begin(), values.end(), t.data());
  return t;
}

Tensor Tensor::randn(const Shape& shape, Rng& rng) {
  Tensor t = empty(shape);
  for (float& v : t.values()) v = rng.normal();
  return t;
}

Tensor Tensor::rand(const Shape& shape, float lo, float hi, Rng& rng) {
  Tensor t = empty(shape);
  for (float& v : t.values()) v = rng.uniform(lo, hi);
  return t;
}

// ---------------------------------------------------------------------------------------------
// element access

int64_t Tensor::size(int64_t axis) const {
  const int64_t d = dim();
  if (axis < -d || axis >= d) fail("axis {} is out of range for shape {}", axis, shape_str(shape()));
  return shape()[static_cast<size_t>(axis < 0 ? axis + d : axis)];
}

namespace {
int64_t flat_index(const Shape& shape, std::initializer_list<int64_t> index) {
  if (index.size() != shape.size())
    fail("index of rank {} used on a tensor of shape {}", index.size(), shape_str(shape));
  int64_t flat = 0;
  size_t axis = 0;
  for (int64_t i : index) {
    if (i < 0 || i >= shape[axis])
      fail("index {} is out of range for axis {} of shape {}", i, axis, shape_str(shape));
    flat = flat * shape[axis] + i;
    ++axis;
  }
  return flat;
}
}  // namespace

float& Tensor::at(std::initializer_list<int64_t> index) { return data()[flat_index(shape(), index)]; }
float Tensor::at(std::initializer_list<int64_t> index) const { return data()[flat_index(shape(), index)]; }

float Tensor::item() const {
  if (numel() != 1) fail("item() needs a one-element tensor, got shape {}", shape_str(shape()));
  return data()[0];
}

// ---------------------------------------------------------------------------------------------
// views and copies

Tensor Tensor::reshape(const Shape& shape) const { return ops::reshape(*this, shape); }

Tensor Tensor::clone() const {
  Tensor t = empty(shape());
  std::copy(values().begin(), values().end(), t.data());
  return t;
}

Tensor Tensor::detach() const {
  auto impl = std::make_shared<TensorImpl>();
  impl->shape = impl_->shape;
  impl->storage = impl_->storage;
  return Tensor(std::move(impl));
}

void Tensor::copy_from(const Tensor& other) {
  if (other.numel() != numel())
    fail("copy_from: cannot copy {} into {}", shape_str(other.shape()), shape_str(shape()));
  std::copy(other.values().begin(), other.values().end(), values().begin());
}

// ---------------------------------------------------------------------------------------------
// autograd

Tensor& Tensor::set_requires_grad(bool flag) {
  if (flag && impl_->grad_fn) fail("set_requires_grad: only leaf tensors can be made to require grad");
  impl_->requires_grad = flag;
  return *this;
}

Tensor Tensor::grad() const { return impl_->grad ? Tensor(impl_->grad) : Tensor(); }

void Tensor::zero_grad() { impl_->grad.reset(); }

namespace {
thread_local bool g_grad_enabled = true;

// Adds `grad` into `slot`. The first gradient is taken over as it is when nothing else can see
// its buffer (one owner of the handle, one of the storage); otherwise it is copied, because an op
// may hand one gradient to two inputs (add gives g to both) and the slot is later added to in place.
void accumulate(Tensor& slot, Tensor grad) {
  if (!slot.defined()) {
    const bool sole_owner = grad.impl().use_count() == 1 && grad.impl()->storage.use_count() == 1;
    slot = sole_owner ? std::move(grad) : grad.clone();
    return;
  }
  float* dst = slot.data();
  const float* src = grad.data();
  for (int64_t i = 0; i < slot.numel(); ++i) dst[i] += src[i];
}
}  // namespace

bool grad_enabled() { return g_grad_enabled; }
NoGradGuard::NoGradGuard() : previous_(g_grad_enabled) { g_grad_enabled = false; }
NoGradGuard::~NoGradGuard() { g_grad_enabled = previous_; }

Tensor record(Tensor output, const char* name, std::vector<Tensor> inputs,
              std::function<std::vector<Tensor>(const Tensor&)> backward) {
  if (!g_grad_enabled) return output;
  bool any = false;
  for (const Tensor& t : inputs) any = any || (t.defined() && t.requires_grad());
  if (!any) return output;
  output.impl()->requires_grad = true;
  output.impl()->grad_fn = std::make_shared<Node>(Node{name, std::move(inputs), std::move(backward)});
  return output;
}

void Tensor::backward() const {
  if (numel() != 1)
    fail("backward() without a gradient needs a one-element tensor, got shape {}", shape_str(shape()));
  backward(Tensor::ones(shape()));
}

// Reverse-mode sweep: order the graph's nodes so that every node comes after all nodes that
// consume its output (reverse topological order, by an iterative depth-first search), then hand
// each node the sum of the gradients its consumers sent it.
void Tensor::backward(const Tensor& grad) const {
  if (!requires_grad()) fail("backward(): this tensor does not require grad");
  if (grad.shape() != shape())
    fail("backward(): gradient of shape {} for a tensor of shape {}", shape_str(grad.shape()),
         shape_str(shape()));
  NoGradGuard no_grad;  // gradients themselves are not differentiated

  std::vector<TensorImpl*> order;  // post-order: inputs before the tensors made from them
  std::unordered_set<TensorImpl*> seen;
  std::vector<std::pair<TensorImpl*, size_t>> stack{{impl_.get(), 0}};
  seen.insert(impl_.get());
  while (!stack.empty()) {
    auto& [impl, next_input] = stack.back();
    const Node* node = impl->grad_fn.get();
    if (node && next_input < node->inputs.size()) {
      TensorImpl* input = node->inputs[next_input++].impl().get();
      if (input && input->requires_grad && seen.insert(input).second) stack.push_back({input, 0});
      continue;
    }
    order.push_back(impl);
    stack.pop_back();
  }

  std::unordered_map<TensorImpl*, Tensor> grads;
  grads[impl_.get()] = grad;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    TensorImpl* impl = *it;
    auto found = grads.find(impl);
    if (found == grads.end()) continue;  // no gradient reached this tensor
    Tensor g = std::move(found->second);
    grads.erase(found);
    if (!impl->grad_fn) {  // a leaf: keep the gradient
      Tensor slot = impl->grad ? Tensor(impl->grad) : Tensor();
      accumulate(slot, std::move(g));
      impl->grad = slot.impl();
      continue;
    }
    const Node& node = *impl->grad_fn;
    std::vector<Tensor> input_grads = node.backward(g);
    for (size_t i = 0; i < node.inputs.size(); ++i) {
      const Tensor& input = node.inputs[i];
      if (!input.defined() || !input.requires_grad() || i >= input_grads.size() ||
          !input_grads[i].defined())
        continue;
      if (input_grads[i].shape() != input.shape())
        fail("internal: backward of '{}' gave a gradient of shape {} for input {} of shape {}",
             node.name, shape_str(input_grads[i].shape()), i, shape_str(input.shape()));
      accumulate(grads[input.impl().get()], std::move(input_grads[i]));
    }
  }
}

}  // namespace lowbit

fmt::format_context::iterator fmt::formatter<lowbit::Tensor>::format(const lowbit::Tensor& t,
                                                                      fmt::format_context& ctx) const {
  if (!t.defined()) return fmt::format_to(ctx.out(), "Tensor(undefined)");
  auto out = fmt::format_to(ctx.out(), "Tensor{} [", lowbit::shape_str(t.shape()));
  const int64_t shown = std::min<int64_t>(t.numel(), 8);
  for (int64_t i = 0; i < shown; ++i) out = fmt::format_to(out, "{}{:.4g}", i ? ", " : "", t.data()[i]);
  return fmt::format_to(out, "{}]", t.numel() > shown ? ", ..." : "");
}
