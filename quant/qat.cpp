// prepare_qat, the fused QAT blocks (BatchNorm folding, bias fake-quant) and calibration.
#include "quant/qat.h"

#include <cmath>
#include <tuple>
#include <regex>
#include <set>

#include "core/error.h"
#include "quant/int_model.h"
#include "quant/runtime/kernels.h"

namespace lowbit::quant {

// ---------------------------------------------------------------------------------------------
// QConfig

std::string QConfig::mode_name() const {
  if (!block_weight_bits.empty() || !block_activation_bits.empty()) return "mixed";
  if (weight_bits == 8 && activation_bits == 8) return "int8";
  return fmt::format("w{}a{}", weight_bits, activation_bits);
}

QConfig parse_bits(const std::string& text) {
  std::smatch m;
  static const std::regex pattern("w([2-8])a([2-8])");
  if (!std::regex_match(text, m, pattern))
    fail("--bits '{}' is not of the form wNaM with N, M in 2..8 (for example w8a8, w4a8, w4a4)", text);
  QConfig config;
  config.weight_bits = std::stoi(m[1]);
  config.activation_bits = std::stoi(m[2]);
  return config;
}

// ---------------------------------------------------------------------------------------------
// fused blocks

Tensor fake_quantize_bias(const Tensor& bias, const FakeQuantize& input_fq, const FakeQuantize& weight_fq) {
  const float s_in = input_fq.qparams_per_tensor().scale;
  std::vector<QParams> params;
  for (const QParams& w : weight_fq.qparams()) params.push_back(bias_qparams(s_in, w.scale));
  return fake_quantize(bias, params, kBiasRange);
}

namespace {
// Fake-quantizes the bias only when both its scales are live (not during float calibration).
Tensor maybe_quantize_bias(const Tensor& b, const FakeQuantize& input_fq, const FakeQuantize& weight_fq) {
  if (!b.defined() || !input_fq.fake_quant_enabled || !weight_fq.fake_quant_enabled) return b;
  return fake_quantize_bias(b, input_fq, weight_fq);
}
}  // namespace

Tensor apply_activation(const Tensor& x, Activation activation) {
  switch (activation) {
    case Activation::None:
      return x;
    case Activation::ReLU:
      return ops::relu(x);
    case Activation::ReLU6:
      return ops::clamp(x, 0.f, 6.f);
  }
  return x;
}

const char* activation_name(Activation activation) {
  return activation == Activation::ReLU ? " + ReLU" : activation == Activation::ReLU6 ? " + ReLU6" : "";
}

std::pair<int32_t, int32_t> activation_clamp(Activation activation, QParams q, QRange range) {
  // quantize() never decreases, so quantize(clamp(x, 0, 6)) = clamp(quantize(x), quantize(0), quantize(6)).
  const int32_t lo = activation == Activation::None ? range.qmin : std::max(range.qmin, quantize(0.f, q, range));
  const int32_t hi = activation == Activation::ReLU6 ? quantize(6.f, q, range) : range.qmax;
  return {lo, hi};
}

std::string QNode::float_nodes() const {
  std::string out;
  for (const std::string& name : float_names) out += (out.empty() ? "" : " + ") + name;
  return out;
}

namespace {
using FakeQuants = std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>>;
}  // namespace

QuantInput::QuantInput(std::shared_ptr<FakeQuantize> fq_) : fq(std::move(fq_)) { register_module("fq", fq); }

FakeQuants QuantInput::own_fake_quants() const { return {{"fq", fq}}; }

QConvBlock::QConvBlock(std::shared_ptr<nn::Conv2d> conv_, std::shared_ptr<nn::BatchNorm2d> bn_, Activation activation_,
                       std::shared_ptr<FakeQuantize> input_fq_, std::shared_ptr<FakeQuantize> weight_fq_,
                       std::shared_ptr<FakeQuantize> output_fq_)
    : conv(std::move(conv_)),
      bn(std::move(bn_)),
      activation(activation_),
      input_fq(std::move(input_fq_)),
      weight_fq(std::move(weight_fq_)),
      output_fq(std::move(output_fq_)) {
  register_module("conv", conv);
  if (bn) register_module("bn", bn);
  register_module("weight_fq", weight_fq);
  register_module("output_fq", output_fq);
}

FakeQuants QConvBlock::own_fake_quants() const { return {{"weight_fq", weight_fq}, {"output_fq", output_fq}}; }

// eq. 8: with f[c] = gamma[c] / sqrt(running_var[c] + eps),
//   w_fold[c] = w[c] · f[c],   b_fold[c] = beta[c] + (b[c] − running_mean[c]) · f[c].
std::pair<Tensor, Tensor> QConvBlock::folded_weight_and_bias() const {
  if (!bn) return {conv->weight, conv->bias};
  const int64_t out = conv->out_channels;
  Tensor inv_std = Tensor::empty({out});
  for (int64_t c = 0; c < out; ++c) inv_std.data()[c] = 1.f / std::sqrt(bn->running_var.data()[c] + bn->eps);
  Tensor f = ops::mul(bn->weight, inv_std);
  Tensor w = ops::mul(conv->weight, ops::reshape(f, {out, 1, 1, 1}));
  Tensor shifted = conv->bias.defined() ? ops::sub(conv->bias, bn->running_mean) : ops::neg(bn->running_mean);
  Tensor b = ops::add(bn->bias, ops::mul(shifted, f));
  return {w, b};
}

Tensor QConvBlock::forward(const Tensor& x) {
  if (bn && is_training() && !bn_frozen) {  // keep the running statistics tracking the batches
    NoGradGuard no_grad;
    Tensor y = ops::conv2d(x, conv->weight, conv->bias, conv->stride, conv->padding, conv->groups);
    ops::batch_norm(y, bn->weight, bn->bias, bn->running_mean, bn->running_var, true, bn->momentum, bn->eps);
  }
  auto [w, b] = folded_weight_and_bias();
  Tensor y = ops::conv2d(x, weight_fq->forward(w), maybe_quantize_bias(b, *input_fq, *weight_fq), conv->stride,
                         conv->padding, conv->groups);
  return output_fq->forward(apply_activation(y, activation));
}

std::string QConvBlock::describe() const {
  return fmt::format("Q[{}{}{}] w{} a{}", conv->describe(), bn ? " + BatchNorm2d" : "", activation_name(activation),
                     weight_fq->bits(), output_fq->bits());
}

QLinearBlock::QLinearBlock(std::shared_ptr<nn::Linear> linear_, Activation activation_,
                           std::shared_ptr<FakeQuantize> input_fq_, std::shared_ptr<FakeQuantize> weight_fq_,
                           std::shared_ptr<FakeQuantize> output_fq_)
    : linear(std::move(linear_)),
      activation(activation_),
      input_fq(std::move(input_fq_)),
      weight_fq(std::move(weight_fq_)),
      output_fq(std::move(output_fq_)) {
  register_module("linear", linear);
  register_module("weight_fq", weight_fq);
  register_module("output_fq", output_fq);
}

FakeQuants QLinearBlock::own_fake_quants() const { return {{"weight_fq", weight_fq}, {"output_fq", output_fq}}; }

Tensor QLinearBlock::forward(const Tensor& x) {
  Tensor y = ops::matmul(x, weight_fq->forward(linear->weight), false, true);
  Tensor b = maybe_quantize_bias(linear->bias, *input_fq, *weight_fq);
  if (b.defined()) y = ops::add(y, b);
  return output_fq->forward(apply_activation(y, activation));
}

std::string QLinearBlock::describe() const {
  return fmt::format("Q[{}{}] w{} a{}", linear->describe(), activation_name(activation), weight_fq->bits(),
                     output_fq->bits());
}

QPassThrough::QPassThrough(std::shared_ptr<nn::Module> layer_, std::shared_ptr<FakeQuantize> input_fq_)
    : layer(std::move(layer_)), input_fq(std::move(input_fq_)) {
  register_module("layer", layer);  // (no parameters: registered so that train() / eval() reach a Dropout)
}

QKeepScale::QKeepScale(std::shared_ptr<nn::Module> layer_, std::shared_ptr<FakeQuantize> input_fq_)
    : layer(std::move(layer_)), input_fq(std::move(input_fq_)) {
  register_module("layer", layer);
}

namespace {
// The codes of a tensor that a fake-quant node with these qparams has quantized (exact: its values lie on the grid).
std::vector<int8_t> codes_of(const Tensor& x, QParams q, QRange range) {
  std::vector<int8_t> codes(static_cast<size_t>(x.numel()));
  for (size_t k = 0; k < codes.size(); ++k) codes[k] = static_cast<int8_t>(quantize(x.data()[k], q, range));
  return codes;
}

// y = the real values of codes (eq. 1).
void dequantize_into(std::span<const int8_t> codes, QParams q, Tensor& y) {
  for (size_t k = 0; k < codes.size(); ++k) y.data()[k] = dequantize(codes[k], q);
}
}  // namespace

Tensor QKeepScale::forward(const Tensor& x) {
  auto avg = std::dynamic_pointer_cast<nn::AvgPool2d>(layer);
  const bool pool = avg || std::dynamic_pointer_cast<nn::GlobalAvgPool2d>(layer);
  if (pool && !is_training() && input_fq->fake_quant_enabled && input_fq->calibrated()) {
    // Eval: the integer op itself on the input's codes (eq. 7, one rounding of the exact mean), so that the
    // fake-quant model rounds its ties as the integer graph does.
    NoGradGuard no_grad;
    const QParams q = input_fq->qparams_per_tensor();
    const std::vector<int8_t> codes = codes_of(x, q, input_fq->range());
    const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
    Tensor y = avg ? Tensor::empty({n, c, runtime::pooled_size(h, avg->kernel, avg->stride, 0),
                                    runtime::pooled_size(w, avg->kernel, avg->stride, 0)})
                   : Tensor::empty({n, c, 1, 1});
    std::vector<int8_t> out(static_cast<size_t>(y.numel()));
    if (avg) {
      runtime::avgpool2d(codes, q.zero_point, out, n, c, h, w, avg->kernel, avg->stride, 0);
    } else {
      runtime::global_avgpool(codes, q.zero_point, out, n, c, h * w, false);
    }
    dequantize_into(out, q, y);
    return y;
  }
  Tensor y = layer->forward(x);
  if (!input_fq->fake_quant_enabled) return y;
  return fake_quantize(y, {input_fq->qparams_per_tensor()}, input_fq->range());
}

QJoin::QJoin(Kind kind_, Activation activation_, std::shared_ptr<FakeQuantize> output_fq_)
    : kind(kind_), activation(activation_), output_fq(std::move(output_fq_)) {
  register_module("output_fq", output_fq);
}

FakeQuants QJoin::own_fake_quants() const { return {{"output_fq", output_fq}}; }

std::string QJoin::describe() const {
  return fmt::format("Q[{}{}] a{}", kind == Kind::Add ? "Add" : "Concat", activation_name(activation),
                     output_fq->bits());
}

Tensor QJoin::forward(const Tensor&) {
  fail("{} takes {} inputs; call it through its model graph", kind == Kind::Add ? "Add" : "Concat",
       kind == Kind::Add ? "two" : "two or more");
}

std::vector<float> QJoin::input_scales() const {
  const float s_out = output_fq->qparams_per_tensor().scale;
  std::vector<float> scales;
  for (const auto& in : input_quants) scales.push_back(rescale_scale(in->qparams_per_tensor().scale, s_out));
  return scales;
}

Tensor QJoin::forward_inputs(std::span<const Tensor> inputs) {
  bool integer = !is_training() && output_fq->fake_quant_enabled && output_fq->calibrated();
  for (const auto& in : input_quants) integer = integer && in->fake_quant_enabled && in->calibrated();
  if (!integer) {
    Tensor y = kind == Kind::Add ? ops::add(inputs[0], inputs[1]) : ops::concat(std::vector<Tensor>(inputs.begin(), inputs.end()), 1);
    return output_fq->forward(apply_activation(y, activation));
  }
  // The integer op on the inputs' codes (eq. 10), with the multipliers convert() will store.
  NoGradGuard no_grad;
  const QParams out = output_fq->qparams_per_tensor();
  const QRange out_range = output_fq->range();
  runtime::Requant rq;
  rq.zero_point = out.zero_point;
  std::tie(rq.act_min, rq.act_max) = activation_clamp(activation, out, out_range);
  runtime::Rescale rescale = rescale_from_scales(input_scales());
  std::vector<std::vector<int8_t>> codes;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const QParams q = input_quants[i]->qparams_per_tensor();
    rescale.zero_points.push_back(q.zero_point);
    codes.push_back(codes_of(inputs[i], q, input_quants[i]->range()));
  }
  Shape shape = inputs[0].shape();
  if (kind == Kind::Concat) {
    shape[1] = 0;
    for (const Tensor& x : inputs) shape[1] += x.size(1);
  }
  Tensor y = Tensor::empty(shape);
  std::vector<int8_t> result(static_cast<size_t>(y.numel()));
  if (kind == Kind::Add) {
    runtime::qadd(codes[0], codes[1], rescale, rq, result);
  } else {
    std::vector<std::span<const int8_t>> parts(codes.begin(), codes.end());
    std::vector<int64_t> channels;
    for (const Tensor& x : inputs) channels.push_back(x.size(1));
    const int64_t positions = shape.size() > 2 ? y.numel() / (shape[0] * shape[1]) : 1;
    runtime::qconcat(parts, channels, positions, shape[0], rescale, rq, result, false);
  }
  dequantize_into(result, out, y);
  return y;
}

