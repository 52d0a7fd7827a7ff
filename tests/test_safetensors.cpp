// Tests for the safetensors codec: round trips, one test per kind of corrupt file, atomic writes.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "core/safetensors.h"

namespace fs = std::filesystem;
using namespace lowbit;

namespace {

const std::string kPath = "bad.safetensors";  // the name parse errors must mention

// A fresh folder under the system temp folder, removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag)
      : path(fs::temp_directory_path() / ("lowbit_test_safetensors_" + tag + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

// The bytes of a file: 8-byte little-endian header length, the header text, then the data area.
std::vector<std::byte> file_bytes(const std::string& header, const std::string& data = "") {
  std::vector<std::byte> bytes(8);
  uint64_t size = header.size();
  std::memcpy(bytes.data(), &size, 8);
  for (char c : header + data) bytes.push_back(static_cast<std::byte>(c));
  return bytes;
}

std::vector<std::byte> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(text.size());
  std::memcpy(bytes.data(), text.data(), text.size());
  return bytes;
}

// The lowbit::Error message parsing `bytes` gives; fails the test if it parses or throws anything else.
std::string parse_error(const std::vector<std::byte>& bytes) {
  try {
    parse_safetensors(bytes, kPath);
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("expected parse_safetensors to throw lowbit::Error");
  return "";
}

// Checks that parsing fails with a one-line message that names the file and contains `phrase`.
void check_rejected(const std::string& header, const std::string& data, const std::string& phrase) {
  std::string message = parse_error(file_bytes(header, data));
  CHECK_MESSAGE(message.find(phrase) != std::string::npos, "message: ", message, "\nexpected phrase: ", phrase);
  CHECK_MESSAGE(message.rfind(kPath + ": ", 0) == 0, "message does not start with the path: ", message);
  CHECK_MESSAGE(message.find('\n') == std::string::npos, "message is not one line: ", message);
}

template <typename T>
StTensor tensor_of(DType dtype, std::vector<int64_t> shape, std::vector<T> values) {
  return make_st_tensor<T>(dtype, std::move(shape), values);
}

// One tensor of every dtype, with edge values, empty tensors and a 0-d scalar.
StFile sample_file() {
  StFile file;
  file.metadata = {{"format", "lowbit-checkpoint"}, {"format_version", "1"}, {"empty", ""}, {"unicode", "µ-law ✓"}};
  float nan_with_payload;
  uint32_t nan_bits = 0x7fc00123u;
  std::memcpy(&nan_with_payload, &nan_bits, 4);
  file.tensors = {
      {"layers.0.weight", tensor_of<float>(DType::F32, {2, 3}, {1.5f, -0.0f, nan_with_payload, 1e-45f, -3e38f, 7})},
      {"layers.0.bias", tensor_of<double>(DType::F64, {}, {std::numeric_limits<double>::infinity()})},
      {"q.weight", tensor_of<int8_t>(DType::I8, {5}, {-128, -127, 0, 7, 127})},
      {"empty.i8", tensor_of<int8_t>(DType::I8, {0}, {})},
      {"pixels", tensor_of<uint8_t>(DType::U8, {1, 3}, {0, 128, 255})},
      {"bias.int16", tensor_of<int16_t>(DType::I16, {3}, {std::numeric_limits<int16_t>::min(), -1, 32767})},
      {"empty.i32", tensor_of<int32_t>(DType::I32, {2, 0, 3}, {})},
      {"bias.int32", tensor_of<int32_t>(DType::I32, {2}, {std::numeric_limits<int32_t>::min(), 42})},
      {"step", tensor_of<int64_t>(DType::I64, {1}, {std::numeric_limits<int64_t>::max()})},
      {"zzz.last_is_empty", tensor_of<float>(DType::F32, {0, 4}, {})},
  };
  return file;
}

void check_same(const StFile& a, const StFile& b) {
  CHECK(a.metadata == b.metadata);
  REQUIRE(a.tensors.size() == b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    INFO("tensor ", i, " '", a.tensors[i].first, "'");
    CHECK(a.tensors[i].first == b.tensors[i].first);
    CHECK(a.tensors[i].second.dtype == b.tensors[i].second.dtype);
    CHECK(a.tensors[i].second.shape == b.tensors[i].second.shape);
    CHECK(a.tensors[i].second.bytes == b.tensors[i].second.bytes);  // bit-identical, NaN payloads included
  }
}

bool has_temporaries(const fs::path& folder) {
  for (const auto& entry : fs::directory_iterator(folder)) {
    if (entry.path().filename().string().find(".tmp-") != std::string::npos) return true;
  }
  return false;
}

}  // namespace

// ---- dtypes and typed helpers ---------------------------------------------------------------

TEST_CASE("dtype names and sizes follow the safetensors spelling") {
  CHECK(dtype_name(DType::F32) == "F32");
  CHECK(dtype_name(DType::F64) == "F64");
  CHECK(dtype_name(DType::I8) == "I8");
  CHECK(dtype_name(DType::U8) == "U8");
  CHECK(dtype_name(DType::I16) == "I16");
  CHECK(dtype_name(DType::I32) == "I32");
  CHECK(dtype_name(DType::I64) == "I64");
  CHECK(dtype_size(DType::F32) == 4);
  CHECK(dtype_size(DType::F64) == 8);
  CHECK(dtype_size(DType::I8) == 1);
  CHECK(dtype_size(DType::U8) == 1);
  CHECK(dtype_size(DType::I16) == 2);
  CHECK(dtype_size(DType::I32) == 4);
  CHECK(dtype_size(DType::I64) == 8);
}

TEST_CASE("make_st_tensor and st_values convert typed values and check the dtype") {
  std::vector<int32_t> values = {1, -2, 3};
  StTensor tensor = make_st_tensor<int32_t>(DType::I32, {3}, values);
  CHECK(tensor.bytes.size() == 12);
  CHECK(st_values<int32_t>(tensor, DType::I32, "bias") == values);
  CHECK_THROWS_WITH_AS(st_values<float>(tensor, DType::F32, "layers.0.weight"),
                       "layers.0.weight: expected dtype F32, found I32 (the file was written by a different writer "
                       "or version)",
                       Error);
  CHECK_THROWS_AS(make_st_tensor<int32_t>(DType::I32, {2}, values), Error);  // 3 values for 2 elements
  CHECK_THROWS_AS(make_st_tensor<int32_t>(DType::F64, {3}, values), Error);  // 4-byte type for an 8-byte dtype
}

TEST_CASE("find returns nullptr and get names the file when a tensor is missing") {
  StFile file = sample_file();
  CHECK(file.find("pixels") != nullptr);
  CHECK(file.find("nope") == nullptr);
  CHECK(&file.get("step", "m.safetensors") == file.find("step"));
  CHECK_THROWS_WITH_AS(file.get("nope", "m.safetensors"),
                       doctest::Contains("m.safetensors: tensor 'nope' missing (the file holds 10 tensors"), Error);
}

// ---- round trips ----------------------------------------------------------------------------

TEST_CASE("save then load gives back every dtype bit for bit, with metadata and order") {
  TempDir dir("roundtrip");
  StFile file = sample_file();
  save_safetensors(dir / "m.safetensors", file);
  check_same(file, load_safetensors(dir / "m.safetensors"));
  CHECK_FALSE(has_temporaries(dir.path));
}

TEST_CASE("a file with no tensors and no metadata round-trips") {
  TempDir dir("empty");
  save_safetensors(dir / "e.safetensors", StFile{});
  StFile loaded = load_safetensors(dir / "e.safetensors");
  CHECK(loaded.tensors.empty());
  CHECK(loaded.metadata.empty());
}

TEST_CASE("the writer's bytes are pinned: metadata first, tensors packed in order, data aligned to 8") {
  TempDir dir("golden");
  StFile file;
  file.metadata = {{"format", "x"}};
  file.tensors = {{"w", tensor_of<float>(DType::F32, {2}, {1.0f, -2.0f})}};
  save_safetensors(dir / "g.safetensors", file);
  std::string header = R"({"__metadata__":{"format":"x"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  header.append((8 - (8 + header.size()) % 8) % 8, ' ');  // space padding up to a multiple of 8
  std::string data("\x00\x00\x80\x3f\x00\x00\x00\xc0", 8);  // 1.0f and -2.0f, little-endian
  CHECK(read_bytes(dir / "g.safetensors") == file_bytes(header, data));
}

TEST_CASE("the reader takes tensors in data order, whatever order the header lists them in") {
  std::string header =
      R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})";
  StFile file = parse_safetensors(file_bytes(header, "ABCD"), kPath);
  REQUIRE(file.tensors.size() == 2);
  CHECK(file.tensors[0].first == "a");
  CHECK(file.tensors[1].first == "b");
  CHECK(st_values<uint8_t>(file.tensors[1].second, DType::U8, "b") == std::vector<uint8_t>{'C', 'D'});
}

