// End-to-end tests of inspect: the HTML report, its JSON twin, --layer and --sweep, the error
// paths, and (when Chromium is installed) the page rendered in headless Chromium.
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <sys/wait.h>
#include <zlib.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>

#include "apps/common.h"
#include "data_fixtures.h"
#include "quant/analysis.h"
#include "quant/convert.h"

using namespace lowbit;
using data_fixtures::TempDir;
namespace fs = std::filesystem;

namespace {

constexpr int kBlocks = 5;               // lenet5: 2 convs + 3 linears
constexpr int kSweepPoints = 13;         // 8, 6, 4, 3, 2 bits: weights only, activations only, both (w8a8 once)
constexpr int64_t kStatsImages = 50;     // --calib of the tests: every calibration image is in the histograms
constexpr double kMinNonWhite = 0.02;    // fraction of screenshot pixels that must be drawn
constexpr int64_t kMinBarPixels = 500;   // pixels of the histogram bar colour (#4a78b0) in the screenshot
constexpr int64_t kMinSkipPixels = 200;  // pixels of the residual-edge colour (#c2185b) in resnet8's screenshot
constexpr int kResnet8Blocks = 10;       // resnet8: 7 convs with BatchNorm, 2 shortcut convs without, 1 linear
constexpr int kResnet8BatchNorms = 7;
constexpr int kResnet8Skips = 3;  // edges that skip a row of the drawn graph: one per residual block
const char* const kChromium = "/usr/bin/chromium";

struct Run {
  int code = 0;
  std::string out, err;
  int err_lines() const { return static_cast<int>(std::count(err.begin(), err.end(), '\n')); }
};

std::string text_of(const std::string& path) {
  const auto bytes = data_fixtures::read_bytes(path);
  return {bytes.begin(), bytes.end()};
}

size_t count_of(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

Run shell(const std::string& cmd, const std::string& dir) {
  const std::string out = dir + "/stdout.txt", err = dir + "/stderr.txt";
  const int status = std::system((cmd + " >" + out + " 2>" + err).c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128, text_of(out), text_of(err)};
}

// One generated data set, one lenet5 trained for an epoch plus an epoch of QAT (which also leaves
// the float checkpoint next to the QAT one), and its training log.
struct Workspace {
  TempDir dir{"inspect"};
  std::string data = dir / "data";
  std::string qat_model = dir / "lenet5.qat.safetensors";
  std::string float_model = dir / "lenet5.qat.fp32.safetensors";
  std::string log = dir / "train.jsonl";
  std::string resnet8 = dir / "resnet8.qat.safetensors";  // a dry run: 3 batches float, 3 of QAT
  std::string custom = dir / "custom.safetensors";        // a description of its own, saved without metadata norms

  Workspace() {
    fs::create_directories(data);
    data_fixtures::write_mnist_folder(data,
                                      {.train_count = 200, .test_count = 60, .rows = 28, .cols = 28, .gzip = false});
    const Run r =
        run("train", "--model lenet5 --epochs 1 --qat --qat-epochs 1 --threads 2 --log " + log + " --out " + qat_model);
    REQUIRE_MESSAGE(r.code == 0, r.err);
    const Run res = run("train", "--model resnet8 --dry-run --qat --threads 2 --out " + resnet8);
    REQUIRE_MESSAGE(res.code == 0, res.err);
  }

  Run run(const std::string& program, const std::string& args) const {
    const std::string data_flag = args.find("--data") == std::string::npos ? " --data " + data : "";
    return shell(std::string(LOWBIT_BIN_DIR) + "/" + program + " " + args + data_flag, dir.str());
  }
  Run inspect(const std::string& args) const { return run("inspect", "--threads 2 --calib 50 --images 40 " + args); }
};

// A residual net with a depthwise convolution, as a user would describe it, as a float checkpoint written
// the way one's own program writes it: nn::save_checkpoint with the description but no normalisation.
const char* const kCustomDescription = R"({
  "format": "lowbit-model", "version": 1, "name": "my-net",
  "input": {"channels": 1, "height": 28, "width": 28}, "classes": 10,
  "nodes": [
    {"name": "stem", "kind": "Conv2d", "out_channels": 8, "kernel": 3, "padding": 1, "stride": 2},
    {"name": "stem_relu", "kind": "ReLU6"},
    {"name": "dw", "kind": "Conv2d", "out_channels": 8, "kernel": 3, "padding": 1, "groups": 8},
    {"name": "add", "kind": "Add", "inputs": ["dw", "stem_relu"]},
    {"name": "cat", "kind": "Concat", "inputs": ["add", "stem_relu"]},
    {"name": "pool", "kind": "GlobalAvgPool2d"},
    {"name": "flatten", "kind": "Flatten"},
    {"name": "fc", "kind": "Linear", "out_features": "classes"}
  ]
})";