// ---------------------------------------------------------------------------------------------
// QatModel

QatModel::QatModel(nn::Description description_, std::vector<QatNode> nodes_, QConfig config_)
    : name(description_.name),
      description(std::move(description_)),
      layers(std::make_shared<nn::Sequential>()),
      nodes(std::move(nodes_)),
      config(std::move(config_)) {
  register_module("layers", layers);
  for (const QatNode& node : nodes) layers->append(node.module);
}

std::vector<Tensor> QatModel::forward_all(const Tensor& x) { return nn::run_nodes(nodes, x, true); }

Tensor QatModel::forward(const Tensor& x) { return nn::run_nodes(nodes, x, false).back(); }

std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>> QatModel::fake_quant_nodes() const {
  std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>> out;
  for (size_t i = 0; i < nodes.size(); ++i)
    for (auto& [local, fq] : nodes[i].module->own_fake_quants())
      out.emplace_back(fmt::format("layers.{}.{}", i, local), fq);
  return out;
}

void QatModel::set_observing(bool on) {
  for (auto& [name, fq] : fake_quant_nodes()) fq->observe_enabled = on;
}

void QatModel::set_fake_quant(bool on) {
  for (auto& [name, fq] : fake_quant_nodes()) fq->fake_quant_enabled = on;
}

