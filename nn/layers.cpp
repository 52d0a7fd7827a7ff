// Layer implementations: parameters, initialisation, forward (backward comes from core ops), and each
// layer's kind for model descriptions (nn/kinds.h): its attributes, and the sizes inferred from its input.
#include "nn/layers.h"

#include <cmath>

#include "core/error.h"
#include "nn/kinds.h"

namespace lowbit::nn {

void kaiming_uniform_(Tensor& weight, int64_t fan_in, Rng& rng) {
  const float bound = 1.f / std::sqrt(static_cast<float>(fan_in));
  for (float& v : weight.values()) v = rng.uniform(-bound, bound);
}

// ---- Linear

Linear::Linear(int64_t in_features, int64_t out_features, bool with_bias)
    : in_features(in_features), out_features(out_features) {
  if (in_features < 1 || out_features < 1) fail("Linear({}, {}): sizes must be positive", in_features, out_features);
  weight = register_parameter("weight", Tensor::empty({out_features, in_features}));
  kaiming_uniform_(weight, in_features);
  if (with_bias) {
    bias = register_parameter("bias", Tensor::empty({out_features}));
    kaiming_uniform_(bias, in_features);
  }
}

Tensor Linear::forward(const Tensor& x) {
  if (x.dim() != 2 || x.size(1) != in_features)
    fail("Linear({}, {}): input of shape {} (expected (N, {}))", in_features, out_features, shape_str(x.shape()),
         in_features);
  Tensor y = ops::matmul(x, weight, false, true);
  return bias.defined() ? ops::add(y, bias) : y;
}

std::string Linear::describe() const {
  return fmt::format("Linear({}, {}{})", in_features, out_features, bias.defined() ? "" : ", bias=false");
}

int64_t Linear::macs(const Shape& in, const Shape&) const { return in[0] * in_features * out_features; }

namespace {
// The one input's shape for one image, which must be (C, H, W) for the spatial layers.
const Shape& image_input(const Attributes& a, const LayerContext& c) {
  if (c.inputs[0].size() != 3)
    fail("{}: needs an image input (C, H, W), its input is {}", a.where(), shape_str(c.inputs[0]));
  return c.inputs[0];
}

LayerKind linear_kind() {
  return {"Linear", "out_features (a number or \"classes\"), in_features=auto, bias=true", 1, 1,
          [](Attributes& a, const LayerContext& c) -> std::shared_ptr<Module> {
            if (c.inputs[0].size() != 1)
              fail("{}: needs a flat input (FEATURES), its input is {}: put a Flatten before it", a.where(),
                   shape_str(c.inputs[0]));
            const int64_t in = a.inferred("in_features", c.inputs[0][0]);
            const int64_t out = a.features("out_features", c.classes);
            return std::make_shared<Linear>(in, out, a.boolean_or("bias", true));
          }};
}
}  // namespace

// ---- Conv2d

Conv2d::Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride, int64_t padding,
               bool with_bias, int64_t groups)
    : in_channels(in_channels),
      out_channels(out_channels),
      kernel(kernel),
      stride(stride),
      padding(padding),
      groups(groups) {
  if (in_channels < 1 || out_channels < 1 || kernel < 1 || stride < 1 || padding < 0 || groups < 1)
    fail("Conv2d({}, {}, kernel={}, stride={}, padding={}, groups={}): bad configuration", in_channels, out_channels,
         kernel, stride, padding, groups);
  if (in_channels % groups != 0 || out_channels % groups != 0)
    fail("Conv2d({}, {}, groups={}): groups must divide both channel counts", in_channels, out_channels, groups);
  const int64_t fan_in = in_channels / groups * kernel * kernel;
  weight = register_parameter("weight", Tensor::empty({out_channels, in_channels / groups, kernel, kernel}));
  kaiming_uniform_(weight, fan_in);
  if (with_bias) {
    bias = register_parameter("bias", Tensor::empty({out_channels}));
    kaiming_uniform_(bias, fan_in);
  }
}

Tensor Conv2d::forward(const Tensor& x) { return ops::conv2d(x, weight, bias, stride, padding, groups); }

std::string Conv2d::describe() const {
  return fmt::format("Conv2d({}, {}, kernel={}{}{}{}{})", in_channels, out_channels, kernel,
                     stride != 1 ? fmt::format(", stride={}", stride) : "",
                     padding != 0 ? fmt::format(", padding={}", padding) : "",
                     groups != 1 ? fmt::format(", groups={}", groups) : "", bias.defined() ? "" : ", bias=false");
}

int64_t Conv2d::macs(const Shape&, const Shape& out) const {
  return out[0] * out[1] * out[2] * out[3] * (in_channels / groups) * kernel * kernel;
}

namespace {
LayerKind conv2d_kind() {
  return {"Conv2d", "out_channels, kernel, stride=1, padding=0, groups=1, bias=true, in_channels=auto", 1, 1,
          [](Attributes& a, const LayerContext& c) -> std::shared_ptr<Module> {
            const Shape& in = image_input(a, c);
            const int64_t k = a.integer("kernel"), padding = a.integer_or("padding", 0);
            if (in[1] + 2 * padding < k || in[2] + 2 * padding < k)
              fail("{}: kernel {} is larger than its padded input {}x{}", a.where(), k, in[1] + 2 * padding,
                   in[2] + 2 * padding);
            return std::make_shared<Conv2d>(a.inferred("in_channels", in[0]), a.integer("out_channels"), k,
                                            a.integer_or("stride", 1), padding, a.boolean_or("bias", true),
                                            a.integer_or("groups", 1));
          }};
}
}  // namespace