Workspace& workspace() {
  static Workspace w;
  return w;
}

void check_fails(const Run& r, const std::string& phrase) {
  CHECK_MESSAGE(r.code != 0, r.out);
  CHECK_MESSAGE(r.err.find(phrase) != std::string::npos, "stderr: ", r.err, "\nexpected: ", phrase);
  CHECK_MESSAGE(r.err_lines() == 1, "stderr: ", r.err);
}

// No report and no temporary file of one in the folder.
void check_no_report(const std::string& dir) {
  for (const auto& entry : fs::directory_iterator(dir))
    CHECK_MESSAGE(entry.path().string().find(".html") == std::string::npos, "left behind: ", entry.path());
}

// ---- a small PNG reader (8-bit RGB or RGBA, no interlace): what Chromium's screenshots are

struct Image {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;  // (height, width, 3)
};

uint32_t be32(const std::vector<uint8_t>& b, size_t at) {
  return (uint32_t{b[at]} << 24) | (uint32_t{b[at + 1]} << 16) | (uint32_t{b[at + 2]} << 8) | b[at + 3];
}

Image read_png(const std::string& path) {
  const std::vector<uint8_t> b = data_fixtures::read_bytes(path);
  REQUIRE_MESSAGE(b.size() > 33, path, " is too short to be a PNG");
  REQUIRE(std::equal(b.begin() + 1, b.begin() + 4, "PNG"));
  Image img;
  int channels = 0;
  std::vector<uint8_t> compressed;
  for (size_t at = 8; at + 8 <= b.size();) {
    const uint32_t length = be32(b, at);
    const std::string type(b.begin() + static_cast<long>(at) + 4, b.begin() + static_cast<long>(at) + 8);
    REQUIRE(at + 12 + length <= b.size());
    if (type == "IHDR") {
      img.width = be32(b, at + 8), img.height = be32(b, at + 12);
      REQUIRE_MESSAGE(b[at + 16] == 8, "bit depth ", int{b[at + 16]});
      REQUIRE_MESSAGE((b[at + 17] == 2 || b[at + 17] == 6), "colour type ", int{b[at + 17]});
      REQUIRE(b[at + 20] == 0);  // no interlace
      channels = b[at + 17] == 2 ? 3 : 4;
    }
    if (type == "IDAT")
      compressed.insert(compressed.end(), b.begin() + static_cast<long>(at) + 8,
                        b.begin() + static_cast<long>(at + 8 + length));
    at += 12 + length;
  }
  const auto stride = static_cast<size_t>(img.width * channels);
  std::vector<uint8_t> raw(static_cast<size_t>(img.height) * (stride + 1));
  uLongf raw_size = raw.size();
  REQUIRE(uncompress(raw.data(), &raw_size, compressed.data(), compressed.size()) == Z_OK);
  REQUIRE(raw_size == raw.size());
  // Undo the per-row filters (PNG spec 9.2): None, Sub, Up, Average, Paeth.
  std::vector<uint8_t> pixels(static_cast<size_t>(img.height) * stride), zero(stride, 0);
  for (size_t y = 0; y < static_cast<size_t>(img.height); ++y) {
    const uint8_t filter = raw[y * (stride + 1)];
    const uint8_t* in = raw.data() + y * (stride + 1) + 1;
    uint8_t* row = pixels.data() + y * stride;
    const uint8_t* up = y ? row - stride : zero.data();
    for (size_t i = 0; i < stride; ++i) {
      const int a = i >= static_cast<size_t>(channels) ? row[i - channels] : 0, u = up[i];
      const int c = i >= static_cast<size_t>(channels) ? up[i - channels] : 0;
      const int p = a + u - c, pa = std::abs(p - a), pb = std::abs(p - u), pc = std::abs(p - c);
      const int paeth = pa <= pb && pa <= pc ? a : pb <= pc ? u : c;
      const int predictor = filter == 0 ? 0 : filter == 1 ? a : filter == 2 ? u : filter == 3 ? (a + u) / 2 : paeth;
      row[i] = static_cast<uint8_t>(in[i] + predictor);
    }
  }
  for (size_t i = 0; i < pixels.size(); i += static_cast<size_t>(channels))
    img.rgb.insert(img.rgb.end(), pixels.begin() + static_cast<long>(i), pixels.begin() + static_cast<long>(i) + 3);
  return img;
}

