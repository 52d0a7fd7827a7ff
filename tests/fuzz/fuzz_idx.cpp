// libFuzzer target: the IDX reader (plain and gzip); the body is fuzz_targets.h.
#include <cstddef>
#include <cstdint>
#include <span>

#include "tests/fuzz/fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lowbit::fuzz::idx_input(std::span<const uint8_t>(data, size));
  return 0;
}
