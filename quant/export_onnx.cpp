// Exports lowbit models to ONNX with ONNX's own protobuf classes: the integer graph as QOperator ops, the float
// model as fp32 ops. docs/onnx.md explains the form, the opset, the scales and the rounding.
#include "quant/export_onnx.h"

#include <onnx/checker.h>
#include <onnx/onnx_pb.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <span>
#include <type_traits>

#include "core/error.h"
#include "nn/graph.h"
#include "nn/layers.h"
#include "quant/runtime/int4.h"

namespace lowbit::quant {

namespace {

namespace rt = runtime;
namespace fs = std::filesystem;

constexpr const char* kMicrosoftDomain = "com.microsoft";
constexpr const char* kBatch = "N";  // the symbolic batch dimension of the input and outputs
// lowbit's activation codes are int8; the exported graph carries them as uint8 (ONNX Runtime's fast integer
// kernels are u8 × s8): ONNX code = lowbit code + kUint8Offset, for codes and zero points alike.
constexpr int32_t kUint8Offset = 128;
// How far (in float32 steps) the weight scale search looks on each side of s_out · M / s_in (see weight_scale).
constexpr int kMaxScaleSteps = 64;

// ---- building protobuf messages ------------------------------------------------------------------------------

template <typename T>
constexpr onnx::TensorProto_DataType onnx_type() {
  if constexpr (std::is_same_v<T, float>) return onnx::TensorProto_DataType_FLOAT;
  if constexpr (std::is_same_v<T, int8_t>) return onnx::TensorProto_DataType_INT8;
  if constexpr (std::is_same_v<T, uint8_t>) return onnx::TensorProto_DataType_UINT8;
  if constexpr (std::is_same_v<T, int32_t>) return onnx::TensorProto_DataType_INT32;
  if constexpr (std::is_same_v<T, int64_t>) return onnx::TensorProto_DataType_INT64;
}

// A GraphProto under construction: constant tensors (initializers), nodes and their attributes. Names are
// chosen by the caller; every node gets a name, so that tools (Netron, ORT's profiler) show lowbit's op names.
class GraphBuilder {
 public:
  explicit GraphBuilder(onnx::GraphProto& graph) : graph_(graph) {}

  // A constant tensor of shape `dims` (empty: a scalar), stored little-endian in raw_data. Returns its name.
  template <typename T>
  std::string constant(const std::string& name, const std::vector<int64_t>& dims, std::span<const T> values) {
    onnx::TensorProto& t = *graph_.add_initializer();
    t.set_name(name);
    t.set_data_type(onnx_type<T>());
    for (const int64_t d : dims) t.add_dims(d);
    t.set_raw_data(values.data(), values.size_bytes());  // x86 and ARM are little-endian, as ONNX wants
    initializer_bytes_ += static_cast<int64_t>(values.size_bytes());
    return name;
  }
  template <typename T>
  std::string constant(const std::string& name, const std::vector<int64_t>& dims, const std::vector<T>& values) {
    return constant(name, dims, std::span<const T>(values));
  }
  template <typename T>
  std::string scalar(const std::string& name, T value) {
    return constant(name, {}, std::span<const T>(&value, 1));
  }

  onnx::NodeProto& node(const std::string& op_type, const std::string& name, const std::vector<std::string>& inputs,
                        const std::vector<std::string>& outputs, const char* domain = "") {
    onnx::NodeProto& n = *graph_.add_node();
    n.set_op_type(op_type);
    n.set_name(name);
    n.set_domain(domain);
    for (const std::string& in : inputs) n.add_input(in);
    for (const std::string& out : outputs) n.add_output(out);
    return n;
  }

  static void attribute(onnx::NodeProto& n, const std::string& name, int64_t value) {
    onnx::AttributeProto& a = *n.add_attribute();
    a.set_name(name);
    a.set_type(onnx::AttributeProto_AttributeType_INT);
    a.set_i(value);
  }
  static void attribute(onnx::NodeProto& n, const std::string& name, float value) {
    onnx::AttributeProto& a = *n.add_attribute();
    a.set_name(name);
    a.set_type(onnx::AttributeProto_AttributeType_FLOAT);
    a.set_f(value);
  }
  static void attribute(onnx::NodeProto& n, const std::string& name, const std::vector<int64_t>& values) {
    onnx::AttributeProto& a = *n.add_attribute();
    a.set_name(name);
    a.set_type(onnx::AttributeProto_AttributeType_INTS);
    for (const int64_t v : values) a.add_ints(v);
  }

  // A graph input or output: element type and shape, "N" for the batch dimension.
  static void describe(onnx::ValueInfoProto& v, const std::string& name, onnx::TensorProto_DataType type,
                       const std::vector<int64_t>& dims_after_batch) {
    v.set_name(name);
    onnx::TypeProto_Tensor& t = *v.mutable_type()->mutable_tensor_type();
    t.set_elem_type(type);
    t.mutable_shape()->add_dim()->set_dim_param(kBatch);
    for (const int64_t d : dims_after_batch) t.mutable_shape()->add_dim()->set_dim_value(d);
  }
  void input(const std::string& name, onnx::TensorProto_DataType type, const std::vector<int64_t>& dims) {
    describe(*graph_.add_input(), name, type, dims);
  }
  void output(const std::string& name, onnx::TensorProto_DataType type, const std::vector<int64_t>& dims) {
    describe(*graph_.add_output(), name, type, dims);
  }

