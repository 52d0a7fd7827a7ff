// quantize: post-training quantization of a float checkpoint — calibrate the activation ranges on
// training images, convert to the integer graph, save it, and compare float, fake-quant and integer.
#include <iostream>
#include <nlohmann/json.hpp>

#include "apps/common.h"
#include "core/error.h"
#include "core/threads.h"
#include "quant/analysis.h"
#include "quant/convert.h"

using namespace lowbit;

namespace {

struct Settings {
  std::string model, data = data::kDefaultDataDir, observer = "minmax", bits = "w8a8", out;
  int64_t calib = 1000, mixed = 0, sensitivity_images = 2000;
  int threads = 0, low_bits = 4;
  bool json = false, sensitivity = false;
};

void run(Settings s) {
  if (s.threads > 0) set_num_threads(s.threads);
  quant::QConfig config = quant::parse_bits(s.bits);
  config.activation_observer = quant::parse_observer_kind(s.observer);
  if (s.out.empty()) s.out = apps::sibling_path(s.model, config.mode_name());
  apps::check_output_path(s.out);

  apps::LoadedModel m = apps::load_model_file(s.model);
  if (m.kind == "qat")
    fail(
        "{}: this is a QAT checkpoint; quantize takes a float checkpoint (convert a QAT checkpoint with "
        "'eval --int8' or 'train --qat')",
        s.model);
  if (m.kind == "int")
    fail("{}: this is already an integer model ({}); quantize takes a float checkpoint", s.model, m.int_model->mode);
  const data::MnistData data = data::load_mnist(s.data);

  if (s.sensitivity || s.mixed > 0) {
    // Per-layer sensitivity: each block's weights alone at --low-bits, accuracy on the first test images.
    const data::Dataset subset = data::first_images(data.test, s.sensitivity_images);
    const quant::SensitivityReport report = quant::layer_sensitivity(
        *m.float_model, config, s.low_bits,
        [&](quant::QatModel& q) { apps::calibrate(q, data.train, m.norm, s.calib); },
        [&](quant::QatModel& q) { return apps::evaluate_model(q, subset, m.norm, 256).accuracy(); });
    std::cout << fmt::format("sensitivity ({}-bit weights in one layer at a time, {} test images; baseline {:.2f}%):\n",
                             s.low_bits, subset.size(), 100 * report.baseline_accuracy);
    std::cout << fmt::format("  {:<10} {:>9} {:>10} {:>8} {:>12}\n", "layer", "weights", "accuracy", "drop",
                             "bytes saved");
    for (const auto& b : report.blocks)
      std::cout << fmt::format(
          "  {:<10} {:>9} {:>9.2f}% {:>7.2f} {:>12}\n", b.block.layer, b.block.weights, 100 * b.accuracy, 100 * b.drop,
          quant::block_bytes(b.block, config.weight_bits) - quant::block_bytes(b.block, s.low_bits));
    if (s.mixed > 0) {
      config = quant::choose_mixed_precision(*m.float_model, config, report, s.mixed, s.low_bits);
      std::cout << fmt::format("mixed precision for a budget of {} bytes: parameters {} bytes; weight bits per layer:",
                               s.mixed, quant::model_parameter_bytes(*m.float_model, config));
      for (const auto& b : quant::quantized_blocks(*m.float_model)) {
        auto it = config.block_weight_bits.find(b.block);
        std::cout << fmt::format(" {}:{}", b.layer,
                                 it == config.block_weight_bits.end() ? config.weight_bits : it->second);
      }
      std::cout << "\n";
      if (s.out == apps::sibling_path(s.model, quant::parse_bits(s.bits).mode_name()))
        s.out = apps::sibling_path(s.model, "mixed");
    } else {
      return;
    }
  }

  auto qat = quant::prepare_qat(*m.float_model, config);
  apps::calibrate(*qat, data.train, m.norm, s.calib);
  qat->eval();
  const quant::IntModel int_model =
      quant::convert(*qat, m.norm, {data.test.images.channels, data.test.images.rows, data.test.images.cols});

  const int threads = std::max(1, num_threads());
  const apps::EvalResult fp = apps::evaluate_model(*m.float_model, data.test, m.norm, 256);
  const apps::EvalResult fq = apps::evaluate_model(*qat, data.test, m.norm, 256, apps::int_output_qparams(int_model));
  const apps::EvalResult iq = apps::evaluate_int(int_model, data.test, 256, threads);
  const apps::Agreement agree = apps::agreement(fq, iq);
  quant::save_int_model(s.out, int_model);
  const int64_t float_bytes = apps::float_weight_bytes(*m.float_model);
  const int64_t int_bytes = quant::int_model_file_bytes(s.out);

  if (s.json) {
    nlohmann::json j{{"mode", int_model.mode},
                     {"observer", s.observer},
                     {"calib", std::min(s.calib, data.train.size())},
                     {"float_accuracy", fp.accuracy()},
                     {"fake_quant_accuracy", fq.accuracy()},
                     {"int_accuracy", iq.accuracy()},
                     {"agreement", agree.fraction},
                     {"max_logit_diff_lsb", agree.max_logit_diff_lsb},
                     {"float_model_bytes", float_bytes},
                     {"model_bytes", int_bytes},
                     {"out", s.out}};
    std::cout << j.dump() << "\n";
    return;
  }
  std::cout << fmt::format("calibrated on {} training images ({} observer)\n", std::min(s.calib, data.train.size()),
                           s.observer);
  std::cout << fmt::format("float accuracy      {:.2f}%\n", 100 * fp.accuracy());
  std::cout << fmt::format("fake-quant accuracy {:.2f}%\n", 100 * fq.accuracy());
  std::cout << fmt::format("{:<19} {:.2f}%\n", int_model.mode + " accuracy", 100 * iq.accuracy());
  std::cout << fmt::format("agreement fake-quant vs integer: {:.4f}% of predictions, max logit difference {} LSB\n",
                           100 * agree.fraction, agree.max_logit_diff_lsb);
  std::cout << fmt::format("model size: {} bytes float32 weights, {} bytes integer model ({:.2f}x smaller)\n",
                           float_bytes, int_bytes, static_cast<double>(float_bytes) / static_cast<double>(int_bytes));
  std::cout << fmt::format("wrote {}\n", s.out);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"quantize: post-training quantization of a float checkpoint to the integer graph", "quantize"};
  Settings s;
  app.add_option("--model", s.model, "float checkpoint (written by train without --qat)")->required();
  app.add_option("--data", s.data, "folder with the MNIST-style IDX files")->capture_default_str();
  app.add_option("--calib", s.calib, "training images to calibrate on")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30))
      ->capture_default_str();
  app.add_option("--observer", s.observer, "activation observer")
      ->check(CLI::IsMember({"minmax", "ema", "percentile", "mse"}))
      ->capture_default_str();
  app.add_option("--bits", s.bits, "w8a8, w4a8, w4a4 (any wNaM, N, M in 2..8)")->capture_default_str();
  app.add_option("--out", s.out, "integer model to write (default: MODEL.MODE.safetensors next to the model)");
  app.add_option("--threads", s.threads, "threads (0: all cores)")->check(CLI::Range(0, 256));
  app.add_flag("--json", s.json, "print one JSON object on stdout");
  app.add_flag("--sensitivity", s.sensitivity,
               "report each layer's accuracy drop when only its weights go to --low-bits");
  app.add_option("--mixed", s.mixed, "choose per-layer weight bits to fit the parameters in this many bytes")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  app.add_option("--low-bits", s.low_bits, "the low weight width for --sensitivity and --mixed")
      ->check(CLI::Range(2, 4))
      ->capture_default_str();
  app.add_option("--sensitivity-images", s.sensitivity_images, "test images per sensitivity evaluation")
      ->check(CLI::Range(int64_t{1}, int64_t{10000}))
      ->capture_default_str();
  return apps::run_main(app, argc, argv, [&] { run(s); });
}
