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
  runtime::ArenaPlan plan;   // the arena plan baked into the source
  int64_t weight_bytes = 0;  // bytes of const data: weights, biases, multipliers, shifts, the input table
};

// A valid C identifier made from a model name: characters other than [A-Za-z0-9_] become '_', a leading digit
// gets a leading "m" ("lenet5" → "lenet5", "my-net" → "my_net", "8bit" → "m8bit").
std::string c_prefix_from_model_name(const std::string& model_name);

// Generates the C code of a validated chain graph (Input, Conv2d, MaxPool2d, AvgPool2d, Flatten, Linear).
// Throws lowbit::Error for a prefix that is not a C identifier, an op kind that cannot be exported (naming
// the op and its kind), or a tensor too large for 32-bit indices. The generated code computes exactly what
// runtime::Executor computes (docs/int-graph-format.md section 6), bit for bit.
CExport export_c(const IntModel& model, const std::string& prefix);

// Writes <out_dir>/<prefix>.c and <out_dir>/<prefix>.h atomically (temporary names, then rename). Throws
// lowbit::Error, writing nothing, if out_dir is not an existing folder or a file cannot be written.
void write_c_export(const CExport& files, const std::string& out_dir);

}  // namespace lowbit::quant
