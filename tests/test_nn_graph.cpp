// Model descriptions and graph models: parse and print, every refusal, the built-in models, residual forward,
// checkpoints that rebuild from the file alone.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/ops.h"
#include "data_fixtures.h"
#include "nn/checkpoint.h"
#include "nn/graph.h"

using namespace lowbit;
using data_fixtures::TempDir;

namespace {

// A description from its nodes (a JSON list), for 1x8x8 images and 3 classes unless `input` says otherwise.
std::string text_of(const std::string& nodes,
                    const std::string& input = R"("input": {"channels": 1, "height": 8, "width": 8}, "classes": 3)") {
  return R"({"format": "lowbit-model", "version": 1, "name": "t", )" + input + R"(, "nodes": )" + nodes + "}";
}

// The message of the Error that building the description throws (parse, then build).
std::string refusal(const std::string& text) {
  try {
    nn::build_model(nn::parse_description(text, "t.json"));
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

const std::string kResidual = R"([
  {"name": "conv", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "padding": 1},
  {"name": "relu", "kind": "ReLU"},
  {"name": "conv2", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "padding": 1},
  {"name": "add", "kind": "Add", "inputs": ["conv2", "relu"]},
  {"name": "pool", "kind": "GlobalAvgPool2d"},
  {"name": "flat", "kind": "Flatten"},
  {"name": "fc", "kind": "Linear", "out_features": "classes"}])";

}  // namespace

TEST_CASE("a description prints and parses back to the same description") {
  for (const std::string& name : nn::model_names()) {
    const nn::Description d = nn::builtin_description(name);
    const std::string printed = nn::description_to_json(d);
    const nn::Description again = nn::parse_description(printed, "printed");
    CHECK(nn::description_to_json(again) == printed);
    CHECK(again.nodes.size() == d.nodes.size());
    CHECK(again.output == d.output);
  }
}

TEST_CASE("every built-in model builds for its data, runs, and has the documented size") {
  const std::map<std::string, int64_t> parameters{
      {"mlp", 235146}, {"lenet5", 61706}, {"convbn", 421738}, {"resnet8", 77658}};
  for (const std::string& name : nn::model_names()) {
    auto model = nn::build_model(name);
    CHECK(model->description.resolved());
    if (parameters.contains(name)) CHECK_MESSAGE(model->parameter_count() == parameters.at(name), name);
    const Tensor y = model->forward(Tensor::zeros({2, 1, 28, 28}));
    CHECK(y.shape() == Shape{2, 10});
    const std::string summary = nn::format_summary(nn::summarize(*model));
    CHECK(contains(summary, "total"));
    // Other image sizes and class counts follow the data.
    auto big = nn::build_model(nn::with_data_shape(nn::builtin_description(name), 1, 32, 32, 20));
    CHECK(big->forward(Tensor::zeros({1, 1, 32, 32})).shape() == Shape{1, 20});
  }
  CHECK(nn::build_model("lenet5")->is_chain());
  CHECK_FALSE(nn::build_model("resnet8")->is_chain());
}

