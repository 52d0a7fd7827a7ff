// Tests for export --format onnx: every exported file passes the ONNX checker (python3-onnx) and runs in ONNX
// Runtime (tools/ort/check.js, npm onnxruntime-node) with the integer runtime's logits, within one LSB, and the
// float model's, within float tolerance; the export is deterministic; errors name the problem and write nothing.
#include <doctest/doctest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "apps/common.h"
#include "core/error.h"
#include "core/normalize.h"
#include "core/rng.h"
#include "data/mnist.h"
#include "data_fixtures.h"
#include "fuzz/fuzz_models.h"
#include "nn/checkpoint.h"
#include "nn/graph.h"
#include "nn/kinds.h"
#include "quant/convert.h"
#include "quant/export_onnx.h"
#include "quant/int_model.h"
#include "quant/qat.h"
#include "quant/runtime/executor.h"

namespace fs = std::filesystem;
using namespace lowbit;
using data_fixtures::TempDir;

namespace {

constexpr int64_t kImages = 300;              // random images per model (plus an all-black and an all-white one)
constexpr int64_t kMaxLogitDiffLsb = 1;       // ONNX Runtime vs the integer runtime, integer logits
constexpr double kMinAgreement = 0.99;        // identical predictions, integer models, on kImages random images
constexpr double kFloatTolerance = 1e-4;      // |ONNX Runtime − lowbit| per float logit (logits are O(1))
const Normalization kNorm{0.2860f, 0.3530f};  // Fashion-MNIST's

int shell(const std::string& command) {
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

std::string text_of(const std::string& path) {
  const auto bytes = data_fixtures::read_bytes(path);
  return std::string(bytes.begin(), bytes.end());
}

// True in CI (.ci/run sets CI=true and runs LOWBIT_CI_PACKAGES=1 bash tools/setup.sh test).
bool in_ci() {
  const char* ci = std::getenv("CI");
  const char* packages = std::getenv("LOWBIT_CI_PACKAGES");
  return (ci && *ci) || (packages && std::string(packages) == "1");
}

// A tool the checks need. Missing, it fails the test in CI (where tools/setup.sh installs it) and skips the check
// elsewhere, saying why.
bool have_tool(const std::string& probe, const std::string& what) {
  if (shell(probe + " >/dev/null 2>&1") == 0) return true;
  if (in_ci())
    FAIL_CHECK(what, " is missing, and CI must run this check (tools/setup.sh installs it)");
  else
    MESSAGE("skipped: ", what, " is missing");
  return false;
}
bool have_onnx_checker() {
  return have_tool("/usr/bin/python3 -c 'import onnx'", "the ONNX checker (Debian python3-onnx)");
}
bool have_onnx_runtime() {
  return have_tool(fmt::format("node -e \"require('{}/tools/ort/node_modules/onnxruntime-node')\"", LOWBIT_SOURCE_DIR),
                   "ONNX Runtime for Node.js (cd tools/ort && npm install --ignore-scripts)");
}

// onnx.checker.check_model with full_check (shape inference too) on the file.
void check_with_onnx_checker(const std::string& path) {
  const std::string log = path + ".checker.log";
  const std::string command = fmt::format(
      "/usr/bin/python3 -c \"import onnx, sys; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)\" "
      "{} >{} 2>&1",
      path, log);
  CHECK_MESSAGE(shell(command) == 0, path, ": ", text_of(log));
}

// Random images, then an all-black and an all-white one (the ends of the input table), as an IDX file.
data::IdxImages test_images(int64_t c, int64_t h, int64_t w, uint64_t seed) {
  Rng rng(seed);
  data::IdxImages images{.count = kImages + 2, .rows = h, .cols = w, .pixels = {}, .channels = c};
  const int64_t size = c * h * w;
  for (int64_t i = 0; i < kImages * size; ++i) images.pixels.push_back(static_cast<uint8_t>(rng.below(256)));
  images.pixels.insert(images.pixels.end(), static_cast<size_t>(size), uint8_t{0});
  images.pixels.insert(images.pixels.end(), static_cast<size_t>(size), uint8_t{255});
  return images;
}

// Writes logits (N rows of `classes`) as eval --logits does: "image I: L0 L1 ... class C", C the first maximum.
template <typename T>
void write_logits(const std::string& path, const std::vector<T>& logits, int64_t classes) {
  std::string text;
  for (size_t i = 0; i * classes < logits.size(); ++i) {
    const T* row = logits.data() + i * classes;
    int64_t best = 0;
    text += fmt::format("image {}:", i);
    for (int64_t k = 0; k < classes; ++k) {
      if constexpr (std::is_floating_point_v<T>)
        text += fmt::format(" {:.9g}", row[k]);
      else
        text += fmt::format(" {}", int{row[k]});
      if (row[k] > row[best]) best = k;
    }
    text += fmt::format(" class {}\n", best);
  }
  data_fixtures::write_bytes(path, std::vector<uint8_t>(text.begin(), text.end()));
}

// tools/ort/check.js on the model and images against the reference logits: its JSON summary.
nlohmann::json run_in_onnx_runtime(const std::string& model, const std::string& images, const std::string& reference) {
  const std::string out = model + ".ort.json", log = model + ".ort.log";
  const std::string command = fmt::format("node {}/tools/ort/check.js {} {} --reference {} >{} 2>{}", LOWBIT_SOURCE_DIR,
                                          model, images, reference, out, log);
  REQUIRE_MESSAGE(shell(command) == 0, command, "\n", text_of(log));
  return nlohmann::json::parse(text_of(out));
}

// Exports `model`, checks the file with the ONNX checker and runs it in ONNX Runtime on random images against the
// reference executor: predictions agree on at least kMinAgreement of the images, no logit differs by more than
// kMaxLogitDiffLsb. Returns ONNX Runtime's summary.
nlohmann::json check_integer_model(const quant::IntModel& model, const std::string& tag, uint64_t seed) {
  TempDir dir("export_onnx_" + tag);
  const std::string path = dir / (tag + ".onnx");
  quant::write_onnx(quant::export_onnx(model), path);
  if (have_onnx_checker()) check_with_onnx_checker(path);
  if (!have_onnx_runtime()) return {};

  const quant::runtime::Graph& g = model.graph;
  const data::IdxImages images = test_images(g.in_channels, g.in_height, g.in_width, seed);
  data_fixtures::write_bytes(dir / "images.idx", data_fixtures::idx_images_bytes(images));
  quant::runtime::Executor executor(g, 1, quant::runtime::Executor::Kernels::Reference);
  const auto codes = executor.run(images.pixels, images.count);
  write_logits(dir / "reference.txt", std::vector<int8_t>(codes.begin(), codes.end()), model.num_classes());

  const nlohmann::json r = run_in_onnx_runtime(path, dir / "images.idx", dir / "reference.txt");
  MESSAGE(tag, ": ", r.dump());
  CHECK(r["kind"] == "integer");
  CHECK(r["images"] == images.count);
  CHECK(r["agreement"].get<double>() >= kMinAgreement);
  CHECK(r["max_logit_diff"].get<int64_t>() <= kMaxLogitDiffLsb);
  return r;
}

// A built-in model with random weights, calibrated on random images and converted at `bits`.
quant::IntModel converted_builtin(const std::string& name, const std::string& bits, uint64_t seed) {
  manual_seed(seed);
  Rng rng(seed + 1);
  const auto float_model = nn::build_model(name);
  float_model->eval();
  const auto qat = quant::prepare_qat(*float_model, quant::parse_bits(bits));
  quant::Calibrator calibrator(*qat);
  for (int b = 0; b < 4; ++b) {
    Tensor x = Tensor::empty({32, 1, 28, 28});
    for (float& v : x.values()) v = normalize_pixel(static_cast<uint8_t>(rng.below(256)), kNorm);
    calibrator.observe(x);
  }
  calibrator.finish();
  qat->eval();
  return quant::convert(*qat, kNorm, {1, 28, 28});
}

// A model from a description, converted as above (for shapes the built-in models do not have).
quant::IntModel converted_description(const std::string& description, const std::string& bits, int64_t c, int64_t h,
                                      int64_t w, uint64_t seed) {
  manual_seed(seed);
  Rng rng(seed + 1);
  nn::Model float_model(nn::parse_description(description, "test"));
  float_model.eval();
  const auto qat = quant::prepare_qat(float_model, quant::parse_bits(bits));
  quant::Calibrator calibrator(*qat);
  for (int b = 0; b < 3; ++b) {
    Tensor x = Tensor::empty({16, c, h, w});
    for (float& v : x.values()) v = normalize_pixel(static_cast<uint8_t>(rng.below(256)), kNorm);
    calibrator.observe(x);
  }
  calibrator.finish();
  qat->eval();
  return quant::convert(*qat, kNorm, {c, h, w});
}

// Three input channels, a strided and padded conv, a max pool with padding and overlapping windows, a conv without
// ReLU (so its codes use the whole range), an odd number of classes.
constexpr const char* kColourNet = R"({"format": "lowbit-model", "version": 1, "name": "colour",
  "input": {"channels": 3, "height": 9, "width": 9}, "classes": 7, "nodes": [
    {"name": "0", "kind": "Conv2d", "out_channels": 5, "kernel": 3, "stride": 2, "padding": 1},
    {"name": "1", "kind": "BatchNorm2d"}, {"name": "2", "kind": "ReLU"},
    {"name": "3", "kind": "MaxPool2d", "kernel": 2, "stride": 1},
    {"name": "4", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "padding": 1},
    {"name": "5", "kind": "Flatten"}, {"name": "6", "kind": "Linear", "out_features": 7}]})";

