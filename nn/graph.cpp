// Model descriptions (parse, print, resolve), the graph Model (checks, topological order, forward) and the summary.
#include "nn/graph.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/ops.h"
#include "core/threads.h"

namespace lowbit::nn {

// The built-in descriptions, the files of models/ compiled in (nn/CMakeLists.txt generates this).
const std::vector<std::pair<std::string, std::string>>& builtin_model_files();

// =====================================================================================================
// Descriptions: JSON in, JSON out
// =====================================================================================================

namespace {
bool valid_node_name(const std::string& name) {
  if (name.empty() || name.size() > 64 || name == "input") return false;
  return std::all_of(name.begin(), name.end(), [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' || ch == '-';
  });
}

// A size of the input: a positive integer, or "auto" (0).
int64_t size_or_auto(const nlohmann::json& object, const std::string& key, const std::string& where) {
  if (!object.contains(key) || object.at(key) == "auto") return 0;
  const nlohmann::json& v = object.at(key);
  if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > 65536)
    fail("{}: '{}' must be a positive integer or \"auto\", not {}", where, key, v.dump());
  return v.get<int64_t>();
}

void only_keys(const nlohmann::json& object, const std::set<std::string>& allowed, const std::string& where) {
  for (const auto& [key, v] : object.items())
    if (!allowed.contains(key)) {
      std::string list;
      for (const auto& k : allowed) list += (list.empty() ? "" : ", ") + k;
      fail("{}: unknown key '{}' (expected: {})", where, key, list);
    }
}
}  // namespace

Description parse_description(const std::string& json_text, const std::string& source) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(json_text);
  } catch (const nlohmann::json::parse_error& e) {
    fail("{}: not valid JSON (byte {}): check the brackets, commas and quotes", source, e.byte);
  }
  if (!j.is_object())
    fail("{}: a model description is a JSON object {{\"format\": \"{}\", ...}}", source, kDescriptionFormat);
  only_keys(j, {"format", "version", "name", "input", "classes", "nodes", "output"}, source);
  if (j.value("format", "") != kDescriptionFormat)
    fail("{}: \"format\" must be \"{}\" (is this a lowbit model description?)", source, kDescriptionFormat);
  if (!j.contains("version") || j.at("version") != kDescriptionVersion)
    fail("{}: \"version\" must be {} (written by a newer lowbit?)", source, kDescriptionVersion);

  Description d;
  if (j.contains("name")) {
    if (!j.at("name").is_string()) fail("{}: \"name\" must be a string", source);
    d.name = j.at("name").get<std::string>();
  }
  if (j.contains("input")) {
    const nlohmann::json& in = j.at("input");
    if (!in.is_object()) fail("{}: \"input\" must be an object {{\"channels\", \"height\", \"width\"}}", source);
    only_keys(in, {"channels", "height", "width"}, source + ": \"input\"");
    d.channels = size_or_auto(in, "channels", source + ": \"input\"");
    d.height = size_or_auto(in, "height", source + ": \"input\"");
    d.width = size_or_auto(in, "width", source + ": \"input\"");
  }
  d.classes = size_or_auto(j, "classes", source);
  if (d.classes > 256) fail("{}: \"classes\" is {}, at most 256 are supported", source, d.classes);

  if (!j.contains("nodes") || !j.at("nodes").is_array() || j.at("nodes").empty())
    fail("{}: \"nodes\" must be a non-empty list of nodes", source);
  std::set<std::string> names;
  for (const nlohmann::json& n : j.at("nodes")) {
    const std::string where = fmt::format("{}: node {}", source, d.nodes.size());
    if (!n.is_object()) fail("{}: a node is an object {{\"name\", \"kind\", ...}}, not {}", where, n.dump());
    NodeDescription node;
    if (!n.contains("name") || !n.at("name").is_string()) fail("{}: \"name\" is missing (a string)", where);
    node.name = n.at("name").get<std::string>();
    if (!valid_node_name(node.name))
      fail("{}: name '{}' must be 1-64 letters, digits, '_' or '-' (and not \"input\")", where, node.name);
    if (!names.insert(node.name).second) fail("{}: two nodes are named '{}'", source, node.name);
    const std::string at = fmt::format("{}: node '{}'", source, node.name);
    if (!n.contains("kind") || !n.at("kind").is_string()) fail("{}: \"kind\" is missing (a string)", at);
    node.kind = n.at("kind").get<std::string>();
    if (n.contains("inputs")) {
      const nlohmann::json& inputs = n.at("inputs");
      if (!inputs.is_array() || inputs.empty()) fail("{}: \"inputs\" must be a non-empty list of node names", at);
      for (const nlohmann::json& i : inputs) {
        if (!i.is_string()) fail("{}: \"inputs\" must hold node names (strings), not {}", at, i.dump());
        node.inputs.push_back(i.get<std::string>());
      }
    } else {
      node.inputs = {d.nodes.empty() ? std::string("input") : d.nodes.back().name};
    }
    node.attributes = nlohmann::json::object();
    for (const auto& [key, v] : n.items())
      if (key != "name" && key != "kind" && key != "inputs") node.attributes[key] = v;
    d.nodes.push_back(std::move(node));
  }
  if (j.contains("output")) {
    if (!j.at("output").is_string()) fail("{}: \"output\" must be a node name", source);
    d.output = j.at("output").get<std::string>();
  } else {
    d.output = d.nodes.back().name;
  }
  return d;
}