  int64_t initializer_bytes() const { return initializer_bytes_; }

 private:
  onnx::GraphProto& graph_;
  int64_t initializer_bytes_ = 0;
};

// The model around a graph: versions, producer, the opsets it imports, metadata.
onnx::ModelProto new_model(const std::string& graph_name, const std::string& doc,
                           const std::vector<std::pair<std::string, std::string>>& metadata, bool microsoft_ops) {
  onnx::ModelProto model;
  model.set_ir_version(kOnnxIrVersion);
  model.set_producer_name("lowbit");
  model.set_producer_version("0.1.0");  // the file format's producer, not a build stamp: the bytes stay the same
  onnx::OperatorSetIdProto& std_ops = *model.add_opset_import();
  std_ops.set_domain("");
  std_ops.set_version(kOnnxOpset);
  if (microsoft_ops) {
    onnx::OperatorSetIdProto& ms = *model.add_opset_import();
    ms.set_domain(kMicrosoftDomain);
    ms.set_version(kOnnxMicrosoftOpset);
  }
  for (const auto& [key, value] : metadata) {
    onnx::StringStringEntryProto& e = *model.add_metadata_props();
    e.set_key(key);
    e.set_value(value);
  }
  model.mutable_graph()->set_name(graph_name);
  model.mutable_graph()->set_doc_string(doc);
  return model;
}

// Checks the model with ONNX's own checker (the C++ library behind onnx.checker.check_model), then serializes
// it. Protobuf writes the fields of a message in field-number order and this exporter adds repeated fields
// in a fixed order, so the bytes depend only on the model.
OnnxExport finish(const onnx::ModelProto& model, const GraphBuilder& builder, const std::string& what) {
  try {
    onnx::checker::check_model(model);
  } catch (const std::exception& e) {
    fail("{}: the ONNX checker refuses the exported model (a bug in the exporter): {}", what, e.what());
  }
  OnnxExport result;
  std::string bytes;
  if (!model.SerializeToString(&bytes)) fail("{}: protobuf could not serialize the model", what);
  result.bytes = std::move(bytes);
  result.nodes = model.graph().node_size();
  result.initializer_bytes = builder.initializer_bytes();
  return result;
}

// The normalisation x = (p / 255 − mean) / std of "image", as normalize_pixel computes it: one float32 operation at a
// time (Cast, Div, Sub, Div). Returns the name of x, (N, C, H, W) float32.
std::string emit_normalize(GraphBuilder& g, const Normalization& norm) {
  onnx::NodeProto& cast = g.node("Cast", "normalize.to_float", {"image"}, {"normalize.pixel"});
  GraphBuilder::attribute(cast, "to", static_cast<int64_t>(onnx::TensorProto_DataType_FLOAT));
  g.node("Div", "normalize.div_255", {"normalize.pixel", g.scalar("normalize.255", 255.f)}, {"normalize.unit"});
  g.node("Sub", "normalize.sub_mean", {"normalize.unit", g.scalar("normalize.mean", norm.mean)}, {"normalize.centred"});
  g.node("Div", "normalize.div_std", {"normalize.centred", g.scalar("normalize.std", norm.std)}, {"normalized"});
  return "normalized";
}

// The input table as a Gather: "image" (uint8 pixels) → Cast to int32 (Gather's index type) → table[pixel],
// a tensor of the image's shape. `table` holds 256 entries, one per pixel value.
template <typename T>
void emit_input_table(GraphBuilder& g, const std::string& name, const std::vector<T>& table,
                      const std::string& output) {
  onnx::NodeProto& cast = g.node("Cast", name + ".pixel_to_index", {"image"}, {"image.index"});
  GraphBuilder::attribute(cast, "to", static_cast<int64_t>(onnx::TensorProto_DataType_INT32));
  const std::string t = g.constant(name + ".table", {256}, table);
  GraphBuilder::attribute(g.node("Gather", name, {t, "image.index"}, {output}), "axis", int64_t{0});
}

// kernel_shape, strides and (if any) pads of a square window, as ONNX's Conv and pooling ops take them.
void window_attributes(onnx::NodeProto& n, int64_t kernel, int64_t stride, int64_t padding) {
  GraphBuilder::attribute(n, "kernel_shape", std::vector<int64_t>{kernel, kernel});
  GraphBuilder::attribute(n, "strides", std::vector<int64_t>{stride, stride});
  if (padding > 0) GraphBuilder::attribute(n, "pads", std::vector<int64_t>{padding, padding, padding, padding});
}

// ---- the integer graph ---------------------------------------------------------------------------------------

// The index of the op whose output op i reads first (ops name their inputs; Add and Concat read all of op.inputs).
size_t input_op(const rt::Graph& graph, size_t i) { return static_cast<size_t>(graph.ops[i].inputs.at(0)); }

// The float32 requantization scale ONNX Runtime forms from an op's three scales (QLinearConv and QGemm both
// compute x_scale · w_scale / y_scale in float32, in that order) and multiplies each int32 accumulator by.
float ort_requant_scale(float x_scale, float w_scale, float y_scale) {
  const float product = x_scale * w_scale;  // rounded to float32 here, as ONNX Runtime does
  return product / y_scale;
}

// The weight scale of one output channel. lowbit stores M = s_in · s_w / s_out (eq. 6), not s_w; the real
// weight scale is s_out · M / s_in. Among the float32 values next to it (kMaxScaleSteps on each side), this picks
// one for which ONNX Runtime's own float32 computation of the requantization scale gives back M exactly, so that
// ONNX Runtime multiplies by the same M lowbit does. Two roundings can skip M: then the value that comes closest.
struct WeightScale {
  float scale;
  bool exact;  // ort_requant_scale(s_in, scale, s_out) == M
};
WeightScale weight_scale(float s_in, float m, float s_out) {
  const auto start = static_cast<float>(static_cast<double>(s_out) * m / s_in);
  WeightScale best{start, false};
  double best_error = INFINITY;
  float up = start, down = start;
  for (int step = 0; step <= kMaxScaleSteps; ++step) {
    for (const float w : {up, down}) {
      const double error = std::abs(static_cast<double>(ort_requant_scale(s_in, w, s_out)) - m);
      if (error == 0) return {w, true};
      if (error < best_error) {
        best = {w, false};
        best_error = error;
      }
    }
    up = std::nextafter(up, INFINITY);
    down = std::nextafter(down, 0.f);
  }
  return best;
}

// The y_scale of an average pool over `count` positions whose x_scale is 1. ONNX Runtime computes the mean
// y = Σ(x − z) / count in float32 and outputs round_half_even(y / y_scale) + z; lowbit rounds the same mean half away
// from zero. With an odd count no mean is a tie (2·Σ = odd · count has no integer solution), so y_scale = 1 and the
// two agree. With an even count a mean k + ½ is common (a 2×2 window: whenever Σ ≡ 2 mod 4), and y_scale =
// 1 − 2^−e moves every mean away from zero by |y|·2^−e, about, which
//   - pushes a tie k + ½ (|y| ≥ ½) off the tie by at least 2^−(e+1): more than float32's rounding of y / y_scale + z
//     below 256 (at most 2^−17) when e ≤ 15, so it rounds away from zero as in lowbit;
//   - moves no other mean across a boundary: those are at least 1/count from k + ½ (y is a multiple of 1/count),
//     and |y| ≤ 255 moves by less when 2^e > 255·count.
// The smallest such e is at most 15 for count ≤ 64 (K ≤ 8). Larger even windows get 1: ties round to even there.
float avg_pool_output_scale(int64_t count) {
  if (count % 2 == 1) return 1.f;
  int e = 0;
  while (std::ldexp(1.0, e) <= 255.0 * static_cast<double>(count)) ++e;
  return e <= 15 ? static_cast<float>(1.0 - std::ldexp(1.0, -e)) : 1.f;
}

// A weight matrix as int8 codes, (OUT, row length) row-major: 8-bit weights as they are, 4-bit weights
// unpacked from their rows of nibbles (int4.h). ONNX Runtime's CPU kernels have no int4 QLinearConv or QGemm.
std::vector<int8_t> unpacked_weight(const rt::Op& op) {
  if (op.weight_bits == 8) return op.weight;
  const auto row = static_cast<size_t>(rt::weight_row_length(op));
  const size_t row_bytes = rt::int4_packed_size(row);
  std::vector<int8_t> codes;
  codes.reserve(static_cast<size_t>(op.out_channels) * row);
  for (size_t c = 0; c < static_cast<size_t>(op.out_channels); ++c) {
    const std::span<const int8_t> packed = std::span<const int8_t>(op.weight).subspan(c * row_bytes, row_bytes);
    for (size_t k = 0; k < row; ++k) codes.push_back(rt::unpack_int4_at(packed, k));
  }
  return codes;
}

// One op's output as an ONNX value: its name, its rank (4 for (N, C, H, W), 2 after a Flatten) and the names of
// the constants holding its scale and zero point (shared by every op that reads it).
struct QuantValue {
  std::string name;
  int rank = 4;
  std::string scale, zero_point;  // float32 and uint8 scalars
  float s = 1.f;                  // their values
  int32_t z = 0;                  // lowbit's zero point (int8); the ONNX one is z + kUint8Offset
};

// Emits the integer graph, op by op. Each emit_* adds the nodes of one op and returns its output value.
class IntGraphEmitter {
 public:
  IntGraphEmitter(const IntModel& model, GraphBuilder& g) : model_(model), graph_(model.graph), g_(g) {}