TEST_CASE("inference runs a batch through the graph a chunk of images at a time, with the same outputs") {
  // Recording a graph (parameters need gradients) runs the whole batch node by node; NoGradGuard, in chunks.
  manual_seed(11);
  Rng rng(12);
  for (const std::string& name : nn::model_names()) {
    auto model = nn::build_model(name);
    model->eval();
    const int64_t chunk = model->inference_chunk();
    const int64_t n = 2 * chunk + 3;  // two whole chunks and a short one
    CAPTURE(name);
    CAPTURE(chunk);
    CHECK(chunk >= 1);
    CHECK(chunk < (name == "mlp" ? 400 : 64));  // 1 MB of the largest activation: 100 KB per image in convbn
    Tensor x = Tensor::empty({n, 1, 28, 28});
    for (float& v : x.values()) v = rng.uniform(-1, 1);
    const Tensor whole = model->forward(x);
    REQUIRE(whole.requires_grad());
    Tensor chunked;
    {
      NoGradGuard no_grad;
      chunked = model->forward(x);
    }
    CHECK_FALSE(chunked.requires_grad());
    REQUIRE(chunked.shape() == whole.shape());
    int64_t differ = 0;
    float worst = 0, largest = 0;  // the largest difference, and the largest output
    for (int64_t i = 0; i < whole.numel(); ++i) {
      differ += chunked.data()[i] != whole.data()[i];
      worst = std::max(worst, std::abs(chunked.data()[i] - whole.data()[i]));
      largest = std::max(largest, std::abs(whole.data()[i]));
    }
    worst /= largest;
    // Linear's sgemm may add in another order for another number of rows (OpenBLAS has kernels for small
    // matrices): a few values differ in their last bits.
    MESSAGE(name, ": ", differ, " of ", whole.numel(), " outputs differ, by at most ", worst, " of the largest");
    CHECK(worst < 1e-5f);
    for (int64_t i = 0; i < n; ++i) {
      const float* a = chunked.data() + i * 10;
      const float* b = whole.data() + i * 10;
      CHECK(std::max_element(a, a + 10) - a == std::max_element(b, b + 10) - b);
    }
    // In training mode the batch runs whole even without a graph: a batch norm normalises by the batch's
    // statistics (and updates its running ones once), so the outputs are those of the recorded pass.
    model->train();
    std::vector<Tensor> start;
    for (const auto& [buffer, t] : model->named_buffers()) start.push_back(t.clone());
    const Tensor trained = model->forward(x);
    size_t k = 0;
    for (auto& [buffer, t] : model->named_buffers()) t.copy_from(start[k++]);
    NoGradGuard no_grad;
    const Tensor untracked = model->forward(x);
    CHECK(std::memcmp(trained.data(), untracked.data(), sizeof(float) * static_cast<size_t>(trained.numel())) == 0);
  }
}

TEST_CASE("a graph with a residual branch computes what the hand-written forward computes") {
  manual_seed(3);
  auto model = nn::build_model(nn::parse_description(text_of(kResidual), "t"));
  const auto& conv = dynamic_cast<nn::Conv2d&>(*model->nodes[0].module);
  const auto& conv2 = dynamic_cast<nn::Conv2d&>(*model->nodes[2].module);
  const auto& fc = dynamic_cast<nn::Linear&>(*model->nodes[6].module);
  Tensor x = Tensor::zeros({2, 1, 8, 8});
  Rng rng(5);
  for (float& v : x.values()) v = rng.uniform(-1, 1);
  const Tensor r = ops::relu(ops::conv2d(x, conv.weight, conv.bias, 1, 1));
  const Tensor a = ops::add(ops::conv2d(r, conv2.weight, conv2.bias, 1, 1), r);
  const Tensor expected =
      ops::add(ops::matmul(ops::flatten(ops::global_avg_pool2d(a)), fc.weight, false, true), fc.bias);
  const Tensor y = model->forward(x);
  REQUIRE(y.shape() == expected.shape());
  for (int64_t i = 0; i < y.numel(); ++i) CHECK(y.data()[i] == doctest::Approx(expected.data()[i]).epsilon(1e-6));
  // The residual path gets its gradient from both readers.
  ops::sum(y).backward();
  CHECK(conv.weight.grad().defined());
}

