// Tensor: a float32, contiguous, row-major array with a shape, shared storage and an autograd slot.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/rng.h"
#include "core/storage.h"

namespace lowbit {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& shape);  // "(2, 3)"
int64_t shape_numel(const Shape& shape);    // throws on negative dims or int64 overflow

struct Node;

// The state behind a Tensor handle. Views (reshape, alias) share `storage`.
struct TensorImpl {
  Shape shape;
  std::shared_ptr<Storage> storage;
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;  // accumulated by backward() on leaves
  std::shared_ptr<Node> grad_fn;     // the op that produced this tensor (null for leaves)
};

class Tensor {
 public:
  Tensor() = default;  // an undefined tensor (defined() == false)

  // ---- factories
  static Tensor empty(const Shape& shape);  // uninitialised values (from the storage pool)
  static Tensor zeros(const Shape& shape);
  static Tensor ones(const Shape& shape);
  static Tensor full(const Shape& shape, float value);
  static Tensor from(const Shape& shape, std::vector<float> values);  // throws if sizes differ
  static Tensor scalar(float value) { return from({}, {value}); }
  static Tensor randn(const Shape& shape, Rng& rng = global_rng());
  static Tensor rand(const Shape& shape, float lo = 0.f, float hi = 1.f, Rng& rng = global_rng());

  // ---- shape and data
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl_->shape; }
  int64_t dim() const { return static_cast<int64_t>(impl_->shape.size()); }
  int64_t size(int64_t axis) const;  // negative axis counts from the end
  int64_t numel() const { return impl_->storage->size(); }
  float* data() { return impl_->storage->data(); }
  const float* data() const { return impl_->storage->data(); }
  std::span<float> values() { return {data(), static_cast<size_t>(numel())}; }
  std::span<const float> values() const { return {data(), static_cast<size_t>(numel())}; }
  float& at(std::initializer_list<int64_t> index);  // bounds-checked element access
  float at(std::initializer_list<int64_t> index) const;
  float item() const;  // the single value of a one-element tensor

  // ---- views and copies
  Tensor reshape(const Shape& shape) const;  // differentiable; shares storage; one dim may be -1
  Tensor clone() const;                      // a fresh copy of the values, no graph
  Tensor detach() const;                     // shares storage, cut from the graph
  void copy_from(const Tensor& other);       // overwrite values in place (same numel), no graph

  // ---- autograd
  bool requires_grad() const { return impl_->requires_grad; }
  Tensor& set_requires_grad(bool flag);
  Tensor grad() const;  // undefined until backward() reaches this leaf
  void zero_grad();     // drop the accumulated gradient
  void backward() const;                   // seeds d(self)/d(self) = 1; self must have one element
  void backward(const Tensor& grad) const;  // seeds with an explicit gradient of self's shape
  const std::shared_ptr<Node>& grad_fn() const { return impl_->grad_fn; }

  const std::shared_ptr<TensorImpl>& impl() const { return impl_; }
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

 private:
  std::shared_ptr<TensorImpl> impl_;
};

// ---- autograd machinery (used by ops; record and backward are in core/tensor.cpp)

// A node of the backward graph: the inputs of one op call and how to map the output gradient
// to input gradients. `backward` returns one gradient per input (undefined where none flows).
struct Node {
  const char* name;
  std::vector<Tensor> inputs;
  std::function<std::vector<Tensor>(const Tensor& grad_output)> backward;
};

bool grad_enabled();

// Turns off graph recording for its lifetime (evaluation, optimizer updates).
class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

// Records `output` as produced by op `name` from `inputs` when grad mode is on and an input
// requires grad. The backward closure must not capture `output` itself (that would be a cycle);
// capture `output.detach()` if the output's values are needed.
Tensor record(Tensor output, const char* name, std::vector<Tensor> inputs,
              std::function<std::vector<Tensor>(const Tensor&)> backward);

}  // namespace lowbit

template <>
struct fmt::formatter<lowbit::Tensor> {
  constexpr auto parse(fmt::format_parse_context& ctx) { return ctx.begin(); }
  fmt::format_context::iterator format(const lowbit::Tensor& t, fmt::format_context& ctx) const;
};
