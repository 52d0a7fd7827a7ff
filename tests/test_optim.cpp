// Tests for the optimizers, their resumable state, the learning-rate schedules and grad clipping.
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/ops.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"

using namespace lowbit;
using namespace lowbit::optim;
using lowbit::ops::mul;
using lowbit::ops::mul_scalar;
using lowbit::ops::sub;
using lowbit::ops::sum;

namespace {

constexpr float kTolerance = 1e-5f;  // float32 updates against numbers worked out in real arithmetic

// A leaf parameter with the given values.
Tensor param(std::vector<float> values) {
  const int64_t n = static_cast<int64_t>(values.size());
  Tensor p = Tensor::from({n}, std::move(values));
  p.set_requires_grad(true);
  return p;
}

// Makes `values` the gradient of `p`, through backward() as a training step would.
void set_grad(Tensor& p, std::vector<float> values) {
  p.zero_grad();
  p.backward(Tensor::from(p.shape(), std::move(values)));
}

void check_values(const Tensor& t, std::vector<float> expected) {
  REQUIRE(t.numel() == static_cast<int64_t>(expected.size()));
  for (size_t i = 0; i < expected.size(); ++i) {
    INFO("element ", i, ": got ", t.data()[i], ", expected ", expected[i]);
    CHECK(std::abs(t.data()[i] - expected[i]) <= kTolerance);
  }
}

// Every optimizer test below starts from p = [1, -2] and feeds the gradients
// g1 = [0.5, 1] at step 1 and g2 = [-1, 2] at step 2.
template <typename Opt, typename Options>
Tensor two_steps(Options options, std::vector<float>* after_step1 = nullptr) {
  Tensor p = param({1.f, -2.f});
  Opt optimizer({p}, options);
  set_grad(p, {0.5f, 1.f});
  optimizer.step();
  if (after_step1) *after_step1 = std::vector<float>(p.data(), p.data() + 2);
  set_grad(p, {-1.f, 2.f});
  optimizer.step();
  CHECK(optimizer.steps() == 2);
  return p;
}

}  // namespace

// ============================================================================ SGD

TEST_CASE("SGD plain: p = p - lr * g") {
  // lr 0.1. Step 1: [1 - 0.05, -2 - 0.1] = [0.95, -2.1]. Step 2: [0.95 + 0.1, -2.1 - 0.2] = [1.05, -2.3].
  std::vector<float> step1;
  Tensor p = two_steps<SGD>(SGD::Options{.lr = 0.1f}, &step1);
  check_values(Tensor::from({2}, step1), {0.95f, -2.1f});
  check_values(p, {1.05f, -2.3f});
}

TEST_CASE("SGD momentum: the buffer starts as the first gradient") {
  // lr 0.1, momentum 0.9. Step 1: buf = g1 = [0.5, 1]; p = [0.95, -2.1].
  // Step 2: buf = 0.9 * [0.5, 1] + [-1, 2] = [-0.55, 2.9]; p = [0.95 + 0.055, -2.1 - 0.29] = [1.005, -2.39].
  std::vector<float> step1;
  Tensor p = two_steps<SGD>(SGD::Options{.lr = 0.1f, .momentum = 0.9f}, &step1);
  check_values(Tensor::from({2}, step1), {0.95f, -2.1f});
  check_values(p, {1.005f, -2.39f});
}

TEST_CASE("SGD momentum with dampening: later gradients enter scaled by 1 - dampening") {
  // lr 0.1, momentum 0.9, dampening 0.5. Step 1: buf = g1 (undamped, as PyTorch); p = [0.95, -2.1].
  // Step 2: buf = 0.9 * [0.5, 1] + 0.5 * [-1, 2] = [-0.05, 1.9]; p = [0.95 + 0.005, -2.1 - 0.19] = [0.955, -2.29].
  Tensor p = two_steps<SGD>(SGD::Options{.lr = 0.1f, .momentum = 0.9f, .dampening = 0.5f});
  check_values(p, {0.955f, -2.29f});
}

