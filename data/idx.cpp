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
#include <system_error>

#include "core/error.h"

namespace lowbit::data {

namespace {

namespace fs = std::filesystem;

constexpr size_t kChunkBytes = size_t{1} << 20;  // read granularity (gzread takes an unsigned length)
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
// One open file, plain or gzip (sniffed from the first two bytes). read() hands out the
// (decompressed) bytes in order; every zlib problem becomes a lowbit::Error naming the path.
// zlib decompresses ahead into its own buffer, so a problem may surface before the bytes
// preceding it have been handed out: messages therefore give no byte position.
class ByteSource {
 public:
  explicit ByteSource(const std::string& path) : path_(path) {
    std::error_code ec;
    const fs::file_status status = fs::status(path, ec);
    if (!fs::exists(status)) fail("IDX file '{}' does not exist (check the path or pass --data DIR)", path);
    if (fs::is_directory(status)) fail("'{}' is a folder, expected an IDX file", path);
    file_ = std::fopen(path.c_str(), "rb");
    if (file_ == nullptr) fail("cannot open IDX file '{}': {} (check its permissions)", path, std::strerror(errno));
    std::array<uint8_t, 2> magic{};
    const size_t got = std::fread(magic.data(), 1, magic.size(), file_);
    gzipped_ = got == 2 && magic[0] == 0x1f && magic[1] == 0x8b;
    if (!gzipped_) {
      file_size_ = fs::file_size(path, ec);
      if (ec) fail("cannot read the size of IDX file '{}': {}", path, ec.message());
      std::rewind(file_);
      return;
    }
    std::fclose(file_);
    file_ = nullptr;
    gz_ = gzopen(path.c_str(), "rb");
    if (gz_ == nullptr) fail("cannot open gzip file '{}': {}", path, std::strerror(errno));
    gzbuffer(gz_, 1u << 17);
  }
  ~ByteSource() {
    if (file_ != nullptr) std::fclose(file_);
    if (gz_ != nullptr) gzclose_r(gz_);
  }
  ByteSource(const ByteSource&) = delete;
  ByteSource& operator=(const ByteSource&) = delete;

  bool gzipped() const { return gzipped_; }
  uint64_t file_size() const { return file_size_; }  // plain files only
  uint64_t bytes_read() const { return bytes_read_; }

  // Reads up to n bytes; returns fewer only where the data ends.
  size_t read(uint8_t* destination, size_t n) {
    size_t total = 0;
    while (total < n) {
      const size_t want = std::min(kChunkBytes, n - total);
      size_t got = 0;
      if (gzipped_) {
        const int result = gzread(gz_, destination + total, static_cast<unsigned>(want));
        if (result < 0) check_gzip_status();  // throws
        got = static_cast<size_t>(std::max(result, 0));
      } else {
        got = std::fread(destination + total, 1, want, file_);
        if (got < want && std::ferror(file_)) fail("read error in IDX file '{}': {}", path_, std::strerror(errno));
      }
      total += got;
      bytes_read_ += got;
      if (got == 0) break;
    }
    if (total < n && gzipped_) check_gzip_status();  // a short gzip read may hide truncation
    return total;
  }

  // Called after the last expected byte: refuses trailing data and, for gzip, makes zlib read
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
          path_, file_size_ - (bytes_read_ - 1), described);
    }
    if (gzipped_) {
      const int result = gzclose_r(gz_);
      gz_ = nullptr;
      if (result == Z_BUF_ERROR) truncated_gzip("unexpected end of file");
      if (result != Z_OK) fail("cannot finish reading gzip file '{}' (zlib error {})", path_, result);
    }
  }

 private:
  // zlib reports a stream that ends early as Z_BUF_ERROR, bad data or a CRC mismatch as Z_DATA_ERROR.
  void check_gzip_status() {
    int errnum = Z_OK;
    const char* message = gzerror(gz_, &errnum);
    if (errnum == Z_OK) return;
    if (errnum == Z_BUF_ERROR) truncated_gzip(message);
    if (errnum == Z_ERRNO) fail("read error in gzip file '{}': {}", path_, std::strerror(errno));
    fail("gzip file '{}' is corrupt: zlib reports '{}' (re-download or re-copy the file)", path_, strip_path(message));
  }
  // gzerror prefixes its message with "path: "; the path is already in ours.
  std::string strip_path(const char* message) const {
    const std::string text = message;
    const std::string prefix = path_ + ": ";
    return text.starts_with(prefix) ? text.substr(prefix.size()) : text;
  }
  [[noreturn]] void truncated_gzip(const char* message) {
    fail(
        "gzip file '{}' is truncated: the compressed stream ends early (zlib: '{}'); re-download or "
        "re-copy the file",
        path_, strip_path(message));
  }

  std::string path_;
  std::FILE* file_ = nullptr;
  gzFile gz_ = nullptr;
  bool gzipped_ = false;
  uint64_t file_size_ = 0;
  uint64_t bytes_read_ = 0;
};

