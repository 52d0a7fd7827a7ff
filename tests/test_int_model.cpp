// Tests for the integer model file: exact round trips, one test per kind of corrupt file, truncation.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/normalize.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "nn/layers.h"
#include "quant/convert.h"
#include "quant/int_model.h"
#include "quant/qat.h"
#include "quant/runtime/executor.h"
#include "quant/runtime/int4.h"

namespace fs = std::filesystem;
using namespace lowbit;
using namespace lowbit::quant;
using json = nlohmann::json;
using runtime::Op;
using runtime::OpKind;

namespace {

// A fresh folder under the system temp folder, removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag)
      : path(fs::temp_directory_path() / ("lowbit_test_int_model_" + tag + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

std::vector<std::byte> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(text.size());
  std::memcpy(bytes.data(), text.data(), text.size());
  return bytes;
}

Op weighted(OpKind kind, std::string name, int bits, int64_t in, int64_t out, int64_t kernel, int64_t padding,
            int32_t z_in, int32_t z_out, int32_t act_min) {
  Op op;
  op.kind = kind;
  op.name = std::move(name);
  op.weight_bits = bits;
  op.in_channels = in;
  op.out_channels = out;
  op.kernel = kernel;
  op.padding = padding;
  op.input_zero_point = z_in;
  const int64_t row = runtime::weight_row_length(op);
  std::vector<int8_t> codes(static_cast<size_t>(out * row));
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<int8_t>(static_cast<int>(i * 7 % 13) - 6);
  if (bits == 8) {
    op.weight = codes;
  } else {  // packed row by row (int4.h)
    const size_t row_bytes = runtime::int4_packed_size(static_cast<size_t>(row));
    op.weight.resize(static_cast<size_t>(out) * row_bytes);
    for (int64_t c = 0; c < out; ++c) {
      runtime::pack_int4(std::span<const int8_t>(codes).subspan(c * row, row),
                         std::span<int8_t>(op.weight).subspan(c * row_bytes, row_bytes));
    }
  }
  for (int64_t c = 0; c < out; ++c) op.bias.push_back(static_cast<int32_t>(100 * c - 50));
  op.requant.zero_point = z_out;
  op.requant.act_min = act_min;
  op.requant.act_max = 127;
  return op;
}

Op window(OpKind kind, std::string name, int64_t kernel, int64_t stride, int64_t padding, int32_t z = 0) {
  Op op;
  op.kind = kind;
  op.name = std::move(name);
  op.kernel = kernel;
  op.stride = stride;
  op.padding = padding;
  // The zero point of the codes it passes on (for max pool and flatten the file does not store it: the
  // loader sets it from the chain).
  op.input_zero_point = z;
  op.requant.zero_point = z;
  return op;
}

// Input (1, 7, 7) → Conv2d 8-bit 1→3 k3 pad1 +ReLU → MaxPool 2 → AvgPool 3 s1 pad1 → Flatten (27)
// → Linear 4-bit 27→5 (odd rows: padding nibbles) → Linear 8-bit 5→3.
IntModel small_model() {
  IntModel m;
  m.model_name = "tiny";
  m.mode = "mixed";
  m.norm = {0.2860f, 0.3530f};
  m.input_scale = 0.0173f;
  m.input_zero_point = -10;
  m.output_scale = 0.125f;
  m.graph.in_channels = 1;
  m.graph.in_height = 7;
  m.graph.in_width = 7;
  Op input;
  input.kind = OpKind::Input;
  input.name = "input";
  input.input_table = make_input_table(m.norm, {m.input_scale, m.input_zero_point}, m.input_range);
  m.graph.ops.push_back(input);
  m.graph.ops.push_back(weighted(OpKind::Conv2d, "features.0", 8, 1, 3, 3, 1, -10, -128, -128));
  m.graph.ops.push_back(window(OpKind::MaxPool2d, "features.2", 2, 2, 0, -128));
  m.graph.ops.push_back(window(OpKind::AvgPool2d, "features.3", 3, 1, 1, -128));
  m.graph.ops.push_back(window(OpKind::Flatten, "flatten", 1, 1, 0, -128));
  m.graph.ops.push_back(weighted(OpKind::Linear, "classifier.0", 4, 27, 5, 1, 0, -128, -3, -3));
  m.graph.ops.push_back(weighted(OpKind::Linear, "classifier.2", 8, 5, 3, 1, 0, -3, 2, -128));
  m.op_output_scales = {0.0173f, 0.05f, 0.05f, 0.05f, 0.05f, 0.1f, 0.125f};
  // Requantization scales M[c] = 0.004 + 0.0005·c for the weighted ops, and the multipliers they give.
  for (Op& op : m.graph.ops) {
    std::vector<float> scales;
    const bool weighted = op.kind == OpKind::Conv2d || op.kind == OpKind::Linear;
    for (int64_t c = 0; weighted && c < op.out_channels; ++c)
      scales.push_back(0.004f + 0.0005f * static_cast<float>(c));
    set_requant_from_scales(op, scales);
    m.op_requant_scales.push_back(scales);
  }
  runtime::chain_inputs(m.graph);
  return m;
}

void check_same(const IntModel& a, const IntModel& b) {
  CHECK(a.model_name == b.model_name);
  CHECK(a.mode == b.mode);
  CHECK(a.norm.mean == b.norm.mean);
  CHECK(a.norm.std == b.norm.std);
  CHECK(a.input_scale == b.input_scale);
  CHECK(a.input_zero_point == b.input_zero_point);
  CHECK(a.input_range.qmin == b.input_range.qmin);
  CHECK(a.input_range.qmax == b.input_range.qmax);
  CHECK(a.output_scale == b.output_scale);
  CHECK(a.op_output_scales == b.op_output_scales);
  CHECK(a.op_requant_scales == b.op_requant_scales);
  CHECK(a.graph.in_channels == b.graph.in_channels);
  CHECK(a.graph.in_height == b.graph.in_height);
  CHECK(a.graph.in_width == b.graph.in_width);
  REQUIRE(a.graph.ops.size() == b.graph.ops.size());
  for (size_t i = 0; i < a.graph.ops.size(); ++i) {
    INFO("op ", i);
    const Op &x = a.graph.ops[i], &y = b.graph.ops[i];
    CHECK(x.kind == y.kind);
    CHECK(x.name == y.name);
    CHECK(x.input_table == y.input_table);
    CHECK(x.weight_bits == y.weight_bits);
    CHECK(x.in_channels == y.in_channels);
    CHECK(x.out_channels == y.out_channels);
    CHECK(x.kernel == y.kernel);
    CHECK(x.stride == y.stride);
    CHECK(x.padding == y.padding);
    CHECK(x.weight == y.weight);
    CHECK(x.bias == y.bias);
    CHECK(x.input_zero_point == y.input_zero_point);
    CHECK(x.requant.multiplier == y.requant.multiplier);
    CHECK(x.requant.shift == y.requant.shift);
    CHECK(x.requant.zero_point == y.requant.zero_point);
    CHECK(x.requant.act_min == y.requant.act_min);
    CHECK(x.requant.act_max == y.requant.act_max);
  }
}

// The error message loading `file` gives; fails the test if it loads or throws anything else.
std::string load_error(const StFile& file, const TempDir& dir) {
  const std::string path = dir / "bad.int.safetensors";
  save_safetensors(path, file);
  try {
    load_int_model(path);
  } catch (const Error& e) {
    const std::string message = e.what();
    CHECK_MESSAGE(message.find(path) != std::string::npos, "the message names the path: ", message);
    CHECK_MESSAGE(message.find('\n') == std::string::npos, "one line: ", message);
    return message;
  }
  FAIL("the corrupt file loaded");
  return "";
}

// The container of a good file, to be corrupted by each test.
StFile good_file(const TempDir& dir) {
  const std::string path = dir / "good.int.safetensors";
  save_int_model(path, small_model());
  return load_safetensors(path);
}

// Loads a copy of the good file whose graph JSON was edited by `edit`; returns the error message.
std::string graph_error(const TempDir& dir, const std::function<void(json&)>& edit) {
  StFile file = good_file(dir);
  json graph = json::parse(file.metadata.at("graph"));
  edit(graph);
  file.metadata["graph"] = graph.dump();
  return load_error(file, dir);
}

StTensor& tensor(StFile& file, const std::string& name) {
  for (auto& [n, t] : file.tensors) {
    if (n == name) return t;
  }
  FAIL("no tensor ", name);
  throw;
}

#define CHECK_CONTAINS(message, phrase) CHECK_MESSAGE((message).find(phrase) != std::string::npos, (message))

}  // namespace

// ---- round trip ----------------------------------------------------------------------------------

TEST_CASE("int model: save / load round trip is exact, file size, num_classes") {
  TempDir dir("roundtrip");
  const IntModel model = small_model();
  const std::string path = dir / "tiny.int.safetensors";
  save_int_model(path, model);
  const IntModel loaded = load_int_model(path);
  check_same(model, loaded);
  CHECK(loaded.num_classes() == 3);
  CHECK(int_model_file_bytes(path) == static_cast<int64_t>(fs::file_size(path)));
  CHECK(int_model_file_bytes(path) > 256);

  // The bytes in memory parse to the same model; the tags are in the metadata.
  const auto bytes = read_bytes(path);
  check_same(model, parse_int_model(bytes, path));
  StFile file = load_safetensors(path);
  CHECK(file.metadata.at("format") == kIntModelFormat);
  CHECK(file.metadata.at("format_version") == "4");
  CHECK(file.find("ops.0.input_table") == nullptr);  // derived at load from the graph JSON
  CHECK(tensor(file, "ops.1.scale").dtype == DType::F32);
  CHECK(tensor(file, "ops.1.scale").shape == std::vector<int64_t>{3});
  CHECK(tensor(file, "ops.1.bias").dtype == DType::I16);  // biases −50, 50, 150 fit int16
  CHECK(tensor(file, "ops.5.weight").dtype == DType::U8);
  CHECK(tensor(file, "ops.5.weight").shape == std::vector<int64_t>{5, 14});
  CHECK(tensor(file, "ops.1.weight").shape == std::vector<int64_t>{3, 1, 3, 3});

  // Saving the loaded model gives the same bytes.
  save_int_model(dir / "again.int.safetensors", loaded);
  CHECK(read_bytes(dir / "again.int.safetensors") == bytes);

  // And the loaded graph computes what the original computes.
  std::vector<uint8_t> images(2 * 49);
  for (size_t i = 0; i < images.size(); ++i) images[i] = static_cast<uint8_t>(i * 37 % 256);
  runtime::Executor a(model.graph), b(loaded.graph);
  const auto la = a.run(images, 2);
  const std::vector<int8_t> logits_a(la.begin(), la.end());
  const auto lb = b.run(images, 2);
  CHECK(logits_a == std::vector<int8_t>(lb.begin(), lb.end()));
}

TEST_CASE("int model: float report fields round trip bit for bit (shortest decimal in the JSON)") {
  TempDir dir("floats");
  const std::string path = dir / "f.int.safetensors";
  uint32_t state = 12345;
  for (int trial = 0; trial < 200; ++trial) {
    IntModel model = small_model();
    std::vector<float*> fields = {&model.input_scale, &model.output_scale, &model.norm.std};
    for (auto& s : model.op_output_scales) fields.push_back(&s);
    for (float* field : fields) {
      state = state * 1664525u + 1013904223u;
      uint32_t bits = state & 0x7F7FFFFFu;  // positive, exponent below 255: finite
      if (bits == 0) bits = 1;
      std::memcpy(field, &bits, 4);
    }
    model.norm.mean = -model.output_scale;
    model.graph.ops[0].input_table =
        make_input_table(model.norm, {model.input_scale, model.input_zero_point}, model.input_range);
    save_int_model(path, model);
    check_same(model, load_int_model(path));
  }
  IntModel readable = small_model();
  save_int_model(path, readable);
  CHECK_CONTAINS(load_safetensors(path).metadata.at("graph"), "\"input_scale\":0.0173,");
}

TEST_CASE("int model: save refuses an invalid model and leaves the old file untouched") {
  TempDir dir("save");
  const std::string path = dir / "m.int.safetensors";
  save_int_model(path, small_model());
  const auto before = read_bytes(path);

  IntModel nan_scale = small_model();
  nan_scale.op_output_scales[2] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(save_int_model(path, nan_scale), doctest::Contains("refusing to write"), Error);

  IntModel short_scales = small_model();
  short_scales.op_output_scales.pop_back();
  CHECK_THROWS_WITH_AS(save_int_model(path, short_scales), doctest::Contains("one entry per op"), Error);

  IntModel overflow = small_model();
  overflow.graph.ops[1].bias[0] = std::numeric_limits<int32_t>::max();
  CHECK_THROWS_WITH_AS(save_int_model(path, overflow), doctest::Contains("accumulator could overflow"), Error);

  // The file stores what the table and the multipliers are derived from; a graph that does not match them
  // would load back as a different graph.
  IntModel own_table = small_model();
  own_table.graph.ops[0].input_table[7] += 1;
  CHECK_THROWS_WITH_AS(save_int_model(path, own_table),
                       doctest::Contains("the input table of op 0 'input' is not make_input_table"), Error);
  IntModel own_multiplier = small_model();
  own_multiplier.graph.ops[5].requant.multiplier[2] += 1;
  CHECK_THROWS_WITH_AS(save_int_model(path, own_multiplier),
                       doctest::Contains("multipliers and shifts of op 5 'classifier.0' are not the ones"), Error);
  IntModel own_scale = small_model();
  own_scale.op_requant_scales[6][0] *= 2.f;  // the multipliers still hold the old scale
  CHECK_THROWS_WITH_AS(save_int_model(path, own_scale), doctest::Contains("are not the ones"), Error);
  IntModel no_scales = small_model();
  no_scales.op_requant_scales[1].pop_back();
  CHECK_THROWS_WITH_AS(save_int_model(path, no_scales), doctest::Contains("needs 3 stored scales"), Error);
  no_scales.op_requant_scales.pop_back();
  CHECK_THROWS_WITH_AS(save_int_model(path, no_scales), doctest::Contains("op_requant_scales needs one entry per op"),
                       Error);

  CHECK(read_bytes(path) == before);
}

TEST_CASE("int model: bias is stored as I16 when every value of the op fits, else as I32; both load back") {
  TempDir dir("bias");
  const std::string path = dir / "b.int.safetensors";
  const auto bias_dtype = [&](const IntModel& model, const char* name) {
    save_int_model(path, model);
    check_same(model, load_int_model(path));
    StFile file = load_safetensors(path);
    return tensor(file, name).dtype;
  };
  IntModel model = small_model();
  model.graph.ops[6].bias = {-32768, 0, 32767};  // the int16 limits still fit
  CHECK(bias_dtype(model, "ops.6.bias") == DType::I16);
  model.graph.ops[6].bias = {-32769, 0, 5};  // one value outside int16: the whole op is I32
  CHECK(bias_dtype(model, "ops.6.bias") == DType::I32);
  CHECK(bias_dtype(model, "ops.1.bias") == DType::I16);  // the rule is per op
  model.graph.ops[6].bias = {1, 32768, 5};
  CHECK(bias_dtype(model, "ops.6.bias") == DType::I32);
  model.graph.ops[6].bias = {std::numeric_limits<int32_t>::min() / 2, 7, 8};
  CHECK(bias_dtype(model, "ops.6.bias") == DType::I32);

  // A reader takes an I32 bias whose values would fit I16 (another writer's choice) and widens nothing.
  save_int_model(path, small_model());
  StFile file = load_safetensors(path);
  tensor(file, "ops.1.bias") = make_st_tensor<int32_t>(DType::I32, {3}, small_model().graph.ops[1].bias);
  save_safetensors(path, file);
  check_same(small_model(), load_int_model(path));
}

TEST_CASE("int model: the input table is derived at load from norm, input qparams and input range") {
  TempDir dir("input_table");
  const std::string path = dir / "t.int.safetensors";
  IntModel model = small_model();
  // A 4-bit input: codes in [−8, 7]; the table follows the range written in the graph JSON.
  model.input_range = {-8, 7};
  model.input_zero_point = -3;
  model.input_scale = 0.1f;
  model.graph.ops[1].input_zero_point = -3;
  model.graph.ops[0].input_table = make_input_table(model.norm, {0.1f, -3}, {-8, 7});
  save_int_model(path, model);
  const IntModel loaded = load_int_model(path);
  check_same(model, loaded);
  const auto& table = loaded.graph.ops[0].input_table;
  CHECK(table[0] == -8);   // (0 − 0.286)/0.353 = −0.81: −8.1 steps, −3 − 8 = −11, clamped to −8
  CHECK(table[73] == -3);  // 73/255 = 0.2863 ≈ the mean: real 0 is the zero point
  CHECK(table[255] == 7);  // (1 − 0.286)/0.353 = 2.02: 20.2 steps, −3 + 20 = 17, clamped to 7
  const json graph = json::parse(load_safetensors(path).metadata.at("graph"));
  CHECK(graph.at("input_qmin") == -8);
  CHECK(graph.at("input_qmax") == 7);

  // eq. 9 by hand for the 8-bit default: table[p] = clamp(round(((p/255 − mean)/std)/s) + z, −128, 127).
  const IntModel eight = small_model();
  for (int p = 0; p < 256; ++p) {
    CAPTURE(p);
    const float x = (static_cast<float>(p) / 255.f - 0.2860f) / 0.3530f;
    const float q = std::round(x / 0.0173f) - 10.f;
    CHECK(eight.graph.ops[0].input_table[static_cast<size_t>(p)] == static_cast<int>(std::clamp(q, -128.f, 127.f)));
  }

  CHECK_CONTAINS(graph_error(dir,
                             [](json& g) {
                               g["input_qmin"] = 5;
                               g["input_qmax"] = 4;
                             }),
                 "'input_qmax' must be in [5, 127], found 4");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["input_qmin"] = -129; }), "'input_qmin' must be in [-128, 127]");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["input_qmax"] = -20; }),
                 "'input_zero_point' must be in [-128, -20], found -10");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g.erase("input_qmax"); }), "field 'input_qmax' missing");
}

