// Model zoo definitions (same as ../shared/DESIGN.md and the PyTorch peer) and the summary table.
#include "nn/zoo.h"

#include "core/error.h"

namespace lowbit::nn {

Model::Model(std::string name, std::shared_ptr<Sequential> layers) : name(std::move(name)), layers(std::move(layers)) {
  register_module("layers", this->layers);
}

const std::vector<std::string>& model_names() {
  static const std::vector<std::string> names{"mlp", "lenet5", "convbn"};
  return names;
}

std::shared_ptr<Model> build_model(const std::string& name) {
  using std::make_shared;
  std::vector<std::shared_ptr<Module>> l;
  if (name == "mlp") {
    l = {make_shared<Flatten>(),         make_shared<Linear>(784, 256), make_shared<ReLU>(),
         make_shared<Linear>(256, 128), make_shared<ReLU>(),           make_shared<Linear>(128, 10)};
  } else if (name == "lenet5") {
    l = {make_shared<Conv2d>(1, 6, 5, 1, 2), make_shared<ReLU>(),           make_shared<MaxPool2d>(2),
         make_shared<Conv2d>(6, 16, 5),      make_shared<ReLU>(),           make_shared<MaxPool2d>(2),
         make_shared<Flatten>(),             make_shared<Linear>(400, 120), make_shared<ReLU>(),
         make_shared<Linear>(120, 84),       make_shared<ReLU>(),           make_shared<Linear>(84, 10)};
  } else if (name == "convbn") {
    l = {make_shared<Conv2d>(1, 32, 3, 1, 1, false),  make_shared<BatchNorm2d>(32), make_shared<ReLU>(),
         make_shared<MaxPool2d>(2),                   make_shared<Conv2d>(32, 64, 3, 1, 1, false),
         make_shared<BatchNorm2d>(64),                make_shared<ReLU>(),           make_shared<MaxPool2d>(2),
         make_shared<Flatten>(),                      make_shared<Linear>(3136, 128), make_shared<ReLU>(),
         make_shared<Linear>(128, 10)};
  } else {
    fail("unknown model '{}' (choose one of: mlp, lenet5, convbn)", name);
  }
  return make_shared<Model>(name, make_shared<Sequential>(std::move(l)));
}

std::vector<LayerSummary> summarize(Model& model, const Shape& input_shape) {
  NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  std::vector<LayerSummary> rows;
  Tensor x = Tensor::zeros(input_shape);
  for (size_t i = 0; i < model.layers->size(); ++i) {
    Module& layer = (*model.layers)[i];
    Tensor y = layer.forward(x);
    rows.push_back({fmt::format("layers.{}", i), layer.describe(), y.shape(), layer.parameter_count(),
                    layer.macs(x.shape(), y.shape())});
    x = y;
  }
  model.train(was_training);
  return rows;
}

std::string format_summary(const std::vector<LayerSummary>& rows) {
  std::string out = fmt::format("{:<10} {:<36} {:>18} {:>10} {:>12}\n", "layer", "type", "output", "params", "MACs");
  int64_t params = 0, macs = 0;
  for (const auto& r : rows) {
    out += fmt::format("{:<10} {:<36} {:>18} {:>10} {:>12}\n", r.name, r.description, shape_str(r.output_shape),
                       r.parameters, r.macs);
    params += r.parameters;
    macs += r.macs;
  }
  out += fmt::format("{:<10} {:<36} {:>18} {:>10} {:>12}\n", "total", "", "", params, macs);
  return out;
}

}  // namespace lowbit::nn
