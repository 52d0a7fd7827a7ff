// Small generated IDX files for tests: headers, synthetic images and labels, plain and gzipped MNIST folders.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "core/rng.h"
#include "data/gzip.h"
#include "data/idx.h"
#include "data/mnist.h"

namespace lowbit::data_fixtures {

// A fresh folder under the system temp folder, removed when the object goes away.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag)
      : path(std::filesystem::temp_directory_path() / ("lowbit_test_" + tag + "_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
  std::string str() const { return path.string(); }
};

// An IDX header: the magic as a big-endian uint32, then each dimension as a big-endian uint32.
inline std::vector<uint8_t> idx_header(uint32_t magic, const std::vector<uint32_t>& dims) {
  std::vector<uint8_t> bytes;
  auto put = [&](uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) bytes.push_back(static_cast<uint8_t>(v >> shift));
  };
  put(magic);
  for (uint32_t d : dims) put(d);
  return bytes;
}

// Rank 3 (count, rows, cols) for one channel, rank 4 (count, channels, rows, cols) otherwise.
inline std::vector<uint8_t> idx_images_bytes(const data::IdxImages& images) {
  const auto count = static_cast<uint32_t>(images.count), channels = static_cast<uint32_t>(images.channels),
             rows = static_cast<uint32_t>(images.rows), cols = static_cast<uint32_t>(images.cols);
  std::vector<uint8_t> bytes = images.channels == 1
                                   ? idx_header(data::kIdxImageMagic, {count, rows, cols})
                                   : idx_header(data::kIdxChannelImageMagic, {count, channels, rows, cols});
  bytes.insert(bytes.end(), images.pixels.begin(), images.pixels.end());
  return bytes;
}

inline std::vector<uint8_t> idx_labels_bytes(const std::vector<uint8_t>& labels) {
  std::vector<uint8_t> bytes = idx_header(data::kIdxLabelMagic, {static_cast<uint32_t>(labels.size())});
  bytes.insert(bytes.end(), labels.begin(), labels.end());
  return bytes;
}

// Seeded pseudo-random pixels (every value 0..255 likely to occur).
inline data::IdxImages synthetic_images(int64_t count, int64_t rows, int64_t cols, uint64_t seed = 1) {
  data::IdxImages images{count, rows, cols, std::vector<uint8_t>(count * rows * cols)};
  Rng rng(seed);
  for (uint8_t& p : images.pixels) p = static_cast<uint8_t>(rng.below(256));
  return images;
}

// Seeded labels in 0..9.
inline std::vector<uint8_t> synthetic_labels(int64_t count, uint64_t seed = 2) {
  std::vector<uint8_t> labels(count);
  Rng rng(seed);
  for (uint8_t& l : labels) l = static_cast<uint8_t>(rng.below(10));
  return labels;
}

inline void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

inline std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Writes `bytes` plain or gzipped (the file name is the caller's choice; nothing is appended).
inline void write_file(const std::string& path, const std::vector<uint8_t>& bytes, bool gzip) {
  if (gzip) {
    data::write_gzip_file(path, bytes);
  } else {
    write_bytes(path, bytes);
  }
}

struct MnistFolder {
  int64_t train_count = 20;
  int64_t test_count = 8;
  int64_t rows = 4;
  int64_t cols = 3;
  bool gzip = true;           // write .gz files
  bool dotted_names = false;  // train-images.idx3-ubyte instead of train-images-idx3-ubyte
};

// The file name of one of the four files, e.g. ("train", "images", "idx3-ubyte").
inline std::string mnist_file_name(const MnistFolder& spec, const std::string& split, const std::string& what,
                                   const std::string& kind) {
  return split + "-" + what + (spec.dotted_names ? "." : "-") + kind + (spec.gzip ? ".gz" : "");
}

// Writes the four files of a small MNIST-style folder into `dir`; returns what was written.
inline data::MnistData write_mnist_folder(const std::string& dir, const MnistFolder& spec = {}) {
  data::MnistData data;
  data.train = {synthetic_images(spec.train_count, spec.rows, spec.cols, 11), synthetic_labels(spec.train_count, 12)};
  data.test = {synthetic_images(spec.test_count, spec.rows, spec.cols, 13), synthetic_labels(spec.test_count, 14)};
  const std::string base = dir + "/";
  write_file(base + mnist_file_name(spec, "train", "images", "idx3-ubyte"), idx_images_bytes(data.train.images),
             spec.gzip);
  write_file(base + mnist_file_name(spec, "train", "labels", "idx1-ubyte"), idx_labels_bytes(data.train.labels),
             spec.gzip);
  write_file(base + mnist_file_name(spec, "t10k", "images", "idx3-ubyte"), idx_images_bytes(data.test.images),
             spec.gzip);
  write_file(base + mnist_file_name(spec, "t10k", "labels", "idx1-ubyte"), idx_labels_bytes(data.test.labels),
             spec.gzip);
  return data;
}

}  // namespace lowbit::data_fixtures