// ============================================================================ header

struct IdxFile {
  std::vector<uint32_t> dims;
  std::vector<uint8_t> data;
};

const char* kind_name(uint32_t magic) { return magic == kIdxImageMagic ? "image" : "label"; }

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
    why = fmt::format("rank {}, expected {}", rank, expected & 0xFF);
  }
  fail("'{}': expected IDX {} magic 0x{:08x}, found 0x{:08x} ({})", path, kind_name(expected), expected, found, why);
}

// Reads and checks the header, then the data it announces. The rank comes from the expected
// magic: 3 for images (count, rows, cols), 1 for labels (count).
IdxFile read_idx(const std::string& path, uint32_t expected_magic) {
  ByteSource source(path);
  const size_t rank = expected_magic & 0xFF;
  const size_t header_bytes = 4 + 4 * rank;
  std::vector<uint8_t> header(header_bytes);
  const size_t got = source.read(header.data(), header_bytes);
  if (got < 4)
    fail("'{}' is too short to be an IDX file: {} bytes{} (empty or cut file?)", path, got,
         source.gzipped() ? " after decompression" : "");
  const uint32_t magic = big_endian_u32(header.data());
  if (magic != expected_magic) wrong_magic(path, expected_magic, magic);
  if (got < header_bytes) fail("'{}' ends inside its IDX header: {} of {} header bytes", path, got, header_bytes);

  IdxFile file;
  for (size_t d = 0; d < rank; ++d) file.dims.push_back(big_endian_u32(header.data() + 4 + 4 * d));

  if (rank == 3 && (file.dims[1] == 0 || file.dims[2] == 0)) {
    fail("'{}': header says images of {}x{}; rows and cols must be at least 1 (corrupt header?)", path, file.dims[1],
         file.dims[2]);
  }

  // Size of the data, overflow-checked, and capped before anything is allocated.
  uint64_t data_bytes = 1;
  for (uint32_t dim : file.dims) {
    if (__builtin_mul_overflow(data_bytes, uint64_t{dim}, &data_bytes)) {
      fail("'{}': header dimensions {} overflow a 64-bit byte count (corrupt header?)", path,
           fmt::join(file.dims, " x "));
    }
  }
  uint64_t item_bytes = 1;  // rows * cols for images: below 2^64, the product of two uint32
  for (size_t d = 1; d < rank; ++d) item_bytes *= file.dims[d];
  const std::string described = rank == 3 ? fmt::format("{} images of {}x{}", file.dims[0], file.dims[1], file.dims[2])
                                          : fmt::format("{} labels", file.dims[0]);
  const char* noun = rank == 3 ? "images" : "labels";
  if (data_bytes > kMaxIdxDataBytes) {
    fail(
        "'{}': header says {} = {} bytes, over lowbit's resource limit of {} bytes; refusing to "
        "allocate (corrupt header, or a data set too large to load at once)",
        path, described, data_bytes, kMaxIdxDataBytes);
  }
  if (!source.gzipped()) {
    const uint64_t available = source.file_size() - header_bytes;
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
    // The decompressed size is unknown up front: grow chunk by chunk as data really arrives.
    while (file.data.size() < data_bytes) {
      const size_t old_size = file.data.size();
      const size_t want = std::min<uint64_t>(kChunkBytes, data_bytes - old_size);
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

}  // namespace

IdxImages read_idx_images(const std::string& path) {
  IdxFile file = read_idx(path, kIdxImageMagic);
  IdxImages images;
  images.count = file.dims[0];
  images.rows = file.dims[1];
  images.cols = file.dims[2];
  images.pixels = std::move(file.data);
  return images;
}

std::vector<uint8_t> read_idx_labels(const std::string& path) { return std::move(read_idx(path, kIdxLabelMagic).data); }

}  // namespace lowbit::data
