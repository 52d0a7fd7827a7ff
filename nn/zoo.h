// The model zoo: the three canonical models (mlp, lenet5, convbn) by name, and a layer summary.
#pragma once

#include <string>
#include <vector>

#include "nn/layers.h"

namespace lowbit::nn {

// A classifier: its layers live in `layers`, so parameters are named "layers.0.weight" as in PyTorch.
class Model : public Module {
 public:
  Model(std::string name, std::shared_ptr<Sequential> layers);
  Tensor forward(const Tensor& x) override { return layers->forward(x); }
  std::string describe() const override { return name; }
  std::string name;
  std::shared_ptr<Sequential> layers;
};

const std::vector<std::string>& model_names();  // {"mlp", "lenet5", "convbn"}
// Builds a freshly initialised model (weights from global_rng()); throws on an unknown name.
std::shared_ptr<Model> build_model(const std::string& name);

struct LayerSummary {
  std::string name;  // "layers.0"
  std::string description;
  Shape output_shape;
  int64_t parameters;
  int64_t macs;
};
// One entry per layer for an input of shape (1, C, H, W); runs one forward pass without grad.
std::vector<LayerSummary> summarize(Model& model, const Shape& input_shape);
std::string format_summary(const std::vector<LayerSummary>& rows);

}  // namespace lowbit::nn