TEST_CASE("int model: a requantization scale gives exactly m·2^(−n) = the float32 scale") {
  // quantize_multiplier of a float32: its 24-bit mantissa fits m's 31 bits, so nothing is rounded.
  uint32_t state = 99;
  for (int trial = 0; trial < 2000; ++trial) {
    state = state * 1664525u + 1013904223u;
    const float scale = std::ldexp(1.f + static_cast<float>(state >> 9) * 0x1p-23f, -static_cast<int>(state % 31));
    Op op;
    op.name = "fc";
    set_requant_from_scales(op, std::vector<float>{scale});
    CAPTURE(scale);
    CHECK(std::ldexp(static_cast<double>(op.requant.multiplier[0]), -op.requant.shift[0]) ==
          static_cast<double>(scale));
    CHECK((op.requant.multiplier[0] & 0x7F) == 0);  // the 7 bits below a float's mantissa are zero
  }
  Op op;
  op.name = "fc";
  CHECK_THROWS_WITH_AS(set_requant_from_scales(op, std::vector<float>{0.5f, 0.f}),
                       doctest::Contains("op 'fc', output channel 1: requantization multiplier 0 must be finite"),
                       Error);
  // requant_scale rounds s_in·s_w/s_out, computed in double, once to float32.
  CHECK(requant_scale(0.02f, 0.004f, 0.05f) ==
        static_cast<float>(static_cast<double>(0.02f) * static_cast<double>(0.004f) / static_cast<double>(0.05f)));
}

