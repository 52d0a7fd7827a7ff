// Observers: running min/max, moving-average min/max, per-channel min/max, and histogram ranges.
#include "quant/observer.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace lowbit::quant {

namespace {

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();

// The min and max of n values in one pass. A NaN anywhere makes both NaN, so that
// choose_qparams reports it instead of the observer silently skipping it.
std::pair<float, float> min_max_of(const float* x, int64_t n) {
  float lo = x[0], hi = x[0];
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    nan |= v != v;
  }
  if (nan) return {kNan, kNan};
  return {lo, hi};
}

// min ≤ max, neither NaN: what every loaded {min, max} pair must satisfy.
void check_loaded_pair(const std::string& observer, float min, float max) {
  if (std::isnan(min) || std::isnan(max) || min > max)
    fail("{} observer: bad saved state (min {} max {}: expected min <= max, no NaN; the checkpoint is corrupt)",
         observer, min, max);
}

}  // namespace

Observer::Observer(QRange range, bool symmetric) : range_(range), symmetric_(symmetric) {
  if (range.qmin >= range.qmax) fail("observer: empty integer range [{}, {}]", range.qmin, range.qmax);
}

void Observer::require_observed() const {
  if (!observed_) fail("observer has seen no data (run calibration or a training step first)");
}

// ---- MinMaxObserver

// Exercise 02 (docs/exercises/02-minmax-observer.md): the student build compiles
// docs/exercises/student/ex02_minmax_observer.cpp instead of observe() and qparams().
#ifndef LOWBIT_EXERCISES
void MinMaxObserver::observe(const Tensor& x) {
  if (x.numel() == 0) return;
  const auto [lo, hi] = min_max_of(x.data(), x.numel());
  // std::isnan keeps a NaN sticky: once seen, qparams() throws until the observer is reset.
  min_ = std::isnan(lo) || std::isnan(min_) ? kNan : std::min(min_, lo);
  max_ = std::isnan(hi) || std::isnan(max_) ? kNan : std::max(max_, hi);
  observed_ = true;
}

std::vector<QParams> MinMaxObserver::qparams() const {
  require_observed();
  return {choose_qparams(min_, max_, range_, symmetric_)};
}
#endif  // LOWBIT_EXERCISES

std::pair<float, float> MinMaxObserver::range() const {
  require_observed();
  return {min_, max_};
}

std::vector<float> MinMaxObserver::state() const {
  if (!observed_) return {};
  return {min_, max_};
}

void MinMaxObserver::load_state(const std::vector<float>& state) {
  if (state.empty()) {
    *this = MinMaxObserver(range_, symmetric_);
    return;
  }
  if (state.size() != 2) fail("minmax observer: saved state has {} values, expected 2 (min, max)", state.size());
  check_loaded_pair(name(), state[0], state[1]);
  min_ = state[0];
  max_ = state[1];
  observed_ = true;
}

// ---- MovingAverageMinMaxObserver

MovingAverageMinMaxObserver::MovingAverageMinMaxObserver(QRange range, bool symmetric, float averaging_constant)
    : Observer(range, symmetric), averaging_constant_(averaging_constant) {
  if (!(averaging_constant > 0 && averaging_constant <= 1))
    fail("ema observer: averaging constant {} must be in (0, 1] (PyTorch's default is 0.01)", averaging_constant);
}

void MovingAverageMinMaxObserver::observe(const Tensor& x) {
  if (x.numel() == 0) return;
  const auto [lo, hi] = min_max_of(x.data(), x.numel());
  if (!observed_) {
    min_ = lo;
    max_ = hi;
  } else {  // a NaN propagates through the average by itself
    min_ += averaging_constant_ * (lo - min_);
    max_ += averaging_constant_ * (hi - max_);
  }
  observed_ = true;
}

std::vector<QParams> MovingAverageMinMaxObserver::qparams() const {
  require_observed();
  return {choose_qparams(min_, max_, range_, symmetric_)};
}

std::pair<float, float> MovingAverageMinMaxObserver::range() const {
  require_observed();
  return {min_, max_};
}

std::vector<float> MovingAverageMinMaxObserver::state() const {
  if (!observed_) return {};
  return {min_, max_};
}

