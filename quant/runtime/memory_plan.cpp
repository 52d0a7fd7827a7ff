// The static memory plan of a chain graph: outputs alternate between the two ends of one arena.
#include "quant/runtime/memory_plan.h"

#include <algorithm>
#include <string>

namespace lowbit::quant::runtime {

ArenaPlan plan_chain_arena(std::span<const int64_t> bytes, std::span<const Storage> storage) {
  const size_t n = bytes.size();
  if (storage.size() != n) throw RuntimeError("plan_chain_arena: one storage entry per op expected");
  if (n == 0) return {};
  if (storage[0] != Storage::Own) throw RuntimeError("plan_chain_arena: op 0 (the input) must have its own buffer");
  if (storage[n - 1] == Storage::NotStored)
    throw RuntimeError("plan_chain_arena: the last op's output (the logits) must be stored");
  ArenaPlan plan;
  plan.bytes.assign(bytes.begin(), bytes.end());
  plan.offsets.assign(n, -1);
  plan.input_offsets.assign(n, -1);
  // First pass: which end each stored buffer goes to, and the lower bound (which the alternation reaches).
  std::vector<bool> at_high_end(n, false);
  size_t input = 0;  // the op whose buffer ops[i] reads
  for (size_t i = 0; i < n; ++i) {
    if (storage[i] == Storage::NotStored) {
      plan.bytes[i] = 0;
      continue;  // the next op reads what this one would have read
    }
    if (storage[i] == Storage::SharesInput) {
      if (i == 0 || bytes[i] != bytes[input])
        throw RuntimeError("plan_chain_arena: op " + std::to_string(i) + " shares an input of another size");
      at_high_end[i] = at_high_end[input];
    } else {
      at_high_end[i] = i > 0 && !at_high_end[input];
      plan.lower_bound = std::max(plan.lower_bound, bytes[i] + (i > 0 ? bytes[input] : 0));
    }
    if (i > 0) input = i;
  }
  plan.arena_bytes = plan.lower_bound;
  // Second pass: the offsets.
  input = 0;
  for (size_t i = 0; i < n; ++i) {
    if (i > 0) plan.input_offsets[i] = plan.offsets[input];
    if (storage[i] == Storage::NotStored) continue;
    plan.offsets[i] = at_high_end[i] ? plan.arena_bytes - bytes[i] : 0;
    input = i;
  }
  return plan;
}

bool fusable_conv_max_pool(const Graph& graph, size_t i) {
  if (i + 1 >= graph.ops.size()) return false;
  const Op& conv = graph.ops[i];
  const Op& pool = graph.ops[i + 1];
  return conv.kind == OpKind::Conv2d && pool.kind == OpKind::MaxPool2d && pool.stride == pool.kernel &&
         pool.padding == 0;
}

ArenaPlan plan_chain_arena(const Graph& graph, bool fuse_conv_max_pool) {
  const std::vector<Shape> shapes = output_shapes(graph);
  std::vector<int64_t> bytes;
  std::vector<Storage> storage;
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    bytes.push_back(shapes[i].size());
    if (graph.ops[i].kind == OpKind::Flatten)
      storage.push_back(Storage::SharesInput);
    else if (fuse_conv_max_pool && fusable_conv_max_pool(graph, i))
      storage.push_back(Storage::NotStored);
    else
      storage.push_back(Storage::Own);
  }
  return plan_chain_arena(bytes, storage);
}

// ---- Any graph: buffers with live ranges

// Exercise 08 (docs/exercises/08-arena-planner.md): the student's version replaces these two.
#ifndef LOWBIT_EXERCISES
namespace {

void check_buffers(std::span<const LiveBuffer> buffers, const char* caller) {
  for (size_t i = 0; i < buffers.size(); ++i)
    if (buffers[i].bytes < 0 || buffers[i].first_op > buffers[i].last_op)
      throw RuntimeError(std::string(caller) + ": buffer " + std::to_string(i) + " has " +
                         std::to_string(buffers[i].bytes) + " bytes, live from op " +
                         std::to_string(buffers[i].first_op) + " to op " + std::to_string(buffers[i].last_op) +
                         " (expected bytes >= 0 and first_op <= last_op)");
}

}  // namespace

int64_t arena_lower_bound(std::span<const LiveBuffer> buffers) {
  check_buffers(buffers, "arena_lower_bound");
  // The live bytes only change where a range starts, so the maximum is reached at some first_op.
  int64_t bound = 0;
  for (const LiveBuffer& at : buffers) {
    int64_t live = 0;
    for (const LiveBuffer& b : buffers)
      if (b.first_op <= at.first_op && at.first_op <= b.last_op) live += b.bytes;
    bound = std::max(bound, live);
  }
  return bound;
}

BufferPlan plan_arena(std::span<const LiveBuffer> buffers) {
  check_buffers(buffers, "plan_arena");
  const size_t n = buffers.size();
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (buffers[a].bytes != buffers[b].bytes) return buffers[a].bytes > buffers[b].bytes;
    return buffers[a].first_op < buffers[b].first_op;  // stable: then the lower index
  });
  BufferPlan plan;
  plan.offsets.assign(n, -1);
  std::vector<size_t> placed;  // indices of the buffers placed so far
  for (const size_t i : order) {
    // The placed buffers live together with buffer i, by offset; i goes into the first gap that holds it.
    std::vector<size_t> neighbours;
    for (const size_t j : placed)
      if (live_together(buffers[i], buffers[j])) neighbours.push_back(j);
    std::sort(neighbours.begin(), neighbours.end(),
              [&](size_t a, size_t b) { return plan.offsets[a] < plan.offsets[b]; });
    int64_t offset = 0;
    for (const size_t j : neighbours) {
      if (offset + buffers[i].bytes <= plan.offsets[j]) break;  // the gap below buffer j is large enough
      offset = std::max(offset, plan.offsets[j] + buffers[j].bytes);
    }
    plan.offsets[i] = offset;
    plan.arena_bytes = std::max(plan.arena_bytes, offset + buffers[i].bytes);
    placed.push_back(i);
  }
  plan.lower_bound = arena_lower_bound(buffers);
  return plan;
}
#endif  // LOWBIT_EXERCISES

}  // namespace lowbit::quant::runtime
