// CPU implementation of the per-row L-Softmax work; the math itself is in margin_math.h.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "lsoftmax/lsoftmax.h"
#include "checks.h"
#include "lsoftmax/margin_math.h"
#include "parallel.h"

namespace lsoftmax {
namespace {

// Eight partial sums in a fixed order: one running sum is a chain of dependent adds that costs
// the full add latency per element (this loop dominated the layer's overhead); the fixed order
// keeps results independent of the thread count. kUnit lets the compiler vectorize the common
// contiguous case.
constexpr int kLanes = 8;

inline double lane_sum(const double (&acc)[kLanes]) {
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

template <bool kUnit, typename T>
double dot_strided(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
  if (kUnit) sa = sb = 1;
  double acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      acc[k] += static_cast<double>(a[(d + k) * sa]) * static_cast<double>(b[(d + k) * sb]);
    }
  }
  for (; d < n; ++d) acc[0] += static_cast<double>(a[d * sa]) * static_cast<double>(b[d * sb]);
  return lane_sum(acc);
}

struct RowDots {
  double xx, ww, xw;
};

// |x_i|^2, |w_t|^2 and <x_i, w_t> in one pass (the backward needs all three), summed exactly as
// dot_strided sums each of them.
template <bool kUnit, typename T>
RowDots row_dots_strided(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
  if (kUnit) sa = sb = 1;
  double aa[kLanes] = {}, bb[kLanes] = {}, ab[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const double u = static_cast<double>(a[(d + k) * sa]);
      const double v = static_cast<double>(b[(d + k) * sb]);
      aa[k] += u * u;
      bb[k] += v * v;
      ab[k] += u * v;
    }
  }
  for (; d < n; ++d) {
    const double u = static_cast<double>(a[d * sa]), v = static_cast<double>(b[d * sb]);
    aa[0] += u * u;
    bb[0] += v * v;
    ab[0] += u * v;
  }
  return RowDots{lane_sum(aa), lane_sum(bb), lane_sum(ab)};
}

template <typename T>
RowDots row_dots(const MatrixView<const T>& x, int64_t i, const MatrixView<const T>& w, int64_t t) {
  const T* px = x.data + i * x.row_stride;
  const T* pw = w.data + t * w.row_stride;
  if (x.col_stride == 1 && w.col_stride == 1) return row_dots_strided<true>(px, 1, pw, 1, x.cols);
  return row_dots_strided<false>(px, x.col_stride, pw, w.col_stride, x.cols);
}

// Accumulate in double whatever T is: the norms and the recomputed target logit then carry no
// more error than the host GEMM that produced the logits.
template <typename T>
double dot_row(const MatrixView<const T>& a, int64_t i, const MatrixView<const T>& b, int64_t j) {
  const T* pa = a.data + i * a.row_stride;
  const T* pb = b.data + j * b.row_stride;
  if (a.col_stride == 1 && b.col_stride == 1) return dot_strided<true>(pa, 1, pb, 1, a.cols);
  return dot_strided<false>(pa, a.col_stride, pb, b.col_stride, a.cols);
}

// y += a u (+ b v) along one row. The unit-stride instantiation lets the compiler vectorize:
// these updates, not the dot products, are most of the backward's own cost. __restrict__: the
// gradient being updated never overlaps x or weight (an exactly aliased element would still be
// read before it is written).
template <bool kUnit, typename T>
void axpy_strided(T* __restrict__ y, int64_t sy, T a, const T* __restrict__ u, int64_t su,
                  int64_t n) {
  if (kUnit) sy = su = 1;
  for (int64_t j = 0; j < n; ++j) y[j * sy] += a * u[j * su];
}

template <bool kUnit, typename T>
void axpy2_strided(T* __restrict__ y, int64_t sy, T a, const T* __restrict__ u, int64_t su, T b,
                   const T* __restrict__ v, int64_t sv, int64_t n) {
  if (kUnit) sy = su = sv = 1;
  for (int64_t j = 0; j < n; ++j) y[j * sy] += a * u[j * su] + b * v[j * sv];
}

