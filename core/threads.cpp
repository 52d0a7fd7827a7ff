// Thread settings and the OpenBLAS set-up: OpenMP gets the thread count, OpenBLAS one thread and its best kernels.
#include "core/threads.h"

#include <cblas.h>
#include <omp.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <mutex>
#include <string_view>

#include "core/error.h"

// OpenBLAS builds with run-time kernel selection (DYNAMIC_ARCH, as Debian's) export these two: the
// selection that runs when the library loads, and its undo. Weak, so that lowbit still links against
// an OpenBLAS built for one CPU only (then there is nothing to switch, and they are null).
extern "C" {
__attribute__((weak)) void gotoblas_dynamic_init(void);
__attribute__((weak)) void gotoblas_dynamic_quit(void);
// Stops OpenBLAS's worker threads (what its own fork handler calls); they start again when a call needs them.
__attribute__((weak)) int blas_thread_shutdown_(void);
}

namespace lowbit {

namespace {
int g_threads = 0;
std::string g_blas_description;

// OpenBLAS's name for the best core this CPU can run, among those that use AVX2 or AVX-512; empty
// for a CPU without AVX2 (OpenBLAS's own choice is then as good as ours).
std::string_view best_core_for_this_cpu() {
  if (__builtin_cpu_supports("avx512bf16")) return "Cooperlake";
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    return "SkylakeX";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
  return {};
}

// True for OpenBLAS's x86 cores that use neither AVX2 nor AVX-512: its fallbacks for unknown CPUs.
bool is_pre_avx2_core(std::string_view core) {
  constexpr std::array<std::string_view, 12> kCores{"Prescott",   "Core2",     "Penryn",      "Dunnington",
                                                    "Nehalem",    "Atom",      "Sandybridge", "Katmai",
                                                    "Coppermine", "Northwood", "Banias",      "Unknown"};
  for (std::string_view c : kCores)
    if (core == c) return true;
  return false;
}

void set_up_blas() {
  openblas_set_num_threads(1);
  const std::string chosen = openblas_get_corename();
  g_blas_description = "OpenBLAS core " + chosen;
  const std::string_view best = best_core_for_this_cpu();
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) {
    g_blas_description += " (set by OPENBLAS_CORETYPE)";
    return;
  }
  if (best.empty() || !is_pre_avx2_core(chosen) || gotoblas_dynamic_init == nullptr || gotoblas_dynamic_quit == nullptr)
    return;
  // OpenBLAS reads OPENBLAS_CORETYPE when it selects its kernels; set it for that moment only.
  ::setenv("OPENBLAS_CORETYPE", std::string(best).c_str(), 1);
  // OpenBLAS starts its worker threads when it loads, and a worker that is still starting reads the kernel
  // table: switching under it crashed about one program start in a thousand. Stop the workers first (with one
  // thread, lowbit never needs them).
  if (blas_thread_shutdown_ != nullptr) blas_thread_shutdown_();
  gotoblas_dynamic_quit();
  gotoblas_dynamic_init();
  ::unsetenv("OPENBLAS_CORETYPE");
  openblas_set_num_threads(1);
  g_blas_description =
      "OpenBLAS core " + std::string(openblas_get_corename()) + " (OpenBLAS chose " + chosen + " for this CPU)";
}

// Before main(): no thread of the program can be inside OpenBLAS while its kernels are switched.
[[maybe_unused]] const bool g_blas_ready_at_start = (prepare_blas(), true);

// How long an idle OpenMP thread spins before it sleeps, in libgomp's GOMP_SPINCOUNT units (docs/design.md,
// "Threads"): enough for a barrier between busy threads on an idle machine, then the thread sleeps.
constexpr const char* kSpinCount = "1000";
bool g_spin_count_set_here = false;
}  // namespace

void shorten_openmp_waits(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr || std::getenv("GOMP_SPINCOUNT") != nullptr) {
    // Either the user's choice, or this process is the restarted one.
    g_spin_count_set_here = std::getenv("LOWBIT_SHORT_OPENMP_WAITS") != nullptr;
    ::unsetenv("LOWBIT_SHORT_OPENMP_WAITS");  // not inherited by the programs this one starts
    return;
  }
  ::setenv("GOMP_SPINCOUNT", kSpinCount, 1);
  ::setenv("LOWBIT_SHORT_OPENMP_WAITS", "1", 1);
  ::execv("/proc/self/exe", argv);
  // Not restarted (no /proc, say): carry on with libgomp's defaults, and say so in the description.
  ::unsetenv("GOMP_SPINCOUNT");
  ::unsetenv("LOWBIT_SHORT_OPENMP_WAITS");
}

std::string openmp_wait_description() {
  if (const char* policy = std::getenv("OMP_WAIT_POLICY"); policy != nullptr)
    return std::string("OpenMP wait policy ") + policy + " (set by OMP_WAIT_POLICY)";
  const char* spins = std::getenv("GOMP_SPINCOUNT");
  if (spins == nullptr) return "OpenMP waits: libgomp's default";
  return std::string("OpenMP waits: ") + spins + " spins, then sleep" +
         (g_spin_count_set_here ? " (lowbit's default)" : " (set by GOMP_SPINCOUNT)");
}

void set_num_threads(int n) {
  if (n < 1) fail("thread count must be at least 1, got {}", n);
  g_threads = n;
  omp_set_num_threads(n);
  prepare_blas();
}

int num_threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }

void prepare_blas() {
  static std::once_flag once;
  std::call_once(once, set_up_blas);
}

std::string blas_description() {
  prepare_blas();
  return g_blas_description;
}

}  // namespace lowbit
