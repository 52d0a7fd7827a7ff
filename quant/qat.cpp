// prepare_qat, the fused QAT blocks (BatchNorm folding, bias fake-quant) and calibration.
#include "quant/qat.h"

#include <cmath>
#include <regex>
#include <set>

#include "core/error.h"

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

QConvBlock::QConvBlock(std::shared_ptr<nn::Conv2d> conv_, std::shared_ptr<nn::BatchNorm2d> bn_, bool relu_,
                       std::shared_ptr<FakeQuantize> input_fq_, std::shared_ptr<FakeQuantize> weight_fq_,
                       std::shared_ptr<FakeQuantize> output_fq_)
    : conv(std::move(conv_)),
      bn(std::move(bn_)),
      relu(relu_),
      input_fq(std::move(input_fq_)),
      weight_fq(std::move(weight_fq_)),
      output_fq(std::move(output_fq_)) {
  register_module("conv", conv);
  if (bn) register_module("bn", bn);
  register_module("weight_fq", weight_fq);
  register_module("output_fq", output_fq);
}

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
    Tensor y = ops::conv2d(x, conv->weight, conv->bias, conv->stride, conv->padding);
    ops::batch_norm(y, bn->weight, bn->bias, bn->running_mean, bn->running_var, true, bn->momentum, bn->eps);
  }
  auto [w, b] = folded_weight_and_bias();
  Tensor y =
      ops::conv2d(x, weight_fq->forward(w), maybe_quantize_bias(b, *input_fq, *weight_fq), conv->stride, conv->padding);
  if (relu) y = ops::relu(y);
  return output_fq->forward(y);
}

std::string QConvBlock::describe() const {
  return fmt::format("Q[{}{}{}] w{} a{}", conv->describe(), bn ? " + BatchNorm2d" : "", relu ? " + ReLU" : "",
                     weight_fq->bits(), output_fq->bits());
}

QLinearBlock::QLinearBlock(std::shared_ptr<nn::Linear> linear_, bool relu_, std::shared_ptr<FakeQuantize> input_fq_,
                           std::shared_ptr<FakeQuantize> weight_fq_, std::shared_ptr<FakeQuantize> output_fq_)
    : linear(std::move(linear_)),
      relu(relu_),
      input_fq(std::move(input_fq_)),
      weight_fq(std::move(weight_fq_)),
      output_fq(std::move(output_fq_)) {
  register_module("linear", linear);
  register_module("weight_fq", weight_fq);
  register_module("output_fq", output_fq);
}

Tensor QLinearBlock::forward(const Tensor& x) {
  Tensor y = ops::matmul(x, weight_fq->forward(linear->weight), false, true);
  Tensor b = maybe_quantize_bias(linear->bias, *input_fq, *weight_fq);
  if (b.defined()) y = ops::add(y, b);
  if (relu) y = ops::relu(y);
  return output_fq->forward(y);
}

std::string QLinearBlock::describe() const {
  return fmt::format("Q[{}{}] w{} a{}", linear->describe(), relu ? " + ReLU" : "", weight_fq->bits(),
                     output_fq->bits());
}

QuantInput::QuantInput(std::shared_ptr<FakeQuantize> fq_) : fq(std::move(fq_)) { register_module("fq", fq); }

QAvgPool::QAvgPool(std::shared_ptr<nn::AvgPool2d> pool_, std::shared_ptr<FakeQuantize> input_fq_)
    : pool(std::move(pool_)), input_fq(std::move(input_fq_)) {}

Tensor QAvgPool::forward(const Tensor& x) {
  Tensor y = pool->forward(x);
  if (!input_fq->fake_quant_enabled) return y;
  return fake_quantize(y, {input_fq->qparams_per_tensor()}, input_fq->range());
}

// ---------------------------------------------------------------------------------------------
// QatModel

QatModel::QatModel(nn::Description description, std::shared_ptr<nn::Sequential> layers, QConfig config)
    : name(description.name),
      description(std::move(description)),
      layers(std::move(layers)),
      config(std::move(config)) {
  register_module("layers", this->layers);
}

std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>> QatModel::fake_quant_nodes() const {
  std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>> out;
  for (size_t i = 0; i < layers->size(); ++i) {
    const std::string prefix = fmt::format("layers.{}.", i);
    auto layer = layers->at(i);
    if (auto q = std::dynamic_pointer_cast<QuantInput>(layer)) out.emplace_back(prefix + "fq", q->fq);
    if (auto q = std::dynamic_pointer_cast<QConvBlock>(layer)) {
      out.emplace_back(prefix + "weight_fq", q->weight_fq);
      out.emplace_back(prefix + "output_fq", q->output_fq);
    }
    if (auto q = std::dynamic_pointer_cast<QLinearBlock>(layer)) {
      out.emplace_back(prefix + "weight_fq", q->weight_fq);
      out.emplace_back(prefix + "output_fq", q->output_fq);
    }
  }
  return out;
}

void QatModel::set_observing(bool on) {
  for (auto& [name, fq] : fake_quant_nodes()) fq->observe_enabled = on;
}

void QatModel::set_fake_quant(bool on) {
  for (auto& [name, fq] : fake_quant_nodes()) fq->fake_quant_enabled = on;
}