// Input (1, 16, 16) → Flatten → Linear(256 → 256) with the identity as weight, no bias, M = 1 and z_out = z_in: its
// logits are its input codes, so an image holding the pixel values 0..255 shows the input table ONNX Runtime uses.
quant::IntModel input_table_model(Normalization norm, float input_scale, int32_t zero_point, quant::QRange range) {
  namespace rt = quant::runtime;
  quant::IntModel m;
  m.model_name = "table";
  m.mode = "int8";
  m.norm = norm;
  m.input_scale = input_scale;
  m.input_zero_point = zero_point;
  m.input_range = range;
  m.output_scale = input_scale;
  m.graph.in_channels = 1;
  m.graph.in_height = 16;
  m.graph.in_width = 16;
  rt::Op input, flatten, linear;
  input.kind = rt::OpKind::Input;
  input.name = "input";
  input.input_table = quant::make_input_table(norm, {input_scale, zero_point}, range);
  flatten.kind = rt::OpKind::Flatten;
  flatten.name = "flatten";
  linear.kind = rt::OpKind::Linear;
  linear.name = "identity";
  linear.in_channels = linear.out_channels = 256;
  linear.weight.assign(256 * 256, 0);
  for (size_t k = 0; k < 256; ++k) linear.weight[k * 256 + k] = 1;
  linear.bias.assign(256, 0);
  linear.input_zero_point = zero_point;
  const std::vector<float> ones(256, 1.f);
  quant::set_requant_from_scales(linear, ones);
  linear.requant.zero_point = zero_point;
  linear.requant.act_min = range.qmin;
  linear.requant.act_max = range.qmax;
  m.graph.ops = {input, flatten, linear};
  rt::chain_inputs(m.graph);
  m.op_output_scales = {input_scale, input_scale, input_scale};
  m.op_requant_scales = {{}, {}, ones};
  return m;
}

