// IDX files (the MNIST format): a big-endian header, then uint8 data; plain or gzip, read by streaming.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace lowbit::data {

// The IDX layout read here (all integers big-endian):
//   bytes 0-1  zero
//   byte  2    dtype: 0x08 = unsigned byte (the only one accepted)
//   byte  3    rank: 3 for images (count, rows, cols), 4 for images with channels (count, channels,
//              rows, cols), 1 for labels (count)
//   then one uint32 per dimension, then count * channels * rows * cols (or count) data bytes.
// Magic numbers as one uint32: images 0x00000803 (or 0x00000804 with channels), labels 0x00000801.
constexpr uint32_t kIdxImageMagic = 0x00000803;
constexpr uint32_t kIdxChannelImageMagic = 0x00000804;
constexpr uint32_t kIdxLabelMagic = 0x00000801;

// Resource limit: a file whose header asks for more data bytes than this is refused before any
// allocation (Fashion-MNIST's training images are 47 MB; this is 2 GiB).
constexpr uint64_t kMaxIdxDataBytes = uint64_t{1} << 31;

// Images as stored: `pixels` holds count * channels * rows * cols bytes, image after image, each
// (C, H, W) row-major (one plane per channel).
struct IdxImages {
  int64_t count = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<uint8_t> pixels;
  int64_t channels = 1;

  int64_t image_size() const { return channels * rows * cols; }
};

// Reads an IDX image file, rank 3 (count, rows, cols) or 4 (count, channels, rows, cols). Gzip is
// detected by its magic bytes (1f 8b), not by the file name.
// Every problem throws lowbit::Error naming the path: missing file, wrong magic / dtype / rank,
// zero rows or cols, a size over kMaxIdxDataBytes, a file shorter or longer than its header
// says, a truncated or corrupt gzip stream.
//
// Trailing data policy: the data must end exactly where the header says (plain file size, or
// the decompressed length of a .gz); extra bytes mean the header and the data disagree and are
// refused. Bytes after the end of a complete gzip stream that are not another gzip member are
// ignored, as zlib (and gunzip) do; further gzip members are read as a continuation.
IdxImages read_idx_images(const std::string& path);

// Reads an IDX label file (magic 0x00000801, one uint8 per example), same rules as above.
std::vector<uint8_t> read_idx_labels(const std::string& path);

// The same from the file's bytes in memory (plain or gzip; fuzzers call these). path_for_errors
// names the input in messages, exactly like the path of the functions above.
IdxImages parse_idx_images(std::span<const uint8_t> bytes, const std::string& path_for_errors);
std::vector<uint8_t> parse_idx_labels(std::span<const uint8_t> bytes, const std::string& path_for_errors);

}  // namespace lowbit::data
