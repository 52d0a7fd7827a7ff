// OpenBLAS runs kernels that use the CPU's vector instructions, not its generic fallback (core/threads.h).
#include <cblas.h>
#include <doctest/doctest.h>

#include <cstdlib>
#include <string>

#include "core/ops.h"
#include "core/threads.h"

using namespace lowbit;

TEST_CASE("on a CPU with AVX2, sgemm does not run OpenBLAS's generic pre-AVX2 kernels") {
  const Tensor a = Tensor::ones({8, 8});
  CHECK(ops::matmul(a, a).data()[0] == 8.f);  // every sgemm caller goes through prepare_blas()
  const std::string core = openblas_get_corename();
  MESSAGE(blas_description());
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) {
    MESSAGE("skipped: OPENBLAS_CORETYPE is set, the user's choice stands");
    return;
  }
  if (!__builtin_cpu_supports("avx2")) {
    MESSAGE("skipped: this CPU has no AVX2");
    return;
  }
  for (const char* generic : {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom", "Sandybridge"})
    CHECK_MESSAGE(core != generic, "OpenBLAS runs its ", core, " kernels on a CPU with AVX2");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    CHECK_MESSAGE((core == "SkylakeX" || core == "Cooperlake" || core == "SapphireRapids"), "OpenBLAS runs its ", core,
                  " kernels on a CPU with AVX-512");
}
