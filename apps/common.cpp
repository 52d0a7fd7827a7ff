// Shared command-line plumbing: main's error handling, model files, evaluation.
#include "apps/common.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/threads.h"
#include "quant/runtime/executor.h"

namespace lowbit::apps {

int run_main(CLI::App& app, int argc, char** argv, const std::function<void()>& body) {
  shorten_openmp_waits(argv);  // before any thread starts: may restart the program (core/threads.h)
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::cerr << app.get_name() << ": error: " << e.what() << " (see --help)\n";
    return 2;
  }
  try {
    body();
    return 0;
  } catch (const Error& e) {
    std::cerr << app.get_name() << ": error: " << e.what() << "\n";
  } catch (const quant::runtime::RuntimeError& e) {
    std::cerr << app.get_name() << ": error: " << e.what() << "\n";
  } catch (const std::bad_alloc&) {
    std::cerr << app.get_name() << ": error: out of memory (use a smaller --batch-size or a smaller data set)\n";
  } catch (const std::exception& e) {
    std::cerr << app.get_name() << ": internal error: " << e.what() << " (please report this)\n";
  }
  return 1;
}

// ---------------------------------------------------------------------------------------------
// model files

std::string qconfig_to_json(const quant::QConfig& c) {
  nlohmann::json j;
  j["weight_bits"] = c.weight_bits;
  j["activation_bits"] = c.activation_bits;
  j["input_bits"] = c.input_bits;
  j["activation_observer"] = quant::to_string(c.activation_observer);
  j["learn_scale"] = c.learn_scale;
  j["block_weight_bits"] = nlohmann::json::object();
  for (auto [k, v] : c.block_weight_bits) j["block_weight_bits"][std::to_string(k)] = v;
  j["block_activation_bits"] = nlohmann::json::object();
  for (auto [k, v] : c.block_activation_bits) j["block_activation_bits"][std::to_string(k)] = v;
  return j.dump();
}

quant::QConfig qconfig_from_json(const std::string& text, const std::string& path) {
  try {
    const auto j = nlohmann::json::parse(text);
    quant::QConfig c;
    c.weight_bits = j.at("weight_bits").get<int>();
    c.activation_bits = j.at("activation_bits").get<int>();
    c.input_bits = j.at("input_bits").get<int>();
    c.activation_observer = quant::parse_observer_kind(j.at("activation_observer").get<std::string>());
    c.learn_scale = j.at("learn_scale").get<bool>();
    for (auto& [k, v] : j.at("block_weight_bits").items()) c.block_weight_bits[std::stoi(k)] = v.get<int>();
    for (auto& [k, v] : j.at("block_activation_bits").items()) c.block_activation_bits[std::stoi(k)] = v.get<int>();
    for (int bits : {c.weight_bits, c.activation_bits, c.input_bits})
      if (bits < 2 || bits > 8) fail("bit width {} out of range", bits);
    return c;
  } catch (const Error& e) {
    fail("{}: bad 'qconfig' metadata: {}", path, e.what());
  } catch (const std::exception& e) {
    fail("{}: bad 'qconfig' metadata ({}); the file is corrupt or from another tool", path, e.what());
  }
}

std::map<std::string, std::string> model_metadata(const nn::Description& description, const Normalization& norm,
                                                  const quant::QConfig* qconfig) {
  std::map<std::string, std::string> meta{{"model", description.name},
                                          {"description", nn::description_to_json(description)},
                                          {"kind", qconfig ? "qat" : "float"},
                                          {"norm_mean", fmt::format("{}", norm.mean)},
                                          {"norm_std", fmt::format("{}", norm.std)}};
  if (qconfig) meta["qconfig"] = qconfig_to_json(*qconfig);
  return meta;
}

namespace {
float parse_float(const std::string& text, const std::string& what, const std::string& path) {
  try {
    size_t used = 0;
    const float v = std::stof(text, &used);
    if (used != text.size() || !std::isfinite(v)) throw std::invalid_argument(text);
    return v;
  } catch (const std::exception&) {
    fail("{}: metadata '{}' = '{}' is not a number (the file is corrupt)", path, what, text);
  }
}

}  // namespace