TEST_CASE("SGD nesterov: step along g + momentum * buf") {
  // lr 0.1, momentum 0.9. Step 1: buf = [0.5, 1]; d = g1 + 0.9 * buf = [0.95, 1.9]; p = [0.905, -2.19].
  // Step 2: buf = [-0.55, 2.9]; d = [-1 - 0.495, 2 + 2.61] = [-1.495, 4.61];
  //         p = [0.905 + 0.1495, -2.19 - 0.461] = [1.0545, -2.651].
  std::vector<float> step1;
  Tensor p = two_steps<SGD>(SGD::Options{.lr = 0.1f, .momentum = 0.9f, .nesterov = true}, &step1);
  check_values(Tensor::from({2}, step1), {0.905f, -2.19f});
  check_values(p, {1.0545f, -2.651f});
}

TEST_CASE("SGD weight decay: weight_decay * p is added to the gradient") {
  // lr 0.1, weight_decay 0.1. Step 1: d = [0.5 + 0.1, 1 - 0.2] = [0.6, 0.8]; p = [0.94, -2.08].
  // Step 2: d = [-1 + 0.094, 2 - 0.208] = [-0.906, 1.792]; p = [0.94 + 0.0906, -2.08 - 0.1792] = [1.0306, -2.2592].
  std::vector<float> step1;
  Tensor p = two_steps<SGD>(SGD::Options{.lr = 0.1f, .weight_decay = 0.1f}, &step1);
  check_values(Tensor::from({2}, step1), {0.94f, -2.08f});
  check_values(p, {1.0306f, -2.2592f});
}

TEST_CASE("SGD skips a parameter without a gradient, and zero_grad drops gradients") {
  Tensor a = param({1.f});
  Tensor b = param({5.f});
  SGD optimizer({a, b}, SGD::Options{.lr = 0.1f, .momentum = 0.9f});
  set_grad(a, {2.f});
  optimizer.step();
  check_values(a, {0.8f});
  check_values(b, {5.f});
  const StateTensors state = optimizer.state();
  REQUIRE(state.size() == 1);
  CHECK(state[0].first == "optim.0.momentum_buffer");
  optimizer.zero_grad();
  CHECK(!a.grad().defined());
  CHECK(!b.grad().defined());
}

TEST_CASE("SGD minimizes a real loss without recording a graph") {
  // loss = sum((p - t)^2), dloss/dp = 2 (p - t); with lr 0.5 one step lands exactly on t.
  Tensor p = param({1.f, -2.f, 3.f});
  const Tensor target = Tensor::from({3}, {0.5f, 0.5f, 0.5f});
  SGD optimizer({p}, SGD::Options{.lr = 0.5f});
  optimizer.zero_grad();
  const Tensor diff = sub(p, target);
  sum(mul(diff, diff)).backward();
  optimizer.step();
  check_values(p, {0.5f, 0.5f, 0.5f});
  CHECK(p.grad_fn() == nullptr);
}

// ============================================================================ Adam and AdamW

TEST_CASE("Adam with bias correction") {
  // lr 0.1, beta1 0.9, beta2 0.999, eps 1e-8.
  // Step 1: m = 0.1 g1 = [0.05, 0.1], v = 0.001 g1^2 = [0.00025, 0.001];
  //         m_hat = m / 0.1 = g1, v_hat = v / 0.001 = g1^2, so p moves by lr * sign(g1): p = [0.9, -2.1].
  // Step 2: m = 0.9 [0.05, 0.1] + 0.1 [-1, 2] = [-0.055, 0.29];
  //         v = 0.999 [0.00025, 0.001] + 0.001 [1, 4] = [0.00124975, 0.004999];
  //         m_hat = m / (1 - 0.9^2) = m / 0.19 = [-0.289474, 1.526316];
  //         v_hat = v / (1 - 0.999^2) = v / 0.001999 = [0.625188, 2.500750], sqrt = [0.790688, 1.581376];
  //         p = [0.9 + 0.1 * 0.366102, -2.1 - 0.1 * 0.965182] = [0.936610, -2.196518].
  std::vector<float> step1;
  Tensor p = two_steps<Adam>(Adam::Options{.lr = 0.1f}, &step1);
  check_values(Tensor::from({2}, step1), {0.9f, -2.1f});
  check_values(p, {0.936610f, -2.196518f});
}

