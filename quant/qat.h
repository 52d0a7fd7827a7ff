// prepare: turns a float model into its quantization-aware twin. Conv2d+BatchNorm2d(+ReLU/ReLU6),
// Linear(+ReLU/ReLU6) and Add(+ReLU/ReLU6) are fused into one node each; fake-quant nodes sit on every
// weight and on every activation the integer graph will hold (the normalised network input included).
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "nn/checkpoint.h"
#include "nn/graph.h"
#include "core/normalize.h"
#include "quant/fake_quant.h"
#include "quant/runtime/graph.h"

namespace lowbit::quant {

struct QConfig {
  int weight_bits = 8;      // default width of every weight (2..8)
  int activation_bits = 8;  // default width of every activation after a block (2..8)
  int input_bits = 8;       // the network input
  ObserverKind activation_observer = ObserverKind::MovingAverage;
  bool learn_scale = false;  // LSQ on weights and activations
  // Per-block overrides, by the block's index among the weighted blocks in execution order (0 = first
  // conv/linear).
  std::map<int, int> block_weight_bits;
  std::map<int, int> block_activation_bits;
  std::string mode_name() const;  // "int8", "w4a8", "w4a4", any "wNaM", or "mixed" (per-block overrides)
};

// Parses "w8a8" / "w4a8" / "w4a4" (or any "wNaM") into weight and activation bits.
QConfig parse_bits(const std::string& text);

// ---- the nodes of a prepared model ----------------------------------------------------------------
//
// A prepared model is a graph like the float model it came from (nn/graph.h), with fused nodes: each node
// fake-quantizes what the integer graph will hold, so that its eval-mode forward computes what the integer
// op computes. One class per node kind, each with its forward here and its lowering to an integer op in
// quant/convert.cpp (QNode::lower).

// The activation a Conv2d, Linear or Add absorbs: in the integer graph it is the clamp of the requantization
// (act_min = max(qmin, z) for ReLU; also act_max = min(qmax, quantize(6)) for ReLU6).
enum class Activation { None, ReLU, ReLU6 };
Tensor apply_activation(const Tensor& x, Activation activation);
const char* activation_name(Activation activation);  // "", " + ReLU", " + ReLU6"
// The clamp [act_min, act_max] of codes with qparams q in `range` after `activation`.
std::pair<int32_t, int32_t> activation_clamp(Activation activation, QParams q, QRange range);

// What a node becomes in the integer graph (quant/convert.cpp). op.inputs is filled in by convert.
struct LoweredOp {
  runtime::Op op;
  float output_scale = 1.f;
  std::vector<float> scales;  // what the file stores: M[c] of a Conv2d / Linear, M[i] of an Add / Concat
};

class QNode : public nn::Module {
 public:
  // The fake-quant whose qparams this node's output codes have: its own, or its input's for the ops that
  // keep their input's qparams (pools, Flatten, a standalone ReLU).
  virtual std::shared_ptr<FakeQuantize> output_quant() const = 0;
  // The fake-quant nodes this node owns, with their local names ("weight_fq", "output_fq").
  virtual std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>> own_fake_quants() const { return {}; }
  // The integer op (quant/convert.cpp); nullopt for a node that is the identity at inference (Dropout).
  virtual std::optional<LoweredOp> lower(const Normalization& norm) const = 0;
  // The output_quant() of each input node, in order (set by prepare_qat).
  std::vector<std::shared_ptr<FakeQuantize>> input_quants;
  // The float model's nodes it stands for, in order: {"conv1", "bn1", "relu1"} ({"input"} for QuantInput).
  std::vector<std::string> float_names;
  std::string float_nodes() const;  // "conv1 + bn1 + relu1": the name of its integer op
};

// Quantizes the normalised input (the first node of a prepared model).
class QuantInput : public QNode {
 public:
  explicit QuantInput(std::shared_ptr<FakeQuantize> fq);
  Tensor forward(const Tensor& x) override { return fq->forward(x); }
  std::string describe() const override { return "QuantInput"; }
  std::shared_ptr<FakeQuantize> output_quant() const override { return fq; }
  std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>> own_fake_quants() const override;
  std::optional<LoweredOp> lower(const Normalization& norm) const override;
  std::shared_ptr<FakeQuantize> fq;
};

// Conv2d [+ BatchNorm2d] [+ ReLU / ReLU6] as one block (grouped and depthwise too). During QAT the BatchNorm
// is folded into the conv weight and bias with the running statistics *before* the weight is fake-quantized
// (eq. 8), so what is trained is exactly what convert() lowers. Until the BN statistics are frozen, each
// training step also runs the float conv once (without grad) to update them.
class QConvBlock : public QNode {
 public:
  QConvBlock(std::shared_ptr<nn::Conv2d> conv, std::shared_ptr<nn::BatchNorm2d> bn, Activation activation,
             std::shared_ptr<FakeQuantize> input_fq, std::shared_ptr<FakeQuantize> weight_fq,
             std::shared_ptr<FakeQuantize> output_fq);
  Tensor forward(const Tensor& x) override;
  std::string describe() const override;
  int64_t macs(const Shape& in, const Shape& out) const override { return conv->macs(in, out); }
  std::shared_ptr<FakeQuantize> output_quant() const override { return output_fq; }
  std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>> own_fake_quants() const override;
  std::optional<LoweredOp> lower(const Normalization& norm) const override;

