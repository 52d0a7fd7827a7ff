// MNIST-style folder loading, normalisation statistics and the validation split.
#include "data/mnist.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <system_error>

#include "core/error.h"
#include "core/rng.h"

namespace lowbit::data {

namespace {

namespace fs = std::filesystem;

// The first existing file among the common names of one of the four files, e.g. stem
// "train-images" and kinds {"idx3-ubyte", "idx4-ubyte"}; throws naming every name tried.
std::string find_file(const fs::path& dir, const std::string& stem, const std::vector<std::string>& kinds,
                      const std::string& what) {
  std::vector<std::string> names;
  for (const std::string& kind : kinds)
    names.insert(names.end(),
                 {stem + "-" + kind, stem + "-" + kind + ".gz", stem + "." + kind, stem + "." + kind + ".gz"});
  for (const std::string& name : names) {
    std::error_code ec;
    if (fs::is_regular_file(dir / name, ec)) return (dir / name).string();
  }
  fail("data folder '{}' has no {} file: tried {}", dir.string(), what, fmt::join(names, ", "));
}

Dataset load_split(const fs::path& dir, const std::string& stem, const char* name) {
  const std::string images_path =
      find_file(dir, stem + "-images", {"idx3-ubyte", "idx4-ubyte"}, fmt::format("{} images", name));
  const std::string labels_path = find_file(dir, stem + "-labels", {"idx1-ubyte"}, fmt::format("{} labels", name));
  Dataset data{read_idx_images(images_path), read_idx_labels(labels_path)};
  const int64_t label_count = static_cast<int64_t>(data.labels.size());
  if (data.images.count != label_count) {
    fail(
        "{} images and labels disagree: '{}' holds {} images but '{}' holds {} labels (files from different "
        "data sets?)",
        name, images_path, data.images.count, labels_path, label_count);
  }
  if (data.images.count == 0) fail("'{}' holds no images; the {} set must not be empty", images_path, name);
  return data;
}

}  // namespace

MnistData load_mnist(const std::string& dir, int64_t classes) {
  if (classes < 0 || classes > 256) fail("the number of classes must be 1..256 (labels are bytes), got {}", classes);
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    fail("data folder '{}' does not exist (install Debian's dataset-fashion-mnist or pass --data DIR)", dir);
  }
  if (!fs::is_directory(dir, ec)) fail("'{}' is not a folder: --data expects the folder holding the IDX files", dir);
  MnistData data{load_split(dir, "train", "training"), load_split(dir, "t10k", "test")};
  const IdxImages& train = data.train.images;
  const IdxImages& test = data.test.images;
  if (train.rows != test.rows || train.cols != test.cols) {
    fail("data folder '{}': training images are {}x{} but test images are {}x{} (files from different data sets?)", dir,
         train.rows, train.cols, test.rows, test.cols);
  }
  if (train.channels != test.channels) {
    fail("data folder '{}': training images have {} channels but test images {} (files from different data sets?)", dir,
         train.channels, test.channels);
  }
  for (const Dataset* set : {&data.train, &data.test}) {
    const auto largest = std::max_element(set->labels.begin(), set->labels.end());
    const int64_t index = largest - set->labels.begin();
    if (classes > 0 && *largest >= classes)
      fail("data folder '{}': label {} at index {} of the {} set is out of range for {} classes (labels are 0..{})",
           dir, *largest, index, set == &data.train ? "training" : "test", classes, classes - 1);
    data.classes = std::max<int64_t>(data.classes, *largest + 1);
  }
  if (classes > 0) data.classes = classes;
  if (data.classes < 2) fail("data folder '{}': every label is 0; a classifier needs at least 2 classes", dir);
  return data;
}

Dataset first_images(const Dataset& set, int64_t n) {
  n = std::clamp<int64_t>(n, 0, set.size());
  const auto pixels = set.images.pixels.begin();
  return {{n, set.images.rows, set.images.cols, {pixels, pixels + n * set.images.image_size()}, set.images.channels},
          {set.labels.begin(), set.labels.begin() + n}};
}

Normalization compute_normalization(const IdxImages& images) {
  if (images.pixels.empty()) fail("cannot compute a normalisation from an empty set of images");
  std::array<uint64_t, 256> histogram{};
  for (uint8_t pixel : images.pixels) ++histogram[pixel];
  const double n = static_cast<double>(images.pixels.size());
  double mean = 0;
  for (int p = 0; p < 256; ++p) mean += static_cast<double>(histogram[p]) * (p / 255.0);
  mean /= n;
  double variance = 0;
  for (int p = 0; p < 256; ++p) {
    const double d = p / 255.0 - mean;
    variance += static_cast<double>(histogram[p]) * d * d;
  }
  variance /= n;
  const double std = std::sqrt(variance);
  if (std == 0)
    fail("cannot normalise: all {} pixels have the value {} (standard deviation 0)", images.pixels.size(), mean * 255);
  return Normalization{static_cast<float>(mean), static_cast<float>(std)};
}

std::pair<std::vector<int64_t>, std::vector<int64_t>> split_validation(int64_t n, double fraction, uint64_t seed) {
  if (n < 0) fail("split_validation: the number of examples must be >= 0, got {}", n);
  if (!(fraction >= 0.0 && fraction < 1.0)) {
    fail("validation fraction must be in [0, 1), got {} (for example 0.1 keeps 10% for validation)", fraction);
  }
  const int64_t validation_count = std::llround(static_cast<double>(n) * fraction);
  if (n > 0 && validation_count >= n) {
    fail("validation fraction {} of {} examples leaves no training examples; use a smaller fraction", fraction, n);
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  Rng rng(seed);
  rng.shuffle(std::span<int64_t>(order));
  std::vector<int64_t> validation(order.begin(), order.begin() + validation_count);
  std::vector<int64_t> train(order.begin() + validation_count, order.end());
  std::sort(validation.begin(), validation.end());
  std::sort(train.begin(), train.end());
  return {std::move(train), std::move(validation)};
}

}  // namespace lowbit::data