TEST_CASE("int model: convert, then save and load, gives the identical graph (int8, W4A8, W4A4)") {
  TempDir dir("convert");
  constexpr int64_t kH = 6, kW = 6;
  const Normalization norm{0.2860f, 0.3530f};
  for (const char* bits : {"w8a8", "w4a8", "w4a4"}) {
    CAPTURE(bits);
    manual_seed(21);
    Rng rng(22);
    nn::Model float_model(nn::parse_description(R"({"format": "lowbit-model", "version": 1, "name": "tiny",
      "input": {"channels": 1, "height": 6, "width": 6}, "classes": 5, "nodes": [
        {"name": "0", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "padding": 1, "bias": false},
        {"name": "1", "kind": "BatchNorm2d"}, {"name": "2", "kind": "ReLU"}, {"name": "3", "kind": "MaxPool2d", "kernel": 2},
        {"name": "4", "kind": "Flatten"}, {"name": "5", "kind": "Linear", "out_features": 8}, {"name": "6", "kind": "ReLU"},
        {"name": "7", "kind": "Linear", "out_features": 5}]})",
                                                "tiny"));
    float_model.eval();
    const auto qat = prepare_qat(float_model, parse_bits(bits));
    Calibrator calibrator(*qat);
    for (int b = 0; b < 3; ++b) {
      Tensor x = Tensor::empty({16, 1, kH, kW});
      for (float& v : x.values()) v = normalize_pixel(static_cast<uint8_t>(rng.below(256)), norm);
      calibrator.observe(x);
    }
    calibrator.finish();
    qat->eval();
    const IntModel converted = convert(*qat, norm, {1, kH, kW});
    const std::string path = dir / (std::string(bits) + ".int.safetensors");
    save_int_model(path, converted);
    const IntModel loaded = load_int_model(path);
    check_same(converted, loaded);  // input table, multipliers and shifts included

    // The input table is the fake-quant input node's codes: pixel p → code q with s·(q − z) = QuantInput(x).
    auto input = std::dynamic_pointer_cast<QuantInput>(qat->layers->at(0));
    REQUIRE(input);
    Tensor pixels = Tensor::empty({256});
    for (int p = 0; p < 256; ++p) pixels.data()[p] = normalize_pixel(static_cast<uint8_t>(p), norm);
    Tensor fake_quantized;
    {
      NoGradGuard no_grad;
      fake_quantized = input->forward(pixels);
    }
    for (int p = 0; p < 256; ++p) {
      CAPTURE(p);
      const float expected = dequantize(loaded.graph.ops[0].input_table[static_cast<size_t>(p)],
                                        {loaded.input_scale, loaded.input_zero_point});
      CHECK(fake_quantized.data()[p] == expected);
    }
    // Every multiplier is its stored float32 scale, exactly.
    for (size_t i = 0; i < loaded.graph.ops.size(); ++i) {
      const Op& op = loaded.graph.ops[i];
      for (size_t c = 0; c < op.requant.multiplier.size(); ++c) {
        CHECK(std::ldexp(static_cast<double>(op.requant.multiplier[c]), -op.requant.shift[c]) ==
              static_cast<double>(loaded.op_requant_scales[i][c]));
      }
    }
  }
}

