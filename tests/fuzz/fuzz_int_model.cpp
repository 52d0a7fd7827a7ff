// libFuzzer target: the integer-graph reader (load, validate, run fast vs reference); the body is fuzz_targets.h.
#include <cstddef>
#include <cstdint>
#include <span>

#include "tests/fuzz/fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lowbit::fuzz::int_model_input(std::as_bytes(std::span<const uint8_t>(data, size)));
  return 0;
}
