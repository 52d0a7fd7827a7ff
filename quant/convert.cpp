// convert: BatchNorm folding, weight and bias codes, requantization multipliers, the input table.
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
      row_codes[static_cast<size_t>(k)] = static_cast<int8_t>(quantize(w.data()[c * row + k], params[static_cast<size_t>(c)], range));
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

// Fills the weight, bias and requantization fields shared by Conv2d and Linear (eqs. 5, 6); returns the
// requantization scales M[c] the file stores.
std::vector<float> lower_block(rt::Op& op, const Tensor& w, const Tensor& b, bool relu, QParams in,
                               const FakeQuantize& weight_fq, const FakeQuantize& output_fq, IntModel& model) {
  const int bits = weight_fq.bits();
  if (bits != 8 && bits > 4)
    fail("convert: {}-bit weights of {} have no integer kernel (the runtime runs 8- and 4-bit weights; 2..4 bits "
         "are stored as int4)", bits, op.name);
  const std::vector<QParams> w_params = weight_fq.qparams();
  const QParams out = output_fq.qparams_per_tensor();
  const QRange out_range = output_fq.range();
  op.weight_bits = bits == 8 ? 8 : 4;
  op.weight = weight_codes(w, w_params, bits);
  op.input_zero_point = in.zero_point;
  op.requant.zero_point = out.zero_point;
  op.requant.act_min = relu ? std::max(out_range.qmin, out.zero_point) : out_range.qmin;
  op.requant.act_max = out_range.qmax;
  // M[c] goes through the float32 the file stores and the function the loader uses (set_requant_from_scales),
  // so this graph and the same model saved and loaded are bit-identical.
  std::vector<float> scales;
  for (int64_t c = 0; c < op.out_channels; ++c) {
    const QParams wp = w_params[static_cast<size_t>(c)];
    op.bias.push_back(b.defined() ? quantize_bias(b.data()[c], in.scale, wp.scale) : 0);
    scales.push_back(requant_scale(in.scale, wp.scale, out.scale));
  }
  set_requant_from_scales(op, scales);
  model.op_output_scales.push_back(out.scale);
  return scales;
}

}  // namespace

IntModel convert(const QatModel& qat, const Normalization& norm, const Shape& input_chw) {
  NoGradGuard no_grad;
  if (input_chw.size() != 3) fail("convert: input shape must be (C, H, W), got {}", shape_str(input_chw));
  IntModel model;
  model.model_name = qat.name;
  model.mode = qat.config.mode_name();
  model.norm = norm;
  rt::Graph& graph = model.graph;
  graph.in_channels = input_chw[0];
  graph.in_height = input_chw[1];
  graph.in_width = input_chw[2];

  QParams current;  // qparams of the activation flowing between ops
  const nn::Sequential& layers = *qat.layers;
  for (size_t i = 0; i < layers.size(); ++i) {
    auto layer = layers.at(i);
    rt::Op op;
    op.name = fmt::format("layers.{}", i);
    std::vector<float> requant_scales;  // M[c] of a Conv2d / Linear; empty for the other ops
    if (auto q = std::dynamic_pointer_cast<QuantInput>(layer)) {
      // The float normalisation folded into a 256-entry table (the fake-quant input path, eq. 9).
      current = q->fq->qparams_per_tensor();
      op.kind = rt::OpKind::Input;
      model.input_scale = current.scale;
      model.input_zero_point = current.zero_point;
      model.input_range = q->fq->range();
      op.input_table = make_input_table(norm, current, model.input_range);
      model.op_output_scales.push_back(current.scale);
    } else if (auto q = std::dynamic_pointer_cast<QConvBlock>(layer)) {
      auto [w, b] = q->folded_weight_and_bias();
      op.kind = rt::OpKind::Conv2d;
      op.in_channels = q->conv->in_channels;
      op.out_channels = q->conv->out_channels;
      op.kernel = q->conv->kernel;
      op.stride = q->conv->stride;
      op.padding = q->conv->padding;
      requant_scales = lower_block(op, w, b, q->relu, current, *q->weight_fq, *q->output_fq, model);
      current = q->output_fq->qparams_per_tensor();
    } else if (auto q = std::dynamic_pointer_cast<QLinearBlock>(layer)) {
      op.kind = rt::OpKind::Linear;
      op.in_channels = q->linear->in_features;
      op.out_channels = q->linear->out_features;
      requant_scales = lower_block(op, q->linear->weight, q->linear->bias, q->relu, current, *q->weight_fq,
                                   *q->output_fq, model);
      current = q->output_fq->qparams_per_tensor();
    } else if (auto pool = std::dynamic_pointer_cast<nn::MaxPool2d>(layer)) {
      op.kind = rt::OpKind::MaxPool2d;
      op.kernel = pool->kernel;
      op.stride = pool->stride;
      op.input_zero_point = current.zero_point;
      op.requant.zero_point = current.zero_point;
      model.op_output_scales.push_back(current.scale);
    } else if (auto avg = std::dynamic_pointer_cast<QAvgPool>(layer)) {
      op.kind = rt::OpKind::AvgPool2d;
      op.kernel = avg->pool->kernel;
      op.stride = avg->pool->stride;
      op.input_zero_point = current.zero_point;
      op.requant.zero_point = current.zero_point;
      const QRange r = avg->input_fq->range();
      op.requant.act_min = r.qmin;
      op.requant.act_max = r.qmax;
      model.op_output_scales.push_back(current.scale);
    } else if (std::dynamic_pointer_cast<nn::Flatten>(layer)) {
      op.kind = rt::OpKind::Flatten;
      op.input_zero_point = current.zero_point;
      op.requant.zero_point = current.zero_point;
      model.op_output_scales.push_back(current.scale);
    } else if (std::dynamic_pointer_cast<nn::Dropout>(layer)) {
      continue;  // identity at inference
    } else {
      fail("convert: layer {} ({}) has no integer op (prepare the model with prepare_qat first)", op.name,
           layer->describe());
    }
    model.op_requant_scales.push_back(std::move(requant_scales));
    graph.ops.push_back(std::move(op));
  }
  model.output_scale = current.scale;
  try {
    rt::validate(graph);
  } catch (const rt::RuntimeError& e) {
    fail("convert: the integer graph is not valid: {}", e.what());
  }
  return model;
}

}  // namespace lowbit::quant
