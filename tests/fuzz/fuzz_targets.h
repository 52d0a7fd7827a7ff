// The body of each fuzz target, for one input: shared by the libFuzzer executables and the regression test.
// A reader may refuse an input with lowbit::Error; anything else (another exception, a crash, a
// sanitizer report, or a broken promise checked here) is a finding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <vector>

#include "core/error.h"
#include "data/idx.h"
#include "nn/checkpoint.h"
#include "quant/int_model.h"
#include "quant/runtime/executor.h"
#include "tests/fuzz/fuzz_models.h"

namespace lowbit::fuzz {

enum class Outcome { Loaded, Refused };

// A promise of the reader does not hold: report and abort, so that libFuzzer keeps the input.
[[noreturn]] inline void broken(const char* what) {
  std::fprintf(stderr, "fuzz: broken promise: %s\n", what);
  std::abort();
}

// ---- IDX (plain and gzip): the same bytes read as images and as labels. ---------------------------

inline Outcome idx_input(std::span<const uint8_t> bytes) {
  Outcome outcome = Outcome::Refused;
  try {
    const data::IdxImages images = data::parse_idx_images(bytes, "fuzz.idx");
    if (images.rows < 1 || images.cols < 1 || images.channels < 1 || images.count < 0)
      broken("images with an empty or negative dimension");
    if (images.pixels.size() != static_cast<size_t>(images.count * images.image_size())) {  // rank 4: channels too
      broken("pixel count differs from count * channels * rows * cols");
    }
    outcome = Outcome::Loaded;
  } catch (const Error&) {
  }
  try {
    const std::vector<uint8_t> labels = data::parse_idx_labels(bytes, "fuzz.idx");
    if (bytes.size() >= 8 && bytes[0] != 0x1f && labels.size() + 8 != bytes.size()) {
      broken("a plain label file must hold exactly its 8 header bytes and one byte per label");
    }
    outcome = Outcome::Loaded;
  } catch (const Error&) {
  }
  return outcome;
}

// ---- checkpoint: the container, the format tag and version, then load_weights into a tiny model. ----

inline Outcome checkpoint_input(std::span<const std::byte> bytes) {
  nn::Checkpoint checkpoint;
  try {
    checkpoint = nn::parse_checkpoint(bytes, "fuzz.safetensors");
  } catch (const Error&) {
    return Outcome::Refused;
  }
  for (const auto& [name, tensor] : checkpoint.file.tensors) {
    size_t numel = 1;
    for (const int64_t d : tensor.shape) numel *= static_cast<size_t>(d);
    if (tensor.bytes.size() != numel * dtype_size(tensor.dtype)) broken("tensor bytes differ from shape x dtype size");
    if (tensor.dtype != DType::F32) continue;
    if (checkpoint.tensor(name).numel() != static_cast<int64_t>(numel)) broken("Tensor size differs from the shape");
  }
  const auto model = tiny_float_model();
  try {
    nn::load_weights(*model, checkpoint);
  } catch (const Error&) {
    return Outcome::Refused;
  }
  return Outcome::Loaded;
}

// ---- integer model: load, then whatever loads must validate and run, fast kernels = reference. ------

constexpr int64_t kMaxCodesToRun = int64_t{1} << 16;  // larger graphs load but are not run (time, not safety)

inline Outcome int_model_input(std::span<const std::byte> bytes) {
  namespace rt = quant::runtime;
  quant::IntModel model;
  try {
    model = quant::parse_int_model(bytes, "fuzz.int.safetensors");
  } catch (const Error&) {
    return Outcome::Refused;
  }
  std::vector<rt::Shape> shapes;
  try {
    rt::validate(model.graph);
    shapes = rt::output_shapes(model.graph);
  } catch (const rt::RuntimeError&) {
    broken("load_int_model returned a graph that validate() refuses");
  }
  int64_t codes = model.graph.in_channels * model.graph.in_height * model.graph.in_width;
  for (const rt::Shape& shape : shapes) codes += shape.size();
  if (codes > kMaxCodesToRun) return Outcome::Loaded;
  const int64_t batch = 2;
  std::vector<uint8_t> images(static_cast<size_t>(batch * shapes.front().size()));
  for (size_t i = 0; i < images.size(); ++i) images[i] = static_cast<uint8_t>(i * 89 + 7);
  rt::Executor fast(model.graph, 1, rt::Executor::Kernels::Fastest);
  rt::Executor reference(model.graph, 1, rt::Executor::Kernels::Reference);
  const auto a = fast.run(images, batch);
  const std::vector<int8_t> fast_logits(a.begin(), a.end());
  const auto b = reference.run(images, batch);
  if (fast_logits != std::vector<int8_t>(b.begin(), b.end())) broken("fast and reference kernels disagree");
  return Outcome::Loaded;
}

}  // namespace lowbit::fuzz