// ---- one test per kind of corruption ---------------------------------------------------------

TEST_CASE("reject: file shorter than the 8-byte header length") {
  CHECK(parse_error(std::vector<std::byte>(5)).find("too short") != std::string::npos);
}

TEST_CASE("reject: header length beyond the end of the file") {
  std::vector<std::byte> bytes = file_bytes("{}");
  bytes[0] = std::byte{200};
  CHECK(parse_error(bytes) == "bad.safetensors: header length 200 exceeds file size 10 (file truncated, corrupted or "
                              "not a safetensors file)");
}

TEST_CASE("reject: absurd header length above 100 MiB") {
  std::vector<std::byte> bytes = file_bytes("{}");
  bytes[7] = std::byte{1};  // 2^56 + 2
  CHECK(parse_error(bytes).find("above the 100 MiB limit") != std::string::npos);
}

TEST_CASE("reject: header that is not JSON") {
  check_rejected("{\"a\": ", "", "header is not valid JSON");
  check_rejected("", "", "header is not valid JSON");
  check_rejected("{\"\xff\": 1}", "", "header is not valid JSON");  // invalid UTF-8
}

TEST_CASE("reject: header that is not a JSON object") {
  check_rejected("[1, 2]", "", "header is a JSON array, expected an object");
}

TEST_CASE("reject: duplicate JSON keys, at the top and inside an entry") {
  check_rejected(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[0],)"
                 R"("data_offsets":[0,0]}})",
                 "", "header has the key 'a' twice");
  check_rejected(R"({"a":{"dtype":"U8","dtype":"I8","shape":[0],"data_offsets":[0,0]}})", "",
                 "header has the key 'dtype' twice");
}