void QatModel::freeze_bn_stats() {
  for (const QatNode& node : nodes)
    if (auto q = std::dynamic_pointer_cast<QConvBlock>(node.module)) q->bn_frozen = true;
}

// ---------------------------------------------------------------------------------------------
// the QAT state of a checkpoint

namespace {
// The Conv2d blocks with a BatchNorm, named "layers.<i>".
std::vector<std::pair<std::string, std::shared_ptr<QConvBlock>>> bn_blocks(const QatModel& model) {
  std::vector<std::pair<std::string, std::shared_ptr<QConvBlock>>> out;
  for (size_t i = 0; i < model.nodes.size(); ++i)
    if (auto q = std::dynamic_pointer_cast<QConvBlock>(model.nodes[i].module); q && q->bn)
      out.emplace_back(fmt::format("layers.{}", i), q);
  return out;
}

float flag(bool on) { return on ? 1.f : 0.f; }

// A 0/1 value of a saved flag tensor; anything else means the file is corrupt.
bool flag_of(const nn::Checkpoint& checkpoint, const std::string& name, const Tensor& t, int64_t k) {
  const float v = t.data()[k];
  if (v != 0.f && v != 1.f)
    fail("{}: tensor '{}' holds {} at index {}, expected 0 or 1 (the checkpoint is corrupt)", checkpoint.path, name, v,
         k);
  return v == 1.f;
}

// A tensor of the QAT state with the expected shape.
Tensor state_tensor(const nn::Checkpoint& checkpoint, const std::string& name, const Shape& shape) {
  if (!checkpoint.has(name))
    fail(
        "{}: tensor '{}' is missing (a QAT checkpoint carries its observers' statistics and switches; "
        "the file is corrupt or of another model)",
        checkpoint.path, name);
  Tensor t = checkpoint.tensor(name);
  if (t.shape() != shape)
    fail("{}: tensor '{}' has shape {}, expected {} (the checkpoint is corrupt or of another model)", checkpoint.path,
         name, shape_str(t.shape()), shape_str(shape));
  return t;
}
}  // namespace

