// DataLoader: seeded per-epoch order, batching into reused buffers, normalisation by table.
#include "data/loader.h"

#include <cmath>
#include <cstring>
#include <numeric>

#include "core/error.h"
#include "core/rng.h"

namespace lowbit::data {

namespace {

// The seed of epoch `epoch`'s shuffle: a function of (seed, epoch) only.
uint64_t epoch_seed(uint64_t seed, int64_t epoch) {
  Rng base(seed);
  return base.next_u64() ^ (static_cast<uint64_t>(epoch) * 0xD1B54A32D192ED03ull);
}

}  // namespace

DataLoader::DataLoader(const Dataset& data, std::vector<int64_t> indices, Options options)
    : data_(data), indices_(std::move(indices)), options_(options) {
  if (options_.batch_size < 1) fail("DataLoader: batch size must be at least 1, got {}", options_.batch_size);
  const Normalization& norm = options_.norm;
  if (!std::isfinite(norm.mean) || !std::isfinite(norm.std) || !(norm.std > 0)) {
    fail("DataLoader: normalisation needs a finite mean and a std > 0, got mean {} std {}", norm.mean, norm.std);
  }
  if (static_cast<int64_t>(data_.labels.size()) != data_.size()) {
    fail("DataLoader: the data set has {} images but {} labels", data_.size(), data_.labels.size());
  }
  if (data_.images.pixels.size() != static_cast<size_t>(data_.size() * data_.images.image_size())) {
    fail("DataLoader: the data set's pixel buffer holds {} bytes, expected {} images of {}x{}x{}",
         data_.images.pixels.size(), data_.size(), data_.images.channels, data_.images.rows, data_.images.cols);
  }
  if (indices_.empty()) {
    indices_.resize(data_.size());
    std::iota(indices_.begin(), indices_.end(), int64_t{0});
  }
  for (int64_t index : indices_) {
    if (index < 0 || index >= data_.size()) {
      fail("DataLoader: example index {} is out of range for a data set of {} examples", index, data_.size());
    }
  }
  for (int p = 0; p < 256; ++p) table_[p] = normalize_pixel(static_cast<uint8_t>(p), norm);
  start_epoch(0);
}

void DataLoader::start_epoch(int64_t epoch) {
  if (epoch < 0) fail("DataLoader: epoch must be >= 0, got {}", epoch);
  order_ = indices_;
  if (options_.shuffle) {
    Rng rng(epoch_seed(options_.seed, epoch));
    rng.shuffle(std::span<int64_t>(order_));
  }
  position_ = 0;
}

int64_t DataLoader::batches_per_epoch() const {
  const int64_t n = size();
  const int64_t b = options_.batch_size;
  return options_.drop_last ? n / b : (n + b - 1) / b;
}

bool DataLoader::next(Batch& batch) {
  const int64_t remaining = size() - position_;
  if (remaining <= 0 || (options_.drop_last && remaining < options_.batch_size)) return false;
  const int64_t b = std::min(options_.batch_size, remaining);
  const int64_t image_size = data_.images.image_size();
  const Shape shape = {b, data_.images.channels, data_.images.rows, data_.images.cols};
  if (!batch.images.defined() || batch.images.shape() != shape) batch.images = Tensor::empty(shape);
  batch.labels.resize(b);
  batch.raw.resize(b * image_size);
  batch.indices.assign(order_.begin() + position_, order_.begin() + position_ + b);

  float* images = batch.images.data();
  for (int64_t i = 0; i < b; ++i) {
    const int64_t index = batch.indices[i];
    const uint8_t* pixels = data_.images.pixels.data() + index * image_size;
    std::memcpy(batch.raw.data() + i * image_size, pixels, image_size);
    for (int64_t p = 0; p < image_size; ++p) images[i * image_size + p] = table_[pixels[p]];
    batch.labels[i] = data_.labels[index];
  }
  position_ += b;
  return true;
}

}  // namespace lowbit::data
