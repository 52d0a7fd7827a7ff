// Tests for the IDX reader: plain and gzip round trips, and one test per kind of bad file.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "data/idx.h"
#include "tests/data_fixtures.h"

using namespace lowbit;
using namespace lowbit::data_fixtures;

namespace {

// The lowbit::Error message reading `path` as images gives; fails the test if it reads fine.
std::string images_error(const std::string& path) {
  try {
    data::read_idx_images(path);
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("expected read_idx_images('" << path << "') to throw lowbit::Error");
  return "";
}

std::string labels_error(const std::string& path) {
  try {
    data::read_idx_labels(path);
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("expected read_idx_labels('" << path << "') to throw lowbit::Error");
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Checks that `message` names `path` and contains `part`, printing the message otherwise.
void check_message(const std::string& message, const std::string& path, const std::string& part) {
  INFO("message: " << message);
  CHECK(contains(message, path));
  CHECK(contains(message, part));
}

}  // namespace

TEST_CASE("IDX images and labels round-trip, plain and gzip") {
  TempDir dir("data_idx_roundtrip");
  const data::IdxImages images = synthetic_images(7, 5, 3);
  const std::vector<uint8_t> labels = synthetic_labels(7);
  for (bool gzip : {false, true}) {
    CAPTURE(gzip);
    write_file(dir / "images", idx_images_bytes(images), gzip);
    write_file(dir / "labels", idx_labels_bytes(labels), gzip);
    const data::IdxImages read = data::read_idx_images(dir / "images");
    CHECK(read.count == 7);
    CHECK(read.rows == 5);
    CHECK(read.cols == 3);
    CHECK(read.pixels == images.pixels);
    CHECK(data::read_idx_labels(dir / "labels") == labels);
  }
}

TEST_CASE("images with channels (rank 4, magic 0x00000804) read as (count, channels, rows, cols)") {
  TempDir dir("data_idx_channels");
  data::IdxImages images = synthetic_images(4, 5, 3);
  images.channels = 3;
  images.pixels.resize(static_cast<size_t>(4 * 3 * 5 * 3), 7);
  for (bool gzip : {false, true}) {
    CAPTURE(gzip);
    write_file(dir / "images", idx_images_bytes(images), gzip);
    const data::IdxImages read = data::read_idx_images(dir / "images");
    CHECK(read.count == 4);
    CHECK(read.channels == 3);
    CHECK(read.rows == 5);
    CHECK(read.cols == 3);
    CHECK(read.image_size() == 45);
    CHECK(read.pixels == images.pixels);
  }
  // Zero channels, and a rank-4 header cut short, are refused.
  std::vector<uint8_t> bytes = idx_header(data::kIdxChannelImageMagic, {4, 0, 5, 3});
  write_file(dir / "zero", bytes, false);
  check_message(images_error(dir / "zero"), dir / "zero", "channels, rows and cols must be at least 1");
  bytes = idx_header(data::kIdxChannelImageMagic, {4, 3, 5});
  write_file(dir / "cut", bytes, false);
  check_message(images_error(dir / "cut"), dir / "cut", "ends inside its IDX header: 16 of 20 header bytes");
  // A label file stays rank 1: an image file of rank 4 is not a label file.
  write_file(dir / "images", idx_images_bytes(images), false);
  check_message(labels_error(dir / "images"), dir / "images", "expected IDX label magic");
}

TEST_CASE("gzip is detected by its magic bytes, not by the file name") {
  TempDir dir("data_idx_sniff");
  const data::IdxImages images = synthetic_images(3, 2, 2);
  write_file(dir / "gzipped-without-extension", idx_images_bytes(images), true);
  write_file(dir / "plain-named.gz", idx_images_bytes(images), false);
  CHECK(data::read_idx_images(dir / "gzipped-without-extension").pixels == images.pixels);
  CHECK(data::read_idx_images(dir / "plain-named.gz").pixels == images.pixels);
}

TEST_CASE("a large gzip file streams through in several chunks") {
  TempDir dir("data_idx_large");
  const data::IdxImages images = synthetic_images(3000, 28, 28);  // 2.4 MB: more than one 1 MiB chunk
  write_file(dir / "big.gz", idx_images_bytes(images), true);
  CHECK(data::read_idx_images(dir / "big.gz").pixels == images.pixels);
}

TEST_CASE("zero images is a valid (empty) file") {
  TempDir dir("data_idx_empty");
  write_bytes(dir / "empty", idx_header(data::kIdxImageMagic, {0, 28, 28}));
  const data::IdxImages read = data::read_idx_images(dir / "empty");
  CHECK(read.count == 0);
  CHECK(read.pixels.empty());
}

TEST_CASE("missing file and folder instead of a file") {
  TempDir dir("data_idx_missing");
  check_message(images_error(dir / "nope"), dir / "nope", "does not exist");
  check_message(images_error(dir.str()), dir.str(), "is a folder");
}

TEST_CASE("wrong magic: label file read as images, image file read as labels, garbage") {
  TempDir dir("data_idx_magic");
  write_bytes(dir / "labels", idx_labels_bytes(synthetic_labels(4)));
  write_bytes(dir / "images", idx_images_bytes(synthetic_images(4, 2, 2)));
  write_bytes(dir / "text", std::vector<uint8_t>{'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd', '\n', 'a', 'b',
                                                 'c', 'd', 'e', 'f'});
  check_message(images_error(dir / "labels"), dir / "labels",
                "expected IDX image magic 0x00000803, found 0x00000801 (is this a label file?)");
  check_message(labels_error(dir / "images"), dir / "images",
                "expected IDX label magic 0x00000801, found 0x00000803 (is this an image file?)");
  check_message(images_error(dir / "text"), dir / "text", "not an IDX file");
  write_file(dir / "text.gz", read_bytes(dir / "text"), true);
  check_message(images_error(dir / "text.gz"), dir / "text.gz", "not an IDX file");
}

TEST_CASE("bad dtype byte and wrong rank") {
  TempDir dir("data_idx_dtype");
  std::vector<uint8_t> floats = idx_header(0x00000D03, {1, 1, 1});
  floats.insert(floats.end(), 4, 0);
  write_bytes(dir / "floats", floats);
  check_message(images_error(dir / "floats"), dir / "floats", "data type byte 0x0d (float32) is not supported");

  std::vector<uint8_t> rank5 = idx_header(0x00000805, {1, 1, 1, 1, 1});
  rank5.push_back(0);
  write_bytes(dir / "rank5", rank5);
  check_message(images_error(dir / "rank5"), dir / "rank5", "rank 5, expected 3");

  write_bytes(dir / "rank2", idx_header(0x00000802, {1, 1}));
  check_message(labels_error(dir / "rank2"), dir / "rank2", "rank 2, expected 1");
}

TEST_CASE("zero rows or cols") {
  TempDir dir("data_idx_zero");
  write_bytes(dir / "zero", idx_header(data::kIdxImageMagic, {5, 0, 28}));
  check_message(images_error(dir / "zero"), dir / "zero", "rows and cols must be at least 1");
}

TEST_CASE("dimensions whose product overflows, and the resource limit") {
  TempDir dir("data_idx_overflow");
  write_bytes(dir / "overflow", idx_header(data::kIdxImageMagic, {0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF}));
  check_message(images_error(dir / "overflow"), dir / "overflow", "overflow a 64-bit byte count");
  // 65536 images of 256x256 = 4 GiB: refused before allocating, even though no data follows.
  write_bytes(dir / "huge", idx_header(data::kIdxImageMagic, {65536, 256, 256}));
  check_message(images_error(dir / "huge"), dir / "huge", "resource limit");
  write_file(dir / "huge.gz", idx_header(data::kIdxImageMagic, {65536, 256, 256}), true);
  check_message(images_error(dir / "huge.gz"), dir / "huge.gz", "resource limit");
  write_bytes(dir / "huge-labels", idx_header(data::kIdxLabelMagic, {0xFFFFFFFF}));
  check_message(labels_error(dir / "huge-labels"), dir / "huge-labels", "resource limit");
}

TEST_CASE("a plain file shorter or longer than its header says") {
  TempDir dir("data_idx_truncated");
  std::vector<uint8_t> bytes = idx_images_bytes(synthetic_images(100, 2, 2));
  bytes.resize(bytes.size() - 2);  // 99.5 images
  write_bytes(dir / "short", bytes);
  check_message(images_error(dir / "short"), dir / "short", "is truncated");
  check_message(images_error(dir / "short"), dir / "short", "(99.5 images)");

  write_bytes(dir / "header-only", std::vector<uint8_t>(bytes.begin(), bytes.begin() + 10));
  check_message(images_error(dir / "header-only"), dir / "header-only", "ends inside its IDX header");
  write_bytes(dir / "tiny", std::vector<uint8_t>(bytes.begin(), bytes.begin() + 2));
  check_message(images_error(dir / "tiny"), dir / "tiny", "too short to be an IDX file");
  write_bytes(dir / "empty", {});
  check_message(images_error(dir / "empty"), dir / "empty", "too short to be an IDX file");

  std::vector<uint8_t> labels = idx_labels_bytes(synthetic_labels(10));
  labels.push_back(3);
  write_bytes(dir / "long", labels);
  check_message(labels_error(dir / "long"), dir / "long", "trailing data is refused");
}

TEST_CASE("gzip stream shorter or longer than its header says") {
  TempDir dir("data_idx_gz_short");
  std::vector<uint8_t> bytes = idx_images_bytes(synthetic_images(100, 2, 2));
  bytes.resize(bytes.size() - 2);
  write_file(dir / "short.gz", bytes, true);
  check_message(images_error(dir / "short.gz"), dir / "short.gz", "(99.5 images)");

  std::vector<uint8_t> labels = idx_labels_bytes(synthetic_labels(10));
  labels.push_back(3);
  write_file(dir / "long.gz", labels, true);
  check_message(labels_error(dir / "long.gz"), dir / "long.gz", "trailing data is refused");
}

TEST_CASE("a truncated gzip stream, cut at several points") {
  TempDir dir("data_idx_gz_cut");
  for (bool compressible : {false, true}) {
    data::IdxImages images = synthetic_images(200, 8, 8);
    if (compressible) {
      for (size_t i = 0; i < images.pixels.size(); ++i) images.pixels[i] = static_cast<uint8_t>((i / 7) % 5);
    }
    write_file(dir / "whole.gz", idx_images_bytes(images), true);
    const std::vector<uint8_t> gz = read_bytes(dir / "whole.gz");
    REQUIRE(gz.size() > 40);
    for (size_t cut : {size_t{2}, size_t{5}, size_t{10}, size_t{16}, gz.size() / 3, gz.size() / 2, gz.size() - 9,
                       gz.size() - 8, gz.size() - 5, gz.size() - 4, gz.size() - 1}) {
      CAPTURE(compressible);
      CAPTURE(cut);
      write_bytes(dir / "cut.gz", std::vector<uint8_t>(gz.begin(), gz.begin() + cut));
      check_message(images_error(dir / "cut.gz"), dir / "cut.gz", "is truncated");
    }
  }
}

TEST_CASE("a corrupt gzip stream: flipped bytes in the data, the CRC and the length") {
  TempDir dir("data_idx_gz_corrupt");
  data::IdxImages images = synthetic_images(200, 8, 8);
  for (size_t i = 0; i < images.pixels.size(); ++i) images.pixels[i] = static_cast<uint8_t>((i * i / 13) % 11);
  write_file(dir / "whole.gz", idx_images_bytes(images), true);
  const std::vector<uint8_t> gz = read_bytes(dir / "whole.gz");

  std::vector<uint8_t> bad_crc = gz;
  bad_crc[gz.size() - 8] ^= 0xFF;
  write_bytes(dir / "crc.gz", bad_crc);
  check_message(images_error(dir / "crc.gz"), dir / "crc.gz", "is corrupt: zlib reports 'incorrect data check'");

  std::vector<uint8_t> bad_length = gz;
  bad_length[gz.size() - 4] ^= 0x01;
  write_bytes(dir / "length.gz", bad_length);
  check_message(images_error(dir / "length.gz"), dir / "length.gz", "incorrect length check");

  // Flipping bytes inside the deflate data: zlib notices bad codes, or the CRC catches wrong data,
  // or (when the damage changes the decompressed length) the IDX size check does.
  for (size_t at : {gz.size() / 3, gz.size() / 2, 2 * gz.size() / 3}) {
    CAPTURE(at);
    std::vector<uint8_t> bad = gz;
    for (size_t i = at; i < at + 4; ++i) bad[i] ^= 0x5A;
    write_bytes(dir / "middle.gz", bad);
    const std::string message = images_error(dir / "middle.gz");
    INFO("message: " << message);
    CHECK(contains(message, dir / "middle.gz"));
    CHECK((contains(message, "is corrupt") || contains(message, "is truncated") ||
           contains(message, "trailing data is refused")));
  }
}
