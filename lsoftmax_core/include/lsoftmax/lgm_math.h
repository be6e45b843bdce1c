// Scalar L-GM math shared by the CPU (src/lgm_cpu.cc) and CUDA (cuda/lgm_cuda.cu) assembly,
// usable from host and device code. The layout of the work (which GEMMs the host runs, which
// terms the core adds) is described in lgm.h; everything here is one entry, one row or one
// class, and runs in double whatever the storage type is.
#pragma once

#include <cmath>

#include "lsoftmax/margin_math.h"  // LSOFTMAX_HD

namespace lsoftmax {

// An expansion entry whose error bound exceeds this many times its value is recomputed directly.
constexpr double kLgmDirectRatio = 16.0;

// One term of the direct distance 2 d = sum_j (x_j - mu_j)^2 p_j.
LSOFTMAX_HD double lgm_direct_term(double x, double mu, double p) {
  const double diff = x - mu;
  return diff * diff * p;
}

// 2 d_ik from the expansion A_ik - 2 B_ik + c_k. Its rounding error is bounded by a small
// multiple of eps (sqrt(A) + sqrt(c))^2 (Cauchy-Schwarz on B); *needs_direct says that bound
// exceeds kLgmDirectRatio times the value (or the value is NaN), so the caller must recompute
// the entry from direct differences.
LSOFTMAX_HD double lgm_expansion_d2(double a, double b, double ck, bool* needs_direct) {
  // A is a sum of squares; a GEMM can round it below zero. Written so that NaN stays NaN.
  a = a < 0.0 ? 0.0 : a;
  const double d2 = a - 2.0 * b + ck;
  const double root = std::sqrt(a) + std::sqrt(ck);
  *needs_direct = !(d2 * kLgmDirectRatio >= root * root);
  return d2;
}

// d = 1/2 max(2 d, 0): rounding can leave a direct or expanded 2 d slightly negative. A NaN
// (a NaN feature or parameter) stays NaN: it must never read as distance 0, the best score.
LSOFTMAX_HD double lgm_half_distance(double d2) { return 0.5 * (d2 < 0.0 ? 0.0 : d2); }

// z_ik = -(1 + alpha [k = y_i]) d_ik - [include_logdet] h_k.
LSOFTMAX_HD double lgm_logit(double d, bool is_target, double alpha, bool include_logdet,
                             double h) {
  const double scale = is_target ? 1.0 + alpha : 1.0;
  return -scale * d - (include_logdet ? h : 0.0);
}

// The score argmax_k picks the predicted class by: -d_ik - h_k, read back from a stored logit
// z_ik (no labels, so no margin) so that every pass picks the same class bit for bit.
LSOFTMAX_HD double lgm_prediction_score(double stored_logit, double h, bool include_logdet) {
  return stored_logit - (include_logdet ? 0.0 : h);
}

// Whether score v (class k) beats the best so far (class best_k): strictly greater, or equal
// with a smaller index, so any reduction order picks the first maximum. A NaN score beats every
// number (the first NaN wins among NaNs), so a row with a NaN distance reports a NaN
// log-likelihood instead of the best of its finite scores: NaN propagates, as in L-Softmax.
LSOFTMAX_HD bool lgm_prediction_better(double v, long long k, double best_v, long long best_k) {
  const bool v_nan = v != v, best_nan = best_v != best_v;
  if (v_nan || best_nan) return v_nan && (!best_nan || k < best_k);
  return v > best_v || (v == best_v && k < best_k);
}

// h_k contribution of one log-variance entry: h_k = 1/2 sum_j log_var_kj for diagonal
// variances, D/2 log_var_k for isotropic ones (see lgm_half_logdet_isotropic).
LSOFTMAX_HD double lgm_half_logdet_from_sum(double log_var_sum) { return 0.5 * log_var_sum; }
LSOFTMAX_HD double lgm_half_logdet_isotropic(double log_var, long long feat_dim) {
  return 0.5 * static_cast<double>(feat_dim) * log_var;
}

// Precision p = exp(-log_var).
LSOFTMAX_HD double lgm_precision(double log_var) { return std::exp(-log_var); }

// Backward coefficient W_ik = dL/dd_ik from the incoming gradient of the logit (before the
// own-class split): -(1 + alpha [k = y_i]) G_ik.
LSOFTMAX_HD double lgm_coeff(double grad_logit, bool is_target, double alpha) {
  return -(is_target ? 1.0 + alpha : 1.0) * grad_logit;
}

// dL/dh_k contribution of one logit gradient: -[include_logdet] G_ik.
LSOFTMAX_HD double lgm_grad_h_term(double grad_logit, bool include_logdet) {
  return include_logdet ? -grad_logit : 0.0;
}

// grad_x_ij = xc_ij WP_ij - WMP_ij + own_i p_cj (x_ij - mu_cj).
LSOFTMAX_HD double lgm_grad_x(double xc, double wp, double wmp, double own, double p_own,
                              double diff_own) {
  return xc * wp - wmp + own * p_own * diff_own;
}

// grad_mu_kj = -p_kj (WTX_kj - muc_kj colsum_k + s1_kj), s1 the direct own-class sum
// sum_{i: c_i = k} own_i (x_ij - mu_kj).
LSOFTMAX_HD double lgm_grad_mean(double p, double wtx, double muc, double colsum, double s1) {
  return -p * (wtx - muc * colsum + s1);
}

// The part of grad_lv_kj's bracket that does not come from WTX2:
// -2 muc WTX + muc^2 colsum + s2, s2 = sum_{i: c_i = k} own_i (x_ij - mu_kj)^2.
LSOFTMAX_HD double lgm_log_var_bracket(double wtx, double muc, double colsum, double s2) {
  return -2.0 * muc * wtx + muc * muc * colsum + s2;
}

// grad_lv = -1/2 p (WTX2 + bracket) + logdet_mult/2 dh, with logdet_mult 1 for a diagonal entry
// and D for the isotropic variance (whose bracket is summed over j).
LSOFTMAX_HD double lgm_grad_log_var(double p, double wtx2, double bracket, double logdet_mult,
                                    double grad_h) {
  return -0.5 * p * (wtx2 + bracket) + 0.5 * logdet_mult * grad_h;
}

}  // namespace lsoftmax