Normalization checkpoint_normalization(const nn::Checkpoint& checkpoint) {
  const bool has_mean = checkpoint.has_meta("norm_mean"), has_std = checkpoint.has_meta("norm_std");
  if (has_mean != has_std)
    fail("{}: metadata has '{}' but not '{}' (write both, or neither for the Fashion-MNIST default)", checkpoint.path,
         has_mean ? "norm_mean" : "norm_std", has_mean ? "norm_std" : "norm_mean");
  if (!has_mean) {
    const Normalization norm = data::kFashionMnistNormalization;
    std::cerr << fmt::format(
        "note: {} has no 'norm_mean'/'norm_std' metadata; assuming the images were normalised as Fashion-MNIST "
        "(mean {}, std {}, data::kFashionMnistNormalization)\n",
        checkpoint.path, norm.mean, norm.std);
    return norm;
  }
  return {parse_float(checkpoint.meta("norm_mean"), "norm_mean", checkpoint.path),
          parse_float(checkpoint.meta("norm_std"), "norm_std", checkpoint.path)};
}

int64_t meta_integer(const nn::Checkpoint& checkpoint, const std::string& key) {
  const std::string& text = checkpoint.meta(key);
  try {
    size_t used = 0;
    const long long v = std::stoll(text, &used);
    if (used != text.size() || v < 0) throw std::invalid_argument(text);
    return v;
  } catch (const std::exception&) {
    fail("{}: metadata '{}' = '{}' is not a whole number >= 0 (the file is corrupt)", checkpoint.path, key, text);
  }
}

float meta_number(const nn::Checkpoint& checkpoint, const std::string& key) {
  return parse_float(checkpoint.meta(key), key, checkpoint.path);
}

namespace {
std::string file_format(const std::string& path) {
  const StFile file = load_safetensors(path);
  auto it = file.metadata.find("format");
  return it == file.metadata.end() ? "" : it->second;
}
}  // namespace

nn::Description checkpoint_description(const nn::Checkpoint& checkpoint) {
  if (!checkpoint.has_meta("description")) {
    if (!checkpoint.has_meta("model"))
      fail(
          "{}: the checkpoint names no model: it has neither 'description' nor 'model' metadata (save the "
          "description with it: metadata 'description' = nn::description_to_json(model's description))",
          checkpoint.path);
    nn::Description d = nn::builtin_description(checkpoint.meta("model"));
    return nn::with_data_shape(d, 1, 28, 28, 10);
  }
  nn::Description d =
      nn::parse_description(checkpoint.meta("description"), checkpoint.path + ": its 'description' metadata");
  if (!d.resolved())
    fail("{}: the model description in the file leaves its input or classes open (corrupt?)", checkpoint.path);
  return d;
}

std::shared_ptr<quant::QatModel> qat_model_from_checkpoint(const nn::Checkpoint& checkpoint) {
  const quant::QConfig config = qconfig_from_json(checkpoint.meta("qconfig"), checkpoint.path);
  auto qat = quant::prepare_qat(*nn::build_model(checkpoint_description(checkpoint)), config);
  // Parameters and buffers first (load_weights knows nothing of the QAT state), then the state.
  nn::Checkpoint weights = checkpoint;
  std::erase_if(weights.file.tensors, [](const auto& t) { return t.first.starts_with(quant::kQatStatePrefix); });
  nn::load_weights(*qat, weights);
  if (quant::has_qat_state(checkpoint)) quant::load_qat_state(*qat, checkpoint);
  qat->eval();
  return qat;
}

LoadedModel load_model_file(const std::string& path) {
  LoadedModel m;
  m.path = path;
  if (!std::filesystem::exists(path)) fail("model file '{}' does not exist (check the path)", path);
  m.file_bytes = static_cast<int64_t>(std::filesystem::file_size(path));
  const std::string format = file_format(path);
  if (format == quant::kIntModelFormat) {
    m.kind = "int";
    m.int_model = quant::load_int_model(path);
    m.norm = m.int_model->norm;
    return m;
  }
  m.checkpoint = nn::read_checkpoint(path);
  m.norm = checkpoint_normalization(m.checkpoint);
  if (!(m.norm.std > 0)) fail("{}: normalisation std {} must be positive (the file is corrupt)", path, m.norm.std);
  // A checkpoint of one's own program may leave 'kind' out: its qconfig says which.
  m.kind = m.checkpoint.meta_or("kind", m.checkpoint.has_meta("qconfig") ? "qat" : "float");
  if (m.kind == "float") {
    m.float_model = nn::build_model(checkpoint_description(m.checkpoint));
    nn::load_weights(*m.float_model, m.checkpoint);
    m.float_model->eval();
  } else if (m.kind == "qat") {
    m.qat_model = qat_model_from_checkpoint(m.checkpoint);
  } else {
    fail("{}: unknown checkpoint kind '{}' (expected 'float' or 'qat')", path, m.kind);
  }
  return m;
}

