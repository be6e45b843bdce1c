#include "lsoftmax/schedules.h"

#include <algorithm>
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

}  // namespace

double exponential_lambda(double base, double gamma, double power, double lambda_min,
                          int64_t iteration, int64_t it) {
  const double iter = static_cast<double>(iteration) + static_cast<double>(it) + 1.0;
  return std::max(lambda_min, base * std::pow(1.0 + gamma * iter, -power));
}

double scaled_lambda(double beta, double scale, double beta_min, int64_t it) {
  return std::max(beta_min, beta * std::pow(scale, static_cast<double>(it)));
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
  const double times = static_cast<double>(it / step);
  return std::min(max_value, value * std::pow(gamma, times));
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

}  // namespace lsoftmax
