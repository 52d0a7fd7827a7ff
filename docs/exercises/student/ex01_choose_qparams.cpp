// Exercise 01: your choose_qparams (declared in quant/qparams.h; the task is docs/exercises/01-choose-qparams.md).
#include "core/error.h"
#include "quant/qparams.h"

namespace lowbit::quant {

// [min, max], widened to contain 0, onto [range.qmin, range.qmax] (docs/quantization.md eq. 4).
// Asymmetric: s = max((max − min) / (qmax − qmin), kMinScale), then z = clamp(qmin − round(min / s), qmin, qmax).
// Symmetric:  s = max(max(|min|, |max|) / qmax, kMinScale), z = 0.   Floor s first, then compute z.
QParams choose_qparams(float min, float max, QRange range, bool symmetric) {
  // Your code here (then delete the throw).
  throw Error("exercise 01: choose_qparams is not implemented yet");
}

}  // namespace lowbit::quant
