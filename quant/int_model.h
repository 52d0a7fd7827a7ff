// The integer model file: a runtime::Graph plus its report fields, saved in the safetensors container
// (the layout is docs/int-graph-format.md; the container is docs/model-file-format.md).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/normalize.h"
#include "nn/graph.h"
#include "quant/qparams.h"
#include "quant/runtime/graph.h"

namespace lowbit::quant {

inline constexpr const char* kIntModelFormat = "lowbit-int-graph";  // __metadata__["format"]
inline constexpr int kIntModelVersion = 4;                          // __metadata__["format_version"]

// Limits a file must respect (checked before any value is used as a size).
inline constexpr int64_t kIntModelMaxChannels = 65536;  // channels, features, input height / width
inline constexpr int64_t kIntModelMaxKernel = 64;       // kernel, stride, padding
inline constexpr int64_t kIntModelMaxOps = 4096;
inline constexpr size_t kIntModelMaxNameLength = 256;  // op names and the model name, in bytes

struct IntModel {
  runtime::Graph graph;
  std::string model_name;  // "lenet5"
  std::string mode;        // "int8", "w4a8", "w4a4" or "mixed"
  // The float model's description (nn/graph.h), carried along from the checkpoint so that reports can draw
  // the model it came from; empty (no nodes) when unknown. Not needed to run.
  nn::Description description;
  // The Input op's table is derived from these four (make_input_table): the file stores them, not the table.
  Normalization norm;       // the float normalisation x = (pixel/255 − mean)/std
  float input_scale = 1.f;  // qparams of the Input op's codes: x = input_scale · (code − input_zero_point)
  int32_t input_zero_point = 0;
  QRange input_range{-128, 127};  // the codes the input quantizer may produce ([−8, 7] for 4-bit inputs)
  float output_scale = 1.f;  // real logit = output_scale · (code − graph.ops.back().requant.zero_point)
  std::vector<float> op_output_scales;  // one per op (for reports; not needed to run)
  // One entry per op: for a Conv2d / Linear the requantization scales M[c] = s_in·s_w[c]/s_out as float32,
  // one per output channel (requant_scale); for an Add / Concat the rescale scales M[i] = s_i/s_out, one per
  // input (rescale_scale); empty for the other ops. The file stores these; the op's requant.multiplier and
  // requant.shift (rescale.multipliers and shift) are derived from them (set_requant_from_scales,
  // rescale_from_scales).
  std::vector<std::vector<float>> op_requant_scales;

  // The number of logits: the size of the last op's output (0 for an empty graph).
  int64_t num_classes() const;
};

// ---- values derived from the stored ones: one definition, used by convert and by the loader ----------

// The Input op's 256-entry table, eq. 9 of docs/quantization.md:
//   table[p] = quantize(normalize_pixel(p, norm), input, range)
// (the same two float functions the data loader and the fake-quant input node use).
std::array<int8_t, 256> make_input_table(const Normalization& norm, QParams input, QRange range);

// The requantization scale M = s_in·s_w[c]/s_out (eq. 6), computed in double and rounded once to float32:
// the value the file stores.
float requant_scale(float input_scale, float weight_scale, float output_scale);

// Sets op.requant.multiplier and op.requant.shift, one per output channel, from float32 scales with
// quantize_multiplier (eq. 6). A float32 has a 24-bit mantissa and m has 31 bits, so m·2^(−n) equals the
// float exactly: the result is the same on every machine. Throws lowbit::Error (naming the op and the
// channel) for a scale that is not finite and positive or outside [2^−32, 2^30).
void set_requant_from_scales(runtime::Op& op, std::span<const float> scales);

// The rescale scale M[i] = s_i/s_out of an Add's or Concat's input (eq. 10), in double rounded once to float32.
float rescale_scale(float input_scale, float output_scale);

// The fixed-point form of an Add's or Concat's scales M[i] (eq. 10): the largest becomes m·2^(−n) by
// quantize_multiplier (m in [2^30, 2^31)), every other m[i] = round(M[i]·2^n) with the same n. Exact and the
// same on every machine, like set_requant_from_scales. zero_points is left empty. Throws lowbit::Error for a
// scale that is not finite and positive, or a largest scale outside [2^−32, 2^30).
runtime::Rescale rescale_from_scales(std::span<const float> scales);

// Checks the model like load_int_model does, then writes it atomically (save_safetensors).
// Throws lowbit::Error, leaving an existing file untouched, if the model would not load back, or if the
// graph's input table or multipliers are not the ones derived from the stored values (make_input_table,
// set_requant_from_scales): a saved and loaded model is then bit-identical to the one saved.
void save_int_model(const std::string& path, const IntModel& model);

// Reads and validates a file: the container, the format tag and version, the metadata, every tensor,
// then runtime::validate(). Never returns a graph that validate() refuses. Throws lowbit::Error.
IntModel load_int_model(const std::string& path);

// The same from bytes in memory (fuzzers call this); path_for_errors prefixes every message.
IntModel parse_int_model(std::span<const std::byte> bytes, const std::string& path_for_errors);

// The size of the file at path in bytes. Throws lowbit::Error if it cannot be read.
int64_t int_model_file_bytes(const std::string& path);

}  // namespace lowbit::quant