TEST_CASE("int model: missing file and file size errors name the path") {
  TempDir dir("missing");
  const std::string path = dir / "nope.int.safetensors";
  CHECK_THROWS_WITH_AS(load_int_model(path), doctest::Contains("nope.int.safetensors"), Error);
  CHECK_THROWS_WITH_AS(int_model_file_bytes(path), doctest::Contains("cannot read the file size"), Error);
}

// ---- metadata --------------------------------------------------------------------------------------

TEST_CASE("int model: format tag and version") {
  TempDir dir("format");
  StFile file = good_file(dir);
  file.metadata["format"] = "lowbit-checkpoint";
  CHECK_CONTAINS(load_error(file, dir),
                 "not a lowbit integer model (format 'lowbit-checkpoint'): float checkpoints are converted with "
                 "eval --int8 --model FILE");
  file.metadata["format"] = "something-else";
  CHECK_CONTAINS(load_error(file, dir), "not a lowbit integer model (format 'something-else', expected");
  file.metadata.erase("format");
  CHECK_CONTAINS(load_error(file, dir), "no 'format' in __metadata__");

  file = good_file(dir);
  file.metadata["format_version"] = "7";
  CHECK_CONTAINS(load_error(file, dir), "format version 7 is newer than this lowbit (reads 4): upgrade lowbit");
  file.metadata["format_version"] = "0";
  CHECK_CONTAINS(load_error(file, dir), "format version 0 is not supported");
  file.metadata["format_version"] = "3";  // version 3 had chains only: no inputs, no add or concat
  CHECK_CONTAINS(load_error(file, dir),
                 "format version 3 is not supported (this lowbit reads version 4 only): re-convert with this version "
                 "of lowbit");
  file.metadata["format_version"] = "1";
  CHECK_CONTAINS(load_error(file, dir), "format version 1 is not supported");
  file.metadata["format_version"] = "1.0";
  CHECK_CONTAINS(load_error(file, dir), "is not a whole number");
  file.metadata["format_version"] = "99999999999999999999";
  CHECK_CONTAINS(load_error(file, dir), "is not a whole number");
}

