// A network of one's own, from training to the integer graph: a small residual net with a depthwise
// convolution, described in C++, trained on Fashion-MNIST, quantization-aware trained (QAT), converted to
// the integer graph, saved, loaded back and run by the integer executor, with its agreement with the
// fake-quant model it came from. The same recipe as `train --qat` then `eval --int8`, in one program.
// Usage: residual_qat [max_batches] [data_dir] [out.int8.safetensors]
//   max_batches: training batches of 64 images per phase (float, then QAT); 0 = whole epochs (default 300)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <span>
#include <string>

#include "core/ops.h"
#include "core/threads.h"
#include "data/loader.h"
#include "data/mnist.h"
#include "nn/graph.h"
#include "optim/optimizer.h"
#include "quant/calibrate.h"
#include "quant/convert.h"
#include "quant/int_model.h"
#include "quant/runtime/executor.h"

using namespace lowbit;

namespace {

constexpr int64_t kTestImages = 1000;  // the first test images: enough to see the agreement, quick to run
constexpr int64_t kCalibBatches = 4;   // calibration before QAT: 4 batches of 250 images

// The network, node by node, as a description (what a models/*.json file holds, docs/model-description.md,
// built in code). Every node names its inputs: here the node before it ("input" for the first), unless
// given; the Add names both of its.
nn::Description residual_net(const data::MnistData& mnist) {
  nn::Description d;
  d.name = "tiny-residual";
  d.channels = mnist.train.images.channels;
  d.height = mnist.train.images.rows;
  d.width = mnist.train.images.cols;
  d.classes = mnist.classes;
  auto node = [&](std::string name, std::string kind, nlohmann::json attributes, std::vector<std::string> inputs = {}) {
    if (inputs.empty()) inputs = {d.nodes.empty() ? std::string("input") : d.nodes.back().name};
    d.nodes.push_back({std::move(name), std::move(kind), std::move(inputs), std::move(attributes)});
  };
  using J = nlohmann::json;
  node("stem", "Conv2d", J{{"out_channels", 16}, {"kernel", 3}, {"padding", 1}, {"stride", 2}, {"bias", false}});
  node("stem_bn", "BatchNorm2d", J::object());
  node("stem_relu", "ReLU", J::object());
  // The residual branch: depthwise 3x3 (one filter per channel: groups = channels), then pointwise 1x1.
  node("dw", "Conv2d", J{{"out_channels", 16}, {"kernel", 3}, {"padding", 1}, {"groups", 16}, {"bias", false}});
  node("dw_bn", "BatchNorm2d", J::object());
  node("dw_relu", "ReLU", J::object());
  node("pw", "Conv2d", J{{"out_channels", 16}, {"kernel", 1}, {"bias", false}});
  node("pw_bn", "BatchNorm2d", J::object());
  node("add", "Add", J::object(), {"pw_bn", "stem_relu"});  // the skip connection
  node("add_relu", "ReLU", J::object());
  node("pool", "GlobalAvgPool2d", J::object());
  node("flatten", "Flatten", J::object());
  node("fc", "Linear", J{{"out_features", "classes"}});
  d.output = "fc";  // the logits
  return d;
}

// Index of the largest of n values.
template <typename T>
int32_t argmax(const T* v, int64_t n) {
  return static_cast<int32_t>(std::max_element(v, v + n) - v);
}

// Trains `model` (float or QAT) on up to max_batches batches; `each_step(step)` runs before each one.
template <typename Step>
double train(nn::Module& model, data::DataLoader& loader, int64_t max_batches, float lr, Step each_step) {
  optim::Adam adam(model.parameters(), {.lr = lr});
  model.train();
  loader.start_epoch(0);
  data::Batch batch;
  double loss_sum = 0;
  int64_t steps = 0;
  while ((max_batches == 0 || steps < max_batches) && loader.next(batch)) {
    each_step(steps);
    Tensor loss = ops::cross_entropy(model.forward(batch.images), batch.labels);
    adam.zero_grad();
    loss.backward();
    adam.step();
    loss_sum += loss.item();
    ++steps;
  }
  return loss_sum / static_cast<double>(std::max<int64_t>(1, steps));
}

}  // namespace

