// End-to-end tests of the command-line programs (train, eval, quantize) on a small generated data set.
#include <doctest/doctest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "core/safetensors.h"
#include "data_fixtures.h"
#include "nn/graph.h"

using namespace lowbit;
using data_fixtures::TempDir;

namespace {

constexpr double kMinAccuracy = 0.5;     // chance is 0.1; the stripes are easy to learn
constexpr double kMinAgreement = 0.999;  // fake-quant vs integer graph, fraction of equal predictions
constexpr int64_t kTrainImages = 600;
constexpr int64_t kTestImages = 200;
constexpr int64_t kSide = 28;

namespace fs = std::filesystem;

// Class c is a bright stripe at rows 4 + 2c, 5 + 2c (of `side` x `side` images) over dim noise: learnable in one
// epoch. With more classes than fit as two-row stripes, class c is the one row 2 + c.
data::Dataset striped_images(int64_t count, uint64_t seed, int64_t side = kSide, int64_t classes = 10) {
  data::Dataset set{{count, side, side, std::vector<uint8_t>(static_cast<size_t>(count * side * side))}, {}};
  Rng rng(seed);
  const bool wide = 4 + 2 * classes <= side;
  for (int64_t i = 0; i < count; ++i) {
    const auto label = static_cast<uint8_t>(rng.below(static_cast<uint32_t>(classes)));
    set.labels.push_back(label);
    for (int64_t y = 0; y < side; ++y)
      for (int64_t x = 0; x < side; ++x) {
        const bool stripe = wide ? (y == 4 + 2 * label || y == 5 + 2 * label) : y == 2 + label;
        set.images.pixels[static_cast<size_t>((i * side + y) * side + x)] =
            static_cast<uint8_t>(stripe ? 160 + rng.below(96) : rng.below(80));
      }
  }
  return set;
}

const data_fixtures::MnistFolder kSpec{.gzip = false};

std::string file_in(const std::string& dir, const std::string& split, const std::string& what) {
  return dir + "/" + data_fixtures::mnist_file_name(kSpec, split, what, what == "images" ? "idx3-ubyte" : "idx1-ubyte");
}

void write_striped_folder(const std::string& dir, int64_t side = kSide, int64_t classes = 10) {
  fs::create_directories(dir);
  const data::Dataset train = striped_images(kTrainImages, 21, side, classes),
                      test = striped_images(kTestImages, 22, side, classes);
  data_fixtures::write_bytes(file_in(dir, "train", "images"), data_fixtures::idx_images_bytes(train.images));
  data_fixtures::write_bytes(file_in(dir, "train", "labels"), data_fixtures::idx_labels_bytes(train.labels));
  data_fixtures::write_bytes(file_in(dir, "t10k", "images"), data_fixtures::idx_images_bytes(test.images));
  data_fixtures::write_bytes(file_in(dir, "t10k", "labels"), data_fixtures::idx_labels_bytes(test.labels));
}

struct Run {
  int code = 0;
  std::string out, err;
  int err_lines() const { return static_cast<int>(std::count(err.begin(), err.end(), '\n')); }
  std::string last_err_line() const {
    const std::string trimmed = err.ends_with('\n') ? err.substr(0, err.size() - 1) : err;
    return trimmed.substr(trimmed.rfind('\n') == std::string::npos ? 0 : trimmed.rfind('\n') + 1);
  }
};

// Everything the tests share: the data folder, and the models trained once.
struct Workspace {
  TempDir dir{"apps"};
  std::string data = dir / "data";
  std::string float_model = dir / "mlp.safetensors";
  std::string qat_model = dir / "mlp.qat.safetensors";

  Workspace() {
    write_striped_folder(data);
    const Run f = run("train", "--model mlp --epochs 2 --threads 2 --out " + float_model);
    REQUIRE_MESSAGE(f.code == 0, f.err);
    const Run q = run("train", "--model mlp --epochs 1 --qat --qat-epochs 1 --threads 2 --out " + qat_model);
    REQUIRE_MESSAGE(q.code == 0, q.err);
  }

