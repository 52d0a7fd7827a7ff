// Tests for the observers: each one's proposed range on known data, state round trips, errors.
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "quant/observer.h"

using namespace lowbit;
using namespace lowbit::quant;

namespace {

constexpr float kEmaTolerance = 1e-6f;  // float rounding of three averaging steps
constexpr float kScaleTolerance = 1e-7f;
const QRange kInt8 = activation_range(8);  // [-128, 127]
const QRange kWeight8 = weight_range(8);   // [-127, 127]

Tensor vector_tensor(std::vector<float> values) {
  const auto n = static_cast<int64_t>(values.size());
  return Tensor::from({n}, std::move(values));
}

// 1,000,000 standard normal values, with one outlier at +50 and one at −50. One outlier per side
// costs its clipped distance squared; the million values inside pay step²/12 each, so the
// expected-MSE optimum clips hard (near ±14) and the 99.99th percentile sits near ±3.9.
Tensor normal_with_outliers() {
  Rng rng(7);
  std::vector<float> values(1'000'000);
  for (float& v : values) v = rng.normal();
  values[123] = 50.f;
  values[4567] = -50.f;
  return vector_tensor(std::move(values));
}

// The mean squared error of quantizing then dequantizing every value of x with p.
double quantization_mse(const Tensor& x, QParams p, QRange range) {
  double sum = 0;
  for (float v : x.values()) {
    const double d = static_cast<double>(v) - dequantize(quantize(v, p, range), p);
    sum += d * d;
  }
  return sum / static_cast<double>(x.numel());
}

std::string error_of(auto&& call) {
  try {
    call();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("expected a lowbit::Error");
  return "";
}

}  // namespace

TEST_CASE("minmax: the range is exactly the running min and max over all batches") {
  MinMaxObserver observer(kInt8);
  observer.observe(vector_tensor({0.5f, -1.25f, 2.f}));
  observer.observe(vector_tensor({3.75f, 0.f}));
  observer.observe(Tensor::from({2, 2}, {-0.5f, 1.f, 1.5f, -2.5f}));
  CHECK(observer.min() == -2.5f);  // min and max involve no arithmetic: exact
  CHECK(observer.max() == 3.75f);
  CHECK(observer.range() == std::pair{-2.5f, 3.75f});
  CHECK(observer.name() == "minmax");
  const QParams p = observer.qparams().at(0);
  const QParams expected = choose_qparams(-2.5f, 3.75f, kInt8, false);
  CHECK(p.scale == expected.scale);
  CHECK(p.zero_point == expected.zero_point);
}

TEST_CASE("ema: follows PyTorch's moving average over three batches") {
  MovingAverageMinMaxObserver observer(kInt8);         // c = 0.01
  observer.observe(vector_tensor({-1.f, 0.5f, 2.f}));  // first batch initialises: [-1, 2]
  CHECK(observer.range() == std::pair{-1.f, 2.f});
  observer.observe(vector_tensor({-3.f, 4.f}));  // min -1 + 0.01·(-3 + 1) = -1.02, max 2 + 0.01·(4 - 2) = 2.02
  CHECK(observer.min() == doctest::Approx(-1.02f).epsilon(kEmaTolerance));
  CHECK(observer.max() == doctest::Approx(2.02f).epsilon(kEmaTolerance));
  observer.observe(vector_tensor({0.f, 10.f}));  // min -1.02 + 0.01·1.02 = -1.0098, max 2.02 + 0.01·7.98 = 2.0998
  CHECK(observer.min() == doctest::Approx(-1.0098f).epsilon(kEmaTolerance));
  CHECK(observer.max() == doctest::Approx(2.0998f).epsilon(kEmaTolerance));
  CHECK(observer.name() == "ema");
  CHECK_THROWS_AS(MovingAverageMinMaxObserver(kInt8, false, 0.f), Error);
}

TEST_CASE("per-channel: one symmetric scale per row, zero point 0") {
  PerChannelMinMaxObserver observer(kWeight8);
  // row 0: max |w| 1.27 → scale 0.01; row 1: max |w| 2.54 → 0.02; row 2: all zero → kMinScale
  observer.observe(Tensor::from({3, 4}, {0.5f, -1.27f, 1.f, 0.f,  //
                                         2.54f, 1.f, -2.f, 0.1f,  //
                                         0.f, 0.f, 0.f, 0.f}));
  const std::vector<QParams> p = observer.qparams();
  REQUIRE(p.size() == 3);
  CHECK(p[0].scale == doctest::Approx(0.01f).epsilon(kScaleTolerance));
  CHECK(p[1].scale == doctest::Approx(0.02f).epsilon(kScaleTolerance));
  CHECK(p[2].scale == kMinScale);
  for (const QParams& q : p) CHECK(q.zero_point == 0);
  CHECK(observer.range() == std::pair{-2.f, 2.54f});
  CHECK(observer.name() == "minmax-per-channel");
  CHECK(error_of([&] { observer.observe(Tensor::zeros({4, 4})); }).find("4 channels") != std::string::npos);
}

TEST_CASE("percentile and mse clip outliers that minmax keeps, and mse quantizes the data better") {
  const Tensor x = normal_with_outliers();
  MinMaxObserver minmax(kInt8);
  HistogramObserver percentile(kInt8, false, HistogramObserver::Method::Percentile);
  HistogramObserver mse(kInt8, false, HistogramObserver::Method::Mse);
  for (Observer* o : std::vector<Observer*>{&minmax, &percentile, &mse}) o->observe(x);

  CHECK(minmax.range() == std::pair{-50.f, 50.f});
  const auto [p_lo, p_hi] = percentile.range();
  CHECK(p_lo > -5.f);
  CHECK(p_lo < -3.f);
  CHECK(p_hi > 3.f);
  CHECK(p_hi < 5.f);
  const auto [m_lo, m_hi] = mse.range();
  CHECK(m_hi - m_lo < 0.5f * 100.f);  // clearly narrower than minmax's 100
  CHECK(m_lo < -3.f);                 // but it does not clip the bulk of the data
  CHECK(m_hi > 3.f);

  const double minmax_error = quantization_mse(x, minmax.qparams().at(0), kInt8);
  const double mse_error = quantization_mse(x, mse.qparams().at(0), kInt8);
  INFO("quantization MSE: minmax ", minmax_error, ", mse ", mse_error, " with range [", m_lo, ", ", m_hi, "]");
  CHECK(mse_error < 0.5 * minmax_error);
  CHECK(percentile.name() == "percentile");
  CHECK(mse.name() == "mse");
}

TEST_CASE("histogram: growing the range re-bins the old counts and keeps the total") {
  HistogramObserver observer(kInt8);
  Rng rng(3);
  std::vector<float> first(1000), second(3000);
  for (float& v : first) v = rng.uniform(0.f, 1.f);
  for (float& v : second) v = rng.uniform(-5.f, 5.f);
  second[0] = -5.f;
  second[1] = 5.f;
  observer.observe(vector_tensor(first));
  observer.observe(vector_tensor(second));
  const Histogram& h = observer.histogram();
  int64_t total = 0, inside_unit = 0;
  const float width = h.bin_width();
  for (size_t k = 0; k < h.counts.size(); ++k) {
    total += h.counts[k];
    const float centre = h.lo + (static_cast<float>(k) + 0.5f) * width;
    if (centre > -0.01f && centre < 1.01f) inside_unit += h.counts[k];
  }
  CHECK(total == 4000);
  CHECK(h.lo == -5.f);
  CHECK(h.hi == 5.f);
  CHECK(h.counts.size() == static_cast<size_t>(HistogramObserver::kDefaultBins));
  CHECK(inside_unit >= 1000);  // the first batch stayed within [0, 1] after re-binning
}

TEST_CASE("histogram: a batch of equal values still gives a usable range") {
  HistogramObserver observer(kInt8);
  observer.observe(Tensor::zeros({16}));
  const QParams p = observer.qparams().at(0);
  CHECK(std::isfinite(p.scale));
  CHECK(p.scale > 0);
  CHECK(error_of([&] { observer.observe(vector_tensor({1.f, NAN})); }).find("NaN") != std::string::npos);
}

TEST_CASE("every observer refuses to propose parameters before it has seen data") {
  MinMaxObserver minmax(kInt8);
  MovingAverageMinMaxObserver ema(kInt8);
  PerChannelMinMaxObserver per_channel(kWeight8);
  HistogramObserver histogram(kInt8);
  for (Observer* o : std::vector<Observer*>{&minmax, &ema, &per_channel, &histogram}) {
    CHECK_FALSE(o->has_observed());
    CHECK(error_of([&] { o->qparams(); }) == "observer has seen no data (run calibration or a training step first)");
    CHECK_THROWS_AS(o->range(), Error);
    CHECK(o->state().empty());
  }
}

TEST_CASE("a NaN in the data makes minmax and ema qparams fail with choose_qparams' message") {
  MinMaxObserver minmax(kInt8);
  MovingAverageMinMaxObserver ema(kInt8);
  for (Observer* o : std::vector<Observer*>{&minmax, &ema}) {
    o->observe(vector_tensor({1.f, NAN, -1.f}));
    o->observe(vector_tensor({2.f}));
    CHECK(error_of([&] { o->qparams(); }).find("not finite") != std::string::npos);
  }
}

TEST_CASE("state and load_state round trip, and bad states are refused") {
  const Tensor x = Tensor::from({2, 3}, {0.1f, -0.7f, 0.3f, 2.f, -1.f, 0.5f});
  MinMaxObserver minmax(kInt8);
  MovingAverageMinMaxObserver ema(kInt8);
  PerChannelMinMaxObserver per_channel(kWeight8);
  HistogramObserver percentile(kInt8);
  HistogramObserver mse(kInt8, false, HistogramObserver::Method::Mse);
  MinMaxObserver minmax2(kInt8);
  MovingAverageMinMaxObserver ema2(kInt8);
  PerChannelMinMaxObserver per_channel2(kWeight8);
  HistogramObserver percentile2(kInt8);
  HistogramObserver mse2(kInt8, false, HistogramObserver::Method::Mse);
  const std::vector<std::pair<Observer*, Observer*>> pairs{
      {&minmax, &minmax2}, {&ema, &ema2}, {&per_channel, &per_channel2}, {&percentile, &percentile2}, {&mse, &mse2}};
  for (auto [saved, loaded] : pairs) {
    CAPTURE(saved->name());
    saved->observe(x);
    loaded->load_state(saved->state());
    CHECK(loaded->has_observed());
    CHECK(loaded->state() == saved->state());
    CHECK(loaded->range() == saved->range());
    const auto a = saved->qparams(), b = loaded->qparams();
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      CHECK(a[i].scale == b[i].scale);
      CHECK(a[i].zero_point == b[i].zero_point);
    }
    loaded->load_state({});  // an empty state means "nothing observed"
    CHECK_FALSE(loaded->has_observed());
  }
  CHECK(per_channel.state() == std::vector<float>{-0.7f, -1.f, 0.3f, 2.f});  // mins, then maxes

