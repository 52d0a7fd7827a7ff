// Writing gzip files through zlib's gz* interface.
#include "data/gzip.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace lowbit::data {

void write_gzip_file(const std::string& path, std::span<const uint8_t> bytes) {
  gzFile file = gzopen(path.c_str(), "wb6");
  if (file == nullptr) {
    fail("cannot create gzip file '{}': {} (check that the folder exists and is writable)", path, std::strerror(errno));
  }
  // gzwrite takes an unsigned length, so large buffers go through in chunks.
  constexpr size_t kChunk = size_t{1} << 20;
  for (size_t offset = 0; offset < bytes.size(); offset += kChunk) {
    const unsigned length = static_cast<unsigned>(std::min(kChunk, bytes.size() - offset));
    if (gzwrite(file, bytes.data() + offset, length) != static_cast<int>(length)) {
      int errnum = 0;
      const std::string message = gzerror(file, &errnum);
      gzclose_w(file);
      fail("cannot write gzip file '{}': {} (is the disk full?)", path, message);
    }
  }
  if (gzclose_w(file) != Z_OK) fail("cannot finish gzip file '{}' (is the disk full?)", path);
}

}  // namespace lowbit::data