// Two 2×2 average pools (a mean ends in .5 whenever its window's sum is 2 mod 4): ONNX Runtime would round those
// half to even, lowbit half away from zero, unless the export's y_scale moves them (avg_pool_output_scale).
constexpr const char* kAvgNet = R"({"format": "lowbit-model", "version": 1, "name": "avg",
  "input": {"channels": 1, "height": 12, "width": 12}, "classes": 10, "nodes": [
    {"name": "0", "kind": "Conv2d", "out_channels": 8, "kernel": 3, "padding": 1}, {"name": "1", "kind": "ReLU"},
    {"name": "2", "kind": "AvgPool2d", "kernel": 2}, {"name": "3", "kind": "Conv2d", "out_channels": 8, "kernel": 3},
    {"name": "4", "kind": "AvgPool2d", "kernel": 2}, {"name": "5", "kind": "Flatten"},
    {"name": "6", "kind": "Linear", "out_features": 10}]})";

// Two branches joined by a Concat (each rescaled to the output's scale), a ReLU after a max pool that no op absorbs
// (a Clamp op), a residual Add with a ReLU6, a global average pool over 6×6 positions (an even count: ties).
constexpr const char* kBranchNet = R"({"format": "lowbit-model", "version": 1, "name": "branches",
  "input": {"channels": 1, "height": 12, "width": 12}, "classes": 10, "nodes": [
    {"name": "a", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "padding": 1}, {"name": "a_relu", "kind": "ReLU"},
    {"name": "b", "kind": "Conv2d", "inputs": ["input"], "out_channels": 4, "kernel": 5, "padding": 2},
    {"name": "cat", "kind": "Concat", "inputs": ["a_relu", "b"]},
    {"name": "pool", "kind": "MaxPool2d", "kernel": 2}, {"name": "pool_relu", "kind": "ReLU"},
    {"name": "c", "kind": "Conv2d", "out_channels": 8, "kernel": 3, "padding": 1},
    {"name": "sum", "kind": "Add", "inputs": ["c", "pool_relu"]}, {"name": "six", "kind": "ReLU6"},
    {"name": "gap", "kind": "GlobalAvgPool2d"}, {"name": "flat", "kind": "Flatten"},
    {"name": "fc", "kind": "Linear", "out_features": 10}]})";

}  // namespace