// Loads `html` in headless Chromium, screenshots it; returns Chromium's run (stderr holds the console log).
Run chromium_screenshot(const std::string& html, const std::string& png, const std::string& dir) {
  return shell(fmt::format("{} --headless --no-sandbox --disable-gpu --hide-scrollbars --enable-logging=stderr --v=0 "
                           "--user-data-dir={}/chromium-profile --screenshot={} --window-size=1200,3000 file://{}",
                           kChromium, dir, png, html),
               dir);
}

// Console messages Chromium logged for the page ("...:INFO:CONSOLE(3)] "Uncaught ReferenceError: ...").
std::vector<std::string> console_lines(const std::string& err) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < err.size()) {
    const size_t end = std::min(err.find('\n', start), err.size());
    const std::string line = err.substr(start, end - start);
    if (line.find(":CONSOLE") != std::string::npos || line.find("Failed to load resource") != std::string::npos)
      out.push_back(line);
    start = end + 1;
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// the analysis behind the report

TEST_CASE("histogram_of: equal-width bins, values outside the range in the end bins") {
  const std::vector<float> values{-1.f, -0.5f, 0.f, 0.5f, 1.f, 5.f, -7.f};
  const quant::Histogram h = quant::histogram_of(values, -1.f, 1.f, 4);
  CHECK(h.bin_width() == doctest::Approx(0.5));
  CHECK(h.counts == std::vector<int64_t>{2, 1, 1, 3});  // -7 and -1 | -0.5 | 0 | 0.5, 1 and 5
}

TEST_CASE("clipping_range: the real values of qmin and qmax, r = s·(q − z)") {
  const auto [lo, hi] = quant::clipping_range({0.1f, -128}, quant::activation_range(8));
  CHECK(lo == doctest::Approx(0.0));
  CHECK(hi == doctest::Approx(25.5));
  const auto [wlo, whi] = quant::clipping_range({0.01f, 0}, quant::weight_range(4));
  CHECK(wlo == doctest::Approx(-0.07));
  CHECK(whi == doctest::Approx(0.07));
}

TEST_CASE("weight_sqnr_db: about 6 dB more per bit") {
  Rng rng(5);
  const Tensor w = Tensor::randn({16, 64}, rng);
  for (int bits = 3; bits < 8; ++bits) {
    CAPTURE(bits);
    const double gain = quant::weight_sqnr_db(w, bits + 1) - quant::weight_sqnr_db(w, bits);
    CHECK(gain > 5.0);
    CHECK(gain < 7.5);
  }
}

TEST_CASE("float_model_of: the float parameters and BatchNorm statistics come back out of a QAT model") {
  manual_seed(3);
  auto model = nn::build_model("convbn");
  for (auto& [name, t] : model->named_buffers())  // non-trivial running statistics
    for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] += 0.25f * static_cast<float>(i % 5);
  const auto qat = quant::prepare_qat(*model, quant::QConfig{});
  const auto back = quant::float_model_of(*qat);
  auto want = model->named_parameters(), got = back->named_parameters();
  const auto want_b = model->named_buffers(), got_b = back->named_buffers();
  want.insert(want.end(), want_b.begin(), want_b.end());
  got.insert(got.end(), got_b.begin(), got_b.end());
  REQUIRE(want.size() == got.size());
  for (size_t k = 0; k < want.size(); ++k) {
    CAPTURE(want[k].first);
    CHECK(got[k].first == want[k].first);
    CHECK(std::equal(want[k].second.data(), want[k].second.data() + want[k].second.numel(), got[k].second.data()));
  }
}

TEST_CASE("quant::calibrate: observes at most max_batches batches, then fake-quantizes; no batch is an error") {
  // Batch 0 holds values in [-1, 1], batch 1 values up to 10: the input's min/max range shows which were seen.
  Tensor small = Tensor::full({4, 1, 28, 28}, 1.f), large = Tensor::full({4, 1, 28, 28}, 10.f);
  for (int64_t i = 0; i < small.numel(); i += 2) small.data()[i] = -1.f;
  for (int64_t i = 0; i < large.numel(); i += 2) large.data()[i] = -1.f;
  auto source = [&](std::vector<Tensor> batches) {
    return
        [batches, next = size_t{0}](Tensor& x) mutable { return next < batches.size() && (x = batches[next++], true); };
  };
  quant::QConfig config;
  config.activation_observer = quant::ObserverKind::MinMax;
  auto model = nn::build_model("mlp");
  const float levels = 255.f;  // 8-bit activation codes [-128, 127]

  auto first_only = quant::prepare_qat(*model, config);
  CHECK(quant::calibrate(*first_only, source({small, large}), 1) == 4);
  const auto& input_fq = *first_only->nodes[0].module->output_quant();
  CHECK(input_fq.qparams_per_tensor().scale == doctest::Approx(2.f / levels));
  CHECK(input_fq.fake_quant_enabled);

  auto both = quant::prepare_qat(*model, config);
  CHECK(quant::calibrate(*both, source({small, large})) == 8);  // 0: every batch
  CHECK(both->nodes[0].module->output_quant()->qparams_per_tensor().scale == doctest::Approx(11.f / levels));

  auto none = quant::prepare_qat(*model, config);
  CHECK_THROWS_WITH_AS(quant::calibrate(*none, source({})), doctest::Contains("no calibration images"), Error);
}

