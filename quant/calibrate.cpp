// Post-training calibration in one call (quant/calibrate.h).
#include "quant/calibrate.h"

#include "core/error.h"

namespace lowbit::quant {

int64_t calibrate(QatModel& model, const std::function<bool(Tensor& images)>& next_batch, int64_t max_batches) {
  if (max_batches < 0) fail("calibrate: max_batches is {} (give 0 for all batches, or a positive count)", max_batches);
  Calibrator calibrator(model);
  Tensor images;
  int64_t batches = 0, seen = 0;
  while ((max_batches == 0 || batches < max_batches) && next_batch(images)) {
    calibrator.observe(images);
    seen += images.size(0);
    ++batches;
  }
  if (seen == 0) fail("calibrate: no calibration images (the batch source was empty)");
  calibrator.finish();
  return seen;
}

}  // namespace lowbit::quant