void QatModel::freeze_bn_stats() {
  for (size_t i = 0; i < layers->size(); ++i)
    if (auto q = std::dynamic_pointer_cast<QConvBlock>(layers->at(i))) q->bn_frozen = true;
}

// ---------------------------------------------------------------------------------------------
// the QAT state of a checkpoint

namespace {
// The Conv2d blocks with a BatchNorm, named "layers.<i>".
std::vector<std::pair<std::string, std::shared_ptr<QConvBlock>>> bn_blocks(const QatModel& model) {
  std::vector<std::pair<std::string, std::shared_ptr<QConvBlock>>> out;
  for (size_t i = 0; i < model.layers->size(); ++i)
    if (auto q = std::dynamic_pointer_cast<QConvBlock>(model.layers->at(i)); q && q->bn)
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
template <typename T>
std::shared_ptr<T> as(const nn::Sequential& seq, size_t i) {
  return i < seq.size() ? std::dynamic_pointer_cast<T>(seq.at(i)) : nullptr;
}

// Copies the values of every parameter and buffer of `from` into the same-named ones of `to`.
void copy_state(const nn::Module& from, nn::Module& to) {
  auto src = from.named_parameters(), dst = to.named_parameters();
  auto src_b = from.named_buffers(), dst_b = to.named_buffers();
  src.insert(src.end(), src_b.begin(), src_b.end());
  dst.insert(dst.end(), dst_b.begin(), dst_b.end());
  for (size_t i = 0; i < src.size(); ++i) dst[i].second.copy_from(src[i].second);
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
}  // namespace

std::shared_ptr<QatModel> prepare_qat(const nn::Model& model, const QConfig& config) {
  if (!model.is_chain())
    fail(
        "prepare: model '{}' is a graph with branches (Add or Concat); quantizing those is not supported yet, "
        "only chains of layers",
        model.name);
  const nn::Sequential& in = *model.layers;
  auto out = std::make_shared<nn::Sequential>();
  auto current = activation_fq(config, config.input_bits);  // quantizes the block input
  out->append(std::make_shared<QuantInput>(current));
  int block = 0;
  int blocks_total = 0;
  for (size_t i = 0; i < in.size(); ++i)
    if (as<nn::Conv2d>(in, i) || as<nn::Linear>(in, i)) ++blocks_total;

  for (size_t i = 0; i < in.size(); ++i) {
    const int w_bits = lookup(config.block_weight_bits, block, config.weight_bits);
    // The logits stay 8-bit: argmax over 16 levels would throw away the ranking.
    const int a_bits =
        block == blocks_total - 1 ? 8 : lookup(config.block_activation_bits, block, config.activation_bits);
    if (auto conv = as<nn::Conv2d>(in, i)) {
      if (conv->groups != 1)
        fail("prepare: node '{}' ({}) is a grouped convolution, which cannot be quantized yet", model.nodes[i].name,
             conv->describe());
      auto c = std::make_shared<nn::Conv2d>(conv->in_channels, conv->out_channels, conv->kernel, conv->stride,
                                            conv->padding, conv->bias.defined());
      copy_state(*conv, *c);
      std::shared_ptr<nn::BatchNorm2d> bn;
      if (auto b = as<nn::BatchNorm2d>(in, i + 1)) {
        bn = std::make_shared<nn::BatchNorm2d>(b->channels, b->eps, b->momentum);
        copy_state(*b, *bn);
        ++i;
      }
      const bool relu = as<nn::ReLU>(in, i + 1) != nullptr;
      if (relu) ++i;
      auto output = activation_fq(config, a_bits);
      out->append(
          std::make_shared<QConvBlock>(c, bn, relu, current, weight_fq(config, w_bits, c->out_channels), output));
      current = output;
      ++block;
    } else if (auto linear = as<nn::Linear>(in, i)) {
      auto l = std::make_shared<nn::Linear>(linear->in_features, linear->out_features, linear->bias.defined());
      copy_state(*linear, *l);
      const bool relu = as<nn::ReLU>(in, i + 1) != nullptr;
      if (relu) ++i;
      auto output = activation_fq(config, a_bits);
      out->append(std::make_shared<QLinearBlock>(l, relu, current, weight_fq(config, w_bits, l->out_features), output));
      current = output;
      ++block;
    } else if (auto pool = as<nn::MaxPool2d>(in, i)) {
      out->append(std::make_shared<nn::MaxPool2d>(pool->kernel, pool->stride));
    } else if (auto avg = as<nn::AvgPool2d>(in, i)) {
      out->append(std::make_shared<QAvgPool>(std::make_shared<nn::AvgPool2d>(avg->kernel, avg->stride), current));
    } else if (as<nn::Flatten>(in, i)) {
      out->append(std::make_shared<nn::Flatten>());
    } else if (auto drop = as<nn::Dropout>(in, i)) {
      out->append(std::make_shared<nn::Dropout>(drop->p));
    } else {
      fail(
          "prepare: node '{}' ({}) cannot be quantized here: a ReLU or BatchNorm2d must follow a Conv2d or Linear, "
          "and ReLU6, GlobalAvgPool2d, Add and Concat are not quantized yet",
          model.nodes[i].name, in[i].describe());
    }
  }
  auto qat = std::make_shared<QatModel>(model.description, out, config);
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