TEST_CASE("descriptions with a mistake are refused with one line naming the node and the problem") {
  const std::string conv = R"({"name": "c", "kind": "Conv2d", "out_channels": 2, "kernel": 3})";
  const std::string tail = R"({"name": "f", "kind": "Flatten"}, {"name": "fc", "kind": "Linear", "out_features": 3})";
  const std::vector<std::pair<std::string, std::string>> cases{
      {"{", "not valid JSON"},
      {R"({"format": "lowbit-model", "version": 2, "nodes": []})", "\"version\" must be 1"},
      {R"({"format": "other", "version": 1})", "\"format\" must be \"lowbit-model\""},
      {text_of("[]"), "\"nodes\" must be a non-empty list"},
      {text_of(R"([{"name": "c", "kind": "Conv3d"}])"), "node 'c' (Conv3d): unknown kind 'Conv3d' (known kinds:"},
      {text_of(R"([{"name": "c", "kind": "Conv2d", "out_channels": 2, "kernal": 3}])"),
       "attribute 'kernel' is missing"},
      {text_of(R"([{"name": "c", "kind": "Conv2d", "out_channels": 2, "kernel": 3, "strde": 2}, )" + tail + "]"),
       "node 'c' (Conv2d): unknown attribute 'strde'"},
      {text_of(R"([{"name": "c", "kind": "Conv2d", "out_channels": "two", "kernel": 3}])"),
       "attribute 'out_channels' must be a non-negative integer, not \"two\""},
      {text_of(R"([{"name": "c", "kind": "Conv2d", "out_channels": 2, "kernel": 3, "in_channels": 3}, )" + tail + "]"),
       "attribute 'in_channels' is 3, but the input gives 1"},
      {text_of("[" + conv + R"(, {"name": "f", "kind": "Flatten", "inputs": ["nowhere"]}])"),
       "node 'f' (Flatten): its input 'nowhere' is not a node of the model"},
      {text_of("[" + conv + "," + conv + "]"), "two nodes are named 'c'"},
      {text_of(R"([{"name": "a", "kind": "ReLU", "inputs": ["b"]}, {"name": "b", "kind": "ReLU", "inputs": ["a"]},
                  {"name": "o", "kind": "Add", "inputs": ["input", "b"]}])"),
       "read each other in a cycle"},
      {text_of("[" + conv + R"(, {"name": "x", "kind": "Linear", "out_features": 3}])"),
       "node 'x' (Linear): needs a flat input (FEATURES), its input is (2, 6, 6): put a Flatten before it"},
      {text_of(R"([{"name": "c", "kind": "Conv2d", "out_channels": 2, "kernel": 9}, )" + tail + "]"),
       "kernel 9 is larger than its padded input 8x8"},
      {text_of(
           "[" + conv + R"(, {"name": "dead", "kind": "ReLU", "inputs": ["c"]}, )" +
           R"({"name": "f", "kind": "Flatten", "inputs": ["c"]}, {"name": "fc", "kind": "Linear", "out_features": 3}])"),
       "node 'dead' does not lead to the output 'fc'"},
      {text_of(
           "[" + conv +
           R"(, {"name": "p", "kind": "MaxPool2d", "kernel": 2}, {"name": "a", "kind": "Add", "inputs": ["c", "p"]}, )" +
           tail + "]"),
       "node 'a' (Add): Add: its inputs have different shapes (1, 2, 6, 6) and (1, 2, 3, 3)"},
      {text_of("[" + conv + R"(, {"name": "a", "kind": "Add"}, )" + tail + "]"),
       "node 'a' (Add): takes 2 inputs, it is given 1"},
      {text_of("[" + conv +
               R"(, {"name": "f", "kind": "Flatten"}, {"name": "fc", "kind": "Linear", "out_features": 5}])"),
       "gives (5,) per image, expected 3 logits (one per class)"},
      {text_of(kResidual, R"("input": {"channels": "auto", "height": 8, "width": 8}, "classes": 3)"), "still \"auto\""},
      {text_of(R"([{"name": "input", "kind": "ReLU"}])"), "must be 1-64 letters, digits"},
      {text_of("[" + conv + "]", R"("input": {"channels": 1, "height": 8, "width": 8}, "classes": 3, "colour": 1)"),
       "unknown key 'colour'"},
  };
  for (const auto& [text, phrase] : cases) {
    const std::string message = refusal(text);
    CHECK_MESSAGE(contains(message, phrase), "description: ", text, "\nmessage: ", message, "\nexpected: ", phrase);
    CHECK(message.find('\n') == std::string::npos);
  }
  // A description file that says one size and data of another.
  CHECK_THROWS_WITH_AS(nn::with_data_shape(nn::parse_description(text_of(kResidual), "t"), 1, 16, 16, 3),
                       doctest::Contains("takes 8 pixel rows, the data set has 16"), Error);
  CHECK_THROWS_WITH_AS(nn::builtin_description("lenet6"),
                       doctest::Contains("unknown model 'lenet6' (choose one of: mlp, lenet5, convbn, resnet8, dsconv"),
                       Error);
  CHECK_THROWS_WITH_AS(nn::read_description("/nonexistent/my.json"), doctest::Contains("cannot be read"), Error);
}