TEST_CASE("reject: absurdly nested JSON") {
  check_rejected(R"({"__metadata__":{"k":[[[[[[[[[[[[]]]]]]]]]]]]}})", "", "nests deeper than");
}

TEST_CASE("reject: entry that is not an object, or lacks or adds fields") {
  check_rejected(R"({"a":5})", "", "tensor 'a' is a JSON number, expected an object");
  check_rejected(R"({"a":{"dtype":"U8","data_offsets":[0,0]}})", "", "tensor 'a' has no 'shape' field");
  check_rejected(R"({"a":{"dtype":"U8","shape":[0]}})", "", "tensor 'a' has no 'data_offsets' field");
  check_rejected(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":1}})", "", "fields other than");
  check_rejected(R"({"":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})", "", "empty name");
}

TEST_CASE("reject: unknown dtype") {
  check_rejected(R"({"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}})", "xx", "unknown dtype \"BF16\"");
  check_rejected(R"({"a":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", "xxxx", "unknown dtype 4");
}

TEST_CASE("reject: shape entries negative, not integers, or not an array") {
  check_rejected(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})", "", "negative shape entry -1");
  check_rejected(R"({"a":{"dtype":"U8","shape":[2.5],"data_offsets":[0,0]}})", "", "expected a non-negative integer");
  check_rejected(R"({"a":{"dtype":"U8","shape":["3"],"data_offsets":[0,3]}})", "xyz",
                 "expected a non-negative integer");
  check_rejected(R"({"a":{"dtype":"U8","shape":3,"data_offsets":[0,3]}})", "xyz", "expected an array of integers");
  check_rejected(R"({"a":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}})", "",
                 "larger than 2^63 - 1");
}

