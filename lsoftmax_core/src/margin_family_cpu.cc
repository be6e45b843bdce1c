// The margin family's rules and per-row CPU loops; the math itself is in margin_family.h.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "lsoftmax/lsoftmax.h"
#include "checks.h"
#include "parallel.h"

namespace lsoftmax {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Integral values print as integers ("got 0", as the L-Softmax messages always have), others
// with every digit a double has.
std::string num(double v) {
  char buf[64];
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e18) {
    std::snprintf(buf, sizeof buf, "%.0f", v);
  } else {
    std::snprintf(buf, sizeof buf, "%.17g", v);
  }
  return buf;
}

Status bad(const std::string& what, double v) {
  return Status::InvalidArgument(what + ", got " + num(v));
}

struct KindName {
  MarginKind kind;
  const char* name;
};

constexpr KindName kKindNames[kMarginKinds] = {
    {MarginKind::kLSoftmax, "lsoftmax"}, {MarginKind::kSphereFace, "sphereface"},
    {MarginKind::kCosFace, "cosface"},   {MarginKind::kArcFace, "arcface"},
    {MarginKind::kCombined, "combined"},
};

std::string kind_list() {
  std::string out;
  for (const KindName& k : kKindNames) out += std::string(out.empty() ? "'" : ", '") + k.name + "'";
  return out;
}

}  // namespace

const char* margin_kind_name(MarginKind kind) {
  for (const KindName& k : kKindNames) {
    if (k.kind == kind) return k.name;
  }
  return "unknown";
}

Status parse_margin_kind(const char* name, MarginKind* out) {
  for (const KindName& k : kKindNames) {
    if (name != nullptr && std::strcmp(name, k.name) == 0) {
      *out = k.kind;
      return Status::Ok();
    }
  }
  return Status::InvalidArgument("unknown margin kind '" + std::string(name ? name : "") +
                                 "'; expected one of " + kind_list());
}

Status validate_margin_spec(const MarginSpec& spec, double lambda) {
  if (!(lambda >= 0.0)) {  // also rejects NaN
    return Status::InvalidArgument("lambda must be >= 0 (and not NaN), got " +
                                   std::to_string(lambda));
  }
  const std::string kind = margin_kind_name(spec.kind);
  if (kind == "unknown") {
    return Status::InvalidArgument("unknown margin kind code " +
                                   std::to_string(static_cast<int>(spec.kind)));
  }
  const KindProperties props = kind_properties(spec.kind);
  if (props.uses_lambda) {
    const double m = spec.margin;
    if (!(m >= 1.0 && m <= static_cast<double>(kMaxMargin) && m == std::floor(m))) {
      return bad("margin must be an integer in [1, 2^20]", m);
    }
  }
  if (spec.kind == MarginKind::kCosFace && !(std::isfinite(spec.margin) && spec.margin >= 0.0)) {
    return bad("cosface margin m must be a finite number >= 0", spec.margin);
  }
  if (spec.kind == MarginKind::kArcFace && !(spec.margin >= 0.0 && spec.margin < kPi)) {
    return bad("arcface margin m must be in [0, pi) (radians)", spec.margin);
  }
  if (spec.kind == MarginKind::kCombined) {
    if (!(std::isfinite(spec.m1) && spec.m1 > 0.0)) {
      return bad("combined margin m1 must be a finite number > 0", spec.m1);
    }
    if (!std::isfinite(spec.m2)) return bad("combined margin m2 must be finite", spec.m2);
    if (!std::isfinite(spec.m3)) return bad("combined margin m3 must be finite", spec.m3);
  }
  if (props.scaled && !(std::isfinite(spec.scale) && spec.scale > 0.0)) {
    return bad(kind + " scale s must be a finite number > 0", spec.scale);
  }
  if (spec.easy_margin && spec.kind != MarginKind::kArcFace) {
    return Status::InvalidArgument("easy_margin applies to arcface only, not " + kind);
  }
  return Status::Ok();
}

Status make_margin_spec(const char* kind, const double* params, int64_t count, MarginSpec* out) {
  MarginSpec spec;
  Status s = parse_margin_kind(kind, &spec.kind);
  if (!s.ok()) return s;
  if (count != kMarginParams || params == nullptr) {
    return Status::InvalidArgument(
        "margin params must be the 6 numbers [margin, m1, m2, m3, scale, easy_margin], got " +
        std::to_string(count));
  }
  spec.margin = params[0];
  spec.m1 = params[1];
  spec.m2 = params[2];
  spec.m3 = params[3];
  spec.scale = params[4];
  if (!(params[5] == 0.0 || params[5] == 1.0)) return bad("easy_margin must be 0 or 1", params[5]);
  spec.easy_margin = params[5] == 1.0;
  s = validate_margin_spec(spec, 0.0);
  if (s.ok()) *out = spec;
  return s;
}

template <typename T>
Status margin_family_targets(const MarginSpec& spec, double lambda, const T* cos_theta, int64_t n,
                             T* phi, T* dphi) {
  Status s = validate_margin_spec(spec, lambda);
  if (!s.ok()) return s;
  if (n < 0) return Status::InvalidArgument("n must be >= 0, got " + std::to_string(n));
  if (n > 0 && (cos_theta == nullptr || phi == nullptr)) {
    return Status::InvalidArgument("cos_theta and phi must not be null");
  }
  const bool psi = kind_properties(spec.kind).uses_lambda;
  const int m = psi ? static_cast<int>(spec.margin) : 1;
  std::vector<double> thresholds(static_cast<size_t>(m > 1 ? m - 1 : 0));
  fill_segment_thresholds(m, thresholds.data());
  const T lam = static_cast<T>(lambda);
  detail::parallel_for(n, 16 + 8 * m, [&](int64_t i) {
    const TargetTerms<T> r = margin_target(spec, cos_theta[i], lam, psi ? thresholds.data() : nullptr);
    phi[i] = r.phi;
    if (dphi != nullptr) dphi[i] = r.dphi;
  });
  return Status::Ok();
}

template <typename T>
Status normalize_rows(MatrixView<const T> in, MatrixView<T> out, T* norms) {
  Status s = detail::check_shape("out", out.rows, out.cols, in.rows, in.cols);
  if (!s.ok()) return s;
  const double eps = static_cast<double>(degenerate_norm<T>());
  detail::parallel_for(in.rows, 2 * in.cols, [&](int64_t i) {
    double ss = 0.0;
    for (int64_t j = 0; j < in.cols; ++j) {
      const double v = static_cast<double>(in(i, j));
      ss += v * v;
    }
    const double norm = std::sqrt(ss);
    const double inv = 1.0 / (norm > eps ? norm : eps);
    for (int64_t j = 0; j < in.cols; ++j) out(i, j) = static_cast<T>(static_cast<double>(in(i, j)) * inv);
    if (norms != nullptr) norms[i] = static_cast<T>(norm);
  });
  return Status::Ok();
}

template Status margin_family_targets<float>(const MarginSpec&, double, const float*, int64_t,
                                             float*, float*);
template Status margin_family_targets<double>(const MarginSpec&, double, const double*, int64_t,
                                              double*, double*);
template Status normalize_rows<float>(MatrixView<const float>, MatrixView<float>, float*);
template Status normalize_rows<double>(MatrixView<const double>, MatrixView<double>, double*);

}  // namespace lsoftmax
