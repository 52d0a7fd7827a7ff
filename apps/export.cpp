// export: writes an integer model as standalone C99 (a .c and a .h) for microcontrollers and other targets.
#include <filesystem>
#include <iostream>

#include "apps/common.h"
#include "core/error.h"
#include "quant/export_c.h"

using namespace lowbit;

namespace {

struct Settings {
  std::string format, model, out, prefix;
};

void run(const Settings& s) {
  if (s.format == "onnx") fail("--format onnx is not supported yet (use --format c)");
  if (!std::filesystem::is_directory(s.out))
    fail("{}: the output folder does not exist (create it first, e.g. mkdir -p {})", s.out, s.out);
  const quant::IntModel model = quant::load_int_model(s.model);
  const std::string prefix = s.prefix.empty() ? quant::c_prefix_from_model_name(model.model_name) : s.prefix;
  const quant::CExport files = quant::export_c(model, prefix);
  quant::write_c_export(files, s.out);
  const std::string base = (std::filesystem::path(s.out) / prefix).string();
  std::cout << fmt::format("wrote {}.c and {}.h: model {} ({}), {} ops, {} classes\n", base, base, model.model_name,
                           model.mode, model.graph.ops.size(), model.num_classes());
  std::cout << fmt::format("arena: {} bytes (lower bound {} bytes: the most bytes live during one op)\n",
                           files.plan.arena_bytes, files.plan.lower_bound);
  std::cout << fmt::format("const data: {} bytes (weights, biases, requantization constants, input table)\n",
                           files.weight_bytes);
  std::cout << fmt::format("API: int {}_run(const uint8_t *image, int8_t *logits, void *arena), see {}.h\n", prefix,
                           base);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"export: writes an integer model as standalone C99 (integer arithmetic only, one static arena)",
               "export"};
  Settings s;
  app.add_option("--format", s.format, "output format: c (onnx: not supported yet)")
      ->required()
      ->check(CLI::IsMember({"c", "onnx"}));
  app.add_option("--model", s.model, "integer model (M.int8.safetensors, written by quantize or train --qat)")
      ->required();
  app.add_option("--out", s.out, "existing folder to write <prefix>.c and <prefix>.h into")->required();
  app.add_option("--prefix", s.prefix, "C name prefix of the files and symbols (default: the model's name)");
  return apps::run_main(app, argc, argv, [&] { run(s); });
}