std::string sibling_path(const std::string& path, const std::string& tag) {
  const std::string suffix = ".safetensors";
  if (path.size() > suffix.size() && path.ends_with(suffix))
    return path.substr(0, path.size() - suffix.size()) + "." + tag + suffix;
  return path + "." + tag + suffix;
}

void check_output_path(const std::string& path) {
  const std::filesystem::path p(path);
  const auto dir = p.parent_path();
  if (!dir.empty() && !std::filesystem::is_directory(dir))
    fail("cannot write '{}': folder '{}' does not exist (create it first)", path, dir.string());
  if (std::filesystem::is_directory(p)) fail("cannot write '{}': it is a folder (give a file name)", path);
}

int64_t float_weight_bytes(const nn::Module& model) {
  int64_t n = 0;
  for (const auto& [name, t] : model.named_parameters()) n += t.numel();
  for (const auto& [name, t] : model.named_buffers()) n += t.numel();
  return 4 * n;
}

int64_t int_model_bytes(const quant::IntModel& model) {
  const auto tmp = std::filesystem::temp_directory_path() / fmt::format("lowbit-size-{}.safetensors", ::getpid());
  quant::save_int_model(tmp.string(), model);
  const int64_t bytes = quant::int_model_file_bytes(tmp.string());
  std::filesystem::remove(tmp);
  return bytes;
}

quant::QParams int_output_qparams(const quant::IntModel& model) {
  return quant::QParams{model.output_scale, model.graph.ops.back().requant.zero_point};
}

// ---------------------------------------------------------------------------------------------
// evaluation