// ---- BatchNorm2d

BatchNorm2d::BatchNorm2d(int64_t channels, float eps, float momentum)
    : channels(channels), eps(eps), momentum(momentum) {
  weight = register_parameter("weight", Tensor::ones({channels}));
  bias = register_parameter("bias", Tensor::zeros({channels}));
  running_mean = register_buffer("running_mean", Tensor::zeros({channels}));
  running_var = register_buffer("running_var", Tensor::ones({channels}));
}

Tensor BatchNorm2d::forward(const Tensor& x) {
  return ops::batch_norm(x, weight, bias, running_mean, running_var, is_training(), momentum, eps);
}

Tensor BatchNorm2d::forward_relu(const Tensor& x) {
  return ops::batch_norm_relu(x, weight, bias, running_mean, running_var, is_training(), momentum, eps);
}

std::string BatchNorm2d::describe() const { return fmt::format("BatchNorm2d({})", channels); }

namespace {
LayerKind batch_norm2d_kind() {
  return {"BatchNorm2d", "channels=auto, eps=1e-5, momentum=0.1", 1, 1,
          [](Attributes& a, const LayerContext& c) -> std::shared_ptr<Module> {
            const int64_t channels = a.inferred("channels", image_input(a, c)[0]);
            return std::make_shared<BatchNorm2d>(channels, static_cast<float>(a.number_or("eps", 1e-5)),
                                                 static_cast<float>(a.number_or("momentum", 0.1)));
          }};
}
}  // namespace

// ---- the rest

std::string MaxPool2d::describe() const {
  return stride == kernel ? fmt::format("MaxPool2d({})", kernel)
                          : fmt::format("MaxPool2d({}, stride={})", kernel, stride);
}
std::string AvgPool2d::describe() const {
  return stride == kernel ? fmt::format("AvgPool2d({})", kernel)
                          : fmt::format("AvgPool2d({}, stride={})", kernel, stride);
}
std::string Dropout::describe() const { return fmt::format("Dropout({})", p); }

// ---- Add and Concat: the layers with several inputs

Tensor Add::forward(const Tensor&) { fail("Add takes two inputs (give the node two \"inputs\")"); }

Tensor Add::forward_inputs(std::span<const Tensor> inputs) {
  if (inputs.size() != 2) fail("Add takes two inputs, not {}", inputs.size());
  if (inputs[0].shape() != inputs[1].shape())
    fail("Add: its inputs have different shapes {} and {}", shape_str(inputs[0].shape()), shape_str(inputs[1].shape()));
  return ops::add(inputs[0], inputs[1]);
}

Tensor Concat::forward(const Tensor&) { fail("Concat takes two or more inputs (give the node its \"inputs\")"); }

Tensor Concat::forward_inputs(std::span<const Tensor> inputs) {
  if (inputs.size() < 2) fail("Concat takes two or more inputs, not {}", inputs.size());
  return ops::concat(std::vector<Tensor>(inputs.begin(), inputs.end()), 1);
}

// ---- the kinds without sizes to infer, and the list of built-in kinds

namespace {
// A kind whose module needs nothing from its input's shape.
template <typename Make>
LayerKind simple_kind(std::string name, std::string attributes, int min_inputs, int max_inputs, Make make) {
  return {std::move(name), std::move(attributes), min_inputs, max_inputs,
          [make](Attributes& a, const LayerContext& c) -> std::shared_ptr<Module> { return make(a, c); }};
}

LayerKind pool_kind(const std::string& name) {
  return simple_kind(name, "kernel, stride=kernel", 1, 1,
                     [name](Attributes& a, const LayerContext& c) -> std::shared_ptr<Module> {
                       const Shape& in = image_input(a, c);
                       const int64_t k = a.integer("kernel"), stride = a.integer_or("stride", k);
                       if (k < 1 || stride < 1 || k > in[1] || k > in[2])
                         fail("{}: kernel {} / stride {} do not fit its input {}", a.where(), k, stride, shape_str(in));
                       if (name == "MaxPool2d") return std::make_shared<MaxPool2d>(k, stride);
                       return std::make_shared<AvgPool2d>(k, stride);
                     });
}
}  // namespace

std::vector<LayerKind> builtin_layer_kinds() {
  using A = Attributes&;
  using C = const LayerContext&;
  return {
      linear_kind(),
      conv2d_kind(),
      batch_norm2d_kind(),
      simple_kind("ReLU", "", 1, 1, [](A, C) { return std::make_shared<ReLU>(); }),
      simple_kind("ReLU6", "", 1, 1, [](A, C) { return std::make_shared<ReLU6>(); }),
      pool_kind("MaxPool2d"),
      pool_kind("AvgPool2d"),
      simple_kind("GlobalAvgPool2d", "", 1, 1,
                  [](A a, C c) {
                    image_input(a, c);
                    return std::make_shared<GlobalAvgPool2d>();
                  }),
      simple_kind("Flatten", "", 1, 1, [](A, C) { return std::make_shared<Flatten>(); }),
      simple_kind("Dropout", "p=0.5", 1, 1,
                  [](A a, C) {
                    const double p = a.number_or("p", 0.5);
                    if (p < 0 || p >= 1) fail("{}: p must be in [0, 1), not {}", a.where(), p);
                    return std::make_shared<Dropout>(static_cast<float>(p));
                  }),
      simple_kind("Add", "", 2, 2, [](A, C) { return std::make_shared<Add>(); }),
      simple_kind("Concat", "", 2, -1, [](A, C) { return std::make_shared<Concat>(); }),
  };
}

}  // namespace lowbit::nn
