// Learning-rate schedules (constant, step, cosine) with an optional linear warmup.
#include "optim/schedule.h"

#include <cmath>
#include <numbers>

#include "core/error.h"

namespace lowbit::optim {

ScheduleKind parse_schedule_kind(const std::string& name) {
  if (name == "constant") return ScheduleKind::kConstant;
  if (name == "step") return ScheduleKind::kStep;
  if (name == "cosine") return ScheduleKind::kCosine;
  fail("unknown learning-rate schedule '{}'; expected constant, step or cosine", name);
}

std::string schedule_kind_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kConstant: return "constant";
    case ScheduleKind::kStep: return "step";
    case ScheduleKind::kCosine: return "cosine";
  }
  return "unknown";
}

LrSchedule::LrSchedule(Options options) : options_(options) {
  const Options& o = options_;
  if (!(o.base_lr > 0.f)) fail("lr schedule: base_lr must be > 0, got {}", o.base_lr);
  if (o.step_size <= 0) fail("lr schedule: step_size must be > 0, got {}", o.step_size);
  if (!(o.gamma > 0.f)) fail("lr schedule: gamma must be > 0, got {}", o.gamma);
  if (o.t_max <= 0) fail("lr schedule: t_max must be > 0, got {}", o.t_max);
  if (!(o.eta_min >= 0.f && o.eta_min <= o.base_lr))
    fail("lr schedule: eta_min must be in [0, base_lr = {}], got {}", o.base_lr, o.eta_min);
  if (o.warmup < 0) fail("lr schedule: warmup must be >= 0, got {}", o.warmup);
}

float LrSchedule::lr_at(int64_t t) const {
  if (t < 0) fail("lr schedule: epoch must be >= 0, got {}", t);
  const Options& o = options_;
  const double base = o.base_lr;
  if (t < o.warmup) return static_cast<float>(base * static_cast<double>(t + 1) / static_cast<double>(o.warmup));
  const int64_t s = t - o.warmup;
  switch (o.kind) {
    case ScheduleKind::kConstant: return o.base_lr;
    case ScheduleKind::kStep: return static_cast<float>(base * std::pow(static_cast<double>(o.gamma), s / o.step_size));
    case ScheduleKind::kCosine: {
      const double eta_min = o.eta_min;
      const double angle = std::numbers::pi * static_cast<double>(s) / static_cast<double>(o.t_max);
      return static_cast<float>(eta_min + (base - eta_min) * (1.0 + std::cos(angle)) / 2.0);
    }
  }
  return o.base_lr;
}

}  // namespace lowbit::optim
