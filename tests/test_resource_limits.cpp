// Resource limits: a data set larger than the memory a process may use is refused with std::bad_alloc by the
// reader (never an abort) and reported by the programs as one clear "out of memory" line.
#include <doctest/doctest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <new>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/gzip.h"
#include "data/idx.h"
#include "data_fixtures.h"

using namespace lowbit;
using data_fixtures::TempDir;
namespace fs = std::filesystem;

#if defined(__SANITIZE_ADDRESS__)
#define LOWBIT_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LOWBIT_UNDER_ASAN 1
#endif
#endif

namespace {

constexpr rlim_t kAddressSpaceLimit = rlim_t{768} << 20;  // a process limited to 768 MiB of address space
constexpr uint32_t kImages = 1'400'000;                   // 1.4 M images of 28×28: 1.1 GB, over the limit
constexpr int kExitBadAlloc = 3, kExitLowbitError = 4, kExitLoaded = 5;

// The images file of a folder whose training set is larger than the limit: a sparse plain file (no disk
// used) or a gzip stream of zeros (one header member, then many members of zeros).
void write_huge_images(const std::string& path, bool gzip) {
  const std::vector<uint8_t> header = data_fixtures::idx_header(data::kIdxImageMagic, {kImages, 28, 28});
  const uint64_t data_bytes = uint64_t{kImages} * 28 * 28;
  if (!gzip) {
    data_fixtures::write_bytes(path, header);
    fs::resize_file(path, header.size() + data_bytes);  // a hole: reads as zeros
    return;
  }
  const size_t member_bytes = size_t{16} << 20;
  const auto member = [&](size_t bytes) {  // one gzip member of `bytes` zeros
    data::write_gzip_file(path + ".member", std::vector<uint8_t>(bytes));
    return data_fixtures::read_bytes(path + ".member");
  };
  const std::vector<uint8_t> header_member = [&] {
    data::write_gzip_file(path + ".member", header);
    return data_fixtures::read_bytes(path + ".member");
  }();
  const std::vector<uint8_t> full = member(member_bytes), last = member(data_bytes % member_bytes);
  std::ofstream out(path, std::ios::binary);
  const auto put = [&](const std::vector<uint8_t>& bytes) {
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  };
  put(header_member);
  for (uint64_t i = 0; i < data_bytes / member_bytes; ++i) put(full);
  put(last);
}

// Reads `path` in a child process limited to kAddressSpaceLimit; returns how the read ended.
int read_under_limit(const std::string& path) {
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    const rlimit limit{kAddressSpaceLimit, kAddressSpaceLimit};
    setrlimit(RLIMIT_AS, &limit);
    try {
      data::read_idx_images(path);
    } catch (const std::bad_alloc&) {
      _exit(kExitBadAlloc);
    } catch (const Error&) {
      _exit(kExitLowbitError);
    }
    _exit(kExitLoaded);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE_MESSAGE(WIFEXITED(status), "the reader did not exit normally (an abort?), status ", status);
  return WEXITSTATUS(status);
}

}  // namespace

TEST_CASE("a data set larger than memory allows: the reader throws std::bad_alloc, plain and gzip") {
#ifdef LOWBIT_UNDER_ASAN
  MESSAGE("skipped: AddressSanitizer reserves terabytes of address space, so RLIMIT_AS cannot be used");
  return;
#endif
  TempDir dir("resource_limits_reader");
  for (const bool gzip : {false, true}) {
    CAPTURE(gzip);
    const std::string path = dir / (gzip ? "huge.gz" : "huge");
    write_huge_images(path, gzip);
    CHECK(read_under_limit(path) == kExitBadAlloc);
  }
}

TEST_CASE("train on a data set larger than memory allows: one 'out of memory' line, exit code 1") {
#ifdef LOWBIT_UNDER_ASAN
  MESSAGE("skipped: AddressSanitizer reserves terabytes of address space, so RLIMIT_AS cannot be used");
  return;
#endif
  TempDir dir("resource_limits_apps");
  const std::string data = dir / "data";
  fs::create_directories(data);
  data_fixtures::write_mnist_folder(data, {.train_count = 10, .test_count = 10, .rows = 28, .cols = 28, .gzip = false});
  write_huge_images(data + "/train-images-idx3-ubyte", false);
  const std::string err = dir / "stderr.txt";
  // The limit is set by the shell for the program alone (ulimit -v takes KiB).
  const std::string command = "ulimit -v " + std::to_string(kAddressSpaceLimit >> 10) +
                              " && " LOWBIT_BIN_DIR "/train --model mlp --epochs 1 --dry-run --threads 1 --data " +
                              data + " --out " + (dir / "never.safetensors") + " 2> " + err;
  const int status = std::system(("bash -c '" + command + "'").c_str());
  const auto bytes = data_fixtures::read_bytes(err);
  const std::string message(bytes.begin(), bytes.end());
  INFO("stderr: ", message);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);
  CHECK(message.starts_with("train: error: out of memory"));
  CHECK(std::count(message.begin(), message.end(), '\n') == 1);
  CHECK_FALSE(fs::exists(dir / "never.safetensors"));
}