TEST_CASE("int model: missing, extra and bad metadata fields") {
  TempDir dir("metadata");
  for (const char* key : {"format_version", "model", "mode", "graph"}) {
    StFile file = good_file(dir);
    file.metadata.erase(key);
    CHECK_CONTAINS(load_error(file, dir), std::string("metadata field '") + key + "' missing");
  }
  StFile file = good_file(dir);
  file.metadata["norm_mean"] = "0.1";
  CHECK_CONTAINS(load_error(file, dir), "unexpected metadata field 'norm_mean'");

  file = good_file(dir);
  file.metadata["mode"] = "int3";
  CHECK_CONTAINS(load_error(file, dir), "'mode' must be one of");
  file = good_file(dir);
  file.metadata["model"] = "";
  CHECK_CONTAINS(load_error(file, dir), "metadata 'model' must be a name");
  file = good_file(dir);
  file.metadata["mode"] = "int8";  // but op 5 has 4-bit weights
  CHECK_CONTAINS(load_error(file, dir), "the mode is 'int8'");
}

// ---- the graph JSON ----------------------------------------------------------------------------------

TEST_CASE("int model: graph JSON that is not JSON, repeats keys or nests deeply") {
  TempDir dir("json");
  StFile file = good_file(dir);
  file.metadata["graph"] = "{\"ops\": [";
  CHECK_CONTAINS(load_error(file, dir), "metadata 'graph' is not valid JSON");
  file.metadata["graph"] = "[1, 2]";
  CHECK_CONTAINS(load_error(file, dir), "metadata 'graph' must be a JSON object");
  file.metadata["graph"] = "{\"a\": 1, \"a\": 2}";
  CHECK_CONTAINS(load_error(file, dir), "has the key 'a' twice");
  file.metadata["graph"] = std::string(10000, '[') + std::string(10000, ']');
  CHECK_CONTAINS(load_error(file, dir), "nests deeper than");
}

