// convert: each prepared node's lowering to its integer op (QNode::lower), and the walk that puts the ops
// together into the integer graph. Lowering only lowers: every number it writes was already used by the
// fake-quant model's eval-mode forward.
#include "quant/convert.h"

#include "core/error.h"
#include "quant/runtime/int4.h"

namespace lowbit::quant {

namespace {

namespace rt = runtime;

// Weight codes of one block (eq. 3), one row per output channel; int4 rows are packed.
std::vector<int8_t> weight_codes(const Tensor& w, const std::vector<QParams>& params, int bits) {
  const int64_t out = w.size(0), row = w.numel() / out;
  const QRange range = weight_range(bits);
  std::vector<int8_t> codes;
  for (int64_t c = 0; c < out; ++c) {
    std::vector<int8_t> row_codes(static_cast<size_t>(row));
    for (int64_t k = 0; k < row; ++k)
      row_codes[static_cast<size_t>(k)] =
          static_cast<int8_t>(quantize(w.data()[c * row + k], params[static_cast<size_t>(c)], range));
    if (bits == 8) {
      codes.insert(codes.end(), row_codes.begin(), row_codes.end());
    } else {
      std::vector<int8_t> packed(static_cast<size_t>((row + 1) / 2));
      rt::pack_int4(row_codes, packed);
      codes.insert(codes.end(), packed.begin(), packed.end());
    }
  }
  return codes;
}

// Fills the weight, bias and requantization fields shared by Conv2d and Linear (eqs. 5, 6), and the
// requantization scales M[c] the file stores.
void lower_weighted(LoweredOp& lowered, const Tensor& w, const Tensor& b, Activation activation,
                    const FakeQuantize& input_fq, const FakeQuantize& weight_fq, const FakeQuantize& output_fq) {
  rt::Op& op = lowered.op;
  const int bits = weight_fq.bits();
  if (bits != 8 && bits > 4)
    fail("{}-bit weights have no integer kernel (the runtime runs 8- and 4-bit weights; 2..4 bits are stored as "
         "int4)",
         bits);
  const QParams in = input_fq.qparams_per_tensor();
  const std::vector<QParams> w_params = weight_fq.qparams();
  const QParams out = output_fq.qparams_per_tensor();
  op.weight_bits = bits == 8 ? 8 : 4;
  op.weight = weight_codes(w, w_params, bits);
  op.input_zero_point = in.zero_point;
  op.requant.zero_point = out.zero_point;
  std::tie(op.requant.act_min, op.requant.act_max) = activation_clamp(activation, out, output_fq.range());
  // M[c] goes through the float32 the file stores and the function the loader uses (set_requant_from_scales),
  // so this graph and the same model saved and loaded are bit-identical.
  for (int64_t c = 0; c < op.out_channels; ++c) {
    const QParams wp = w_params[static_cast<size_t>(c)];
    op.bias.push_back(b.defined() ? quantize_bias(b.data()[c], in.scale, wp.scale) : 0);
    lowered.scales.push_back(requant_scale(in.scale, wp.scale, out.scale));
  }
  set_requant_from_scales(op, lowered.scales);
  lowered.output_scale = out.scale;
}

// An op that keeps its input's qparams (pools, Flatten, a clamp).
LoweredOp keep_scale_op(rt::OpKind kind, const FakeQuantize& input_fq) {
  LoweredOp lowered;
  const QParams q = input_fq.qparams_per_tensor();
  lowered.op.kind = kind;
  lowered.op.input_zero_point = q.zero_point;
  lowered.op.requant.zero_point = q.zero_point;
  lowered.output_scale = q.scale;
  return lowered;
}

}  // namespace

// ---- one lowering per node kind ---------------------------------------------------------------------

std::optional<LoweredOp> QuantInput::lower(const Normalization& norm) const {
  // The float normalisation folded into a 256-entry table (the fake-quant input path, eq. 9).
  LoweredOp lowered;
  const QParams q = fq->qparams_per_tensor();
  lowered.op.kind = rt::OpKind::Input;
  lowered.op.input_table = make_input_table(norm, q, fq->range());
  lowered.output_scale = q.scale;
  return lowered;
}

std::optional<LoweredOp> QConvBlock::lower(const Normalization&) const {
  LoweredOp lowered;
  rt::Op& op = lowered.op;
  op.kind = rt::OpKind::Conv2d;
  op.in_channels = conv->in_channels;
  op.out_channels = conv->out_channels;
  op.kernel = conv->kernel;
  op.stride = conv->stride;
  op.padding = conv->padding;
  op.groups = conv->groups;
  auto [w, b] = folded_weight_and_bias();
  lower_weighted(lowered, w, b, activation, *input_fq, *weight_fq, *output_fq);
  return lowered;
}

std::optional<LoweredOp> QLinearBlock::lower(const Normalization&) const {
  LoweredOp lowered;
  lowered.op.kind = rt::OpKind::Linear;
  lowered.op.in_channels = linear->in_features;
  lowered.op.out_channels = linear->out_features;
  lower_weighted(lowered, linear->weight, linear->bias, activation, *input_fq, *weight_fq, *output_fq);
  return lowered;
}

std::optional<LoweredOp> QPassThrough::lower(const Normalization&) const {
  if (auto pool = std::dynamic_pointer_cast<nn::MaxPool2d>(layer)) {
    LoweredOp lowered = keep_scale_op(rt::OpKind::MaxPool2d, *input_fq);
    lowered.op.kernel = pool->kernel;
    lowered.op.stride = pool->stride;
    return lowered;
  }
  if (std::dynamic_pointer_cast<nn::Flatten>(layer)) return keep_scale_op(rt::OpKind::Flatten, *input_fq);
  return std::nullopt;  // Dropout: the identity at inference
}

std::optional<LoweredOp> QKeepScale::lower(const Normalization&) const {
  if (auto pool = std::dynamic_pointer_cast<nn::AvgPool2d>(layer)) {
    LoweredOp lowered = keep_scale_op(rt::OpKind::AvgPool2d, *input_fq);
    lowered.op.kernel = pool->kernel;
    lowered.op.stride = pool->stride;
    std::tie(lowered.op.requant.act_min, lowered.op.requant.act_max) = std::pair{input_fq->range().qmin, input_fq->range().qmax};
    return lowered;
  }
  if (std::dynamic_pointer_cast<nn::GlobalAvgPool2d>(layer)) return keep_scale_op(rt::OpKind::GlobalAvgPool2d, *input_fq);
  // A standalone ReLU / ReLU6: clamp the codes to [quantize(0), quantize(6)].
  LoweredOp lowered = keep_scale_op(rt::OpKind::Clamp, *input_fq);
  const Activation a = std::dynamic_pointer_cast<nn::ReLU6>(layer) ? Activation::ReLU6 : Activation::ReLU;
  std::tie(lowered.op.requant.act_min, lowered.op.requant.act_max) =
      activation_clamp(a, input_fq->qparams_per_tensor(), input_fq->range());
  return lowered;
}

std::optional<LoweredOp> QJoin::lower(const Normalization&) const {
  LoweredOp lowered;
  rt::Op& op = lowered.op;
  op.kind = kind == Kind::Add ? rt::OpKind::Add : rt::OpKind::Concat;
  const QParams out = output_fq->qparams_per_tensor();
  op.requant.zero_point = out.zero_point;
  std::tie(op.requant.act_min, op.requant.act_max) = activation_clamp(activation, out, output_fq->range());
  lowered.scales = input_scales();
  op.rescale = rescale_from_scales(lowered.scales);
  for (const auto& in : input_quants) op.rescale.zero_points.push_back(in->qparams_per_tensor().zero_point);
  lowered.output_scale = out.scale;
  return lowered;
}

// ---- the walk ----------------------------------------------------------------------------------------

IntModel convert(const QatModel& qat, const Normalization& norm, const Shape& input_chw) {
  NoGradGuard no_grad;
  if (input_chw.size() != 3) fail("convert: input shape must be (C, H, W), got {}", shape_str(input_chw));
  IntModel model;
  model.model_name = qat.name;
  // The file names four modes; any other width pair (w3a6, ...) is "mixed" there, its ops say their widths.
  model.mode = qat.config.mode_name();
  if (model.mode != "int8" && model.mode != "w4a8" && model.mode != "w4a4") model.mode = "mixed";
  model.description = qat.description;
  model.norm = norm;
  rt::Graph& graph = model.graph;
  graph.in_channels = input_chw[0];
  graph.in_height = input_chw[1];
  graph.in_width = input_chw[2];

  std::vector<int> op_of(qat.nodes.size(), -1);  // prepared node → the integer op holding its output
  for (size_t i = 0; i < qat.nodes.size(); ++i) {
    const QatNode& node = qat.nodes[i];
    std::optional<LoweredOp> lowered;
    try {
      lowered = node.module->lower(norm);
    } catch (const Error& e) {
      fail("convert: node {} '{}': {}", i, node.module->float_nodes(), e.what());
    }
    if (!lowered) {  // the identity: readers read its input's op
      op_of[i] = op_of[static_cast<size_t>(node.inputs.at(0))];
      continue;
    }
    rt::Op& op = lowered->op;
    op.name = node.module->float_nodes();
    for (int j : node.inputs)
      if (j >= 0) op.inputs.push_back(op_of[static_cast<size_t>(j)]);
    if (op.kind == rt::OpKind::Input) {
      auto input = std::dynamic_pointer_cast<QuantInput>(node.module);
      model.input_scale = lowered->output_scale;
      model.input_zero_point = input->fq->qparams_per_tensor().zero_point;
      model.input_range = input->fq->range();
    }
    op_of[i] = static_cast<int>(graph.ops.size());
    model.op_output_scales.push_back(lowered->output_scale);
    model.op_requant_scales.push_back(std::move(lowered->scales));
    graph.ops.push_back(std::move(op));
  }
  model.output_scale = model.op_output_scales.back();
  try {
    rt::validate(graph);
  } catch (const rt::RuntimeError& e) {
    fail("convert: the integer graph is not valid: {}", e.what());
  }
  return model;
}

}  // namespace lowbit::quant
