// The fuzzers' seed corpus: small valid files made by lowbit itself, one folder per target.
#pragma once

#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "data/gzip.h"
#include "data/idx.h"
#include "nn/checkpoint.h"
#include "tests/fuzz/fuzz_models.h"

namespace lowbit::fuzz {

namespace seeds_detail {

namespace fs = std::filesystem;

// An IDX file: the magic and each dimension as big-endian uint32, then data_bytes of data.
inline std::vector<uint8_t> idx_bytes(uint32_t magic, const std::vector<uint32_t>& dims, size_t data_bytes) {
  std::vector<uint8_t> bytes;
  const auto put = [&](uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) bytes.push_back(static_cast<uint8_t>(v >> shift));
  };
  put(magic);
  for (const uint32_t d : dims) put(d);
  for (size_t i = 0; i < data_bytes; ++i) bytes.push_back(static_cast<uint8_t>(i * 37 % 251));
  return bytes;
}

inline void write(const fs::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

inline void write_idx_seeds(const fs::path& dir) {
  const auto images = idx_bytes(data::kIdxImageMagic, {3, 4, 3}, 36);
  const auto labels = idx_bytes(data::kIdxLabelMagic, {5}, 5);
  write(dir / "images.idx3", images);
  write(dir / "labels.idx1", labels);
  write(dir / "empty.idx3", idx_bytes(data::kIdxImageMagic, {0, 28, 28}, 0));
  data::write_gzip_file((dir / "images.idx3.gz").string(), images);
  data::write_gzip_file((dir / "labels.idx1.gz").string(), labels);
  // Two gzip members: the second continues the first.
  data::write_gzip_file((dir / "part1.gz").string(), std::span(images).first(20));
  data::write_gzip_file((dir / "part2.gz").string(), std::span(images).subspan(20));
  std::ifstream part1(dir / "part1.gz", std::ios::binary), part2(dir / "part2.gz", std::ios::binary);
  std::vector<uint8_t> two_members((std::istreambuf_iterator<char>(part1)), std::istreambuf_iterator<char>());
  two_members.insert(two_members.end(), std::istreambuf_iterator<char>(part2), std::istreambuf_iterator<char>());
  write(dir / "two-members.idx3.gz", two_members);
  fs::remove(dir / "part1.gz");
  fs::remove(dir / "part2.gz");
}

inline void write_checkpoint_seeds(const fs::path& dir) {
  const auto model = tiny_float_model();
  // The metadata train writes, and one optimizer tensor.
  const std::map<std::string, std::string> metadata = {{"model", "tiny"},       {"phase", "fp32"},   {"epoch", "1"},
                                                       {"norm_mean", "0.1"},    {"norm_std", "0.3"}, {"steps", "10"},
                                                       {"rng_state", "1,2,3,4"}};
  nn::save_checkpoint((dir / "tiny.safetensors").string(), *model, metadata,
                      {{"optim.step", Tensor::from({1}, std::vector<float>{10.f})}});
  nn::save_checkpoint((dir / "bare.safetensors").string(), *model, {});
}

inline void write_int_model_seeds(const fs::path& dir) {
  quant::save_int_model((dir / "tiny.int.safetensors").string(), tiny_int_model());
  quant::save_int_model((dir / "tiny-graph.int.safetensors").string(), tiny_graph_int_model());
}

}  // namespace seeds_detail

// Writes ROOT/idx/*, ROOT/checkpoint/*, ROOT/int_model/* (folders created as needed).
inline void write_seeds(const std::filesystem::path& root) {
  for (const char* target : {"idx", "checkpoint", "int_model"}) std::filesystem::create_directories(root / target);
  seeds_detail::write_idx_seeds(root / "idx");
  seeds_detail::write_checkpoint_seeds(root / "checkpoint");
  seeds_detail::write_int_model_seeds(root / "int_model");
}

}  // namespace lowbit::fuzz