TEST_CASE("Adam weight decay is an L2 term in the gradient") {
  // lr 0.1, weight_decay 0.1. Step 1: g = g1 + 0.1 p = [0.6, 0.8]; still p = [0.9, -2.1] (sign step).
  // Step 2: g = [-1 + 0.09, 2 - 0.21] = [-0.91, 1.79];
  //         m = 0.9 [0.06, 0.08] + 0.1 g = [-0.037, 0.251];
  //         v = 0.999 [0.00036, 0.00064] + 0.001 g^2 = [0.00118774, 0.00384346];
  //         p = p - 0.1 (m / 0.19) / sqrt(v / 0.001999) = [0.925264, -2.195272].
  Tensor p = two_steps<Adam>(Adam::Options{.lr = 0.1f, .weight_decay = 0.1f});
  check_values(p, {0.925264f, -2.195272f});
}

TEST_CASE("AdamW decays the parameter, then takes the plain Adam step") {
  // lr 0.1, weight_decay 0.1: p is first multiplied by 1 - 0.1 * 0.1 = 0.99, and the Adam step
  // is the one without decay (above).
  // Step 1: p = 0.99 [1, -2] - 0.1 sign(g1) = [0.99 - 0.1, -1.98 - 0.1] = [0.89, -2.08].
  // Step 2: p = 0.99 [0.89, -2.08] + [0.036610, -0.096518] = [0.8811 + 0.036610, -2.0592 - 0.096518]
  //           = [0.917710, -2.155718].
  std::vector<float> step1;
  Tensor p = two_steps<AdamW>(AdamW::Options{.lr = 0.1f, .weight_decay = 0.1f}, &step1);
  check_values(Tensor::from({2}, step1), {0.89f, -2.08f});
  check_values(p, {0.917710f, -2.155718f});
}

TEST_CASE("AdamW defaults to weight_decay 0.01, Adam to 0") {
  CHECK(AdamW::Options{}.weight_decay == 0.01f);
  CHECK(Adam::Options{}.weight_decay == 0.f);
}

// ============================================================================ State and resume

namespace {

// Two parameters of different shapes with fixed starting values.
std::vector<Tensor> make_params() {
  Tensor w = Tensor::from({2, 3}, {0.1f, -0.2f, 0.3f, -0.4f, 0.5f, -0.6f});
  Tensor b = Tensor::from({4}, {1.f, 2.f, -3.f, 0.25f});
  w.set_requires_grad(true);
  b.set_requires_grad(true);
  return {w, b};
}

std::vector<Tensor> copy_params(const std::vector<Tensor>& params) {
  std::vector<Tensor> out;
  for (const Tensor& p : params) out.push_back(p.clone().set_requires_grad(true));
  return out;
}

// The gradient of step k depends on the current values, as a real loss would. The second
// parameter gets no gradient at step 0, so its Adam step count lags the optimizer's by one.
void run_steps(Optimizer& optimizer, int64_t from, int64_t to) {
  for (int64_t k = from; k < to; ++k) {
    optimizer.zero_grad();
    for (size_t i = 0; i < optimizer.params().size(); ++i) {
      if (i == 1 && k == 0) continue;
      Tensor p = optimizer.params()[i];
      std::vector<float> g(p.numel());
      for (int64_t j = 0; j < p.numel(); ++j) g[j] = 0.5f * p.data()[j] + std::sin(static_cast<float>(k * 7 + j));
      set_grad(p, g);
    }
    optimizer.step();
  }
}

template <typename Opt, typename Options>
void check_resume_is_exact(Options options) {
  const std::vector<Tensor> params_a = make_params();
  Opt a(params_a, options);
  run_steps(a, 0, 4);

  const std::vector<Tensor> params_b = make_params();
  Opt b(params_b, options);
  run_steps(b, 0, 2);
  const StateTensors saved = b.state();
  REQUIRE(!saved.empty());

  Opt c(copy_params(params_b), options);
  c.load_state(saved, b.steps());
  CHECK(c.steps() == 2);
  run_steps(c, 2, 4);
  CHECK(c.steps() == 4);

  for (size_t i = 0; i < params_a.size(); ++i)
    for (int64_t j = 0; j < params_a[i].numel(); ++j) {
      INFO("parameter ", i, " element ", j);
      CHECK(params_a[i].data()[j] == c.params()[i].data()[j]);  // bit for bit
    }
}

}  // namespace