  // Runs build/bin/<program> with `args` (and --data unless given), capturing stdout and stderr.
  Run run(const std::string& program, const std::string& args) const {
    const std::string out = dir / "stdout.txt", err = dir / "stderr.txt";
    const std::string data_flag = args.find("--data") == std::string::npos ? " --data " + data : "";
    const std::string cmd =
        std::string(LOWBIT_BIN_DIR) + "/" + program + " " + args + data_flag + " >" + out + " 2>" + err;
    const int status = std::system(cmd.c_str());
    Run r;
    r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
    auto text = [](const std::string& path) {
      const auto bytes = data_fixtures::read_bytes(path);
      return std::string(bytes.begin(), bytes.end());
    };
    r.out = text(out);
    r.err = text(err);
    return r;
  }

  nlohmann::json run_json(const std::string& program, const std::string& args) const {
    const Run r = run(program, args + " --json");
    REQUIRE_MESSAGE(r.code == 0, r.err);
    return nlohmann::json::parse(r.out);
  }
};

Workspace& workspace() {
  static Workspace w;
  return w;
}

// A failing run: non-zero exit, the phrase on the last line of stderr, and only that line when `one_line`.
void check_fails(const Run& r, const std::string& phrase, bool one_line = true) {
  CHECK_MESSAGE(r.code != 0, r.out);
  CHECK_MESSAGE(r.last_err_line().find(phrase) != std::string::npos, "stderr: ", r.err, "\nexpected: ", phrase);
  if (one_line) CHECK_MESSAGE(r.err_lines() == 1, "stderr: ", r.err);
}

// A copy of the good data folder, for breaking one file of it.
std::string copy_of_data(const std::string& name) {
  auto& w = workspace();
  const std::string dir = w.dir / name;
  fs::remove_all(dir);
  fs::copy(w.data, dir);
  return dir;
}

bool file_bytes_equal(const std::string& a, const std::string& b) {
  return data_fixtures::read_bytes(a) == data_fixtures::read_bytes(b);
}

void truncate_file(const std::string& path, size_t keep) {
  auto bytes = data_fixtures::read_bytes(path);
  bytes.resize(std::min(keep, bytes.size()));
  data_fixtures::write_bytes(path, bytes);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// the happy paths

TEST_CASE("eval of a float checkpoint: fp32 accuracy well above chance, every field present") {
  auto& w = workspace();
  const auto j = w.run_json("eval", "--model " + w.float_model);
  CHECK(j["mode"] == "fp32");
  CHECK(j["accuracy"].get<double>() > kMinAccuracy);
  CHECK(j["samples"] == kTestImages);
  CHECK(j["correct"].get<int64_t>() == static_cast<int64_t>(std::lround(j["accuracy"].get<double>() * kTestImages)));
  CHECK(j["per_class"].size() == 10);
  CHECK(j["confusion"].size() == 10);
  CHECK(j["images_per_second"].get<double>() > 0);
  CHECK(j["agreement"].is_null());
  CHECK(j["max_logit_diff_lsb"].is_null());
  CHECK(j["latency_us_median"].is_null());
  CHECK(j["model_bytes"].get<int64_t>() > 0);
  CHECK(j["float_model_bytes"].get<int64_t>() > 0);
  CHECK(j["batch_size"] == 256);
  CHECK(j["threads"].get<int>() >= 1);

  const auto one = w.run_json("eval", "--model " + w.float_model + " --batch-size 1 --threads 1");
  CHECK(one["latency_us_median"].get<double>() > 0);
  CHECK(one["threads"] == 1);
  CHECK(one["accuracy"] == j["accuracy"]);
}

TEST_CASE("eval --int8 on a float checkpoint: PTQ agrees with its fake-quant model") {
  auto& w = workspace();
  const auto j = w.run_json("eval", "--model " + w.float_model + " --int8 --calib 300 --observer minmax");
  CHECK(j["mode"] == "int8");
  CHECK(j["agreement"].get<double>() >= kMinAgreement);
  CHECK(j["accuracy"].get<double>() > kMinAccuracy);
  CHECK(j["model_bytes"].get<int64_t>() < j["float_model_bytes"].get<int64_t>());
}

TEST_CASE("QAT checkpoint: fake-quant, --int8 agreement, and the written int8 file") {
  auto& w = workspace();
  const auto fq = w.run_json("eval", "--model " + w.qat_model);
  CHECK(fq["mode"] == "fake-quant");
  CHECK(fq["accuracy"].get<double>() > kMinAccuracy);

  const auto lowered = w.run_json("eval", "--model " + w.qat_model + " --int8");
  CHECK(lowered["mode"] == "int8");
  CHECK(lowered["agreement"].get<double>() >= kMinAgreement);
  CHECK(lowered["max_logit_diff_lsb"].get<int64_t>() <= 1);

  const auto int_file = w.run_json("eval", "--model " + w.dir / "mlp.qat.int8.safetensors");
  CHECK(int_file["mode"] == "int8");
  CHECK(int_file["agreement"].is_null());
  CHECK(int_file["accuracy"] == lowered["accuracy"]);

  check_fails(w.run("eval", "--model " + w.qat_model + " --int4"), "8-bit weights");
}

TEST_CASE("quantize a float checkpoint, then eval the integer file it wrote") {
  auto& w = workspace();
  const auto q = w.run_json("quantize", "--model " + w.float_model + " --bits w4a8 --calib 300");
  CHECK(q["mode"] == "w4a8");
  CHECK(q["agreement"].get<double>() >= kMinAgreement);
  CHECK(q["float_accuracy"].get<double>() > kMinAccuracy);
  const std::string out = w.dir / "mlp.w4a8.safetensors";
  CHECK(q["out"] == out);
  REQUIRE(fs::exists(out));
  const auto e = w.run_json("eval", "--model " + out);
  CHECK(e["mode"] == "w4a8");
  CHECK(e["accuracy"] == q["int_accuracy"]);

  check_fails(w.run("quantize", "--model " + w.qat_model + " --out " + w.dir / "never.safetensors"), "QAT checkpoint");
  check_fails(w.run("quantize", "--model " + out + " --out " + w.dir / "never.safetensors"),
              "already an integer model");
  CHECK_FALSE(fs::exists(w.dir / "never.safetensors"));
}

TEST_CASE("resume: 1 epoch + --resume to 2 epochs equals 2 epochs straight, bit for bit") {
  auto& w = workspace();
  const std::string straight = w.dir / "straight.safetensors", half = w.dir / "half.safetensors",
                    resumed = w.dir / "resumed.safetensors";
  REQUIRE(w.run("train", "--model mlp --epochs 2 --threads 1 --out " + straight).code == 0);
  REQUIRE(w.run("train", "--model mlp --epochs 1 --threads 1 --out " + half).code == 0);
  const Run r = w.run("train", "--model mlp --epochs 2 --threads 1 --resume " + half + " --out " + resumed);
  REQUIRE_MESSAGE(r.code == 0, r.err);
  const StFile a = load_safetensors(straight), b = load_safetensors(resumed);
  REQUIRE(a.tensors.size() == b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    CAPTURE(a.tensors[i].first);
    CHECK(a.tensors[i].first == b.tensors[i].first);
    CHECK(a.tensors[i].second.shape == b.tensors[i].second.shape);
    CHECK(a.tensors[i].second.bytes == b.tensors[i].second.bytes);
  }
}

TEST_CASE("a user's own description on 32x32 images with 20 classes: train, eval and QAT from the files alone") {
  auto& w = workspace();
  const std::string data = w.dir / "data32";
  write_striped_folder(data, 32, 20);
  // A residual block and a depthwise convolution: trains in float, and eval rebuilds it from the checkpoint.
  const std::string graph = w.dir / "my-net.json";
  data_fixtures::write_bytes(graph, [] {
    const std::string text = R"({"format": "lowbit-model", "version": 1, "name": "my-net",
      "input": {"channels": "auto", "height": "auto", "width": "auto"}, "classes": "auto", "nodes": [
      {"name": "stem", "kind": "Conv2d", "out_channels": 8, "kernel": 3, "padding": 1, "bias": false},
      {"name": "bn", "kind": "BatchNorm2d"}, {"name": "relu", "kind": "ReLU"},
      {"name": "dw", "kind": "Conv2d", "out_channels": 8, "kernel": 3, "padding": 1, "groups": 8},
      {"name": "relu6", "kind": "ReLU6"},
      {"name": "add", "kind": "Add", "inputs": ["relu6", "relu"]},
      {"name": "pool", "kind": "MaxPool2d", "kernel": 4},
      {"name": "flat", "kind": "Flatten"},
      {"name": "fc", "kind": "Linear", "out_features": "classes"}]})";
    return std::vector<uint8_t>(text.begin(), text.end());
  }());
  const std::string float_out = w.dir / "my-net.safetensors";
  const Run t = w.run("train", "--model " + graph + " --epochs 3 --lr 3e-3 --threads 2 --summary --data " + data +
                                   " --out " + float_out);
  REQUIRE_MESSAGE(t.code == 0, t.err);
  CHECK(t.out.find("layers.add") != std::string::npos);  // the summary lists every node ...
  CHECK(t.out.find("relu6,relu") != std::string::npos);  // ... with its inputs
  CHECK(t.err.find("my-net: ") != std::string::npos);
  const nlohmann::json e = w.run_json("eval", "--model " + float_out + " --data " + data);
  CHECK(e["accuracy"].get<double>() >= kMinAccuracy);  // chance is 0.05
  // QAT of a chain description: the integer model of 20 classes agrees with its fake-quant model.
  const std::string chain = w.dir / "my-chain.json";
  data_fixtures::write_bytes(chain, [] {
    const std::string text = R"({"format": "lowbit-model", "version": 1, "name": "my-chain",
      "input": {"channels": 1, "height": 32, "width": 32}, "classes": 20, "nodes": [
      {"name": "c", "kind": "Conv2d", "out_channels": 6, "kernel": 3, "padding": 1},
      {"name": "r", "kind": "ReLU"}, {"name": "p", "kind": "MaxPool2d", "kernel": 4},
      {"name": "f", "kind": "Flatten"}, {"name": "fc", "kind": "Linear", "out_features": "classes"}]})";
    return std::vector<uint8_t>(text.begin(), text.end());
  }());
  const std::string qat_out = w.dir / "my-chain.qat.safetensors";
  const Run q = w.run(
      "train", "--model " + chain + " --epochs 3 --lr 3e-3 --qat --threads 2 --data " + data + " --out " + qat_out);
  REQUIRE_MESSAGE(q.code == 0, q.err);
  const nlohmann::json i = w.run_json("eval", "--int8 --model " + qat_out + " --data " + data);
  CHECK(i["accuracy"].get<double>() >= kMinAccuracy);
  CHECK(i["agreement"].get<double>() >= kMinAgreement);
  // A description whose stated size disagrees with the data is refused before training.
  check_fails(w.run("train", "--model " + chain + " --epochs 1 --out " + w.dir / "x.safetensors"),
              "takes 32 pixel rows, the data set has 28");
  // The graph with a residual Add and a depthwise convolution goes through QAT to the integer graph, which
  // computes what its fake-quant model computes (issue "Quantize any graph": 100% agreement).
  const std::string graph_qat = w.dir / "my-net.qat.safetensors";
  const Run g = w.run("train", "--model " + graph + " --epochs 3 --lr 3e-3 --qat --threads 2 --data " + data +
                                   " --out " + graph_qat);
  REQUIRE_MESSAGE(g.code == 0, g.err);
  const nlohmann::json gi = w.run_json("eval", "--int8 --model " + graph_qat + " --data " + data);
  CHECK(gi["accuracy"].get<double>() >= kMinAccuracy);
  CHECK(gi["agreement"].get<double>() == 1.0);
  // What the integer graph cannot hold is refused before training, in one line naming the node.
  const std::string bad = w.dir / "bn-after-relu.json";
  data_fixtures::write_bytes(bad, [] {
    const std::string text = R"({"format": "lowbit-model", "version": 1, "name": "bn-after-relu",
      "input": {"channels": 1, "height": 32, "width": 32}, "classes": 20, "nodes": [
      {"name": "c", "kind": "Conv2d", "out_channels": 4, "kernel": 3}, {"name": "r", "kind": "ReLU"},
      {"name": "b", "kind": "BatchNorm2d"}, {"name": "f", "kind": "Flatten"},
      {"name": "fc", "kind": "Linear", "out_features": "classes"}]})";
    return std::vector<uint8_t>(text.begin(), text.end());
  }());
  check_fails(w.run("train", "--model " + bad + " --epochs 1 --qat --data " + data + " --out " + w.dir / "y.safetensors"),
              "node 'b' (BatchNorm2d(4)): a BatchNorm2d is quantized folded into a Conv2d");
}

