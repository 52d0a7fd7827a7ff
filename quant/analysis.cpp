// Per-layer statistics, bit-width sweeps, sensitivity analysis and greedy mixed-precision selection.
#include "quant/analysis.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <optional>

#include "core/error.h"
#include "core/ops.h"

namespace lowbit::quant {

std::vector<BlockInfo> quantized_blocks(const nn::Model& model) {
  std::vector<BlockInfo> out;
  for (const nn::Node& node : model.nodes) {  // execution order: the order prepare_qat numbers blocks in
    const auto& layer = node.module;
    const std::string name = "layers." + node.name;
    const int block = static_cast<int>(out.size());
    if (auto c = std::dynamic_pointer_cast<nn::Conv2d>(layer))
      out.push_back({block, name, c->weight.numel(), c->out_channels});
    if (auto l = std::dynamic_pointer_cast<nn::Linear>(layer))
      out.push_back({block, name, l->weight.numel(), l->out_features});
  }
  return out;
}

int64_t block_bytes(const BlockInfo& b, int bits) {
  const int64_t row = b.weights / b.channels;
  const int64_t weight_bytes = bits > 4 ? b.weights : b.channels * ((row + 1) / 2);
  return weight_bytes + 8 * b.channels;  // F32 scale + I32 bias (docs/int-graph-format.md)
}

int64_t model_parameter_bytes(const nn::Model& model, const QConfig& config) {
  int64_t total = 0;
  for (const BlockInfo& b : quantized_blocks(model)) {
    auto it = config.block_weight_bits.find(b.block);
    total += block_bytes(b, it == config.block_weight_bits.end() ? config.weight_bits : it->second);
  }
  return total;
}

SensitivityReport layer_sensitivity(const nn::Model& model, const QConfig& base, int low_bits,
                                    const std::function<void(QatModel&)>& calibrate,
                                    const std::function<double(QatModel&)>& evaluate) {
  auto run = [&](const QConfig& config) {
    auto qat = prepare_qat(model, config);
    calibrate(*qat);
    return evaluate(*qat);
  };
  SensitivityReport report{run(base), {}};
  for (const BlockInfo& b : quantized_blocks(model)) {
    QConfig config = base;
    config.block_weight_bits[b.block] = low_bits;
    const double accuracy = run(config);
    report.blocks.push_back({b, accuracy, report.baseline_accuracy - accuracy});
  }
  return report;
}

QConfig choose_mixed_precision(const nn::Model& model, const QConfig& base, const SensitivityReport& report,
                               int64_t budget_bytes, int low_bits) {
  QConfig all_low = base;
  for (const BlockInfo& b : quantized_blocks(model)) all_low.block_weight_bits[b.block] = low_bits;
  const int64_t smallest = model_parameter_bytes(model, all_low);
  if (budget_bytes < smallest)
    fail("--mixed budget of {} bytes is below the {} bytes of every layer at {} bits (raise the budget)", budget_bytes,
         smallest, low_bits);
  // Cheapest accuracy per byte saved first.
  std::vector<Sensitivity> order = report.blocks;
  std::sort(order.begin(), order.end(), [&](const Sensitivity& a, const Sensitivity& b) {
    const double saved_a = static_cast<double>(block_bytes(a.block, base.weight_bits) - block_bytes(a.block, low_bits));
    const double saved_b = static_cast<double>(block_bytes(b.block, base.weight_bits) - block_bytes(b.block, low_bits));
    return std::max(a.drop, 0.0) / saved_a < std::max(b.drop, 0.0) / saved_b;
  });
  QConfig config = base;
  for (const Sensitivity& s : order) {
    if (model_parameter_bytes(model, config) <= budget_bytes) break;
    config.block_weight_bits[s.block.block] = low_bits;
  }
  return config;
}

// ---------------------------------------------------------------------------------------------
// per-layer ranges, histograms and SQNR

Histogram histogram_of(std::span<const float> values, float lo, float hi, int bins) {
  if (bins < 1) fail("histogram_of: {} bins (need at least 1)", bins);
  if (!(lo <= hi)) fail("histogram_of: empty range [{}, {}]", lo, hi);
  if (lo == hi) hi = lo + std::max(1e-6f, std::abs(lo) * 1e-6f);
  Histogram h{lo, hi, std::vector<int64_t>(static_cast<size_t>(bins), 0)};
  const float width = h.bin_width();
  for (float v : values) {
    const auto bin = static_cast<int64_t>(std::floor((v - lo) / width));
    ++h.counts[static_cast<size_t>(std::clamp<int64_t>(bin, 0, bins - 1))];
  }
  return h;
}

std::pair<float, float> clipping_range(QParams p, QRange range) {
  return {dequantize(range.qmin, p), dequantize(range.qmax, p)};
}

std::vector<float> fake_quantized_values(const Tensor& x, const std::vector<QParams>& params, QRange range) {
  // x is (OUT, ...) with one QParams per OUT row, or any shape with one QParams.
  const int64_t n = x.numel();
  const int64_t per = params.size() == 1 ? n : n / static_cast<int64_t>(params.size());
  if (params.empty() || (params.size() > 1 && (x.dim() == 0 || x.size(0) != static_cast<int64_t>(params.size()))))
    fail("fake_quantized_values: {} qparams for a tensor of shape {}", params.size(), shape_str(x.shape()));
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const QParams p = params[static_cast<size_t>(params.size() == 1 ? 0 : i / per)];
    out[static_cast<size_t>(i)] = dequantize(quantize(x.data()[i], p, range), p);
  }
  return out;
}

