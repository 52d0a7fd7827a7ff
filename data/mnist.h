// MNIST-style data sets (MNIST, Fashion-MNIST): the four IDX files of a folder, normalisation, validation split.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/normalize.h"
#include "data/idx.h"

namespace lowbit::data {

// Debian's dataset-fashion-mnist installs the four gzipped IDX files here.
constexpr const char* kDefaultDataDir = "/usr/share/datasets/fashion-mnist";

// The usual input normalisations (mean and std of pixel / 255 over the training images).
constexpr Normalization kFashionMnistNormalization{0.2860f, 0.3530f};
constexpr Normalization kMnistNormalization{0.1307f, 0.3081f};

// Images and their labels, one label per image.
struct Dataset {
  IdxImages images;
  std::vector<uint8_t> labels;

  int64_t size() const { return images.count; }
};

struct MnistData {
  Dataset train;
  Dataset test;
  int64_t classes = 0;  // labels are 0..classes-1: 10 for MNIST and Fashion-MNIST
};

// Loads train-images, train-labels, t10k-images and t10k-labels from `dir`. Each file may use
// either common naming, plain or gzipped; for train images the names tried, in order, are
//   train-images-idx3-ubyte, train-images-idx3-ubyte.gz, train-images.idx3-ubyte, train-images.idx3-ubyte.gz
// (then the same with idx4-ubyte: images with channels)
// and the first that exists is read. Checks that image and label counts agree, that train and
// test images have the same size and that neither set is empty. The number of classes is `classes`
// when given (every label must be below it), else one more than the largest label of either set.
// Every problem throws lowbit::Error naming the folder or file.
MnistData load_mnist(const std::string& dir = kDefaultDataDir, int64_t classes = 0);

// The first n images of `set` (all of them when it holds fewer), as a data set of their own.
Dataset first_images(const Dataset& set, int64_t n);

// Mean and (population) standard deviation of pixel / 255 over every pixel, computed in double
// (from a 256-bin histogram, so exact up to the final division and square root).
Normalization compute_normalization(const IdxImages& images);

// Splits the examples 0..n-1 into (train, validation): a seeded shuffle (lowbit::Rng), the first
// round(n * fraction) go to validation. Both lists come back sorted ascending. The same
// (n, fraction, seed) always gives the same split. fraction must be in [0, 1) and leave at least
// one training example.
std::pair<std::vector<int64_t>, std::vector<int64_t>> split_validation(int64_t n, double fraction, uint64_t seed);

}  // namespace lowbit::data