TEST_CASE("images with 3 channels (rank-4 IDX files): train --qat, then eval --int8 from the files alone") {
  auto& w = workspace();
  const std::string data = w.dir / "data3";
  fs::create_directories(data);
  // Three planes per image: the stripes, their negative, and the stripes again.
  const auto three_channels = [](data::Dataset set) {
    data::IdxImages rgb{set.images.count, set.images.rows, set.images.cols, {}, 3};
    const int64_t plane = set.images.rows * set.images.cols;
    for (int64_t i = 0; i < set.images.count; ++i)
      for (int c = 0; c < 3; ++c)
        for (int64_t p = 0; p < plane; ++p) {
          const uint8_t v = set.images.pixels[static_cast<size_t>(i * plane + p)];
          rgb.pixels.push_back(c == 1 ? static_cast<uint8_t>(255 - v) : v);
        }
    set.images = rgb;
    return set;
  };
  const data::Dataset train = three_channels(striped_images(kTrainImages, 31, 16, 5)),
                      test = three_channels(striped_images(kTestImages, 32, 16, 5));
  data_fixtures::write_bytes(data + "/train-images-idx4-ubyte", data_fixtures::idx_images_bytes(train.images));
  data_fixtures::write_bytes(data + "/train-labels-idx1-ubyte", data_fixtures::idx_labels_bytes(train.labels));
  data_fixtures::write_bytes(data + "/t10k-images-idx4-ubyte", data_fixtures::idx_images_bytes(test.images));
  data_fixtures::write_bytes(data + "/t10k-labels-idx1-ubyte", data_fixtures::idx_labels_bytes(test.labels));
  const std::string out = w.dir / "rgb.qat.safetensors";
  const Run q = w.run("train", "--model lenet5 --epochs 2 --qat --threads 2 --data " + data + " --out " + out);
  REQUIRE_MESSAGE(q.code == 0, q.err);
  const nlohmann::json i = w.run_json("eval", "--int8 --model " + out + " --data " + data);
  CHECK(i["accuracy"].get<double>() >= kMinAccuracy);
  CHECK(i["agreement"].get<double>() >= kMinAgreement);
  // The integer model refuses one-channel data with a clear line.
  check_fails(w.run("eval", "--model " + w.dir / "rgb.qat.int8.safetensors"), "takes 3x16x16 images");
}

