// The static memory plan of a chain graph: one arena, an offset for every op's output, liveness-based reuse.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "quant/runtime/graph.h"

namespace lowbit::quant::runtime {

// Where each op's output codes live in one arena of `arena_bytes` bytes (one image).
//
// Liveness in a chain: op i reads only op i−1's output, so while op i runs exactly two buffers are live,
// its input and its output; after it, the input is dead. Placing the outputs alternately at the low and
// the high end of the arena (op 0 at offset 0, the next at arena_bytes − size, the next at 0, …) keeps each
// op's input and output apart, and the arena needs only the largest input + output pair:
//
//   arena_bytes = max over ops i of (bytes[i−1] + bytes[i])  =  lower_bound
//
// An op that `aliases_input` (Flatten: the memory order does not change) gets its input's offset and takes
// no memory of its own; the alternation continues from the buffer it aliases. Any executor that copies
// nothing for such an op can run in this arena; the plan never overlaps two live buffers (test_export_c
// poisons every byte outside the live buffer between ops).
struct ArenaPlan {
  std::vector<int64_t> offsets;  // offsets[i]: the first byte of ops[i]'s output in the arena
  std::vector<int64_t> bytes;    // bytes[i]: its size
  int64_t arena_bytes = 0;       // the arena the plan needs
  int64_t lower_bound = 0;       // the largest set of simultaneously live bytes (input + output of one op)
};

// bytes[i] is the size of op i's output; aliases_input[i] says op i reuses its input's buffer (same size).
// Op 0 (the Input op) reads the caller's image, not the arena.
ArenaPlan plan_chain_arena(std::span<const int64_t> bytes, const std::vector<bool>& aliases_input);

// The plan for a validated chain graph, one image: int8 codes take one byte each; a Flatten aliases its input.
ArenaPlan plan_chain_arena(const Graph& graph);

}  // namespace lowbit::quant::runtime
