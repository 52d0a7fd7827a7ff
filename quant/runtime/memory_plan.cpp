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

}  // namespace lowbit::quant::runtime