  // The whole graph; returns the last op's output.
  QuantValue emit_all() {
    values_.reserve(graph_.ops.size());
    for (size_t i = 0; i < graph_.ops.size(); ++i) values_.push_back(emit(i));
    return values_.back();
  }

  int64_t inexact_scales() const { return inexact_scales_; }
  int64_t output_channels() const { return output_channels_; }
  int64_t inexact_avg_pools() const { return inexact_avg_pools_; }

 private:
  QuantValue emit(size_t i) {
    const rt::Op& op = graph_.ops[i];
    if (op.kind == rt::OpKind::Input) return emit_input(i);
    const QuantValue& x = values_[input_op(graph_, i)];
    switch (op.kind) {
      case rt::OpKind::Conv2d:
        return emit_conv2d(i, as_rank(x, 4, i));
      case rt::OpKind::Linear:
        return emit_linear(i, as_rank(x, 2, i));
      case rt::OpKind::MaxPool2d:
        return emit_max_pool2d(i, as_rank(x, 4, i));
      case rt::OpKind::AvgPool2d:
        return emit_avg_pool2d(i, as_rank(x, 4, i));
      case rt::OpKind::Flatten:
        return emit_flatten(i, x);
      case rt::OpKind::GlobalAvgPool2d:
        return emit_global_avg_pool2d(i, as_rank(x, 4, i));
      case rt::OpKind::Clamp:
        return clamp_output(i, same_qparams(x, x.name, x.rank));
      case rt::OpKind::Add:
        return emit_add(i, as_rank(x, 4, i), as_rank(values_[static_cast<size_t>(op.inputs[1])], 4, i));
      case rt::OpKind::Concat: {
        std::vector<QuantValue> parts;
        for (const int j : op.inputs) parts.push_back(as_rank(values_[static_cast<size_t>(j)], 4, i));
        return emit_concat(i, parts);
      }
      default:
        fail("export: op {} '{}' ({}) cannot be exported to ONNX", i, op.name, rt::to_string(op.kind));
    }
  }

