// The L-GM core (CPU): the O(N*C + C*D) assembly around host-computed GEMMs.
//
// With precisions p = exp(-log_var) (C x Dv, Dv = D diagonal or 1 isotropic), a common offset o
// (D) and centred xc = x - o, muc = mu - o (distances do not change under a common shift):
//
//   2 d_ik = sum_j xc_ij^2 p_kj - 2 sum_j xc_ij muc_kj p_kj + sum_j muc_kj^2 p_kj
//          =      A_ik          -        2 B_ik             +      c_k
//
// A = xc^2 @ p^T (diagonal only) and B = xc @ (muc p)^T are the host's GEMMs; lgm_prepare()
// gives the host o, p and muc p. The core adds c_k, the margin and the log-determinant, and
// guards the expansion against cancellation: its rounding error is bounded by a small multiple
// of eps * (sqrt(A_ik) + sqrt(c_k))^2 (Cauchy-Schwarz on B), so wherever that bound exceeds
// kLgmDirectRatio * 2 d_ik the entry is recomputed from direct differences (x_ij - mu_kj), in
// double. Centring on the mean of the class means keeps those recomputations to the entries
// where x is close to mu_k (about one per row once training has converged).
//
// Backward (incoming G = dL/dlogits, g = dL/dloglik): lgm_backward_coeffs() gives
// W = dL/dd (N x C) without each row's own-class entry (kept apart, see below), its column
// sums and dL/dh_k (h_k = 1/2 sum_j log_var_kj); the host then
// computes WP = W @ p, WMP = W @ (muc p), WTX = W^T @ xc, WTX2 = W^T @ xc^2 (diagonal) or
// W^T @ |xc|^2 (isotropic), and lgm_backward_assemble() turns them into the gradients:
//   grad_x_ij  = xc_ij WP_ij - WMP_ij
//   grad_mu_kj = -p_kj (WTX_kj - muc_kj colsum_k)
//   grad_lv_kj = -1/2 p_kj (WTX2_kj - 2 muc_kj WTX_kj + muc_kj^2 colsum_k) + 1/2 dh_k
// (isotropic: the j-sums collapse and the log-det term is D/2 dh_k), plus the own-class terms
// summed from direct differences.
#pragma once

#include <cstdint>

#include "lsoftmax/lgm_math.h"  // the scalar math, shared with the CUDA core
#include "lsoftmax/status.h"
#include "lsoftmax/views.h"

namespace lsoftmax {

// alpha >= 0 (not NaN); the message names the argument.
Status validate_lgm_alpha(double alpha);
// lambda_lkd >= 0 (not NaN).
Status validate_lgm_lambda(double lambda_lkd);

// Checks every variance is finite and > 0 and writes log(variances) to log_var (same shape).
template <typename T>
Status lgm_log_var_from_variances(MatrixView<const T> variances, MatrixView<T> log_var);

// O(C*D): offset (D) = mean of the class means; precision (C x Dv) = exp(-log_var);
// scaled_means (C x D) = (means - offset) * precision. Rejects non-finite log_var and shapes
// that do not match (log_var must be (C, D) or (C, 1)).
template <typename T>
Status lgm_prepare(MatrixView<const T> means, MatrixView<const T> log_var, T* offset,
                   MatrixView<T> precision, MatrixView<T> scaled_means);

// logits holds B on entry (N x C) and the logits on return:
//   z_ik = -(1 + alpha [k = y_i]) d_ik - [include_logdet] h_k.
// sq_term is A (N x C) for diagonal variances and must be empty (rows = 0) for isotropic ones.
// labels.data == nullptr means no labels: no margin, and loglik[i] is the log-likelihood of the
// predicted class argmax_k (-d_ik - h_k); with labels it is that of the label: -(d_iy + h_y).
// offset must be the one lgm_prepare() returned for these means. Returns, through
// n_direct (may be null), how many entries were recomputed from direct differences.
template <typename T, typename L>
Status lgm_forward(MatrixView<const T> x, MatrixView<const T> means, MatrixView<const T> log_var,
                   const T* offset, MatrixView<const T> sq_term, LabelView<L> labels,
                   MatrixView<T> logits, T* loglik, double alpha, bool include_logdet,
                   int64_t* n_direct = nullptr);

// Splits W = dL/dd into each row's own-class entry own[i] = W_{i,c_i} (c_i: the label, or the
// predicted class without labels, returned in cls) and the rest, coeff (N x C, zero at c_i),
// with its column sums colsum (C); grad_h (C) = dL/dh_k. logits is the forward's output (it
// decides the predicted class exactly as the forward did); grad_loglik may be null. Columns
// are summed in row order by one thread each, so results do not depend on the thread count.
//
// Why the split: a sample sits close to its own class mean, where the GEMM expansion of
// sum_i W_ik (x_ij - mu_kj)^2 cancels badly (well-separated classes: ~|mu|^2/sigma^2); the
// own-class terms are one per row, so lgm_backward_assemble() sums them from direct
// differences in O(N*D) and only the far-class rest goes through the host's GEMMs.
template <typename T, typename L>
Status lgm_backward_coeffs(MatrixView<const T> grad_logits, const T* grad_loglik,
                           MatrixView<const T> logits, MatrixView<const T> log_var,
                           int64_t feat_dim, LabelView<L> labels, double alpha,
                           bool include_logdet, MatrixView<T> coeff, T* colsum, T* grad_h,
                           T* own, int64_t* cls);

// The gradients from the host's four GEMMs of coeff (see the top of this file) plus the direct
// own-class terms. wp: N x Dv, wmp: N x D, wtx: C x D, wtx2: C x Dv. Outputs: grad_x N x D,
// grad_means C x D, grad_log_var C x Dv.
template <typename T>
Status lgm_backward_assemble(MatrixView<const T> x, MatrixView<const T> means,
                             MatrixView<const T> log_var, const T* offset, const T* colsum,
                             const T* grad_h, const T* own, const int64_t* cls,
                             MatrixView<const T> wp, MatrixView<const T> wmp,
                             MatrixView<const T> wtx, MatrixView<const T> wtx2,
                             MatrixView<T> grad_x, MatrixView<T> grad_means,
                             MatrixView<T> grad_log_var);

}  // namespace lsoftmax
