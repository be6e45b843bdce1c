#include "lsoftmax/schedules.h"

#include <cmath>
#include <string>
#include <utility>

namespace lsoftmax {
namespace {

bool finite_nonneg(double v) { return std::isfinite(v) && v >= 0.0; }

Status must_be_nonneg(const char* name, double v) {
  if (finite_nonneg(v)) return Status::Ok();
  return Status::InvalidArgument(std::string(name) + " must be a finite number >= 0, got " +
                                 std::to_string(v));
}

Status integral_param(const char* name, double v, int64_t* out) {
  // 2^62 keeps the conversion defined and far from any step count a run reaches.
  if (!(std::isfinite(v) && v == std::floor(v) && std::fabs(v) <= 4.611686018427387904e18)) {
    return Status::InvalidArgument(std::string(name) + " must be an integer, got " +
                                   std::to_string(v));
  }
  *out = static_cast<int64_t>(v);
  return Status::Ok();
}

Status param_count(const std::string& kind, size_t count, size_t expected) {
  if (count == expected) return Status::Ok();
  return Status::InvalidArgument("a " + kind + " schedule takes " + std::to_string(expected) +
                                 " parameters, got " + std::to_string(count));
}

}  // namespace

double exponential_lambda(double base, double gamma, double power, double lambda_min,
                          int64_t iteration, int64_t it) {
  return schedule_math::exponential(base, gamma, power, lambda_min, iteration, it);
}

double scaled_lambda(double beta, double scale, double beta_min, int64_t it) {
  return schedule_math::scaled(beta, scale, beta_min, it);
}

Status validate_exponential(double base, double gamma, double power, double lambda_min,
                            int64_t iteration) {
  for (const auto& [name, v] : {std::pair<const char*, double>{"base", base},
                                {"gamma", gamma},
                                {"power", power},
                                {"lambda_min", lambda_min}}) {
    Status s = must_be_nonneg(name, v);
    if (!s.ok()) return s;
  }
  if (iteration < 0) {
    return Status::InvalidArgument("iteration must be >= 0, got " + std::to_string(iteration));
  }
  return Status::Ok();
}

Status validate_scaled(double beta, double scale, double beta_min) {
  for (const auto& [name, v] : {std::pair<const char*, double>{"beta", beta},
                                {"scale", scale},
                                {"beta_min", beta_min}}) {
    Status s = must_be_nonneg(name, v);
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

Status validate_constant(double value) { return must_be_nonneg("value", value); }

double stepup_value(double value, double gamma, int64_t step, double max_value, int64_t it) {
  return schedule_math::stepup(value, gamma, step, max_value, it);
}

Status validate_stepup(double value, double gamma, int64_t step, double max_value) {
  for (const auto& [name, v] : {std::pair<const char*, double>{"value", value},
                                {"gamma", gamma},
                                {"max_value", max_value}}) {
    Status s = must_be_nonneg(name, v);
    if (!s.ok()) return s;
  }
  if (step < 1) return Status::InvalidArgument("step must be >= 1, got " + std::to_string(step));
  return Status::Ok();
}

double onset_lambda(int64_t total_steps, double reach, double at, double warmup, double base,
                    double lambda_min, int64_t it) {
  return schedule_math::onset(total_steps, reach, at, warmup, base, lambda_min, it);
}

Status validate_onset(int64_t total_steps, double reach, double at, double warmup, double base,
                      double lambda_min) {
  if (total_steps < 1) {
    return Status::InvalidArgument("total_steps must be >= 1, got " + std::to_string(total_steps));
  }
  for (const auto& [name, v] : {std::pair<const char*, double>{"warmup", warmup},
                                {"lambda_min", lambda_min}}) {
    Status s = must_be_nonneg(name, v);
    if (!s.ok()) return s;
  }
  if (!(std::isfinite(base) && base > 0.0)) {
    return Status::InvalidArgument("base must be a finite number > 0, got " + std::to_string(base));
  }
  if (!(std::isfinite(reach) && reach > 0.0 && reach <= base)) {
    return Status::InvalidArgument("reach must be > 0 and <= base (" + std::to_string(base) +
                                   "), got " + std::to_string(reach));
  }
  if (!(std::isfinite(at) && at > warmup && at <= 1.0)) {
    return Status::InvalidArgument("at must be a fraction of the run in (warmup, 1] = (" +
                                   std::to_string(warmup) + ", 1], got " + std::to_string(at));
  }
  return Status::Ok();
}

Status validate_schedule(const ScheduleSpec& s) {
  switch (s.kind) {
    case ScheduleKind::kConstant:
      return validate_constant(s.p[0]);
    case ScheduleKind::kExponential:
      return validate_exponential(s.p[0], s.p[1], s.p[2], s.p[3], s.n);
    case ScheduleKind::kScaled:
      return validate_scaled(s.p[0], s.p[1], s.p[2]);
    case ScheduleKind::kStepUp:
      return validate_stepup(s.p[0], s.p[1], s.n, s.p[2]);
    case ScheduleKind::kOnset:
      return validate_onset(s.n, s.p[0], s.p[1], s.p[2], s.p[3], s.p[4]);
  }
  return Status::InvalidArgument("unknown schedule kind code " +
                                 std::to_string(static_cast<int>(s.kind)));
}

Status make_schedule(const char* kind, const double* params, size_t count, ScheduleSpec* out) {
  const std::string k = kind != nullptr ? kind : "";
  ScheduleSpec spec;
  Status s;
  if (k == "constant") {
    spec.kind = ScheduleKind::kConstant;
    s = param_count(k, count, 1);
    if (s.ok()) spec.p[0] = params[0];
  } else if (k == "exponential") {
    spec.kind = ScheduleKind::kExponential;
    s = param_count(k, count, 5);
    if (s.ok()) s = integral_param("iteration", params[4], &spec.n);
    if (s.ok()) {
      for (int j = 0; j < 4; ++j) spec.p[j] = params[j];
    }
  } else if (k == "scaled") {
    spec.kind = ScheduleKind::kScaled;
    s = param_count(k, count, 3);
    if (s.ok()) {
      for (int j = 0; j < 3; ++j) spec.p[j] = params[j];
    }
  } else if (k == "stepup") {
    spec.kind = ScheduleKind::kStepUp;
    s = param_count(k, count, 4);
    if (s.ok()) s = integral_param("step", params[2], &spec.n);
    if (s.ok()) {
      spec.p[0] = params[0];
      spec.p[1] = params[1];
      spec.p[2] = params[3];
    }
  } else if (k == "onset") {
    spec.kind = ScheduleKind::kOnset;
    s = param_count(k, count, 6);
    if (s.ok()) s = integral_param("total_steps", params[0], &spec.n);
    if (s.ok()) {
      for (int j = 0; j < 5; ++j) spec.p[j] = params[j + 1];
    }
  } else {
    return Status::InvalidArgument(
        "unknown schedule kind '" + k +
        "'; expected one of 'constant', 'exponential', 'scaled', 'stepup', 'onset'");
  }
  if (s.ok()) s = validate_schedule(spec);
  if (s.ok()) *out = spec;
  return s;
}

}  // namespace lsoftmax