  std::string node_name(size_t i) const { return fmt::format("op{}.{}", i, graph_.ops[i].name); }
  std::string value_name(size_t i) const { return fmt::format("op{}", i); }

  // A new value with its own scale and zero point constants.
  QuantValue new_value(size_t i, float s, int32_t z) {
    QuantValue v{value_name(i), 4, "", "", s, z};
    v.scale = g_.scalar(v.name + ".scale", s);
    v.zero_point = g_.scalar(v.name + ".zero_point", static_cast<uint8_t>(z + kUint8Offset));
    return v;
  }
  // The same codes under another name (a pool or a flatten keeps its input's scale and zero point).
  QuantValue same_qparams(const QuantValue& x, std::string name, int rank) {
    QuantValue v = x;
    v.name = std::move(name);
    v.rank = rank;
    return v;
  }

  // x with rank 4 ((N, F) → (N, F, 1, 1), lowbit's (F, 1, 1)) or rank 2 ((N, C, H, W) → (N, C·H·W), which is
  // lowbit's flatten): lowbit ops take either; ONNX's Conv and pools want 4 dimensions, Gemm 2.
  QuantValue as_rank(const QuantValue& x, int rank, size_t i) {
    if (x.rank == rank) return x;
    const std::string name = fmt::format("{}.input_rank{}", value_name(i), rank);
    if (rank == 2) {
      GraphBuilder::attribute(g_.node("Flatten", name, {x.name}, {name}), "axis", int64_t{1});
    } else {
      const std::string shape = g_.constant(name + ".shape", {4}, std::vector<int64_t>{0, -1, 1, 1});
      g_.node("Reshape", name, {x.name, shape}, {name});
    }
    return same_qparams(x, name, rank);
  }

  // The requantized output of a weighted op, clamped to [act_min, act_max] where that is tighter than the
  // saturation to 8 bits that QLinearConv and QGemm do anyway (a fused ReLU with z_out > −128, 4-bit codes).
  QuantValue clamp_output(size_t i, const QuantValue& y) {
    const rt::Requant& rq = graph_.ops[i].requant;
    if (rq.act_min == -128 && rq.act_max == 127) return y;
    const std::string name = graph_.ops[i].kind == rt::OpKind::Clamp ? value_name(i) : y.name + ".clamped";
    const std::string lo = g_.scalar(name + ".min", static_cast<uint8_t>(rq.act_min + kUint8Offset));
    const std::string hi = g_.scalar(name + ".max", static_cast<uint8_t>(rq.act_max + kUint8Offset));
    g_.node("Clip", node_name(i) + ".clamp", {y.name, lo, hi}, {name});
    return same_qparams(y, name, y.rank);
  }

  // The per-channel weight constants of a Conv2d or Linear (weight, its scale and zero point, bias) as ONNX
  // wants them for QLinearConv's (w, w_scale, w_zero_point, B) and QGemm's (B, b_scale, b_zero_point, C).
  std::vector<std::string> weight_constants(size_t i, const QuantValue& x, float s_out,
                                            const std::vector<int64_t>& dims) {
    const rt::Op& op = graph_.ops[i];
    const std::vector<float>& m = model_.op_requant_scales[i];
    std::vector<float> w_scale(m.size());
    for (size_t c = 0; c < m.size(); ++c) {
      const WeightScale s = weight_scale(x.s, m[c], s_out);
      w_scale[c] = s.scale;
      inexact_scales_ += s.exact ? 0 : 1;
      ++output_channels_;
    }
    const std::string p = value_name(i);
    return {g_.constant(p + ".weight", dims, unpacked_weight(op)),
            g_.constant(p + ".weight_scale", {op.out_channels}, w_scale),
            g_.constant(p + ".weight_zero_point", {op.out_channels},
                        std::vector<int8_t>(static_cast<size_t>(op.out_channels), 0)),
            g_.constant(p + ".bias", {op.out_channels}, op.bias)};
  }

