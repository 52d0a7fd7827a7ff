// Layer kinds: how a node of a model description becomes a module. One registration per kind.
//
// A model description (nn/graph.h) names each node's kind ("Conv2d") and gives its attributes
// ("out_channels": 16). The kind's registration says how many inputs it takes and builds the module
// from the attributes and the shapes of its inputs, which is where sizes written "auto" (a Conv2d's
// in_channels, a Linear's in_features) come from. The built-in kinds register themselves next to
// their classes in nn/layers.cpp; a library user adds one with register_layer_kind (see
// docs/examples/custom_layer.cpp).
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "nn/module.h"

namespace lowbit::nn {

// A node's attributes, read by its kind's build function. Every read checks the type and names the
// node in its error; finish() refuses attributes that no read asked for (a misspelt "kernal").
class Attributes {
 public:
  // `node` is the node's JSON object; "name", "kind" and "inputs" are not attributes.
  Attributes(const nlohmann::json& node, std::string where);

  int64_t integer(const std::string& key);                       // required, an integer >= 0
  int64_t integer_or(const std::string& key, int64_t fallback);  // optional
  double number_or(const std::string& key, double fallback);     // optional, any finite number
  bool boolean_or(const std::string& key, bool fallback);        // optional
  // A size that follows from the input's shape: missing or "auto" gives `inferred`; a number must equal it.
  int64_t inferred(const std::string& key, int64_t inferred);
  // A number of outputs: an integer, or "classes" for the model's number of classes.
  int64_t features(const std::string& key, int64_t classes);

  // Throws for an attribute that was never read. Call it once the module is built.
  void finish(const std::string& known) const;
  const std::string& where() const { return where_; }  // "node 'conv1' (Conv2d)", for messages

 private:
  const nlohmann::json& value(const std::string& key) const;
  nlohmann::json node_;
  std::string where_;
  std::set<std::string> read_;
};

// What a kind's build function knows: each input's shape for one image, without the batch
// dimension ((C, H, W) or (FEATURES)), and the model's number of classes.
struct LayerContext {
  std::vector<Shape> inputs;
  int64_t classes = 0;
};

struct LayerKind {
  std::string name;        // as written in descriptions: "Conv2d"
  std::string attributes;  // for messages: "out_channels, kernel, stride=1, padding=0, ..."
  int min_inputs = 1, max_inputs = 1;
  std::function<std::shared_ptr<Module>(Attributes&, const LayerContext&)> build;
};

// Adds a kind (throws if the name is taken). Thread-safe; call it before building models that use it.
void register_layer_kind(LayerKind kind);
// The kind named `name`; throws listing the known kinds when there is none.
const LayerKind& find_layer_kind(const std::string& name, const std::string& where);
std::vector<std::string> layer_kind_names();

// The built-in kinds, each defined next to its class in nn/layers.cpp; the registry starts with them.
std::vector<LayerKind> builtin_layer_kinds();

}  // namespace lowbit::nn