TEST_CASE("normalised_batches: the statistics batches are the first images in order, each batch its own") {
  // 600 images whose pixels all equal (index mod 251), so every image of the first 500 is told apart
  // from the 250 before and after it; inspect takes 500 images in batches of 250.
  constexpr int64_t kImages = 600, kTaken = 500, kBatch = 250, kSide = 4;
  data::Dataset set{{kImages, kSide, kSide, {}}, std::vector<uint8_t>(kImages, 0)};
  for (int64_t i = 0; i < kImages; ++i)
    set.images.pixels.insert(set.images.pixels.end(), kSide * kSide, static_cast<uint8_t>(i % 251));
  const Normalization norm{0.25f, 0.5f};

  const std::vector<Tensor> batches = apps::normalised_batches(set, norm, kTaken, kBatch);
  REQUIRE(batches.size() == 2);
  for (int64_t b = 0; b < 2; ++b) {
    REQUIRE(batches[b].shape() == Shape{kBatch, 1, kSide, kSide});
    for (int64_t k = 0; k < kBatch; ++k) {
      const int64_t image = b * kBatch + k;
      const float want = normalize_pixel(static_cast<uint8_t>(image % 251), norm);
      const float* got = batches[b].data() + k * kSide * kSide;
      CAPTURE(b);
      CAPTURE(image);
      REQUIRE(std::all_of(got, got + kSide * kSide, [&](float v) { return v == want; }));
    }
  }
  CHECK(batches[0].data() != batches[1].data());  // two storages, not one overwritten twice

  // fewer images than asked: all of them, the last batch smaller
  const auto all = apps::normalised_batches(data::first_images(set, 260), norm, kTaken, kBatch);
  REQUIRE(all.size() == 2);
  CHECK(all[1].shape() == Shape{10, 1, kSide, kSide});
  CHECK(all[1].data()[0] == normalize_pixel(250, norm));
}

// ---------------------------------------------------------------------------------------------
// the report

TEST_CASE("report of a float checkpoint: a self-contained page with two histograms per layer, and the JSON twin") {
  auto& w = workspace();
  const std::string out = w.dir / "float.html";
  const Run r = w.inspect("--model " + w.float_model + " --log " + w.log + " --out " + out + " --json");
  REQUIRE_MESSAGE(r.code == 0, r.err);
  const auto j = nlohmann::json::parse(r.out);

  const std::string html = text_of(out);
  CHECK(html.starts_with("<!DOCTYPE html>"));
  CHECK(html.find("</html>") != std::string::npos);
  CHECK(count_of(html, "http") == 0);  // no external stylesheet, font, script or image
  CHECK(count_of(html, "src=") == 0);
  CHECK(count_of(html, "<script") == 0);
  CHECK(count_of(html, "<svg class=\"hist\"") == 2 * kBlocks);
  CHECK(count_of(html, "<svg class=\"plot\"") == 3);       // accuracy vs bits, loss, accuracy curves
  CHECK(count_of(html, "class=\"clip\"") == 4 * kBlocks);  // two lines per histogram

  CHECK(j["kind"] == "float");
  CHECK(j["mode"] == "int8");
  CHECK(j["out"] == out);
  REQUIRE(j["layers"].size() == kBlocks);
  const std::vector<std::string> names{"layers.0", "layers.3", "layers.7", "layers.9", "layers.11"};
  const std::vector<int64_t> weights{6 * 25, 16 * 6 * 25, 120 * 400, 84 * 120, 10 * 84};
  const std::vector<int64_t> channels{6, 16, 120, 84, 10};
  const std::vector<int64_t> outputs{6 * 28 * 28, 16 * 10 * 10, 120, 84, 10};
  for (size_t b = 0; b < kBlocks; ++b) {
    const auto& l = j["layers"][b];
    CAPTURE(b);
    CHECK(l["layer"] == names[b]);
    const auto wc = l["weight_histogram"]["counts"].get<std::vector<int64_t>>();
    const auto ac = l["activation_histogram"]["counts"].get<std::vector<int64_t>>();
    CHECK(std::accumulate(wc.begin(), wc.end(), int64_t{0}) == weights[b]);
    CHECK(std::accumulate(ac.begin(), ac.end(), int64_t{0}) == kStatsImages * outputs[b]);
    // The clipping range covers the weights (min/max observer); 8-bit weights keep > 30 dB.
    CHECK(l["weight_clip"][0].get<double>() <= l["weight_range"][0].get<double>() + 1e-6);
    CHECK(l["weight_clip"][1].get<double>() >= l["weight_range"][1].get<double>() - 1e-6);
    CHECK(l["weight_sqnr_db"].get<double>() > 30);
    CHECK(l["activation_sqnr_db"].get<double>() > 20);
    CHECK(l["weight_scales"].size() == static_cast<size_t>(channels[b]));
  }
  CHECK(j["bit_width_sweep"].size() == kSweepPoints);
  CHECK(j["sensitivity"]["layers"].size() == kBlocks);
  CHECK(j["sensitivity"]["low_bits"] == 4);
  REQUIRE(j["agreement"].is_number());
  CHECK(j["agreement"].get<double>() >= 0.95);
  CHECK(j["int_accuracy"].is_number());
  REQUIRE(j["training_log"].size() == 2);  // one fp32 epoch, one QAT epoch
  CHECK(j["training_log"][0]["phase"] == "fp32");
  CHECK(j["training_log"][1]["phase"] == "qat");
}

