// Module: the base of every layer and model (named parameters, buffers, children, train/eval).
#pragma once

#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace lowbit::nn {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Module {
 public:
  virtual ~Module() = default;

  virtual Tensor forward(const Tensor& x) = 0;
  Tensor operator()(const Tensor& x) { return forward(x); }
  // A node of a model graph calls this with the outputs of its input nodes. Layers with one input
  // keep the default (forward(inputs[0])); Add and Concat take several and override it.
  virtual Tensor forward_inputs(std::span<const Tensor> inputs);

  // One line naming the layer and its configuration, e.g. "Conv2d(1, 6, kernel=5, padding=2)".
  virtual std::string describe() const = 0;
  // Multiply-accumulates of one forward pass producing `output_shape` (for the summary).
  virtual int64_t macs(const Shape& /*input_shape*/, const Shape& /*output_shape*/) const { return 0; }

  // Recursive, with dotted PyTorch-style names ("layers.0.weight").
  NamedTensors named_parameters() const;
  NamedTensors named_buffers() const;
  std::vector<Tensor> parameters() const;
  int64_t parameter_count() const;

  void train(bool on = true);
  void eval() { train(false); }
  bool is_training() const { return training_; }
  void zero_grad();

  const std::vector<std::pair<std::string, std::shared_ptr<Module>>>& children() const { return children_; }

 protected:
  Tensor& register_parameter(const std::string& name, Tensor value);
  Tensor& register_buffer(const std::string& name, Tensor value);
  void register_module(const std::string& name, std::shared_ptr<Module> module);

 private:
  void collect(const std::string& prefix, bool parameters, NamedTensors& out) const;

  NamedTensors parameters_;
  NamedTensors buffers_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
};

// Runs its children in order; children are named "0", "1", ... unless appended with a name.
class Sequential : public Module {
 public:
  Sequential() = default;
  explicit Sequential(std::vector<std::shared_ptr<Module>> layers);
  void append(std::shared_ptr<Module> layer);
  void append(const std::string& name, std::shared_ptr<Module> layer);
  Tensor forward(const Tensor& x) override;
  std::string describe() const override { return "Sequential"; }
  size_t size() const { return children().size(); }
  Module& operator[](size_t i) const { return *children()[i].second; }
  std::shared_ptr<Module> at(size_t i) const { return children()[i].second; }
};

}  // namespace lowbit::nn
