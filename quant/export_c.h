// Exports an integer model as standalone C99: one .c and one .h, integer arithmetic only, a static arena plan.
#pragma once

#include <cstdint>
#include <string>

#include "quant/int_model.h"
#include "quant/runtime/memory_plan.h"

namespace lowbit::quant {

// The two files, as text, and what the export measured.
struct CExport {
  std::string prefix;  // C identifier that prefixes every exported symbol and macro ("lenet5" → lenet5_run, LENET5_…)
  std::string header;        // <prefix>.h: the API, documented
  std::string source;        // <prefix>.c: weights as const arrays, the kernels, <prefix>_run
  runtime::ArenaPlan plan;   // the arena plan baked into the source (plan_graph_arena)
  int64_t weight_bytes = 0;  // bytes of const data: weights, biases, multipliers, shifts, the input table
};

// A valid C identifier made from a model name: characters other than [A-Za-z0-9_] become '_', a leading digit
// gets a leading "m" ("lenet5" → "lenet5", "my-net" → "my_net", "8bit" → "m8bit").
std::string c_prefix_from_model_name(const std::string& model_name);

// Generates the C code of a validated integer graph: every op kind (Input, Conv2d — grouped and depthwise
// too —, Linear, MaxPool2d, AvgPool2d, GlobalAvgPool2d, Flatten, Clamp, Add, Concat), any graph of them, with
// the arena of runtime::plan_graph_arena (conv + max pool fused where runtime::c_fusions allows it).
// Throws lowbit::Error for a prefix that is not a C identifier, or a tensor too large for 32-bit indices, and
// runtime::RuntimeError for a graph that does not validate. The generated code computes exactly what
// runtime::Executor computes (docs/int-graph-format.md section 6), bit for bit.
CExport export_c(const IntModel& model, const std::string& prefix);

// Writes <out_dir>/<prefix>.c and <out_dir>/<prefix>.h atomically (temporary names, then rename). Throws
// lowbit::Error, writing nothing, if out_dir is not an existing folder or a file cannot be written.
void write_c_export(const CExport& files, const std::string& out_dir);

}  // namespace lowbit::quant