  // The conv weight and bias with the BatchNorm folded in (differentiable): eq. 8.
  std::pair<Tensor, Tensor> folded_weight_and_bias() const;

  std::shared_ptr<nn::Conv2d> conv;
  std::shared_ptr<nn::BatchNorm2d> bn;  // null when there is none
  Activation activation;
  bool bn_frozen = false;
  std::shared_ptr<FakeQuantize> input_fq;  // the node that quantized this block's input (not owned as a child)
  std::shared_ptr<FakeQuantize> weight_fq, output_fq;
};

// Linear [+ ReLU / ReLU6] as one block.
class QLinearBlock : public QNode {
 public:
  QLinearBlock(std::shared_ptr<nn::Linear> linear, Activation activation, std::shared_ptr<FakeQuantize> input_fq,
               std::shared_ptr<FakeQuantize> weight_fq, std::shared_ptr<FakeQuantize> output_fq);
  Tensor forward(const Tensor& x) override;
  std::string describe() const override;
  int64_t macs(const Shape& in, const Shape& out) const override { return linear->macs(in, out); }
  std::shared_ptr<FakeQuantize> output_quant() const override { return output_fq; }
  std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>> own_fake_quants() const override;
  std::optional<LoweredOp> lower(const Normalization& norm) const override;

  std::shared_ptr<nn::Linear> linear;
  Activation activation;
  std::shared_ptr<FakeQuantize> input_fq;
  std::shared_ptr<FakeQuantize> weight_fq, output_fq;
};

// The bias of a quantized block, fake-quantized to its int32 code at scale s_in·s_w[c] (eq. 5),
// so the fake-quant model adds exactly what the integer graph adds.
Tensor fake_quantize_bias(const Tensor& bias, const FakeQuantize& input_fq, const FakeQuantize& weight_fq);

// A layer that passes its input's codes through unchanged in value: MaxPool2d, Flatten (and Dropout, the
// identity at inference). Its output has its input's qparams.
class QPassThrough : public QNode {
 public:
  QPassThrough(std::shared_ptr<nn::Module> layer, std::shared_ptr<FakeQuantize> input_fq);
  Tensor forward(const Tensor& x) override { return layer->forward(x); }
  std::string describe() const override { return layer->describe(); }
  std::shared_ptr<FakeQuantize> output_quant() const override { return input_fq; }
  std::optional<LoweredOp> lower(const Normalization& norm) const override;
  std::shared_ptr<nn::Module> layer;
  std::shared_ptr<FakeQuantize> input_fq;
};

// Ops that keep their input's qparams and re-quantize their output with them: AvgPool2d, GlobalAvgPool2d
// (the integer op rounds the mean, eq. 7), and a ReLU / ReLU6 that no op before it absorbed (a clamp).
class QKeepScale : public QNode {
 public:
  QKeepScale(std::shared_ptr<nn::Module> layer, std::shared_ptr<FakeQuantize> input_fq);
  Tensor forward(const Tensor& x) override;
  std::string describe() const override { return layer->describe(); }
  std::shared_ptr<FakeQuantize> output_quant() const override { return input_fq; }
  std::optional<LoweredOp> lower(const Normalization& norm) const override;
  std::shared_ptr<nn::Module> layer;
  std::shared_ptr<FakeQuantize> input_fq;
};

// Add [+ ReLU / ReLU6] and Concat: their inputs come with their own qparams, the output gets its own
// fake-quant. In eval mode with fake-quant on, the forward computes the integer op itself on the inputs'
// codes (eq. 10, the reference kernel), so the fake-quant model and the integer graph round alike; in
// training it is the float op then the output's fake-quant (straight-through).
class QJoin : public QNode {
 public:
  enum class Kind { Add, Concat };
  QJoin(Kind kind, Activation activation, std::shared_ptr<FakeQuantize> output_fq);
  Tensor forward(const Tensor& x) override;  // refuses: it takes several inputs
  Tensor forward_inputs(std::span<const Tensor> inputs) override;
  std::string describe() const override;
  std::shared_ptr<FakeQuantize> output_quant() const override { return output_fq; }
  std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>> own_fake_quants() const override;
  std::optional<LoweredOp> lower(const Normalization& norm) const override;
  // M[i] = s_i / s_out and their fixed-point form (eq. 10): what lower() stores and what forward() runs.
  std::vector<float> input_scales() const;

