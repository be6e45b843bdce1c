// The schedule formulas (lambda of L-Softmax, alpha of L-GM) as host/device functions: the CPU
// functions of schedules.h and the CUDA schedule kernel both evaluate these, so a step counter
// that lives on the GPU gives the value the CPU gives without a round trip to the host.
//
// No validation here (schedules.h has it): the callers check the parameters before evaluating.
#pragma once

#include <cmath>
#include <cstdint>

#include "lsoftmax/margin_math.h"  // LSOFTMAX_HD

namespace lsoftmax {
namespace schedule_math {

// a * b without being fused into a following add: nvcc contracts a * b + c into an FMA on the
// device, g++ on x86-64 does not, and the schedules should round the same on both.
LSOFTMAX_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// std::max(lo, v) and std::min(hi, v), spelled out so that device code needs no constexpr
// <algorithm> (and NaN v gives lo / hi, as std::max / std::min do).
LSOFTMAX_HD double max_of(double lo, double v) { return lo < v ? v : lo; }
LSOFTMAX_HD double min_of(double hi, double v) { return v < hi ? v : hi; }

// The original Caffe layer: max(lambda_min, base * (1 + gamma * iter)^(-power)) with
// iter = iteration + it + 1 (it counts before it computes; `iteration` is the resume offset).
LSOFTMAX_HD double exponential(double base, double gamma, double power, double lambda_min,
                               int64_t iteration, int64_t it) {
  const double iter = static_cast<double>(iteration) + static_cast<double>(it) + 1.0;
  return max_of(lambda_min, base * std::pow(1.0 + mul_rn(gamma, iter), -power));
}

// The MXNet and PyTorch ports: max(beta_min, beta * scale^it).
LSOFTMAX_HD double scaled(double beta, double scale, double beta_min, int64_t it) {
  return max_of(beta_min, beta * std::pow(scale, static_cast<double>(it)));
}

// L-GM (Caffe ParamParameter policy STEPUP): min(max_value, value * gamma^floor(it / step)),
// step >= 1 and it >= 0.
LSOFTMAX_HD double stepup(double value, double gamma, int64_t step, double max_value,
                          int64_t it) {
  return min_of(max_value, value * std::pow(gamma, static_cast<double>(it / step)));
}

// Length-aware: lambda stays at `base` for the first warmup * total steps (softmax in effect),
// then falls geometrically so that it reaches `reach` at step at * total (and keeps falling at
// the same rate after it), never below lambda_min. 0 <= warmup < at, 0 < reach <= base.
LSOFTMAX_HD double onset(int64_t total, double reach, double at, double warmup, double base,
                         double lambda_min, int64_t it) {
  const double steps = static_cast<double>(total);
  const double t0 = mul_rn(warmup, steps);
  const double t1 = mul_rn(at, steps);
  const double s = static_cast<double>(it);
  if (s < t0) return base;
  return max_of(lambda_min, base * std::pow(reach / base, (s - t0) / (t1 - t0)));
}

}  // namespace schedule_math

// One schedule as plain data, so that it can be passed by value to a kernel.
enum class ScheduleKind : int32_t {
  kConstant = 0,
  kExponential = 1,
  kScaled = 2,
  kStepUp = 3,
  kOnset = 4
};

struct ScheduleSpec {
  ScheduleKind kind = ScheduleKind::kConstant;
  // constant: {value}; exponential: {base, gamma, power, lambda_min}; scaled: {beta, scale,
  // beta_min}; stepup: {value, gamma, max_value}; onset: {reach, at, warmup, base, lambda_min}.
  double p[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  // exponential: the resume offset `iteration`; stepup: `step` (steps per multiplication);
  // onset: `total_steps`.
  int64_t n = 0;
};

// The schedule's value at training step `it`.
LSOFTMAX_HD double schedule_value(const ScheduleSpec& s, int64_t it) {
  switch (s.kind) {
    case ScheduleKind::kExponential:
      return schedule_math::exponential(s.p[0], s.p[1], s.p[2], s.p[3], s.n, it);
    case ScheduleKind::kScaled:
      return schedule_math::scaled(s.p[0], s.p[1], s.p[2], it);
    case ScheduleKind::kStepUp:
      return schedule_math::stepup(s.p[0], s.p[1], s.n, s.p[2], it);
    case ScheduleKind::kOnset:
      return schedule_math::onset(s.n, s.p[0], s.p[1], s.p[2], s.p[3], s.p[4], it);
    case ScheduleKind::kConstant:
      break;
  }
  return s.p[0];
}

}  // namespace lsoftmax