TEST_CASE("reject: shape whose byte size overflows 64 bits") {
  check_rejected(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", "",
                 "overflows 64 bits");
  check_rejected(R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}})", "",
                 "overflows 64 bits");  // 2^61 elements * 8 bytes = 2^64
}

TEST_CASE("reject: data_offsets that are not two non-negative integers") {
  check_rejected(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", "x", "expected [begin, end]");
  check_rejected(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":"0,1"}})", "x", "expected [begin, end]");
  check_rejected(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", "x", "negative data_offsets entry");
  check_rejected(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1.0]}})", "x",
                 "expected a non-negative integer");
}

TEST_CASE("reject: data_offsets begin after end") {
  check_rejected(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}})", "x", "begin 1 > end 0");
}

TEST_CASE("reject: data_offsets end beyond the data area") {
  check_rejected(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", "xyz",
                 "ends at byte 4 but the data area holds only 3 bytes");
  check_rejected(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551615]}})", "x",
                 "but the data area holds only 1 bytes");
}

TEST_CASE("reject: byte count that does not match shape times dtype size") {
  check_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", "xxxx", "need 8");
}

TEST_CASE("reject: tensors whose byte ranges overlap") {
  check_rejected(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],)"
                 R"("data_offsets":[1,3]}})",
                 "xyz", "tensors 'a' [0, 2) and 'b' [1, 3) overlap");
  check_rejected(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],)"
                 R"("data_offsets":[0,2]}})",
                 "xy", "overlap");
}

TEST_CASE("reject: holes in the data area") {
  check_rejected(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],)"
                 R"("data_offsets":[2,3]}})",
                 "xyz", "data area bytes [1, 2) belong to no tensor");
  check_rejected(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", "xy",
                 "data area bytes [0, 1) belong to no tensor");
}

TEST_CASE("reject: trailing bytes after the last tensor") {
  check_rejected(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "xyz", "2 trailing bytes [1, 3)");
  check_rejected("{}", "x", "1 trailing bytes");
}

TEST_CASE("reject: __metadata__ that is not an object of strings") {
  check_rejected(R"({"__metadata__":["a"]})", "", "__metadata__ is a JSON array, expected an object of strings");
  check_rejected(R"({"__metadata__":{"epoch":3}})", "", "__metadata__ value for 'epoch' is 3, expected a string");
}

TEST_CASE("truncating a valid file at any byte is an error, never a crash") {
  TempDir dir("truncate");
  save_safetensors(dir / "m.safetensors", sample_file());
  std::vector<std::byte> bytes = read_bytes(dir / "m.safetensors");
  for (size_t size = 0; size < bytes.size(); ++size) {
    INFO("truncated to ", size, " of ", bytes.size(), " bytes");
    CHECK_THROWS_AS(parse_safetensors(std::span(bytes).first(size), kPath), Error);
  }
}

TEST_CASE("changing any single byte of a valid file parses or throws lowbit::Error, never crashes") {
  TempDir dir("flip");
  save_safetensors(dir / "m.safetensors", sample_file());
  const std::vector<std::byte> bytes = read_bytes(dir / "m.safetensors");
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (std::byte value : {std::byte{0x00}, std::byte{0x22}, std::byte{0x39}, std::byte{0xff}}) {
      std::vector<std::byte> changed = bytes;
      changed[i] = value;
      try {
        parse_safetensors(changed, kPath);
      } catch (const Error&) {
      }  // any other exception escapes and fails the test
    }
  }
}

// ---- files on disk --------------------------------------------------------------------------

TEST_CASE("load names the path when the file is missing or is a folder") {
  TempDir dir("load");
  CHECK_THROWS_WITH_AS(load_safetensors(dir / "nope.safetensors"),
                       doctest::Contains("nope.safetensors': file does not exist"), Error);
  CHECK_THROWS_WITH_AS(load_safetensors(dir.path.string()), doctest::Contains("it is a folder, not a file"), Error);
}

