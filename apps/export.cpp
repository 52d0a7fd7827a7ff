// export: writes a model for other tools: an integer model as standalone C99, any model as ONNX.
#include <filesystem>
#include <iostream>

#include "apps/common.h"
#include "core/error.h"
#include "quant/export_c.h"
#if LOWBIT_HAVE_ONNX
#include "quant/export_onnx.h"
#endif

using namespace lowbit;

namespace {

struct Settings {
  std::string format, model, out, prefix;
};

void run_c(const Settings& s) {
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

// An integer model to QOperator ONNX, a float checkpoint to fp32 ONNX (docs/onnx.md).
void run_onnx(const Settings& s) {
#if LOWBIT_HAVE_ONNX
  if (!s.prefix.empty()) fail("--prefix names C symbols; it has no meaning with --format onnx");
  const apps::LoadedModel m = apps::load_model_file(s.model);
  quant::OnnxExport exported;
  std::string what;
  if (m.kind == "int") {
    exported = quant::export_onnx(*m.int_model);
    what = fmt::format("integer model {} ({}), QOperator form", m.int_model->model_name, m.int_model->mode);
  } else if (m.kind == "float") {
    exported = quant::export_onnx(*m.float_model, m.norm);
    what = fmt::format("float model {}, fp32", m.float_model->name);
  } else {
    fail(
        "{}: this is a QAT checkpoint; export its integer model (the .int8 / .w4a8 file train --qat wrote next to it) "
        "or its float checkpoint",
        s.model);
  }
  quant::write_onnx(exported, s.out);
  std::cout << fmt::format("wrote {}: {}, {} nodes, {} bytes ({} of constants), opset {}\n", s.out, what,
                           exported.nodes, exported.bytes.size(), exported.initializer_bytes, quant::kOnnxOpset);
  if (exported.inexact_scales > 0)
    std::cout << fmt::format(
        "note: for {} of {} output channels ONNX Runtime's float32 requantization scale differs from lowbit's by "
        "one float32 step (docs/onnx.md, Scales)\n",
        exported.inexact_scales, exported.output_channels);
  if (exported.inexact_avg_pools > 0)
    std::cout << fmt::format(
        "note: {} average pools have an even window larger than 8x8: ONNX Runtime rounds their means half to even, "
        "lowbit half away from zero (docs/onnx.md, Rounding)\n",
        exported.inexact_avg_pools);
#else
  (void)s;
  fail(
      "this build of lowbit has no ONNX support (ONNX was not found when it was configured): install libonnx-dev "
      "and libprotobuf-dev (bash tools/setup.sh deps) and rebuild");
#endif
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "export: writes a model for other tools: an integer model as standalone C99 (integer arithmetic "
      "only, one static arena), an integer or float model as ONNX",
      "export"};
  Settings s;
  app.add_option("--format", s.format, "c (integer model to C99) or onnx (integer or float model to ONNX)")
      ->required()
      ->check(CLI::IsMember({"c", "onnx"}));
  app.add_option("--model", s.model,
                 "integer model (M.int8.safetensors, written by quantize or train --qat); for onnx also a float "
                 "checkpoint")
      ->required();
  app.add_option("--out", s.out, "c: existing folder to write <prefix>.c and <prefix>.h into; onnx: the .onnx file")
      ->required();
  app.add_option("--prefix", s.prefix, "C name prefix of the files and symbols (default: the model's name)");
  return apps::run_main(app, argc, argv, [&] { s.format == "onnx" ? run_onnx(s) : run_c(s); });
}
