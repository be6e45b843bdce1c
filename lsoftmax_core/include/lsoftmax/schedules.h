// Lambda schedules as plain functions of the training step it = 0, 1, ...
#pragma once

#include <cstdint>

#include <cstddef>

#include "lsoftmax/schedule_math.h"
#include "lsoftmax/status.h"

namespace lsoftmax {

// The original Caffe layer: it counts before it computes, so step `it` uses iter = iteration + it + 1.
double exponential_lambda(double base, double gamma, double power, double lambda_min,
                          int64_t iteration, int64_t it);

// The MXNet and PyTorch ports: max(beta_min, beta * scale^it).
double scaled_lambda(double beta, double scale, double beta_min, int64_t it);

Status validate_exponential(double base, double gamma, double power, double lambda_min,
                            int64_t iteration);
Status validate_scaled(double beta, double scale, double beta_min);
Status validate_constant(double value);

// The L-GM margin schedule (Caffe ParamParameter policy STEPUP): the start value multiplied by
// gamma once every `step` steps, capped at max_value: min(max_value, value * gamma^floor(it/step)).
double stepup_value(double value, double gamma, int64_t step, double max_value, int64_t it);
Status validate_stepup(double value, double gamma, int64_t step, double max_value);

// Length-aware (schedule_math::onset): base until warmup * total_steps, then a geometric fall
// that reaches `reach` at at * total_steps, floored at lambda_min.
double onset_lambda(int64_t total_steps, double reach, double at, double warmup, double base,
                    double lambda_min, int64_t it);
Status validate_onset(int64_t total_steps, double reach, double at, double warmup, double base,
                      double lambda_min);

// The checks of the validate_* function of the spec's kind.
Status validate_schedule(const ScheduleSpec& spec);

// A schedule from its kind name ("constant", "exponential", "scaled", "stepup", "onset") and its
// parameters as a flat list in the order of the functions above (iteration and step as
// integral doubles), as lsoftmax.schedules.Schedule.params() gives them; validated like them.
Status make_schedule(const char* kind, const double* params, size_t count, ScheduleSpec* out);

}  // namespace lsoftmax
