// The fast kernel paths (cpu.h) that this CPU supports, for tests that check each one; the others are reported.
#pragma once

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "quant/runtime/cpu.h"

namespace lowbit::test {

// Avx2, AvxVnni, Vnni512 and Amx where the CPU (and OS) supports them. Prints, once per test case that asks, which
// paths the test exercises and which it skips, so a machine without AVX-512 never passes them silently.
inline std::vector<quant::runtime::KernelPath> fast_paths_to_test() {
  namespace rt = quant::runtime;
  std::vector<rt::KernelPath> paths;
  std::string run, skipped;
  for (const rt::KernelPath path :
       {rt::KernelPath::Avx2, rt::KernelPath::AvxVnni, rt::KernelPath::Vnni512, rt::KernelPath::Amx}) {
    std::string& list = rt::cpu_supports(path) ? run : skipped;
    if (!list.empty()) list += ", ";
    list += rt::kernel_path_name(path);
    if (rt::cpu_supports(path)) paths.push_back(path);
  }
  MESSAGE("kernel paths exercised: ", run.empty() ? "none" : run,
          "; skipped (this CPU lacks them): ", skipped.empty() ? "none" : skipped, " [CPU: ", rt::cpu_features().model,
          "; ", rt::cpu_instruction_sets(), "]");
  return paths;
}

}  // namespace lowbit::test
