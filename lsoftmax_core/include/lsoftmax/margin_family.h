// The margin family's scalar math, shared by the CPU loops and the CUDA kernels (host and device).
//
// Every kind rewrites one logit per row, the target t = y_i, and keeps the others plain. With
// c = cos(theta_t) (clamped to [-1, 1]) and a_i the row's scale, the plain target logit is
// a_i c and the margin target logit is a_i phi(c):
//
//   kind        plain logits f_j          a_i            phi(c)
//   lsoftmax    <x, w_j>                  |x||w_t|       c + (psi_m(theta) - c) / (1 + lambda)
//   sphereface  |x| cos theta_j           |x|            c + (psi_m(theta) - c) / (1 + lambda)
//   cosface     s cos theta_j             s              c - m
//   arcface     s cos theta_j             s              cos(theta + m); c - m sin m where
//                                                        theta + m > pi (c < cos(pi - m));
//                                                        easy_margin: c where c <= 0
//   combined    s cos theta_j             s              cos(m1 theta + m2) - m3
//
// psi_m(theta) = (-1)^k cos(m theta) - 2k (margin_math.h). Adding a kind: a MarginKind value,
// its row in margin_target() and kind_properties(), its parameter rule in validate_margin_spec()
// (src/margin_family_cpu.cc) and its name in margin_kind_name()/parse.
#pragma once

#include <cmath>
#include <cstdint>

#include "lsoftmax/margin_math.h"

namespace lsoftmax {

enum class MarginKind : int {
  kLSoftmax = 0,
  kSphereFace = 1,
  kCosFace = 2,
  kArcFace = 3,
  kCombined = 4,
};

// The number of kinds; MarginKind values are 0..kMarginKinds-1.
constexpr int kMarginKinds = 5;

// A margin specification: the kind and its float parameters, in the layout of the torch op's
// `params` and the ONNX attributes: [margin, m1, m2, m3, scale, easy_margin]. Entries a kind
// does not use are ignored. `margin` is m for lsoftmax/sphereface (an integer), cosface and
// arcface (radians); combined uses m1, m2, m3; the cosine kinds use scale s.
struct MarginSpec {
  MarginKind kind = MarginKind::kLSoftmax;
  double margin = 4.0;
  double m1 = 1.0;
  double m2 = 0.0;
  double m3 = 0.0;
  double scale = 1.0;
  bool easy_margin = false;
};

// The number of entries of the flat parameter list.
constexpr int kMarginParams = 6;

struct KindProperties {
  bool uses_lambda;          // the target is blended with the plain one: (lambda f + ...) / (1 + lambda)
  bool normalizes_features;  // x -> x / max(|x|, eps) before the GEMM
  bool normalizes_weights;   // w_j -> w_j / max(|w_j|, eps) before the GEMM
  bool scaled;               // the logits are multiplied by the scale s
};

LSOFTMAX_HD KindProperties kind_properties(MarginKind kind) {
  switch (kind) {
    case MarginKind::kLSoftmax: return KindProperties{true, false, false, false};
    case MarginKind::kSphereFace: return KindProperties{true, false, true, false};
    case MarginKind::kCosFace:
    case MarginKind::kArcFace:
    case MarginKind::kCombined: return KindProperties{false, true, true, true};
  }
  return KindProperties{false, false, false, false};
}

// phi(c) and dphi/dc of one row.
template <typename T>
struct TargetTerms {
  T phi;
  T dphi;
};

namespace detail {

// cos(a theta + b) - d and its derivative in c = cos(theta), theta = acos(c) in [0, pi]. Where
// sin(theta) = 0 (c = +-1) d theta / dc is infinite; there the derivative is the limit of the
// finite factor, a^2 cos(a theta + b) (exact for b = 0, where the singularity cancels).
template <typename T>
LSOFTMAX_HD TargetTerms<T> shifted_cos(T c, double a, double b, double d) {
  const double cd = static_cast<double>(c);
  const double theta = std::acos(cd);
  const double s2 = 1.0 - cd * cd;
  const double sin_t = s2 > 0.0 ? std::sqrt(s2) : 0.0;
  const double u = a * theta + b;
  const double phi = std::cos(u) - d;
  const double dphi = sin_t > 0.0 ? a * std::sin(u) / sin_t : a * a * std::cos(u);
  return TargetTerms<T>{static_cast<T>(phi), static_cast<T>(dphi)};
}

}  // namespace detail

// phi(c) and phi'(c) for the spec's kind at c (clamped here), lambda blending included for the
// kinds that use it. The spec must have passed validate_margin_spec. For lsoftmax/sphereface the
// segment search costs O(m) cosines; `thresholds` (fill_segment_thresholds, m - 1 entries) or
// null.
template <typename T>
LSOFTMAX_HD TargetTerms<T> margin_target(const MarginSpec& spec, T c, T lam,
                                         const double* thresholds = nullptr) {
  c = clamp_cos(c);
  switch (spec.kind) {
    case MarginKind::kLSoftmax:
    case MarginKind::kSphereFace: {
      const int m = static_cast<int>(spec.margin);
      if (m == 1) return TargetTerms<T>{c, T(1)};
      const int k = thresholds != nullptr ? margin_segment(m, c, thresholds) : margin_segment(m, c);
      const PsiTerms<T> p = psi_terms(m, c, k);
      const T s = T(1) / (T(1) + lam);
      // c + (psi - c) s rather than (lambda c + psi) s: lambda = inf gives c, not inf/inf.
      return TargetTerms<T>{c + (p.psi - c) * s, T(1) + (p.dpsi - T(1)) * s};
    }
    case MarginKind::kCosFace:
      return TargetTerms<T>{c - static_cast<T>(spec.margin), T(1)};
    case MarginKind::kArcFace: {
      const double m = spec.margin;
      const double cd = static_cast<double>(c);
      if (spec.easy_margin ? !(cd > 0.0) : cd < std::cos(3.14159265358979323846 - m)) {
        // easy_margin keeps c where c <= 0; otherwise the linear fallback past theta + m = pi,
        // where cos(theta + m) would start to increase again.
        return TargetTerms<T>{spec.easy_margin ? c : static_cast<T>(cd - m * std::sin(m)), T(1)};
      }
      return detail::shifted_cos(c, 1.0, m, 0.0);
    }
    case MarginKind::kCombined:
      return detail::shifted_cos(c, spec.m1, spec.m2, spec.m3);
  }
  return TargetTerms<T>{c, T(1)};
}

// The row's scale a_i (see the table above) from |x_i| and |w_t|.
template <typename T>
LSOFTMAX_HD T margin_row_scale(const MarginSpec& spec, T norm_x, T norm_w) {
  switch (spec.kind) {
    case MarginKind::kLSoftmax: return norm_x * norm_w;
    case MarginKind::kSphereFace: return norm_x;
    default: return static_cast<T>(spec.scale);
  }
}

}  // namespace lsoftmax
