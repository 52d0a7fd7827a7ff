// Integer models with random weights for the exporter tests: a built-in or a written description, prepared for
// QAT, calibrated on random pixels and converted (as good a test of bit-exactness as a trained model's, in a
// second instead of a training run).
#pragma once

#include <string>

#include "core/normalize.h"
#include "core/rng.h"
#include "nn/graph.h"
#include "quant/convert.h"
#include "quant/int_model.h"
#include "quant/qat.h"

namespace lowbit::test {

// `description` converted at `bits` ("w8a8", "w4a8", "w4a4"), calibrated on two batches of 16 random images.
inline quant::IntModel converted_int_model(const nn::Description& description, const std::string& bits, uint64_t seed) {
  const Normalization norm{0.2860f, 0.3530f};
  manual_seed(seed);
  Rng rng(seed + 1);
  nn::Model float_model(description);
  float_model.eval();
  const Shape image = float_model.input_shape();
  const auto qat = quant::prepare_qat(float_model, quant::parse_bits(bits));
  quant::Calibrator calibrator(*qat);
  for (int b = 0; b < 2; ++b) {
    Tensor x = Tensor::empty({16, image[0], image[1], image[2]});
    for (float& v : x.values()) v = normalize_pixel(static_cast<uint8_t>(rng.below(256)), norm);
    calibrator.observe(x);
  }
  calibrator.finish();
  qat->eval();
  return quant::convert(*qat, norm, {image[0], image[1], image[2]});
}

// A built-in model ("lenet5", "resnet8", "dsconv", …) for 28×28 grey images and 10 classes.
inline quant::IntModel builtin_int_model(const std::string& name, const std::string& bits, uint64_t seed) {
  return converted_int_model(nn::with_data_shape(nn::builtin_description(name), 1, 28, 28, 10), bits, seed);
}

}  // namespace lowbit::test
