// The integer model file: IntModel ⇄ safetensors container, validated on the way in (docs/int-graph-format.md).
#include "quant/int_model.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <nlohmann/json.hpp>
#include <map>
#include <optional>
#include <set>
#include <unordered_set>
#include <utility>

#include "core/error.h"
#include "core/safetensors.h"
#include "quant/runtime/int4.h"

namespace lowbit::quant {

namespace {

using json = nlohmann::json;
using runtime::Op;
using runtime::OpKind;

constexpr int kMaxGraphJsonDepth = 5;  // graph object → ops array → op object → its fields → an op's inputs
constexpr const char* kBadFileHint = "the file is damaged or was not written by lowbit";
const std::set<std::string> kMetadataKeys = {"format", "format_version", "graph", "mode", "model"};
const char* const kDescriptionKey = "description";  // optional: the float model's description (nn/graph.h)
const std::set<std::string> kModes = {"int8", "w4a8", "w4a4", "mixed"};

// ---- op kinds and their fields ------------------------------------------------------------------

struct KindInfo {
  OpKind kind;
  const char* name;                           // the spelling in the file
  std::initializer_list<const char*> fields;  // exactly these keys (the writer emits them in this order)
};

const KindInfo kKinds[] = {
    {OpKind::Input, "input", {"kind", "name", "output_scale"}},
    {OpKind::Conv2d,
     "conv2d",
     {"kind", "name", "inputs", "weight_bits", "in_channels", "out_channels", "kernel", "stride", "padding", "groups",
      "input_zero_point", "zero_point", "act_min", "act_max", "output_scale"}},
    {OpKind::Linear,
     "linear",
     {"kind", "name", "inputs", "weight_bits", "in_channels", "out_channels", "input_zero_point", "zero_point",
      "act_min", "act_max", "output_scale"}},
    {OpKind::MaxPool2d, "max_pool2d", {"kind", "name", "inputs", "kernel", "stride", "padding", "output_scale"}},
    {OpKind::AvgPool2d,
     "avg_pool2d",
     {"kind", "name", "inputs", "kernel", "stride", "padding", "input_zero_point", "output_scale"}},
    {OpKind::Flatten, "flatten", {"kind", "name", "inputs", "output_scale"}},
    {OpKind::GlobalAvgPool2d, "global_avg_pool2d", {"kind", "name", "inputs", "input_zero_point", "output_scale"}},
    {OpKind::Clamp, "clamp", {"kind", "name", "inputs", "input_zero_point", "act_min", "act_max", "output_scale"}},
    {OpKind::Add,
     "add",
     {"kind", "name", "inputs", "input_zero_points", "zero_point", "act_min", "act_max", "output_scale"}},
    {OpKind::Concat,
     "concat",
     {"kind", "name", "inputs", "input_zero_points", "zero_point", "act_min", "act_max", "output_scale"}},
};

const KindInfo& kind_info(OpKind kind) {
  for (const KindInfo& info : kKinds) {
    if (info.kind == kind) return info;
  }
  fail("int model: unknown op kind {} (internal error)", static_cast<int>(kind));
}

const KindInfo* kind_info(std::string_view name) {
  for (const KindInfo& info : kKinds) {
    if (name == info.name) return &info;
  }
  return nullptr;
}

bool is_weighted(OpKind kind) { return kind == OpKind::Conv2d || kind == OpKind::Linear; }
bool is_join(OpKind kind) { return kind == OpKind::Add || kind == OpKind::Concat; }
// Ops whose output keeps their input's qparams and that store that zero point as input_zero_point.
bool keeps_zero_point(OpKind kind) {
  return kind == OpKind::AvgPool2d || kind == OpKind::GlobalAvgPool2d || kind == OpKind::Clamp;
}
// The file stores one scale per output channel (Conv2d, Linear) or per input (Add, Concat).
size_t stored_scale_count(const Op& op) {
  if (is_weighted(op.kind)) return static_cast<size_t>(std::max<int64_t>(op.out_channels, 0));
  return is_join(op.kind) ? op.inputs.size() : 0;
}

std::string tensor_name(size_t op_index, const char* what) { return fmt::format("ops.{}.{}", op_index, what); }

// The stored shape of a weighted op's weight tensor: (OUT, C, K, K) / (OUT, IN) for 8 bits,
// (OUT, row bytes) for packed int4. Sizes must already be range-checked.
std::vector<int64_t> weight_shape(const Op& op) {
  if (op.weight_bits == 4) {
    return {op.out_channels, static_cast<int64_t>(runtime::int4_packed_size(runtime::weight_row_length(op)))};
  }
  if (op.kind == OpKind::Conv2d) return {op.out_channels, op.in_channels / op.groups, op.kernel, op.kernel};
  return {op.out_channels, op.in_channels};
}

std::string shape_string(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// A JSON value for an error message, cut short if it is long.
std::string short_dump(const json& value) {
  std::string text = value.dump();
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return text;
}

// =====================================================================================================
// Writing
// =====================================================================================================

// A float as the JSON number with the fewest digits that reads back to the same float (0.0173, not
// 0.01730000041425228); the exact double of f if that decimal would not round back (never seen, but cheap).
double json_float(float f) {
  if (!std::isfinite(f)) return static_cast<double>(f);  // dumped as null: the reader refuses it
  const double shortest = std::strtod(fmt::format("{}", f).c_str(), nullptr);
  return static_cast<float>(shortest) == f ? shortest : static_cast<double>(f);
}

// ordered_json: the keys come out in the order written here, so the header reads top-down.
using ordered_json = nlohmann::ordered_json;

ordered_json op_to_json(const IntModel& model, size_t i) {
  const Op& op = model.graph.ops[i];
  ordered_json j = ordered_json::object();
  j["kind"] = kind_info(op.kind).name;
  j["name"] = op.name;
  if (op.kind != OpKind::Input) {
    j["inputs"] = ordered_json::array();
    for (const int k : op.inputs) j["inputs"].push_back(model.graph.ops[static_cast<size_t>(k)].name);
  }
  if (is_weighted(op.kind)) {
    j["weight_bits"] = op.weight_bits;
    j["in_channels"] = op.in_channels;
    j["out_channels"] = op.out_channels;
  }
  if (op.kind == OpKind::Conv2d || op.kind == OpKind::MaxPool2d || op.kind == OpKind::AvgPool2d) {
    j["kernel"] = op.kernel;
    j["stride"] = op.stride;
    j["padding"] = op.padding;
  }
  if (op.kind == OpKind::Conv2d) j["groups"] = op.groups;
  if (is_weighted(op.kind) || keeps_zero_point(op.kind)) j["input_zero_point"] = op.input_zero_point;
  if (is_join(op.kind)) j["input_zero_points"] = op.rescale.zero_points;
  if (is_weighted(op.kind) || is_join(op.kind)) j["zero_point"] = op.requant.zero_point;
  if (is_weighted(op.kind) || is_join(op.kind) || op.kind == OpKind::Clamp) {
    j["act_min"] = op.requant.act_min;
    j["act_max"] = op.requant.act_max;
  }
  j["output_scale"] = json_float(model.op_output_scales[i]);
  return j;
}

// The bias rule: I16 when every value of the op fits in int16, else I32 (the reader widens both to int32).
StTensor bias_tensor(const std::vector<int32_t>& bias) {
  const auto out = static_cast<int64_t>(bias.size());
  const bool fits_i16 = std::all_of(bias.begin(), bias.end(), [](int32_t b) {
    return b >= std::numeric_limits<int16_t>::min() && b <= std::numeric_limits<int16_t>::max();
  });
  if (!fits_i16) return make_st_tensor<int32_t>(DType::I32, {out}, bias);
  const std::vector<int16_t> narrow(bias.begin(), bias.end());
  return make_st_tensor<int16_t>(DType::I16, {out}, narrow);
}

StFile to_st_file(const IntModel& model) {
  ordered_json graph = ordered_json::object();
  graph["input_shape"] = {model.graph.in_channels, model.graph.in_height, model.graph.in_width};
  graph["input_scale"] = json_float(model.input_scale);
  graph["input_zero_point"] = model.input_zero_point;
  graph["input_qmin"] = model.input_range.qmin;
  graph["input_qmax"] = model.input_range.qmax;
  graph["norm_mean"] = json_float(model.norm.mean);
  graph["norm_std"] = json_float(model.norm.std);
  graph["output_scale"] = json_float(model.output_scale);
  graph["ops"] = ordered_json::array();
  for (size_t i = 0; i < model.graph.ops.size(); ++i) graph["ops"].push_back(op_to_json(model, i));

  StFile file;
  file.metadata["format"] = kIntModelFormat;
  file.metadata["format_version"] = std::to_string(kIntModelVersion);
  file.metadata["model"] = model.model_name;
  file.metadata["mode"] = model.mode;
  file.metadata["graph"] = graph.dump();
  // The description on one line: it is for tools, and every byte counts on a microcontroller's flash.
  if (!model.description.nodes.empty())
    file.metadata[kDescriptionKey] = json::parse(nn::description_to_json(model.description)).dump();
  // The Input op's table is not stored: the loader rebuilds it from the graph JSON (make_input_table).
  for (size_t i = 0; i < model.graph.ops.size(); ++i) {
    const Op& op = model.graph.ops[i];
    if (is_join(op.kind)) {
      const std::span<const float> scales(model.op_requant_scales[i]);
      const auto count = static_cast<int64_t>(scales.size());
      file.tensors.emplace_back(tensor_name(i, "scale"), make_st_tensor<float>(DType::F32, {count}, scales));
    }
    if (!is_weighted(op.kind)) continue;
    const DType weight_dtype = op.weight_bits == 4 ? DType::U8 : DType::I8;
    const auto out = static_cast<int64_t>(op.out_channels);
    const std::span<const int8_t> weight(op.weight);
    file.tensors.emplace_back(tensor_name(i, "weight"), make_st_tensor<int8_t>(weight_dtype, weight_shape(op), weight));
    file.tensors.emplace_back(tensor_name(i, "bias"), bias_tensor(op.bias));
    const std::span<const float> scales(model.op_requant_scales[i]);
    file.tensors.emplace_back(tensor_name(i, "scale"), make_st_tensor<float>(DType::F32, {out}, scales));
  }
  return file;
}

// =====================================================================================================
// Reading: every value is checked (type, then range) before it is used, and sizes before allocations.
// =====================================================================================================

// Reads JSON fields of one object; `where` prefixes every message ("PATH: graph op 2 'fc1' (linear)").
class FieldReader {
 public:
  FieldReader(const json& object, std::string where) : object_(object), where_(std::move(where)) {}

  const std::string& where() const { return where_; }

  // The object must have exactly these keys.
  void require_exactly(std::initializer_list<const char*> fields, std::string_view what) const {
    for (const char* field : fields) {
      if (!object_.contains(field)) fail("{}: field '{}' missing ({}; {})", where_, field, what, kBadFileHint);
    }
    for (const auto& item : object_.items()) {
      const bool known = std::any_of(fields.begin(), fields.end(), [&](const char* f) { return item.key() == f; });
      if (!known) {
        fail("{}: unexpected field '{}' ({} has exactly the fields {}; written by a newer or different writer?)",
             where_, item.key(), what, fmt::join(fields, ", "));
      }
    }
  }

  // An integer in [lo, hi] (a JSON integer: 2.0 and "2" are refused).
  int64_t integer(const char* field, int64_t lo, int64_t hi) const {
    return integer_value(object_.at(field), field, lo, hi);
  }

  int64_t integer_value(const json& value, std::string_view field, int64_t lo, int64_t hi) const {
    if (!value.is_number_integer()) {
      fail("{}: '{}' must be an integer in [{}, {}], found {} {} ({})", where_, field, lo, hi, value.type_name(),
           short_dump(value), kBadFileHint);
    }
    const bool in_range = value.is_number_unsigned() ? value.get<uint64_t>() <= static_cast<uint64_t>(hi) &&
                                                           static_cast<int64_t>(value.get<uint64_t>()) >= lo
                                                     : value.get<int64_t>() >= lo && value.get<int64_t>() <= hi;
    if (!in_range) fail("{}: '{}' must be in [{}, {}], found {}", where_, field, lo, hi, short_dump(value));
    return value.is_number_unsigned() ? static_cast<int64_t>(value.get<uint64_t>()) : value.get<int64_t>();
  }

  // A finite float; if positive, also > 0. Decoded through double, so no float overflow goes unnoticed.
  float number(const char* field, bool positive) const { return number_value(object_.at(field), field, positive); }

  float number_value(const json& value, std::string_view field, bool positive) const {
    const char* expected = positive ? "a finite number > 0" : "a finite number";
    if (!value.is_number()) {
      fail("{}: '{}' must be {}, found {} {} ({})", where_, field, expected, value.type_name(), short_dump(value),
           kBadFileHint);
    }
    const double d = value.get<double>();
    const bool finite_float = std::isfinite(d) && std::fabs(d) <= FLT_MAX;
    const float f = finite_float ? static_cast<float>(d) : 0.f;
    if (!finite_float || (positive && !(f > 0.f))) {
      fail("{}: '{}' must be {}, found {} (scales are positive and finite)", where_, field, expected,
           short_dump(value));
    }
    return f;
  }

  std::string string(const char* field, size_t max_length) const {
    const json& value = object_.at(field);
    if (!value.is_string()) {
      fail("{}: '{}' must be a string, found {} {} ({})", where_, field, value.type_name(), short_dump(value),
           kBadFileHint);
    }
    const auto& s = value.get_ref<const std::string&>();
    if (s.size() > max_length) {
      fail("{}: '{}' is {} bytes long, at most {} allowed", where_, field, s.size(), max_length);
    }
    return s;
  }

  const json& array(const char* field, size_t min_size, size_t max_size) const {
    const json& value = object_.at(field);
    if (!value.is_array()) {
      fail("{}: '{}' must be an array, found {} {} ({})", where_, field, value.type_name(), short_dump(value),
           kBadFileHint);
    }
    if (value.size() < min_size || value.size() > max_size) {
      fail("{}: '{}' must have {} entries, found {}", where_, field,
           min_size == max_size ? std::to_string(min_size) : fmt::format("{} to {}", min_size, max_size), value.size());
    }
    return value;
  }

 private:
  const json& object_;
  std::string where_;
};

// Parses the graph JSON, refusing duplicate keys (nlohmann would keep the last) and deep nesting.
json parse_graph_json(const std::string& text, const std::string& path) {
  std::vector<std::unordered_set<std::string>> open_objects;
  auto on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth > kMaxGraphJsonDepth) {
      fail("{}: metadata 'graph' nests deeper than {} levels ({})", path, kMaxGraphJsonDepth, kBadFileHint);
    }
    if (event == json::parse_event_t::object_start) open_objects.emplace_back();
    if (event == json::parse_event_t::object_end) open_objects.pop_back();
    if (event == json::parse_event_t::key) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second) {
        fail("{}: metadata 'graph' has the key '{}' twice in one object ({})", path, key, kBadFileHint);
      }
    }
    return true;
  };
  json graph;
  try {
    graph = json::parse(text.begin(), text.end(), on_event);
  } catch (const json::exception& e) {
    fail("{}: metadata 'graph' is not valid JSON: {} ({})", path, e.what(), kBadFileHint);
  }
  if (!graph.is_object()) {
    fail("{}: metadata 'graph' must be a JSON object, found {} ({})", path, graph.type_name(), kBadFileHint);
  }
  return graph;
}

