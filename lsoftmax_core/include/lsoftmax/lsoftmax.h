// The L-Softmax core (CPU): the per-row margin work around host-computed GEMMs.
//
//   forward : logits = x W^T (by the host), then margin_forward() rewrites one logit per row.
//   backward: grad_x = G W and grad_w = G^T x (by the host), then margin_backward() adds the
//             margin terms. Only G[i, y_i] is read, so the layer costs what a linear layer costs.
#pragma once

#include <cstdint>

#include "lsoftmax/parallel.h"
#include "lsoftmax/status.h"
#include "lsoftmax/views.h"

namespace lsoftmax {

// The largest margin accepted: the per-row work is O(m) and the segment search keeps m - 1
// thresholds, so an unbounded m would be an unbounded allocation.
constexpr int64_t kMaxMargin = int64_t{1} << 20;

// Checks margin in [1, kMaxMargin] and lambda >= 0 (not NaN); the message names the argument.
Status validate_margin_params(int64_t margin, double lambda);

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

}  // namespace lsoftmax