TEST_CASE("export onnx: every built-in model at w8a8, w4a8 and w4a4 agrees with the integer runtime in ONNX Runtime") {
  uint64_t seed = 100;
  for (const char* name : {"mlp", "lenet5", "convbn", "resnet8", "dsconv"}) {
    for (const char* bits : {"w8a8", "w4a8", "w4a4"}) {
      CAPTURE(name);
      CAPTURE(bits);
      const quant::IntModel model = converted_builtin(name, bits, ++seed);
      check_integer_model(model, fmt::format("{}_{}", name, bits), seed);
    }
  }
}

TEST_CASE("export onnx: strides, padding, channels, pools, clamps, Concat, Add agree in ONNX Runtime") {
  for (const char* bits : {"w8a8", "w4a4"}) {
    CAPTURE(bits);
    check_integer_model(converted_description(kColourNet, bits, 3, 9, 9, 7), std::string("colour_") + bits, 7);
  }
  for (const char* bits : {"w8a8", "w4a4"}) {  // bit-exact: every mean that ends in .5 rounds away from zero
    CAPTURE(bits);
    const nlohmann::json r =
        check_integer_model(converted_description(kAvgNet, bits, 1, 12, 12, 3), std::string("avg_") + bits, 3);
    if (!r.empty()) CHECK(r["differing_logits"] == 0);
  }
  for (const char* bits : {"w8a8", "w4a4"}) {  // Concat, Add, Clamp, GlobalAvgPool2d
    CAPTURE(bits);
    check_integer_model(converted_description(kBranchNet, bits, 1, 12, 12, 5), std::string("branches_") + bits, 5);
  }
  // The tiny model: a 4-bit conv with a fused ReLU, max pool, an avg pool (3x3, padding 1: nine positions, so no
  // mean ends in .5 and no tie rounds differently), an 8-bit linear with int32 biases.
  check_integer_model(fuzz::tiny_int_model(), "tiny", 9);
}

TEST_CASE("export onnx: the integer graph's form: uint8 activations, int8 weights, the input table, two outputs") {
  const quant::IntModel model = converted_builtin("lenet5", "w4a8", 3);
  const quant::OnnxExport e = quant::export_onnx(model);
  // Op types in order: the table lookup, conv / pool pairs, flatten, three QGemm, then the two outputs.
  TempDir dir("export_onnx_form");
  quant::write_onnx(e, dir / "m.onnx");
  if (!have_onnx_checker()) return;
  const std::string script = dir / "form.py";
  const std::string py = R"(import onnx, sys
m = onnx.load(sys.argv[1])
print(' '.join(n.op_type for n in m.graph.node))
init = {t.name: t for t in m.graph.initializer}
print(onnx.TensorProto.DataType.Name(init['op1.weight'].data_type), list(init['op1.weight'].dims))
print(onnx.TensorProto.DataType.Name(init['op0.zero_point'].data_type), [i.name for i in m.graph.input],
      [o.name for o in m.graph.output], [(o.domain, o.version) for o in m.opset_import])
)";
  data_fixtures::write_bytes(script, std::vector<uint8_t>(py.begin(), py.end()));
  REQUIRE(shell(fmt::format("/usr/bin/python3 {} {} >{} 2>&1", script, dir / "m.onnx", dir / "form.txt")) == 0);
  const std::string form = text_of(dir / "form.txt");
  CHECK(form ==
        "Cast Div Sub Div QuantizeLinear QLinearConv MaxPool QLinearConv MaxPool Flatten QGemm QGemm QGemm "
        "DequantizeLinear Cast Sub Cast\n"
        "INT8 [6, 1, 5, 5]\n"  // 4-bit weights, unpacked: one int8 per code
        "UINT8 ['image'] ['logits', 'logit_codes'] [('', 13), ('com.microsoft', 1)]\n");
}