  // The input codes, eq. 9: table[p] = clamp(round_half_away(x(p) / s) + z, qmin, qmax). QuantizeLinear computes
  // the same from x in float32, but rounds half to even: when no pixel value's x / s is a tie, the normalisation and
  // a QuantizeLinear give the table exactly, and ONNX Runtime runs them far faster than a Gather on 1-byte values
  // (docs/onnx.md, "The input"). Otherwise the table itself, as a Gather.
  QuantValue emit_input(size_t i) {
    QuantValue y = new_value(i, model_.input_scale, model_.input_zero_point);
    if (quantize_linear_gives_table()) {
      const std::string x = emit_normalize(g_, model_.norm);
      const QRange range = model_.input_range;
      const bool clamp = range.qmin != -128 || range.qmax != 127;  // 4-bit input codes
      const std::string codes = clamp ? y.name + ".unclamped" : y.name;
      g_.node("QuantizeLinear", node_name(i), {x, y.scale, y.zero_point}, {codes});
      if (clamp) {
        g_.node("Clip", node_name(i) + ".clamp",
                {codes, g_.scalar(y.name + ".min", static_cast<uint8_t>(range.qmin + kUint8Offset)),
                 g_.scalar(y.name + ".max", static_cast<uint8_t>(range.qmax + kUint8Offset))},
                {y.name});
      }
      return y;
    }
    std::vector<uint8_t> table;  // lowbit's int8 table + 128
    for (const int8_t code : graph_.ops[i].input_table) table.push_back(static_cast<uint8_t>(code + kUint8Offset));
    emit_input_table(g_, node_name(i), table, y.name);
    return y;
  }

  // True when QuantizeLinear's arithmetic (x / s rounded half to even, + z, saturated, then clamped) reproduces the
  // input table for all 256 pixel values.
  bool quantize_linear_gives_table() const {
    const float s = model_.input_scale;
    for (int p = 0; p < 256; ++p) {
      const float v = normalize_pixel(static_cast<uint8_t>(p), model_.norm) / s;
      if (v - std::floor(v) == 0.5f) return false;  // a tie: the two roundings may differ
      const float q = std::nearbyint(v) + static_cast<float>(model_.input_zero_point);  // half to even (default mode)
      const float code =
          std::clamp(q, static_cast<float>(model_.input_range.qmin), static_cast<float>(model_.input_range.qmax));
      if (static_cast<int>(code) != graph_.ops[0].input_table[static_cast<size_t>(p)]) return false;
    }
    return true;
  }

  // QLinearConv (x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B).
  QuantValue emit_conv2d(size_t i, const QuantValue& x) {
    const rt::Op& op = graph_.ops[i];
    const QuantValue y = new_value(i, model_.op_output_scales[i], op.requant.zero_point);
    const auto w = weight_constants(i, x, y.s, {op.out_channels, op.in_channels / op.groups, op.kernel, op.kernel});
    onnx::NodeProto& n =
        g_.node("QLinearConv", node_name(i),
                {x.name, x.scale, x.zero_point, w[0], w[1], w[2], y.scale, y.zero_point, w[3]}, {y.name});
    window_attributes(n, op.kernel, op.stride, op.padding);
    GraphBuilder::attribute(n, "group", op.groups);
    return clamp_output(i, y);
  }

  // com.microsoft QGemm (A, a_scale, a_zero_point, B, b_scale, b_zero_point, C, y_scale, y_zero_point) with
  // transB = 1: y = requantize(A · Bᵀ + C). ONNX's own QLinearMatMul has no bias input.
  QuantValue emit_linear(size_t i, const QuantValue& x) {
    const rt::Op& op = graph_.ops[i];
    QuantValue y = new_value(i, model_.op_output_scales[i], op.requant.zero_point);
    y.rank = 2;
    const auto w = weight_constants(i, x, y.s, {op.out_channels, op.in_channels});
    onnx::NodeProto& n =
        g_.node("QGemm", node_name(i), {x.name, x.scale, x.zero_point, w[0], w[1], w[2], w[3], y.scale, y.zero_point},
                {y.name}, kMicrosoftDomain);
    GraphBuilder::attribute(n, "transB", int64_t{1});
    return clamp_output(i, y);
  }

  // MaxPool on the uint8 codes: the maximum of codes is the code of the maximum (scale and zero point unchanged).
  QuantValue emit_max_pool2d(size_t i, const QuantValue& x) {
    const rt::Op& op = graph_.ops[i];
    window_attributes(g_.node("MaxPool", node_name(i), {x.name}, {value_name(i)}), op.kernel, op.stride, op.padding);
    return same_qparams(x, value_name(i), 4);
  }