void MovingAverageMinMaxObserver::load_state(const std::vector<float>& state) {
  if (state.empty()) {
    *this = MovingAverageMinMaxObserver(range_, symmetric_, averaging_constant_);
    return;
  }
  if (state.size() != 2) fail("ema observer: saved state has {} values, expected 2 (min, max)", state.size());
  check_loaded_pair(name(), state[0], state[1]);
  min_ = state[0];
  max_ = state[1];
  observed_ = true;
}

// ---- PerChannelMinMaxObserver

// x is (OUT, ...): channel c is the contiguous row x[c, ...].
void PerChannelMinMaxObserver::observe(const Tensor& x) {
  if (x.dim() < 1) fail("per-channel observer: expected a tensor (OUT, ...), got a scalar");
  const int64_t out = x.size(0);
  if (observed_ && out != channels())
    fail("per-channel observer: tensor {} has {} channels, but {} were observed before", shape_str(x.shape()), out,
         channels());
  if (x.numel() == 0) return;
  const int64_t row = x.numel() / out;
  if (!observed_) {
    mins_.assign(static_cast<size_t>(out), std::numeric_limits<float>::infinity());
    maxs_.assign(static_cast<size_t>(out), -std::numeric_limits<float>::infinity());
  }
  for (int64_t c = 0; c < out; ++c) {
    const auto [lo, hi] = min_max_of(x.data() + c * row, row);
    float& min = mins_[static_cast<size_t>(c)];
    float& max = maxs_[static_cast<size_t>(c)];
    min = std::isnan(lo) || std::isnan(min) ? kNan : std::min(min, lo);
    max = std::isnan(hi) || std::isnan(max) ? kNan : std::max(max, hi);
  }
  observed_ = true;
}

std::vector<QParams> PerChannelMinMaxObserver::qparams() const {
  require_observed();
  std::vector<QParams> params(mins_.size());
  for (size_t c = 0; c < mins_.size(); ++c) params[c] = choose_qparams(mins_[c], maxs_[c], range_, symmetric_);
  return params;
}

std::pair<float, float> PerChannelMinMaxObserver::range() const {
  require_observed();
  return {*std::min_element(mins_.begin(), mins_.end()), *std::max_element(maxs_.begin(), maxs_.end())};
}

std::vector<float> PerChannelMinMaxObserver::state() const {
  std::vector<float> state = mins_;
  state.insert(state.end(), maxs_.begin(), maxs_.end());
  return state;
}

void PerChannelMinMaxObserver::load_state(const std::vector<float>& state) {
  if (state.empty()) {
    *this = PerChannelMinMaxObserver(range_, symmetric_);
    return;
  }
  if (state.size() % 2 != 0)
    fail("per-channel observer: saved state has {} values, expected an even count (mins then maxes)", state.size());
  const size_t channels = state.size() / 2;
  for (size_t c = 0; c < channels; ++c) check_loaded_pair(name(), state[c], state[channels + c]);
  mins_.assign(state.begin(), state.begin() + static_cast<std::ptrdiff_t>(channels));
  maxs_.assign(state.begin() + static_cast<std::ptrdiff_t>(channels), state.end());
  observed_ = true;
}

// ---- HistogramObserver

HistogramObserver::HistogramObserver(QRange range, bool symmetric, Method method, double percentile, int bins)
    : Observer(range, symmetric), method_(method), percentile_(percentile) {
  if (!(percentile > 50 && percentile <= 100))
    fail("percentile observer: percentile {} must be in (50, 100] (the default is {})", percentile, kDefaultPercentile);
  if (bins < 16)
    fail("histogram observer: {} bins is too few (use at least 16; the default is {})", bins, kDefaultBins);
  histogram_.counts.assign(static_cast<size_t>(bins), 0);
}

