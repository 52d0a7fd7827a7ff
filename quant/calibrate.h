// Post-training calibration in one call: a prepared model observes N batches, then fake-quantizes.
#pragma once

#include <cstdint>
#include <functional>

#include "quant/qat.h"

namespace lowbit::quant {

// Runs the batches `next_batch` hands out (normalised images (N, C, H, W); it returns false when there are
// no more) through `model` with its observers on and fake-quant off, at most `max_batches` of them (0: all),
// then switches fake-quant on: the activation ranges of post-training quantization (a Calibrator, qat.h).
// No weight changes. Returns the number of images observed; throws when `next_batch` gave none.
//
//   data::DataLoader loader(train, {}, {.batch_size = 250, .shuffle = false, .norm = norm});
//   loader.start_epoch(0);
//   data::Batch batch;
//   quant::calibrate(*qat, [&](Tensor& x) { return loader.next(batch) && (x = batch.images, true); }, 4);
int64_t calibrate(QatModel& model, const std::function<bool(Tensor& images)>& next_batch, int64_t max_batches = 0);

}  // namespace lowbit::quant