TEST_CASE("export onnx: ONNX Runtime's input codes are lowbit's input table, for all 256 pixel values") {
  struct Case {
    const char* what;
    Normalization norm;
    float scale;
    int32_t zero_point;
    quant::QRange range;
    bool ties;  // some x(p) / s is exactly k + 0.5: QuantizeLinear would round it to even, so the export uses a Gather
  };
  for (const Case& c : {Case{"Fashion-MNIST, 8 bits", kNorm, 0.0219f, -115, {-128, 127}, false},
                        Case{"Fashion-MNIST, 4-bit input codes", kNorm, 0.3312f, -7, {-8, 7}, false},
                        Case{"ties: x(p) = p, s = 2", {0.f, 1.f / 255.f}, 2.f, -128, {-128, 127}, true}}) {
    CAPTURE(c.what);
    int ties = 0;
    for (int p = 0; p < 256; ++p) {
      const float v = normalize_pixel(static_cast<uint8_t>(p), c.norm) / c.scale;
      ties += v - std::floor(v) == 0.5f;
    }
    REQUIRE((ties > 0) == c.ties);
    const quant::IntModel model = input_table_model(c.norm, c.scale, c.zero_point, c.range);
    TempDir dir("export_onnx_table");
    quant::write_onnx(quant::export_onnx(model), dir / "table.onnx");
    if (!have_onnx_runtime()) return;
    data::IdxImages image{.count = 1, .rows = 16, .cols = 16, .pixels = {}, .channels = 1};
    for (int p = 0; p < 256; ++p) image.pixels.push_back(static_cast<uint8_t>(p));
    data_fixtures::write_bytes(dir / "pixels.idx", data_fixtures::idx_images_bytes(image));
    const auto& table = model.graph.ops[0].input_table;
    write_logits(dir / "table.txt", std::vector<int8_t>(table.begin(), table.end()), 256);
    const nlohmann::json r = run_in_onnx_runtime(dir / "table.onnx", dir / "pixels.idx", dir / "table.txt");
    CHECK_MESSAGE(r["max_logit_diff"] == 0, r.dump());
  }
}

TEST_CASE("export onnx: the float model of every built-in model matches lowbit's float forward in ONNX Runtime") {
  for (const std::string& name : nn::model_names()) {
    CAPTURE(name);
    manual_seed(11);
    const auto model = nn::build_model(name);
    model->eval();
    TempDir dir("export_onnx_float_" + name);
    const std::string path = dir / (name + ".fp32.onnx");
    quant::write_onnx(quant::export_onnx(*model, kNorm), path);
    if (have_onnx_checker()) check_with_onnx_checker(path);
    if (!have_onnx_runtime()) continue;

    const data::IdxImages images = test_images(1, 28, 28, 5);
    data_fixtures::write_bytes(dir / "images.idx", data_fixtures::idx_images_bytes(images));
    Tensor x = Tensor::empty({images.count, 1, 28, 28});
    for (size_t i = 0; i < images.pixels.size(); ++i) x.values()[i] = normalize_pixel(images.pixels[i], kNorm);
    NoGradGuard no_grad;
    const Tensor y = model->forward(x);
    const std::vector<float> logits(y.values().begin(), y.values().end());
    write_logits(dir / "reference.txt", logits, y.shape()[1]);

    const nlohmann::json r = run_in_onnx_runtime(path, dir / "images.idx", dir / "reference.txt");
    MESSAGE(name, " fp32: ", r.dump());
    CHECK(r["kind"] == "float");
    CHECK(r["max_logit_diff"].get<double>() <= kFloatTolerance);
    CHECK(r["identical_predictions"] == images.count);
  }
}

TEST_CASE("export onnx: the same model gives the same bytes, and the file holds exactly those bytes") {
  const quant::IntModel model = converted_builtin("lenet5", "w8a8", 21);
  const quant::OnnxExport a = quant::export_onnx(model), b = quant::export_onnx(model);
  CHECK(a.bytes == b.bytes);
  CHECK(a.nodes == b.nodes);
  // A model saved and loaded back exports to the same bytes too (the file stores what the export reads).
  TempDir dir("export_onnx_determinism");
  quant::save_int_model(dir / "m.int8.safetensors", model);
  CHECK(quant::export_onnx(quant::load_int_model(dir / "m.int8.safetensors")).bytes == a.bytes);
  quant::write_onnx(a, dir / "m.onnx");
  CHECK(text_of(dir / "m.onnx") == a.bytes);
  CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 2);  // no temporary left

  manual_seed(4);
  const auto float_model = nn::build_model("convbn");
  CHECK(quant::export_onnx(*float_model, kNorm).bytes == quant::export_onnx(*float_model, kNorm).bytes);
}

