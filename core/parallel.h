// The project's one parallel loop: OpenMP threads over an index range, or a plain loop for one thread.
#pragma once

#include <cstdint>

namespace lowbit {

// body(i) for i in [0, count) on `threads` threads, each a contiguous range of i (OpenMP's static schedule).
// With one thread (or fewer than two iterations) it is a plain loop: an OpenMP parallel region costs a team
// start even when its if() clause is false, about 0.25 µs, and an integer model at batch 1 runs dozens of them
// per image (docs/design.md, "Threads").
template <typename Body>
void parallel_for(int64_t count, int threads, Body&& body) {
  if (threads <= 1 || count <= 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < count; ++i) body(i);
}

}  // namespace lowbit
