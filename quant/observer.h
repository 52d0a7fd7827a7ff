// Observers: watch tensors during calibration or training and propose quantization parameters.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "quant/qparams.h"

namespace lowbit::quant {

// An observer only watches and proposes parameters; it never changes the values it sees (that is
// FakeQuantize's job, quant/fake_quant.h, and lowering is convert's). observe() runs on the hot
// path of training, so it reads x.data() directly (no autograd) and does one or two passes.
class Observer {
 public:
  virtual ~Observer() = default;

  // Records the values of x: any tensor (activations), or (OUT, ...) for per-channel observers.
  virtual void observe(const Tensor& x) = 0;
  // One QParams per tensor, or one per channel. Throws lowbit::Error before any data was seen.
  virtual std::vector<QParams> qparams() const = 0;
  // The chosen clipping range [lo, hi] (per-channel: the overall min and max); reports mark it.
  virtual std::pair<float, float> range() const = 0;
  // "minmax", "ema", "percentile", "mse" or "minmax-per-channel".
  virtual std::string name() const = 0;

  // Checkpointing: the observer's statistics as floats (empty before any data), validated on load.
  virtual std::vector<float> state() const = 0;
  virtual void load_state(const std::vector<float>& state) = 0;

  bool has_observed() const { return observed_; }
  QRange qrange() const { return range_; }
  bool symmetric() const { return symmetric_; }

 protected:
  Observer(QRange range, bool symmetric);
  // Throws "observer has seen no data ..." unless observe() has recorded something.
  void require_observed() const;

  QRange range_;
  bool symmetric_;
  bool observed_ = false;
};

// ---- min / max

// The running min and max over everything observed.
//   state: {} before any data, else {min, max}
class MinMaxObserver : public Observer {
 public:
  explicit MinMaxObserver(QRange range, bool symmetric = false) : Observer(range, symmetric) {}

  void observe(const Tensor& x) override;
  std::vector<QParams> qparams() const override;
  std::pair<float, float> range() const override;
  std::string name() const override { return "minmax"; }
  std::vector<float> state() const override;
  void load_state(const std::vector<float>& state) override;

  float min() const { return min_; }  // +inf before any data; NaN once a NaN was observed
  float max() const { return max_; }  // -inf before any data

 private:
  float min_ = std::numeric_limits<float>::infinity();
  float max_ = -std::numeric_limits<float>::infinity();
};

// The min and max of each batch averaged as in PyTorch: the first batch initialises, then
//   min ← min + c·(batch_min − min),  max ← max + c·(batch_max − max).
//   state: {} before any data, else {min, max}
class MovingAverageMinMaxObserver : public Observer {
 public:
  static constexpr float kDefaultAveragingConstant = 0.01f;
  explicit MovingAverageMinMaxObserver(QRange range, bool symmetric = false,
                                       float averaging_constant = kDefaultAveragingConstant);

  void observe(const Tensor& x) override;
  std::vector<QParams> qparams() const override;
  std::pair<float, float> range() const override;
  std::string name() const override { return "ema"; }
  std::vector<float> state() const override;
  void load_state(const std::vector<float>& state) override;

  float min() const { return min_; }
  float max() const { return max_; }
  float averaging_constant() const { return averaging_constant_; }

 private:
  float averaging_constant_;
  float min_ = std::numeric_limits<float>::infinity();
  float max_ = -std::numeric_limits<float>::infinity();
};

// The running min and max of each output channel (rows along axis 0), for weights.
//   state: {} before any data, else {min[0..C), max[0..C)}
class PerChannelMinMaxObserver : public Observer {
 public:
  explicit PerChannelMinMaxObserver(QRange range, bool symmetric = true) : Observer(range, symmetric) {}

  void observe(const Tensor& x) override;          // x is (OUT, ...)
  std::vector<QParams> qparams() const override;   // one per output channel
  std::pair<float, float> range() const override;  // min over all channels, max over all channels
  std::string name() const override { return "minmax-per-channel"; }
  std::vector<float> state() const override;
  void load_state(const std::vector<float>& state) override;

  int64_t channels() const { return static_cast<int64_t>(mins_.size()); }
  const std::vector<float>& mins() const { return mins_; }
  const std::vector<float>& maxs() const { return maxs_; }

 private:
  std::vector<float> mins_, maxs_;
};

// ---- histogram

// Counts of observed values in equal-width bins over [lo, hi] (the inspect tool draws it).
struct Histogram {
  float lo = 0, hi = 0;
  std::vector<int64_t> counts;
  float bin_width() const { return (hi - lo) / static_cast<float>(counts.size()); }
};

// A histogram over a range that grows with the data: when a batch falls outside [lo, hi], the
// range widens to cover it and the old counts are re-binned proportionally (total kept exactly).
// The clipping range is chosen either
//   Percentile: clip (100 − p)% of the mass from each tail (default p = 99.99), or
//   Mse: minimise the expected quantization error over candidate ranges [a, b] (0 included):
//        Σ_{x<a} (x − a)² + Σ_{x>b} (x − b)² + n_inside · step² / 12,  step = (b − a) / (qmax − qmin)
//        (bins stand in for their centres; a coarse grid of bin edges, then a fine one near the best).
//   state: {} before any data, else {lo, hi, then per bin c / 2^24, c mod 2^24} (a count c as two
//          floats, so that counts up to 2^48 come back exactly)
class HistogramObserver : public Observer {
 public:
  enum class Method { Percentile, Mse };
  static constexpr int64_t kStateCountBase = int64_t{1} << 24;  // floats hold whole numbers exactly below 2^24
  static constexpr int kDefaultBins = 2048;
  static constexpr double kDefaultPercentile = 99.99;

  explicit HistogramObserver(QRange range, bool symmetric = false, Method method = Method::Percentile,
                             double percentile = kDefaultPercentile, int bins = kDefaultBins);

  void observe(const Tensor& x) override;  // throws on NaN or inf
  std::vector<QParams> qparams() const override;
  std::pair<float, float> range() const override;
  std::string name() const override { return method_ == Method::Percentile ? "percentile" : "mse"; }
  std::vector<float> state() const override;
  void load_state(const std::vector<float>& state) override;

  const Histogram& histogram() const { return histogram_; }
  Method method() const { return method_; }
  double percentile() const { return percentile_; }

 private:
  void grow_to(float lo, float hi);
  std::pair<float, float> percentile_range() const;
  std::pair<float, float> mse_range() const;

  Method method_;
  double percentile_;
  Histogram histogram_;
};

// ---- choosing an observer by name (command-line flags, qconfig presets)

enum class ObserverKind { MinMax, MovingAverage, Percentile, Mse };
// "minmax" | "ema" | "percentile" | "mse"; throws lowbit::Error listing the choices otherwise.
ObserverKind parse_observer_kind(const std::string& name);
std::string to_string(ObserverKind kind);
// An asymmetric, per-tensor observer for activations.
std::unique_ptr<Observer> make_activation_observer(ObserverKind kind, QRange range);

}  // namespace lowbit::quant
