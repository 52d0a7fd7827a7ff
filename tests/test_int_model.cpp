// Tests for the integer model file: exact round trips, one test per kind of corrupt file, truncation.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/safetensors.h"
#include "quant/int_model.h"
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
  for (int64_t c = 0; c < out; ++c) {
    op.bias.push_back(static_cast<int32_t>(100 * c - 50));
    op.requant.multiplier.push_back((int32_t{1} << 30) + static_cast<int32_t>(c * 12345));
    op.requant.shift.push_back(static_cast<int32_t>(36 + c % 3));
  }
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
  op.input_zero_point = z;
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
  for (int p = 0; p < 256; ++p) input.input_table[p] = static_cast<int8_t>(p / 2 - 10 < 127 ? p / 2 - 10 : 127);
  m.graph.ops.push_back(input);
  m.graph.ops.push_back(weighted(OpKind::Conv2d, "features.0", 8, 1, 3, 3, 1, -10, -128, -128));
  m.graph.ops.push_back(window(OpKind::MaxPool2d, "features.2", 2, 2, 0));
  m.graph.ops.push_back(window(OpKind::AvgPool2d, "features.3", 3, 1, 1, -128));
  m.graph.ops.push_back(window(OpKind::Flatten, "flatten", 1, 1, 0));
  m.graph.ops.push_back(weighted(OpKind::Linear, "classifier.0", 4, 27, 5, 1, 0, -128, -3, -3));
  m.graph.ops.push_back(weighted(OpKind::Linear, "classifier.2", 8, 5, 3, 1, 0, -3, 2, -128));
  m.op_output_scales = {0.0173f, 0.05f, 0.05f, 0.05f, 0.05f, 0.1f, 0.125f};
  return m;
}

void check_same(const IntModel& a, const IntModel& b) {
  CHECK(a.model_name == b.model_name);
  CHECK(a.mode == b.mode);
  CHECK(a.norm.mean == b.norm.mean);
  CHECK(a.norm.std == b.norm.std);
  CHECK(a.input_scale == b.input_scale);
  CHECK(a.input_zero_point == b.input_zero_point);
  CHECK(a.output_scale == b.output_scale);
  CHECK(a.op_output_scales == b.op_output_scales);
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

void set_i32(StTensor& t, size_t index, int32_t value) { std::memcpy(t.bytes.data() + 4 * index, &value, 4); }

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
  CHECK(file.metadata.at("format_version") == "2");
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

  IntModel no_logits = small_model();
  no_logits.graph.ops.pop_back();
  no_logits.graph.ops.back().requant.act_min = -128;
  no_logits.op_output_scales.pop_back();
  no_logits.graph.ops.push_back(window(OpKind::Flatten, "flatten2", 1, 1, 0));
  no_logits.op_output_scales.push_back(0.1f);
  CHECK_THROWS_WITH_AS(save_int_model(path, no_logits), doctest::Contains("must be a 'linear' op"), Error);

  IntModel overflow = small_model();
  overflow.graph.ops[1].bias[0] = std::numeric_limits<int32_t>::max();
  CHECK_THROWS_WITH_AS(save_int_model(path, overflow), doctest::Contains("accumulator could overflow"), Error);

  CHECK(read_bytes(path) == before);
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
  CHECK_CONTAINS(load_error(file, dir), "format version 7 is newer than this lowbit (reads 2): upgrade lowbit");
  file.metadata["format_version"] = "0";
  CHECK_CONTAINS(load_error(file, dir), "format version 0 is not supported");
  file.metadata["format_version"] = "1";  // version 1 kept float weight scales in the graph JSON
  CHECK_CONTAINS(load_error(file, dir),
                 "format version 1 is not supported (this lowbit reads 2; convert the model again)");
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
                 "input_zero_point 0 must equal -10 (the input codes' input_zero_point)");
  // An AvgPool2d and a Linear must use the zero point of the op that produced their input.
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][3]["input_zero_point"] = 0; }),
                 "must equal -128 (the zero_point of op 1 'features.0')");
  CHECK_CONTAINS(graph_error(dir, [](json& g) { g["ops"][6]["input_zero_point"] = 0; }),
                 "must equal -3 (the zero_point of op 5 'classifier.0')");
}