// The format tag, the version and the exact set of metadata keys.
void check_metadata(const StFile& file, const std::string& path) {
  const auto format = file.metadata.find("format");
  if (format == file.metadata.end()) {
    fail("{}: not a lowbit integer model (no 'format' in __metadata__, expected '{}')", path, kIntModelFormat);
  }
  if (format->second == "lowbit-checkpoint") {
    fail(
        "{}: not a lowbit integer model (format 'lowbit-checkpoint'): float checkpoints are converted with "
        "eval --int8 --model FILE",
        path);
  }
  if (format->second != kIntModelFormat) {
    fail("{}: not a lowbit integer model (format '{}', expected '{}')", path, format->second, kIntModelFormat);
  }
  const auto version = file.metadata.find("format_version");
  if (version == file.metadata.end()) {
    fail("{}: metadata field 'format_version' missing (expected '{}'; {})", path, kIntModelVersion, kBadFileHint);
  }
  const std::string& v = version->second;
  const bool is_number =
      !v.empty() && v.size() <= 9 && std::all_of(v.begin(), v.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  if (!is_number) {
    fail("{}: format_version '{}' is not a whole number (expected '{}'; {})", path, v.substr(0, 40), kIntModelVersion,
         kBadFileHint);
  }
  const int number = std::stoi(v);
  if (number > kIntModelVersion) {
    fail("{}: format version {} is newer than this lowbit (reads {}): upgrade lowbit", path, number, kIntModelVersion);
  }
  if (number != kIntModelVersion) {
    fail("{}: format version {} is not supported (this lowbit reads version {} only): re-convert with this version "
         "of lowbit (quantize --model CHECKPOINT --out FILE)",
         path, number, kIntModelVersion);
  }
  for (const std::string& key : kMetadataKeys) {
    if (!file.metadata.contains(key)) {
      fail("{}: metadata field '{}' missing (an integer model has {}; {})", path, key, fmt::join(kMetadataKeys, ", "),
           kBadFileHint);
    }
  }
  for (const auto& [key, value] : file.metadata) {
    if (!kMetadataKeys.contains(key) && key != kDescriptionKey) {
      fail("{}: unexpected metadata field '{}' (an integer model of format version {} has exactly {})", path,
           key.substr(0, 40), kIntModelVersion, fmt::join(kMetadataKeys, ", "));
    }
  }
}

// Copies one tensor after checking that it is present with the expected dtype and shape.
class TensorReader {
 public:
  TensorReader(const StFile& file, std::string path) : file_(file), path_(std::move(path)) {}

  template <typename T>
  std::vector<T> read(const std::string& name, DType dtype, const std::vector<int64_t>& shape, std::string_view what) {
    return values<T>(name, find(name, {dtype}, shape, what));
  }

  // The tensor after checking that it is present with one of `dtypes` and the expected shape.
  const StTensor& find(const std::string& name, std::initializer_list<DType> dtypes, const std::vector<int64_t>& shape,
                       std::string_view what) {
    std::vector<std::string_view> names;
    for (const DType dtype : dtypes) names.push_back(dtype_name(dtype));
    const StTensor* tensor = file_.find(name);
    if (tensor == nullptr) {
      fail("{}: tensor '{}' missing ({}, {} {}; {})", path_, name, what, fmt::join(names, " or "),
           shape_string(shape), kBadFileHint);
    }
    used_.insert(name);
    if (std::find(dtypes.begin(), dtypes.end(), tensor->dtype) == dtypes.end()) {
      fail("{}: tensor '{}' has dtype {}, expected {} ({})", path_, name, dtype_name(tensor->dtype),
           fmt::join(names, " or "), what);
    }
    if (tensor->shape != shape) {
      fail("{}: tensor '{}' has shape {}, expected {} ({})", path_, name, shape_string(tensor->shape),
           shape_string(shape), what);
    }
    return *tensor;
  }

  template <typename T>
  std::vector<T> values(const std::string& name, const StTensor& tensor) const {
    return st_values<T>(tensor, tensor.dtype, fmt::format("{}: tensor '{}'", path_, name));
  }

  // Every tensor in the file must have been read.
  void check_no_extra() const {
    for (const auto& [name, tensor] : file_.tensors) {
      if (!used_.contains(name)) {
        fail("{}: unexpected tensor '{}' (no op of the graph uses it; {})", path_, name.substr(0, 60), kBadFileHint);
      }
    }
  }

 private:
  const StFile& file_;
  std::string path_;
  std::set<std::string> used_;
};

// One op: its JSON fields, then its tensors.
// names: the ops before this one, by name (an op's inputs are names of earlier ops).
Op read_op(const json& value, size_t i, const std::string& path, IntModel& model, TensorReader& tensors,
           std::map<std::string, int>& names) {
  const std::string where = fmt::format("{}: graph op {}", path, i);
  if (!value.is_object()) fail("{}: must be a JSON object, found {} ({})", where, value.type_name(), kBadFileHint);
  if (!value.contains("kind")) fail("{}: field 'kind' missing ({})", where, kBadFileHint);
  if (!value.contains("name")) fail("{}: field 'name' missing ({})", where, kBadFileHint);
  const FieldReader head(value, where);
  const std::string kind_name = head.string("kind", 64);
  const KindInfo* info = kind_info(kind_name);
  if (info == nullptr) {
    fail("{}: unknown op kind '{}' (known: input, conv2d, linear, max_pool2d, avg_pool2d, flatten, "
         "global_avg_pool2d, clamp, add, concat)",
         where, kind_name);
  }
  Op op;
  op.kind = info->kind;
  op.name = head.string("name", kIntModelMaxNameLength);
  if (i == 0 && op.kind != OpKind::Input) {
    fail("{}: graph op 0 must be an 'input' op, found '{}' ({})", path, kind_name, kBadFileHint);
  }
  if (i > 0 && op.kind == OpKind::Input) {
    fail("{}: graph op {} '{}' is an 'input' op; only op 0 may be ({})", path, i, op.name, kBadFileHint);
  }
  const FieldReader f(value, fmt::format("{} '{}' ({})", where, op.name, kind_name));
  f.require_exactly(info->fields, fmt::format("a {} op", kind_name));
  if (op.kind != OpKind::Input) {
    const size_t min_inputs = is_join(op.kind) ? 2 : 1;
    const size_t max_inputs = op.kind == OpKind::Concat ? 64 : min_inputs;
    const json& inputs = f.array("inputs", min_inputs, max_inputs);
    for (const json& input : inputs) {
      if (!input.is_string()) fail("{}: 'inputs' must hold op names (strings), found {}", f.where(), short_dump(input));
      const auto& input_name = input.get_ref<const std::string&>();
      const auto it = names.find(input_name);
      if (it == names.end()) {
        fail("{}: input '{}' is not the name of an earlier op (a dangling name, or ops out of order: every op "
             "comes after its inputs, so there is no cycle)",
             f.where(), input_name.substr(0, 60));
      }
      op.inputs.push_back(it->second);
    }
  }
  if (!names.emplace(op.name, static_cast<int>(i)).second) {
    fail("{}: the name '{}' is used by an earlier op (op names are unique)", where, op.name.substr(0, 60));
  }

  if (is_weighted(op.kind)) {
    op.weight_bits = static_cast<int>(f.integer("weight_bits", 4, 8));
    if (op.weight_bits != 4 && op.weight_bits != 8) {
      fail("{}: 'weight_bits' must be 8 or 4, found {}", f.where(), op.weight_bits);
    }
    op.in_channels = f.integer("in_channels", 1, kIntModelMaxChannels);
    op.out_channels = f.integer("out_channels", 1, kIntModelMaxChannels);
  }
  if (op.kind == OpKind::Conv2d || op.kind == OpKind::MaxPool2d || op.kind == OpKind::AvgPool2d) {
    op.kernel = f.integer("kernel", 1, kIntModelMaxKernel);
    op.stride = f.integer("stride", 1, kIntModelMaxKernel);
    op.padding = f.integer("padding", 0, kIntModelMaxKernel);
  }
  if (op.kind == OpKind::Conv2d) {
    op.groups = f.integer("groups", 1, op.in_channels);
    if (op.in_channels % op.groups != 0 || op.out_channels % op.groups != 0) {
      fail("{}: 'groups' {} must divide in_channels {} and out_channels {}", f.where(), op.groups, op.in_channels,
           op.out_channels);
    }
  }
  if (is_weighted(op.kind) || keeps_zero_point(op.kind)) {
    op.input_zero_point = static_cast<int32_t>(f.integer("input_zero_point", -128, 127));
  }
  if (is_join(op.kind)) {
    const json& zero_points = f.array("input_zero_points", op.inputs.size(), op.inputs.size());
    for (const json& z : zero_points)
      op.rescale.zero_points.push_back(static_cast<int32_t>(f.integer_value(z, "input_zero_points[]", -128, 127)));
  }
  if (is_weighted(op.kind) || is_join(op.kind)) {
    op.requant.zero_point = static_cast<int32_t>(f.integer("zero_point", -128, 127));
  }
  if (is_weighted(op.kind) || is_join(op.kind) || op.kind == OpKind::Clamp) {
    op.requant.act_min = static_cast<int32_t>(f.integer("act_min", -128, 127));
    op.requant.act_max = static_cast<int32_t>(f.integer("act_max", -128, 127));
  }
  model.op_output_scales.push_back(f.number("output_scale", true));

  // Tensors. Sizes are range-checked above, so the expected shapes cannot overflow.
  if (op.kind == OpKind::Input) {
    op.input_table = make_input_table(model.norm, {model.input_scale, model.input_zero_point}, model.input_range);
  }
  model.op_requant_scales.emplace_back();
  if (is_join(op.kind)) {
    const std::string scale_name = tensor_name(i, "scale");
    std::vector<float> scales =
        tensors.read<float>(scale_name, DType::F32, {static_cast<int64_t>(op.inputs.size())},
                            fmt::format("op {} '{}': rescale scale s_i/s_out, one per input", i, op.name));
    try {
      const std::vector<int32_t> zero_points = op.rescale.zero_points;
      op.rescale = rescale_from_scales(scales);
      op.rescale.zero_points = zero_points;
    } catch (const Error& e) {
      fail("{}: tensor '{}': {}", path, scale_name, e.what());
    }
    model.op_requant_scales.back() = std::move(scales);
  }
  if (is_weighted(op.kind)) {
    const std::string what =
        fmt::format("op {} '{}' ({}, {}-bit weights, {})", i, op.name, kind_name, op.weight_bits,
                    op.weight_bits == 4 ? "packed int4 rows (OUT, row bytes)"
                                        : (op.kind == OpKind::Conv2d ? "(OUT, C, K, K)" : "(OUT, IN)"));
    op.weight = tensors.read<int8_t>(tensor_name(i, "weight"), op.weight_bits == 4 ? DType::U8 : DType::I8,
                                     weight_shape(op), what);
    const std::vector<int64_t> per_channel = {op.out_channels};
    const std::string bias_name = tensor_name(i, "bias");
    const StTensor& bias =
        tensors.find(bias_name, {DType::I16, DType::I32}, per_channel,
                     fmt::format("op {} '{}': bias, one per output channel, I16 if every value fits", i, op.name));
    if (bias.dtype == DType::I16) {
      const auto narrow = tensors.values<int16_t>(bias_name, bias);
      op.bias.assign(narrow.begin(), narrow.end());
    } else {
      op.bias = tensors.values<int32_t>(bias_name, bias);
    }
    const std::string scale_name = tensor_name(i, "scale");
    std::vector<float> scales = tensors.read<float>(
        scale_name, DType::F32, per_channel,
        fmt::format("op {} '{}': requantization scale s_in·s_w[c]/s_out, one per output channel", i, op.name));
    for (size_t c = 0; c < scales.size(); ++c) {
      if (!(std::isfinite(scales[c]) && scales[c] > 0.f)) {
        fail("{}: tensor '{}': the requantization scale of output channel {} must be a finite number > 0, found {} "
             "({})",
             path, scale_name, c, scales[c], kBadFileHint);
      }
    }
    try {
      set_requant_from_scales(op, scales);
    } catch (const Error& e) {
      fail("{}: tensor '{}': {}", path, scale_name, e.what());
    }
    model.op_requant_scales.back() = std::move(scales);
  }
  return op;
}

// The zero point of every op's output codes: the Input's is the model's input zero point; weighted ops, Add
// and Concat set their own; every other op keeps its (first) input's.
std::vector<int32_t> output_zero_points(const IntModel& model) {
  std::vector<int32_t> z;
  for (const Op& op : model.graph.ops) {
    if (op.kind == OpKind::Input) {
      z.push_back(model.input_zero_point);
    } else if (is_weighted(op.kind) || is_join(op.kind)) {
      z.push_back(op.requant.zero_point);
    } else {
      z.push_back(z[static_cast<size_t>(op.inputs.at(0))]);
    }
  }
  return z;
}

// Checks of the whole model that runtime::validate() does not make (it knows nothing of the model's
// input zero point or its mode).
void check_model(const IntModel& model, const std::string& path) {
  const auto& ops = model.graph.ops;
  if (ops.front().kind != OpKind::Input) {
    fail("{}: graph op 0 must be an 'input' op, found '{}' ({})", path, kind_info(ops.front().kind).name, kBadFileHint);
  }
  const std::vector<int32_t> zero_points = output_zero_points(model);
  for (size_t i = 1; i < ops.size(); ++i) {
    const Op& op = ops[i];
    if (op.kind == OpKind::Input) fail("{}: graph op {} '{}' is an 'input' op; only op 0 may be", path, i, op.name);
    if (model.mode == "int8" && is_weighted(op.kind) && op.weight_bits != 8) {
      fail("{}: graph op {} '{}' has {}-bit weights but the mode is 'int8' (use mode 'mixed')", path, i, op.name,
           op.weight_bits);
    }
    const auto chains = [&](int32_t z, size_t input, const char* field) {
      const auto producer = static_cast<size_t>(op.inputs[input]);
      if (z != zero_points[producer]) {
        fail("{}: graph op {} '{}': {} {} must equal the zero point {} of its input '{}' ({})", path, i, op.name, field,
             z, zero_points[producer], ops[producer].name, kBadFileHint);
      }
    };
    if (is_weighted(op.kind) || keeps_zero_point(op.kind)) chains(op.input_zero_point, 0, "input_zero_point");
    if (is_join(op.kind))
      for (size_t k = 0; k < op.inputs.size(); ++k) chains(op.rescale.zero_points[k], k, "input zero point");
  }
}

// Max pool and flatten pass their input codes through, and avg pool, global avg pool and clamp keep their
// input's qparams, so their zero points are those of the codes they carry. The file does not store them all
// and the runtime does not read them; the loader sets them as convert does, so that a loaded graph equals
// the converted one field by field.
void set_pass_through_zero_points(IntModel& model) {
  const std::vector<int32_t> zero_points = output_zero_points(model);
  for (size_t i = 0; i < model.graph.ops.size(); ++i) {
    Op& op = model.graph.ops[i];
    if (op.kind == OpKind::MaxPool2d || op.kind == OpKind::Flatten) {
      op.input_zero_point = zero_points[i];
      op.requant.zero_point = zero_points[i];
    }
    if (keeps_zero_point(op.kind)) op.requant.zero_point = op.input_zero_point;
  }
}

IntModel from_st_file(const StFile& file, const std::string& path) {
  check_metadata(file, path);
  IntModel model;
  model.model_name = file.metadata.at("model");
  if (model.model_name.empty() || model.model_name.size() > kIntModelMaxNameLength) {
    fail("{}: metadata 'model' must be a name of 1 to {} bytes, found {} bytes", path, kIntModelMaxNameLength,
         model.model_name.size());
  }
  model.mode = file.metadata.at("mode");
  if (!kModes.contains(model.mode)) {
    fail("{}: metadata 'mode' must be one of {}, found '{}'", path, fmt::join(kModes, ", "), model.mode.substr(0, 40));
  }

  if (const auto d = file.metadata.find(kDescriptionKey); d != file.metadata.end()) {
    try {
      model.description = nn::parse_description(d->second, path + ": metadata 'description'");
    } catch (const Error& e) {
      fail("{} ({})", e.what(), kBadFileHint);
    }
  }
  const json graph = parse_graph_json(file.metadata.at("graph"), path);
  const FieldReader g(graph, path + ": metadata 'graph'");
  g.require_exactly({"input_shape", "input_scale", "input_zero_point", "input_qmin", "input_qmax", "norm_mean",
                     "norm_std", "output_scale", "ops"},
                    "the graph object");
  const json& shape = g.array("input_shape", 3, 3);
  model.graph.in_channels = g.integer_value(shape[0], "input_shape[0] (C)", 1, kIntModelMaxChannels);
  model.graph.in_height = g.integer_value(shape[1], "input_shape[1] (H)", 1, kIntModelMaxChannels);
  model.graph.in_width = g.integer_value(shape[2], "input_shape[2] (W)", 1, kIntModelMaxChannels);
  model.input_scale = g.number("input_scale", true);
  model.input_range.qmin = static_cast<int32_t>(g.integer("input_qmin", -128, 127));
  model.input_range.qmax = static_cast<int32_t>(g.integer("input_qmax", model.input_range.qmin, 127));
  model.input_zero_point =
      static_cast<int32_t>(g.integer("input_zero_point", model.input_range.qmin, model.input_range.qmax));
  model.norm.mean = g.number("norm_mean", false);
  model.norm.std = g.number("norm_std", true);
  model.output_scale = g.number("output_scale", true);

  const json& ops = g.array("ops", 2, kIntModelMaxOps);
  TensorReader tensors(file, path);
  std::map<std::string, int> names;
  for (size_t i = 0; i < ops.size(); ++i) model.graph.ops.push_back(read_op(ops[i], i, path, model, tensors, names));
  tensors.check_no_extra();
  check_model(model, path);
  set_pass_through_zero_points(model);
  try {
    runtime::validate(model.graph);
  } catch (const runtime::RuntimeError& e) {
    fail("{}: {}", path, e.what());
  }
  return model;
}

}  // namespace

