// Writing gzip files (the reading side lives in the IDX reader): used by tests and fixture generators.
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace lowbit::data {

// Writes `bytes` to `path` as one gzip member (zlib level 6). Throws lowbit::Error on I/O failure.
void write_gzip_file(const std::string& path, std::span<const uint8_t> bytes);

}  // namespace lowbit::data
