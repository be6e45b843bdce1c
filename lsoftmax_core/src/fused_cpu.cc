// CPU per-block kernels of the fused margin cross-entropy (see lsoftmax/fused.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "checks.h"
#include "fast_exp.h"
#include "isa_clones.h"
#include "lsoftmax/fused.h"
#include "parallel.h"

namespace lsoftmax {
namespace {

// Partial sums and maxima in a fixed number of lanes: one running accumulator is a chain of
// dependent operations the compiler cannot vectorize (no -ffast-math here); element j goes to
// lane j % kLanes, in index order, so results do not depend on the thread count, the stride or
// the instruction set.
constexpr int kLanes = 8;

// The lanes as one SIMD value (isa_clones.h): written as scalar lane arrays, GCC kept the
// maxima in cmov chains and the double sums in scalar adds (0.5 and 1.1 ns per element at
// AVX-512, against 0.13 and 0.53 as vectors).
template <typename T>
using Lanes = typename detail::VectorOf<T, kLanes>::type;
using DoubleLanes = Lanes<double>;

double lane_sum(const double (&a)[kLanes]) {
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

// NaN never wins a comparison here; it shows in the sum instead.
template <typename T>
inline T larger(T e, T m) {
  return e > m ? e : m;
}

template <typename T>
T row_max_strided(const T* v, int64_t stride, int64_t n) {
  T acc[kLanes];
  for (int k = 0; k < kLanes; ++k) acc[k] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] = larger(v[(j + k) * stride], acc[k]);
  }
  for (; j < n; ++j) acc[0] = larger(v[j * stride], acc[0]);
  T m = acc[0];
  for (int k = 1; k < kLanes; ++k) m = larger(acc[k], m);
  return m;
}

template <typename T>
inline __attribute__((always_inline)) T row_max_unit(const T* v, int64_t n) {
  Lanes<T> acc;
  for (int k = 0; k < kLanes; ++k) acc[k] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Lanes<T> e;
    std::memcpy(&e, v + j, sizeof(e));
    acc = e > acc ? e : acc;
  }
  T m = acc[0];
  for (; j < n; ++j) m = larger(v[j], m);
  for (int k = 1; k < kLanes; ++k) m = larger(acc[k], m);
  return m;
}

// sum_j exp(v_j - shift), exponentials in T, summed in double. The exponentials of a tile are
// computed in one loop and summed in another: the conversion to double in the same loop kept
// the exp from vectorizing.
constexpr int kTile = 8 * kLanes;

template <typename T>
double row_exp_sum_strided(const T* v, int64_t stride, int64_t n, T shift) {
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
  return lane_sum(acc);
}

template <typename T>
inline __attribute__((always_inline)) double row_exp_sum_unit(const T* v, int64_t n, T shift) {
  DoubleLanes lanes = {};
  T e[kTile];
  int64_t j = 0;
  for (; j + kTile <= n; j += kTile) {
    for (int t = 0; t < kTile; ++t) e[t] = detail::exp_fast(static_cast<T>(v[j + t] - shift));
    for (int t = 0; t < kTile; t += kLanes) {
      Lanes<T> x;
      std::memcpy(&x, e + t, sizeof(x));
      lanes += __builtin_convertvector(x, DoubleLanes);
    }
  }
  double acc[kLanes];
  std::memcpy(acc, &lanes, sizeof(acc));
  for (; j < n; ++j) {
    acc[j % kLanes] += static_cast<double>(detail::exp_fast(static_cast<T>(v[j] - shift)));
  }
  return lane_sum(acc);
}

// v_j <- scale * exp(v_j - lse); the difference is taken in double so that a large lse does not
// round the exponent of the largest probabilities.
template <typename T>
inline __attribute__((always_inline)) void row_softmax_scaled(T* v, int64_t stride, int64_t n,
                                                              double lse, T scale) {
  for (int64_t j = 0; j < n; ++j) {
    const T d = static_cast<T>(static_cast<double>(v[j * stride]) - lse);
    v[j * stride] = scale * detail::exp_fast(d);
  }
}

// The unit-stride rows, where the loss spends its kernel time, per instruction set: baseline
// x86-64 (SSE2) computes four float exponentials per instruction, AVX-512 sixteen. The strided
// rows take the baseline build of the same arithmetic in the same lanes (see isa_clones.h).
LSOFTMAX_ISA_CLONES float max_unit(const float* v, int64_t n) { return row_max_unit(v, n); }
LSOFTMAX_ISA_CLONES double max_unit(const double* v, int64_t n) { return row_max_unit(v, n); }
LSOFTMAX_ISA_CLONES double exp_sum_unit(const float* v, int64_t n, float shift) {
  return row_exp_sum_unit(v, n, shift);
}
LSOFTMAX_ISA_CLONES double exp_sum_unit(const double* v, int64_t n, double shift) {
  return row_exp_sum_unit(v, n, shift);
}
LSOFTMAX_ISA_CLONES void softmax_scaled_unit(float* v, int64_t n, double lse, float scale) {
  row_softmax_scaled(v, 1, n, lse, scale);
}
LSOFTMAX_ISA_CLONES void softmax_scaled_unit(double* v, int64_t n, double lse, double scale) {
  row_softmax_scaled(v, 1, n, lse, scale);
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
    const T m = unit ? max_unit(row, b) : row_max_strided(row, cs, b);
    const double old_max = row_max_io[i];
    const double new_max = std::max(old_max, static_cast<double>(m));
    const double sum = unit ? exp_sum_unit(row, b, static_cast<T>(new_max))
                            : row_exp_sum_strided(row, cs, b, static_cast<T>(new_max));
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
      softmax_scaled_unit(row, b, lse[i], scale[i]);
    } else {
      row_softmax_scaled(row, cs, b, lse[i], scale[i]);
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