// Widens [lo, hi] to cover [new_lo, new_hi]. Each old bin's count moves to the one or two new bins
// its interval overlaps (new bins are at least as wide), split in proportion to the overlap.
void HistogramObserver::grow_to(float new_lo, float new_hi) {
  Histogram& h = histogram_;
  const auto bins = static_cast<int64_t>(h.counts.size());
  new_lo = std::min(new_lo, h.lo);
  new_hi = std::max(new_hi, h.hi);
  if (new_lo == h.lo && new_hi == h.hi) return;
  std::vector<int64_t> counts(h.counts.size(), 0);
  const double old_width = (static_cast<double>(h.hi) - h.lo) / static_cast<double>(bins);
  const double new_width = (static_cast<double>(new_hi) - new_lo) / static_cast<double>(bins);
  for (int64_t k = 0; k < bins; ++k) {
    const int64_t count = h.counts[static_cast<size_t>(k)];
    if (count == 0) continue;
    const double start = (h.lo + static_cast<double>(k) * old_width - new_lo) / new_width;  // in new bins
    const double end = start + old_width / new_width;
    const int64_t j = std::clamp(static_cast<int64_t>(std::floor(start)), int64_t{0}, bins - 1);
    if (end <= static_cast<double>(j + 1) || j + 1 == bins) {
      counts[static_cast<size_t>(j)] += count;
      continue;
    }
    const double first_share = (static_cast<double>(j + 1) - start) / (end - start);
    const auto first = static_cast<int64_t>(std::llround(static_cast<double>(count) * first_share));
    counts[static_cast<size_t>(j)] += first;
    counts[static_cast<size_t>(j + 1)] += count - first;
  }
  h.counts = std::move(counts);
  h.lo = new_lo;
  h.hi = new_hi;
}

void HistogramObserver::observe(const Tensor& x) {
  if (x.numel() == 0) return;
  const float* v = x.data();
  const int64_t n = x.numel();
  auto [lo, hi] = min_max_of(v, n);
  if (!std::isfinite(lo) || !std::isfinite(hi))
    fail("{} observer: the tensor holds NaN or inf (check the learning rate or the input data)", name());
  Histogram& h = histogram_;
  if (!observed_) {
    // A batch of equal values still needs a bin width > 0.
    if (hi - lo < std::max(1e-6f, std::abs(lo) * 1e-6f)) hi = lo + std::max(1e-6f, std::abs(lo) * 1e-6f);
    h.lo = lo;
    h.hi = hi;
    observed_ = true;
  } else {
    grow_to(lo, hi);
  }
  const auto bins = static_cast<int64_t>(h.counts.size());
  const float inv_width = static_cast<float>(bins) / (h.hi - h.lo);
  for (int64_t i = 0; i < n; ++i) {
    const auto k = static_cast<int64_t>((v[i] - h.lo) * inv_width);
    ++h.counts[static_cast<size_t>(std::clamp(k, int64_t{0}, bins - 1))];
  }
}

// Clips (100 − p)% of the mass from each tail, interpolating linearly inside the bin where the
// cumulative count crosses the target.
std::pair<float, float> HistogramObserver::percentile_range() const {
  const Histogram& h = histogram_;
  const auto bins = static_cast<int64_t>(h.counts.size());
  const double width = (static_cast<double>(h.hi) - h.lo) / static_cast<double>(bins);
  double total = 0;
  for (int64_t c : h.counts) total += static_cast<double>(c);
  const double target = total * (1.0 - percentile_ / 100.0);  // the count clipped from each tail

  double lo = h.lo, cumulative = 0;
  for (int64_t k = 0; k < bins; ++k) {
    const auto c = static_cast<double>(h.counts[static_cast<size_t>(k)]);
    if (c > 0 && cumulative + c >= target) {
      lo = h.lo + (static_cast<double>(k) + (target - cumulative) / c) * width;
      break;
    }
    cumulative += c;
  }
  double hi = h.hi;
  cumulative = 0;
  for (int64_t k = bins - 1; k >= 0; --k) {
    const auto c = static_cast<double>(h.counts[static_cast<size_t>(k)]);
    if (c > 0 && cumulative + c >= target) {
      hi = h.lo + (static_cast<double>(k + 1) - (target - cumulative) / c) * width;
      break;
    }
    cumulative += c;
  }
  return {static_cast<float>(lo), static_cast<float>(std::max(lo, hi))};
}

