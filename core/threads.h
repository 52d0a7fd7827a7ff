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

// How long idle OpenMP threads spin before they sleep. libgomp's default (when the user sets neither
// OMP_WAIT_POLICY nor GOMP_SPINCOUNT) is 300,000 spins, tens of milliseconds on CPUs with a slow `pause`:
// on a machine busy with other work, a thread waiting at a barrier for a descheduled partner burns its
// whole time slice, and two threads ran slower than one (docs/design.md, "Threads"). libgomp reads these
// two variables once, when it loads, before main() starts; so, unless the user set one of them, this
// restarts the program (execv of /proc/self/exe, same arguments) with GOMP_SPINCOUNT=1000. Call it first
// thing in main(), before any thread starts; every lowbit program does, and library users' programs
// should (docs/examples/). Returns normally in the restarted program, or when the user chose.
void shorten_openmp_waits(char** argv);

// How idle OpenMP threads wait, for the programs' first line and the benchmarks, e.g.
// "OpenMP waits: 1000 spins, then sleep (lowbit's default)".
std::string openmp_wait_description();

}  // namespace lowbit
