// Thread settings: OpenMP gets the thread count, OpenBLAS is pinned to one thread.
#include "core/threads.h"

#include <cblas.h>
#include <omp.h>

#include <mutex>

#include "core/error.h"

namespace lowbit {

namespace {
int g_threads = 0;
}

void set_num_threads(int n) {
  if (n < 1) fail("thread count must be at least 1, got {}", n);
  g_threads = n;
  omp_set_num_threads(n);
  pin_blas_to_one_thread();
}

int num_threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }

void pin_blas_to_one_thread() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

}  // namespace lowbit
