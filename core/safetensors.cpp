// The safetensors codec: a validating parser that trusts nothing, and an atomic writer.
#include "core/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <system_error>
#include <unordered_set>

namespace lowbit {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // 100 MiB: far above any real header
constexpr int kMaxJsonDepth = 8;                     // a valid header nests 3 levels deep
constexpr std::string_view kMetadataKey = "__metadata__";
constexpr std::string_view kBadFileHint = "file truncated, corrupted or not a safetensors file";

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t size;
};
constexpr std::array<DTypeInfo, 7> kDTypes = {{
    {DType::F32, "F32", 4},
    {DType::F64, "F64", 8},
    {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},
    {DType::I16, "I16", 2},
    {DType::I32, "I32", 4},
    {DType::I64, "I64", 8},
}};

const DTypeInfo& dtype_info(DType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info;
  }
  fail("unknown DType value {} (memory corruption or an unhandled enum value)", static_cast<int>(dtype));
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.name == name) return info.dtype;
  }
  return std::nullopt;
}

std::string errno_text() { return std::error_code(errno, std::generic_category()).message(); }

// numel(shape) * dtype_size, or nullopt if it does not fit in 64 bits.
std::optional<uint64_t> checked_byte_count(std::span<const int64_t> shape, DType dtype) {
  uint64_t count = dtype_size(dtype);
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(count, static_cast<uint64_t>(d), &count)) return std::nullopt;
  }
  return count;
}

// ---- parsing -------------------------------------------------------------------------------

// Parses the header text, rejecting duplicate keys (nlohmann would silently keep the last)
// and absurd nesting. Returns the top-level keys in the order they appear in the file.
json parse_header_json(std::string_view text, const std::string& path, std::vector<std::string>& top_level_keys) {
  std::vector<std::unordered_set<std::string>> open_objects;  // keys seen so far, per open object
  auto on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth > kMaxJsonDepth) {
      fail("{}: header JSON nests deeper than {} levels ({})", path, kMaxJsonDepth, kBadFileHint);
    }
    if (event == json::parse_event_t::object_start) open_objects.emplace_back();
    if (event == json::parse_event_t::object_end) open_objects.pop_back();
    if (event == json::parse_event_t::key) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second) {
        fail("{}: header has the key '{}' twice (each tensor name and field may appear only once)", path, key);
      }
      if (open_objects.size() == 1) top_level_keys.push_back(key);
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), on_event);
  } catch (const json::exception& e) {
    fail("{}: header is not valid JSON: {} ({})", path, e.what(), kBadFileHint);
  }
}

// A JSON value that must be a non-negative integer (shape entries, offsets).
uint64_t read_count(const json& value, const std::string& path, std::string_view name, std::string_view field) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer()) {
    fail("{}: tensor '{}' has negative {} {} (sizes and offsets are non-negative)", path, name, field,
         value.dump());
  }
  fail("{}: tensor '{}' has {} {}, expected a non-negative integer ({})", path, name, field, value.dump(),
       kBadFileHint);
}

// One tensor entry as described by the header, before its bytes are copied.
struct Entry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

Entry parse_entry(const std::string& name, const json& value, const std::string& path, uint64_t data_size) {
  if (name.empty()) fail("{}: header has a tensor with an empty name ({})", path, kBadFileHint);
  if (!value.is_object()) {
    fail("{}: tensor '{}' is a JSON {}, expected an object with dtype, shape and data_offsets ({})", path, name,
         value.type_name(), kBadFileHint);
  }
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(field)) fail("{}: tensor '{}' has no '{}' field ({})", path, name, field, kBadFileHint);
  }
  if (value.size() != 3) {
    fail("{}: tensor '{}' has fields other than dtype, shape and data_offsets (found {})", path, name,
         value.dump());
  }

  Entry entry{name, DType::F32, {}, 0, 0};
  const json& dtype = value["dtype"];
  auto parsed_dtype = dtype.is_string() ? dtype_from_name(dtype.get_ref<const std::string&>()) : std::nullopt;
  if (!parsed_dtype) {
    fail("{}: tensor '{}' has unknown dtype {} (lowbit reads F32, F64, I8, U8, I16, I32, I64)", path, name,
         dtype.dump());
  }
  entry.dtype = *parsed_dtype;

  const json& shape = value["shape"];
  if (!shape.is_array()) fail("{}: tensor '{}' has shape {}, expected an array of integers", path, name, shape.dump());
  for (const json& dim : shape) {
    uint64_t d = read_count(dim, path, name, "shape entry");
    if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      fail("{}: tensor '{}' has shape entry {}, larger than 2^63 - 1 ({})", path, name, d, kBadFileHint);
    }
    entry.shape.push_back(static_cast<int64_t>(d));
  }
  std::optional<uint64_t> byte_count = checked_byte_count(entry.shape, entry.dtype);
  if (!byte_count) {
    fail("{}: tensor '{}' has shape {} whose byte size overflows 64 bits ({})", path, name, shape.dump(),
         kBadFileHint);
  }

  const json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2) {
    fail("{}: tensor '{}' has data_offsets {}, expected [begin, end] ({})", path, name, offsets.dump(), kBadFileHint);
  }
  entry.begin = read_count(offsets[0], path, name, "data_offsets entry");
  entry.end = read_count(offsets[1], path, name, "data_offsets entry");
  if (entry.begin > entry.end) {
    fail("{}: tensor '{}' has data_offsets begin {} > end {} ({})", path, name, entry.begin, entry.end, kBadFileHint);
  }
  if (entry.end > data_size) {
    fail("{}: tensor '{}' ends at byte {} but the data area holds only {} bytes (file truncated?)", path, name,
         entry.end, data_size);
  }
  if (entry.end - entry.begin != *byte_count) {
    fail("{}: tensor '{}' has {} bytes in data_offsets but dtype {} and shape {} need {} ({})", path, name,
         entry.end - entry.begin, dtype_name(entry.dtype), shape.dump(), *byte_count, kBadFileHint);
  }
  return entry;
}