TEST_CASE("resume: flags that contradict the checkpoint are refused; a complete run is left alone") {
  auto& w = workspace();
  check_fails(
      w.run("train", "--model lenet5 --resume " + w.float_model + " --epochs 3 --out " + w.dir / "c.safetensors"),
      "--model lenet5 contradicts --resume");
  const std::string copy = w.dir / "complete.safetensors";
  fs::copy_file(w.float_model, copy, fs::copy_options::overwrite_existing);
  const Run r = w.run("train", "--resume " + copy + " --epochs 2 --out " + copy);
  CHECK_MESSAGE(r.code == 0, r.err);
  CHECK(r.err.find("nothing to resume") != std::string::npos);
  CHECK(file_bytes_equal(copy, w.float_model));
  // A corrupt number in the metadata is a clear error, not an internal one.
  StFile bad = load_safetensors(w.float_model);
  bad.metadata["epoch"] = "two";
  save_safetensors(copy, bad);
  check_fails(w.run("train", "--resume " + copy + " --epochs 3 --out " + w.dir / "d.safetensors"),
              "metadata 'epoch' = 'two' is not a whole number");
}

TEST_CASE("QAT resume: --qat-epochs 1 + --resume to 2 equals --qat-epochs 2 straight, bit for bit") {
  // The observers keep observing through both QAT epochs (freezing at the end of the plan), so the
  // resumed run continues from the observers' saved statistics, not from fresh ones. convbn has
  // BatchNorm blocks and the default moving-average observer; mlp runs with the histogram observer.
  auto& w = workspace();
  for (const std::string flags : {"--model convbn --observer ema", "--model mlp --observer percentile"}) {
    CAPTURE(flags);
    const std::string straight = w.dir / "qat-straight.safetensors", half = w.dir / "qat-half.safetensors",
                      resumed = w.dir / "qat-resumed.safetensors";
    const std::string common = flags +
                               " --epochs 1 --qat --threads 1 --batch-size 128 --freeze-bn-after 1 "
                               "--freeze-observers-after 1 ";
    const Run s = w.run("train", common + "--qat-epochs 2 --out " + straight);
    REQUIRE_MESSAGE(s.code == 0, s.err);
    REQUIRE(w.run("train", common + "--qat-epochs 1 --out " + half).code == 0);
    CHECK(load_safetensors(half).find("qat_state.layers.0.fq.observer") != nullptr);
    const Run r = w.run("train", common + "--qat-epochs 2 --resume " + half + " --out " + resumed);
    REQUIRE_MESSAGE(r.code == 0, r.err);
    const StFile a = load_safetensors(straight), b = load_safetensors(resumed);
    REQUIRE(a.tensors.size() == b.tensors.size());
    for (size_t i = 0; i < a.tensors.size(); ++i) {
      CAPTURE(a.tensors[i].first);
      CHECK(a.tensors[i].first == b.tensors[i].first);
      CHECK(a.tensors[i].second.shape == b.tensors[i].second.shape);
      CHECK(a.tensors[i].second.bytes == b.tensors[i].second.bytes);
    }
    // the same report (the float accuracy before QAT comes from the checkpoint) and the same integer model
    CHECK(r.out.substr(0, r.out.find("wrote")) == s.out.substr(0, s.out.find("wrote")));
    CHECK(data_fixtures::read_bytes(w.dir / "qat-straight.int8.safetensors") ==
          data_fixtures::read_bytes(w.dir / "qat-resumed.int8.safetensors"));
  }
}

