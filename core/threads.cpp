// Thread settings for OpenBLAS and OpenMP.
#include "core/threads.h"

#include <cblas.h>
#include <omp.h>

#include "core/error.h"

namespace lowbit {

namespace {
int g_threads = 0;
}

void set_num_threads(int n) {
  if (n < 1) fail("thread count must be at least 1, got {}", n);
  g_threads = n;
  openblas_set_num_threads(n);
  omp_set_num_threads(n);
}

int num_threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }

}  // namespace lowbit