Description read_description(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("model description '{}' cannot be read (check the path)", path);
  std::stringstream text;
  text << in.rdbuf();
  Description d = parse_description(text.str(), path);
  if (d.name.empty()) d.name = std::filesystem::path(path).stem().string();
  return d;
}

std::string description_to_json(const Description& d) {
  nlohmann::ordered_json j;
  j["format"] = kDescriptionFormat;
  j["version"] = kDescriptionVersion;
  j["name"] = d.name;
  const auto size = [](int64_t v) { return v > 0 ? nlohmann::ordered_json(v) : nlohmann::ordered_json("auto"); };
  j["input"] = {{"channels", size(d.channels)}, {"height", size(d.height)}, {"width", size(d.width)}};
  j["classes"] = size(d.classes);
  j["nodes"] = nlohmann::ordered_json::array();
  for (const NodeDescription& n : d.nodes) {
    nlohmann::ordered_json node;
    node["name"] = n.name;
    node["kind"] = n.kind;
    node["inputs"] = n.inputs;
    for (const auto& [key, v] : n.attributes.items()) node[key] = v;
    j["nodes"].push_back(node);
  }
  j["output"] = d.output;
  return j.dump(1);
}

const std::vector<std::string>& model_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const auto& [name, text] : builtin_model_files()) out.push_back(name);
    return out;
  }();
  return names;
}

Description builtin_description(const std::string& name) {
  for (const auto& [builtin, text] : builtin_model_files())
    if (builtin == name) return parse_description(text, fmt::format("built-in model '{}'", name));
  std::string known;
  for (const auto& n : model_names()) known += (known.empty() ? "" : ", ") + n;
  fail("unknown model '{}' (choose one of: {}, or give a description file ending in .json)", name, known);
}

Description find_description(const std::string& name_or_path) {
  if (name_or_path.ends_with(".json")) return read_description(name_or_path);
  return builtin_description(name_or_path);
}

Description with_data_shape(Description d, int64_t channels, int64_t height, int64_t width, int64_t classes) {
  const auto settle = [&](int64_t& value, int64_t data, const char* what) {
    if (value > 0 && value != data)
      fail("model '{}' takes {} {}, the data set has {} (write \"auto\" in the description to follow the data)", d.name,
           value, what, data);
    value = data;
  };
  settle(d.channels, channels, "input channels");
  settle(d.height, height, "pixel rows");
  settle(d.width, width, "pixel columns");
  settle(d.classes, classes, "classes");
  return d;
}

