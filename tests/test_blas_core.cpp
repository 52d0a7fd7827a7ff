// OpenBLAS runs kernels that use the CPU's vector instructions, not its generic fallback, OpenMP threads do not
// spin long (core/threads.h), and parallel_for runs no OpenMP region on one thread (core/parallel.h).
#include <cblas.h>
#include <doctest/doctest.h>
#include <omp.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/ops.h"
#include "core/parallel.h"
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

TEST_CASE("unless the user chose a wait policy, a lowbit program restarts itself with short OpenMP spin-waits") {
  // The environment this process was started with (tests/test_main.cpp calls shorten_openmp_waits first).
  std::string start_env;
  if (std::FILE* f = std::fopen("/proc/self/environ", "rb"); f != nullptr) {
    for (int c; (c = std::fgetc(f)) != EOF;) start_env.push_back(c == '\0' ? '\n' : static_cast<char>(c));
    std::fclose(f);
  }
  const auto started_with = [&](const std::string& entry) {
    return start_env.rfind(entry, 0) == 0 || start_env.find("\n" + entry) != std::string::npos;
  };
  MESSAGE(openmp_wait_description());
  CHECK(std::getenv("LOWBIT_SHORT_OPENMP_WAITS") == nullptr);  // not passed on to the programs it starts
  if (started_with("LOWBIT_SHORT_OPENMP_WAITS=1")) {            // restarted by shorten_openmp_waits
    CHECK(started_with("GOMP_SPINCOUNT=1000"));
    CHECK(openmp_wait_description() == "OpenMP waits: 1000 spins, then sleep (lowbit's default)");
  } else {
    MESSAGE("the user's OMP_WAIT_POLICY / GOMP_SPINCOUNT stands");
    REQUIRE((started_with("OMP_WAIT_POLICY=") || started_with("GOMP_SPINCOUNT=")));
    CHECK(openmp_wait_description().find("lowbit's default") == std::string::npos);
  }
}

TEST_CASE("parallel_for runs every index once, on the threads asked for, and no OpenMP region on one thread") {
  for (const int threads : {1, 2, 3})
    for (const int64_t count : {0, 1, 2, 7, 100}) {
      CAPTURE(threads);
      CAPTURE(count);
      std::vector<std::atomic<int>> runs(static_cast<size_t>(count));
      std::atomic<int> inside_region{0}, team_max{0};
      parallel_for(count, threads, [&](int64_t i) {
        runs[static_cast<size_t>(i)] += 1;
        inside_region += omp_get_level() > 0 ? 1 : 0;  // counts inactive regions (an if(false) one) too
        int team = omp_get_num_threads(), seen = team_max.load();
        while (team > seen && !team_max.compare_exchange_weak(seen, team)) {
        }
      });
      for (const auto& r : runs) CHECK(r.load() == 1);
      if (threads == 1 || count <= 1) {
        CHECK(inside_region.load() == 0);  // a plain loop: libgomp starts no team
      } else {
        CHECK(inside_region.load() == count);
        CHECK(team_max.load() <= threads);
      }
    }
}
