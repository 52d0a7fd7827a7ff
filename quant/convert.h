// convert: lowers a prepared (QAT or calibrated) model to the pure-integer graph. It only lowers:
// every number it writes was already used by the fake-quant model's eval-mode forward.
#pragma once

#include "core/normalize.h"
#include "quant/int_model.h"
#include "quant/qat.h"

namespace lowbit::quant {

// input_chw: the image shape (C, H, W) the graph will take, e.g. {1, 28, 28}.
// Throws lowbit::Error when a scale, multiplier or accumulator bound is out of range.
IntModel convert(const QatModel& model, const Normalization& norm, const Shape& input_chw);

}  // namespace lowbit::quant