  Kind kind;
  Activation activation;
  std::shared_ptr<FakeQuantize> output_fq;
};

// One node of a prepared model, in execution order.
struct QatNode {
  std::shared_ptr<QNode> module;
  std::vector<int> inputs;  // indices into QatModel::nodes; -1 is the model's input (the QuantInput node reads it)
  int last_reader = -1;     // the last node that reads this one's output
};

// A prepared model: a graph of nodes whose modules live in `layers` named by position ("layers.1.conv.weight",
// the QuantInput is "layers.0"), with the description of the float model it was prepared from, so that a QAT
// checkpoint rebuilds from its file.
class QatModel : public nn::Module {
 public:
  QatModel(nn::Description description, std::vector<QatNode> nodes, QConfig config);
  Tensor forward(const Tensor& x) override;
  std::string describe() const override { return name; }
  std::string name;
  nn::Description description;  // the float model's
  std::shared_ptr<nn::Sequential> layers;
  std::vector<QatNode> nodes;
  QConfig config;
  // The outputs of every node for x (eval or training as set), for reports.
  std::vector<Tensor> forward_all(const Tensor& x);
  // Every fake-quant node, with a name for reports ("layers.1.weight_fq").
  std::vector<std::pair<std::string, std::shared_ptr<FakeQuantize>>> fake_quant_nodes() const;
  void set_observing(bool on);   // observers watch (training mode only)
  void set_fake_quant(bool on);  // fake-quantize (off = the float model)
  void freeze_bn_stats();        // use, but stop updating, the BatchNorm running statistics
};

// Fuses and instruments a copy of `model` (the float model is left untouched): Conv2d + BatchNorm2d
// (+ ReLU / ReLU6), Linear (+ ReLU / ReLU6) and Add (+ ReLU / ReLU6) become one node each where the fused
// outputs have no other reader. Throws one line naming the node for what the integer graph cannot run
// (a BatchNorm2d not after a Conv2d, weights of more than 8 bits).
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