TEST_CASE("state() names the buffers optim.<index>.<buffer>") {
  std::vector<Tensor> params = make_params();
  Adam adam(params, Adam::Options{});
  CHECK(adam.state().empty());  // no buffers before the first update
  run_steps(adam, 0, 1);        // parameter 1 has no gradient at step 0
  std::vector<std::string> names;
  for (const auto& [name, tensor] : adam.state()) names.push_back(name);
  CHECK(names == std::vector<std::string>{"optim.0.step", "optim.0.exp_avg", "optim.0.exp_avg_sq"});
  CHECK(adam.state()[0].second.item() == 1.f);
  CHECK(adam.state()[1].second.shape() == Shape{2, 3});

  SGD plain(make_params(), SGD::Options{.lr = 0.1f});
  run_steps(plain, 0, 2);
  CHECK(plain.state().empty());  // plain SGD keeps no buffers
}

TEST_CASE("load_state continues bit for bit: 4 steps == 2 steps, save, load, 2 steps") {
  SUBCASE("SGD momentum") { check_resume_is_exact<SGD>(SGD::Options{.lr = 0.1f, .momentum = 0.9f}); }
  SUBCASE("SGD nesterov with weight decay") {
    check_resume_is_exact<SGD>(SGD::Options{.lr = 0.1f, .momentum = 0.9f, .nesterov = true, .weight_decay = 1e-2f});
  }
  SUBCASE("Adam") { check_resume_is_exact<Adam>(Adam::Options{.lr = 0.01f, .weight_decay = 1e-2f}); }
  SUBCASE("AdamW") { check_resume_is_exact<AdamW>(AdamW::Options{.lr = 0.01f}); }
}

TEST_CASE("load_state rejects state that does not match the parameters") {
  std::vector<Tensor> params = make_params();
  Adam saver(params, Adam::Options{});
  run_steps(saver, 0, 2);
  const StateTensors good = saver.state();
  REQUIRE(good.size() == 6);
  Adam adam(copy_params(params), Adam::Options{});

  auto with = [&](const std::string& name, const Tensor& tensor) {
    StateTensors state = good;
    state.emplace_back(name, tensor);
    return state;
  };
  auto without = [&](const std::string& name) {
    StateTensors state;
    for (const auto& entry : good)
      if (entry.first != name) state.push_back(entry);
    return state;
  };
  const Tensor scalar = Tensor::scalar(1.f);

  CHECK_THROWS_WITH_AS(adam.load_state(with("optim.7.step", scalar), 2), doctest::Contains("parameter 7"), Error);
  CHECK_THROWS_WITH_AS(adam.load_state(with("optim.0.momentum_buffer", Tensor::zeros({2, 3})), 2),
                       doctest::Contains("momentum_buffer"), Error);
  CHECK_THROWS_WITH_AS(adam.load_state(with("model.weight", scalar), 2), doctest::Contains("model.weight"), Error);
  CHECK_THROWS_WITH_AS(adam.load_state(with("optim.x.step", scalar), 2), doctest::Contains("bad parameter index"),
                       Error);
  CHECK_THROWS_WITH_AS(adam.load_state(with("optim.0.step", scalar), 2), doctest::Contains("twice"), Error);
  CHECK_THROWS_WITH_AS(adam.load_state(without("optim.1.exp_avg_sq"), 2), doctest::Contains("exp_avg_sq"), Error);
  CHECK_THROWS_WITH_AS(adam.load_state(good, -1), doctest::Contains("step count"), Error);

  StateTensors wrong_shape = without("optim.1.exp_avg");
  wrong_shape.emplace_back("optim.1.exp_avg", Tensor::zeros({5}));
  CHECK_THROWS_WITH_AS(adam.load_state(wrong_shape, 2), doctest::Contains("shape (5,)"), Error);

  SGD sgd(copy_params(params), SGD::Options{.lr = 0.1f, .momentum = 0.9f});
  CHECK_THROWS_WITH_AS(sgd.load_state(good, 2), doctest::Contains("does not keep"), Error);

  adam.load_state(good, 2);  // the untouched state still loads
  CHECK(adam.steps() == 2);
}