std::map<std::string, std::string> parse_metadata(const json& value, const std::string& path) {
  if (!value.is_object()) {
    fail("{}: __metadata__ is a JSON {}, expected an object of strings ({})", path, value.type_name(), kBadFileHint);
  }
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) {
      fail("{}: __metadata__ value for '{}' is {}, expected a string (the format allows string values only)", path,
           key, item.dump());
    }
    metadata[key] = item.get<std::string>();
  }
  return metadata;
}

// The tensors, sorted by position, must tile the data area exactly: no overlap, no hole, no tail.
void check_exact_cover(const std::vector<Entry>& sorted, const std::string& path, uint64_t data_size) {
  uint64_t cursor = 0;
  const Entry* previous = nullptr;
  for (const Entry& entry : sorted) {
    if (entry.begin < cursor) {
      fail("{}: tensors '{}' [{}, {}) and '{}' [{}, {}) overlap (each data byte must belong to exactly one tensor)",
           path, previous->name, previous->begin, previous->end, entry.name, entry.begin, entry.end);
    }
    if (entry.begin > cursor) {
      fail("{}: data area bytes [{}, {}) belong to no tensor (a hole; each data byte must belong to exactly one "
           "tensor)",
           path, cursor, entry.begin);
    }
    cursor = entry.end;
    previous = &entry;
  }
  if (cursor != data_size) {
    fail("{}: data area has {} trailing bytes [{}, {}) after the last tensor (each data byte must belong to exactly "
         "one tensor)",
         path, data_size - cursor, cursor, data_size);
  }
}

// ---- writing -------------------------------------------------------------------------------

// The header JSON (tensors in list order, packed back to back) padded with spaces so the data
// area starts at a multiple of 8 bytes from the start of the file.
std::string build_header(const StFile& file, const std::string& path) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!file.metadata.empty()) header[std::string(kMetadataKey)] = file.metadata;
  std::set<std::string_view> names;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : file.tensors) {
    if (name.empty() || name == kMetadataKey || !names.insert(name).second) {
      fail("cannot write '{}': tensor name '{}' is empty, reserved or used twice (names must be unique)", path, name);
    }
    std::optional<uint64_t> byte_count = checked_byte_count(tensor.shape, tensor.dtype);
    if (!byte_count || *byte_count != tensor.bytes.size()) {
      fail("cannot write '{}': tensor '{}' holds {} bytes, which does not match dtype {} and shape {} (build it "
           "with make_st_tensor)",
           path, name, tensor.bytes.size(), dtype_name(tensor.dtype), json(tensor.shape).dump());
    }
    header[name] = {{"dtype", dtype_name(tensor.dtype)},
                    {"shape", tensor.shape},
                    {"data_offsets", {offset, offset + *byte_count}}};
    offset += *byte_count;
  }
  std::string text;
  try {
    text = header.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::strict);
  } catch (const json::exception& e) {
    fail("cannot write '{}': {} (tensor names and metadata must be valid UTF-8)", path, e.what());
  }
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');
  return text;
}

void write_all(int fd, const void* data, size_t size, const std::string& tmp_path) {
  const char* cursor = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t written = ::write(fd, cursor, size);
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) fail("cannot write '{}': {} (check free disk space)", tmp_path, errno_text());
    cursor += written;
    size -= static_cast<size_t>(written);
  }
}

}  // namespace

size_t dtype_size(DType dtype) { return dtype_info(dtype).size; }

std::string_view dtype_name(DType dtype) { return dtype_info(dtype).name; }

const StTensor* StFile::find(std::string_view name) const {
  for (const auto& [tensor_name, tensor] : tensors) {
    if (tensor_name == name) return &tensor;
  }
  return nullptr;
}

const StTensor& StFile::get(std::string_view name, std::string_view path_for_errors) const {
  if (const StTensor* tensor = find(name)) return *tensor;
  std::string present;
  for (size_t i = 0; i < tensors.size() && i < 8; ++i) present += (i ? ", " : "") + tensors[i].first;
  if (tensors.size() > 8) present += ", ...";
  fail("{}: tensor '{}' missing (the file holds {} tensors: {}; was it written for a different model?)",
       path_for_errors, name, tensors.size(), present);
}

