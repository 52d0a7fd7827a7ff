// IDX reader: header validation before any allocation, then a streaming read through zlib or stdio.
#include "data/idx.h"

#include <fmt/ranges.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <new>
#include <span>
#include <system_error>

#include "core/error.h"

namespace lowbit::data {

namespace {

namespace fs = std::filesystem;

constexpr size_t kChunkBytes = size_t{1} << 20;       // read granularity (zlib takes an unsigned length)
constexpr size_t kFirstChunkBytes = size_t{1} << 16;  // gzip: the first allocation for data of unknown length
constexpr uint8_t kIdxUnsignedByte = 0x08;

const char* dtype_name(uint8_t dtype) {
  switch (dtype) {
    case 0x08:
      return "unsigned byte";
    case 0x09:
      return "signed byte";
    case 0x0B:
      return "int16";
    case 0x0C:
      return "int32";
    case 0x0D:
      return "float32";
    case 0x0E:
      return "float64";
    default:
      return "not an IDX type";
  }
}

// ============================================================================ byte source
// The bytes of one input, plain or gzip (sniffed from the first two bytes), from an open file or
// from memory. read() hands out the (decompressed) bytes in order; gzip goes through zlib's
// inflate in both cases, so a file and the same bytes in memory are read by the same code.
// Every problem becomes a lowbit::Error naming the path. inflate works ahead of what has been
// handed out, so a problem may surface before the bytes preceding it: messages give no byte position.
class ByteSource {
 public:
  // Opens the file at `path`.
  explicit ByteSource(const std::string& path) : path_(path) {
    std::error_code ec;
    const fs::file_status status = fs::status(path, ec);
    if (!fs::exists(status)) fail("IDX file '{}' does not exist (check the path or pass --data DIR)", path);
    if (fs::is_directory(status)) fail("'{}' is a folder, expected an IDX file", path);
    file_ = std::fopen(path.c_str(), "rb");
    if (file_ == nullptr) fail("cannot open IDX file '{}': {} (check its permissions)", path, std::strerror(errno));
    input_size_ = fs::file_size(path, ec);
    if (ec) fail("cannot read the size of IDX file '{}': {}", path, ec.message());
    start();
  }
  // Reads `memory` (which must outlive the source); `path` only names it in messages.
  ByteSource(std::span<const uint8_t> memory, const std::string& path)
      : path_(path), memory_(memory), input_size_(memory.size()) {
    start();
  }
  ~ByteSource() {
    if (file_ != nullptr) std::fclose(file_);
    if (gzipped_) inflateEnd(&zlib_);
  }
  ByteSource(const ByteSource&) = delete;
  ByteSource& operator=(const ByteSource&) = delete;

  bool gzipped() const { return gzipped_; }
  uint64_t input_size() const { return input_size_; }  // bytes of the file (compressed, for gzip)
  uint64_t bytes_read() const { return bytes_read_; }

  // Reads up to n bytes; returns fewer only where the data ends.
  size_t read(uint8_t* destination, size_t n) {
    size_t total = 0;
    while (total < n) {
      const size_t want = std::min(kChunkBytes, n - total);
      const size_t got = gzipped_ ? inflate_into(destination + total, want) : read_raw(destination + total, want);
      total += got;
      bytes_read_ += got;
      if (got == 0) break;
    }
    return total;
  }

  // Called after the last expected byte: refuses trailing data and, for gzip, makes inflate read
  // and verify the stream's trailer (CRC-32 and length), which it only does when asked for more.
  void finish(const std::string& described) {
    uint8_t extra = 0;
    if (read(&extra, 1) != 0) {
      if (gzipped_) {
        fail(
            "'{}' decompresses to more bytes than its header describes ({}); the header and the data "
            "disagree (trailing data is refused)",
            path_, described);
      }
      fail(
          "'{}' has {} bytes after the {} its header describes; the header and the data disagree "
          "(trailing data is refused)",
          path_, input_size_ - (bytes_read_ - 1), described);
    }
  }

 private:
  static constexpr size_t kInputBufferBytes = size_t{1} << 17;

