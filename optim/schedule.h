// Learning-rate schedules (constant, step, cosine) with an optional linear warmup.
#pragma once

#include <cstdint>
#include <string>

namespace lowbit::optim {

enum class ScheduleKind { kConstant, kStep, kCosine };

// "constant", "step" or "cosine" (the command-line spelling); throws lowbit::Error otherwise.
ScheduleKind parse_schedule_kind(const std::string& name);
std::string schedule_kind_name(ScheduleKind kind);

// The learning rate as a function of the epoch (or step) t = 0, 1, 2, ... The caller applies it:
//   optimizer.set_lr(schedule.lr_at(epoch));
//
// With warmup = W > 0, the first W values rise linearly and the schedule proper starts after them:
//   t < W:   lr = base_lr * (t + 1) / W
//   t >= W:  lr = schedule(t - W)
// so step_size and t_max count epochs after the warmup. The schedules, with s = t - W:
//   constant: base_lr
//   step:     base_lr * gamma^floor(s / step_size)                    (torch StepLR)
//   cosine:   eta_min + (base_lr - eta_min) * (1 + cos(pi * s / t_max)) / 2
//             (torch CosineAnnealingLR's closed form; past t_max it rises again, as in torch)
class LrSchedule {
 public:
  struct Options {
    ScheduleKind kind = ScheduleKind::kConstant;
    float base_lr = 0.1f;
    int64_t step_size = 30;  // step
    float gamma = 0.1f;      // step
    int64_t t_max = 100;     // cosine
    float eta_min = 0.f;     // cosine
    int64_t warmup = 0;
  };
  // Throws lowbit::Error unless base_lr > 0, step_size > 0, gamma > 0, t_max > 0,
  // 0 <= eta_min <= base_lr and warmup >= 0.
  explicit LrSchedule(Options options);

  float lr_at(int64_t t) const;  // throws on t < 0
  const Options& options() const { return options_; }

 private:
  Options options_;
};

}  // namespace lowbit::optim