// out[i, :] += a * in[j, :]
template <typename T>
void axpy_row(const MatrixView<T>& out, int64_t i, T a, const MatrixView<const T>& in, int64_t j) {
  T* y = out.data + i * out.row_stride;
  const T* u = in.data + j * in.row_stride;
  if (out.col_stride == 1 && in.col_stride == 1) return axpy_strided<true>(y, 1, a, u, 1, in.cols);
  axpy_strided<false>(y, out.col_stride, a, u, in.col_stride, in.cols);
}

// out[i, :] += a * u_in[ju, :] + b * v_in[jv, :]
template <typename T>
void axpy2_row(const MatrixView<T>& out, int64_t i, T a, const MatrixView<const T>& u_in,
               int64_t ju, T b, const MatrixView<const T>& v_in, int64_t jv) {
  T* y = out.data + i * out.row_stride;
  const T* u = u_in.data + ju * u_in.row_stride;
  const T* v = v_in.data + jv * v_in.row_stride;
  if (out.col_stride == 1 && u_in.col_stride == 1 && v_in.col_stride == 1) {
    return axpy2_strided<true>(y, 1, a, u, 1, b, v, 1, u_in.cols);
  }
  axpy2_strided<false>(y, out.col_stride, a, u, u_in.col_stride, b, v, v_in.col_stride,
                       u_in.cols);
}

template <typename T>
double norm_row(const MatrixView<const T>& a, int64_t i) {
  return std::sqrt(dot_row(a, i, a, i));
}

template <typename T>
Status check_shapes(const MatrixView<const T>& x, const MatrixView<const T>& w, int64_t n_labels) {
  if (x.cols != w.cols) {
    return Status::InvalidArgument("x has " + std::to_string(x.cols) +
                                   " features per row but weight has " + std::to_string(w.cols) +
                                   " (weight must be (num_classes, in_features))");
  }
  if (Status s = detail::check_label_count(n_labels, x.rows); !s.ok()) return s;
  if (w.rows < 1) return Status::InvalidArgument("weight must have at least one class (row)");
  return Status::Ok();
}

template <typename T, typename L>
Status check_all(const MatrixView<const T>& x, const MatrixView<const T>& w,
                 const LabelView<L>& labels, int64_t margin, double lambda) {
  Status s = validate_margin_params(margin, lambda);
  if (s.ok()) s = check_shapes(x, w, labels.size);
  if (s.ok()) s = detail::check_label_range(labels, w.rows);
  return s;
}

template <typename T>
Status check_matrix(const char* name, const MatrixView<T>& m, int64_t rows, int64_t cols) {
  return detail::check_shape(name, m.rows, m.cols, rows, cols);
}

}  // namespace

Status validate_margin_params(int64_t margin, double lambda) {
  if (margin < 1 || margin > (1 << 20)) {
    return Status::InvalidArgument("margin must be an integer in [1, 2^20], got " +
                                   std::to_string(margin));
  }
  if (!(lambda >= 0.0)) {  // also rejects NaN
    return Status::InvalidArgument("lambda must be >= 0 (and not NaN), got " +
                                   std::to_string(lambda));
  }
  return Status::Ok();
}

template <typename T, typename L>
Status margin_forward(MatrixView<const T> x, MatrixView<const T> w, LabelView<L> labels,
                      MatrixView<T> logits, int64_t margin, double lambda, RowStats<T> stats) {
  Status s = check_all(x, w, labels, margin, lambda);
  if (s.ok()) s = check_matrix("logits", logits, x.rows, w.rows);
  if (!s.ok()) return s;
  const int m = static_cast<int>(margin);
  const T lam = static_cast<T>(lambda);
  detail::parallel_for(x.rows, 2 * x.cols + 8 * m, [&](int64_t i) {
    const int64_t t = static_cast<int64_t>(labels[i]);
    const T nx = static_cast<T>(norm_row(x, i));
    const T nw = static_cast<T>(norm_row(w, t));
    T& f = logits(i, t);
    const bool degenerate = is_degenerate(nx, nw);
    if (stats.norm_x) stats.norm_x[i] = nx;
    if (stats.norm_w) stats.norm_w[i] = nw;
    if (stats.cos_theta) stats.cos_theta[i] = degenerate ? T(0) : clamp_cos(f / (nx * nw));
    if (stats.segment) stats.segment[i] = degenerate ? -1 : margin_segment(m, clamp_cos(f / (nx * nw)));
    f = margin_logit(f, nx, nw, m, lam);
  });
  return Status::Ok();
}