nn::NamedTensors qat_state(const QatModel& model) {
  nn::NamedTensors out;
  for (const auto& [name, fq] : model.fake_quant_nodes()) {
    const std::string prefix = kQatStatePrefix + name;
    const std::vector<float> observer = fq->observer_state();
    if (!observer.empty())
      out.emplace_back(prefix + ".observer", Tensor::from({static_cast<int64_t>(observer.size())}, observer));
    out.emplace_back(prefix + ".switches", Tensor::from({3}, {flag(fq->observe_enabled), flag(fq->fake_quant_enabled),
                                                              flag(!observer.empty())}));
  }
  for (const auto& [name, block] : bn_blocks(model))
    out.emplace_back(kQatStatePrefix + name + ".bn_frozen", Tensor::from({1}, {flag(block->bn_frozen)}));
  return out;
}

void load_qat_state(QatModel& model, const nn::Checkpoint& checkpoint) {
  std::set<std::string> known;
  for (const auto& [name, fq] : model.fake_quant_nodes()) {
    const std::string prefix = kQatStatePrefix + name;
    known.insert(prefix + ".switches");
    const Tensor switches = state_tensor(checkpoint, prefix + ".switches", {3});
    const bool observed = flag_of(checkpoint, prefix + ".switches", switches, 2);
    if (observed) {
      known.insert(prefix + ".observer");
      if (!checkpoint.has(prefix + ".observer"))
        fail("{}: tensor '{}' is missing although '{}' says the observer has seen data (the checkpoint is corrupt)",
             checkpoint.path, prefix + ".observer", prefix + ".switches");
      const Tensor state = checkpoint.tensor(prefix + ".observer");
      if (state.dim() != 1)
        fail("{}: tensor '{}' has shape {}, expected one dimension (the checkpoint is corrupt)", checkpoint.path,
             prefix + ".observer", shape_str(state.shape()));
      try {
        fq->load_observer_state({state.data(), state.data() + state.numel()});
      } catch (const Error& e) {
        fail("{}: tensor '{}': {}", checkpoint.path, prefix + ".observer", e.what());
      }
    } else {
      fq->load_observer_state({});
    }
    fq->observe_enabled = flag_of(checkpoint, prefix + ".switches", switches, 0);
    fq->fake_quant_enabled = flag_of(checkpoint, prefix + ".switches", switches, 1);
  }
  for (const auto& [name, block] : bn_blocks(model)) {
    const std::string tensor = kQatStatePrefix + name + ".bn_frozen";
    known.insert(tensor);
    block->bn_frozen = flag_of(checkpoint, tensor, state_tensor(checkpoint, tensor, {1}), 0);
  }
  for (const auto& [name, st] : checkpoint.file.tensors)
    if (name.starts_with(kQatStatePrefix) && !known.contains(name))
      fail("{}: tensor '{}' does not belong to this QAT model (the checkpoint is corrupt or of another model)",
           checkpoint.path, name);
}