namespace {
// Per-channel symmetric qparams from each row's min and max (what PerChannelMinMaxObserver proposes).
std::vector<QParams> weight_qparams_at(const Tensor& w, int bits) {
  PerChannelMinMaxObserver observer(weight_range(bits), true);
  observer.observe(w);
  return observer.qparams();
}

std::vector<float> values_of(const Tensor& x) { return {x.data(), x.data() + x.numel()}; }

std::pair<float, float> min_max(std::span<const float> v) {
  if (v.empty()) return {0.f, 0.f};
  const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  return {*lo, *hi};
}

// The block's weight as it is quantized (BatchNorm folded in) and its fake-quant nodes.
struct BlockView {
  size_t node;  // in QatModel::nodes
  std::shared_ptr<nn::Module> module;
  Tensor weight;
  std::shared_ptr<FakeQuantize> weight_fq, output_fq;
};

std::optional<BlockView> block_view(size_t node, const std::shared_ptr<QNode>& layer) {
  if (auto c = std::dynamic_pointer_cast<QConvBlock>(layer)) {
    NoGradGuard no_grad;
    return BlockView{node, layer, c->folded_weight_and_bias().first.detach(), c->weight_fq, c->output_fq};
  }
  if (auto l = std::dynamic_pointer_cast<QLinearBlock>(layer))
    return BlockView{node, layer, l->linear->weight, l->weight_fq, l->output_fq};
  return std::nullopt;
}
}  // namespace

double weight_sqnr_db(const Tensor& w, int bits) {
  return sqnr_db(values_of(w), fake_quantized_values(w, weight_qparams_at(w, bits), weight_range(bits)));
}