TEST_CASE("report of a QAT checkpoint: its own bit widths; text output names every layer") {
  auto& w = workspace();
  const std::string out = w.dir / "qat.html";
  const Run r = w.inspect("--model " + w.qat_model + " --out " + out);
  REQUIRE_MESSAGE(r.code == 0, r.err);
  CHECK(r.out.find("lenet5 qat checkpoint quantized as int8") != std::string::npos);
  for (const char* layer : {"layers.0", "layers.3", "layers.7", "layers.9", "layers.11"})
    CHECK(r.out.find(layer) != std::string::npos);
  CHECK(r.out.find("wrote " + out) != std::string::npos);
  const std::string html = text_of(out);
  CHECK(count_of(html, "<svg class=\"hist\"") == 2 * kBlocks);
  CHECK(html.find("No training log given") != std::string::npos);
}

TEST_CASE("a bit width without an integer kernel still gets a report, with the reason instead of the agreement") {
  auto& w = workspace();
  const std::string out = w.dir / "w6.html";
  const Run r = w.inspect("--model " + w.float_model + " --bits w6a6 --out " + out + " --json");
  REQUIRE_MESSAGE(r.code == 0, r.err);
  const auto j = nlohmann::json::parse(r.out);
  CHECK(j["mode"] == "w6a6");
  CHECK(j["agreement"].is_null());
  CHECK(j["layers"][0]["weight_bits"] == 6);
  CHECK(text_of(out).find("No integer graph") != std::string::npos);
}

TEST_CASE("--layer walks one layer through quantization; --sweep prints accuracy against bit width") {
  auto& w = workspace();
  const Run layer = w.inspect("--model " + w.float_model + " --layer layers.3 --out " + (w.dir / "none.html"));
  REQUIRE_MESSAGE(layer.code == 0, layer.err);
  CHECK(layer.out.starts_with("layers.3  Q[Conv2d"));
  CHECK(layer.out.find("weights: 2400 values in 16 output channels") != std::string::npos);
  CHECK(layer.out.find("weight SQNR at 8 bits") != std::string::npos);
  CHECK(layer.out.find("output SQNR at 8 bits") != std::string::npos);
  CHECK_FALSE(fs::exists(w.dir / "none.html"));  // --layer only prints

  const Run sweep = w.inspect("--model " + w.float_model + " --sweep");
  REQUIRE_MESSAGE(sweep.code == 0, sweep.err);
  CHECK(sweep.out.starts_with("PTQ accuracy against bit width"));
  for (const char* row : {"\n     8 ", "\n     6 ", "\n     4 ", "\n     3 ", "\n     2 "})
    CHECK(sweep.out.find(row) != std::string::npos);
}