  // Sniffs the gzip magic; for gzip, sets up inflate (16 + MAX_WBITS: a gzip wrapper, 32 KiB window).
  void start() {
    std::array<uint8_t, 2> magic{};
    const size_t got = read_raw(magic.data(), magic.size());
    gzipped_ = got == 2 && magic[0] == 0x1f && magic[1] == 0x8b;
    if (!gzipped_) {  // back to the start
      raw_offset_ = 0;
      if (file_ != nullptr) std::rewind(file_);
      return;
    }
    input_.assign(magic.begin(), magic.end());
    zlib_.next_in = input_.data();
    zlib_.avail_in = 2;
    if (inflateInit2(&zlib_, 16 + MAX_WBITS) != Z_OK) throw std::bad_alloc();
  }

  // Up to n raw (undecompressed) bytes; fewer only at the end of the input.
  size_t read_raw(uint8_t* destination, size_t n) {
    if (file_ == nullptr) {
      const size_t got = std::min<uint64_t>(n, memory_.size() - raw_offset_);
      if (got > 0) std::memcpy(destination, memory_.data() + raw_offset_, got);
      raw_offset_ += got;
      return got;
    }
    const size_t got = std::fread(destination, 1, n, file_);
    if (got < n && std::ferror(file_)) fail("read error in IDX file '{}': {}", path_, std::strerror(errno));
    return got;
  }

  // Keeps the compressed bytes inflate has not consumed yet and appends more; false at the end of the input.
  bool refill() {
    const size_t kept = zlib_.avail_in;
    std::memmove(input_.data(), zlib_.next_in, kept);
    input_.resize(std::min<uint64_t>(kInputBufferBytes,
                                     std::max<uint64_t>(input_size_, kept + 1)));  // small inputs, small buffer
    const size_t got = read_raw(input_.data() + kept, input_.size() - kept);
    input_.resize(kept + got);
    zlib_.next_in = input_.data();
    zlib_.avail_in = static_cast<uInt>(input_.size());
    return got > 0;
  }

  // After the end of one gzip member: another member follows (read on) or the rest is ignored, as
  // gunzip does. Returns true if reading goes on.
  bool next_member() {
    if (zlib_.avail_in < 2) refill();
    if (zlib_.avail_in < 2 || zlib_.next_in[0] != 0x1f || zlib_.next_in[1] != 0x8b) return false;
    if (inflateReset(&zlib_) != Z_OK) fail("gzip file '{}': zlib cannot restart (internal error)", path_);
    member_ended_ = false;
    return true;
  }

  // Up to n decompressed bytes; fewer only at the end of the (last) gzip member.
  size_t inflate_into(uint8_t* destination, size_t n) {
    zlib_.next_out = destination;
    zlib_.avail_out = static_cast<uInt>(n);
    while (zlib_.avail_out > 0 && !done_) {
      if (member_ended_ && !next_member()) {
        done_ = true;
        break;
      }
      if (zlib_.avail_in == 0 && !refill()) truncated_gzip("unexpected end of file");
      const int result = inflate(&zlib_, Z_NO_FLUSH);
      if (result == Z_STREAM_END) {
        member_ended_ = true;
      } else if (result == Z_MEM_ERROR) {
        throw std::bad_alloc();
      } else if (result == Z_BUF_ERROR) {  // no progress possible: inflate wants more input
        if (!refill()) truncated_gzip("unexpected end of file");
      } else if (result != Z_OK) {
        fail("gzip file '{}' is corrupt: zlib reports '{}' (re-download or re-copy the file)", path_,
             zlib_.msg != nullptr ? zlib_.msg : "unknown error");
      }
    }
    return n - zlib_.avail_out;
  }

  [[noreturn]] void truncated_gzip(const char* message) {
    fail(
        "gzip file '{}' is truncated: the compressed stream ends early (zlib: '{}'); re-download or "
        "re-copy the file",
        path_, message);
  }