TEST_CASE("int model: missing and extra graph fields, unknown op kinds") {
  TempDir dir("fields");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g.erase("output_scale"); }), "field 'output_scale' missing");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][1].erase("stride"); }), "field 'stride' missing");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][2]["dilation"] = 1; }), "unexpected field 'dilation'");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["extra"] = 1; }), "unexpected field 'extra'");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][4]["kind"] = "relu"; }), "unknown op kind 'relu'");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][4]["kind"] = 3; }), "'kind' must be a string");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][4] = 3; }), "graph op 4: must be a JSON object");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"] = json::array(); }), "'ops' must have 2 to 4096 entries");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["input_shape"] = {1, 7}; }), "'input_shape' must have 3 entries");
}

TEST_CASE("int model: JSON types and integer ranges are checked before use") {
  TempDir dir("types");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][1]["in_channels"] = "1"; }),
                 "'in_channels' must be an integer in [1, 65536], found string");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][1]["in_channels"] = 1.0; }),
                 "'in_channels' must be an integer");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][1]["out_channels"] = -3; }),
                 "'out_channels' must be in [1, 65536], found -3");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][5]["out_channels"] = int64_t{1} << 40; }),
                 "'out_channels' must be in [1, 65536]");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][5]["in_channels"] = std::numeric_limits<uint64_t>::max(); }),
                 "'in_channels' must be in [1, 65536], found 18446744073709551615");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][1]["kernel"] = 1000; }), "'kernel' must be in [1, 64]");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][2]["stride"] = 0; }), "'stride' must be in [1, 64]");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["input_shape"][1] = 1 << 20; }),
                 "'input_shape[1] (H)' must be in [1, 65536]");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][5]["weight_bits"] = 5; }), "'weight_bits' must be 8 or 4");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][1]["name"] = json::array(); }), "'name' must be a string");
}

TEST_CASE("int model: NaN, infinite, zero and negative scales") {
  TempDir dir("scales");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["output_scale"] = nullptr; }),  // how a NaN would be dumped
                 "'output_scale' must be a finite number > 0, found null");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["input_scale"] = "nan"; }), "'input_scale' must be a finite number");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["input_scale"] = 0.0; }),
                 "'input_scale' must be a finite number > 0");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][3]["output_scale"] = -0.5; }),
                 "'output_scale' must be a finite number > 0, found -0.5");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][1]["output_scale"] = 1e39; }),  // overflows float
                 "'output_scale' must be a finite number > 0");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][5]["output_scale"] = 1e-50; }),  // underflows float
                 "'output_scale' must be a finite number > 0");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["norm_std"] = 0; }), "'norm_std' must be a finite number > 0");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["input_shape"].erase(0); }),
                 "'input_shape' must have 3 entries, found 2");
  // A NaN written into the raw JSON text is not JSON at all.
  TempDir dir2("scales_text");
  StFile file = good_file(dir2);
  json graph = json::parse(file.metadata.at("graph"));
  graph["output_scale"] = 12345.5;
  std::string text = graph.dump();
  text.replace(text.find("12345.5"), 7, "NaN");
  file.metadata["graph"] = text;
  CHECK_CONTAINS(load_error(file, dir2), "not valid JSON");
}

TEST_CASE("int model: zero points and clamps out of range, zero points that do not chain") {
  TempDir dir("zero_points");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["input_zero_point"] = 200; }),
                 "'input_zero_point' must be in [-128, 127], found 200");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][6]["zero_point"] = -129; }),
                 "'zero_point' must be in [-128, 127]");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][6]["act_max"] = 300; }), "'act_max' must be in [-128, 127]");
  // z_out outside [act_min, act_max] (validate()).
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][6]["act_min"] = 10; }), "requant.zero_point must be in [10");
  // The first Conv2d must read the input codes with their zero point.
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][1]["input_zero_point"] = 0; }),
                 "input_zero_point 0 must equal the zero point -10 of its input 'input'");
  // An AvgPool2d and a Linear must use the zero point of the op that produced their input.
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][3]["input_zero_point"] = 0; }),
                 "input_zero_point 0 must equal the zero point -128 of its input 'features.2'");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][6]["input_zero_point"] = 0; }),
                 "input_zero_point 0 must equal the zero point -3 of its input 'classifier.0'");
}