namespace {
void tally(EvalResult& r, int32_t label, int32_t predicted) {
  const auto classes = static_cast<int32_t>(r.class_total.size());
  if (label >= classes)
    fail("the data set has label {}, but the model has {} classes (labels 0..{}): data and model do not match", label,
         classes, classes - 1);
  ++r.samples;
  ++r.class_total[static_cast<size_t>(label)];
  ++r.confusion[static_cast<size_t>(label)][static_cast<size_t>(predicted)];
  r.predictions.push_back(predicted);
  if (label == predicted) {
    ++r.correct;
    ++r.class_correct[static_cast<size_t>(label)];
  }
}

EvalResult empty_result(int64_t classes) {
  EvalResult r;
  r.class_total.assign(static_cast<size_t>(classes), 0);
  r.class_correct.assign(static_cast<size_t>(classes), 0);
  r.confusion.assign(static_cast<size_t>(classes), std::vector<int64_t>(static_cast<size_t>(classes), 0));
  return r;
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
}  // namespace

EvalResult evaluate_model(nn::Module& model, const data::Dataset& dataset, const Normalization& norm,
                          int64_t batch_size, const std::optional<quant::QParams>& output_qparams) {
  NoGradGuard no_grad;
  model.eval();
  data::DataLoader loader(dataset, {},
                          {.batch_size = batch_size, .shuffle = false, .drop_last = false, .seed = 0, .norm = norm});
  loader.start_epoch(0);
  EvalResult r;
  data::Batch batch;
  while (loader.next(batch)) {
    const auto t0 = Clock::now();
    Tensor logits = model.forward(batch.images);
    const double dt = seconds_since(t0);
    const int64_t classes = logits.size(1);
    if (r.class_total.empty()) r = empty_result(classes);
    r.seconds += dt;
    r.latencies_us.push_back(dt * 1e6 / static_cast<double>(batch.size()));
    for (int64_t i = 0; i < batch.size(); ++i) {
      const float* row = logits.data() + i * classes;
      const auto predicted = static_cast<int32_t>(std::max_element(row, row + classes) - row);
      tally(r, batch.labels[static_cast<size_t>(i)], predicted);
      if (output_qparams)
        for (int64_t k = 0; k < classes; ++k)
          r.logit_codes.push_back(static_cast<int32_t>(std::lround(row[k] / output_qparams->scale)) +
                                  output_qparams->zero_point);
    }
  }
  return r;
}

EvalResult evaluate_int(const quant::IntModel& model, const data::Dataset& dataset, int64_t batch_size, int threads) {
  quant::runtime::Executor executor(model.graph, threads);
  const int64_t classes = executor.num_classes();
  const int64_t pixels = dataset.images.image_size();
  if (dataset.images.channels != model.graph.in_channels || dataset.images.rows != model.graph.in_height ||
      dataset.images.cols != model.graph.in_width)
    fail("the integer model takes {}x{}x{} images, the data set holds {}x{}x{} images", model.graph.in_channels,
         model.graph.in_height, model.graph.in_width, dataset.images.channels, dataset.images.rows,
         dataset.images.cols);
  EvalResult r = empty_result(classes);
  for (int64_t start = 0; start < dataset.size(); start += batch_size) {
    const int64_t n = std::min(batch_size, dataset.size() - start);
    std::span<const uint8_t> images(dataset.images.pixels.data() + start * pixels, static_cast<size_t>(n * pixels));
    const auto t0 = Clock::now();
    std::span<const int8_t> logits = executor.run(images, n);
    const double dt = seconds_since(t0);
    r.seconds += dt;
    r.latencies_us.push_back(dt * 1e6 / static_cast<double>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int8_t* row = logits.data() + i * classes;
      const auto predicted = static_cast<int32_t>(std::max_element(row, row + classes) - row);  // first maximum
      tally(r, dataset.labels[static_cast<size_t>(start + i)], predicted);
      for (int64_t k = 0; k < classes; ++k) r.logit_codes.push_back(row[k]);
    }
  }
  return r;
}

Agreement agreement(const EvalResult& a, const EvalResult& b) {
  if (a.predictions.size() != b.predictions.size() || a.predictions.empty())
    fail("agreement: the two evaluations cover {} and {} images", a.predictions.size(), b.predictions.size());
  Agreement out;
  int64_t same = 0;
  for (size_t i = 0; i < a.predictions.size(); ++i) same += a.predictions[i] == b.predictions[i];
  out.fraction = static_cast<double>(same) / static_cast<double>(a.predictions.size());
  if (a.logit_codes.size() == b.logit_codes.size())
    for (size_t i = 0; i < a.logit_codes.size(); ++i)
      out.max_logit_diff_lsb = std::max<int64_t>(out.max_logit_diff_lsb, std::abs(a.logit_codes[i] - b.logit_codes[i]));
  return out;
}

// ---- data

std::vector<Tensor> normalised_batches(const data::Dataset& set, const Normalization& norm, int64_t count,
                                       int64_t batch_size) {
  const data::Dataset subset = data::first_images(set, count);
  data::DataLoader loader(subset, {},
                          {.batch_size = batch_size, .shuffle = false, .drop_last = false, .seed = 0, .norm = norm});
  loader.start_epoch(0);
  std::vector<Tensor> batches;
  data::Batch batch;
  // The loader overwrites batch.images in place on the next call: each batch keeps its own copy.
  while (loader.next(batch)) batches.push_back(batch.images.clone());
  return batches;
}

void calibrate(quant::QatModel& model, const data::Dataset& train, const Normalization& norm, int64_t images) {
  if (images < 1) fail("--calib must be at least 1 image, got {}", images);
  images = std::min(images, train.size());
  std::vector<int64_t> indices(static_cast<size_t>(images));
  for (int64_t i = 0; i < images; ++i) indices[static_cast<size_t>(i)] = i;
  data::DataLoader loader(train, indices,
                          {.batch_size = 250, .shuffle = false, .drop_last = false, .seed = 0, .norm = norm});
  loader.start_epoch(0);
  data::Batch batch;
  quant::calibrate(model, [&](Tensor& x) { return loader.next(batch) && (x = batch.images, true); });
}

std::string format_report(const EvalResult& r, const std::string& mode) {
  std::string out = fmt::format("{}: accuracy {:.2f}% ({} / {})\n", mode, 100.0 * r.accuracy(), r.correct, r.samples);
  out += "per class:";
  for (size_t c = 0; c < r.class_total.size(); ++c)
    if (r.class_total[c])
      out += fmt::format(" {}:{:.1f}%", c,
                         100.0 * static_cast<double>(r.class_correct[c]) / static_cast<double>(r.class_total[c]));
  out += "\nconfusion matrix (rows: true class, columns: predicted):\n";
  for (size_t t = 0; t < r.confusion.size(); ++t) {
    if (!r.class_total[t]) continue;
    out += fmt::format("  {:>2} |", t);
    for (int64_t v : r.confusion[t]) out += fmt::format(" {:>5}", v);
    out += "\n";
  }
  return out;
}

}  // namespace lowbit::apps
