// The one thread setting: used by OpenBLAS and by the project's own OpenMP loops.
#pragma once

namespace lowbit {

// Sets both pools to n threads (n >= 1). The two never run at once: our parallel loops never
// call BLAS, and BLAS is never called inside a parallel region, so n cores are never oversubscribed.
void set_num_threads(int n);
int num_threads();

}  // namespace lowbit
