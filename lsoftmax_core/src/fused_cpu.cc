// CPU per-block kernels of the fused margin cross-entropy (see lsoftmax/fused.h).
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "checks.h"
#include "fast_exp.h"
#include "lsoftmax/fused.h"
#include "parallel.h"

namespace lsoftmax {
namespace {

// Partial sums and maxima in a fixed number of lanes: one running accumulator is a chain of
// dependent operations the compiler cannot vectorize (no -ffast-math here); the fixed lane order
// keeps results independent of the thread count.
constexpr int kLanes = 8;

template <bool kUnit, typename T>
T row_max(const T* v, int64_t stride, int64_t n) {
  if (kUnit) stride = 1;
  T acc[kLanes];
  for (int k = 0; k < kLanes; ++k) acc[k] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const T e = v[(j + k) * stride];
      acc[k] = e > acc[k] ? e : acc[k];  // NaN never wins here; it shows in the sum instead
    }
  }
  for (; j < n; ++j) acc[0] = v[j * stride] > acc[0] ? v[j * stride] : acc[0];
  T m = acc[0];
  for (int k = 1; k < kLanes; ++k) m = acc[k] > m ? acc[k] : m;
  return m;
}

// sum_j exp(v_j - shift), exponentials in T, summed in double. The exponentials of a tile are
// computed in one loop and summed in another: the conversion to double in the same loop kept
// the exp from vectorizing. Element j goes to lane j % kLanes, in index order, whatever the
// thread count.
template <bool kUnit, typename T>
double row_exp_sum(const T* v, int64_t stride, int64_t n, T shift) {
  if (kUnit) stride = 1;
  constexpr int kTile = 8 * kLanes;
  double acc[kLanes] = {};
  T e[kTile];
  int64_t j = 0;
  for (; j + kTile <= n; j += kTile) {
    for (int t = 0; t < kTile; ++t) {
      e[t] = detail::exp_fast(static_cast<T>(v[(j + t) * stride] - shift));
    }
    for (int t = 0; t < kTile; t += kLanes) {
      for (int k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(e[t + k]);
    }
  }
  for (; j < n; ++j) {
    acc[j % kLanes] += static_cast<double>(detail::exp_fast(static_cast<T>(v[j * stride] - shift)));
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// v_j <- scale * exp(v_j - lse); the difference is taken in double so that a large lse does not
// round the exponent of the largest probabilities.
template <bool kUnit, typename T>
void row_softmax_scaled(T* v, int64_t stride, int64_t n, double lse, T scale) {
  if (kUnit) stride = 1;
  for (int64_t j = 0; j < n; ++j) {
    const T d = static_cast<T>(static_cast<double>(v[j * stride]) - lse);
    v[j * stride] = scale * detail::exp_fast(d);
  }
}

template <typename T, typename L>
Status check_block(const MatrixView<T>& block, const LabelView<L>& labels, int64_t class_begin,
                   const void* target_logit, const void* a, const void* b) {
  if (Status s = detail::check_label_count(labels.size, block.rows); !s.ok()) return s;
  if (class_begin < 0) {
    return Status::InvalidArgument("class_begin must be >= 0, got " + std::to_string(class_begin));
  }
  if (block.rows > 0 && (target_logit == nullptr || a == nullptr || b == nullptr)) {
    return Status::InvalidArgument("the per-row arrays must not be null");
  }
  return Status::Ok();
}

// Row i's target column inside the block, or -1.
template <typename L>
int64_t target_column(const LabelView<L>& labels, int64_t i, int64_t class_begin, int64_t cols) {
  const int64_t j = static_cast<int64_t>(labels[i]) - class_begin;
  return (j >= 0 && j < cols) ? j : -1;
}

}  // namespace

template <typename T, typename L>
Status fused_lse_block(MatrixView<T> block, LabelView<L> labels, int64_t class_begin,
                       const T* target_logit, double* row_max_io, double* row_sum_io) {
  if (Status s = check_block(block, labels, class_begin, target_logit, row_max_io, row_sum_io);
      !s.ok()) {
    return s;
  }
  const int64_t b = block.cols;
  if (b == 0) return Status::Ok();
  const bool unit = block.col_stride == 1;
  detail::parallel_for(block.rows, 4 * b, [&](int64_t i) {
    T* row = block.data + i * block.row_stride;
    const int64_t cs = block.col_stride;
    const int64_t jt = target_column(labels, i, class_begin, b);
    if (jt >= 0) row[jt * cs] = target_logit[i];
    const T m = unit ? row_max<true>(row, 1, b) : row_max<false>(row, cs, b);
    const double old_max = row_max_io[i];
    const double new_max = std::max(old_max, static_cast<double>(m));
    const double sum = unit ? row_exp_sum<true>(row, 1, b, static_cast<T>(new_max))
                            : row_exp_sum<false>(row, cs, b, static_cast<T>(new_max));
    // old_max == new_max also covers the first block (-inf): no exp(-inf - -inf) = NaN.
    const double carried = old_max == new_max ? row_sum_io[i]
                                              : row_sum_io[i] * std::exp(old_max - new_max);
    row_sum_io[i] = carried + sum;
    row_max_io[i] = new_max;
  });
  return Status::Ok();
}

template <typename T, typename L>
Status fused_grad_block(MatrixView<T> block, LabelView<L> labels, int64_t class_begin,
                        const T* target_logit, const double* lse, const T* scale) {
  if (Status s = check_block(block, labels, class_begin, target_logit, lse, scale); !s.ok()) {
    return s;
  }
  const int64_t b = block.cols;
  if (b == 0) return Status::Ok();
  const bool unit = block.col_stride == 1;
  detail::parallel_for(block.rows, 4 * b, [&](int64_t i) {
    T* row = block.data + i * block.row_stride;
    const int64_t cs = block.col_stride;
    const int64_t jt = target_column(labels, i, class_begin, b);
    if (jt >= 0) row[jt * cs] = target_logit[i];
    if (unit) {
      row_softmax_scaled<true>(row, 1, b, lse[i], scale[i]);
    } else {
      row_softmax_scaled<false>(row, cs, b, lse[i], scale[i]);
    }
    if (jt >= 0) row[jt * cs] -= scale[i];
  });
  return Status::Ok();
}

#define LSOFTMAX_INSTANTIATE(T, L)                                                         \
  template Status fused_lse_block<T, L>(MatrixView<T>, LabelView<L>, int64_t, const T*,   \
                                        double*, double*);                                \
  template Status fused_grad_block<T, L>(MatrixView<T>, LabelView<L>, int64_t, const T*,  \
                                         const double*, const T*);
LSOFTMAX_INSTANTIATE(float, int32_t)
LSOFTMAX_INSTANTIATE(float, int64_t)
LSOFTMAX_INSTANTIATE(double, int32_t)
LSOFTMAX_INSTANTIATE(double, int64_t)
#undef LSOFTMAX_INSTANTIATE

}  // namespace lsoftmax