std::vector<LayerStats> layer_stats(QatModel& model, const std::vector<Tensor>& batches, int bins) {
  if (batches.empty()) fail("layer_stats: no calibration batches (give at least one image)");
  const std::vector<BlockInfo> names = quantized_blocks(*nn::build_model(model.description));
  std::vector<LayerStats> stats;
  std::vector<BlockView> views;
  for (size_t i = 0; i < model.nodes.size(); ++i)
    if (auto v = block_view(i, model.nodes[i].module)) views.push_back(*v);
  if (views.size() != names.size())
    fail("layer_stats: model '{}' has {} quantized blocks, its float architecture {}", model.name, views.size(),
         names.size());

  // Weights.
  for (size_t b = 0; b < views.size(); ++b) {
    const BlockView& v = views[b];
    LayerStats s;
    s.layer = names[b].layer;
    s.description = v.module->describe();
    s.weight_bits = v.weight_fq->bits();
    s.activation_bits = v.output_fq->bits();
    s.weight_qparams = v.weight_fq->qparams();
    s.weight = v.weight;
    const std::vector<float> w = values_of(v.weight);
    s.weight_minmax = min_max(w);
    s.weight_clip = {0.f, 0.f};
    for (const QParams& p : s.weight_qparams) {
      const auto [lo, hi] = clipping_range(p, v.weight_fq->range());
      s.weight_clip = {std::min(s.weight_clip.first, lo), std::max(s.weight_clip.second, hi)};
    }
    s.weight_histogram = histogram_of(w, std::min(s.weight_minmax.first, s.weight_clip.first),
                                      std::max(s.weight_minmax.second, s.weight_clip.second), bins);
    s.weight_sqnr_db = sqnr_db(w, fake_quantized_values(v.weight, s.weight_qparams, v.weight_fq->range()));
    stats.push_back(s);
  }

  // Activations: every block's float output over all batches.
  NoGradGuard no_grad;
  model.eval();
  model.set_fake_quant(false);
  std::vector<std::vector<float>> outputs(views.size());
  try {
    for (const Tensor& batch : batches) {
      const std::vector<Tensor> all = model.forward_all(batch);
      for (size_t b = 0; b < views.size(); ++b) {
        const Tensor& x = all[views[b].node];
        outputs[b].insert(outputs[b].end(), x.data(), x.data() + x.numel());
      }
    }
  } catch (...) {
    model.set_fake_quant(true);
    throw;
  }
  model.set_fake_quant(true);
  for (size_t b = 0; b < views.size(); ++b) {
    LayerStats& s = stats[b];
    const QRange range = views[b].output_fq->range();
    s.activation_qparams = views[b].output_fq->qparams_per_tensor();
    s.activation_minmax = min_max(outputs[b]);
    s.activation_clip = clipping_range(s.activation_qparams, range);
    s.activation_histogram = histogram_of(outputs[b], std::min(s.activation_minmax.first, s.activation_clip.first),
                                          std::max(s.activation_minmax.second, s.activation_clip.second), bins);
    // SQNR, then the quantiles (sorting in place: the order no longer matters).
    std::vector<float>& x = outputs[b];
    std::vector<float> x_hat(x.size());
    const QParams p = s.activation_qparams;
    for (size_t i = 0; i < x.size(); ++i) x_hat[i] = dequantize(quantize(x[i], p, range), p);
    s.activation_sqnr_db = sqnr_db(x, x_hat);
    x_hat = {};
    std::sort(x.begin(), x.end());
    for (double q : kActivationQuantiles)
      s.activation_quantiles.push_back(x[static_cast<size_t>(q * static_cast<double>(x.size() - 1))]);
    x = {};
  }
  return stats;
}