// ---------------------------------------------------------------------------------------------
// bad input: one clear line on stderr, a non-zero exit, no output file

TEST_CASE("bad data folders") {
  auto& w = workspace();
  const std::string out = w.dir / "bad.safetensors";
  auto train_on = [&](const std::string& dir) {
    return w.run("train", "--model mlp --epochs 1 --data " + dir + " --out " + out);
  };

  check_fails(train_on(w.dir / "no-such-folder"), "does not exist");

  std::string dir = copy_of_data("missing");
  fs::remove(file_in(dir, "t10k", "labels"));
  check_fails(train_on(dir), "has no test labels file");

  dir = copy_of_data("magic");
  auto bytes = data_fixtures::read_bytes(file_in(dir, "train", "images"));
  bytes[3] = 0x01;
  data_fixtures::write_bytes(file_in(dir, "train", "images"), bytes);
  check_fails(train_on(dir), "magic");

  dir = copy_of_data("truncated");
  truncate_file(file_in(dir, "train", "images"), 16 + 100 * kSide * kSide);
  check_fails(train_on(dir), "is truncated");

  dir = copy_of_data("mismatch");
  data_fixtures::write_bytes(file_in(dir, "t10k", "labels"),
                             data_fixtures::idx_labels_bytes(std::vector<uint8_t>(kTestImages - 1, 0)));
  check_fails(train_on(dir), "images and labels disagree");
  check_fails(w.run("eval", "--model " + w.float_model + " --data " + dir), "images and labels disagree");

  CHECK_FALSE(fs::exists(out));
}

