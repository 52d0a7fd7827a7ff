// Models are graphs of named nodes, defined by JSON descriptions: the format, the Model, the built-in models.
//
// A description (docs/model-description.md) gives the input (channels, height, width, each a number or
// "auto"), the number of classes (a number or "auto") and a list of nodes. Each node has a name, a kind
// (nn/kinds.h), its attributes and the names of its inputs ("input" is the image; the default is the node
// before it), and the model's output is the last node unless "output" names another. A chain is the
// special case where every node reads the one before it. The built-in models are description files in
// models/ (compiled into the library), and every checkpoint carries its model's description, so any file
// can be rebuilt without a name lookup.
#pragma once

#include <memory>
#include <string>
#include <typeinfo>
#include <vector>

#include "nn/kinds.h"
#include "nn/layers.h"

namespace lowbit::nn {

inline constexpr const char* kDescriptionFormat = "lowbit-model";
inline constexpr int kDescriptionVersion = 1;

struct NodeDescription {
  std::string name;                 // unique; letters, digits, '_' and '-'
  std::string kind;                 // a registered layer kind
  std::vector<std::string> inputs;  // node names or "input"
  nlohmann::json attributes;        // the node's other keys, as written
};

struct Description {
  std::string name;  // "lenet5", or what the file says
  // The input image and the classes; 0 stands for "auto" (taken from the data set).
  int64_t channels = 0, height = 0, width = 0, classes = 0;
  std::vector<NodeDescription> nodes;
  std::string output;  // the node whose output are the logits

  bool resolved() const { return channels > 0 && height > 0 && width > 0 && classes > 0; }
};

// Parses a description; `source` names it in messages (a path, or "built-in model 'lenet5'"). Checks the
// syntax only: kinds, attributes and shapes are checked when a model is built from it.
Description parse_description(const std::string& json_text, const std::string& source);
Description read_description(const std::string& path);
// The description as JSON, in the form parse_description reads (parse(print(d)) == d).
std::string description_to_json(const Description& description);

// The built-in models, in the order of docs/design.md: mlp, lenet5, convbn, resnet8, dsconv.
const std::vector<std::string>& model_names();
Description builtin_description(const std::string& name);
// A built-in name, or the path of a description file (anything ending in .json).
Description find_description(const std::string& name_or_path);

// Fills in what "auto" left open, from the data: the image's (C, H, W) and the number of classes. A value
// the description states must match the data's; throws naming both otherwise.
Description with_data_shape(Description description, int64_t channels, int64_t height, int64_t width, int64_t classes);

// One node of a built model, in execution (topological) order.
struct Node {
  std::string name, kind;
  std::vector<int> inputs;  // indices into Model::nodes; -1 is the model's input
  std::shared_ptr<Module> module;
  Shape output_shape;    // for one image, without the batch dimension
  int last_reader = -1;  // the last node that reads this one's output (Model::nodes.size() for the output)
};

// A classifier: a graph of nodes. The modules live in `layers` under their node names, so parameters are
// named "layers.<node>.weight" (the built-in chains name their nodes 0, 1, ... as PyTorch's Sequential).
class Model : public Module {
 public:
  // Builds and initialises (weights from global_rng()) the model of a resolved description. Checks every
  // node: its kind, attributes, inputs (no dangling or duplicate names, no cycle) and shapes; every node
  // must lead to the output. Throws one line naming the node and the problem.
  explicit Model(Description description);
  // In eval mode without a graph to record (NoGradGuard), a batch of more than inference_chunk() images runs
  // through the graph that many images at a time, each activation of a chunk at most about 1 MB (it stays in
  // the cache). In training mode the whole batch runs at once: a batch norm normalises by its statistics.
  Tensor forward(const Tensor& x) override;
  int64_t inference_chunk() const;
  std::string describe() const override { return name; }

  // True when each node reads only the node before it (the first reads the input): a plain chain.
  bool is_chain() const;
  Shape input_shape() const { return {description.channels, description.height, description.width}; }