// ============================================================================ Option validation

TEST_CASE("optimizer options and parameter lists are validated") {
  auto params = [] { return std::vector<Tensor>{param({1.f, 2.f})}; };
  CHECK_THROWS_WITH_AS(SGD(params(), SGD::Options{.lr = 0.f}), doctest::Contains("lr must be > 0"), Error);
  CHECK_THROWS_WITH_AS(SGD(params(), SGD::Options{.lr = -0.1f}), doctest::Contains("lr must be > 0"), Error);
  CHECK_THROWS_WITH_AS(SGD(params(), SGD::Options{.lr = 0.1f, .momentum = -0.5f}), doctest::Contains("momentum"), Error);
  CHECK_THROWS_WITH_AS(SGD(params(), SGD::Options{.lr = 0.1f, .nesterov = true}), doctest::Contains("nesterov"), Error);
  CHECK_THROWS_WITH_AS(SGD(params(), SGD::Options{.lr = 0.1f, .momentum = 0.9f, .dampening = 0.1f, .nesterov = true}),
                       doctest::Contains("nesterov"), Error);
  CHECK_THROWS_WITH_AS(Adam(params(), Adam::Options{.lr = 0.f}), doctest::Contains("lr must be > 0"), Error);
  CHECK_THROWS_WITH_AS(Adam(params(), Adam::Options{.beta1 = 1.f}), doctest::Contains("beta1"), Error);
  CHECK_THROWS_WITH_AS(Adam(params(), Adam::Options{.beta2 = -0.1f}), doctest::Contains("beta2"), Error);
  CHECK_THROWS_WITH_AS(AdamW(params(), AdamW::Options{.lr = -1.f}), doctest::Contains("AdamW: lr must be > 0"), Error);

  CHECK_THROWS_WITH_AS(SGD({}, SGD::Options{}), doctest::Contains("empty parameter list"), Error);
  Tensor p = param({1.f});
  CHECK_THROWS_WITH_AS(SGD({p, p}, SGD::Options{}), doctest::Contains("more than once"), Error);
  CHECK_THROWS_WITH_AS(SGD({mul_scalar(p, 2.f)}, SGD::Options{}), doctest::Contains("not a leaf"), Error);

  SGD sgd(params(), SGD::Options{.lr = 0.1f});
  sgd.set_lr(0.f);  // a schedule may reach 0
  CHECK(sgd.lr() == 0.f);
  CHECK_THROWS_AS(sgd.set_lr(-1.f), Error);
}

// ============================================================================ Schedules

TEST_CASE("constant and step schedules") {
  const LrSchedule constant({.kind = ScheduleKind::kConstant, .base_lr = 0.1f});
  CHECK(constant.lr_at(0) == 0.1f);
  CHECK(constant.lr_at(500) == 0.1f);

  // StepLR(step_size 30, gamma 0.1): 0.1 for epochs 0..29, 0.01 for 30..59, 0.001 from 60.
  const LrSchedule step({.kind = ScheduleKind::kStep, .base_lr = 0.1f, .step_size = 30, .gamma = 0.1f});
  CHECK(step.lr_at(0) == doctest::Approx(0.1));
  CHECK(step.lr_at(29) == doctest::Approx(0.1));
  CHECK(step.lr_at(30) == doctest::Approx(0.01));
  CHECK(step.lr_at(59) == doctest::Approx(0.01));
  CHECK(step.lr_at(60) == doctest::Approx(0.001));
}