std::shared_ptr<nn::Model> float_model_of(const QatModel& model) {
  auto out = nn::build_model(model.description);
  std::map<std::string, std::shared_ptr<nn::Module>> by_name;
  for (const nn::Node& node : out->nodes) by_name[node.name] = node.module;
  // Copies the trained float module of a prepared block into the float node it came from.
  const auto copy_into = [&](const std::string& name, const nn::Module& trained) {
    auto it = by_name.find(name);
    if (it == by_name.end())
      fail("float_model_of: '{}' has no node '{}' (the QAT model is not of it)", model.name, name);
    auto dst = it->second->named_parameters(), src = trained.named_parameters();
    auto dst_b = it->second->named_buffers(), src_b = trained.named_buffers();
    dst.insert(dst.end(), dst_b.begin(), dst_b.end());
    src.insert(src.end(), src_b.begin(), src_b.end());
    if (dst.size() != src.size())
      fail("float_model_of: node '{}' of '{}' does not match its QAT block", name, model.name);
    for (size_t k = 0; k < dst.size(); ++k) dst[k].second.copy_from(src[k].second);
  };
  for (const QatNode& node : model.nodes) {
    const auto& names = node.module->float_names;
    if (auto c = std::dynamic_pointer_cast<QConvBlock>(node.module)) {
      copy_into(names.at(0), *c->conv);
      if (c->bn) copy_into(names.at(1), *c->bn);
    }
    if (auto l = std::dynamic_pointer_cast<QLinearBlock>(node.module)) copy_into(names.at(0), *l->linear);
  }
  out->eval();
  return out;
}

// ---------------------------------------------------------------------------------------------
// accuracy against bit width