bool has_qat_state(const nn::Checkpoint& checkpoint) {
  for (const auto& [name, st] : checkpoint.file.tensors)
    if (name.starts_with(kQatStatePrefix)) return true;
  return false;
}

// ---------------------------------------------------------------------------------------------
// prepare

namespace {
// Copies the values of every parameter and buffer of `from` into the same-named ones of `to`.
void copy_state(const nn::Module& from, nn::Module& to) {
  auto src = from.named_parameters(), dst = to.named_parameters();
  auto src_b = from.named_buffers(), dst_b = to.named_buffers();
  src.insert(src.end(), src_b.begin(), src_b.end());
  dst.insert(dst.end(), dst_b.begin(), dst_b.end());
  for (size_t i = 0; i < src.size(); ++i) dst[i].second.copy_from(src[i].second);
}

// A copy of a layer without parameters (the prepared model shares nothing with the float one).
std::shared_ptr<nn::Module> copy_layer(const nn::Module& layer) {
  if (auto m = dynamic_cast<const nn::MaxPool2d*>(&layer)) return std::make_shared<nn::MaxPool2d>(m->kernel, m->stride);
  if (auto m = dynamic_cast<const nn::AvgPool2d*>(&layer)) return std::make_shared<nn::AvgPool2d>(m->kernel, m->stride);
  if (auto m = dynamic_cast<const nn::Dropout*>(&layer)) return std::make_shared<nn::Dropout>(m->p);
  if (dynamic_cast<const nn::GlobalAvgPool2d*>(&layer)) return std::make_shared<nn::GlobalAvgPool2d>();
  if (dynamic_cast<const nn::Flatten*>(&layer)) return std::make_shared<nn::Flatten>();
  if (dynamic_cast<const nn::ReLU*>(&layer)) return std::make_shared<nn::ReLU>();
  if (dynamic_cast<const nn::ReLU6*>(&layer)) return std::make_shared<nn::ReLU6>();
  fail("prepare: cannot copy layer {} (internal error)", layer.describe());
}

std::shared_ptr<FakeQuantize> activation_fq(const QConfig& config, int bits) {
  return std::make_shared<FakeQuantize>(make_activation_observer(config.activation_observer, activation_range(bits)), 1,
                                        config.learn_scale);
}

std::shared_ptr<FakeQuantize> weight_fq(const QConfig& config, int bits, int64_t channels) {
  return std::make_shared<FakeQuantize>(std::make_unique<PerChannelMinMaxObserver>(weight_range(bits), true), channels,
                                        config.learn_scale);
}

int lookup(const std::map<int, int>& overrides, int block, int fallback) {
  auto it = overrides.find(block);
  return it == overrides.end() ? fallback : it->second;
}

// Walks the float graph in execution order and builds the prepared one. A Conv2d absorbs the BatchNorm2d
// that is its only reader, and a Conv2d (+ BN), Linear or Add the ReLU / ReLU6 that is its only reader.
class Preparer {
 public:
  Preparer(const nn::Model& model, const QConfig& config) : model_(model), config_(config) {
    readers_.resize(model.nodes.size());
    for (size_t i = 0; i < model.nodes.size(); ++i)
      for (int j : model.nodes[i].inputs)
        if (j >= 0) readers_[static_cast<size_t>(j)].push_back(static_cast<int>(i));
    produced_by_.assign(model.nodes.size(), -1);
  }