TEST_CASE("lenet5 report: y-axis values, per-channel weight ranges, true labels, lines that do not hide") {
  auto& w = workspace();
  const std::string out = w.dir / "labels.html";
  const Run r = w.inspect("--model " + w.float_model + " --out " + out);
  REQUIRE_MESSAGE(r.code == 0, r.err);
  const std::string html = text_of(out);
  // Every histogram has count labels on its y axis (0 and at least the tallest bar's count).
  CHECK(count_of(html, "class=\"tick count\" text-anchor=\"end\">0</text>") == 2 * kBlocks);
  CHECK(count_of(html, "class=\"tick count\"") >= 2 * 2 * kBlocks);  // 0 and the tallest bar, at least
  CHECK(count_of(html, "count (log scale)") == 2 * kBlocks);
  // One per-channel plot per weighted layer; a bar and two clamp ticks per output channel (6+16+120+84+10).
  CHECK(count_of(html, "<svg class=\"channels\"") == kBlocks);
  CHECK(count_of(html, "class=\"chrange\"") == 236);
  CHECK(count_of(html, "class=\"chclamp\"") == 2 * 236);
  // lenet5 has no BatchNorm: no label may say one was folded.
  CHECK(count_of(html, "BatchNorm folded") == 0);
  // The three bit-width curves: drawn widest first ("both"), then narrower ones on top.
  const size_t both = html.find("polyline class=\"line s2\""), acts = html.find("polyline class=\"line s1\""),
               weights = html.find("polyline class=\"line s0\"");
  REQUIRE(both != std::string::npos);
  CHECK(both < acts);
  CHECK(acts < weights);
  CHECK(html.find("stroke-width=\"7\"", both) < acts);
  CHECK(html.find("stroke-dasharray=\"6 4\"", weights) != std::string::npos);
}

// Compares every row of the report's node table (inspect --json "nodes") with the integer graph convert
// makes from the same checkpoint: one row per op, same names and inputs, same output scale, zero point and
// clamp codes, and per-channel weight scales that give the op's requantization scales.
void check_nodes_match_integer_graph(const nlohmann::json& nodes, const std::string& checkpoint) {
  const apps::LoadedModel m = apps::load_model_file(checkpoint);
  REQUIRE(m.qat_model);
  const auto& d = m.qat_model->description;
  const quant::IntModel im = quant::convert(*m.qat_model, m.norm, {d.channels, d.height, d.width});
  REQUIRE(nodes.size() == im.graph.ops.size());
  for (size_t i = 0; i < nodes.size(); ++i) {
    const auto& n = nodes[i];
    const auto& op = im.graph.ops[i];
    CAPTURE(op.name);
    CHECK(n["name"] == op.name);
    if (i > 0) CHECK(n["inputs"].get<std::vector<int>>() == op.inputs);
    CHECK(n["output"]["scales"][0].get<float>() == doctest::Approx(im.op_output_scales[i]).epsilon(1e-6));
    CHECK(n["output"]["zero_points"][0] == op.requant.zero_point);
    if (i > 0) {  // the Input op's table saturates at the full range
      CHECK(n["output"]["codes"][0] == op.requant.act_min);
      CHECK(n["output"]["codes"][1] == op.requant.act_max);
    }
    const double clipped = n["output"]["clipped_fraction"].get<double>();
    CHECK(clipped >= 0);
    CHECK(clipped <= 1);
    CHECK(n["output"]["values"].get<int64_t>() > 0);
    if (!n["weight"].is_null()) {
      REQUIRE(n["weight"]["scales"].size() == static_cast<size_t>(op.out_channels));
      CHECK(n["weight"]["bits"] == op.weight_bits);
      CHECK(n["weight"]["range"].size() == static_cast<size_t>(op.out_channels));  // per-channel min and max
      const float s_in = im.op_output_scales[static_cast<size_t>(op.inputs[0])];
      for (size_t c = 0; c < n["weight"]["scales"].size(); ++c)  // M[c] = s_in·s_w[c]/s_out
        CHECK(s_in * n["weight"]["scales"][c].get<float>() / im.op_output_scales[i] ==
              doctest::Approx(im.op_requant_scales[i][c]).epsilon(1e-5));
    }
  }
}

