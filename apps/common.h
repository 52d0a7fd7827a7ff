// What the command-line programs share: error handling in main, model files of every kind,
// evaluation of float, fake-quant and integer models, and printing.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/normalize.h"
#include "data/loader.h"
#include "data/mnist.h"
#include "nn/checkpoint.h"
#include "nn/graph.h"
#include "quant/calibrate.h"
#include "quant/int_model.h"
#include "quant/qat.h"

namespace lowbit::apps {

// Parses flags, runs `body`, and turns every failure into one line on stderr and a non-zero exit:
// 2 for bad flags, 1 for everything else (bad files, bad data, out of memory).
int run_main(CLI::App& app, int argc, char** argv, const std::function<void()>& body);

// ---- model files

// Metadata keys of checkpoints written by train: the model's name and description (nn/graph.h), so
// that any checkpoint rebuilds from its file alone, the normalisation and, for QAT, the qconfig.
std::map<std::string, std::string> model_metadata(const nn::Description& description, const Normalization& norm,
                                                  const quant::QConfig* qconfig);
// A metadata number of a checkpoint; a missing or corrupt value is one clear error naming the file.
int64_t meta_integer(const nn::Checkpoint& checkpoint, const std::string& key);
float meta_number(const nn::Checkpoint& checkpoint, const std::string& key);

// The normalisation a checkpoint was trained with (its 'norm_mean' and 'norm_std' metadata). A file without
// both (one written by a program of one's own with nn::save_checkpoint) gets the Fashion-MNIST normalisation
// the data loader's examples use, with a note on stderr saying so.
Normalization checkpoint_normalization(const nn::Checkpoint& checkpoint);
// The model description a checkpoint carries (files written before descriptions existed name a
// built-in model, for 1x28x28 images and 10 classes).
nn::Description checkpoint_description(const nn::Checkpoint& checkpoint);
std::string qconfig_to_json(const quant::QConfig& config);
quant::QConfig qconfig_from_json(const std::string& text, const std::string& path);

// Any lowbit model file: a float checkpoint, a QAT checkpoint, or an integer graph.
struct LoadedModel {
  std::string path;
  std::string kind;  // "float", "qat" or "int"
  std::shared_ptr<nn::Model> float_model;
  std::shared_ptr<quant::QatModel> qat_model;
  std::optional<quant::IntModel> int_model;
  Normalization norm;
  nn::Checkpoint checkpoint;  // float and QAT files: the file as read
  int64_t file_bytes = 0;
};
LoadedModel load_model_file(const std::string& path);

// Rebuilds the QAT model a QAT checkpoint describes and loads its weights and qparams, and its
// observers' statistics and switches when the file carries them (quant::qat_state; files written
// before they were saved load without them).
std::shared_ptr<quant::QatModel> qat_model_from_checkpoint(const nn::Checkpoint& checkpoint);

// "out.safetensors" + "int8" -> "out.int8.safetensors"
std::string sibling_path(const std::string& path, const std::string& tag);

// Checks that the folder an output file goes into exists (before hours of training).
void check_output_path(const std::string& path);

// Bytes of a model's float32 weights: 4 × (parameters + buffers), optimizer state not included.
int64_t float_weight_bytes(const nn::Module& model);
// Bytes the integer model takes as a file (written to a temporary file, measured, removed).
int64_t int_model_bytes(const quant::IntModel& model);
// The qparams of the integer graph's logits, for evaluate_model's output_qparams.
quant::QParams int_output_qparams(const quant::IntModel& model);

// ---- evaluation

struct EvalResult {
  int64_t samples = 0, correct = 0;
  std::vector<int64_t> class_total, class_correct;
  std::vector<std::vector<int64_t>> confusion;  // [true][predicted]
  std::vector<int32_t> predictions;
  std::vector<int32_t> logit_codes;  // (N, classes) integer logits (int graph), or fake-quant logits as codes
  double seconds = 0;                // inference only
  std::vector<double> latencies_us;  // per batch, when measured
  double accuracy() const { return samples ? static_cast<double>(correct) / static_cast<double>(samples) : 0.0; }
};

// Float or fake-quant model in eval mode. When `output_qparams` is given, the logits are turned
// into codes with them (q = round(y / s) + z), for comparing with the integer graph.
EvalResult evaluate_model(nn::Module& model, const data::Dataset& data, const Normalization& norm, int64_t batch_size,
                          const std::optional<quant::QParams>& output_qparams = std::nullopt);
// The integer graph.
EvalResult evaluate_int(const quant::IntModel& model, const data::Dataset& data, int64_t batch_size, int threads);

// Fraction of equal predictions, and the largest logit difference in output LSBs.
struct Agreement {
  double fraction = 0;
  int64_t max_logit_diff_lsb = 0;
};
Agreement agreement(const EvalResult& a, const EvalResult& b);

// ---- data

// The first `count` images of `set`, normalised with `norm`, in batches of `batch_size` (the last
// one smaller): every batch holds its own images, batch i is images i*batch_size onwards.
std::vector<Tensor> normalised_batches(const data::Dataset& set, const Normalization& norm, int64_t count,
                                       int64_t batch_size = 250);

// Post-training calibration on the first `images` training images.
void calibrate(quant::QatModel& model, const data::Dataset& train, const Normalization& norm, int64_t images);

std::string format_report(const EvalResult& result, const std::string& mode);

}  // namespace lowbit::apps
