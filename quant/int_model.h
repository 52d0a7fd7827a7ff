// The integer model file: a runtime::Graph plus its report fields, saved in the safetensors container
// (the layout is docs/int-graph-format.md; the container is docs/model-file-format.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/normalize.h"
#include "quant/runtime/graph.h"

namespace lowbit::quant {

inline constexpr const char* kIntModelFormat = "lowbit-int-graph";  // __metadata__["format"]
inline constexpr int kIntModelVersion = 2;                          // __metadata__["format_version"]

// Limits a file must respect (checked before any value is used as a size).
inline constexpr int64_t kIntModelMaxChannels = 65536;  // channels, features, input height / width
inline constexpr int64_t kIntModelMaxKernel = 64;       // kernel, stride, padding
inline constexpr int64_t kIntModelMaxOps = 4096;
inline constexpr size_t kIntModelMaxNameLength = 256;  // op names and the model name, in bytes

struct IntModel {
  runtime::Graph graph;
  std::string model_name;  // "lenet5"
  std::string mode;        // "int8", "w4a8", "w4a4" or "mixed"
  Normalization norm;      // the float normalisation folded into the input table (kept for reports)
  float input_scale = 1.f;  // qparams of the Input op's codes: x = input_scale · (code − input_zero_point)
  int32_t input_zero_point = 0;
  float output_scale = 1.f;  // real logit = output_scale · (code − graph.ops.back().requant.zero_point)
  std::vector<float> op_output_scales;  // one per op (for reports; not needed to run)

  // The number of logits: the size of the last op's output (0 for an empty graph).
  int64_t num_classes() const;
};

// Checks the model like load_int_model does, then writes it atomically (save_safetensors).
// Throws lowbit::Error, leaving an existing file untouched, if the model would not load back.
void save_int_model(const std::string& path, const IntModel& model);

// Reads and validates a file: the container, the format tag and version, the metadata, every tensor,
// then runtime::validate(). Never returns a graph that validate() refuses. Throws lowbit::Error.
IntModel load_int_model(const std::string& path);

// The same from bytes in memory (fuzzers call this); path_for_errors prefixes every message.
IntModel parse_int_model(std::span<const std::byte> bytes, const std::string& path_for_errors);

// The size of the file at path in bytes. Throws lowbit::Error if it cannot be read.
int64_t int_model_file_bytes(const std::string& path);

}  // namespace lowbit::quant
