// The static memory plan of a chain graph: one arena, an offset for every op's output, liveness-based reuse.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "quant/runtime/graph.h"

namespace lowbit::quant::runtime {

// How an op's output is kept.
enum class Storage {
  Own,          // a buffer of its own in the arena
  SharesInput,  // its input's buffer, unchanged (Flatten: the memory order does not change)
  NotStored,    // never stored: the next op computes it on the fly (a Conv2d fused into the MaxPool2d after it)
};

// Where each op's output codes live in one arena of `arena_bytes` bytes (one image).
//
// Liveness in a chain: op i reads only the buffer of the op before it, so while op i runs exactly two buffers
// are live, its input and its output; after it, the input is dead. Placing the stored outputs alternately at
// the low and the high end of the arena (the first at offset 0, the next at arena_bytes − size, the next at 0,
// …) keeps each op's input and output apart, and the arena needs only the largest input + output pair:
//
//   arena_bytes = max over ops i of (input bytes of i + output bytes of i)  =  lower_bound
//
// An op that SharesInput takes its input's offset and no memory of its own; an op that is NotStored takes
// none either, and the op after it reads that op's input instead. test_export_c poisons every byte outside the
// one live buffer between ops to show that no op reads anything else.
struct ArenaPlan {
  std::vector<int64_t> offsets;        // offsets[i]: the first byte of ops[i]'s output (−1: NotStored)
  std::vector<int64_t> input_offsets;  // input_offsets[i]: where ops[i] reads its input (−1 for op 0: the image)
  std::vector<int64_t> bytes;          // bytes[i]: the size of ops[i]'s output (0 if NotStored)
  int64_t arena_bytes = 0;             // the arena the plan needs
  int64_t lower_bound = 0;             // the largest set of simultaneously live bytes (input + output of one op)
};

// bytes[i] is the size of op i's output, storage[i] how it is kept. Op 0 (the Input op) reads the caller's
// image, not the arena, and must be Own. Throws RuntimeError for a SharesInput of another size, or a NotStored
// op that is the first or the last.
ArenaPlan plan_chain_arena(std::span<const int64_t> bytes, std::span<const Storage> storage);

// The plan for a validated chain graph, one image (int8 codes, one byte each): a Flatten shares its input; with
// fuse_conv_max_pool, a Conv2d followed by a MaxPool2d whose stride equals its kernel and that has no padding
// is NotStored (fusable_conv_max_pool).
ArenaPlan plan_chain_arena(const Graph& graph, bool fuse_conv_max_pool);

// ops[i] is a Conv2d and ops[i + 1] a MaxPool2d with stride = kernel and no padding: each conv output falls in
// at most one window, so the pool can compute the conv outputs it needs and the unpooled map is never stored.
bool fusable_conv_max_pool(const Graph& graph, size_t i);

// ---- Any graph: buffers with live ranges

// In a graph with branches a tensor can stay live across several ops (the input of a residual block lives until
// the Add that reads it), so the two ends of one arena are not enough. The general form: each buffer has a size
// and a live range of ops, and two buffers may share bytes only if their live ranges do not meet.

// A buffer to place: `bytes` bytes, live from op `first_op` (the op that writes it) to op `last_op` (the last op
// that reads it), both included; ops are numbered in execution order.
struct LiveBuffer {
  int64_t bytes = 0;
  int64_t first_op = 0;
  int64_t last_op = 0;
};

// Two buffers are live at the same time when their op ranges share an op.
constexpr bool live_together(const LiveBuffer& a, const LiveBuffer& b) {
  return a.first_op <= b.last_op && b.first_op <= a.last_op;
}

struct BufferPlan {
  std::vector<int64_t> offsets;  // offsets[i]: the first byte of buffers[i] in the arena
  int64_t arena_bytes = 0;       // max over i of offsets[i] + bytes[i] (0 without buffers)
  int64_t lower_bound = 0;       // arena_lower_bound(buffers)
};

// Exercise 08 (docs/exercises/08-arena-planner.md): the student build only declares the next two functions and
// compiles docs/exercises/student/ex08_plan_arena.cpp instead.

// No plan can use less than the most bytes live during one op: max over ops t of Σ bytes of the buffers whose
// range contains t. Throws RuntimeError for negative bytes or a range that ends before it starts.
int64_t arena_lower_bound(std::span<const LiveBuffer> buffers);

// Greedy by size, as TensorFlow Lite Micro's GreedyMemoryPlanner: take the buffers largest first (equal sizes:
// the one live from the earlier op first, then the lower index); put each at the lowest offset where it overlaps
// no buffer already placed that is live at the same time. Never overlaps two live buffers; reaches the lower
// bound on chains and on typical residual blocks, but not on every set of ranges (finding the smallest arena is
// NP-hard): tests/exercises/test_ex08_arena_planner.cpp measures the slack. Throws as arena_lower_bound.
BufferPlan plan_arena(std::span<const LiveBuffer> buffers);

}  // namespace lowbit::quant::runtime