// =====================================================================================================
// The graph model
// =====================================================================================================

namespace {
// The nodes in an order where every node comes after its inputs: Kahn's algorithm, taking the earliest
// ready node of the file each time, so a description already in order keeps it. Throws on a cycle.
std::vector<int> topological_order(const Description& d, const std::vector<std::vector<int>>& inputs) {
  const size_t n = d.nodes.size();
  std::vector<int> waiting(n, 0), order;
  std::vector<std::vector<int>> readers(n);
  for (size_t i = 0; i < n; ++i)
    for (int in : inputs[i])
      if (in >= 0) ++waiting[i], readers[static_cast<size_t>(in)].push_back(static_cast<int>(i));
  std::set<int> ready;
  for (size_t i = 0; i < n; ++i)
    if (waiting[i] == 0) ready.insert(static_cast<int>(i));
  while (!ready.empty()) {
    const int i = *ready.begin();
    ready.erase(ready.begin());
    order.push_back(i);
    for (int r : readers[static_cast<size_t>(i)])
      if (--waiting[static_cast<size_t>(r)] == 0) ready.insert(r);
  }
  if (order.size() != n) {
    std::string cycle;
    for (size_t i = 0; i < n; ++i)
      if (waiting[i] > 0) cycle += (cycle.empty() ? "'" : ", '") + d.nodes[i].name + "'";
    fail("model '{}': the nodes {} read each other in a cycle (a node's inputs must come before it)", d.name, cycle);
  }
  return order;
}
}  // namespace