TEST_CASE("int model: op order: one Input first, inputs that name earlier ops") {
  TempDir dir("order");
  {  // op 0 is not an Input (and its table is gone)
    StFile file = good_file(dir);
    json graph = json::parse(file.metadata.at("graph"));
    graph["ops"][0]["kind"] = "flatten";
    file.metadata["graph"] = graph.dump();
    CHECK_CONTAINS(load_error(file, dir), "graph op 0 must be an 'input' op, found 'flatten'");
  }
  {  // a second Input op
    StFile file = good_file(dir);
    json graph = json::parse(file.metadata.at("graph"));
    graph["ops"][4]["kind"] = "input";
    file.metadata["graph"] = graph.dump();
    CHECK_CONTAINS(load_error(file, dir), "graph op 4 'flatten' is an 'input' op; only op 0 may be");
  }
  {  // an input that names no op (dangling)
    StFile file = good_file(dir);
    json graph = json::parse(file.metadata.at("graph"));
    graph["ops"][6]["inputs"] = {"nowhere"};
    file.metadata["graph"] = graph.dump();
    CHECK_CONTAINS(load_error(file, dir), "input 'nowhere' is not the name of an earlier op");
  }
  {  // an input that names a later op (ops out of order, or a cycle)
    StFile file = good_file(dir);
    json graph = json::parse(file.metadata.at("graph"));
    graph["ops"][5]["inputs"] = {"classifier.2"};
    file.metadata["graph"] = graph.dump();
    CHECK_CONTAINS(load_error(file, dir), "input 'classifier.2' is not the name of an earlier op");
  }
  {  // two ops of the same name
    StFile file = good_file(dir);
    json graph = json::parse(file.metadata.at("graph"));
    graph["ops"][3]["name"] = "features.2";
    graph["ops"][4]["inputs"] = {"features.2"};
    file.metadata["graph"] = graph.dump();
    CHECK_CONTAINS(load_error(file, dir), "the name 'features.2' is used by an earlier op");
  }
  {  // a linear with two inputs
    StFile file = good_file(dir);
    json graph = json::parse(file.metadata.at("graph"));
    graph["ops"][6]["inputs"] = {"classifier.0", "flatten"};
    file.metadata["graph"] = graph.dump();
    CHECK_CONTAINS(load_error(file, dir), "'inputs' must have 1 entries, found 2");
  }
}

TEST_CASE("int model: shapes that do not chain") {
  TempDir dir("chain");
  // A 9×9 input gives 3·4·4 = 48 features after the pools, not the 27 the first Linear takes.
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["input_shape"] = {1, 9, 9}; }), "expected input (IN 27, 1, 1)");
  // Two input channels, but the Conv2d takes one.
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["input_shape"] = {2, 7, 7}; }), "expected 1 input channels");
  // A pooling window that does not fit.
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][2]["kernel"] = 9; }), "does not fit input");
}

// ---- tensors -------------------------------------------------------------------------------------

TEST_CASE("int model: tensors missing, extra, of the wrong dtype or shape") {
  TempDir dir("tensors");
  for (const char* name : {"ops.1.weight", "ops.1.bias", "ops.1.scale", "ops.5.scale", "ops.6.bias"}) {
    StFile file = good_file(dir);
    std::erase_if(file.tensors, [&](const auto& t) { return t.first == name; });
    CHECK_CONTAINS(load_error(file, dir), std::string("tensor '") + name + "' missing");
  }
  StFile file = good_file(dir);
  file.tensors.emplace_back("ops.2.weight", tensor(file, "ops.1.bias"));
  CHECK_CONTAINS(load_error(file, dir), "unexpected tensor 'ops.2.weight'");
  // A version-2 input table (now derived at load) is refused, not ignored.
  file = good_file(dir);
  file.tensors.emplace_back("ops.0.input_table", make_st_tensor<int8_t>(DType::I8, {256}, std::vector<int8_t>(256)));
  CHECK_CONTAINS(load_error(file, dir), "unexpected tensor 'ops.0.input_table'");
  // So are the version-2 multiplier and shift tensors.
  file = good_file(dir);
  file.tensors.emplace_back("ops.1.shift", make_st_tensor<uint8_t>(DType::U8, {3}, std::vector<uint8_t>{36, 36, 36}));
  CHECK_CONTAINS(load_error(file, dir), "unexpected tensor 'ops.1.shift'");

  file = good_file(dir);
  tensor(file, "ops.1.weight").dtype = DType::U8;  // 8-bit weights are I8
  CHECK_CONTAINS(load_error(file, dir), "tensor 'ops.1.weight' has dtype U8, expected I8");
  file = good_file(dir);
  StTensor& bias = tensor(file, "ops.1.bias");
  bias = make_st_tensor<float>(DType::F32, {3}, std::vector<float>{1, 2, 3});
  CHECK_CONTAINS(load_error(file, dir), "tensor 'ops.1.bias' has dtype F32, expected I16 or I32");
  file = good_file(dir);
  tensor(file, "ops.1.bias") = make_st_tensor<int8_t>(DType::I8, {3}, std::vector<int8_t>{1, 2, 3});
  CHECK_CONTAINS(load_error(file, dir), "tensor 'ops.1.bias' has dtype I8, expected I16 or I32");
  file = good_file(dir);
  tensor(file, "ops.5.scale") = make_st_tensor<double>(DType::F64, {5}, std::vector<double>(5, 0.004));
  CHECK_CONTAINS(load_error(file, dir), "tensor 'ops.5.scale' has dtype F64, expected F32");

  // Packed int4 rows of 27 codes take 14 bytes; 15 is the wrong byte count.
  file = good_file(dir);
  tensor(file, "ops.5.weight") = make_st_tensor<int8_t>(DType::U8, {5, 15}, std::vector<int8_t>(75));
  CHECK_CONTAINS(load_error(file, dir), "tensor 'ops.5.weight' has shape [5, 15], expected [5, 14]");
  // The same bytes as a flat vector are the wrong shape too.
  file = good_file(dir);
  tensor(file, "ops.5.weight").shape = {70};
  CHECK_CONTAINS(load_error(file, dir), "has shape [70], expected [5, 14]");
  // The file says 8-bit weights, the tensor holds packed int4.
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][5]["weight_bits"] = 8; }),
                 "tensor 'ops.5.weight' has dtype U8, expected I8");
  file = good_file(dir);
  tensor(file, "ops.6.scale") = make_st_tensor<float>(DType::F32, {4}, std::vector<float>(4, 0.004f));
  CHECK_CONTAINS(load_error(file, dir), "tensor 'ops.6.scale' has shape [4], expected [3]");
}