  // com.microsoft QLinearAveragePool (x, x_scale, x_zero_point, y_scale, y_zero_point), count_include_pad = 1
  // (lowbit divides by K·K). Input and output share lowbit's scale and zero point, so only the ratio of the two
  // scales matters: x_scale = 1 keeps ONNX Runtime's float sum of (x − z) exact, and y_scale is
  // avg_pool_output_scale(K·K), which makes its rounding of the mean lowbit's.
  QuantValue emit_avg_pool2d(size_t i, const QuantValue& x) {
    const rt::Op& op = graph_.ops[i];
    const int64_t count = op.kernel * op.kernel;
    const float y_scale = avg_pool_output_scale(count);
    inexact_avg_pools_ += y_scale == 1.f && count % 2 == 0 ? 1 : 0;
    const std::string in_scale = g_.scalar(value_name(i) + ".x_scale", 1.f);
    const std::string out_scale = g_.scalar(value_name(i) + ".y_scale", y_scale);
    onnx::NodeProto& n =
        g_.node("QLinearAveragePool", node_name(i), {x.name, in_scale, x.zero_point, out_scale, x.zero_point},
                {value_name(i)}, kMicrosoftDomain);
    window_attributes(n, op.kernel, op.stride, op.padding);
    GraphBuilder::attribute(n, "count_include_pad", int64_t{1});
    return same_qparams(x, value_name(i), 4);
  }

  QuantValue emit_flatten(size_t i, const QuantValue& x) {
    GraphBuilder::attribute(g_.node("Flatten", node_name(i), {x.name}, {value_name(i)}), "axis", int64_t{1});
    return same_qparams(x, value_name(i), 2);
  }

  // com.microsoft QLinearAdd (A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point):
  // y = s_a/s_y·(a − z_a) + s_b/s_y·(b − z_b) + z_y, computed by ONNX Runtime in float32 and rounded half to even;
  // lowbit's eq. 10 rounds the same sum once, exactly, half away from zero. Then the clamp of a fused ReLU.
  QuantValue emit_add(size_t i, const QuantValue& a, const QuantValue& b) {
    const rt::Op& op = graph_.ops[i];
    const QuantValue y = new_value(i, model_.op_output_scales[i], op.requant.zero_point);
    g_.node("QLinearAdd", node_name(i),
            {a.name, a.scale, a.zero_point, b.name, b.scale, b.zero_point, y.scale, y.zero_point}, {y.name},
            kMicrosoftDomain);
    return clamp_output(i, y);
  }

  // com.microsoft QLinearConcat (Y_scale, Y_zero_point, then X, X_scale, X_zero_point of each input), axis 1:
  // each input requantized to y's scale and zero point (a copy where they are the same), joined along channels.
  QuantValue emit_concat(size_t i, const std::vector<QuantValue>& inputs) {
    const rt::Op& op = graph_.ops[i];
    const QuantValue y = new_value(i, model_.op_output_scales[i], op.requant.zero_point);
    std::vector<std::string> in{y.scale, y.zero_point};
    for (const QuantValue& x : inputs) in.insert(in.end(), {x.name, x.scale, x.zero_point});
    GraphBuilder::attribute(g_.node("QLinearConcat", node_name(i), in, {y.name}, kMicrosoftDomain), "axis", int64_t{1});
    return clamp_output(i, y);
  }

  // com.microsoft QLinearGlobalAveragePool (X, x_scale, x_zero_point, y_scale, y_zero_point): (N, C, H, W) →
  // (N, C, 1, 1), the mean of each channel, qparams kept: the average pool's scales (avg_pool_output_scale),
  // with the whole image as the window.
  QuantValue emit_global_avg_pool2d(size_t i, const QuantValue& x) {
    const rt::Shape& in = shapes_[input_op(graph_, i)];
    const int64_t count = in.h * in.w;
    const float y_scale = avg_pool_output_scale(count);
    inexact_avg_pools_ += y_scale == 1.f && count % 2 == 0 ? 1 : 0;
    const std::string in_scale = g_.scalar(value_name(i) + ".x_scale", 1.f);
    const std::string out_scale = g_.scalar(value_name(i) + ".y_scale", y_scale);
    GraphBuilder::attribute(
        g_.node("QLinearGlobalAveragePool", node_name(i), {x.name, in_scale, x.zero_point, out_scale, x.zero_point},
                {value_name(i)}, kMicrosoftDomain),
        "channels_last", int64_t{0});
    return same_qparams(x, value_name(i), 4);
  }