template <typename T, typename L>
Status margin_backward(MatrixView<const T> grad_logits, MatrixView<const T> x,
                       MatrixView<const T> w, LabelView<L> labels, MatrixView<T> grad_x,
                       MatrixView<T> grad_w, int64_t margin, double lambda) {
  Status s = check_all(x, w, labels, margin, lambda);
  if (s.ok()) s = check_matrix("grad_logits", grad_logits, x.rows, w.rows);
  if (s.ok()) s = check_matrix("grad_x", grad_x, x.rows, x.cols);
  if (s.ok()) s = check_matrix("grad_weight", grad_w, w.rows, w.cols);
  if (!s.ok() || margin == 1) return s;
  const int m = static_cast<int>(margin);
  const T lam = static_cast<T>(lambda);
  const int64_t n = x.rows, d = x.cols;

  std::vector<RowGrad<T>> rows(static_cast<size_t>(n));
  detail::parallel_for(n, 4 * d + 8 * m, [&](int64_t i) {
    const int64_t t = static_cast<int64_t>(labels[i]);
    const RowDots dots = row_dots(x, i, w, t);
    const T nx = static_cast<T>(std::sqrt(dots.xx));
    const T nw = static_cast<T>(std::sqrt(dots.ww));
    const T f = static_cast<T>(dots.xw);
    const RowGrad<T> r = margin_row_grad(f, nx, nw, m, lam, grad_logits(i, t));
    rows[static_cast<size_t>(i)] = r;
    axpy2_row(grad_x, i, r.delta, w, t, r.coef_x, x, i);
  });

  // Group samples by class (stable: sample order within a class) so each grad_w row is owned by
  // one thread and summed in a fixed order.
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return labels[a] < labels[b]; });
  std::vector<int64_t> starts;
  for (int64_t k = 0; k < n; ++k) {
    if (k == 0 || labels[order[k]] != labels[order[k - 1]]) starts.push_back(k);
  }
  starts.push_back(n);
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  detail::parallel_for(groups, 2 * d * std::max<int64_t>(1, n / std::max<int64_t>(groups, 1)),
                       [&](int64_t gidx) {
    const int64_t lo = starts[gidx], hi = starts[gidx + 1];
    const int64_t t = static_cast<int64_t>(labels[order[lo]]);
    T coef_w = T(0);
    for (int64_t k = lo; k < hi; ++k) coef_w += rows[static_cast<size_t>(order[k])].coef_w;
    axpy_row(grad_w, t, coef_w, w, t);
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t i = order[k];
      axpy_row(grad_w, t, rows[static_cast<size_t>(i)].delta, x, i);
    }
  });
  return Status::Ok();
}

#define LSOFTMAX_INSTANTIATE(T, L)                                                              \
  template Status margin_forward<T, L>(MatrixView<const T>, MatrixView<const T>, LabelView<L>, \
                                       MatrixView<T>, int64_t, double, RowStats<T>);          \
  template Status margin_backward<T, L>(MatrixView<const T>, MatrixView<const T>,              \
                                        MatrixView<const T>, LabelView<L>, MatrixView<T>,      \
                                        MatrixView<T>, int64_t, double);
LSOFTMAX_INSTANTIATE(float, int32_t)
LSOFTMAX_INSTANTIATE(float, int64_t)
LSOFTMAX_INSTANTIATE(double, int32_t)
LSOFTMAX_INSTANTIATE(double, int64_t)
#undef LSOFTMAX_INSTANTIATE

}  // namespace lsoftmax
