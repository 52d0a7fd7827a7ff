// A custom observer: the symmetric absolute maximum, s = max|x| / qmax and z = 0, inside a FakeQuantize node.
#include <cmath>

#include "core/error.h"
#include "quant/fake_quant.h"

using namespace lowbit;

class AbsMaxObserver : public quant::Observer {
 public:
  explicit AbsMaxObserver(quant::QRange range) : Observer(range, /*symmetric=*/true) {}
  void observe(const Tensor& x) override {
    for (float v : x.values()) abs_max_ = std::fmax(abs_max_, std::fabs(v));
    observed_ = observed_ || x.numel() > 0;
  }
  std::vector<quant::QParams> qparams() const override {
    require_observed();
    return {quant::choose_qparams(-abs_max_, abs_max_, range_, /*symmetric=*/true)};
  }
  std::pair<float, float> range() const override { return {-abs_max_, abs_max_}; }
  std::string name() const override { return "absmax"; }
  std::vector<float> state() const override { return observed_ ? std::vector<float>{abs_max_} : std::vector<float>{}; }
  void load_state(const std::vector<float>& state) override {
    if (state.size() > 1) fail("absmax observer: saved state has {} values, expected 0 or 1", state.size());
    observed_ = !state.empty();
    abs_max_ = observed_ ? state[0] : 0.f;
  }

 private:
  float abs_max_ = 0.f;
};

int main() {
  quant::FakeQuantize fq(std::make_unique<AbsMaxObserver>(quant::weight_range(8)), /*channels=*/1);
  const Tensor y = fq.forward(Tensor::from({5}, {-0.5f, 0.1f, 0.25f, 1.0f, 2.54f}));  // training mode: observes
  const quant::QParams qp = fq.qparams_per_tensor();
  fmt::print("{}: scale {}, zero point {}\nfake-quantized: {}\n", fq.describe(), qp.scale, qp.zero_point, y);
}
