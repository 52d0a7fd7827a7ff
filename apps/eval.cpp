// eval: measures any lowbit model file on the test set — float, fake-quant or integer — and, with
// --int8 / --int4, lowers a float (PTQ) or QAT checkpoint to the integer graph and compares the two.
#include <algorithm>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>

#include "apps/common.h"
#include "core/error.h"
#include "core/threads.h"
#include "quant/convert.h"
#include "quant/runtime/cpu.h"

using namespace lowbit;

namespace {

struct Settings {
  std::string model, data = data::kDefaultDataDir, observer = "minmax";
  int64_t batch_size = 256, calib = 1000;
  int threads = 0;
  bool json = false, int8 = false, int4 = false;
  std::string kernels;  // empty: LOWBIT_KERNELS, else the best path the CPU has
  std::string logits;   // write each image's integer logits here (an integer model only)
};

// What one run measured, ready to print.
struct Report {
  std::string mode;
  apps::EvalResult result;
  std::optional<apps::Agreement> agree;
  int64_t model_bytes = 0;
  std::optional<int64_t> float_model_bytes;
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t mid = v.size() / 2;
  return v.size() % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

// Lowers a prepared (calibrated or QAT) model, runs both, and fills the report.
void run_integer(Report& r, quant::QatModel& qat, const data::MnistData& data, const Normalization& norm,
                 const Settings& s) {
  qat.eval();
  const quant::IntModel int_model = quant::convert(qat, norm, {data.test.images.channels, data.test.images.rows, data.test.images.cols});
  const apps::EvalResult fq =
      apps::evaluate_model(qat, data.test, norm, s.batch_size, apps::int_output_qparams(int_model));
  r.result = apps::evaluate_int(int_model, data.test, s.batch_size, std::max(1, num_threads()));
  r.agree = apps::agreement(fq, r.result);
  r.mode = int_model.mode;
  r.model_bytes = apps::int_model_bytes(int_model);
}

// --int8 wants 8-bit weights, --int4 4-bit weights; a QAT checkpoint was trained for one of them.
void check_bits(const quant::QConfig& config, const Settings& s, const std::string& path) {
  const int wanted = s.int8 ? 8 : 4;
  if (config.weight_bits != wanted)
    fail(
        "{}: this QAT checkpoint was trained with {}-bit weights ({}), but --int{} asks for {}-bit weights "
        "(use --int{} or retrain with --bits {})",
        path, config.weight_bits, config.mode_name(), wanted, wanted, config.weight_bits == 8 ? 8 : 4,
        wanted == 8 ? "w8a8" : "w4a8");
}

// One line per test image, "image I: L0 L1 ... class C" (the integer logit codes and the first maximum): the
// format tools/cortex-m/main.c prints, so that a microcontroller's output can be diffed against it.
void write_logits(const apps::EvalResult& result, int64_t classes, const std::string& path) {
  std::string text;
  for (int64_t i = 0; i < result.samples; ++i) {
    text += fmt::format("image {}:", i);
    for (int64_t c = 0; c < classes; ++c)
      text += fmt::format(" {}", result.logit_codes[static_cast<size_t>(i * classes + c)]);
    text += fmt::format(" class {}\n", result.predictions[static_cast<size_t>(i)]);
  }
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.flush();
  if (!out) fail("{}: cannot write the logits file (check that the folder exists and is writable)", path);
}

Report evaluate(const Settings& s) {
  apps::LoadedModel m = apps::load_model_file(s.model);
  const bool lower = s.int8 || s.int4;
  if (m.kind == "int") {
    const std::string& mode = m.int_model->mode;
    if ((s.int8 && mode != "int8") || (s.int4 && !mode.starts_with("w4")))
      fail("{}: this is an integer model in mode '{}', it cannot be evaluated as --int{} (drop the flag)", s.model,
           mode, s.int8 ? 8 : 4);
  }
  if (!s.logits.empty() && m.kind != "int")
    fail("{}: --logits writes the logits of an integer model; this is a {} model (convert it with quantize first)",
         s.model, m.kind);
  if (m.kind == "qat" && lower) check_bits(m.qat_model->config, s, s.model);
  const data::MnistData data = data::load_mnist(s.data);

  Report r;
  if (m.kind == "int") {
    r.mode = m.int_model->mode;
    r.result = apps::evaluate_int(*m.int_model, data.test, s.batch_size, std::max(1, num_threads()));
    r.model_bytes = m.file_bytes;
    if (!s.logits.empty()) write_logits(r.result, m.int_model->num_classes(), s.logits);
    return r;
  }
  const auto float_model = m.float_model ? m.float_model : nn::build_model(apps::checkpoint_description(m.checkpoint));
  r.float_model_bytes = apps::float_weight_bytes(*float_model);
  if (m.kind == "float" && !lower) {
    r.mode = "fp32";
    r.result = apps::evaluate_model(*m.float_model, data.test, m.norm, s.batch_size);
    r.model_bytes = *r.float_model_bytes;
  } else if (m.kind == "qat" && !lower) {
    r.mode = "fake-quant";
    r.result = apps::evaluate_model(*m.qat_model, data.test, m.norm, s.batch_size);
    r.model_bytes = *r.float_model_bytes;
  } else if (m.kind == "qat") {
    run_integer(r, *m.qat_model, data, m.norm, s);
  } else {
    quant::QConfig config = quant::parse_bits(s.int8 ? "w8a8" : "w4a8");
    config.activation_observer = quant::parse_observer_kind(s.observer);
    auto qat = quant::prepare_qat(*m.float_model, config);
    apps::calibrate(*qat, data.train, m.norm, s.calib);
    run_integer(r, *qat, data, m.norm, s);
  }
  return r;
}

void print(const Report& r, const Settings& s) {
  const double ips = static_cast<double>(r.result.samples) / std::max(r.result.seconds, 1e-12);
  const bool per_image = s.batch_size == 1;
  if (s.json) {
    nlohmann::json j;
    j["accuracy"] = r.result.accuracy();
    j["correct"] = r.result.correct;
    j["samples"] = r.result.samples;
    j["mode"] = r.mode;
    std::vector<double> per_class;
    for (size_t c = 0; c < r.result.class_total.size(); ++c)
      per_class.push_back(r.result.class_total[c] ? static_cast<double>(r.result.class_correct[c]) /
                                                        static_cast<double>(r.result.class_total[c])
                                                  : 0.0);
    j["per_class"] = per_class;
    j["confusion"] = r.result.confusion;
    j["images_per_second"] = ips;
    j["latency_us_median"] = per_image ? nlohmann::json(median(r.result.latencies_us)) : nlohmann::json(nullptr);
    j["agreement"] = r.agree ? nlohmann::json(r.agree->fraction) : nlohmann::json(nullptr);
    j["max_logit_diff_lsb"] = r.agree ? nlohmann::json(r.agree->max_logit_diff_lsb) : nlohmann::json(nullptr);
    j["model_bytes"] = r.model_bytes;
    j["float_model_bytes"] = r.float_model_bytes ? nlohmann::json(*r.float_model_bytes) : nlohmann::json(nullptr);
    j["threads"] = num_threads();
    j["batch_size"] = s.batch_size;
    j["kernel_path"] = quant::runtime::kernel_path_name(quant::runtime::kernel_path());  // the integer kernels
    j["openmp_waits"] = openmp_wait_description();
    std::cout << j.dump() << "\n";
    return;
  }
  std::cout << apps::format_report(r.result, r.mode);
  if (r.float_model_bytes && r.mode != "fp32" && r.mode != "fake-quant")
    std::cout << fmt::format("model size: {} bytes float32 weights, {} bytes integer model ({:.2f}x smaller)\n",
                             *r.float_model_bytes, r.model_bytes,
                             static_cast<double>(*r.float_model_bytes) / static_cast<double>(r.model_bytes));
  else
    std::cout << fmt::format("model size: {} bytes\n", r.model_bytes);
  std::cout << fmt::format("throughput: {:.0f} images/s ({} threads, batch size {})\n", ips, num_threads(),
                           s.batch_size);
  if (per_image) std::cout << fmt::format("latency: {:.1f} us per image (median)\n", median(r.result.latencies_us));
  if (r.mode != "fp32" && r.mode != "fake-quant")
    std::cout << fmt::format("integer kernels: {} (CPU has: {})\n",
                             quant::runtime::kernel_path_name(quant::runtime::kernel_path()),
                             quant::runtime::cpu_instruction_sets());
  if (r.agree)
    std::cout << fmt::format("agreement fake-quant vs integer: {:.4f}% of predictions, max logit difference {} LSB\n",
                             100 * r.agree->fraction, r.agree->max_logit_diff_lsb);
  else
    std::cout << "agreement: n/a\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eval: accuracy, confusion matrix and speed of a float, QAT or integer model on the test set", "eval"};
  Settings s;
  app.add_option("--model", s.model, "model file: float or QAT checkpoint, or integer model")->required();
  app.add_option("--data", s.data, "folder with the MNIST-style IDX files")->capture_default_str();
  app.add_flag("--json", s.json, "print one JSON object on stdout");
  app.add_option("--threads", s.threads, "threads (0: all cores)")->check(CLI::Range(0, 256));
  app.add_option("--batch-size", s.batch_size, "images per batch (1: also measure latency)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20))
      ->capture_default_str();
  auto* int8 = app.add_flag("--int8", s.int8, "lower to the integer graph with 8-bit weights (w8a8)");
  auto* int4 = app.add_flag("--int4", s.int4, "lower to the integer graph with 4-bit weights (w4a8)");
  int8->excludes(int4);
  app.add_option("--calib", s.calib, "training images to calibrate a float checkpoint on (PTQ)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30))
      ->capture_default_str();
  app.add_option("--observer", s.observer, "activation observer for PTQ")
      ->check(CLI::IsMember({"minmax", "ema", "percentile", "mse"}))
      ->capture_default_str();
  app.add_option("--kernels", s.kernels,
                 "integer kernels: ref, avx2, avxvnni, vnni, amx or auto (default: $LOWBIT_KERNELS, else auto)");
  app.add_option("--logits", s.logits, "integer model: write every test image's logit codes and class to this file");
  return apps::run_main(app, argc, argv, [&] {
    if (s.threads > 0) set_num_threads(s.threads);
    if (!s.kernels.empty()) quant::runtime::set_kernel_path(quant::runtime::parse_kernel_path(s.kernels));
    print(evaluate(s), s);
  });
}