// =====================================================================================================
// API
// =====================================================================================================

std::array<int8_t, 256> make_input_table(const Normalization& norm, QParams input, QRange range) {
  std::array<int8_t, 256> table{};
  for (int p = 0; p < 256; ++p) {
    const float x = normalize_pixel(static_cast<uint8_t>(p), norm);
    table[static_cast<size_t>(p)] = static_cast<int8_t>(quantize(x, input, range));
  }
  return table;
}

float requant_scale(float input_scale, float weight_scale, float output_scale) {
  return static_cast<float>(static_cast<double>(input_scale) * weight_scale / static_cast<double>(output_scale));
}

void set_requant_from_scales(Op& op, std::span<const float> scales) {
  op.requant.multiplier.clear();
  op.requant.shift.clear();
  for (size_t c = 0; c < scales.size(); ++c) {
    QuantizedMultiplier m{};
    try {
      m = quantize_multiplier(static_cast<double>(scales[c]));
    } catch (const Error& e) {
      fail("op '{}', output channel {}: {}", op.name, c, e.what());
    }
    op.requant.multiplier.push_back(m.multiplier);
    op.requant.shift.push_back(m.shift);
  }
}

float rescale_scale(float input_scale, float output_scale) {
  return static_cast<float>(static_cast<double>(input_scale) / static_cast<double>(output_scale));
}

