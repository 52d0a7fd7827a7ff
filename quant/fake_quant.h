// Fake quantization: the autograd op (quantize then dequantize, straight-through backward) and
// the FakeQuantize module that owns an observer and has two switches (observe, fake-quantize).
#pragma once

#include <memory>
#include <vector>

#include "nn/module.h"
#include "quant/observer.h"
#include "quant/qparams.h"

namespace lowbit::quant {

// y = dequantize(quantize(x)) (eqs. 1, 7) with one QParams for the whole tensor, or one per
// channel along axis 0 (params.size() == x.size(0)).
// Backward, the straight-through estimator: dx = dy where round(x/s) + z lies inside
// [qmin, qmax], and 0 where the value was clamped.
Tensor fake_quantize(const Tensor& x, const std::vector<QParams>& params, QRange range);

// Learned step size (LSQ, Esser et al. 2020): the same forward with the scale taken from the
// tensor `scale` (one value, or one per channel along axis 0), which also receives a gradient:
//   d y / d s = (round(x/s) − x/s)  inside the range,  (qmin − z) or (qmax − z) where clamped,
// scaled by g = 1 / sqrt(values_per_scale · qmax) as the paper recommends.
Tensor fake_quantize_lsq(const Tensor& x, const Tensor& scale, const std::vector<int32_t>& zero_points, QRange range);

// A fake-quant node: watches its input with an observer (in training mode, while observing is on)
// and fake-quantizes it with the qparams the observer proposes. The current qparams are kept in
// the buffers `scale` and `zero_point` (saved in QAT checkpoints), so an eval-mode model uses
// exactly the parameters convert() will use.
class FakeQuantize : public nn::Module {
 public:
  // channels: 1 for per-tensor, OUT for per-channel (weights, axis 0).
  FakeQuantize(std::unique_ptr<Observer> observer, int64_t channels, bool learn_scale = false);

  Tensor forward(const Tensor& x) override;
  std::string describe() const override;

  bool observe_enabled = true;
  bool fake_quant_enabled = true;

  // The qparams in use (from the buffers). Throws if the node has never observed anything.
  std::vector<QParams> qparams() const;
  QParams qparams_per_tensor() const;  // for activations
  QRange range() const { return observer_->qrange(); }
  int bits() const;
  const Observer& observer() const { return *observer_; }
  bool learns_scale() const { return learn_scale_; }
  // Checkpointing (quant/qat.h, qat_state): the observer's statistics, Observer::state() (empty
  // before any data), and putting them back; load_observer_state validates them.
  std::vector<float> observer_state() const { return observer_->state(); }
  void load_observer_state(const std::vector<float>& state) { observer_->load_state(state); }
  bool calibrated() const { return calibrated_.data()[0] != 0.f; }

 private:
  void update_from_observer();

  std::unique_ptr<Observer> observer_;
  bool learn_scale_;
  Tensor scale_;       // (channels); a parameter when learn_scale
  Tensor zero_point_;  // (channels), integer values held as floats
  Tensor calibrated_;  // (1,): 1 once the qparams came from real data
};

}  // namespace lowbit::quant
