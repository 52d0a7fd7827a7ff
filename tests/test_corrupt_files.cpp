// The corrupt-file catalogue: one crafted file per failure class of issue 8, for every reader (safetensors
// container, checkpoint, integer model, IDX plain and gzip). Each must be refused with a one-line message
// that names the file and the problem, and no allocation may exceed what the file's size could justify.
// (The per-format test files hold further cases; this table is the checklist.)
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/safetensors.h"
#include "data/gzip.h"
#include "data/idx.h"
#include "nn/checkpoint.h"
#include "quant/int_model.h"
#include "tests/data_fixtures.h"
#include "tests/fuzz/fuzz_models.h"

// ---- a counting allocator: the largest single allocation while `tracking` is on ------------------------

namespace {
std::atomic<bool> tracking{false};
std::atomic<size_t> largest_allocation{0};

void* counted_allocation(size_t size) {
  if (tracking.load(std::memory_order_relaxed)) {
    size_t seen = largest_allocation.load(std::memory_order_relaxed);
    while (size > seen && !largest_allocation.compare_exchange_weak(seen, size)) {
    }
  }
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
}  // namespace

void* operator new(size_t size) { return counted_allocation(size); }
void* operator new[](size_t size) { return counted_allocation(size); }
void* operator new(size_t size, const std::nothrow_t&) noexcept {
  try {
    return counted_allocation(size);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}
void* operator new[](size_t size, const std::nothrow_t& tag) noexcept { return operator new(size, tag); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }

using namespace lowbit;
using json = nlohmann::json;
using data_fixtures::TempDir;

namespace {

// What any input may allocate at once, whatever its size (buffers, JSON nodes, message strings) ...
constexpr size_t kAllocationAllowance = size_t{64} << 10;
// ... plus this many bytes per input byte: a gzip stream inflates at most about 1032:1.
constexpr size_t kAllocationPerInputByte = 1032;

using Bytes = std::vector<std::byte>;

struct Case {
  std::string name;    // the failure class
  Bytes bytes;         // the crafted file
  std::string phrase;  // the message must contain it
};

Bytes to_bytes(const std::vector<uint8_t>& v) {
  Bytes out(v.size());
  if (!v.empty()) std::memcpy(out.data(), v.data(), v.size());
  return out;
}

Bytes cut(const Bytes& bytes, size_t size) { return Bytes(bytes.begin(), bytes.begin() + static_cast<long>(size)); }

// A container from its header text and data area (the 8-byte little-endian length is computed).
Bytes container(const std::string& header, const std::string& data = "") {
  Bytes bytes(8);
  const uint64_t size = header.size();
  std::memcpy(bytes.data(), &size, 8);
  for (const char c : header + data) bytes.push_back(static_cast<std::byte>(c));
  return bytes;
}

uint64_t header_length(const Bytes& bytes) {
  uint64_t size = 0;
  std::memcpy(&size, bytes.data(), 8);
  return size;
}

// The bytes save_safetensors writes for `file`.
Bytes serialize(const StFile& file) {
  TempDir dir("corrupt_files_serialize");
  save_safetensors(dir / "f.safetensors", file);
  return to_bytes(data_fixtures::read_bytes(dir / "f.safetensors"));
}

// Runs `parse` on every case: it must throw lowbit::Error naming `path` and the problem, on one line,
// without any allocation beyond the allowance.
void check_refused(const std::vector<Case>& cases, const std::string& path,
                   const std::function<void(const Bytes&)>& parse) {
  for (const Case& c : cases) {
    CAPTURE(c.name);
    std::string message;
    largest_allocation = 0;
    tracking = true;
    try {
      parse(c.bytes);
    } catch (const Error& e) {
      message = e.what();
    }
    tracking = false;
    const size_t bound = kAllocationAllowance + kAllocationPerInputByte * c.bytes.size();
    INFO("message: ", message);
    CHECK_MESSAGE(!message.empty(), "the file was not refused");
    CHECK(message.find(c.phrase) != std::string::npos);
    CHECK(message.find(path) != std::string::npos);
    CHECK(message.find('\n') == std::string::npos);
    CHECK_MESSAGE(largest_allocation <= bound, "largest allocation ", largest_allocation.load(),
                  " bytes for a file of ", c.bytes.size(), " bytes");
  }
}

std::string tensor_header(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"t":{"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}}";
}

}  // namespace

// =====================================================================================================
// safetensors container and checkpoint
// =====================================================================================================

TEST_CASE("corrupt safetensors files: one per class, a clear message, no unjustified allocation") {
  const std::string path = "corrupt.safetensors";
  const Bytes good = container(tensor_header("F32", "[2]", "[0,8]"), "12345678");
  const uint64_t header = header_length(good);
  Bytes absurd_length = good;
  absurd_length[7] = std::byte{0x10};  // 2^60 + ...
  Bytes longer_than_file = good;
  const uint64_t too_long = good.size();
  std::memcpy(longer_than_file.data(), &too_long, 8);
  const std::vector<Case> cases = {
      // Truncated at every section boundary: in the length, after it, in the header, after it, in the data.
      {"truncated: empty file", {}, "too short for the 8-byte header length"},
      {"truncated: inside the header length", cut(good, 5), "too short for the 8-byte header length"},
      {"truncated: after the header length", cut(good, 8), "exceeds file size 8"},
      {"truncated: inside the header", cut(good, 8 + header / 2), "exceeds file size"},
      {"truncated: after the header", cut(good, 8 + header), "the data area holds only 0 bytes"},
      {"truncated: inside the data", cut(good, good.size() - 3), "the data area holds only 5 bytes"},
      {"header length larger than the file", longer_than_file, "exceeds file size"},
      {"header length absurd", absurd_length, "above the 100 MiB limit"},
      {"offsets out of range", container(tensor_header("U8", "[4]", "[0,4]"), "abc"), "ends at byte 4"},
      {"offsets overlapping",
       container(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],)"
                 R"("data_offsets":[1,3]}})",
                 "abc"),
       "overlap"},
      {"offsets reversed", container(tensor_header("U8", "[0]", "[1,0]"), "a"), "begin 1 > end 0"},
      {"offsets leave a hole", container(tensor_header("U8", "[1]", "[1,2]"), "ab"), "belong to no tensor"},
      {"bytes after the last tensor", container(tensor_header("U8", "[1]", "[0,1]"), "ab"), "trailing bytes"},
      {"dtype/shape/byte-count mismatch", container(tensor_header("F32", "[3]", "[0,8]"), "12345678"), "need 12"},
      {"unknown dtype", container(tensor_header("BF16", "[4]", "[0,8]"), "12345678"), "unknown dtype"},
      {"dims whose product overflows 64 bits", container(tensor_header("F32", "[4294967296,4294967296]", "[0,0]")),
       "overflows 64 bits"},
      {"duplicate JSON keys", container(R"({"t":{"dtype":"U8","dtype":"I8","shape":[0],"data_offsets":[0,0]}})"),
       "has the key 'dtype' twice"},
      {"negative size", container(tensor_header("U8", "[-1]", "[0,0]")), "negative shape entry -1"},
      {"negative offset", container(tensor_header("U8", "[0]", "[-1,0]")), "negative data_offsets entry"},
      {"huge size", container(tensor_header("U8", "[9223372036854775808]", "[0,0]")), "larger than 2^63 - 1"},
      {"huge offset", container(tensor_header("U8", "[1]", "[0,18446744073709551615]"), "a"),
       "the data area holds only 1 bytes"},
      {"size that is not an integer", container(tensor_header("U8", "[1.5]", "[0,1]"), "a"),
       "expected a non-negative integer"},
      {"header that is not JSON", container(R"({"t": [)"), "header is not valid JSON"},
      {"header nested too deeply", container(R"({"__metadata__":{"k":[[[[[[[[[[[[]]]]]]]]]]]]}})"), "nests deeper"},
  };
  check_refused(cases, path, [&](const Bytes& bytes) { parse_safetensors(bytes, path); });
}

TEST_CASE("corrupt checkpoints: format tag, future version, wrong dtype, wrong shape") {
  const std::string path = "corrupt.ckpt.safetensors";
  const auto model = fuzz::tiny_float_model();
  TempDir dir("corrupt_files_checkpoint");
  nn::save_checkpoint(dir / "good.safetensors", *model, {{"model", "tiny"}});
  const StFile good = load_safetensors(dir / "good.safetensors");
  const auto with_metadata = [&](const std::string& key, const std::string& value) {
    StFile file = good;
    file.metadata[key] = value;
    return serialize(file);
  };
  StFile no_format = good;
  no_format.metadata.erase("format");
  StFile int_bias = good;
  for (auto& [name, tensor] : int_bias.tensors) {
    if (name == "layers.4.bias") tensor.dtype = DType::I32;  // same bytes, another dtype
  }
  StFile wrong_shape = good;
  for (auto& [name, tensor] : wrong_shape.tensors) {
    if (name == "layers.4.weight") tensor.shape = {32, 3};  // (3, 32) transposed: same byte count
  }
  const std::vector<Case> cases = {
      {"format tag missing", serialize(no_format), "not a lowbit checkpoint (format ''"},
      {"format tag of an integer model", with_metadata("format", "lowbit-int-graph"), "not a lowbit checkpoint"},
      {"format version from the future", with_metadata("format_version", "2"),
       "checkpoint format version 2 is not supported (this lowbit reads version 1; upgrade lowbit)"},
      {"format version not a number", with_metadata("format_version", "1e9"), "format version 1e9 is not supported"},
      {"tensor of the wrong dtype", serialize(int_bias), "tensor 'layers.4.bias': expected dtype F32, found I32"},
      {"tensor of the wrong shape", serialize(wrong_shape),
       "tensor 'layers.4.weight' has shape (32, 3), the model expects (3, 32)"},
  };
  check_refused(cases, path, [&](const Bytes& bytes) {
    const nn::Checkpoint checkpoint = nn::parse_checkpoint(bytes, path);
    nn::load_weights(*fuzz::tiny_float_model(), checkpoint);
  });
}

// =====================================================================================================
// integer model
// =====================================================================================================

TEST_CASE("corrupt integer models: one per class, a clear message, no unjustified allocation") {
  const std::string path = "corrupt.int.safetensors";
  TempDir dir("corrupt_files_int");
  quant::save_int_model(dir / "good.int.safetensors", fuzz::tiny_int_model());
  const Bytes good_bytes = to_bytes(data_fixtures::read_bytes(dir / "good.int.safetensors"));
  const StFile good = parse_safetensors(good_bytes, path);
  const uint64_t header = header_length(good_bytes);
  const auto graph_edit = [&](const std::function<void(json&)>& edit) {
    StFile file = good;
    json graph = json::parse(file.metadata.at("graph"));
    edit(graph);
    file.metadata["graph"] = graph.dump();
    return serialize(file);
  };
  const auto metadata_edit = [&](const std::string& key, const std::string& value) {
    StFile file = good;
    file.metadata[key] = value;
    return serialize(file);
  };
  const auto tensor_edit = [&](const std::string& name, const std::function<void(StTensor&)>& edit) {
    StFile file = good;
    for (auto& [n, t] : file.tensors) {
      if (n == name) edit(t);
    }
    return serialize(file);
  };
  const auto set_f32 = [](float value) { return [value](StTensor& t) { std::memcpy(t.bytes.data(), &value, 4); }; };
  const auto without_tensor = [&](const std::string& name) {
    StFile file = good;
    std::erase_if(file.tensors, [&](const auto& t) { return t.first == name; });
    return serialize(file);
  };
  std::string duplicate_key = good.metadata.at("graph");
  duplicate_key.insert(1, R"("ops":[],)");  // "ops" twice in the graph object
  StFile duplicated = good;
  duplicated.metadata["graph"] = duplicate_key;

  const std::vector<Case> cases = {
      {"truncated: empty file", {}, "too short for the 8-byte header length"},
      {"truncated: after the header length", cut(good_bytes, 8), "exceeds file size 8"},
      {"truncated: inside the header", cut(good_bytes, 8 + header / 2), "exceeds file size"},
      {"truncated: after the header", cut(good_bytes, 8 + header), "the data area holds only 0 bytes"},
      {"truncated: inside the data", cut(good_bytes, good_bytes.size() - 1), "(file truncated?)"},
      {"format version from the future", metadata_edit("format_version", "5"),
       "format version 5 is newer than this lowbit (reads 4): upgrade lowbit"},
      {"old format version", metadata_edit("format_version", "3"),
       "format version 3 is not supported (this lowbit reads version 4 only): re-convert with this version of lowbit"},
      {"duplicate JSON keys in the graph", serialize(duplicated), "has the key 'ops' twice"},
      {"NaN scale", graph_edit([](json& g) { g["output_scale"] = nullptr; }),
       "'output_scale' must be a finite number > 0, found null"},
      {"infinite scale", graph_edit([](json& g) { g["ops"][5]["output_scale"] = 1e39; }),
       "'output_scale' must be a finite number > 0"},
      {"zero scale", graph_edit([](json& g) { g["input_scale"] = 0; }), "'input_scale' must be a finite number > 0"},
      {"negative scale", graph_edit([](json& g) { g["ops"][2]["output_scale"] = -0.5; }),
       "'output_scale' must be a finite number > 0, found -0.5"},
      {"zero point out of range", graph_edit([](json& g) { g["ops"][5]["zero_point"] = 128; }),
       "'zero_point' must be in [-128, 127], found 128"},
      {"requantization scale zero", tensor_edit("ops.1.scale", set_f32(0.f)),
       "tensor 'ops.1.scale': the requantization scale of output channel 0 must be a finite number > 0, found 0"},
      {"requantization scale negative", tensor_edit("ops.5.scale", set_f32(-0.25f)),
       "the requantization scale of output channel 0 must be a finite number > 0, found -0.25"},
      {"requantization scale NaN", tensor_edit("ops.5.scale", set_f32(std::numeric_limits<float>::quiet_NaN())),
       "the requantization scale of output channel 0 must be a finite number > 0, found nan"},
      {"requantization scale infinite", tensor_edit("ops.1.scale", set_f32(std::numeric_limits<float>::infinity())),
       "the requantization scale of output channel 0 must be a finite number > 0, found inf"},
      {"requantization scale out of the multiplier range", tensor_edit("ops.1.scale", set_f32(0x1p-40f)),
       "is out of the representable range [2^-32, 2^30)"},
      {"requantization scale missing", without_tensor("ops.5.scale"), "tensor 'ops.5.scale' missing"},
      {"unknown op name", graph_edit([](json& g) { g["ops"][4]["kind"] = "gelu"; }), "unknown op kind 'gelu'"},
      {"ops whose shapes do not chain", graph_edit([](json& g) {
         g["input_shape"] = {1, 9, 9};
       }),
       "expected input (IN 8, 1, 1)"},
      {"negative size", graph_edit([](json& g) { g["ops"][1]["out_channels"] = -2; }),
       "'out_channels' must be in [1, 65536], found -2"},
      {"huge size", graph_edit([](json& g) { g["ops"][5]["in_channels"] = uint64_t{1} << 62; }),
       "'in_channels' must be in [1, 65536], found 4611686018427387904"},
      {"tensor dtype mismatch", tensor_edit("ops.5.bias", [](StTensor& t) { t.dtype = DType::F32; }),
       "tensor 'ops.5.bias' has dtype F32, expected I16 or I32"},
      {"bias dtype mismatch (I64)",
       tensor_edit("ops.1.bias",
                   [](StTensor& t) {
                     t.dtype = DType::I64;
                     t.shape = {1};  // the 2 I16 values are 4 bytes; 8 make one I64
                     t.bytes.resize(8);
                   }),
       "tensor 'ops.1.bias' has dtype I64, expected I16 or I32"},
      {"tensor shape mismatch",
       tensor_edit("ops.1.weight",
                   [](StTensor& t) {
                     t.shape = {5, 2};
                   }),
       "tensor 'ops.1.weight' has shape [5, 2], expected [2, 5]"},
  };
  check_refused(cases, path, [&](const Bytes& bytes) { quant::parse_int_model(bytes, path); });
}

// =====================================================================================================
// IDX, plain and gzip
// =====================================================================================================

namespace {

Bytes gzipped(const std::vector<uint8_t>& plain) {
  TempDir dir("corrupt_files_gzip");
  data::write_gzip_file(dir / "f.gz", plain);
  return to_bytes(data_fixtures::read_bytes(dir / "f.gz"));
}

Bytes with_byte(Bytes bytes, size_t at, uint8_t x) {
  bytes[at] ^= std::byte{x};
  return bytes;
}

}  // namespace

TEST_CASE("corrupt IDX files, plain and gzip: one per class, a clear message, no unjustified allocation") {
  using data_fixtures::idx_header;
  const std::string path = "corrupt-images-idx3-ubyte";
  const auto images = data_fixtures::synthetic_images(40, 5, 4);
  const Bytes good = to_bytes(data_fixtures::idx_images_bytes(images));
  std::vector<uint8_t> compressible = data_fixtures::idx_images_bytes(images);
  for (size_t i = 16; i < compressible.size(); ++i) compressible[i] = static_cast<uint8_t>(i / 9 % 4);
  const Bytes good_gz = gzipped(compressible);
  std::vector<uint8_t> longer = data_fixtures::idx_images_bytes(images);
  longer.push_back(7);
  // A tiny gzip file whose header claims 60000 images of 28×28 (47 MB): refused after reading what is there.
  const Bytes claims_more = gzipped(idx_header(data::kIdxImageMagic, {60000, 28, 28}));
  const Bytes claims_more_plain = to_bytes(idx_header(data::kIdxImageMagic, {60000, 28, 28}));

  const std::vector<Case> cases = {
      {"truncated: empty file", {}, "too short to be an IDX file: 0 bytes"},
      {"truncated: inside the magic", cut(good, 2), "too short to be an IDX file: 2 bytes"},
      {"truncated: inside the dimensions", cut(good, 10), "ends inside its IDX header: 10 of 16 header bytes"},
      {"truncated: after the header", cut(good, 16), "is truncated"},
      {"truncated: inside the data", cut(good, good.size() - 10), "(39.5 images)"},
      {"data longer than the header says", to_bytes(longer), "trailing data is refused"},
      {"header larger than the file", claims_more_plain, "is truncated"},
      {"wrong magic (a label file)", to_bytes(data_fixtures::idx_labels_bytes({1, 2})), "is this a label file?"},
      {"unsupported dtype", to_bytes(idx_header(0x00000D03, {1, 1, 1})), "data type byte 0x0d (float32)"},
      {"dims whose product overflows 64 bits",
       to_bytes(idx_header(data::kIdxImageMagic, {0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF})),
       "overflow a 64-bit byte count"},
      {"huge size", to_bytes(idx_header(data::kIdxImageMagic, {65536, 256, 256})), "resource limit"},
      {"zero-sized images", to_bytes(idx_header(data::kIdxImageMagic, {3, 0, 28})), "rows and cols must be at least 1"},
      {"gzip: truncated in the member header", cut(good_gz, 5), "is truncated"},
      {"gzip: truncated in the deflate data", cut(good_gz, good_gz.size() / 2), "is truncated"},
      {"gzip: truncated in the trailer", cut(good_gz, good_gz.size() - 3), "is truncated"},
      {"gzip: CRC mismatch", with_byte(good_gz, good_gz.size() - 8, 0xFF), "incorrect data check"},
      {"gzip: length mismatch", with_byte(good_gz, good_gz.size() - 4, 0x01), "incorrect length check"},
      {"gzip: unknown compression method", with_byte(good_gz, 2, 0x01), "is corrupt"},
      {"gzip: decompresses to more than the header says", gzipped(longer), "trailing data is refused"},
      {"gzip: header larger than the stream", claims_more, "is truncated"},
  };
  check_refused(cases, path, [&](const Bytes& bytes) {
    data::parse_idx_images(std::span(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), path);
  });
}
