// Tests for the DataLoader: coverage per epoch, drop_last, seeded order, resume-safe epochs, normalisation.
#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "data/loader.h"
#include "tests/data_fixtures.h"

using namespace lowbit;
using namespace lowbit::data_fixtures;
using data::Batch;
using data::DataLoader;

namespace {

data::Dataset small_dataset(int64_t n, int64_t rows = 3, int64_t cols = 2) {
  return {synthetic_images(n, rows, cols), synthetic_labels(n)};
}

// The example indices of one whole epoch, batch after batch.
std::vector<int64_t> epoch_order(DataLoader& loader, int64_t epoch, std::vector<int64_t>* batch_sizes = nullptr) {
  loader.start_epoch(epoch);
  std::vector<int64_t> order;
  Batch batch;
  while (loader.next(batch)) {
    order.insert(order.end(), batch.indices.begin(), batch.indices.end());
    if (batch_sizes != nullptr) batch_sizes->push_back(batch.size());
  }
  return order;
}

std::vector<int64_t> range(int64_t n) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), int64_t{0});
  return v;
}

}  // namespace

TEST_CASE("every example exactly once per epoch; batch sizes; the last smaller batch") {
  const data::Dataset data = small_dataset(10);
  DataLoader loader(data, {}, {.batch_size = 4, .seed = 3});
  CHECK(loader.size() == 10);
  CHECK(loader.batches_per_epoch() == 3);
  std::vector<int64_t> sizes;
  std::vector<int64_t> order = epoch_order(loader, 0, &sizes);
  CHECK(sizes == std::vector<int64_t>{4, 4, 2});
  CHECK(order != range(10));  // shuffled
  std::sort(order.begin(), order.end());
  CHECK(order == range(10));
}

TEST_CASE("drop_last skips the smaller last batch") {
  const data::Dataset data = small_dataset(10);
  DataLoader loader(data, {}, {.batch_size = 4, .drop_last = true});
  CHECK(loader.batches_per_epoch() == 2);
  std::vector<int64_t> sizes;
  CHECK(epoch_order(loader, 0, &sizes).size() == 8);
  CHECK(sizes == std::vector<int64_t>{4, 4});
}

TEST_CASE("without shuffle the order is the given one") {
  const data::Dataset data = small_dataset(10);
  DataLoader all(data, {}, {.batch_size = 3, .shuffle = false});
  CHECK(epoch_order(all, 0) == range(10));
  CHECK(epoch_order(all, 5) == range(10));
  DataLoader subset(data, {7, 2, 5}, {.batch_size = 2, .shuffle = false});
  CHECK(subset.size() == 3);
  CHECK(epoch_order(subset, 0) == std::vector<int64_t>{7, 2, 5});
}

TEST_CASE("same seed same order; other epochs and seeds other orders; epoch order independent of history") {
  const data::Dataset data = small_dataset(50);
  DataLoader a(data, {}, {.batch_size = 8, .seed = 42});
  DataLoader b(data, {}, {.batch_size = 8, .seed = 42});
  DataLoader c(data, {}, {.batch_size = 8, .seed = 43});
  const std::vector<int64_t> a0 = epoch_order(a, 0);
  const std::vector<int64_t> a1 = epoch_order(a, 1);
  const std::vector<int64_t> a2 = epoch_order(a, 2);
  CHECK(a0 != a1);
  CHECK(a1 != a2);
  CHECK(epoch_order(c, 0) != a0);
  // b jumps straight to epoch 2 (as --resume does), then goes back to 0.
  CHECK(epoch_order(b, 2) == a2);
  CHECK(epoch_order(b, 0) == a0);
  CHECK(epoch_order(a, 1) == a1);
  // Half an epoch, then a restart of the same epoch, gives the whole order again.
  Batch batch;
  a.start_epoch(1);
  a.next(batch);
  CHECK(epoch_order(a, 1) == a1);
}

TEST_CASE("batch contents: normalize_pixel values, raw pixels, labels, shapes") {
  const data::Dataset data = small_dataset(7, 3, 2);
  const Normalization norm{0.25f, 0.5f};
  DataLoader loader(data, {}, {.batch_size = 3, .seed = 1, .norm = norm});
  Batch batch;
  int64_t seen = 0;
  while (loader.next(batch)) {
    const int64_t b = batch.size();
    CHECK(batch.images.shape() == Shape{b, 1, 3, 2});
    REQUIRE(batch.raw.size() == static_cast<size_t>(b * 6));
    REQUIRE(batch.indices.size() == static_cast<size_t>(b));
    for (int64_t i = 0; i < b; ++i) {
      const int64_t index = batch.indices[i];
      CHECK(batch.labels[i] == data.labels[index]);
      for (int64_t p = 0; p < 6; ++p) {
        const uint8_t pixel = data.images.pixels[index * 6 + p];
        REQUIRE(batch.raw[i * 6 + p] == pixel);
        REQUIRE(batch.images.data()[i * 6 + p] == normalize_pixel(pixel, norm));
      }
    }
    seen += b;
  }
  CHECK(seen == 7);
}

TEST_CASE("next reuses the image storage when the shape repeats") {
  const data::Dataset data = small_dataset(12);
  DataLoader loader(data, {}, {.batch_size = 4});
  Batch batch;
  REQUIRE(loader.next(batch));
  const float* storage = batch.images.data();
  const uint8_t* raw = batch.raw.data();
  REQUIRE(loader.next(batch));
  CHECK(batch.images.data() == storage);
  CHECK(batch.raw.data() == raw);
  loader.start_epoch(1);
  REQUIRE(loader.next(batch));
  CHECK(batch.images.data() == storage);
}

TEST_CASE("options and indices are validated") {
  const data::Dataset data = small_dataset(5);
  CHECK_THROWS_WITH_AS(DataLoader(data, {}, {.batch_size = 0}), "DataLoader: batch size must be at least 1, got 0",
                       Error);
  CHECK_THROWS_AS(DataLoader(data, {}, {.norm = {0.f, 0.f}}), Error);
  CHECK_THROWS_AS(DataLoader(data, {5}, {}), Error);
  CHECK_THROWS_AS(DataLoader(data, {-1}, {}), Error);
  DataLoader loader(data, {}, {});
  CHECK_THROWS_AS(loader.start_epoch(-1), Error);
}

TEST_CASE("a validation split feeds two loaders that never share an example") {
  const data::Dataset data = small_dataset(40);
  auto [train, validation] = data::split_validation(data.size(), 0.25, 9);
  DataLoader train_loader(data, train, {.batch_size = 6, .seed = 1});
  DataLoader validation_loader(data, validation, {.batch_size = 6, .shuffle = false});
  std::vector<int64_t> a = epoch_order(train_loader, 0);
  std::vector<int64_t> b = epoch_order(validation_loader, 0);
  CHECK(a.size() == 30);
  CHECK(b == validation);
  std::sort(a.begin(), a.end());
  CHECK(a == train);
  std::vector<int64_t> common;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(common));
  CHECK(common.empty());
}