TEST_CASE("int model: op order: one Input first, a Linear last") {
  TempDir dir("order");
  {  // op 0 is not an Input (and its table is gone)
    StFile file = good_file(dir);
    json graph = json::parse(file.metadata.at("graph"));
    graph["ops"][0]["kind"] = "flatten";
    file.metadata["graph"] = graph.dump();
    std::erase_if(file.tensors, [](const auto& t) { return t.first == "ops.0.input_table"; });
    CHECK_CONTAINS(load_error(file, dir), "graph op 0 must be an 'input' op, found 'flatten'");
  }
  {  // a second Input op
    StFile file = good_file(dir);
    json graph = json::parse(file.metadata.at("graph"));
    graph["ops"][4]["kind"] = "input";
    file.metadata["graph"] = graph.dump();
    file.tensors.emplace_back("ops.4.input_table", tensor(file, "ops.0.input_table"));
    CHECK_CONTAINS(load_error(file, dir), "graph op 4 'flatten' is an 'input' op; only op 0 may be");
  }
  {  // the logits come from a Flatten: drop the last Linear, end with a Flatten
    StFile file = good_file(dir);
    json graph = json::parse(file.metadata.at("graph"));
    graph["ops"][6] = {{"kind", "flatten"}, {"name", "end"}, {"output_scale", 0.5}};
    file.metadata["graph"] = graph.dump();
    std::erase_if(file.tensors, [](const auto& t) { return t.first.starts_with("ops.6."); });
    CHECK_CONTAINS(load_error(file, dir), "the last graph op must be a 'linear' op");
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
  for (const char* name : {"ops.0.input_table", "ops.1.weight", "ops.1.bias", "ops.5.multiplier", "ops.6.shift"}) {
    StFile file = good_file(dir);
    std::erase_if(file.tensors, [&](const auto& t) { return t.first == name; });
    CHECK_CONTAINS(load_error(file, dir), std::string("tensor '") + name + "' missing");
  }
  StFile file = good_file(dir);
  file.tensors.emplace_back("ops.2.weight", tensor(file, "ops.1.bias"));
  CHECK_CONTAINS(load_error(file, dir), "unexpected tensor 'ops.2.weight'");

  file = good_file(dir);
  tensor(file, "ops.1.weight").dtype = DType::U8;  // 8-bit weights are I8
  CHECK_CONTAINS(load_error(file, dir), "tensor 'ops.1.weight' has dtype U8, expected I8");
  file = good_file(dir);
  StTensor& bias = tensor(file, "ops.1.bias");
  bias = make_st_tensor<float>(DType::F32, {3}, std::vector<float>{1, 2, 3});
  CHECK_CONTAINS(load_error(file, dir), "tensor 'ops.1.bias' has dtype F32, expected I32");

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
  tensor(file, "ops.6.shift") = make_st_tensor<uint8_t>(DType::U8, {4}, std::vector<uint8_t>{36, 36, 36, 36});
  CHECK_CONTAINS(load_error(file, dir), "tensor 'ops.6.shift' has shape [4], expected [3]");
  file = good_file(dir);
  tensor(file, "ops.0.input_table") = make_st_tensor<int8_t>(DType::I8, {255}, std::vector<int8_t>(255));
  CHECK_CONTAINS(load_error(file, dir), "has shape [255], expected [256]");
}

TEST_CASE("int model: values validate() refuses: shifts, multipliers, weights, accumulator overflow") {
  TempDir dir("values");
  StFile file = good_file(dir);
  tensor(file, "ops.1.shift").bytes[1] = std::byte{63};
  CHECK_CONTAINS(load_error(file, dir), "requant.shift of output channel 1 must be in [1, 62], found 63");
  file = good_file(dir);
  tensor(file, "ops.6.shift").bytes[0] = std::byte{0};
  CHECK_CONTAINS(load_error(file, dir), "requant.shift of output channel 0 must be in [1, 62], found 0");
  file = good_file(dir);
  set_i32(tensor(file, "ops.5.multiplier"), 2, 12345);
  CHECK_CONTAINS(load_error(file, dir), "requant.multiplier of output channel 2 must be in");
  file = good_file(dir);
  set_i32(tensor(file, "ops.5.multiplier"), 0, -5);
  CHECK_CONTAINS(load_error(file, dir), "requant.multiplier of output channel 0 must be in");
  file = good_file(dir);
  set_i32(tensor(file, "ops.1.bias"), 0, std::numeric_limits<int32_t>::max());
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