TEST_CASE("int model: requantization scales that are not positive, not finite or out of the multiplier range") {
  TempDir dir("requant_scales");
  const auto scale_error = [&](const char* name, size_t channel, float value) {
    StFile file = good_file(dir);
    std::memcpy(tensor(file, name).bytes.data() + 4 * channel, &value, 4);
    return load_error(file, dir);
  };
  const float inf = std::numeric_limits<float>::infinity();
  for (const float bad : {0.f, -0.f, -0.004f, inf, -inf, std::numeric_limits<float>::quiet_NaN()}) {
    CAPTURE(bad);
    CHECK_CONTAINS(scale_error("ops.1.scale", 1, bad),
                   "tensor 'ops.1.scale': the requantization scale of output channel 1 must be a finite number > 0");
  }
  // Finite and positive, but m·2^(−n) cannot hold it: n would leave [1, 62].
  CHECK_CONTAINS(scale_error("ops.5.scale", 2, std::ldexp(1.f, -40)),
                 "tensor 'ops.5.scale': op 'classifier.0', output channel 2: requantization multiplier");
  CHECK_CONTAINS(scale_error("ops.5.scale", 2, std::ldexp(1.f, -40)), "out of the representable range");
  CHECK_CONTAINS(scale_error("ops.6.scale", 0, std::ldexp(1.f, 31)), "out of the representable range");
  CHECK_CONTAINS(scale_error("ops.6.scale", 0, 1e-45f), "out of the representable range");  // a denormal
}

TEST_CASE("int model: values validate() refuses: weights, accumulator overflow") {
  TempDir dir("values");
  StFile file = good_file(dir);
  // An I32 bias (the reader takes I32 even where I16 would do) that overflows the accumulator.
  tensor(file, "ops.1.bias") =
      make_st_tensor<int32_t>(DType::I32, {3}, std::vector<int32_t>{std::numeric_limits<int32_t>::max(), 50, 150});
  CHECK_CONTAINS(load_error(file, dir), "int32 accumulator could overflow");
  file = good_file(dir);
  tensor(file, "ops.1.weight").bytes[4] = std::byte{0x80};  // −128 is outside the symmetric int8 range
  CHECK_CONTAINS(load_error(file, dir), "must be in [-127, 127], found -128");
  file = good_file(dir);
  tensor(file, "ops.5.weight").bytes[13] |= std::byte{0x10};  // the padding nibble of row 0 (27 codes)
  CHECK_CONTAINS(load_error(file, dir), "padding (high) nibble");
}

// ---- damaged bytes ---------------------------------------------------------------------------------

TEST_CASE("int model: truncated at every byte position: an error, never a crash") {
  TempDir dir("truncated");
  const std::string path = dir / "m.int.safetensors";
  save_int_model(path, small_model());
  const auto bytes = read_bytes(path);
  for (size_t size = 0; size < bytes.size(); ++size) {
    CHECK_THROWS_AS(parse_int_model(std::span(bytes).first(size), "cut.int.safetensors"), Error);
  }
  // Truncated files on disk too, at a few positions (header length, header, data).
  for (size_t size : {size_t{0}, size_t{5}, size_t{8}, size_t{40}, bytes.size() / 2, bytes.size() - 1}) {
    std::ofstream(path, std::ios::binary | std::ios::trunc)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(size));
    CHECK_THROWS_WITH_AS(load_int_model(path), doctest::Contains("m.int.safetensors"), Error);
  }
}

TEST_CASE("int model: flipped bytes: a valid model or a lowbit::Error, nothing else") {
  TempDir dir("flipped");
  const std::string path = dir / "m.int.safetensors";
  save_int_model(path, small_model());
  const auto good = read_bytes(path);
  int errors = 0, loads = 0;
  for (size_t i = 0; i < good.size(); ++i) {
    for (const uint8_t mask : {uint8_t{0x01}, uint8_t{0x20}, uint8_t{0x80}}) {
      auto bytes = good;
      bytes[i] ^= std::byte{mask};
      try {
        const IntModel m = parse_int_model(bytes, "flipped.int.safetensors");
        runtime::validate(m.graph);  // whatever loads must be runnable
        ++loads;
      } catch (const Error&) {
        ++errors;
      }
    }
  }
  CHECK(errors > 0);
  CHECK(errors + loads == static_cast<int>(3 * good.size()));
}
