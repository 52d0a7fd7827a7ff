// Tiny valid models for the fuzzers: the seed files are written from them, the checkpoint target loads into one.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "nn/graph.h"
#include "nn/layers.h"
#include "core/normalize.h"
#include "quant/convert.h"
#include "quant/int_model.h"
#include "quant/qat.h"
#include "quant/runtime/int4.h"

namespace lowbit::fuzz {

// x is (N, 1, 4, 4): Conv2d(1, 2, 3, pad 1, no bias), BatchNorm2d(2), ReLU, Flatten, Linear(32, 3).
inline std::shared_ptr<nn::Model> tiny_float_model() {
  return nn::build_model(nn::parse_description(R"({"format": "lowbit-model", "version": 1, "name": "tiny",
    "input": {"channels": 1, "height": 4, "width": 4}, "classes": 3, "nodes": [
      {"name": "0", "kind": "Conv2d", "out_channels": 2, "kernel": 3, "padding": 1, "bias": false},
      {"name": "1", "kind": "BatchNorm2d"}, {"name": "2", "kind": "ReLU"}, {"name": "3", "kind": "Flatten"},
      {"name": "4", "kind": "Linear", "out_features": 3}]})",
                                               "tiny"));
}

// One Conv2d / Linear op with small weights, bias[c] = bias_step·c − 30, and requantization scales
// M[c] = 0.0625 + 0.01·c with the multipliers and shifts they give (validate() accepts it).
inline quant::runtime::Op tiny_weighted_op(quant::runtime::OpKind kind, std::string name, int bits, int64_t in,
                                           int64_t out, int64_t kernel, int64_t padding, int32_t z_in, int32_t z_out,
                                           int32_t act_min, int32_t bias_step, std::vector<float>& requant_scales) {
  namespace rt = quant::runtime;
  rt::Op op;
  op.kind = kind;
  op.name = std::move(name);
  op.weight_bits = bits;
  op.in_channels = in;
  op.out_channels = out;
  op.kernel = kernel;
  op.padding = padding;
  op.input_zero_point = z_in;
  const int64_t row = rt::weight_row_length(op);
  std::vector<int8_t> codes(static_cast<size_t>(out * row));
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<int8_t>(static_cast<int>(i * 5 % 11) - 5);
  if (bits == 8) {
    op.weight = codes;
  } else {  // packed row by row (int4.h)
    const size_t row_bytes = rt::int4_packed_size(static_cast<size_t>(row));
    op.weight.resize(static_cast<size_t>(out) * row_bytes);
    for (int64_t c = 0; c < out; ++c) {
      rt::pack_int4(std::span<const int8_t>(codes).subspan(c * row, row),
                    std::span<int8_t>(op.weight).subspan(c * row_bytes, row_bytes));
    }
  }
  requant_scales.clear();
  for (int64_t c = 0; c < out; ++c) {
    op.bias.push_back(static_cast<int32_t>(bias_step * c - 30));
    requant_scales.push_back(0.0625f + 0.01f * static_cast<float>(c));
  }
  quant::set_requant_from_scales(op, requant_scales);
  op.requant.zero_point = z_out;
  op.requant.act_min = act_min;
  op.requant.act_max = 127;
  return op;
}

// Input (1, 5, 5) → Conv2d 4-bit 1→2 k3 pad 1 + ReLU (rows of 9 codes: a padding nibble) → MaxPool2d 2
// → AvgPool2d 3 s1 pad 1 → Flatten (8) → Linear 8-bit 8→3: every op kind, both weight widths, both bias
// dtypes (the Conv2d's biases fit I16, the Linear's 39970 and 79970 need I32).
inline quant::IntModel tiny_int_model() {
  namespace rt = quant::runtime;
  quant::IntModel m;
  m.model_name = "tiny";
  m.mode = "mixed";
  m.norm = {0.25f, 0.5f};
  m.input_scale = 0.0156f;
  m.input_zero_point = -64;
  m.input_range = {-128, 127};
  m.output_scale = 0.25f;
  m.graph.in_channels = 1;
  m.graph.in_height = 5;
  m.graph.in_width = 5;
  rt::Op input;
  input.name = "input";
  input.input_table = quant::make_input_table(m.norm, {m.input_scale, m.input_zero_point}, m.input_range);
  m.graph.ops.push_back(input);
  m.op_requant_scales.resize(6);
  m.graph.ops.push_back(
      tiny_weighted_op(rt::OpKind::Conv2d, "features.0", 4, 1, 2, 3, 1, -64, -128, -128, 40, m.op_requant_scales[1]));
  rt::Op max_pool;
  max_pool.kind = rt::OpKind::MaxPool2d;
  max_pool.name = "features.2";
  max_pool.kernel = max_pool.stride = 2;
  m.graph.ops.push_back(max_pool);
  rt::Op avg_pool;
  avg_pool.kind = rt::OpKind::AvgPool2d;
  avg_pool.name = "features.3";
  avg_pool.kernel = 3;
  avg_pool.padding = 1;
  avg_pool.input_zero_point = -128;
  m.graph.ops.push_back(avg_pool);
  rt::Op flatten;
  flatten.kind = rt::OpKind::Flatten;
  flatten.name = "flatten";
  m.graph.ops.push_back(flatten);
  m.graph.ops.push_back(
      tiny_weighted_op(rt::OpKind::Linear, "classifier", 8, 8, 3, 1, 0, -128, 0, -128, 40000, m.op_requant_scales[5]));
  m.op_output_scales = {0.0156f, 0.05f, 0.05f, 0.05f, 0.05f, 0.25f};
  rt::chain_inputs(m.graph);
  return m;
}

// A graph with every op kind of format version 4 that tiny_int_model lacks: a residual Add, a depthwise
// conv, a Concat, a standalone ReLU6 (a clamp) and global average pooling; calibrated on fixed pixels.
inline quant::IntModel tiny_graph_int_model() {
  manual_seed(3);
  nn::Model model(nn::parse_description(R"({"format": "lowbit-model", "version": 1, "name": "tiny-graph",
    "input": {"channels": 1, "height": 4, "width": 4}, "classes": 3, "nodes": [
      {"name": "c1", "kind": "Conv2d", "out_channels": 2, "kernel": 3, "padding": 1}, {"name": "r", "kind": "ReLU"},
      {"name": "c2", "kind": "Conv2d", "out_channels": 2, "kernel": 3, "padding": 1},
      {"name": "add", "kind": "Add", "inputs": ["c2", "r"]},
      {"name": "dw", "kind": "Conv2d", "out_channels": 2, "kernel": 3, "padding": 1, "groups": 2, "inputs": ["r"]},
      {"name": "r6", "kind": "ReLU6"}, {"name": "cat", "kind": "Concat", "inputs": ["add", "r6"]},
      {"name": "gap", "kind": "GlobalAvgPool2d"}, {"name": "f", "kind": "Flatten"},
      {"name": "fc", "kind": "Linear", "out_features": 3}]})",
                                        "tiny-graph"));
  const Normalization norm{0.25f, 0.5f};
  auto qat = quant::prepare_qat(model, quant::parse_bits("w4a8"));
  quant::Calibrator calibrator(*qat);
  Tensor x = Tensor::empty({8, 1, 4, 4});
  for (int64_t i = 0; i < x.numel(); ++i) x.data()[i] = normalize_pixel(static_cast<uint8_t>(i * 37 % 256), norm);
  calibrator.observe(x);
  calibrator.finish();
  return quant::convert(*qat, norm, {1, 4, 4});
}

}  // namespace lowbit::fuzz
