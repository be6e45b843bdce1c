// The fused margin cross-entropy (CPU): the per-block work of a loss that streams over blocks of
// classes and never holds the N x C logits.
//
// For each block of classes [class_begin, class_begin + B) the host computes the block's logits
// x W_block^T (an N x B GEMM); these functions then finish the block in place:
//
//   forward : fused_lse_block folds the block into a per-row online log-sum-exp (running max and
//             sum of exponentials), with each row's target logit replaced by its margin logit;
//   backward: fused_grad_block turns the recomputed block into dL/dlogits = scale_i (softmax -
//             onehot), which the host feeds to the two gradient GEMMs of the block.
//
// The margin logit of each row (`target_logit`) and its gradient terms are the ordinary layer's
// (margin_forward / margin_backward on the N target entries only): the margin math has one home.
// Labels outside the block are simply not targets here, so a class-sharded caller can pass
// labels relative to its shard (negative or >= its class count for rows it does not own).
#pragma once

#include <cstdint>

#include "lsoftmax/status.h"
#include "lsoftmax/views.h"

namespace lsoftmax {

// block (N x B) holds x W_block^T on entry. Row i's entry labels[i] - class_begin, when inside
// the block, is overwritten by target_logit[i]; then row_max[i] and row_sum[i] (the running max
// and sum of exp(v - max), start at -inf and 0) absorb the block. NaN inputs give a NaN sum.
template <typename T, typename L>
Status fused_lse_block(MatrixView<T> block, LabelView<L> labels, int64_t class_begin,
                       const T* target_logit, double* row_max, double* row_sum);

// block (N x B) holds x W_block^T on entry; on return it holds
//   scale[i] * (exp(v_ij - lse[i]) - [j is row i's target]),
// v being the block with the target entries replaced by target_logit, as in fused_lse_block.
template <typename T, typename L>
Status fused_grad_block(MatrixView<T> block, LabelView<L> labels, int64_t class_begin,
                        const T* target_logit, const double* lse, const T* scale);

}  // namespace lsoftmax