Model::Model(Description d) : name(d.name), description(std::move(d)), layers(std::make_shared<Sequential>()) {
  register_module("layers", layers);
  const Description& desc = description;
  if (!desc.resolved())
    fail("model '{}': the input size or the number of classes is still \"auto\" (build it for a data set)", name);

  // Inputs by index, checked.
  std::map<std::string, int> index;
  for (size_t i = 0; i < desc.nodes.size(); ++i) index[desc.nodes[i].name] = static_cast<int>(i);
  std::vector<std::vector<int>> inputs(desc.nodes.size());
  for (size_t i = 0; i < desc.nodes.size(); ++i) {
    const NodeDescription& node = desc.nodes[i];
    const std::string where = fmt::format("model '{}': node '{}' ({})", name, node.name, node.kind);
    const LayerKind& kind = find_layer_kind(node.kind, where);
    const auto count = static_cast<int>(node.inputs.size());
    if (count < kind.min_inputs || (kind.max_inputs != -1 && count > kind.max_inputs))
      fail("{}: takes {} input{}, it is given {}", where,
           kind.max_inputs == -1                ? fmt::format("at least {}", kind.min_inputs)
           : kind.min_inputs == kind.max_inputs ? fmt::format("{}", kind.min_inputs)
                                                : fmt::format("{} to {}", kind.min_inputs, kind.max_inputs),
           kind.max_inputs == 1 ? "" : "s", count);
    for (const std::string& in : node.inputs) {
      if (in == "input") {
        inputs[i].push_back(-1);
        continue;
      }
      auto it = index.find(in);
      if (it == index.end()) fail("{}: its input '{}' is not a node of the model (nor \"input\")", where, in);
      if (it->second == static_cast<int>(i)) fail("{}: reads its own output", where);
      inputs[i].push_back(it->second);
    }
  }
  auto out = index.find(desc.output);
  if (out == index.end()) fail("model '{}': the output '{}' is not a node of the model", name, desc.output);

  // Every node must lead to the output: walk back from it.
  std::vector<bool> used(desc.nodes.size(), false);
  std::vector<int> stack{out->second};
  while (!stack.empty()) {
    const int i = stack.back();
    stack.pop_back();
    if (used[static_cast<size_t>(i)]) continue;
    used[static_cast<size_t>(i)] = true;
    for (int in : inputs[static_cast<size_t>(i)])
      if (in >= 0) stack.push_back(in);
  }
  const std::vector<int> order = topological_order(desc, inputs);
  for (size_t i = 0; i < desc.nodes.size(); ++i)
    if (!used[i])
      fail("model '{}': node '{}' does not lead to the output '{}' (remove it, or make a later node read it)", name,
           desc.nodes[i].name, desc.output);
  bool reads_input = false;
  for (const auto& in : inputs) reads_input |= std::find(in.begin(), in.end(), -1) != in.end();
  if (!reads_input) fail("model '{}': no node reads \"input\"", name);

  // Build each node's module from its attributes and its inputs' shapes, in execution order.
  std::vector<int> position(desc.nodes.size());
  for (size_t p = 0; p < order.size(); ++p) position[static_cast<size_t>(order[p])] = static_cast<int>(p);
  NoGradGuard no_grad;
  for (int i : order) {
    const NodeDescription& nd = desc.nodes[static_cast<size_t>(i)];
    const std::string where = fmt::format("model '{}': node '{}' ({})", name, nd.name, nd.kind);
    const LayerKind& kind = find_layer_kind(nd.kind, where);
    Node node{nd.name, nd.kind, {}, nullptr, {}, -1};
    LayerContext context{{}, desc.classes};
    std::vector<Tensor> probes;  // one zero image per input, to find the output's shape
    for (int in : inputs[static_cast<size_t>(i)]) {
      node.inputs.push_back(in < 0 ? -1 : position[static_cast<size_t>(in)]);
      const Shape shape = in < 0 ? input_shape() : nodes[static_cast<size_t>(node.inputs.back())].output_shape;
      context.inputs.push_back(shape);
      Shape batch{1};
      batch.insert(batch.end(), shape.begin(), shape.end());
      probes.push_back(Tensor::zeros(batch));
    }
    try {
      Attributes attributes(nd.attributes, where);
      node.module = kind.build(attributes, context);
      attributes.finish(kind.attributes);
      node.module->eval();  // a batch of one: BatchNorm must use its running statistics
      const Tensor y = node.module->forward_inputs(probes);
      node.module->train();
      node.output_shape = Shape(y.shape().begin() + 1, y.shape().end());
    } catch (const Error& e) {
      const std::string message = e.what();
      if (message.starts_with(where)) throw;
      fail("{}: {}", where, message);
    }
    layers->append(node.name, node.module);
    nodes.push_back(std::move(node));
  }
  // Liveness: each output is dropped after its last reader.
  for (size_t i = 0; i < nodes.size(); ++i)
    for (int in : nodes[i].inputs)
      if (in >= 0) nodes[static_cast<size_t>(in)].last_reader = static_cast<int>(i);
  nodes.back().last_reader = static_cast<int>(nodes.size());
  if (nodes.back().name != desc.output)
    fail("model '{}': internal: the output node '{}' does not run last", name, desc.output);
  const Shape& logits = nodes.back().output_shape;
  if (logits != Shape{desc.classes})
    fail("model '{}': the output '{}' gives {} per image, expected {} logits (one per class)", name, desc.output,
         shape_str(logits), desc.classes);
}

// Inference (eval mode, no graph recorded) on a batch runs the whole graph on a few images at a time, so that each
// activation is still in the core's cache when the next node reads it. Node by node over the whole batch,
// every activation went out to memory and back: convbn's first one is 100 KB per image, 25 MB for 256 images.
// Every op computes each image on its own, so the outputs are those of one pass over the batch (up to the
// summation order of a Linear's sgemm, which may depend on the number of rows).
int64_t Model::inference_chunk() const {
  constexpr int64_t kChunkBytes = int64_t{1} << 20;  // the largest activation of a chunk: half of a 2 MB L2
  int64_t largest = 1;                               // floats per image
  for (const Node& node : nodes) largest = std::max(largest, shape_numel(node.output_shape));
  return std::max<int64_t>(num_threads(), kChunkBytes / (largest * static_cast<int64_t>(sizeof(float))));
}