TEST_CASE("export onnx: an op kind it cannot export is refused, naming the op") {
  quant::IntModel model = fuzz::tiny_int_model();
  model.graph.ops[3].kind = static_cast<quant::runtime::OpKind>(99);  // a kind added to the graph but not here
  CHECK_THROWS_WITH_AS(quant::export_onnx(model), "export: op 3 'features.3' (unknown) cannot be exported to ONNX",
                       Error);

  // A user-registered float layer kind.
  nn::register_layer_kind({.name = "OnnxTestSquare",
                           .attributes = "",
                           .min_inputs = 1,
                           .max_inputs = 1,
                           .build = [](nn::Attributes& a, const nn::LayerContext&) {
                             a.finish("");
                             return std::make_shared<nn::ReLU>();
                           }});
  const auto custom = nn::build_model(nn::parse_description(R"({"format": "lowbit-model", "version": 1,
    "name": "custom", "input": {"channels": 1, "height": 4, "width": 4}, "classes": 3, "nodes": [
      {"name": "sq", "kind": "OnnxTestSquare"}, {"name": "f", "kind": "Flatten"},
      {"name": "fc", "kind": "Linear", "out_features": 3}]})",
                                                            "test"));
  CHECK_THROWS_WITH_AS(quant::export_onnx(*custom, kNorm),
                       doctest::Contains("node 'sq' (OnnxTestSquare) cannot be exported to ONNX"), Error);
}

TEST_CASE("export onnx: the program writes one file or, on any error, one line and nothing") {
  TempDir dir("export_onnx_app");
  auto run = [&](const std::string& args) {
    const int code =
        shell(std::string(LOWBIT_BIN_DIR) + "/export " + args + " >" + (dir / "out.txt") + " 2>" + (dir / "err.txt"));
    return std::pair{code, text_of(dir / "err.txt")};
  };
  const std::string out = dir / "out";
  fs::create_directories(out);
  quant::save_int_model(dir / "tiny.int8.safetensors", fuzz::tiny_int_model());
  data_fixtures::write_bytes(dir / "corrupt.int8.safetensors", std::vector<uint8_t>{1, 2, 3, 4, 5, 6, 7, 8, 9});
  struct Case {
    std::string args, message;
  };
  const std::string tiny = dir / "tiny.int8.safetensors";
  for (const Case& c : {
           Case{"--model " + (dir / "corrupt.int8.safetensors") + " --out " + out + "/m.onnx", "corrupt"},
           Case{"--model " + (dir / "absent.int8.safetensors") + " --out " + out + "/m.onnx", "does not exist"},
           Case{"--model " + tiny + " --out " + out + "/missing/m.onnx", "does not exist"},
           Case{"--model " + tiny + " --out " + out, "is a folder"},
           Case{"--model " + tiny + " --out " + out + "/m.onnx --prefix x", "--prefix"},
       }) {
    CAPTURE(c.args);
    const auto [code, err] = run("--format onnx " + c.args);
    CHECK(code == 1);
    CHECK(std::count(err.begin(), err.end(), '\n') == 1);
    CHECK(err.starts_with("export: error: "));
    CHECK(err.find(c.message) != std::string::npos);
    CHECK(fs::is_empty(out));
  }
  // A QAT checkpoint: its integer model or its float checkpoint is what exports.
  manual_seed(6);
  const auto float_model = nn::build_model("mlp");
  const auto qat = quant::prepare_qat(*float_model, quant::parse_bits("w8a8"));
  nn::save_checkpoint(dir / "mlp.qat.safetensors", *qat,
                      apps::model_metadata(float_model->description, kNorm, &qat->config));
  const auto [qat_code, qat_err] =
      run("--format onnx --model " + (dir / "mlp.qat.safetensors") + " --out " + out + "/m.onnx");
  CHECK(qat_code == 1);
  CHECK(qat_err.find("this is a QAT checkpoint") != std::string::npos);
  CHECK(fs::is_empty(out));

  // A float checkpoint: the fp32 model, rebuilt from the file, gives the bytes of the model it was saved from.
  nn::save_checkpoint(dir / "mlp.safetensors", *float_model,
                      apps::model_metadata(float_model->description, kNorm, nullptr));
  const auto [float_code, float_err] =
      run("--format onnx --model " + (dir / "mlp.safetensors") + " --out " + out + "/mlp.fp32.onnx");
  CHECK_MESSAGE(float_code == 0, float_err);
  CHECK(text_of(out + "/mlp.fp32.onnx") == quant::export_onnx(*float_model, kNorm).bytes);
  fs::remove(out + "/mlp.fp32.onnx");

  // A valid integer model: exactly the file, the bytes export_onnx gives.
  const auto [code, err] = run("--format onnx --model " + tiny + " --out " + out + "/tiny.onnx");
  CHECK_MESSAGE(code == 0, err);
  CHECK(text_of(out + "/tiny.onnx") == quant::export_onnx(fuzz::tiny_int_model()).bytes);
  CHECK(std::distance(fs::directory_iterator(out), fs::directory_iterator()) == 1);
}

