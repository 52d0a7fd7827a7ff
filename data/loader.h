// DataLoader: seeded per-epoch shuffling, batching and normalisation of a Dataset.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "core/normalize.h"
#include "core/tensor.h"
#include "data/mnist.h"

namespace lowbit::data {

// One batch of B examples of H x W pixels.
struct Batch {
  Tensor images;                 // (B, 1, H, W): normalize_pixel of each pixel
  std::vector<int32_t> labels;   // B
  std::vector<uint8_t> raw;      // B * H * W raw pixels, what the integer graph consumes
  std::vector<int64_t> indices;  // B: which examples of the Dataset these are

  int64_t size() const { return static_cast<int64_t>(labels.size()); }
};

class DataLoader {
 public:
  struct Options {
    int64_t batch_size = 64;
    bool shuffle = true;
    bool drop_last = false;  // skip the last, smaller batch of an epoch
    uint64_t seed = 0;
    Normalization norm = {};  // mean 0, std 1 by default: plain pixel / 255
  };

  // Batches the examples `indices` of `data` (empty = all of them, in order). The loader keeps a
  // reference to `data`, which must outlive it. Starts at epoch 0.
  DataLoader(const Dataset& data, std::vector<int64_t> indices, Options options);

  // Sets the order of epoch `epoch`: with shuffle, a permutation seeded from (seed, epoch) only,
  // so epoch e's order does not depend on which epochs ran before (resuming gives the same order).
  void start_epoch(int64_t epoch);

  // Fills `batch` with the next batch; false at the end of the epoch. Reuses the batch's buffers:
  // when batch.images already has the right shape its storage is overwritten in place (clone()
  // a batch's images to keep them past the next call).
  bool next(Batch& batch);

  int64_t batches_per_epoch() const;
  int64_t size() const { return static_cast<int64_t>(indices_.size()); }  // examples per epoch, before drop_last
  const Options& options() const { return options_; }

 private:
  const Dataset& data_;
  std::vector<int64_t> indices_;  // the examples, in their given order
  std::vector<int64_t> order_;    // this epoch's order
  Options options_;
  std::array<float, 256> table_;  // normalize_pixel of every pixel value
  int64_t position_ = 0;          // next entry of order_
};

}  // namespace lowbit::data