runtime::Rescale rescale_from_scales(std::span<const float> scales) {
  runtime::Rescale r;
  if (scales.empty()) fail("rescale: no input scales");
  for (const float m : scales)
    if (!(std::isfinite(m) && m > 0.f)) fail("rescale: input scale {} must be finite and > 0", m);
  const float largest = *std::max_element(scales.begin(), scales.end());
  const QuantizedMultiplier top = quantize_multiplier(static_cast<double>(largest));
  r.shift = top.shift;
  for (const float m : scales) {
    // M·2^n < 2^31: exact in double (a float times a power of two), then rounded half away from zero.
    const double scaled = std::ldexp(static_cast<double>(m), top.shift);
    r.multipliers.push_back(m == largest ? top.multiplier : static_cast<int32_t>(std::llround(scaled)));
  }
  return r;
}

int64_t IntModel::num_classes() const {
  if (graph.ops.empty()) return 0;
  try {
    return runtime::output_shapes(graph).back().size();
  } catch (const runtime::RuntimeError& e) {
    fail("int model '{}': {}", model_name, e.what());
  }
}

void save_int_model(const std::string& path, const IntModel& model) {
  const std::string where = fmt::format("{}: refusing to write an invalid integer model", path);
  const size_t n = model.graph.ops.size();
  if (model.op_output_scales.size() != n) {
    fail("{}: op_output_scales needs one entry per op ({}), found {}", where, n, model.op_output_scales.size());
  }
  if (model.op_requant_scales.size() != n) {
    fail("{}: op_requant_scales needs one entry per op ({}), found {}", where, n, model.op_requant_scales.size());
  }
  for (size_t i = 0; i < n; ++i) {
    const Op& op = model.graph.ops[i];
    const size_t expected = stored_scale_count(op);
    if (model.op_requant_scales[i].size() != expected) {
      fail("{}: op {} '{}' needs {} stored scales (one per output channel of a conv2d / linear, one per input of "
           "an add / concat), found {}",
           where, i, op.name, expected, model.op_requant_scales[i].size());
    }
  }
  try {
    runtime::validate(model.graph);  // sizes and ranges, so that the tensors below can be laid out
  } catch (const runtime::RuntimeError& e) {
    fail("{}: {}", where, e.what());
  }
  const StFile file = to_st_file(model);
  // The file must load back (one set of checks for writer and reader) to the same graph: the values the
  // loader derives (input table, multipliers, shifts) must be the ones the model holds.
  const IntModel back = from_st_file(file, where);
  for (size_t i = 0; i < n; ++i) {
    const Op &op = model.graph.ops[i], &loaded = back.graph.ops[i];
    if (op.kind == OpKind::Input && op.input_table != loaded.input_table) {
      fail("{}: the input table of op {} '{}' is not make_input_table(norm, input qparams, input_range) (the file "
           "stores only those; build the table with make_input_table)",
           where, i, op.name);
    }
    if (op.rescale.multipliers != loaded.rescale.multipliers || op.rescale.shift != loaded.rescale.shift) {
      fail("{}: the rescale multipliers of op {} '{}' are not the ones its scales give (set them with "
           "rescale_from_scales)",
           where, i, op.name);
    }
    if (op.requant.multiplier != loaded.requant.multiplier || op.requant.shift != loaded.requant.shift) {
      fail("{}: the multipliers and shifts of op {} '{}' are not the ones its requantization scales give (the file "
           "stores only the scales; set them with set_requant_from_scales)",
           where, i, op.name);
    }
  }
  save_safetensors(path, file);
}

IntModel load_int_model(const std::string& path) { return from_st_file(load_safetensors(path), path); }

IntModel parse_int_model(std::span<const std::byte> bytes, const std::string& path_for_errors) {
  return from_st_file(parse_safetensors(bytes, path_for_errors), path_for_errors);
}

int64_t int_model_file_bytes(const std::string& path) {
  std::error_code error;
  const auto size = std::filesystem::file_size(path, error);
  if (error) fail("{}: cannot read the file size: {} (check the path)", path, error.message());
  return static_cast<int64_t>(size);
}

}  // namespace lowbit::quant
