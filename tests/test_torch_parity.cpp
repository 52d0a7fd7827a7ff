// Float training parity with PyTorch: the same initial weights and batches, N Adam steps in both frameworks.
//
// tests/torch_parity.py builds the peer's model in PyTorch, saves its initial weights as a lowbit checkpoint and
// the batches, and trains N steps with the peer's recipe twice: in float32 (what the peer runs) and in float64 (the
// exact arithmetic both float32 runs approximate). It records the first step's logits and gradients, the weights
// after the first update, the loss of every step and the weights after the last one. Here the same weights go into
// our model (nn::build_model + nn::load_weights) and the same steps run through our autograd and optim::Adam.
//
// Two float32 programs that compute the same thing differ only by rounding, so ours is held to the float64 run,
// one step at a time: every step starts from the float64 run's state at that step (parameters, BatchNorm buffers and
// Adam's moments, rounded to float32), in ours and in PyTorch's float32 run alike, so rounding cannot compound. A
// 20-step trajectory would not do: with BatchNorm, a last-bit difference in one product (for example an OpenBLAS core
// that uses FMA against one that does not) grows into relative loss differences of 1e-4 by step 20, which says more
// about the BLAS core than about the code (docs/design.md, "Float parity with PyTorch"). Held to the float64 run:
// the first step's forward pass and gradients and every step's loss, in relative terms; the weights after every step
// in absolute terms: Adam's first updates are lr * g / (|g| + eps), so a gradient that is zero up to rounding moves
// its weight by a random fraction of lr in either framework: nearly every weight must agree to lr / 100, and none
// may be off by lr / 2 (a wrong update rule, bias correction or eps moves most weights by about lr). PyTorch's own
// float32 run is measured against the same reference and printed beside ours. The initial weights are checked too:
// PyTorch's draw and ours (seed 0) must both look like PyTorch's default initialisation. Skipped (with a message)
// when no python3 with torch is present.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "core/normalize.h"
#include "core/ops.h"
#include "core/safetensors.h"
#include "data_fixtures.h"
#include "nn/checkpoint.h"
#include "nn/layers.h"
#include "nn/graph.h"
#include "optim/optimizer.h"

using namespace lowbit;
using lowbit::data_fixtures::TempDir;

