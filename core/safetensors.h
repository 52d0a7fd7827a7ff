// The safetensors codec: the one container for every lowbit model file (docs/model-file-format.md).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/error.h"

namespace lowbit {

// The data area is raw little-endian bytes copied to and from memory as is.
static_assert(std::endian::native == std::endian::little, "lowbit's model files assume a little-endian host");

enum class DType { F32, F64, I8, U8, I16, I32, I64 };

size_t dtype_size(DType dtype);          // bytes per element: F32 -> 4, I8 -> 1, ...
std::string_view dtype_name(DType dtype);  // the header spelling: "F32", "I8", ...

// One tensor as stored: dtype, shape (empty = 0-d scalar) and its raw little-endian bytes.
struct StTensor {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;
};

// A whole file: string metadata plus named tensors, in data-area order.
struct StFile {
  std::map<std::string, std::string> metadata;
  std::vector<std::pair<std::string, StTensor>> tensors;  // the writer lays them out in this order

  const StTensor* find(std::string_view name) const;  // nullptr if absent
  // Throws "PATH: tensor 'x' missing (...)" if absent.
  const StTensor& get(std::string_view name, std::string_view path_for_errors) const;
};

// Writes atomically: PATH.tmp-<pid> next to PATH, write, fsync, rename over PATH.
// On failure the temporary is removed and an existing PATH is left untouched.
void save_safetensors(const std::string& path, const StFile& file);

// Reads the whole file, then parse_safetensors.
StFile load_safetensors(const std::string& path);

// Pure: validates every length, offset and field before trusting it (fuzzers call this).
StFile parse_safetensors(std::span<const std::byte> bytes, const std::string& path_for_errors);

// ---- typed helpers -------------------------------------------------------------------------

// Packs `values` (row-major, numel(shape) of them) into a tensor of `dtype`.
template <typename T>
StTensor make_st_tensor(DType dtype, std::vector<int64_t> shape, std::span<const T> values) {
  if (sizeof(T) != dtype_size(dtype)) {
    fail("make_st_tensor: element type of {} bytes does not match dtype {} ({} bytes) (pick the matching C++ type)",
         sizeof(T), dtype_name(dtype), dtype_size(dtype));
  }
  size_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0) fail("make_st_tensor: negative dimension {} (shapes are non-negative)", d);
    numel *= static_cast<size_t>(d);
  }
  if (numel != values.size()) {
    fail("make_st_tensor: shape holds {} elements but {} values were given (check the shape)", numel,
         values.size());
  }
  StTensor tensor{dtype, std::move(shape), std::vector<std::byte>(values.size_bytes())};
  if (!values.empty()) std::memcpy(tensor.bytes.data(), values.data(), values.size_bytes());
  return tensor;
}

// Unpacks a tensor's bytes as T after checking its dtype; `what` names it in errors.
template <typename T>
std::vector<T> st_values(const StTensor& tensor, DType expected, std::string_view what) {
  if (tensor.dtype != expected) {
    fail("{}: expected dtype {}, found {} (the file was written by a different writer or version)", what,
         dtype_name(expected), dtype_name(tensor.dtype));
  }
  if (sizeof(T) != dtype_size(expected) || tensor.bytes.size() % sizeof(T) != 0) {
    fail("{}: {} bytes cannot be read as {}-byte elements (pick the C++ type matching dtype {})", what,
         tensor.bytes.size(), sizeof(T), dtype_name(expected));
  }
  std::vector<T> values(tensor.bytes.size() / sizeof(T));
  if (!values.empty()) std::memcpy(values.data(), tensor.bytes.data(), tensor.bytes.size());
  return values;
}

}  // namespace lowbit