TEST_CASE("resnet8 report: the graph drawn with its residual edges, and every node of the integer graph in the table") {
  auto& w = workspace();
  const std::string out = w.dir / "resnet8.html";
  const Run r = w.inspect("--model " + w.resnet8 + " --out " + out + " --json");
  REQUIRE_MESSAGE(r.code == 0, r.err);
  const auto j = nlohmann::json::parse(r.out);
  CHECK(j["layers"].size() == kResnet8Blocks);
  check_nodes_match_integer_graph(j["nodes"], w.resnet8);

  // The residual Adds are rows of their own, with two inputs and qparams of their own.
  int adds = 0;
  for (const auto& n : j["nodes"]) {
    if (n["op"].get<std::string>().find("Add") == std::string::npos) continue;
    ++adds;
    CHECK(n["inputs"].size() == 2);
    CHECK(n["own_output_qparams"] == true);
    CHECK(n["weight"].is_null());
  }
  CHECK(adds == 3);

  const std::string html = text_of(out);
  CHECK(count_of(html, "<svg class=\"graph\"") == 1);
  CHECK(count_of(html, "<g class=\"node") == j["nodes"].size());
  CHECK(count_of(html, "class=\"edge skip\"") == kResnet8Skips);
  CHECK(count_of(html, "<table class=\"nodes\">") == 1);
  CHECK(html.find("b1_add + b1_relu") != std::string::npos);
  // "BatchNorm folded" only on the 7 convs that had one, in the histogram title and the per-channel plot.
  CHECK(count_of(html, "weights (BatchNorm folded)") == 2 * kResnet8BatchNorms);
  CHECK(count_of(html, "<svg class=\"channels\"") == kResnet8Blocks);
}

TEST_CASE("a model of one's own: a custom description saved without normalisation metadata") {
  auto& w = workspace();
  manual_seed(4);
  const nn::Description d = nn::parse_description(kCustomDescription, "test_inspect.cpp");
  auto model = nn::build_model(d);
  nn::save_checkpoint(w.custom, *model, {{"description", nn::description_to_json(d)}});

  const std::string out = w.dir / "custom.html";
  const Run r = w.inspect("--model " + w.custom + " --out " + out + " --json");
  REQUIRE_MESSAGE(r.code == 0, r.err);
  CHECK(r.err.find("no 'norm_mean'/'norm_std' metadata; assuming") != std::string::npos);
  const auto j = nlohmann::json::parse(r.out);
  CHECK(j["architecture"] == "my-net");
  CHECK(j["kind"] == "float");
  // input, stem + stem_relu, dw, add, cat, pool, flatten, fc: every op, the Concat's two inputs named.
  const std::vector<std::string> names{"input", "stem + stem_relu", "dw", "add", "cat", "pool", "flatten", "fc"};
  REQUIRE(j["nodes"].size() == names.size());
  for (size_t i = 0; i < names.size(); ++i) CHECK(j["nodes"][i]["name"] == names[i]);
  CHECK(j["nodes"][4]["inputs"] == nlohmann::json::array({3, 1}));
  CHECK(j["nodes"][1]["output"]["codes"][0].get<int>() == j["nodes"][1]["output"]["zero_points"][0].get<int>());
  CHECK(text_of(out).find("BatchNorm folded") == std::string::npos);

  const Run q = w.run("quantize", "--model " + w.custom + " --calib 50 --out " + (w.dir / "custom.int8.safetensors"));
  CHECK_MESSAGE(q.code == 0, q.err);
}

// ---------------------------------------------------------------------------------------------
// bad input: one clear line, non-zero exit, no report

TEST_CASE("bad input: missing files, a malformed log line, an integer model, an unknown layer") {
  auto& w = workspace();
  const TempDir out_dir{"inspect_bad"};
  const std::string out = out_dir / "report.html";

  check_fails(w.inspect("--model " + (w.dir / "missing.safetensors") + " --out " + out), "does not exist");
  check_fails(w.inspect("--model " + w.float_model + " --log " + (w.dir / "missing.jsonl") + " --out " + out),
              "missing.jsonl");

  const std::string bad_log = w.dir / "bad.jsonl";
  const std::string good_line = text_of(w.log).substr(0, text_of(w.log).find('\n') + 1);
  data_fixtures::write_bytes(bad_log, std::vector<uint8_t>(good_line.begin(), good_line.end()));
  {
    std::ofstream append(bad_log, std::ios::app);
    append << "{\"phase\": \"fp32\", \"epoch\": 2, \"train_loss\": \n";
  }
  check_fails(w.inspect("--model " + w.float_model + " --log " + bad_log + " --out " + out), bad_log + ":2:");

  const std::string missing_field = w.dir / "missing_field.jsonl";
  data_fixtures::write_bytes(missing_field,
                             std::vector<uint8_t>{'{', '"', 'e', 'p', 'o', 'c', 'h', '"', ':', '1', '}', '\n'});
  check_fails(w.inspect("--model " + w.float_model + " --log " + missing_field + " --out " + out), "phase");

  const Run q = w.run("quantize", "--model " + w.float_model + " --calib 50 --out " + (w.dir / "int8.safetensors"));
  REQUIRE_MESSAGE(q.code == 0, q.err);
  check_fails(w.inspect("--model " + (w.dir / "int8.safetensors") + " --out " + out), "integer model");

  check_fails(w.inspect("--model " + w.float_model + " --layer layers.1"), "choose one of: layers.0, layers.3");
  check_fails(w.inspect("--model " + w.float_model + " --out " + (w.dir / "no/such/folder/r.html")), "does not exist");
  check_no_report(out_dir.str());
}