TEST_CASE("export onnx: trained models on the Fashion-MNIST test set (LOWBIT_ONNX_MODELS, for reports)") {
  // LOWBIT_ONNX_MODELS="out/lenet5.qat.int8.safetensors out/lenet5.qat.fp32.safetensors ..." checks those files on
  // the whole test set (LOWBIT_ONNX_DATA, default the Debian data set): integer models against the reference
  // executor, float checkpoints against lowbit's float forward. docs/onnx.md reports its numbers.
  const char* list = std::getenv("LOWBIT_ONNX_MODELS");
  if (!list || !*list) return;  // a measurement on request, not part of the suite
  if (!have_onnx_runtime()) return;
  const char* data_dir = std::getenv("LOWBIT_ONNX_DATA");
  const data::MnistData data = data::load_mnist(data_dir && *data_dir ? data_dir : data::kDefaultDataDir);
  const data::IdxImages& images = data.test.images;
  TempDir dir("export_onnx_report");
  data_fixtures::write_bytes(dir / "test.idx", data_fixtures::idx_images_bytes(images));
  std::istringstream paths(list);
  for (std::string path; paths >> path;) {
    CAPTURE(path);
    const std::string onnx_path = dir / (fs::path(path).stem().string() + ".onnx");
    const std::string reference = dir / "reference.txt";
    const apps::LoadedModel m = apps::load_model_file(path);
    const bool integer = m.kind == "int";
    REQUIRE_MESSAGE((integer || m.kind == "float"), path, " is a ", m.kind, " model");
    if (integer) {
      const quant::IntModel& model = *m.int_model;
      quant::write_onnx(quant::export_onnx(model), onnx_path);
      quant::runtime::Executor executor(model.graph, 1, quant::runtime::Executor::Kernels::Reference);
      const auto codes = executor.run(images.pixels, images.count);
      write_logits(reference, std::vector<int8_t>(codes.begin(), codes.end()), model.num_classes());
    } else {
      nn::Model& model = *m.float_model;
      quant::write_onnx(quant::export_onnx(model, m.norm), onnx_path);
      std::vector<float> logits;
      NoGradGuard no_grad;
      constexpr int64_t kBatch = 500;
      const int64_t size = images.image_size();
      for (int64_t first = 0; first < images.count; first += kBatch) {
        const int64_t n = std::min(kBatch, images.count - first);
        Tensor x = Tensor::empty({n, images.channels, images.rows, images.cols});
        for (int64_t i = 0; i < n * size; ++i)
          x.values()[static_cast<size_t>(i)] =
              normalize_pixel(images.pixels[static_cast<size_t>(first * size + i)], m.norm);
        const Tensor y = model.forward(x);
        logits.insert(logits.end(), y.values().begin(), y.values().end());
      }
      write_logits(reference, logits, static_cast<int64_t>(logits.size()) / images.count);
    }
    const nlohmann::json r = run_in_onnx_runtime(onnx_path, dir / "test.idx", reference);
    MESSAGE(path, ": ", r.dump());
    CHECK(r["images"] == images.count);
    if (integer) {
      CHECK(r["agreement"].get<double>() >= 0.999);
      CHECK(r["max_logit_diff"].get<int64_t>() <= kMaxLogitDiffLsb);
    } else {
      CHECK(r["max_logit_diff"].get<double>() <= kFloatTolerance);
    }
  }
}
