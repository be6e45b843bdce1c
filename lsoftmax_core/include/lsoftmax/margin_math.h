// Scalar L-Softmax math shared by the CPU and CUDA code paths (host and device).
//
// Everything here works on one row: the target logit f = <x_i, w_t>, the norms |x_i| and |w_t|,
// the margin m and the blending weight lambda. The N x D x C products are the host's business.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define LSOFTMAX_HD __host__ __device__ __forceinline__
#else
#define LSOFTMAX_HD inline
#endif

namespace lsoftmax {

// Norms below this count as zero: the row gets no margin (m = 1), so that |w|/|x| and |x|/|w|
// in the gradient stay finite.
template <typename T>
LSOFTMAX_HD T degenerate_norm() {
  return std::sqrt(std::numeric_limits<T>::min());
}

// Segment k with theta in [k pi/m, (k+1) pi/m], found by comparing cos(theta) with the
// thresholds cos(j pi/m) (decreasing in j), so no acos is needed. At a threshold either
// neighbouring k gives the same psi and psi' (psi is C^1 there).
template <typename T>
LSOFTMAX_HD int margin_segment(int m, T c) {
  constexpr double kPi = 3.14159265358979323846;
  int k = 0;
  for (int j = 1; j < m; ++j) {
    if (static_cast<double>(c) < std::cos(kPi * j / m)) {
      k = j;
    } else {
      break;
    }
  }
  return k;
}

// The same from precomputed thresholds thr[j - 1] = cos(j pi/m), j = 1..m-1: a loop over many
// rows then pays for the m - 1 cosines once (fill_segment_thresholds).
template <typename T>
LSOFTMAX_HD int margin_segment(int m, T c, const double* thresholds) {
  int k = 0;
  while (k + 1 < m && static_cast<double>(c) < thresholds[k]) ++k;
  return k;
}

inline void fill_segment_thresholds(int m, double* thresholds) {
  constexpr double kPi = 3.14159265358979323846;
  for (int j = 1; j < m; ++j) thresholds[j - 1] = std::cos(kPi * j / m);
}

// T_m(c) = cos(m theta) and U_{m-1}(c) = sin(m theta) / sin(theta) by their three-term
// recurrences, exact for every m (the binomial expansion of older code is not).
template <typename T>
LSOFTMAX_HD void chebyshev_tu(int m, T c, T* t_m, T* u_m1) {
  T t_prev = T(1), t_cur = c;     // T_0, T_1
  T u_prev = T(0), u_cur = T(1);  // U_{-1}, U_0
  for (int n = 1; n < m; ++n) {
    const T t_next = T(2) * c * t_cur - t_prev;
    const T u_next = T(2) * c * u_cur - u_prev;
    t_prev = t_cur;
    t_cur = t_next;
    u_prev = u_cur;
    u_cur = u_next;
  }
  *t_m = t_cur;
  *u_m1 = u_cur;
}

template <typename T>
struct PsiTerms {
  T psi;   // (-1)^k cos(m theta) - 2k
  T dpsi;  // d psi / d cos(theta) = (-1)^k m U_{m-1}(cos theta)
  int k;
};

// psi and psi' of segment k (which must be the segment of c).
template <typename T>
LSOFTMAX_HD PsiTerms<T> psi_terms(int m, T c, int k) {
  PsiTerms<T> out;
  out.k = k;
  T tm, um1;
  chebyshev_tu(m, c, &tm, &um1);
  const T sign = (k % 2 == 0) ? T(1) : T(-1);
  out.psi = sign * tm - T(2) * T(k);  // in T: 2 k cannot overflow int for any segment
  out.dpsi = sign * T(m) * um1;
  return out;
}

template <typename T>
LSOFTMAX_HD PsiTerms<T> psi_terms(int m, T c) {
  return psi_terms(m, c, margin_segment(m, c));
}

template <typename T>
LSOFTMAX_HD T clamp_cos(T c) {
  return c > T(1) ? T(1) : (c < T(-1) ? T(-1) : c);
}

template <typename T>
LSOFTMAX_HD bool is_degenerate(T norm_x, T norm_w) {
  return !(norm_x >= degenerate_norm<T>() && norm_w >= degenerate_norm<T>());
}

// The margin target logit g = (lambda f + |x||w| psi) / (1 + lambda), for a row whose
// cos(theta) = c lies in segment k (the row must not be degenerate).
template <typename T>
LSOFTMAX_HD T margin_logit_at(T f, T prod, T c, int k, int m, T lam) {
  const PsiTerms<T> p = psi_terms(m, c, k);
  // f + (|x||w| psi - f) / (1 + lambda) rather than (lambda f + |x||w| psi) / (1 + lambda): the
  // same value, but lambda = inf (or a lambda that overflows T) gives f instead of inf/inf = NaN.
  return f + (prod * p.psi - f) / (T(1) + lam);
}

template <typename T>
LSOFTMAX_HD T margin_logit(T f, T norm_x, T norm_w, int m, T lam) {
  if (m == 1 || is_degenerate(norm_x, norm_w)) return f;
  const T prod = norm_x * norm_w;
  const T c = clamp_cos(f / prod);
  return margin_logit_at(f, prod, c, margin_segment(m, c), m, lam);
}

// Backward coefficients of one row, for an incoming gradient G = dL/dg of the target logit.
// With s = 1/(1+lambda) and r = psi - c psi':
//   dL/dx_i = [s (lambda + psi') G] w_t + [s G r |w|/|x|] x_i
//   dL/dw_t = [s (lambda + psi') G] x_i + [s G r |x|/|w|] w_t
// The plain GEMMs already carry G w_t and G x_i, so the row adds `delta` = the first bracket
// minus G, and the two rank-one terms `coef_x` and `coef_w`.
template <typename T>
struct RowGrad {
  T delta;
  T coef_x;
  T coef_w;
};

// Row coefficients for a non-degenerate row whose cos(theta) = c lies in segment k.
template <typename T>
LSOFTMAX_HD RowGrad<T> margin_row_grad_at(T c, int k, T norm_x, T norm_w, int m, T lam, T g) {
  RowGrad<T> out;
  const PsiTerms<T> p = psi_terms(m, c, k);
  const T s = T(1) / (T(1) + lam);
  const T sgr = s * g * (p.psi - c * p.dpsi);
  out.delta = s * (p.dpsi - T(1)) * g;  // s (lambda + psi') G - G, without the cancellation
  out.coef_x = sgr * (norm_w / norm_x);
  out.coef_w = sgr * (norm_x / norm_w);
  return out;
}

template <typename T>
LSOFTMAX_HD RowGrad<T> margin_row_grad(T f, T norm_x, T norm_w, int m, T lam, T g) {
  if (m == 1 || is_degenerate(norm_x, norm_w)) return RowGrad<T>{T(0), T(0), T(0)};
  const T c = clamp_cos(f / (norm_x * norm_w));
  return margin_row_grad_at(c, margin_segment(m, c), norm_x, norm_w, m, lam, g);
}

}  // namespace lsoftmax