  CHECK_THROWS_AS(minmax2.load_state({1.f}), Error);
  CHECK(error_of([&] { minmax2.load_state({2.f, 1.f}); }).find("corrupt") != std::string::npos);
  CHECK_THROWS_AS(ema2.load_state({NAN, 1.f}), Error);
  CHECK_THROWS_AS(per_channel2.load_state({0.f, 1.f, 2.f}), Error);
  std::vector<float> bad = percentile.state();
  bad.pop_back();
  CHECK_THROWS_AS(percentile2.load_state(bad), Error);
  bad = percentile.state();
  bad[5] = -1.f;
  CHECK(error_of([&] { percentile2.load_state(bad); }).find("bin count") != std::string::npos);
  bad = percentile.state();
  bad[1] = bad[0];
  CHECK_THROWS_AS(percentile2.load_state(bad), Error);

  // Bin counts beyond a float's 2^24 whole numbers (a QAT epoch's activations) come back exactly.
  constexpr int64_t kBig = (int64_t{1} << 24) + 1;
  std::vector<float> big = percentile.state();
  std::fill(big.begin() + 2, big.end(), 0.f);
  big[2] = 1.f, big[3] = 1.f;  // bin 0 holds 1 * 2^24 + 1
  percentile2.load_state(big);
  CHECK(percentile2.histogram().counts[0] == kBig);
  CHECK(percentile2.state() == big);
  big[3] = static_cast<float>(HistogramObserver::kStateCountBase);  // the low part must stay below 2^24
  CHECK(error_of([&] { percentile2.load_state(big); }).find("bin count") != std::string::npos);
}

TEST_CASE("observer kinds parse from their names and make asymmetric activation observers") {
  for (ObserverKind kind :
       {ObserverKind::MinMax, ObserverKind::MovingAverage, ObserverKind::Percentile, ObserverKind::Mse}) {
    CHECK(parse_observer_kind(to_string(kind)) == kind);
    const auto observer = make_activation_observer(kind, kInt8);
    CHECK(observer->name() == to_string(kind));
    CHECK_FALSE(observer->symmetric());
    CHECK(observer->qrange().qmin == kInt8.qmin);
  }
  const std::string message = error_of([] { parse_observer_kind("max"); });
  CHECK(message.find("'max'") != std::string::npos);
  CHECK(message.find("minmax, ema, percentile, mse") != std::string::npos);
}