StFile parse_safetensors(std::span<const std::byte> bytes, const std::string& path) {
  if (bytes.size() < 8) {
    fail("{}: file is {} bytes, too short for the 8-byte header length ({})", path, bytes.size(), kBadFileHint);
  }
  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes.data(), 8);
  if (header_size > kMaxHeaderBytes) {
    fail("{}: header length {} is above the 100 MiB limit ({})", path, header_size, kBadFileHint);
  }
  if (header_size > bytes.size() - 8) {
    fail("{}: header length {} exceeds file size {} ({})", path, header_size, bytes.size(), kBadFileHint);
  }
  std::string_view header_text(reinterpret_cast<const char*>(bytes.data() + 8), header_size);
  std::span<const std::byte> data = bytes.subspan(8 + header_size);

  std::vector<std::string> keys_in_file_order;
  json header = parse_header_json(header_text, path, keys_in_file_order);
  if (!header.is_object()) {
    fail("{}: header is a JSON {}, expected an object ({})", path, header.type_name(), kBadFileHint);
  }

  StFile file;
  std::vector<Entry> entries;
  for (const std::string& key : keys_in_file_order) {
    const json& value = header.at(key);
    if (key == kMetadataKey) {
      file.metadata = parse_metadata(value, path);
    } else {
      entries.push_back(parse_entry(key, value, path, data.size()));
    }
  }
  // Data-area order; header order breaks ties between empty tensors sharing an offset.
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::pair(a.begin, a.end) < std::pair(b.begin, b.end);
  });
  check_exact_cover(entries, path, data.size());

  for (Entry& entry : entries) {
    std::span<const std::byte> range = data.subspan(entry.begin, entry.end - entry.begin);
    file.tensors.emplace_back(std::move(entry.name),
                              StTensor{entry.dtype, std::move(entry.shape), {range.begin(), range.end()}});
  }
  return file;
}

StFile load_safetensors(const std::string& path) {
  std::error_code ec;
  fs::file_status status = fs::status(path, ec);
  if (!fs::exists(status)) fail("cannot read '{}': file does not exist (check the path and working directory)", path);
  if (fs::is_directory(status)) {
    fail("cannot read '{}': it is a folder, not a file (give the path of the .safetensors file inside it)", path);
  }
  std::ifstream in(path, std::ios::binary);
  uintmax_t size = fs::file_size(path, ec);
  if (!in || ec) fail("cannot read '{}': cannot open it (check the file permissions)", path);
  std::vector<std::byte> bytes(size);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  if (static_cast<uintmax_t>(in.gcount()) != size) {
    fail("cannot read '{}': got {} of {} bytes (was the file changed while reading?)", path, in.gcount(), size);
  }
  return parse_safetensors(bytes, path);
}

void save_safetensors(const std::string& path, const StFile& file) {
  fs::path folder = fs::path(path).parent_path();
  if (folder.empty()) folder = ".";
  std::error_code ec;
  if (!fs::exists(folder, ec)) {
    fail("cannot write '{}': folder '{}' does not exist (create it first, e.g. mkdir -p {})", path, folder.string(),
         folder.string());
  }
  if (!fs::is_directory(folder, ec)) fail("cannot write '{}': '{}' is not a folder (check the path)", path, folder.string());
  if (fs::is_directory(path, ec)) {
    fail("cannot write '{}': it is a folder (give a file name such as {}/model.safetensors)", path, path);
  }
  std::string header = build_header(file, path);
  uint64_t header_size = header.size();

  std::string tmp_path = fmt::format("{}.tmp-{}", path, ::getpid());
  int fd = ::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot write '{}': cannot create '{}': {} (check folder permissions)", path, tmp_path, errno_text());
  try {
    write_all(fd, &header_size, 8, tmp_path);
    write_all(fd, header.data(), header.size(), tmp_path);
    for (const auto& [name, tensor] : file.tensors) write_all(fd, tensor.bytes.data(), tensor.bytes.size(), tmp_path);
    if (::fsync(fd) != 0) fail("cannot write '{}': fsync failed: {} (check the disk)", tmp_path, errno_text());
    int closed = ::close(fd);
    fd = -1;
    if (closed != 0) fail("cannot write '{}': close failed: {} (check free disk space)", tmp_path, errno_text());
    if (::rename(tmp_path.c_str(), path.c_str()) != 0) {
      fail("cannot write '{}': renaming '{}' over it failed: {} (check folder permissions)", path, tmp_path,
           errno_text());
    }
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp_path.c_str());
    throw;
  }
  // Make the rename itself durable; failure here leaves a complete file, so it is not an error.
  int folder_fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (folder_fd >= 0) {
    ::fsync(folder_fd);
    ::close(folder_fd);
  }
}

}  // namespace lowbit