  const IntModel& model_;
  const rt::Graph& graph_;
  const std::vector<rt::Shape> shapes_ = rt::output_shapes(graph_);  // each op's output shape
  GraphBuilder& g_;
  std::vector<QuantValue> values_;  // values_[i]: op i's output
  int64_t inexact_scales_ = 0, output_channels_ = 0;
  int64_t inexact_avg_pools_ = 0;  // average pools with an even window larger than 8 × 8: ties round to even
};

// Every op kind is known, the graph is valid and every weighted op has its requantization scales: checked
// before anything is built.
void check_exportable(const IntModel& model) {
  const rt::Graph& graph = model.graph;
  if (model.op_output_scales.size() != graph.ops.size() || model.op_requant_scales.size() != graph.ops.size())
    fail("export: the model has {} ops but {} output scales and {} requantization scale lists", graph.ops.size(),
         model.op_output_scales.size(), model.op_requant_scales.size());
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    const rt::Op& op = graph.ops[i];
    switch (op.kind) {
      case rt::OpKind::Input:
      case rt::OpKind::MaxPool2d:
      case rt::OpKind::AvgPool2d:
      case rt::OpKind::Flatten:
      case rt::OpKind::GlobalAvgPool2d:
      case rt::OpKind::Clamp:
      case rt::OpKind::Add:
      case rt::OpKind::Concat:
        break;
      case rt::OpKind::Conv2d:
      case rt::OpKind::Linear:
        if (model.op_requant_scales[i].size() != static_cast<size_t>(op.out_channels))
          fail("export: op {} '{}' has {} requantization scales for {} output channels", i, op.name,
               model.op_requant_scales[i].size(), op.out_channels);
        break;
      default:
        fail("export: op {} '{}' ({}) cannot be exported to ONNX", i, op.name, rt::to_string(op.kind));
    }
  }
  rt::validate(graph);
}

// ---- the float model -----------------------------------------------------------------------------------------

// Emits one node of a float model: `x` are the ONNX names of its inputs, `y` the name of its output.
using FloatNodeEmitter =
    std::function<void(GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x, const std::string& y)>;

template <typename Layer>
const Layer& layer(const nn::Node& node) {
  const auto* l = dynamic_cast<const Layer*>(node.module.get());
  if (!l) fail("export: node '{}' is a {} but its module is not", node.name, node.kind);
  return *l;
}

std::string float_constant(GraphBuilder& g, const std::string& name, const Tensor& t) {
  return g.constant(name, t.shape(), t.values());
}

// One emitter per layer kind of nn/layers.h, by kind name.
const std::map<std::string, FloatNodeEmitter>& float_node_emitters() {
  static const std::map<std::string, FloatNodeEmitter> emitters = {
      {"Linear",
       [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x, const std::string& y) {
         const auto& l = layer<nn::Linear>(node);
         const std::string p = "layers." + node.name;
         std::vector<std::string> in{x[0], float_constant(g, p + ".weight", l.weight)};
         if (l.bias.defined()) in.push_back(float_constant(g, p + ".bias", l.bias));
         GraphBuilder::attribute(g.node("Gemm", node.name, in, {y}), "transB", int64_t{1});
       }},
      {"Conv2d",
       [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x, const std::string& y) {
         const auto& l = layer<nn::Conv2d>(node);
         const std::string p = "layers." + node.name;
         std::vector<std::string> in{x[0], float_constant(g, p + ".weight", l.weight)};
         if (l.bias.defined()) in.push_back(float_constant(g, p + ".bias", l.bias));
         onnx::NodeProto& n = g.node("Conv", node.name, in, {y});
         window_attributes(n, l.kernel, l.stride, l.padding);
         GraphBuilder::attribute(n, "group", l.groups);
       }},
      {"BatchNorm2d",
       [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x, const std::string& y) {
         const auto& l = layer<nn::BatchNorm2d>(node);
         const std::string p = "layers." + node.name;
         onnx::NodeProto& n =
             g.node("BatchNormalization", node.name,
                    {x[0], float_constant(g, p + ".weight", l.weight), float_constant(g, p + ".bias", l.bias),
                     float_constant(g, p + ".running_mean", l.running_mean),
                     float_constant(g, p + ".running_var", l.running_var)},
                    {y});
         GraphBuilder::attribute(n, "epsilon", l.eps);
       }},
      {"ReLU", [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x,
                  const std::string& y) { g.node("Relu", node.name, {x[0]}, {y}); }},
      {"ReLU6",
       [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x, const std::string& y) {
         const std::string p = "layers." + node.name;
         g.node("Clip", node.name, {x[0], g.scalar(p + ".min", 0.f), g.scalar(p + ".max", 6.f)}, {y});
       }},
      {"MaxPool2d",
       [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x, const std::string& y) {
         const auto& l = layer<nn::MaxPool2d>(node);
         window_attributes(g.node("MaxPool", node.name, {x[0]}, {y}), l.kernel, l.stride, 0);
       }},
      {"AvgPool2d",
       [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x, const std::string& y) {
         const auto& l = layer<nn::AvgPool2d>(node);
         window_attributes(g.node("AveragePool", node.name, {x[0]}, {y}), l.kernel, l.stride, 0);
       }},
      {"GlobalAvgPool2d", [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x,
                             const std::string& y) { g.node("GlobalAveragePool", node.name, {x[0]}, {y}); }},
      {"Flatten",
       [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x, const std::string& y) {
         GraphBuilder::attribute(g.node("Flatten", node.name, {x[0]}, {y}), "axis", int64_t{1});
       }},
      {"Dropout", [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x,
                     const std::string& y) { g.node("Identity", node.name, {x[0]}, {y}); }},  // eval mode
      {"Add",
       [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x, const std::string& y) {
         g.node("Add", node.name, {x[0], x[1]}, {y});
       }},
      {"Concat",
       [](GraphBuilder& g, const nn::Node& node, const std::vector<std::string>& x,
          const std::string& y) { GraphBuilder::attribute(g.node("Concat", node.name, x, {y}), "axis", int64_t{1}); }},
  };
  return emitters;
}

}  // namespace

// ---- the public functions ------------------------------------------------------------------------------------

