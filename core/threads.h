// The one thread setting and the BLAS set-up: OpenMP gets the threads, OpenBLAS one thread and the right kernels.
#pragma once

#include <string>

namespace lowbit {

// Sets the number of threads (n >= 1) of the project's parallel loops.
//
// There is one thread pool, OpenMP's. OpenBLAS is pinned to a single thread (prepare_blas, called by
// every sgemm caller), and where an sgemm is worth splitting, core/ops.cpp splits it over the OpenMP
// threads itself (each thread computes a slice of the output rows, or the convolution of its own
// images). So n threads means n busy cores: OpenBLAS's workers never compete with ours, not even
// while they spin-wait after a call.
void set_num_threads(int n);
int num_threads();

// Makes OpenBLAS ready for lowbit, once; cheap afterwards. It runs before main() too (a static
// initializer in core/threads.cpp), so it happens before any thread of the program calls OpenBLAS.
//  - One thread (see set_num_threads).
//  - The right kernels: OpenBLAS picks its kernels ("core") for the CPU it recognises at load time,
//    and falls back to generic SSE3 kernels ("Prescott") for a CPU newer than the OpenBLAS build:
//    Debian 12's OpenBLAS 0.3.21 on an Emerald Rapids Xeon runs sgemm 2-3x slower than it could.
//    When the CPU has AVX2 or AVX-512 and OpenBLAS chose a core without them, the core is switched
//    to the best one this OpenBLAS has for those instructions (Cooperlake, SkylakeX or Haswell),
//    through OpenBLAS's own re-initialisation (what it does at load time with OPENBLAS_CORETYPE).
//    A core the user chose with OPENBLAS_CORETYPE is left alone.
void prepare_blas();

// What prepare_blas found and did, for the programs' first line and the benchmarks, e.g.
// "OpenBLAS core Cooperlake (OpenBLAS chose Prescott for this CPU)".
std::string blas_description();

}  // namespace lowbit
