// Per-layer sensitivity to low bit widths, and the mixed-precision choice under a size budget.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "quant/qat.h"

namespace lowbit::quant {

// One quantized block (Conv2d or Linear, in order) of a float model.
struct BlockInfo {
  int block;          // index among the quantized blocks
  std::string layer;  // "layers.3"
  int64_t weights;    // weight count
  int64_t channels;   // output channels (one bias, multiplier and shift each)
};
std::vector<BlockInfo> quantized_blocks(const nn::Model& model);

// Bytes the integer graph spends on a block's parameters at `bits`: the weight codes (int4 packed
// two per byte, rows byte-aligned) plus int32 bias, multiplier and shift per output channel.
int64_t block_bytes(const BlockInfo& block, int bits);
int64_t model_parameter_bytes(const nn::Model& model, const QConfig& config);

struct Sensitivity {
  BlockInfo block;
  double accuracy;  // with only this block's weights at low_bits
  double drop;      // baseline accuracy − accuracy
};

// For each block: prepare with only that block's weights at `low_bits`, calibrate, evaluate.
// `calibrate` and `evaluate` are supplied by the caller (data lives in the apps).
struct SensitivityReport {
  double baseline_accuracy;  // every block at base.weight_bits
  std::vector<Sensitivity> blocks;
};
SensitivityReport layer_sensitivity(const nn::Model& model, const QConfig& base, int low_bits,
                                    const std::function<void(QatModel&)>& calibrate,
                                    const std::function<double(QatModel&)>& evaluate);

// Greedy mixed precision: starting from `base`, lowers the blocks with the smallest accuracy drop
// per byte saved to `low_bits` until the parameters fit in `budget_bytes`.
// Throws when even every block at low_bits does not fit.
QConfig choose_mixed_precision(const nn::Model& model, const QConfig& base, const SensitivityReport& report,
                               int64_t budget_bytes, int low_bits);

}  // namespace lowbit::quant