  std::string name;
  Description description;  // resolved
  std::shared_ptr<Sequential> layers;
  std::vector<Node> nodes;
};

// True when node i + 1 of type Next reads node i's output, which no other node reads. Exact types only: a
// subclass (a QAT layer, say) may do more than its base.
template <typename Next, typename GraphNode>
bool only_next_reads(const std::vector<GraphNode>& nodes, size_t i) {
  if (i + 1 >= nodes.size() || nodes[i].last_reader != static_cast<int>(i + 1)) return false;
  const GraphNode& next = nodes[i + 1];
  const Module& module = *next.module;
  return next.inputs.size() == 1 && next.inputs[0] == static_cast<int>(i) && typeid(module) == typeid(Next);
}

// How many nodes from node i run_nodes runs as one op, and which:
//  - a BatchNorm2d or an Add whose output only the ReLU right after it reads: 2, ops::batch_norm_relu or
//    ops::add_relu (the same values and gradients, one pass over the activations less each way);
//  - with no gradient wanted, an eval-mode Conv2d whose output only the BatchNorm2d right after it reads: 2, or
//    3 with such a ReLU after that, ops::conv2d_batch_norm (the same values, one pass or two less);
//  - otherwise 1.
template <typename GraphNode>
size_t fused_nodes(const std::vector<GraphNode>& nodes, size_t i) {
  const Module& module = *nodes[i].module;
  if (typeid(module) == typeid(BatchNorm2d) || typeid(module) == typeid(Add))
    return only_next_reads<ReLU>(nodes, i) ? 2 : 1;
  if (typeid(module) != typeid(Conv2d) || grad_enabled() || !only_next_reads<BatchNorm2d>(nodes, i) ||
      nodes[i + 1].module->is_training())
    return 1;
  return only_next_reads<ReLU>(nodes, i + 1) ? 3 : 2;
}

// Node i and the `count` - 1 after it (fused_nodes) as one op on node i's inputs.
template <typename GraphNode>
Tensor run_fused(const std::vector<GraphNode>& nodes, size_t i, size_t count, std::span<const Tensor> in) {
  Module& first = *nodes[i].module;
  if (typeid(first) == typeid(Add)) return ops::add_relu(in[0], in[1]);
  const Tensor& x = in[0];
  if (typeid(first) == typeid(BatchNorm2d)) return static_cast<BatchNorm2d&>(first).forward_relu(x);
  const auto& conv = static_cast<const Conv2d&>(first);
  const auto& bn = static_cast<const BatchNorm2d&>(static_cast<const Module&>(*nodes[i + 1].module));
  return ops::conv2d_batch_norm(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.groups, bn.weight, bn.bias,
                                bn.running_mean, bn.running_var, bn.eps, count == 3);
}

// Runs graph nodes in order on the input x: node i gets the outputs of nodes[i].inputs (−1 is x). With keep_all
// false each output is freed after its last reader (Node::last_reader) and only the last node's output is kept,
// and the runs of fused_nodes go as one op (the outputs inside a run are then never formed); with keep_all true
// every node runs alone and every output is returned (for reports). Model and the prepared QatModel both run
// through this.
template <typename GraphNode>
std::vector<Tensor> run_nodes(const std::vector<GraphNode>& nodes, const Tensor& x, bool keep_all) {
  std::vector<Tensor> outputs(nodes.size());
  std::vector<Tensor> in;
  for (size_t i = 0; i < nodes.size(); ++i) {
    in.clear();
    for (int j : nodes[i].inputs) in.push_back(j < 0 ? x : outputs[static_cast<size_t>(j)]);
    const size_t count = keep_all ? 1 : fused_nodes(nodes, i);
    if (count > 1)
      outputs[i + count - 1] = run_fused(nodes, i, count, in);
    else
      outputs[i] = nodes[i].module->forward_inputs(in);
    if (keep_all) continue;
    for (int j : nodes[i].inputs)  // free what no later node reads
      if (j >= 0 && nodes[static_cast<size_t>(j)].last_reader == static_cast<int>(i))
        outputs[static_cast<size_t>(j)] = Tensor();
    i += count - 1;  // the fused nodes have run
  }
  return outputs;
}

// A freshly initialised model (weights from global_rng()). The built-in name form builds for 1×28×28
// images and 10 classes where the description says "auto".
std::shared_ptr<Model> build_model(const Description& description);
std::shared_ptr<Model> build_model(const std::string& builtin_name);

struct LayerSummary {
  std::string name;  // "layers.0"
  std::string description;
  std::vector<std::string> inputs;
  Shape output_shape;  // with a batch of 1
  int64_t parameters;
  int64_t macs;
};
// One entry per node, for one image; runs one forward pass without grad.
std::vector<LayerSummary> summarize(Model& model);
std::string format_summary(const std::vector<LayerSummary>& rows);

}  // namespace lowbit::nn
