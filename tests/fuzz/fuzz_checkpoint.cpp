// libFuzzer target: the checkpoint reader (safetensors container, format tag, load_weights); the body is
// fuzz_targets.h.
#include <cstddef>
#include <cstdint>
#include <span>

#include "tests/fuzz/fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lowbit::fuzz::checkpoint_input(std::as_bytes(std::span<const uint8_t>(data, size)));
  return 0;
}