  std::vector<QatNode> run() {
    add(std::make_shared<QuantInput>(activation_fq(config_, config_.input_bits)), {-1}, {"input"});
    for (size_t i = 0; i < model_.nodes.size(); ++i)
      if (produced_by_[i] < 0) prepare_node(static_cast<int>(i));  // (fused nodes already have their producer)
    for (size_t i = 0; i < nodes_.size(); ++i)
      for (int j : nodes_[i].inputs)
        if (j >= 0) nodes_[static_cast<size_t>(j)].last_reader = static_cast<int>(i);
    nodes_.back().last_reader = static_cast<int>(nodes_.size());
    return std::move(nodes_);
  }

 private:
  const nn::Node& node(int i) const { return model_.nodes[static_cast<size_t>(i)]; }
  std::string where(int i) const {
    return fmt::format("prepare: node '{}' ({})", node(i).name, node(i).module->describe());
  }
  bool is_output(int i) const { return i == static_cast<int>(model_.nodes.size()) - 1; }

  // The node that is i's only reader, if it is of one of `kinds` (and so can be fused into i's block).
  int only_reader_of_kind(int i, std::initializer_list<std::string_view> kinds) const {
    const auto& r = readers_[static_cast<size_t>(i)];
    if (r.size() != 1 || is_output(i)) return -1;  // the output is read by the user too
    for (std::string_view kind : kinds)
      if (node(r[0]).kind == kind) return r[0];
    return -1;
  }