TEST_CASE("a custom layer kind registered from user code builds in descriptions") {
  struct Square : nn::Module {
    Tensor forward(const Tensor& x) override { return ops::mul(x, x); }
    std::string describe() const override { return "Square"; }
  };
  nn::register_layer_kind(
      {"Square", "", 1, 1, [](nn::Attributes&, const nn::LayerContext&) { return std::make_shared<Square>(); }});
  CHECK_THROWS_WITH_AS(
      nn::register_layer_kind(
          {"Square", "", 1, 1, [](nn::Attributes&, const nn::LayerContext&) { return std::make_shared<Square>(); }}),
      doctest::Contains("exists already"), Error);
  auto model = nn::build_model(nn::parse_description(
      text_of(
          R"([{"name": "f", "kind": "Flatten"}, {"name": "sq", "kind": "Square"}, {"name": "fc", "kind": "Linear", "out_features": 3}])"),
      "t"));
  CHECK(model->forward(Tensor::ones({1, 1, 8, 8})).shape() == Shape{1, 3});
}

TEST_CASE("a graph model's checkpoint rebuilds from its description alone") {
  TempDir dir("nn_graph");
  manual_seed(7);
  auto model = nn::build_model(nn::with_data_shape(nn::builtin_description("resnet8"), 1, 12, 12, 5));
  nn::save_checkpoint(dir / "m.safetensors", *model, {{"description", nn::description_to_json(model->description)}});
  const nn::Checkpoint c = nn::read_checkpoint(dir / "m.safetensors");
  auto again = nn::build_model(nn::parse_description(c.meta("description"), c.path));
  nn::load_weights(*again, c);
  Tensor x = Tensor::ones({1, 1, 12, 12});
  model->eval();
  again->eval();
  const Tensor a = model->forward(x), b = again->forward(x);
  for (int64_t i = 0; i < a.numel(); ++i) CHECK(a.data()[i] == b.data()[i]);
}

namespace {
// The names of the ops in y's backward graph, each node once.
std::vector<std::string> op_names(const Tensor& y) {
  std::vector<std::string> names;
  std::vector<const Node*> todo{y.grad_fn().get()}, seen;
  while (!todo.empty()) {
    const Node* node = todo.back();
    todo.pop_back();
    if (node == nullptr || std::find(seen.begin(), seen.end(), node) != seen.end()) continue;
    seen.push_back(node);
    names.emplace_back(node->name);
    for (const Tensor& t : node->inputs)
      if (t.defined()) todo.push_back(t.grad_fn().get());  // an op's optional input may be undefined
  }
  return names;
}
}  // namespace

TEST_CASE("without gradients, an eval-mode conv and the batch norm (and ReLU) after it run as one op, same bits") {
  // conv1 -> bn1 -> relu1 fuses into one op; conv2 -> bn2 without the ReLU (relu2 is not bn2's only reader);
  // add -> relu3 fuses always; conv3's output has two readers: nothing fuses there. conv1 runs direct with AVX-512 (18
  // taps), conv2 through im2col.
  const std::string text = text_of(R"([
    {"name": "conv1", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "padding": 1, "bias": false},
    {"name": "bn1", "kind": "BatchNorm2d"},
    {"name": "relu1", "kind": "ReLU"},
    {"name": "conv2", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "stride": 2, "padding": 1},
    {"name": "bn2", "kind": "BatchNorm2d"},
    {"name": "relu2", "kind": "ReLU"},
    {"name": "add", "kind": "Add", "inputs": ["relu2", "bn2"]},
    {"name": "relu3", "kind": "ReLU"},
    {"name": "conv3", "kind": "Conv2d", "out_channels": 4, "kernel": 1},
    {"name": "bn3", "kind": "BatchNorm2d"},
    {"name": "add3", "kind": "Add", "inputs": ["bn3", "conv3"]},
    {"name": "pool", "kind": "GlobalAvgPool2d"},
    {"name": "flat", "kind": "Flatten"},
    {"name": "fc", "kind": "Linear", "out_features": "classes"}])",
                                   R"("input": {"channels": 2, "height": 9, "width": 9}, "classes": 3)");
  auto model = nn::build_model(nn::parse_description(text, "t.json"));
  model->train();
  {
    NoGradGuard no_grad;
    for (int step = 0; step < 3; ++step) model->forward(Tensor::randn({6, 2, 9, 9}));  // running statistics
  }
  const auto fused_runs = [&] {  // nodes run as one op from each node on
    std::vector<size_t> runs;
    for (size_t i = 0; i < model->nodes.size(); ++i) runs.push_back(nn::fused_nodes(model->nodes, i));
    return runs;
  };
  // In training, or with gradients, only batch norm + ReLU and Add + ReLU fuse (the next test).
  CHECK(fused_runs() == std::vector<size_t>{1, 2, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1});
  model->eval();
  CHECK(fused_runs() == std::vector<size_t>{1, 2, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1});
  NoGradGuard no_grad;
  CHECK(fused_runs() == std::vector<size_t>{3, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1});
  const Tensor x = Tensor::randn({5, 2, 9, 9});
  const Tensor fused = model->forward(x), alone = nn::run_nodes(model->nodes, x, true).back();
  REQUIRE(fused.shape() == alone.shape());
  CHECK(std::memcmp(fused.data(), alone.data(), static_cast<size_t>(fused.numel()) * sizeof(float)) == 0);
}

