// Tests for MNIST-style folders: both namings, plain and gzip, each missing file, mismatches, statistics, split.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/mnist.h"
#include "tests/data_fixtures.h"

using namespace lowbit;
using namespace lowbit::data_fixtures;

namespace {

constexpr double kStatsTolerance = 1e-3;  // against the published Fashion-MNIST mean / std

std::string load_error(const std::string& dir) {
  try {
    data::load_mnist(dir);
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("expected load_mnist('" << dir << "') to throw lowbit::Error");
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

void check_same(const data::Dataset& a, const data::Dataset& b) {
  CHECK(a.images.count == b.images.count);
  CHECK(a.images.rows == b.images.rows);
  CHECK(a.images.cols == b.images.cols);
  CHECK(a.images.pixels == b.images.pixels);
  CHECK(a.labels == b.labels);
}

}  // namespace

TEST_CASE("both naming conventions, plain and gzip") {
  for (bool gzip : {false, true}) {
    for (bool dotted : {false, true}) {
      CAPTURE(gzip);
      CAPTURE(dotted);
      TempDir dir("data_mnist_names");
      const data::MnistData written = write_mnist_folder(dir.str(), {.gzip = gzip, .dotted_names = dotted});
      const data::MnistData read = data::load_mnist(dir.str());
      check_same(read.train, written.train);
      check_same(read.test, written.test);
      CHECK(read.train.size() == 20);
      CHECK(read.test.size() == 8);
    }
  }
}

TEST_CASE(".gz and plain files mixed in one folder") {
  TempDir dir("data_mnist_mixed");
  const data::MnistData written = write_mnist_folder(dir.str(), {.gzip = true});
  // Replace two of the four by plain files under the other naming.
  std::filesystem::remove(dir / "train-labels-idx1-ubyte.gz");
  std::filesystem::remove(dir / "t10k-images-idx3-ubyte.gz");
  write_bytes(dir / "train-labels.idx1-ubyte", idx_labels_bytes(written.train.labels));
  write_bytes(dir / "t10k-images-idx3-ubyte", idx_images_bytes(written.test.images));
  const data::MnistData read = data::load_mnist(dir.str());
  check_same(read.train, written.train);
  check_same(read.test, written.test);
}

TEST_CASE("a missing folder, and a file given instead of a folder") {
  TempDir dir("data_mnist_nofolder");
  const std::string message = load_error(dir / "absent");
  CHECK(message == "data folder '" + (dir / "absent") +
                       "' does not exist (install Debian's dataset-fashion-mnist or pass --data DIR)");
  write_bytes(dir / "file", {1, 2, 3});
  CHECK(contains(load_error(dir / "file"), "is not a folder"));
}

TEST_CASE("each of the four files missing: the message names it and the names tried") {
  const std::vector<std::pair<std::string, std::string>> files = {
      {"train-images-idx3-ubyte.gz",
       "has no training images file: tried train-images-idx3-ubyte, "
       "train-images-idx3-ubyte.gz, train-images.idx3-ubyte, train-images.idx3-ubyte.gz"},
      {"train-labels-idx1-ubyte.gz", "has no training labels file: tried train-labels-idx1-ubyte"},
      {"t10k-images-idx3-ubyte.gz", "has no test images file: tried t10k-images-idx3-ubyte"},
      {"t10k-labels-idx1-ubyte.gz", "has no test labels file: tried t10k-labels-idx1-ubyte"},
  };
  for (const auto& [name, expected] : files) {
    CAPTURE(name);
    TempDir dir("data_mnist_missing");
    write_mnist_folder(dir.str());
    std::filesystem::remove(dir / name);
    const std::string message = load_error(dir.str());
    INFO("message: " << message);
    CHECK(contains(message, "data folder '" + dir.str() + "'"));
    CHECK(contains(message, expected));
  }
}

TEST_CASE("image and label counts disagree") {
  TempDir dir("data_mnist_counts");
  write_mnist_folder(dir.str(), {.gzip = false});
  write_bytes(dir / "t10k-labels-idx1-ubyte", idx_labels_bytes(synthetic_labels(7)));
  const std::string message = load_error(dir.str());
  INFO("message: " << message);
  CHECK(contains(message, "test images and labels disagree"));
  CHECK(contains(message, "holds 8 images"));
  CHECK(contains(message, "holds 7 labels"));
}

TEST_CASE("train and test image sizes disagree") {
  TempDir dir("data_mnist_sizes");
  write_mnist_folder(dir.str(), {.gzip = false});
  write_bytes(dir / "t10k-images-idx3-ubyte", idx_images_bytes(synthetic_images(8, 5, 5)));
  const std::string message = load_error(dir.str());
  INFO("message: " << message);
  CHECK(contains(message, "training images are 4x3 but test images are 5x5"));
}

TEST_CASE("the classes follow the labels, or --classes bounds them") {
  TempDir dir("data_mnist_label");
  write_mnist_folder(dir.str(), {.gzip = false});
  std::vector<uint8_t> labels = synthetic_labels(20);
  labels[5] = 12;
  write_bytes(dir / "train-labels-idx1-ubyte", idx_labels_bytes(labels));
  CHECK(data::load_mnist(dir.str()).classes == 13);
  CHECK(data::load_mnist(dir.str(), 20).classes == 20);
  std::string message;
  try {
    data::load_mnist(dir.str(), 10);
  } catch (const Error& e) {
    message = e.what();
  }
  INFO("message: " << message);
  CHECK(contains(message, "label 12 at index 5 of the training set is out of range for 10 classes (labels are 0..9)"));
}

TEST_CASE("a corrupt file inside a folder is reported by its path") {
  TempDir dir("data_mnist_corrupt");
  write_mnist_folder(dir.str(), {.gzip = false});
  write_bytes(dir / "train-images-idx3-ubyte", idx_labels_bytes(synthetic_labels(20)));
  const std::string message = load_error(dir.str());
  INFO("message: " << message);
  CHECK(contains(message, dir / "train-images-idx3-ubyte"));
  CHECK(contains(message, "is this a label file?"));
}

TEST_CASE("compute_normalization: mean and population std of pixel / 255") {
  data::IdxImages images{1, 1, 4, {0, 255, 0, 255}};
  const Normalization norm = data::compute_normalization(images);
  CHECK(norm.mean == doctest::Approx(0.5));
  CHECK(norm.std == doctest::Approx(0.5));
  images.pixels = {51, 51, 51, 51};
  CHECK_THROWS_AS(data::compute_normalization(images), Error);
  CHECK_THROWS_AS(data::compute_normalization(data::IdxImages{}), Error);
}

TEST_CASE("split_validation: disjoint, complete, sorted, deterministic") {
  const auto [train, validation] = data::split_validation(1000, 0.1, 7);
  CHECK(train.size() == 900);
  CHECK(validation.size() == 100);
  CHECK(std::is_sorted(train.begin(), train.end()));
  CHECK(std::is_sorted(validation.begin(), validation.end()));
  std::vector<int64_t> all = train;
  all.insert(all.end(), validation.begin(), validation.end());
  std::sort(all.begin(), all.end());
  for (int64_t i = 0; i < 1000; ++i) REQUIRE(all[i] == i);  // disjoint and complete

  const auto again = data::split_validation(1000, 0.1, 7);
  CHECK(again.first == train);
  CHECK(again.second == validation);
  CHECK(data::split_validation(1000, 0.1, 8).second != validation);
  CHECK(data::split_validation(60000, 0.1, 0).second.size() == 6000);

  const auto none = data::split_validation(10, 0.0, 1);
  CHECK(none.first.size() == 10);
  CHECK(none.second.empty());

  CHECK_THROWS_AS(data::split_validation(10, 1.0, 1), Error);
  CHECK_THROWS_AS(data::split_validation(10, -0.1, 1), Error);
  CHECK_THROWS_AS(data::split_validation(10, std::nan(""), 1), Error);
  CHECK_THROWS_AS(data::split_validation(10, 0.97, 1), Error);  // rounds to 10 validation, 0 train
}

TEST_CASE("Debian's Fashion-MNIST, when installed") {
  if (!std::filesystem::exists(data::kDefaultDataDir)) {
    MESSAGE("skipped: " << data::kDefaultDataDir << " is not installed");
    return;
  }
  const data::MnistData data = data::load_mnist(data::kDefaultDataDir);
  CHECK(data.train.size() == 60000);
  CHECK(data.test.size() == 10000);
  CHECK(data.train.images.rows == 28);
  CHECK(data.train.images.cols == 28);
  CHECK(data.test.images.rows == 28);
  CHECK(*std::max_element(data.train.labels.begin(), data.train.labels.end()) + 1 == data.classes);
  const Normalization norm = data::compute_normalization(data.train.images);
  CHECK(std::abs(norm.mean - data::kFashionMnistNormalization.mean) < kStatsTolerance);
  CHECK(std::abs(norm.std - data::kFashionMnistNormalization.std) < kStatsTolerance);
  MESSAGE("Fashion-MNIST train mean " << norm.mean << " std " << norm.std);
}