std::vector<BitWidthPoint> bit_width_sweep(const nn::Model& model, const QConfig& base,
                                           const std::vector<std::pair<int, int>>& pairs,
                                           const std::function<void(QatModel&)>& calibrate,
                                           const std::function<double(QatModel&)>& evaluate) {
  std::vector<BitWidthPoint> out;
  for (const auto& [w, a] : pairs) {
    QConfig config = base;
    config.weight_bits = w;
    config.activation_bits = a;
    config.block_weight_bits.clear();
    config.block_activation_bits.clear();
    auto qat = prepare_qat(model, config);
    calibrate(*qat);
    out.push_back({w, a, evaluate(*qat), model_parameter_bytes(model, config)});
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// every node of the integer graph

namespace {
// Counts values into a TensorQuantStats row: their min and max, and how many the clamp changes.
struct ClipCounter {
  QParams q;
  std::pair<int32_t, int32_t> codes;
  float lo = std::numeric_limits<float>::infinity(), hi = -std::numeric_limits<float>::infinity();
  int64_t clipped = 0, values = 0;
  void add(const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
      // The code before the clamp of eq. 1: q = round(x/s) + z (computed in double: no int32 overflow).
      const double code = std::round(static_cast<double>(x[i]) / q.scale) + q.zero_point;
      clipped += code < codes.first || code > codes.second;
    }
    values += n;
  }
};

// The real values of the codes [lo, hi]: s·(lo − z), s·(hi − z) (eq. 1).
std::pair<float, float> real_range(QParams q, std::pair<int32_t, int32_t> codes) {
  return {dequantize(codes.first, q), dequantize(codes.second, q)};
}

TensorQuantStats weight_quant_stats(const Tensor& w, const FakeQuantize& fq) {
  // w is (OUT, ...): one QParams and one clamp per output channel.
  TensorQuantStats s;
  s.bits = fq.bits();
  s.qparams = fq.qparams();
  s.codes = {fq.range().qmin, fq.range().qmax};
  const int64_t per = w.numel() / static_cast<int64_t>(s.qparams.size());
  int64_t clipped = 0;
  for (size_t c = 0; c < s.qparams.size(); ++c) {
    ClipCounter counter{s.qparams[c], s.codes};
    counter.add(w.data() + static_cast<int64_t>(c) * per, per);
    s.minmax.emplace_back(counter.lo, counter.hi);
    s.clamp.push_back(real_range(s.qparams[c], s.codes));
    clipped += counter.clipped;
  }
  s.values = w.numel();
  s.clipped_fraction = static_cast<double>(clipped) / static_cast<double>(std::max<int64_t>(1, s.values));
  return s;
}

// The activation a node's output codes are clamped to: a fused or standalone ReLU / ReLU6 raises the floor.
Activation output_activation(const QNode& node) {
  if (auto c = dynamic_cast<const QConvBlock*>(&node)) return c->activation;
  if (auto l = dynamic_cast<const QLinearBlock*>(&node)) return l->activation;
  if (auto j = dynamic_cast<const QJoin*>(&node)) return j->activation;
  if (auto k = dynamic_cast<const QKeepScale*>(&node)) {
    if (std::dynamic_pointer_cast<nn::ReLU6>(k->layer)) return Activation::ReLU6;
    if (std::dynamic_pointer_cast<nn::ReLU>(k->layer)) return Activation::ReLU;
  }
  return Activation::None;
}

bool lowered_to_nothing(const QNode& node) {  // Dropout: the identity at inference, no integer op
  auto p = dynamic_cast<const QPassThrough*>(&node);
  return p && std::dynamic_pointer_cast<nn::Dropout>(p->layer);
}
}  // namespace

std::vector<NodeStats> node_stats(QatModel& model, const std::vector<Tensor>& batches) {
  if (batches.empty()) fail("node_stats: no calibration batches (give at least one image)");
  std::vector<NodeStats> stats;
  std::vector<int> index_of(model.nodes.size(), -1);  // prepared node -> row of `stats` (a skipped node: its input's)
  std::vector<ClipCounter> counters;
  for (size_t i = 0; i < model.nodes.size(); ++i) {
    const QatNode& n = model.nodes[i];
    const QNode& node = *n.module;
    if (lowered_to_nothing(node)) {
      index_of[i] = n.inputs.at(0) < 0 ? -1 : index_of[static_cast<size_t>(n.inputs[0])];
      continue;
    }
    NodeStats s;
    s.node = static_cast<int>(i);
    s.name = node.float_nodes();
    s.kind = node.describe();
    for (int in : n.inputs) s.inputs.push_back(in < 0 ? -1 : index_of[static_cast<size_t>(in)]);
    if (auto c = dynamic_cast<const QConvBlock*>(&node)) {
      NoGradGuard no_grad;
      s.batchnorm_folded = c->bn != nullptr;
      s.weight = weight_quant_stats(c->folded_weight_and_bias().first.detach(), *c->weight_fq);
    }
    if (auto l = dynamic_cast<const QLinearBlock*>(&node))
      s.weight = weight_quant_stats(l->linear->weight, *l->weight_fq);
    const auto own = node.own_fake_quants();
    s.own_output_qparams =
        std::any_of(own.begin(), own.end(), [&](const auto& f) { return f.second == node.output_quant(); });
    const FakeQuantize& out = *node.output_quant();
    s.output.bits = out.bits();
    s.output.qparams = {out.qparams_per_tensor()};
    s.output.codes = activation_clamp(output_activation(node), s.output.qparams[0], out.range());
    s.output.clamp = {real_range(s.output.qparams[0], s.output.codes)};
    counters.push_back({s.output.qparams[0], s.output.codes});
    index_of[i] = static_cast<int>(stats.size());
    stats.push_back(std::move(s));
  }

  // Outputs: every node's float output (fake-quant off) over all batches, counted against its clamp.
  NoGradGuard no_grad;
  model.eval();
  model.set_fake_quant(false);
  try {
    for (const Tensor& batch : batches) {
      const std::vector<Tensor> all = model.forward_all(batch);
      for (size_t k = 0; k < stats.size(); ++k) {
        const Tensor& x = all[static_cast<size_t>(stats[k].node)];
        counters[k].add(x.data(), x.numel());
      }
    }
  } catch (...) {
    model.set_fake_quant(true);
    throw;
  }
  model.set_fake_quant(true);
  for (size_t k = 0; k < stats.size(); ++k) {
    TensorQuantStats& o = stats[k].output;
    o.minmax = {{counters[k].lo, counters[k].hi}};
    o.values = counters[k].values;
    o.clipped_fraction = static_cast<double>(counters[k].clipped) / static_cast<double>(std::max<int64_t>(1, o.values));
  }
  return stats;
}

}  // namespace lowbit::quant