// Minimises the expected quantization MSE over candidate clipping ranges [a, b] with a ≤ 0 ≤ b
// (choose_qparams widens to 0 anyway). With prefix sums of count, Σx and Σx² over the bins
// (each bin standing at its centre) one candidate costs O(1):
//   clip below a:  Σ_{x<a} (x − a)² = S2 − 2a·S1 + a²·N   over the bins with centre < a
//   inside:        N_inside · step² / 12                  (uniform rounding noise)
// The search walks a coarse grid of bin edges (every kStride-th), then every edge within one
// stride of the best coarse pair. Symmetric ranges search the one threshold t and report [−t, t]
// (the codes reach qmin·t/qmax on the negative side, which the error accounts for).
std::pair<float, float> HistogramObserver::mse_range() const {
  constexpr int64_t kStride = 16;
  const Histogram& h = histogram_;
  const auto bins = static_cast<int64_t>(h.counts.size());
  const double width = (static_cast<double>(h.hi) - h.lo) / static_cast<double>(bins);
  std::vector<double> n(static_cast<size_t>(bins + 1), 0), s1(n), s2(n);  // prefix sums over bins [0, k)
  for (int64_t k = 0; k < bins; ++k) {
    const auto c = static_cast<double>(h.counts[static_cast<size_t>(k)]);
    const double centre = h.lo + (static_cast<double>(k) + 0.5) * width;
    const auto i = static_cast<size_t>(k);
    n[i + 1] = n[i] + c;
    s1[i + 1] = s1[i] + c * centre;
    s2[i + 1] = s2[i] + c * centre * centre;
  }
  const double levels = static_cast<double>(range_.qmax) - range_.qmin;
  auto expected_error = [&](double a, double b) {
    // bins [0, below) have centre < a; bins [above, bins) have centre > b
    const auto below = std::clamp(static_cast<int64_t>(std::ceil((a - h.lo) / width - 0.5)), int64_t{0}, bins);
    const auto above = std::clamp(static_cast<int64_t>(std::floor((b - h.lo) / width - 0.5)) + 1, below, bins);
    const auto lo = static_cast<size_t>(below), hi = static_cast<size_t>(above), end = static_cast<size_t>(bins);
    const double clip_below = s2[lo] - 2 * a * s1[lo] + a * a * n[lo];
    const double clip_above = (s2[end] - s2[hi]) - 2 * b * (s1[end] - s1[hi]) + b * b * (n[end] - n[hi]);
    const double step = (b - a) / levels;
    return clip_below + clip_above + (n[hi] - n[lo]) * step * step / 12;
  };
  auto edge = [&](int64_t k) { return h.lo + static_cast<double>(k) * width; };

  if (symmetric_) {  // one threshold t in bin-width steps up to max(|lo|, |hi|)
    const double amax = std::max(std::abs(static_cast<double>(h.lo)), std::abs(static_cast<double>(h.hi)));
    const double ratio = static_cast<double>(range_.qmin) / range_.qmax;  // the negative end, −1 or a bit below
    const double step = amax / static_cast<double>(bins);
    double best_t = amax, best = expected_error(ratio * amax, amax);
    for (int64_t k = 1; k < bins; ++k) {
      const double t = step * static_cast<double>(k);
      const double error = expected_error(ratio * t, t);
      if (error < best) {
        best = error;
        best_t = t;
      }
    }
    return {static_cast<float>(-best_t), static_cast<float>(best_t)};
  }

  // Asymmetric: candidate a = min(edge i, 0), b = max(edge j, 0) for edges i < j.
  int64_t best_i = 0, best_j = bins;
  double best = expected_error(std::min(edge(0), 0.0), std::max(edge(bins), 0.0));
  auto try_pair = [&](int64_t i, int64_t j) {
    const double error = expected_error(std::min(edge(i), 0.0), std::max(edge(j), 0.0));
    if (error < best) {
      best = error;
      best_i = i;
      best_j = j;
    }
  };
  std::vector<int64_t> grid;
  for (int64_t k = 0; k < bins; k += kStride) grid.push_back(k);
  grid.push_back(bins);
  for (size_t gi = 0; gi < grid.size(); ++gi)
    for (size_t gj = gi + 1; gj < grid.size(); ++gj) try_pair(grid[gi], grid[gj]);
  const int64_t coarse_i = best_i, coarse_j = best_j;
  for (int64_t i = std::max<int64_t>(0, coarse_i - kStride); i <= std::min(bins, coarse_i + kStride); ++i)
    for (int64_t j = std::max(i + 1, coarse_j - kStride); j <= std::min(bins, coarse_j + kStride); ++j) try_pair(i, j);
  return {static_cast<float>(std::min(edge(best_i), 0.0)), static_cast<float>(std::max(edge(best_j), 0.0))};
}

