// prepare: turns a float model into its quantization-aware twin. Conv2d+BatchNorm2d(+ReLU) and
// Linear(+ReLU) are fused into one block each; fake-quant nodes sit on every weight and on every
// activation the integer graph will hold (the normalised network input included).
#pragma once

#include <map>
#include <memory>
#include <string>

#include "nn/checkpoint.h"
#include "nn/graph.h"
#include "quant/fake_quant.h"

namespace lowbit::quant {

struct QConfig {
  int weight_bits = 8;      // default width of every weight (2..8)
  int activation_bits = 8;  // default width of every activation after a block (2..8)
  int input_bits = 8;       // the network input
  ObserverKind activation_observer = ObserverKind::MovingAverage;
  bool learn_scale = false;  // LSQ on weights and activations
  // Per-block overrides, by the block's index among the quantized blocks (0 = first conv/linear).
  std::map<int, int> block_weight_bits;
  std::map<int, int> block_activation_bits;
  std::string mode_name() const;  // "int8", "w4a8", "w4a4" or "mixed"
};

// Parses "w8a8" / "w4a8" / "w4a4" (or any "wNaM") into weight and activation bits.
QConfig parse_bits(const std::string& text);

// Conv2d [+ BatchNorm2d] [+ ReLU] as one block. During QAT the BatchNorm is folded into the conv
// weight and bias with the running statistics *before* the weight is fake-quantized (eq. 8), so
// what is trained is exactly what convert() lowers. Until the BN statistics are frozen, each
// training step also runs the float conv once (without grad) to update them.
class QConvBlock : public nn::Module {
 public:
  QConvBlock(std::shared_ptr<nn::Conv2d> conv, std::shared_ptr<nn::BatchNorm2d> bn, bool relu,
             std::shared_ptr<FakeQuantize> input_fq, std::shared_ptr<FakeQuantize> weight_fq,
             std::shared_ptr<FakeQuantize> output_fq);
  Tensor forward(const Tensor& x) override;
  std::string describe() const override;
  int64_t macs(const Shape& in, const Shape& out) const override { return conv->macs(in, out); }

  // The conv weight and bias with the BatchNorm folded in (differentiable): eq. 8.
  std::pair<Tensor, Tensor> folded_weight_and_bias() const;

  std::shared_ptr<nn::Conv2d> conv;
  std::shared_ptr<nn::BatchNorm2d> bn;  // null when there is none
  bool relu;
  bool bn_frozen = false;
  std::shared_ptr<FakeQuantize> input_fq;  // the node that quantized this block's input (not owned as a child)
  std::shared_ptr<FakeQuantize> weight_fq, output_fq;
};

// Linear [+ ReLU] as one block.
class QLinearBlock : public nn::Module {
 public:
  QLinearBlock(std::shared_ptr<nn::Linear> linear, bool relu, std::shared_ptr<FakeQuantize> input_fq,
               std::shared_ptr<FakeQuantize> weight_fq, std::shared_ptr<FakeQuantize> output_fq);
  Tensor forward(const Tensor& x) override;
  std::string describe() const override;
  int64_t macs(const Shape& in, const Shape& out) const override { return linear->macs(in, out); }

  std::shared_ptr<nn::Linear> linear;
  bool relu;
  std::shared_ptr<FakeQuantize> input_fq;
  std::shared_ptr<FakeQuantize> weight_fq, output_fq;
};

// The bias of a quantized block, fake-quantized to its int32 code at scale s_in·s_w[c] (eq. 5),
// so the fake-quant model adds exactly what the integer graph adds.
Tensor fake_quantize_bias(const Tensor& bias, const FakeQuantize& input_fq, const FakeQuantize& weight_fq);

// Quantizes the normalised input (the first node of a prepared model).
class QuantInput : public nn::Module {
 public:
  explicit QuantInput(std::shared_ptr<FakeQuantize> fq);
  Tensor forward(const Tensor& x) override { return fq->forward(x); }
  std::string describe() const override { return "QuantInput"; }
  std::shared_ptr<FakeQuantize> fq;
};

// An average pool re-quantizes its output with its input's qparams (the integer op keeps them).
class QAvgPool : public nn::Module {
 public:
  QAvgPool(std::shared_ptr<nn::AvgPool2d> pool, std::shared_ptr<FakeQuantize> input_fq);
  Tensor forward(const Tensor& x) override;
  std::string describe() const override { return pool->describe(); }
  std::shared_ptr<nn::AvgPool2d> pool;
  std::shared_ptr<FakeQuantize> input_fq;
};

// A prepared model: a chain of blocks in `layers` (parameters "layers.1.conv.weight", ...), with the
// description of the float model it was prepared from, so that a QAT checkpoint rebuilds from its file.
class QatModel : public nn::Module {
 public:
  QatModel(nn::Description description, std::shared_ptr<nn::Sequential> layers, QConfig config);
  Tensor forward(const Tensor& x) override { return layers->forward(x); }
  std::string describe() const override { return name; }
  std::string name;
  nn::Description description;  // the float model's
  std::shared_ptr<nn::Sequential> layers;
  QConfig config;
  // Every fake-quant node, with a name for reports ("layers.1.weight_fq").
  std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>> fake_quant_nodes() const;
  void set_observing(bool on);   // observers watch (training mode only)
  void set_fake_quant(bool on);  // fake-quantize (off = the float model)
  void freeze_bn_stats();        // use, but stop updating, the BatchNorm running statistics
};

// Fuses and instruments a copy of `model` (the float model is left untouched). Throws for a
// layer order the integer graph cannot run (e.g. a ReLU not after Conv2d/BatchNorm/Linear), and for
// what it cannot quantize yet: a graph with branches (Add, Concat), grouped convolution, ReLU6,
// global average pooling (docs/design.md, "What quantizes today").
std::shared_ptr<QatModel> prepare_qat(const nn::Model& model, const QConfig& config);

// ---- the training state a QAT checkpoint carries besides parameters and buffers
//
// What a prepared model remembers between steps and is not a parameter or buffer, so that a QAT
// run resumes bit for bit (docs/model-file-format.md, "QAT state"):
//   qat_state.<node>.observer   (n,)  every fake-quant node's Observer::state(); absent while it has seen no data
//   qat_state.<node>.switches   (3,)  its observe and fake-quantize switches, and whether its observer has
//                                     seen data (then .observer is present): 1 = yes, 0 = no
//   qat_state.<block>.bn_frozen (1,)  every Conv2d block with a BatchNorm: 1 once its statistics are frozen
// (<node> as in fake_quant_nodes(), "layers.1.weight_fq"; <block> "layers.1").
inline constexpr const char* kQatStatePrefix = "qat_state.";
nn::NamedTensors qat_state(const QatModel& model);
// Puts the state back. Every tensor must be there (an observer's exactly when its switches say it
// has data) with a valid shape, and every "qat_state." tensor of the file must belong to the model.
void load_qat_state(QatModel& model, const nn::Checkpoint& checkpoint);
// True when the checkpoint carries any "qat_state." tensor (files written before it existed do not).
bool has_qat_state(const nn::Checkpoint& checkpoint);

// Post-training calibration: runs `batches` through the model in eval-like mode with observers on
// and fake-quant off, then switches fake-quant on. No weight changes.
class Calibrator {
 public:
  explicit Calibrator(QatModel& model);
  void observe(const Tensor& batch);
  void finish();

 private:
  QatModel& model_;
};

}  // namespace lowbit::quant
