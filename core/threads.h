// The one thread setting: the project's own OpenMP loops use it; OpenBLAS always runs on one thread.
#pragma once

namespace lowbit {

// Sets the number of threads (n >= 1) of the project's parallel loops.
//
// There is one thread pool, OpenMP's. OpenBLAS is pinned to a single thread (pin_blas_to_one_thread,
// called by every sgemm caller), and where an sgemm is worth splitting, core/ops.cpp splits it over
// the OpenMP threads itself (each thread computes a slice of the output rows, or the convolution of
// its own images). So n threads means n busy cores: OpenBLAS's workers never compete with ours,
// not even while they spin-wait after a call.
void set_num_threads(int n);
int num_threads();

// Sets OpenBLAS to one thread the first time it is called; cheap afterwards.
void pin_blas_to_one_thread();

}  // namespace lowbit
