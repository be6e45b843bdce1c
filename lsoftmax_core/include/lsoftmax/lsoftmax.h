// The L-Softmax core (CPU): the per-row margin work around host-computed GEMMs.
//
//   forward : logits = x W^T (by the host), then margin_forward() rewrites one logit per row.
//   backward: grad_x = G W and grad_w = G^T x (by the host), then margin_backward() adds the
//             margin terms. Only G[i, y_i] is read, so the layer costs what a linear layer costs.
#pragma once

#include <cstdint>

#include "lsoftmax/margin_family.h"
#include "lsoftmax/parallel.h"
#include "lsoftmax/status.h"
#include "lsoftmax/views.h"

namespace lsoftmax {

// The largest margin accepted: the per-row work is O(m) and the segment search keeps m - 1
// thresholds, so an unbounded m would be an unbounded allocation.
constexpr int64_t kMaxMargin = int64_t{1} << 20;

// Checks margin in [1, kMaxMargin] and lambda >= 0 (not NaN); the message names the argument.
// The L-Softmax case of validate_margin_spec (one rule, one message).
Status validate_margin_params(int64_t margin, double lambda);

// --- The margin family (margin_family.h has the math) -----------------------------------------

// The one rule for a margin specification, worded once for every adapter (Python, torch, ONNX):
// lambda >= 0 and not NaN (every kind; only the psi kinds use it), an integer margin in
// [1, 2^20] for the psi kinds (lsoftmax, sphereface), a finite scale > 0 for the cosine kinds,
// easy_margin for arcface only, and each kind's own ranges (src/margin_family_cpu.cc).
Status validate_margin_spec(const MarginSpec& spec, double lambda);

// The kinds' names ("lsoftmax", "sphereface", "cosface", "arcface", ...).
const char* margin_kind_name(MarginKind kind);
Status parse_margin_kind(const char* name, MarginKind* out);

// A spec from its kind name and the flat parameters [margin, m1, m2, m3, scale, easy_margin]
// (`count` must be 6; easy_margin 0 or 1), validated with validate_margin_spec(spec, 0).
Status make_margin_spec(const char* kind, const double* params, int64_t count, MarginSpec* out);

// phi[i] = phi(c[i]), dphi[i] = phi'(c[i]) for n cosines (dphi may be null): the per-row target
// math for hosts that compute the cosines themselves (torch, numpy). Validates the spec.
template <typename T>
Status margin_family_targets(const MarginSpec& spec, double lambda, const T* cos_theta, int64_t n,
                             T* phi, T* dphi);

// out[i] = in[i] / max(|in[i]|, eps) with eps = degenerate_norm<T>(); norms[i] = |in[i]| when
// norms is not null. `out` may be `in` (same view). The normalization of the normalizing kinds.
template <typename T>
Status normalize_rows(MatrixView<const T> in, MatrixView<T> out, T* norms = nullptr);

// The family's forward around a host GEMM. x and w are the RAW inputs; logits holds the kind's
// plain logits on entry (x W^T for lsoftmax; x Wn^T for sphereface; s Xn Wn^T for the cosine
// kinds, with Xn, Wn from normalize_rows). On return logits[i, labels[i]] = a_i phi(c_i), with
// c_i and the norms recomputed here from x and w in double. Rows with |x_i| or |w_t| below
// degenerate_norm keep their plain logit. lsoftmax is exactly margin_forward.
template <typename T, typename L>
Status margin_family_forward(const MarginSpec& spec, double lambda, MatrixView<const T> x,
                             MatrixView<const T> w, LabelView<L> labels, MatrixView<T> logits);

// Optional per-row outputs of the forward (any pointer may be null): the norms, the clamped
// cosine of the target angle and its segment k. Degenerate rows report k = -1.
template <typename T>
struct RowStats {
  T* norm_x = nullptr;
  T* norm_w = nullptr;
  T* cos_theta = nullptr;
  int32_t* segment = nullptr;
};

// logits holds x W^T on entry (N x C); on return logits[i, labels[i]] is the margin logit.
// Labels are checked against [0, C) before anything is written.
template <typename T, typename L>
Status margin_forward(MatrixView<const T> x, MatrixView<const T> w, LabelView<L> labels,
                      MatrixView<T> logits, int64_t margin, double lambda,
                      RowStats<T> stats = RowStats<T>());

// grad_x holds G W (N x D) and grad_w holds G^T x (C x D) on entry; the margin terms are added.
// grad_w rows shared by several samples are summed in sample order, so results do not depend
// on the thread count. `forward_stats`, when all four arrays are given (as margin_forward
// filled them for the same x, w, labels), saves recomputing the norms and cosines.
template <typename T, typename L>
Status margin_backward(MatrixView<const T> grad_logits, MatrixView<const T> x,
                       MatrixView<const T> w, LabelView<L> labels, MatrixView<T> grad_x,
                       MatrixView<T> grad_w, int64_t margin, double lambda,
                       RowStats<T> forward_stats = RowStats<T>());

// margin_backward for hosts that fold the margin into their GEMMs, which pays when there are
// fewer classes than features: it adds each row's w-direction term to its target entry of
// grad_logits (a copy of G that the host owns, N x C, rewritten in place), so that the host's
// grad_x = G' W and grad_w = G'^T x carry it, and returns the two rank-one coefficients for the
// host to add: grad_x[i] += coef_x[i] x[i] (N values) and grad_w[c] += coef_w_by_class[c] w[c]
// (C values, each summed over the class's samples in sample order). Degenerate rows, and every
// row for margin 1, leave G' unchanged and get zero coefficients.
template <typename T, typename L>
Status margin_backward_fold(MatrixView<T> grad_logits, MatrixView<const T> x,
                            MatrixView<const T> w, LabelView<L> labels, T* coef_x,
                            T* coef_w_by_class, int64_t margin, double lambda,
                            RowStats<T> forward_stats = RowStats<T>());

// logits = x W^T, each entry a dot product in T over fixed lanes (every instruction-set build
// rounds alike), parallel over classes from about 2^17 multiply-adds per range. For hosts
// whose GEMM is slow for a few rows: ORT's Gemm packs an unpacked W on every call, and for one
// row that copy costs more than the product (single-sample inference).
template <typename T>
Status plain_logits(MatrixView<const T> x, MatrixView<const T> w, MatrixView<T> logits);

// y[i, :] += coef[i] * u[i, :] for every row with coef[i] != 0 (y and u of one shape, y not
// overlapping u): the rank-one terms that margin_backward_fold returns, for hosts whose own
// broadcast multiply-add over the whole matrix costs more than this pass over the rows it
// touches.
template <typename T>
Status add_scaled_rows(MatrixView<T> y, const T* coef, MatrixView<const T> u);

}  // namespace lsoftmax