TEST_CASE("bad model files") {
  auto& w = workspace();
  check_fails(w.run("eval", "--model " + w.dir / "no-such.safetensors"), "does not exist");

  const std::string truncated = w.dir / "truncated.safetensors";
  fs::copy_file(w.float_model, truncated, fs::copy_options::overwrite_existing);
  truncate_file(truncated, fs::file_size(truncated) / 2);
  check_fails(w.run("eval", "--model " + truncated), truncated);

  const std::string garbage = w.dir / "garbage.safetensors";
  data_fixtures::write_bytes(garbage, std::vector<uint8_t>(4096, 0xAB));
  check_fails(w.run("eval", "--model " + garbage), garbage);

  // The mlp's tensors under lenet5's description: the weights do not fit the model.
  StFile other = load_safetensors(w.float_model);
  other.metadata["description"] =
      nn::description_to_json(nn::with_data_shape(nn::builtin_description("lenet5"), 1, 28, 28, 10));
  const std::string relabelled = w.dir / "relabelled.safetensors";
  save_safetensors(relabelled, other);
  check_fails(w.run("eval", "--model " + relabelled), relabelled);
  check_fails(w.run("quantize", "--model " + relabelled), relabelled);
  CHECK_FALSE(fs::exists(w.dir / "relabelled.int8.safetensors"));

  // A description that is not valid JSON, or names an unknown kind.
  other.metadata["description"] = "{\"format\": ";
  save_safetensors(relabelled, other);
  check_fails(w.run("eval", "--model " + relabelled), "its 'description' metadata: not valid JSON");
  other.metadata["description"] =
      nn::description_to_json(nn::with_data_shape(nn::builtin_description("mlp"), 1, 28, 28, 10));
  other.metadata["description"].replace(other.metadata["description"].find("\"Linear\""), 8, "\"Lineal\"");
  save_safetensors(relabelled, other);
  check_fails(w.run("eval", "--model " + relabelled), "unknown kind 'Lineal'");
}