  std::string path_;
  std::FILE* file_ = nullptr;        // the file, or
  std::span<const uint8_t> memory_;  // the bytes in memory
  uint64_t raw_offset_ = 0;          // memory only: raw bytes handed out so far
  uint64_t input_size_ = 0;
  bool gzipped_ = false;
  z_stream zlib_{};
  std::vector<uint8_t> input_;  // gzip: compressed bytes read but not yet consumed by inflate
  bool member_ended_ = false, done_ = false;
  uint64_t bytes_read_ = 0;
};

// ============================================================================ header

struct IdxFile {
  std::vector<uint32_t> dims;
  std::vector<uint8_t> data;
};

const char* kind_name(uint32_t magic) { return magic == kIdxLabelMagic ? "label" : "image"; }

uint32_t big_endian_u32(const uint8_t* bytes) {
  return (uint32_t{bytes[0]} << 24) | (uint32_t{bytes[1]} << 16) | (uint32_t{bytes[2]} << 8) | uint32_t{bytes[3]};
}

// Explains why `found` is not `expected` (both IDX magic numbers), ending in a hint.
[[noreturn]] void wrong_magic(const std::string& path, uint32_t expected, uint32_t found) {
  const uint8_t dtype = (found >> 8) & 0xFF;
  const uint8_t rank = found & 0xFF;
  std::string why;
  if ((found >> 16) != 0) {
    why = "not an IDX file: its first two bytes must be zero";
  } else if (dtype != kIdxUnsignedByte) {
    why = fmt::format("data type byte 0x{:02x} ({}) is not supported, only 0x08 (unsigned byte)", dtype,
                      dtype_name(dtype));
  } else if (found == kIdxImageMagic || found == kIdxLabelMagic) {
    why = fmt::format("is this {} file?", found == kIdxImageMagic ? "an image" : "a label");
  } else {
    why = fmt::format("rank {}, expected {}{}", rank, expected & 0xFF,
                      expected == kIdxImageMagic ? " (or 4: images with channels)" : "");
  }
  fail("'{}': expected IDX {} magic 0x{:08x}, found 0x{:08x} ({})", path, kind_name(expected), expected, found, why);
}

// Reads and checks the header, then the data it announces. The rank comes from the magic: 3 for
// images (count, rows, cols), 4 for images with channels (count, channels, rows, cols), 1 for labels.
IdxFile read_idx(ByteSource& source, const std::string& path, uint32_t expected_magic) {
  std::vector<uint8_t> header(4);
  const size_t got = source.read(header.data(), 4);
  if (got < 4)
    fail("'{}' is too short to be an IDX file: {} bytes{} (empty or cut file?)", path, got,
         source.gzipped() ? " after decompression" : "");
  const uint32_t magic = big_endian_u32(header.data());
  const bool channel_images = expected_magic == kIdxImageMagic && magic == kIdxChannelImageMagic;
  if (magic != expected_magic && !channel_images) wrong_magic(path, expected_magic, magic);
  const size_t rank = magic & 0xFF;
  const size_t header_bytes = 4 + 4 * rank;
  header.resize(header_bytes);
  const size_t more = source.read(header.data() + 4, header_bytes - 4);
  if (4 + more < header_bytes)
    fail("'{}' ends inside its IDX header: {} of {} header bytes", path, 4 + more, header_bytes);

  IdxFile file;
  for (size_t d = 0; d < rank; ++d) file.dims.push_back(big_endian_u32(header.data() + 4 + 4 * d));

  if (rank >= 3 && (file.dims[rank - 2] == 0 || file.dims[rank - 1] == 0 || file.dims[1] == 0)) {
    fail("'{}': header says images of {}; channels, rows and cols must be at least 1 (corrupt header?)", path,
         fmt::join(file.dims.begin() + 1, file.dims.end(), "x"));
  }

  // Size of one item (channels * rows * cols for images) and of the data, overflow-checked, and capped before
  // anything is allocated. The item's size on its own too: a header with 0 items may claim any dimensions.
  uint64_t item_bytes = 1, data_bytes = file.dims[0];
  for (size_t d = 1; d < rank; ++d) {
    if (__builtin_mul_overflow(item_bytes, uint64_t{file.dims[d]}, &item_bytes)) {
      fail("'{}': header dimensions {} overflow a 64-bit byte count (corrupt header?)", path,
           fmt::join(file.dims, " x "));
    }
  }
  if (__builtin_mul_overflow(data_bytes, item_bytes, &data_bytes)) {
    fail("'{}': header dimensions {} overflow a 64-bit byte count (corrupt header?)", path,
         fmt::join(file.dims, " x "));
  }
  const std::string described =
      rank >= 3 ? fmt::format("{} images of {}", file.dims[0], fmt::join(file.dims.begin() + 1, file.dims.end(), "x"))
                : fmt::format("{} labels", file.dims[0]);
  const char* noun = rank >= 3 ? "images" : "labels";
  if (std::max(data_bytes, item_bytes) > kMaxIdxDataBytes) {
    fail(
        "'{}': header says {} = {} bytes, over lowbit's resource limit of {} bytes; refusing to "
        "allocate (corrupt header, or a data set too large to load at once)",
        path, described, std::max(data_bytes, item_bytes), kMaxIdxDataBytes);
  }
  if (!source.gzipped()) {
    const uint64_t available = source.input_size() - header_bytes;
    if (available < data_bytes) {
      fail(
          "'{}' is truncated: the header says {} ({} bytes of data) but the file holds only {} bytes after "
          "the {}-byte header ({:.1f} {}); re-download or re-copy the file",
          path, described, data_bytes, available, header_bytes,
          static_cast<double>(available) / static_cast<double>(item_bytes), noun);
    }
    if (available > data_bytes) {
      fail(
          "'{}' has {} bytes after the {} its header describes; the header and the data disagree "
          "(trailing data is refused)",
          path, available - data_bytes, described);
    }
    file.data.resize(data_bytes);
    if (source.read(file.data.data(), data_bytes) != data_bytes) {
      fail("'{}' changed while being read (expected {} bytes of data)", path, data_bytes);
    }
  } else {
    // The decompressed size is unknown up front: grow as data really arrives, doubling from 64 KiB,
    // so memory never exceeds about twice what the stream has delivered.
    while (file.data.size() < data_bytes) {
      const size_t old_size = file.data.size();
      const size_t want =
          std::min<uint64_t>({kChunkBytes, std::max(kFirstChunkBytes, old_size), data_bytes - old_size});
      file.data.resize(old_size + want);
      const size_t arrived = source.read(file.data.data() + old_size, want);
      if (arrived < want) {
        const uint64_t have = old_size + arrived;
        fail(
            "'{}' is truncated: the header says {} ({} bytes of data) but the gzip stream holds only {} "
            "bytes after the {}-byte header ({:.1f} {}); re-download or re-copy the file",
            path, described, data_bytes, have, header_bytes,
            static_cast<double>(have) / static_cast<double>(item_bytes), noun);
      }
    }
  }
  source.finish(described);
  return file;
}

IdxImages to_images(IdxFile file) {
  IdxImages images;
  const size_t rank = file.dims.size();
  images.count = file.dims[0];
  images.channels = rank == 4 ? file.dims[1] : 1;
  images.rows = file.dims[rank - 2];
  images.cols = file.dims[rank - 1];
  images.pixels = std::move(file.data);
  return images;
}

}  // namespace

IdxImages read_idx_images(const std::string& path) {
  ByteSource source(path);
  return to_images(read_idx(source, path, kIdxImageMagic));
}

std::vector<uint8_t> read_idx_labels(const std::string& path) {
  ByteSource source(path);
  return std::move(read_idx(source, path, kIdxLabelMagic).data);
}

IdxImages parse_idx_images(std::span<const uint8_t> bytes, const std::string& path_for_errors) {
  ByteSource source(bytes, path_for_errors);
  return to_images(read_idx(source, path_for_errors, kIdxImageMagic));
}

std::vector<uint8_t> parse_idx_labels(std::span<const uint8_t> bytes, const std::string& path_for_errors) {
  ByteSource source(bytes, path_for_errors);
  return std::move(read_idx(source, path_for_errors, kIdxLabelMagic).data);
}

}  // namespace lowbit::data
