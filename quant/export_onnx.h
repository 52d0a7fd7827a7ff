// Exports lowbit models to ONNX: the integer graph in ONNX's QOperator form, the float model as fp32 (docs/onnx.md).
#pragma once

#include <cstdint>
#include <string>

#include "core/normalize.h"
#include "quant/int_model.h"

namespace lowbit::nn {
class Model;
}

namespace lowbit::quant {

// The versions every exported file declares. Opset 13 is the oldest with everything used here (per-channel
// DequantizeLinear, MaxPool on 8-bit tensors, Clip with tensor bounds); ONNX Runtime, TensorRT and the ONNX
// checker of Debian 12 (onnx 1.12, opsets up to 17) all take it. ONNX Runtime fuses quantized MaxPool
// up to opset 21, so the export stays at or below it.
inline constexpr int64_t kOnnxOpset = 13;          // the default domain "" (ai.onnx)
inline constexpr int64_t kOnnxMicrosoftOpset = 1;  // "com.microsoft": QGemm, QLinearAveragePool
inline constexpr int64_t kOnnxIrVersion = 7;       // the IR version that goes with opset 13

// One exported model: the serialized ModelProto and what the export measured.
struct OnnxExport {
  std::string bytes;              // the .onnx file's contents
  int64_t nodes = 0;              // graph nodes
  int64_t initializer_bytes = 0;  // bytes of constant tensor data (weights, biases, scales, the input table)
  // Integer export only: output channels whose weight scale could not be chosen so that ONNX Runtime's float32
  // x_scale · w_scale / y_scale equals the model's requantization scale M exactly (docs/onnx.md, "Scales").
  int64_t inexact_scales = 0;
  int64_t output_channels = 0;  // of all convs and linears: what inexact_scales counts out of
  // Integer export only: average pools whose mean ONNX Runtime rounds half to even where lowbit rounds half away
  // from zero (an even window larger than 8 × 8; docs/onnx.md, "Rounding").
  int64_t inexact_avg_pools = 0;
};

// The integer graph as an ONNX model (docs/onnx.md): input "image", uint8 (N, C, H, W) pixels; outputs
// "logits", float32 (N, classes), and "logit_codes", int8 (N, classes), lowbit's integer logits. Activations
// are uint8 codes equal to lowbit's int8 codes + 128; 4-bit weights are unpacked to int8 tensors. Every op kind of
// runtime::OpKind is exported (Add, Concat and GlobalAvgPool2d as com.microsoft QLinear ops).
// Checks the graph (runtime::validate) and every op's kind first: throws lowbit::Error naming an op that cannot
// be exported, before anything is built. The same model gives the same bytes.
OnnxExport export_onnx(const IntModel& model);

// The float model as an fp32 ONNX model with the same input ("image", uint8 pixels, normalised with `norm` by
// the float32 operations of normalize_pixel) and one output, "logits", float32 (N, classes). Every layer kind of
// nn/layers.h is exported (BatchNorm2d as BatchNormalization, in inference form). Throws lowbit::Error for a
// kind it does not know (a user-registered one), naming the node.
OnnxExport export_onnx(const nn::Model& model, const Normalization& norm);

// Writes the file atomically (a temporary name in the same folder, then rename). Throws lowbit::Error, writing
// nothing, if the folder does not exist or the file cannot be written.
void write_onnx(const OnnxExport& exported, const std::string& path);

}  // namespace lowbit::quant