namespace {

constexpr int kSteps = 20;
constexpr int kBatch = 64;
constexpr float kLr = 1e-3f;  // the peer's Adam learning rate (and PyTorch's default)
// max |float32 - float64| over a tensor, relative to its max |float64|:
constexpr double kForwardTolerance = 1e-4;  // first-step logits and gradients
constexpr double kLossTolerance = 1e-5;     // the loss of every step
// |float32 - float64| of a weight, after Adam updates:
constexpr double kWeightNoise = kLr / 100;     // nearly every weight agrees this well...
constexpr double kWeightNoiseFraction = 1e-4;  // ...all but this fraction of a tensor's weights...
constexpr double kWeightMaxDiff = kLr / 2;     // ...and none is further off than this
constexpr double kInitSigmas = 4;              // initial weights: mean |value| vs its expectation, in standard errors
const char* const kFashionMnist = "/usr/share/datasets/fashion-mnist";
const Normalization kPeerNormalization{0.2860f, 0.3530f};

// "/usr/bin/python3" or "python3", whichever imports torch; empty when neither does. Looked up once.
const std::string& python_with_torch() {
  static const std::string python = [] {
    for (std::string candidate : {"/usr/bin/python3", "python3"})
      if (std::system((candidate + " -c 'import torch' > /dev/null 2>&1").c_str()) == 0) return candidate;
    return std::string();
  }();
  return python;
}

// How far a float32 tensor is from the float64 one.
struct Deviation {
  double max_diff = 0, max_exact = 0;
  int64_t over_noise = 0;  // values off by more than kWeightNoise
  double relative() const { return max_exact > 0 ? max_diff / max_exact : max_diff; }
};

Deviation deviation(std::span<const float> a, std::span<const double> exact) {
  REQUIRE(a.size() == exact.size());
  Deviation d;
  for (size_t i = 0; i < a.size(); ++i) {
    const double diff = std::abs(a[i] - exact[i]);
    d.max_diff = std::max(d.max_diff, diff);
    d.max_exact = std::max(d.max_exact, std::abs(exact[i]));
    d.over_noise += diff > kWeightNoise;
  }
  return d;
}

// The first few values of ours off by more than `limit` from exact, for failure messages.
std::string first_mismatches(std::span<const float> ours, std::span<const double> exact, double limit) {
  std::string out;
  for (size_t i = 0, shown = 0; i < ours.size() && shown < 5; ++i)
    if (std::abs(ours[i] - exact[i]) > limit) out += fmt::format(" [{}] {} vs {};", i, ours[i], exact[i]), ++shown;
  return out;
}

// The outcome for one model: the worst deviations of ours and of PyTorch's float32 run, for the summary line.
struct Worst {
  double ours = 0, torch = 0;
  void add(double o, double t) { ours = std::max(ours, o), torch = std::max(torch, t); }
};

// A forward output, gradient or loss: relative to the tensor's largest value.
void check_close(const std::string& what, std::span<const float> ours, std::span<const float> torch,
                 std::span<const double> exact, double tolerance, Worst& worst) {
  const Deviation o = deviation(ours, exact), t = deviation(torch, exact);
  worst.add(o.relative(), t.relative());
  CHECK_MESSAGE(o.relative() <= tolerance, what, ": max |ours - float64| = ", o.max_diff,
                " for max |float64| = ", o.max_exact, " (relative ", o.relative(), " > ", tolerance,
                "; PyTorch float32: ", t.relative(),
                "); first values (ours vs float64):", first_mismatches(ours, exact, tolerance * o.max_exact));
}

// Weights after Adam updates: absolute, in fractions of lr.
void check_weights(const std::string& what, std::span<const float> ours, std::span<const float> torch,
                   std::span<const double> exact, Worst& worst) {
  const Deviation o = deviation(ours, exact), t = deviation(torch, exact);
  worst.add(o.max_diff, t.max_diff);
  const auto allowed = static_cast<int64_t>(kWeightNoiseFraction * static_cast<double>(ours.size()));
  CHECK_MESSAGE((o.over_noise <= allowed && o.max_diff <= kWeightMaxDiff), what, ": ", o.over_noise, " of ",
                ours.size(), " weights differ from float64 by more than ", kWeightNoise, " (allowed ", allowed,
                "; PyTorch float32: ", t.over_noise, "), the largest by ", o.max_diff, " (allowed ", kWeightMaxDiff,
                "); first values (ours vs float64):", first_mismatches(ours, exact, kWeightNoise));
}

template <typename T>
std::vector<T> values_of(const StFile& file, const std::string& name, DType dtype) {
  return st_values<T>(file.get(name, "torch_parity.py output"), dtype, name);
}
std::vector<float> f32(const StFile& file, const std::string& name) { return values_of<float>(file, name, DType::F32); }
std::vector<double> f64(const StFile& file, const std::string& name) {
  return values_of<double>(file, name, DType::F64);
}

// PyTorch's default initialisation of Linear and Conv2d (kaiming_uniform_ with a = sqrt(5), and its bias rule) is
// U(-b, b) with b = 1 / sqrt(fan_in), for weights and biases alike. `t` must lie in [-b, b], and the mean of |t|
// (b / 2 for that distribution, standard deviation b / sqrt(12)) must be within kInitSigmas standard errors of b / 2.
void check_uniform_init(const std::string& what, const Tensor& t, int64_t fan_in) {
  const double b = 1.0 / std::sqrt(static_cast<double>(fan_in));
  double max_abs = 0, sum_abs = 0;
  for (float v : t.values()) max_abs = std::max(max_abs, std::abs(static_cast<double>(v))), sum_abs += std::abs(v);
  const double n = static_cast<double>(t.numel()), mean_abs = sum_abs / n;
  const double standard_error = b / std::sqrt(12.0 * n);
  CHECK_MESSAGE(max_abs <= b * (1 + 1e-6), what, ": max |value| ", max_abs, " is outside U(-b, b), b = ", b);
  CHECK_MESSAGE(std::abs(mean_abs - b / 2) <= kInitSigmas * standard_error, what, ": mean |value| ", mean_abs,
                " for U(-b, b) with b = ", b, " should be ", b / 2, " +- ", kInitSigmas * standard_error);
}

// Every layer of `model` starts as PyTorch's defaults say; `who` names the initialiser in messages.
void check_initialisation(const std::string& who, const nn::Model& model) {
  for (size_t i = 0; i < model.layers->size(); ++i) {
    const auto layer = model.layers->at(i);
    const std::string name = fmt::format("{}: layers.{}", who, i);
    if (const auto linear = std::dynamic_pointer_cast<nn::Linear>(layer)) {
      check_uniform_init(name + ".weight", linear->weight, linear->in_features);
      check_uniform_init(name + ".bias", linear->bias, linear->in_features);
    } else if (const auto conv = std::dynamic_pointer_cast<nn::Conv2d>(layer)) {
      const int64_t fan_in = conv->in_channels * conv->kernel * conv->kernel;
      check_uniform_init(name + ".weight", conv->weight, fan_in);
      if (conv->bias.defined()) check_uniform_init(name + ".bias", conv->bias, fan_in);
    } else if (const auto bn = std::dynamic_pointer_cast<nn::BatchNorm2d>(layer)) {
      for (int64_t c = 0; c < bn->channels; ++c) {
        CHECK(bn->weight.data()[c] == 1.f);
        CHECK(bn->bias.data()[c] == 0.f);
        CHECK(bn->running_mean.data()[c] == 0.f);
        CHECK(bn->running_var.data()[c] == 1.f);
      }
    }
  }
}

// Copies float64 values into a float32 tensor of the same size (rounding to nearest).
void assign(Tensor& t, const std::vector<double>& values) {
  REQUIRE(values.size() == static_cast<size_t>(t.numel()));
  std::transform(values.begin(), values.end(), t.data(), [](double v) { return static_cast<float>(v); });
}

// Puts `model` and `adam` into the float64 run's state at the start of `step` (exact.safetensors).
void start_from(nn::Module& model, optim::Adam& adam, const StFile& exact, int step) {
  for (const nn::NamedTensors& group : {model.named_parameters(), model.named_buffers()})
    for (auto [name, t] : group) assign(t, f64(exact, fmt::format("state.{}.{}", step, name)));
  optim::StateTensors moments;
  if (step > 0) {
    const nn::NamedTensors params = model.named_parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& [name, p] = params[i];
      moments.emplace_back(fmt::format("optim.{}.step", i), Tensor::scalar(static_cast<float>(step)));
      for (const char* moment : {"exp_avg", "exp_avg_sq"}) {
        Tensor t = Tensor::zeros(p.shape());
        assign(t, f64(exact, fmt::format("{}.{}.{}", moment, step, name)));
        moments.emplace_back(fmt::format("optim.{}.{}", i, moment), t);
      }
    }
  }
  adam.load_state(moments, step);
}

