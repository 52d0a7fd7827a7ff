// Analysis of a quantized model: per-layer ranges, histograms and SQNR, accuracy against bit width,
// per-layer sensitivity to low bit widths, and the mixed-precision choice under a size budget.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "quant/observer.h"
#include "quant/qat.h"

namespace lowbit::quant {

// One quantized block (Conv2d or Linear, in order) of a float model.
struct BlockInfo {
  int block;          // index among the quantized blocks
  std::string layer;  // "layers.3"
  int64_t weights;    // weight count
  int64_t channels;   // output channels (one bias and one requantization scale each)
};
std::vector<BlockInfo> quantized_blocks(const nn::Model& model);

// Bytes the integer graph spends on a block's parameters at `bits`: the weight codes (int4 packed
// two per byte, rows byte-aligned) plus, per output channel, a float32 scale and at most an int32 bias
// (int graph v3 stores the bias as int16 when it fits: this is the upper bound).
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

// ---- per-layer ranges, histograms and SQNR (what the inspect report draws)

// Equal-width bins over [lo, hi] (lo < hi, widened by a hair when all values are equal); a value
// outside the range counts in the first or last bin.
Histogram histogram_of(std::span<const float> values, float lo, float hi, int bins);

// The real values the codes [qmin, qmax] stand for: [s·(qmin − z), s·(qmax − z)] (eq. 1), the
// clipping range a quantizer chose.
std::pair<float, float> clipping_range(QParams p, QRange range);

// x quantized and dequantized with one QParams per channel along axis 0 (one for the whole tensor
// when params.size() == 1): x̂ = s·(clamp(round(x/s) + z) − z) (eqs. 1, 7).
std::vector<float> fake_quantized_values(const Tensor& x, const std::vector<QParams>& params, QRange range);

// The SQNR of a weight tensor (OUT, ...) quantized symmetric per output channel at `bits`, as
// prepare_qat's weight observer would (min/max per channel, eq. 3, 4).
double weight_sqnr_db(const Tensor& w, int bits);

// What a quantized block holds, measured on calibration batches.
struct LayerStats {
  std::string layer;        // the float model's name, "layers.0"
  std::string description;  // "Q[Conv2d(1, 6, kernel=5, padding=2) + ReLU] w8 a8"
  int weight_bits = 8, activation_bits = 8;
  // Weights (BatchNorm folded in): their min and max, the clipping range the per-channel scales
  // cover (widest channel), the histogram, and the SQNR of the quantized weights.
  std::pair<float, float> weight_minmax, weight_clip;
  Histogram weight_histogram;
  double weight_sqnr_db = 0;
  std::vector<QParams> weight_qparams;  // one per output channel
  Tensor weight;                        // (OUT, ...) the float weight as it is quantized
  // The block's float output (after the fused ReLU) over all the batches layer_stats was given.
  std::pair<float, float> activation_minmax, activation_clip;
  Histogram activation_histogram;
  double activation_sqnr_db = 0;
  QParams activation_qparams;
  std::vector<float> activation_quantiles;  // the output values at kActivationQuantiles
};
// The fractions of the sorted block outputs LayerStats keeps a value of (the median ... the max).
inline constexpr double kActivationQuantiles[] = {0.5, 0.9, 0.99, 0.999, 1.0};

// For every quantized block of a calibrated (or QAT-trained) model: runs `batches` (normalised
// images) through the model with fake-quant switched off, so each block sees and produces float
// values, and measures them against the block's qparams. Leaves the model in eval mode with
// fake-quant on.
std::vector<LayerStats> layer_stats(QatModel& model, const std::vector<Tensor>& batches, int bins);

// ---- every node of the integer graph (the inspect report's node table and graph drawing)

// One quantized tensor of a node: its codes, the real range they stand for, and what the clamp cut off.
struct TensorQuantStats {
  int bits = 8;
  std::vector<QParams> qparams;             // one per output channel (weights) or one (activations)
  std::pair<int32_t, int32_t> codes{0, 0};  // the clamp [lo, hi] of the codes (a fused ReLU raises lo)
  // Real values of the clamp, s·(lo − z) and s·(hi − z) (eq. 1); for weights one pair per output channel.
  std::vector<std::pair<float, float>> clamp;
  // The values' own min and max; for weights one pair per output channel.
  std::vector<std::pair<float, float>> minmax;
  // The fraction of the values whose code round(x/s) + z falls outside the clamp, so that the clamp
  // changes them (values within half a step of the range only round, they are not counted).
  double clipped_fraction = 0;
  int64_t values = 0;  // how many values were counted
};

// A node of the prepared model that becomes an op of the integer graph (Dropout does not).
struct NodeStats {
  int node = 0;                   // index in QatModel::nodes
  std::string name;               // the integer op's name: the float nodes it stands for, "b1_conv2 + b1_bn2"
  std::string kind;               // QNode::describe(): "Q[Conv2d(16, 16, kernel=3, padding=1) + BatchNorm2d] w8 a8"
  std::vector<int> inputs;        // indices into the returned vector; -1 is the model's input
  bool batchnorm_folded = false;  // a Conv2d block with a BatchNorm2d (its weights are the folded ones)
  std::optional<TensorQuantStats> weight;  // Conv2d and Linear blocks
  TensorQuantStats output;                 // the codes the node writes (an op keeping its input's qparams: those)
  bool own_output_qparams = true;          // false for the ops that keep their input's qparams (pools, Flatten, clamps)
};

// For every node of a calibrated (or QAT-trained) model that the integer graph holds, in execution order:
// the weight and output qparams, clamps and clipped fractions, with the outputs measured in float
// (fake-quant off) on `batches`. Leaves the model in eval mode with fake-quant on.
std::vector<NodeStats> node_stats(QatModel& model, const std::vector<Tensor>& batches);

// The float model inside a QAT model: the same architecture with the trained Conv2d, BatchNorm2d
// and Linear parameters and buffers copied out (for PTQ sweeps of a QAT checkpoint).
std::shared_ptr<nn::Model> float_model_of(const QatModel& model);

// ---- accuracy against bit width (post-training quantization)

struct BitWidthPoint {
  int weight_bits, activation_bits;
  double accuracy;
  int64_t parameter_bytes;  // model_parameter_bytes at these weight bits
};

// PTQ at every (w, a) in `pairs`: prepare with base's observer, calibrate, evaluate.
std::vector<BitWidthPoint> bit_width_sweep(const nn::Model& model, const QConfig& base,
                                           const std::vector<std::pair<int, int>>& pairs,
                                           const std::function<void(QatModel&)>& calibrate,
                                           const std::function<double(QatModel&)>& evaluate);

}  // namespace lowbit::quant