  // Fuses the ReLU / ReLU6 that is the only reader of the block's last node `fused.back()`.
  Activation fuse_activation(std::vector<int>& fused) {
    const int r = only_reader_of_kind(fused.back(), {"ReLU", "ReLU6"});
    if (r < 0) return Activation::None;
    fused.push_back(r);
    return node(r).kind == "ReLU" ? Activation::ReLU : Activation::ReLU6;
  }

  std::shared_ptr<FakeQuantize> quant_of(int prepared) const {
    return nodes_[static_cast<size_t>(prepared)].module->output_quant();
  }

  // Activation bits of a block whose output is float node `last`: the logits stay 8-bit (argmax over 16
  // levels would throw away the ranking).
  int activation_bits(int last, int block) const {
    return is_output(last) ? 8 : lookup(config_.block_activation_bits, block, config_.activation_bits);
  }

  int add(std::shared_ptr<QNode> module, std::vector<int> inputs, std::vector<std::string> float_names) {
    for (int j : inputs)
      if (j >= 0) module->input_quants.push_back(quant_of(j));
    module->float_names = std::move(float_names);
    nodes_.push_back({std::move(module), std::move(inputs), -1});
    return static_cast<int>(nodes_.size()) - 1;
  }

  void prepare_node(int i) {
    const nn::Node& n = node(i);
    std::vector<int> in;  // the prepared nodes whose outputs are this node's inputs
    for (int j : n.inputs) in.push_back(j < 0 ? 0 : produced_by_[static_cast<size_t>(j)]);
    const auto input_fq = quant_of(in.at(0));
    std::vector<int> fused{i};  // the float nodes this prepared node stands for, in order
    std::shared_ptr<QNode> q;
    if (auto conv = std::dynamic_pointer_cast<nn::Conv2d>(n.module)) {
      auto c = std::make_shared<nn::Conv2d>(conv->in_channels, conv->out_channels, conv->kernel, conv->stride,
                                            conv->padding, conv->bias.defined(), conv->groups);
      copy_state(*conv, *c);
      std::shared_ptr<nn::BatchNorm2d> bn;
      if (const int b = only_reader_of_kind(i, {"BatchNorm2d"}); b >= 0) {
        auto f = std::dynamic_pointer_cast<nn::BatchNorm2d>(node(b).module);
        bn = std::make_shared<nn::BatchNorm2d>(f->channels, f->eps, f->momentum);
        copy_state(*f, *bn);
        fused.push_back(b);
      }
      const Activation activation = fuse_activation(fused);
      const int w_bits = lookup(config_.block_weight_bits, block_, config_.weight_bits);
      q = std::make_shared<QConvBlock>(c, bn, activation, input_fq, weight_fq(config_, w_bits, c->out_channels),
                                       activation_fq(config_, activation_bits(fused.back(), block_)));
      ++block_;
    } else if (auto linear = std::dynamic_pointer_cast<nn::Linear>(n.module)) {
      auto l = std::make_shared<nn::Linear>(linear->in_features, linear->out_features, linear->bias.defined());
      copy_state(*linear, *l);
      const Activation activation = fuse_activation(fused);
      const int w_bits = lookup(config_.block_weight_bits, block_, config_.weight_bits);
      q = std::make_shared<QLinearBlock>(l, activation, input_fq, weight_fq(config_, w_bits, l->out_features),
                                         activation_fq(config_, activation_bits(fused.back(), block_)));
      ++block_;
    } else if (n.kind == "Add" || n.kind == "Concat") {
      const Activation activation = n.kind == "Add" ? fuse_activation(fused) : Activation::None;
      q = std::make_shared<QJoin>(n.kind == "Add" ? QJoin::Kind::Add : QJoin::Kind::Concat, activation,
                                  activation_fq(config_, activation_bits(fused.back(), -1)));
    } else if (n.kind == "MaxPool2d" || n.kind == "Flatten" || n.kind == "Dropout") {
      q = std::make_shared<QPassThrough>(copy_layer(*n.module), input_fq);
    } else if (n.kind == "AvgPool2d" || n.kind == "GlobalAvgPool2d" || n.kind == "ReLU" || n.kind == "ReLU6") {
      q = std::make_shared<QKeepScale>(copy_layer(*n.module), input_fq);
    } else if (n.kind == "BatchNorm2d") {
      fail("{}: a BatchNorm2d is quantized folded into a Conv2d, so it must read a Conv2d that nothing else reads",
           where(i));
    } else {
      fail("{}: layer kind '{}' has no quantized form (docs/design.md, \"What quantizes\")", where(i), n.kind);
    }
    std::vector<std::string> names;
    for (int k : fused) names.push_back(node(k).name);
    const int prepared = add(q, in, names);
    for (int k : fused) produced_by_[static_cast<size_t>(k)] = prepared;
  }

  const nn::Model& model_;
  const QConfig& config_;
  std::vector<std::vector<int>> readers_;
  std::vector<int> produced_by_;  // float node → the prepared node whose output is its value (−1: not yet)
  std::vector<QatNode> nodes_;
  int block_ = 0;  // weighted blocks so far
};
}  // namespace

std::shared_ptr<QatModel> prepare_qat(const nn::Model& model, const QConfig& config) {
  auto qat = std::make_shared<QatModel>(model.description, Preparer(model, config).run(), config);
  qat->train(model.is_training());
  return qat;
}

// ---------------------------------------------------------------------------------------------
// calibration (post-training quantization)

Calibrator::Calibrator(QatModel& model) : model_(model) {
  model_.eval();  // BatchNorm uses its running statistics, dropout is off
  model_.set_fake_quant(false);
  model_.set_observing(true);
  for (auto& [name, fq] : model_.fake_quant_nodes()) fq->train(true);  // only the observers run in training mode
}

void Calibrator::observe(const Tensor& batch) {
  NoGradGuard no_grad;
  model_.forward(batch);
}

void Calibrator::finish() {
  model_.eval();
  model_.set_observing(false);
  model_.set_fake_quant(true);
}

}  // namespace lowbit::quant
