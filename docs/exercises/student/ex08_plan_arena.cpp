// Exercise 08: your arena planner (quant/runtime/memory_plan.h; docs/exercises/08-arena-planner.md).
#include "core/error.h"
#include "quant/runtime/memory_plan.h"

// Integer code only (no float, no double): this file is compiled into the integer runtime.
namespace lowbit::quant::runtime {

// max over ops t of the bytes of the buffers live during t (first_op <= t <= last_op). Throws RuntimeError for
// a buffer with negative bytes or with last_op < first_op.
int64_t arena_lower_bound(std::span<const LiveBuffer> buffers) {
  // Your code here (then delete the throw).
  throw Error("exercise 08: arena_lower_bound is not implemented yet");
}

// Greedy by size: buffers largest first (equal sizes: earlier first_op first, then lower index); each at the
// lowest offset where it overlaps no already placed buffer it is live together with (live_together). Fill
// offsets, arena_bytes and lower_bound. Throws like arena_lower_bound.
BufferPlan plan_arena(std::span<const LiveBuffer> buffers) {
  // Your code here (then delete the throw).
  throw Error("exercise 08: plan_arena is not implemented yet");
}

}  // namespace lowbit::quant::runtime
