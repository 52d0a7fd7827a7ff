// Sensitivity analysis and greedy mixed-precision selection.
#include "quant/analysis.h"

#include <algorithm>

#include "core/error.h"

namespace lowbit::quant {

std::vector<BlockInfo> quantized_blocks(const nn::Model& model) {
  std::vector<BlockInfo> out;
  for (size_t i = 0; i < model.layers->size(); ++i) {
    auto layer = model.layers->at(i);
    const std::string name = fmt::format("layers.{}", i);
    const int block = static_cast<int>(out.size());
    if (auto c = std::dynamic_pointer_cast<nn::Conv2d>(layer)) out.push_back({block, name, c->weight.numel(), c->out_channels});
    if (auto l = std::dynamic_pointer_cast<nn::Linear>(layer)) out.push_back({block, name, l->weight.numel(), l->out_features});
  }
  return out;
}

int64_t block_bytes(const BlockInfo& b, int bits) {
  const int64_t row = b.weights / b.channels;
  const int64_t weight_bytes = bits > 4 ? b.weights : b.channels * ((row + 1) / 2);
  return weight_bytes + 12 * b.channels;
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

}  // namespace lowbit::quant