TEST_CASE("writing into a folder that does not exist throws and creates nothing") {
  TempDir dir("missing");
  std::string path = dir / "x/y.safetensors";
  CHECK_THROWS_WITH_AS(save_safetensors(path, sample_file()),
                       doctest::Contains(("y.safetensors': folder '" + (dir / "x") + "' does not exist").c_str()), Error);
  CHECK_FALSE(fs::exists(dir / "x"));
  CHECK(fs::is_empty(dir.path));
}

TEST_CASE("overwriting replaces the file atomically and leaves no temporary behind") {
  TempDir dir("overwrite");
  std::string path = dir / "m.safetensors";
  save_safetensors(path, sample_file());
  StFile second;
  second.metadata = {{"format", "second"}};
  second.tensors = {{"only", tensor_of<int64_t>(DType::I64, {2}, {1, 2})}};
  save_safetensors(path, second);
  check_same(second, load_safetensors(path));
  CHECK_FALSE(has_temporaries(dir.path));
}

TEST_CASE("a failed write leaves the previous file untouched and no temporary behind") {
  TempDir dir("failed");
  std::string path = dir / "m.safetensors";
  save_safetensors(path, sample_file());
  std::vector<std::byte> before = read_bytes(path);
  StFile broken;
  broken.tensors = {{"w", StTensor{DType::F32, {3}, std::vector<std::byte>(5)}}};  // 5 bytes for 12
  CHECK_THROWS_WITH_AS(save_safetensors(path, broken), doctest::Contains("tensor 'w' holds 5 bytes"), Error);
  StFile duplicated;
  duplicated.tensors = {{"w", tensor_of<uint8_t>(DType::U8, {1}, {1})}, {"w", tensor_of<uint8_t>(DType::U8, {1}, {2})}};
  CHECK_THROWS_AS(save_safetensors(path, duplicated), Error);
  StFile bad_utf8;
  bad_utf8.metadata = {{"k", "\xff"}};
  CHECK_THROWS_WITH_AS(save_safetensors(path, bad_utf8), doctest::Contains("valid UTF-8"), Error);
  CHECK(read_bytes(path) == before);
  CHECK_FALSE(has_temporaries(dir.path));
  CHECK_THROWS_WITH_AS(save_safetensors(dir.path.string(), sample_file()), doctest::Contains("it is a folder"), Error);
}

// ---- the documented numpy reader -------------------------------------------------------------

TEST_CASE("docs/read_checkpoint.py reads a lowbit file with numpy alone") {
  std::string python;
  for (std::string candidate : {"python3", "/usr/bin/python3"}) {
    if (std::system((candidate + " -c 'import numpy' > /dev/null 2>&1").c_str()) == 0) {
      python = candidate;
      break;
    }
  }
  if (python.empty()) {
    MESSAGE("skipped: no python3 with numpy");
    return;
  }
  TempDir dir("python");
  StFile file;
  file.metadata = {{"format", "lowbit-checkpoint"}};
  file.tensors = {{"layers.0.weight", tensor_of<float>(DType::F32, {2, 2}, {0.5f, -1.25f, 2.0f, 3.0f})},
                  {"layers.0.count", tensor_of<int32_t>(DType::I32, {3}, {7, -8, 9})}};
  save_safetensors(dir / "c.safetensors", file);
  std::string command = python + " " LOWBIT_SOURCE_DIR "/docs/read_checkpoint.py " + (dir / "c.safetensors") + " > " +
                        (dir / "out.txt") + " 2>&1";
  int status = std::system(command.c_str());
  std::ifstream in(dir / "out.txt");
  std::stringstream output;
  output << in.rdbuf();
  INFO("command: ", command, "\noutput:\n", output.str());
  CHECK(status == 0);
  CHECK(output.str().find("metadata format = lowbit-checkpoint") != std::string::npos);
  CHECK(output.str().find("layers.0.weight F32 [2, 2] [0.5, -1.25, 2.0, 3.0]") != std::string::npos);
  CHECK(output.str().find("layers.0.count I32 [3] [7, -8, 9]") != std::string::npos);
}