// ---------------------------------------------------------------------------------------------
// the page in a real browser

TEST_CASE("headless Chromium: the report loads without console errors and its screenshot shows the plots") {
  if (!fs::exists(kChromium)) {
    MESSAGE("skipped: ", kChromium, " is not installed (apt-get install chromium)");
    return;
  }
  auto& w = workspace();
  const std::string html = w.dir / "browser.html";
  const Run r = w.inspect("--model " + w.float_model + " --log " + w.log + " --out " + html);
  REQUIRE_MESSAGE(r.code == 0, r.err);

  // The check itself catches errors: a page with a script error logs a console line.
  const std::string broken = w.dir / "broken.html";
  const std::string broken_text = "<!DOCTYPE html><html><body><script>no_such_function();</script></body></html>";
  data_fixtures::write_bytes(broken, std::vector<uint8_t>(broken_text.begin(), broken_text.end()));
  const Run b = chromium_screenshot(broken, w.dir / "broken.png", w.dir.str());
  CHECK_MESSAGE(!console_lines(b.err).empty(), "chromium did not report the broken page's error; stderr:\n", b.err);

  // A stable folder, so the screenshot outlives the test and can be looked at.
  const fs::path shots = fs::temp_directory_path() / "lowbit_inspect_screenshot";
  fs::create_directories(shots);
  const std::string png = (shots / "report.png").string();
  fs::remove(png);
  const Run c = chromium_screenshot(html, png, w.dir.str());
  REQUIRE_MESSAGE(c.code == 0, c.err);
  const auto console = console_lines(c.err);
  CHECK_MESSAGE(console.empty(), "console: ", console.empty() ? "" : console.front());
  REQUIRE(fs::exists(png));
  MESSAGE("screenshot of the inspect report: ", png);

  const Image img = read_png(png);
  CHECK(img.width == 1200);
  CHECK(img.height == 3000);
  int64_t non_white = 0, bar = 0;
  for (size_t i = 0; i < img.rgb.size(); i += 3) {
    const int red = img.rgb[i], green = img.rgb[i + 1], blue = img.rgb[i + 2];
    non_white += red < 245 || green < 245 || blue < 245;
    bar += std::abs(red - 0x4a) < 12 && std::abs(green - 0x78) < 12 && std::abs(blue - 0xb0) < 12;
  }
  const double pixels = static_cast<double>(img.width * img.height);
  CHECK_MESSAGE(static_cast<double>(non_white) / pixels > kMinNonWhite, "non-white pixels: ", non_white);
  CHECK_MESSAGE(bar > kMinBarPixels, "histogram-bar pixels: ", bar);
}

TEST_CASE("headless Chromium: resnet8's report loads without console errors and shows its graph's residual edges") {
  if (!fs::exists(kChromium)) {
    MESSAGE("skipped: ", kChromium, " is not installed (apt-get install chromium)");
    return;
  }
  auto& w = workspace();
  // The report the resnet8 test case wrote, when it ran (a report takes a while: one is enough).
  const std::string html = w.dir / "resnet8.html";
  if (!fs::exists(html)) {
    const Run r = w.inspect("--model " + w.resnet8 + " --out " + html);
    REQUIRE_MESSAGE(r.code == 0, r.err);
  }
  const fs::path shots = fs::temp_directory_path() / "lowbit_inspect_screenshot";
  fs::create_directories(shots);
  const std::string png = (shots / "report_resnet8.png").string();
  fs::remove(png);
  const Run c = chromium_screenshot(html, png, w.dir.str());
  REQUIRE_MESSAGE(c.code == 0, c.err);
  const auto console = console_lines(c.err);
  CHECK_MESSAGE(console.empty(), "console: ", console.empty() ? "" : console.front());
  REQUIRE(fs::exists(png));
  MESSAGE("screenshot of resnet8's inspect report: ", png);

  // The graph comes first in the page: its magenta residual edges are in the screenshot.
  const Image img = read_png(png);
  int64_t skip = 0;
  for (size_t i = 0; i < img.rgb.size(); i += 3)
    skip += std::abs(img.rgb[i] - 0xc2) < 12 && std::abs(img.rgb[i + 1] - 0x18) < 12 &&
            std::abs(img.rgb[i + 2] - 0x5b) < 12;
  CHECK_MESSAGE(skip > kMinSkipPixels, "residual-edge pixels: ", skip);
}