TEST_CASE("cosine schedule follows CosineAnnealingLR's closed form") {
  // lr(t) = eta_min + (0.1 - eta_min) (1 + cos(pi t / 10)) / 2.
  const LrSchedule cosine({.kind = ScheduleKind::kCosine, .base_lr = 0.1f, .t_max = 10});
  CHECK(cosine.lr_at(0) == doctest::Approx(0.1));
  CHECK(cosine.lr_at(2) == doctest::Approx(0.0904508));  // 0.05 (1 + cos(0.2 pi)) = 0.05 * 1.809017
  CHECK(cosine.lr_at(5) == doctest::Approx(0.05));
  CHECK(cosine.lr_at(10) == doctest::Approx(0.0));
  CHECK(cosine.lr_at(15) == doctest::Approx(0.05));  // past t_max it rises again, as in torch

  const LrSchedule with_floor({.kind = ScheduleKind::kCosine, .base_lr = 0.1f, .t_max = 10, .eta_min = 0.01f});
  CHECK(with_floor.lr_at(5) == doctest::Approx(0.055));  // 0.01 + 0.09 / 2
  CHECK(with_floor.lr_at(10) == doctest::Approx(0.01));
}

TEST_CASE("linear warmup, then the schedule starts counting") {
  // Warmup 5: 0.1 * (t + 1) / 5 for t < 5; then cosine over t - 5 with t_max 10.
  const LrSchedule s({.kind = ScheduleKind::kCosine, .base_lr = 0.1f, .t_max = 10, .warmup = 5});
  CHECK(s.lr_at(0) == doctest::Approx(0.02));
  CHECK(s.lr_at(2) == doctest::Approx(0.06));
  CHECK(s.lr_at(4) == doctest::Approx(0.1));
  CHECK(s.lr_at(5) == doctest::Approx(0.1));
  CHECK(s.lr_at(10) == doctest::Approx(0.05));
  CHECK(s.lr_at(15) == doctest::Approx(0.0));
}

TEST_CASE("schedule kinds parse from the command line and options are validated") {
  CHECK(parse_schedule_kind("constant") == ScheduleKind::kConstant);
  CHECK(parse_schedule_kind("step") == ScheduleKind::kStep);
  CHECK(parse_schedule_kind("cosine") == ScheduleKind::kCosine);
  CHECK(schedule_kind_name(ScheduleKind::kCosine) == "cosine");
  CHECK_THROWS_WITH_AS(parse_schedule_kind("linear"), doctest::Contains("expected constant, step or cosine"), Error);

  CHECK_THROWS_AS(LrSchedule({.base_lr = 0.f}), Error);
  CHECK_THROWS_AS(LrSchedule({.kind = ScheduleKind::kStep, .step_size = 0}), Error);
  CHECK_THROWS_AS(LrSchedule({.kind = ScheduleKind::kCosine, .t_max = 0}), Error);
  CHECK_THROWS_AS(LrSchedule({.warmup = -1}), Error);
  CHECK_THROWS_AS(LrSchedule({}).lr_at(-1), Error);
}

// ============================================================================ Gradient clipping

TEST_CASE("clip_grad_norm returns the total norm and scales only above max_norm") {
  // Gradients [3, 4] and [12]: norm = sqrt(9 + 16 + 144) = 13.
  Tensor a = param({0.f, 0.f});
  Tensor b = param({0.f});
  Tensor no_grad = param({7.f});  // skipped
  auto reset = [&] {
    set_grad(a, {3.f, 4.f});
    set_grad(b, {12.f});
  };

  reset();
  CHECK(clip_grad_norm({a, b, no_grad}, 26.f) == doctest::Approx(13.0));
  check_values(a.grad(), {3.f, 4.f});  // below max_norm: untouched
  check_values(b.grad(), {12.f});

  reset();
  CHECK(clip_grad_norm({a, b, no_grad}, 6.5f) == doctest::Approx(13.0));
  check_values(a.grad(), {1.5f, 2.f});  // scaled by 6.5 / (13 + 1e-6) = 0.5
  check_values(b.grad(), {6.f});
  CHECK(!no_grad.grad().defined());

  CHECK_THROWS_AS(clip_grad_norm({a}, -1.f), Error);
}
