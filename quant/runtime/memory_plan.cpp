// The static memory plan of a chain graph: outputs alternate between the two ends of one arena.
#include "quant/runtime/memory_plan.h"

#include <algorithm>
#include <string>

namespace lowbit::quant::runtime {

ArenaPlan plan_chain_arena(std::span<const int64_t> bytes, const std::vector<bool>& aliases_input) {
  if (bytes.size() != aliases_input.size()) throw RuntimeError("plan_chain_arena: one alias flag per op expected");
  ArenaPlan plan;
  const size_t n = bytes.size();
  plan.bytes.assign(bytes.begin(), bytes.end());
  plan.offsets.assign(n, 0);
  // Which end each buffer goes to, and the lower bound (the same number, as the docs above derive).
  std::vector<bool> at_high_end(n, false);
  for (size_t i = 0; i < n; ++i) {
    if (aliases_input[i]) {
      if (i == 0 || bytes[i] != bytes[i - 1])
        throw RuntimeError("plan_chain_arena: op " + std::to_string(i) + " aliases an input of another size");
      at_high_end[i] = at_high_end[i - 1];
      continue;
    }
    at_high_end[i] = i > 0 && !at_high_end[i - 1];
    const int64_t live = bytes[i] + (i > 0 ? bytes[i - 1] : 0);  // input and output of op i
    plan.lower_bound = std::max(plan.lower_bound, live);
  }
  plan.arena_bytes = plan.lower_bound;
  for (size_t i = 0; i < n; ++i) plan.offsets[i] = at_high_end[i] ? plan.arena_bytes - bytes[i] : 0;
  return plan;
}

ArenaPlan plan_chain_arena(const Graph& graph) {
  const std::vector<Shape> shapes = output_shapes(graph);
  std::vector<int64_t> bytes;
  std::vector<bool> aliases;
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    bytes.push_back(shapes[i].size());
    aliases.push_back(graph.ops[i].kind == OpKind::Flatten);
  }
  return plan_chain_arena(bytes, aliases);
}

}  // namespace lowbit::quant::runtime