int main(int argc, char** argv) try {
  shorten_openmp_waits(argv);  // first: OpenMP threads that do not spin for long on a busy machine (core/threads.h)
  const int64_t max_batches = argc > 1 ? std::atoll(argv[1]) : 300;
  const data::MnistData mnist = data::load_mnist(argc > 2 ? argv[2] : data::kDefaultDataDir);
  const std::string out = argc > 3 ? argv[3] : "tiny-residual.int8.safetensors";
  const Normalization norm = data::kFashionMnistNormalization;
  const data::Dataset test = data::first_images(mnist.test, kTestImages);

  // 1. The float model: built from the description, trained.
  manual_seed(0);
  auto model = nn::build_model(residual_net(mnist));
  std::printf("%s", nn::format_summary(nn::summarize(*model)).c_str());
  data::DataLoader train_loader(mnist.train, {}, {.batch_size = 64, .seed = 0, .norm = norm});
  const double loss = train(*model, train_loader, max_batches, 1e-2f, [](int64_t) {});

  // 2. Prepare for QAT: Conv2d + BatchNorm2d + ReLU, the Add + ReLU fused; fake-quant on every weight and
  //    on every activation the integer graph will hold (both inputs of the Add and its output too).
  auto qat = quant::prepare_qat(*model, quant::QConfig{});  // w8a8; QConfig has the other bit widths
  // Calibrate the activation ranges on a few float batches first, so that QAT starts from sensible ones.
  data::DataLoader calib_loader(mnist.train, {}, {.batch_size = 250, .shuffle = false, .norm = norm});
  calib_loader.start_epoch(0);
  data::Batch calib_batch;
  const int64_t calibrated = quant::calibrate(
      *qat, [&](Tensor& x) { return calib_loader.next(calib_batch) && (x = calib_batch.images, true); }, kCalibBatches);

  // 3. QAT: fine-tune through the fake quantizers; freeze the BatchNorm statistics half way and the
  //    observers (the activation ranges) at three quarters, as `train --qat` does.
  const int64_t qat_batches = max_batches == 0 ? train_loader.batches_per_epoch() : max_batches;
  const double qat_loss = train(*qat, train_loader, qat_batches, 1e-3f, [&](int64_t step) {
    if (step >= qat_batches / 2) qat->freeze_bn_stats();
    qat->set_observing(step < 3 * qat_batches / 4);
  });
  qat->set_observing(false);
  qat->eval();

  // 4. Convert: the integer graph (int8 weights and activations, int32 accumulators, fixed-point
  //    requantization; the Add rescales both inputs to the output's scale, docs/quantization.md eq. 10).
  //    Save it, and load it back as a deployment would.
  quant::save_int_model(
      out, quant::convert(*qat, norm, {mnist.train.images.channels, mnist.train.images.rows, mnist.train.images.cols}));
  const quant::IntModel int_model = quant::load_int_model(out);
  quant::runtime::Executor executor(int_model.graph, 1);

  // 5. Run float, fake-quant and integer models on the same test images; the integer logits are codes,
  //    the fake-quant ones are turned into codes with the output's scale and zero point to compare them.
  const float out_scale = int_model.output_scale;
  const int32_t out_zero = int_model.graph.ops.back().requant.zero_point;
  const int64_t classes = executor.num_classes();
  data::DataLoader test_loader(test, {}, {.batch_size = 250, .shuffle = false, .norm = norm});
  test_loader.start_epoch(0);
  data::Batch batch;
  int64_t seen = 0, float_correct = 0, fq_correct = 0, int_correct = 0, agree = 0, max_lsb = 0;
  NoGradGuard no_grad;
  model->eval();
  while (test_loader.next(batch)) {
    const Tensor float_logits = model->forward(batch.images);  // (N, classes)
    const Tensor fq_logits = qat->forward(batch.images);
    const std::span<const int8_t> codes = executor.run(batch.raw, batch.size());
    for (int64_t i = 0; i < batch.size(); ++i) {
      const int32_t label = batch.labels[static_cast<size_t>(i)];
      const int32_t fq = argmax(fq_logits.data() + i * classes, classes);
      const int32_t integer = argmax(codes.data() + i * classes, classes);
      float_correct += argmax(float_logits.data() + i * classes, classes) == label;
      fq_correct += fq == label;
      int_correct += integer == label;
      agree += fq == integer;
      for (int64_t c = 0; c < classes; ++c) {
        const int64_t fq_code =
            static_cast<int64_t>(std::lround(fq_logits.data()[i * classes + c] / out_scale)) + out_zero;
        max_lsb = std::max<int64_t>(max_lsb, std::abs(fq_code - codes[static_cast<size_t>(i * classes + c)]));
      }
    }
    seen += batch.size();
  }
  auto pct = [&](int64_t n) { return 100.0 * static_cast<double>(n) / static_cast<double>(seen); };
  std::printf("float: train loss %.4f; QAT (calibrated on %lld images first): train loss %.4f\n", loss,
              static_cast<long long>(calibrated), qat_loss);
  std::printf("accuracy on %lld test images: float (before QAT) %.2f%%, fake-quant %.2f%%, integer %.2f%%\n",
              static_cast<long long>(seen), pct(float_correct), pct(fq_correct), pct(int_correct));
  std::printf("fake-quant vs integer: %.2f%% of predictions agree, max logit difference %lld LSB\n", pct(agree),
              static_cast<long long>(max_lsb));
  std::printf("wrote %s (%lld bytes)\n", out.c_str(), static_cast<long long>(quant::int_model_file_bytes(out)));
  // The promise of lowbit: the integer graph computes what the fake-quant model computes (docs/quantization.md
  // explains the at most 1 LSB a rounding tie may cost).
  return 1000 * agree >= 999 * seen && max_lsb <= 1 ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "residual_qat: error: %s\n", e.what());
  return 1;
}