Tensor Model::forward(const Tensor& x) {
  const int64_t n = x.dim() > 0 ? x.size(0) : 0, chunk = inference_chunk();
  // In training mode a batch norm's statistics are the batch's, and a chunk's would differ.
  if (grad_enabled() || is_training() || n <= chunk) return run_nodes(nodes, x, false).back();
  const int64_t image = x.numel() / n, count = (n + chunk - 1) / chunk;  // chunks of equal size, ± 1
  std::vector<Tensor> outputs;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t first = n * k / count;
    Shape shape = x.shape();
    shape[0] = n * (k + 1) / count - first;
    Tensor part = Tensor::empty(shape);
    std::copy_n(x.data() + first * image, part.numel(), part.data());
    outputs.push_back(run_nodes(nodes, part, false).back());
  }
  return ops::concat(outputs, 0);
}

bool Model::is_chain() const {
  for (size_t i = 0; i < nodes.size(); ++i)
    if (nodes[i].inputs != std::vector<int>{static_cast<int>(i) - 1}) return false;
  return true;
}

std::shared_ptr<Model> build_model(const Description& description) { return std::make_shared<Model>(description); }

std::shared_ptr<Model> build_model(const std::string& builtin_name) {
  Description d = builtin_description(builtin_name);
  d.channels = d.channels ? d.channels : 1;
  d.height = d.height ? d.height : 28;
  d.width = d.width ? d.width : 28;
  d.classes = d.classes ? d.classes : 10;
  return build_model(d);
}

// =====================================================================================================
// Summary
// =====================================================================================================

std::vector<LayerSummary> summarize(Model& model) {
  NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  std::vector<LayerSummary> rows;
  Shape batch{1};
  const Shape image = model.input_shape();
  batch.insert(batch.end(), image.begin(), image.end());
  const Tensor x = Tensor::zeros(batch);
  std::vector<Tensor> outputs;
  for (const Node& node : model.nodes) {
    std::vector<Tensor> in;
    LayerSummary row{"layers." + node.name, node.module->describe(), {}, {}, node.module->parameter_count(), 0};
    for (int j : node.inputs) {
      in.push_back(j < 0 ? x : outputs[static_cast<size_t>(j)]);
      row.inputs.push_back(j < 0 ? "input" : model.nodes[static_cast<size_t>(j)].name);
    }
    Tensor y = node.module->forward_inputs(in);
    row.output_shape = y.shape();
    row.macs = node.module->macs(in[0].shape(), y.shape());
    rows.push_back(row);
    outputs.push_back(y);
  }
  model.train(was_training);
  return rows;
}

std::string format_summary(const std::vector<LayerSummary>& rows) {
  const auto line = [](const std::string& a, const std::string& b, const std::string& c, const std::string& d,
                       const std::string& e, const std::string& f) {
    return fmt::format("{:<14} {:<44} {:<14} {:>18} {:>10} {:>12}\n", a, b, c, d, e, f);
  };
  std::string out = line("layer", "type", "inputs", "output", "params", "MACs");
  int64_t params = 0, macs = 0;
  for (const auto& r : rows) {
    std::string inputs;
    for (const auto& i : r.inputs) inputs += (inputs.empty() ? "" : ",") + i;
    out += line(r.name, r.description, inputs, shape_str(r.output_shape), std::to_string(r.parameters),
                std::to_string(r.macs));
    params += r.parameters;
    macs += r.macs;
  }
  out += line("total", "", "", "", std::to_string(params), std::to_string(macs));
  return out;
}

}  // namespace lowbit::nn