TEST_CASE("bad flags") {
  auto& w = workspace();
  const std::string out = w.dir / "flags.safetensors";
  check_fails(w.run("train", "--model resnet --out " + out), "resnet");
  check_fails(w.run("train", "--model mlp --epochs 0 --out " + out), "--epochs must be >= 1");
  check_fails(w.run("train", "--model mlp --epochs -1 --out " + out), "--epochs must be >= 1");
  check_fails(w.run("train", "--model mlp --lr 0 --out " + out), "--lr must be > 0");
  check_fails(w.run("train", "--model mlp --batch-size 0 --out " + out), "--batch-size must be >= 1");
  check_fails(w.run("train", "--model mlp --out " + w.dir / "no-such-folder/x.safetensors"), "does not exist");
  CHECK_FALSE(fs::exists(out));

  // CLI11 checks: the message line, then its "Run with --help" hint.
  check_fails(w.run("eval", "--model " + w.float_model + " --batch-size 0"), "--help", false);
  CHECK(w.run("eval", "--model " + w.float_model + " --batch-size 0").err.find("--batch-size") != std::string::npos);
  CHECK(w.run("eval", "--model " + w.float_model + " --int8 --calib 0").code != 0);
  CHECK(w.run("eval", "--model " + w.float_model + " --int8 --int4").code != 0);
  CHECK(w.run("quantize", "--model " + w.float_model + " --calib 0").code != 0);
}

TEST_CASE("a diverging run stops with the epoch and batch, and leaves no checkpoint") {
  auto& w = workspace();
  const std::string out = w.dir / "nan.safetensors";
  const Run r = w.run("train", "--model mlp --epochs 1 --optimizer sgd --lr 1e30 --out " + out);
  check_fails(r, "loss became", false);
  CHECK(r.last_err_line().find("epoch 1, batch") != std::string::npos);
  CHECK_FALSE(fs::exists(out));
}