TEST_CASE(
    "a batch norm or an Add that only a ReLU reads runs fused with it, with the values and gradients of the two") {
  // bn1 -> relu1 and add -> relu3 fuse; bn2 is read by relu2 and by the Add (two readers), bn3 by a ReLU6: neither
  // fuses.
  const std::string text = text_of(R"([
    {"name": "conv1", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "padding": 1, "bias": false},
    {"name": "bn1", "kind": "BatchNorm2d"},
    {"name": "relu1", "kind": "ReLU"},
    {"name": "conv2", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "padding": 1, "bias": false},
    {"name": "bn2", "kind": "BatchNorm2d"},
    {"name": "relu2", "kind": "ReLU"},
    {"name": "add", "kind": "Add", "inputs": ["relu2", "bn2"]},
    {"name": "relu3", "kind": "ReLU"},
    {"name": "bn3", "kind": "BatchNorm2d"},
    {"name": "relu6", "kind": "ReLU6"},
    {"name": "pool", "kind": "GlobalAvgPool2d"},
    {"name": "flat", "kind": "Flatten"},
    {"name": "fc", "kind": "Linear", "out_features": "classes"}])");
  auto model = nn::build_model(nn::parse_description(text, "t.json"));
  model->train();
  const Tensor x = Tensor::randn({5, 1, 8, 8}), dy = Tensor::randn({5, 3});
  std::vector<Tensor> start_buffers;
  for (const auto& [name, t] : model->named_buffers()) start_buffers.push_back(t.clone());

  std::vector<std::vector<float>> results[2];
  std::vector<std::string> ops[2];
  for (int keep_all = 0; keep_all < 2; ++keep_all) {  // keep_all runs every node alone
    size_t b = 0;
    for (auto& [name, t] : model->named_buffers()) t.copy_from(start_buffers[b++]);
    model->zero_grad();
    const Tensor y = keep_all ? nn::run_nodes(model->nodes, x, true).back() : model->forward(x);
    y.backward(dy);
    ops[keep_all] = op_names(y);
    results[keep_all].emplace_back(y.values().begin(), y.values().end());
    for (const Tensor& p : model->parameters()) {
      const Tensor g = p.grad();
      REQUIRE(g.defined());
      results[keep_all].emplace_back(g.values().begin(), g.values().end());
    }
    for (const auto& [name, t] : model->named_buffers())
      results[keep_all].emplace_back(t.values().begin(), t.values().end());
  }
  const auto count = [](const std::vector<std::string>& names, const std::string& op) {
    return std::count(names.begin(), names.end(), op);
  };
  CHECK(count(ops[0], "batch_norm_relu") == 1);
  CHECK(count(ops[0], "batch_norm") == 2);
  CHECK(count(ops[0], "add_relu") == 1);
  CHECK(count(ops[1], "batch_norm_relu") == 0);
  CHECK(count(ops[1], "batch_norm") == 3);
  CHECK(count(ops[1], "add_relu") == 0);
  REQUIRE(results[0].size() == results[1].size());
  for (size_t k = 0; k < results[0].size(); ++k) {
    INFO("result ", k, " (the output, then each parameter's gradient, then each buffer)");
    REQUIRE(results[0][k].size() == results[1][k].size());
    CHECK(std::memcmp(results[0][k].data(), results[1][k].data(), results[0][k].size() * sizeof(float)) == 0);
  }
}