// Runs tests/torch_parity.py for `model_name`, then the same steps here, and compares them.
void check_parity(const std::string& model_name, const std::string& data_dir) {
  const std::string& python = python_with_torch();
  if (python.empty()) {
    MESSAGE("skipped: no python3 with torch");
    return;
  }
  TempDir dir("torch_parity_" + model_name);
  const std::string command = fmt::format("{} {}/tests/torch_parity.py {} {} --steps {} --batch-size {}{} > {} 2>&1",
                                          python, LOWBIT_SOURCE_DIR, model_name, dir.str(), kSteps, kBatch,
                                          data_dir.empty() ? "" : " --data " + data_dir, dir / "log.txt");
  INFO("command: ", command);
  REQUIRE(std::system(command.c_str()) == 0);
  const StFile batches = load_safetensors(dir / "batches.safetensors");
  const StFile torch = load_safetensors(dir / "torch.safetensors");
  const StFile exact = load_safetensors(dir / "exact.safetensors");

  // The inputs: PyTorch's normalisation of the pixels is ours, bit for bit.
  const std::vector<float> images = f32(batches, "images");
  const std::vector<uint8_t> pixels = values_of<uint8_t>(batches, "pixels", DType::U8);
  const std::vector<int32_t> labels = values_of<int32_t>(batches, "labels", DType::I32);
  REQUIRE(images.size() == pixels.size());
  REQUIRE(labels.size() == static_cast<size_t>(kSteps * kBatch));
  int64_t normalised_differently = 0;
  for (size_t i = 0; i < pixels.size(); ++i)
    normalised_differently += normalize_pixel(pixels[i], kPeerNormalization) != images[i];
  CHECK(normalised_differently == 0);

  // The same initialisation scheme: PyTorch's draw and ours (seed 0) from the same distributions.
  auto model = nn::build_model(model_name);
  nn::load_weights(*model, nn::read_checkpoint(dir / "init.safetensors"));
  check_initialisation("PyTorch's init", *model);
  manual_seed(0);
  check_initialisation("our init", *nn::build_model(model_name));

  // Every step of ours from the float64 state at its start, with the peer's recipe.
  model->train();
  optim::Adam adam(model->parameters(), {.lr = kLr});  // betas 0.9 / 0.999, eps 1e-8: PyTorch's defaults
  const int64_t image_values = 28 * 28;
  Worst forward, losses_worst, weights;
  std::vector<float> losses;
  for (int step = 0; step < kSteps; ++step) {
    start_from(*model, adam, exact, step);
    const auto first = images.begin() + static_cast<int64_t>(step) * kBatch * image_values;
    Tensor x = Tensor::from({kBatch, 1, 28, 28}, {first, first + kBatch * image_values});
    const std::span<const int32_t> y(labels.data() + static_cast<size_t>(step * kBatch), kBatch);
    adam.zero_grad();
    Tensor logits = model->forward(x);
    Tensor loss = ops::cross_entropy(logits, y);
    loss.backward();
    if (step == 0) {
      check_close("logits of step 1", logits.values(), f32(torch, "logits"), f64(exact, "logits"), kForwardTolerance,
                  forward);
      for (const auto& [name, p] : model->named_parameters())
        check_close("gradient of " + name + " at step 1", p.grad().values(), f32(torch, "grad." + name),
                    f64(exact, "grad." + name), kForwardTolerance, forward);
    }
    adam.step();
    losses.push_back(loss.item());
    for (const nn::NamedTensors& group : {model->named_parameters(), model->named_buffers()})
      for (const auto& [name, t] : group)
        check_weights(fmt::format("{} after step {}", name, step + 1), t.values(),
                      f32(torch, fmt::format("after.{}.{}", step, name)),
                      f64(exact, fmt::format("state.{}.{}", step + 1, name)), weights);
  }
  check_close("loss per step", losses, f32(torch, "loss"), f64(exact, "loss"), kLossTolerance, losses_worst);

  std::string loss_table;
  for (int step = 0; step < std::min(kSteps, 5); ++step)
    loss_table +=
        fmt::format(" {:.7f}/{:.7f}", losses[static_cast<size_t>(step)], f32(torch, "loss")[static_cast<size_t>(step)]);
  MESSAGE(
      fmt::format("{} ({}): loss of steps 1-5 ours/torch{}; deviation from float64, ours vs PyTorch float32: "
                  "logits and gradients {:.1e} vs {:.1e} (relative), losses {:.1e} vs {:.1e} (relative), "
                  "weights {:.1e} vs {:.1e} (absolute, lr {})",
                  model_name, data_dir.empty() ? "synthetic data" : "Fashion-MNIST", loss_table, forward.ours,
                  forward.torch, losses_worst.ours, losses_worst.torch, weights.ours, weights.torch, kLr));
}

}  // namespace

// The three models on synthetic MNIST-like batches, then lenet5 on real ones when Debian's Fashion-MNIST is there.
TEST_CASE("mlp trains like PyTorch, step by step, from the same weights on the same batches") {
  check_parity("mlp", "");
}

TEST_CASE("lenet5 trains like PyTorch, step by step, from the same weights on the same batches") {
  check_parity("lenet5", "");
}

TEST_CASE("convbn trains like PyTorch, step by step, from the same weights on the same batches") {
  check_parity("convbn", "");
}

TEST_CASE("lenet5 trains like PyTorch on real Fashion-MNIST batches") {
  if (!std::filesystem::exists(std::string(kFashionMnist) + "/train-images-idx3-ubyte.gz")) {
    MESSAGE("skipped: Debian's dataset-fashion-mnist is not installed");
    return;
  }
  check_parity("lenet5", kFashionMnist);
}