OnnxExport export_onnx(const IntModel& model) {
  check_exportable(model);
  const rt::Graph& graph = model.graph;
  const int64_t classes = model.num_classes();
  onnx::ModelProto proto =
      new_model(model.model_name,
                fmt::format("lowbit integer model '{}' ({}), exported by `export --format onnx`. Input: uint8 pixels. "
                            "Activations are uint8 codes = lowbit's int8 codes + 128; weights are int8 (4-bit weights "
                            "unpacked). Outputs: logits (float32) and logit_codes (lowbit's int8 logits).",
                            model.model_name, model.mode),
                {{"lowbit.model", model.model_name},
                 {"lowbit.mode", model.mode},
                 {"lowbit.form", "QOperator, uint8 activations"}},
                /*microsoft_ops=*/true);
  GraphBuilder g(*proto.mutable_graph());
  g.input("image", onnx::TensorProto_DataType_UINT8, {graph.in_channels, graph.in_height, graph.in_width});

  IntGraphEmitter emitter(model, g);
  QuantValue last = emitter.emit_all();
  if (last.rank != 2) {  // the format ends with a Linear; flattened all the same if a graph ever ends otherwise
    GraphBuilder::attribute(g.node("Flatten", "logits.flatten", {last.name}, {"logits.codes"}), "axis", int64_t{1});
    last.name = "logits.codes";
  }
  // logits = output_scale · (code − z): DequantizeLinear computes exactly this in float32.
  g.node("DequantizeLinear", "logits", {last.name, g.scalar("logits.scale", model.output_scale), last.zero_point},
         {"logits"});
  // logit_codes: the uint8 codes − 128, lowbit's int8 logits (integer ops only: Cast, Sub, Cast).
  GraphBuilder::attribute(g.node("Cast", "logit_codes.widen", {last.name}, {"logit_codes.int32"}), "to",
                          static_cast<int64_t>(onnx::TensorProto_DataType_INT32));
  g.node("Sub", "logit_codes.offset", {"logit_codes.int32", g.scalar("logit_codes.offset", kUint8Offset)},
         {"logit_codes.signed"});
  GraphBuilder::attribute(g.node("Cast", "logit_codes", {"logit_codes.signed"}, {"logit_codes"}), "to",
                          static_cast<int64_t>(onnx::TensorProto_DataType_INT8));
  g.output("logits", onnx::TensorProto_DataType_FLOAT, {classes});
  g.output("logit_codes", onnx::TensorProto_DataType_INT8, {classes});

  OnnxExport result = finish(proto, g, fmt::format("integer model '{}'", model.model_name));
  result.inexact_scales = emitter.inexact_scales();
  result.output_channels = emitter.output_channels();
  result.inexact_avg_pools = emitter.inexact_avg_pools();
  return result;
}

OnnxExport export_onnx(const nn::Model& model, const Normalization& norm) {
  onnx::ModelProto proto =
      new_model(model.name,
                fmt::format("lowbit float model '{}', exported by `export --format onnx`. Input: uint8 pixels, "
                            "normalised as (p / 255 - {}) / {}. Output: logits (float32).",
                            model.name, norm.mean, norm.std),
                {{"lowbit.model", model.name}, {"lowbit.mode", "fp32"}}, /*microsoft_ops=*/false);
  GraphBuilder g(*proto.mutable_graph());
  const nn::Description& d = model.description;
  g.input("image", onnx::TensorProto_DataType_UINT8, {d.channels, d.height, d.width});
  emit_normalize(g, norm);

  const auto& emitters = float_node_emitters();
  for (size_t j = 0; j < model.nodes.size(); ++j) {
    const nn::Node& node = model.nodes[j];
    const auto emitter = emitters.find(node.kind);
    if (emitter == emitters.end())
      fail("export: node '{}' ({}) cannot be exported to ONNX (a layer kind this exporter does not know)", node.name,
           node.kind);
    std::vector<std::string> inputs;
    for (const int in : node.inputs)
      inputs.push_back(in < 0 ? "normalized" : "layers." + model.nodes[static_cast<size_t>(in)].name);
    const bool is_output = j + 1 == model.nodes.size();
    emitter->second(g, node, inputs, is_output ? "logits" : "layers." + node.name);
  }
  g.output("logits", onnx::TensorProto_DataType_FLOAT, {model.nodes.back().output_shape.back()});
  return finish(proto, g, fmt::format("float model '{}'", model.name));
}

void write_onnx(const OnnxExport& exported, const std::string& path) {
  const fs::path p(path);
  const fs::path folder = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  std::error_code ec;
  if (!fs::is_directory(folder, ec))
    fail("{}: the folder {} does not exist (create it first, e.g. mkdir -p {})", path, folder.string(),
         folder.string());
  if (fs::is_directory(p, ec)) fail("{}: is a folder; --out names the .onnx file to write", path);
  const std::string temporary = path + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    if (!out) fail("{}: cannot create the file (check that the folder is writable)", temporary);
    out.write(exported.bytes.data(), static_cast<std::streamsize>(exported.bytes.size()));
    out.flush();
    if (!out) {
      out.close();
      fs::remove(temporary, ec);
      fail("{}: cannot write the file (disk full?)", temporary);
    }
  }
  fs::rename(temporary, path, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(temporary, ignored);
    fail("{}: cannot rename {} to it: {}", path, temporary, ec.message());
  }
}

}  // namespace lowbit::quant