std::pair<float, float> HistogramObserver::range() const {
  require_observed();
  return method_ == Method::Percentile ? percentile_range() : mse_range();
}

std::vector<QParams> HistogramObserver::qparams() const {
  const auto [lo, hi] = range();
  return {choose_qparams(lo, hi, range_, symmetric_)};
}

std::vector<float> HistogramObserver::state() const {
  if (!observed_) return {};
  // A float holds whole numbers exactly only up to 2^24, and a bin of a QAT run counts more than
  // that: each count is saved as two floats, c / 2^24 and c mod 2^24, exact up to 2^48.
  std::vector<float> state{histogram_.lo, histogram_.hi};
  for (int64_t c : histogram_.counts) {
    state.push_back(static_cast<float>(c / kStateCountBase));
    state.push_back(static_cast<float>(c % kStateCountBase));
  }
  return state;
}

void HistogramObserver::load_state(const std::vector<float>& state) {
  const size_t bins = histogram_.counts.size();
  if (state.empty()) {
    *this = HistogramObserver(range_, symmetric_, method_, percentile_, static_cast<int>(bins));
    return;
  }
  if (state.size() != 2 + 2 * bins)
    fail("{} observer: saved state has {} values, expected {} (lo, hi and {} bin counts as two values each)", name(),
         state.size(), 2 + 2 * bins, bins);
  if (!std::isfinite(state[0]) || !std::isfinite(state[1]) || !(state[0] < state[1]))
    fail("{} observer: bad saved histogram range [{}, {}] (expected finite lo < hi; the checkpoint is corrupt)", name(),
         state[0], state[1]);
  std::vector<int64_t> counts(bins);
  for (size_t k = 0; k < bins; ++k) {
    const float high = state[2 + 2 * k], low = state[3 + 2 * k];
    const auto whole_below = [](float v, float limit) { return v >= 0 && v < limit && v == std::floor(v); };
    if (!whole_below(high, static_cast<float>(kStateCountBase)) ||
        !whole_below(low, static_cast<float>(kStateCountBase)))
      fail(
          "{} observer: bad saved bin count ({}, {}) at bin {} (expected two whole numbers in 0..2^24-1; the "
          "checkpoint is corrupt)",
          name(), high, low, k);
    counts[k] = static_cast<int64_t>(high) * kStateCountBase + static_cast<int64_t>(low);
  }
  histogram_ = {state[0], state[1], std::move(counts)};
  observed_ = true;
}

// ---- choosing an observer by name

ObserverKind parse_observer_kind(const std::string& name) {
  if (name == "minmax") return ObserverKind::MinMax;
  if (name == "ema") return ObserverKind::MovingAverage;
  if (name == "percentile") return ObserverKind::Percentile;
  if (name == "mse") return ObserverKind::Mse;
  fail("unknown observer '{}' (choose one of: minmax, ema, percentile, mse)", name);
}

std::string to_string(ObserverKind kind) {
  switch (kind) {
    case ObserverKind::MinMax:
      return "minmax";
    case ObserverKind::MovingAverage:
      return "ema";
    case ObserverKind::Percentile:
      return "percentile";
    case ObserverKind::Mse:
      return "mse";
  }
  return "unknown";
}

std::unique_ptr<Observer> make_activation_observer(ObserverKind kind, QRange range) {
  switch (kind) {
    case ObserverKind::MinMax:
      return std::make_unique<MinMaxObserver>(range, false);
    case ObserverKind::MovingAverage:
      return std::make_unique<MovingAverageMinMaxObserver>(range, false);
    case ObserverKind::Percentile:
      return std::make_unique<HistogramObserver>(range, false, HistogramObserver::Method::Percentile);
    case ObserverKind::Mse:
      return std::make_unique<HistogramObserver>(range, false, HistogramObserver::Method::Mse);
  }
  fail("make_activation_observer: unknown observer kind {}", static_cast<int>(kind));
}

}  // namespace lowbit::quant
