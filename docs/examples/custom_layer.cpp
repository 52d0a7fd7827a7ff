// A layer kind of your own, without editing lowbit: register it, then use it in a model description.
// Here "Swish" (x · sigmoid(x)), built from lowbit's primitive ops so that its backward comes for free, is
// used in a small residual network; the model is trained a few steps on random data and its summary printed.
// Usage: custom_layer
#include <cstdio>
#include <exception>

#include "core/ops.h"
#include "nn/graph.h"
#include "optim/optimizer.h"

using namespace lowbit;

namespace {

// x · sigmoid(x) = x / (1 + exp(−x)): a composite of primitives (docs/design.md, the op list of core/ops.h).
class Swish : public nn::Module {
 public:
  Tensor forward(const Tensor& x) override { return ops::div(x, ops::add_scalar(ops::exp(ops::neg(x)), 1.f)); }
  std::string describe() const override { return "Swish"; }
};

const char* const kDescription = R"({
  "format": "lowbit-model", "version": 1, "name": "swish-net",
  "input": {"channels": 1, "height": 16, "width": 16}, "classes": 4,
  "nodes": [
    {"name": "stem", "kind": "Conv2d", "out_channels": 8, "kernel": 3, "padding": 1},
    {"name": "act", "kind": "Swish"},
    {"name": "dw", "kind": "Conv2d", "out_channels": 8, "kernel": 3, "padding": 1, "groups": 8},
    {"name": "act2", "kind": "Swish"},
    {"name": "add", "kind": "Add", "inputs": ["act2", "act"]},
    {"name": "pool", "kind": "GlobalAvgPool2d"},
    {"name": "flatten", "kind": "Flatten"},
    {"name": "fc", "kind": "Linear", "out_features": "classes"}
  ]
})";

}  // namespace

int main() try {
  // One registration: the kind's name, its attributes (none), one input, and how to build it.
  nn::register_layer_kind(
      {"Swish", "", 1, 1, [](nn::Attributes&, const nn::LayerContext&) { return std::make_shared<Swish>(); }});
  manual_seed(0);
  auto model = nn::build_model(nn::parse_description(kDescription, "custom_layer.cpp"));
  std::printf("%s", nn::format_summary(nn::summarize(*model)).c_str());

  // A few Adam steps on a fixed random batch: the loss must fall.
  Rng rng(1);
  Tensor x = Tensor::empty({32, 1, 16, 16});
  for (float& v : x.values()) v = rng.uniform(-1.f, 1.f);
  std::vector<int32_t> labels(32);
  for (int32_t& l : labels) l = static_cast<int32_t>(rng.below(4));
  optim::Adam adam(model->parameters(), {.lr = 1e-2f});
  float first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    Tensor loss = ops::cross_entropy(model->forward(x), labels);
    adam.zero_grad();
    loss.backward();
    adam.step();
    (step == 0 ? first : last) = loss.item();
  }
  std::printf("loss %.4f -> %.4f after 30 steps\n", first, last);
  return last < first ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "custom_layer: error: %s\n", e.what());
  return 1;
}
