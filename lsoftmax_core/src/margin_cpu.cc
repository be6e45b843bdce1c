// CPU implementation of the per-row L-Softmax work; the math itself is in margin_math.h.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "lsoftmax/lsoftmax.h"
#include "checks.h"
#include "lsoftmax/labels.h"
#include "lsoftmax/margin_math.h"
#include "parallel.h"
#include "row_kernels.h"

namespace lsoftmax {
namespace {

using detail::RowDots;

template <typename T>
RowDots row_dots(const MatrixView<const T>& x, int64_t i, const MatrixView<const T>& w, int64_t t) {
  return detail::row_dots(x.data + i * x.row_stride, x.col_stride, w.data + t * w.row_stride,
                          w.col_stride, x.cols);
}

// Accumulate in double whatever T is: the norms and the recomputed target logit then carry no
// more error than the host GEMM that produced the logits.
template <typename T>
double dot_row(const MatrixView<const T>& a, int64_t i, const MatrixView<const T>& b, int64_t j) {
  return detail::dot(a.data + i * a.row_stride, a.col_stride, b.data + j * b.row_stride,
                     b.col_stride, a.cols);
}

// out[i, :] += a * in[j, :]. These updates, not the dot products, are most of the backward's
// own cost.
template <typename T>
void axpy_row(const MatrixView<T>& out, int64_t i, T a, const MatrixView<const T>& in, int64_t j) {
  detail::axpy(out.data + i * out.row_stride, out.col_stride, a, in.data + j * in.row_stride,
               in.col_stride, in.cols);
}

// out[i, :] += a * u_in[ju, :] + b * v_in[jv, :]
template <typename T>
void axpy2_row(const MatrixView<T>& out, int64_t i, T a, const MatrixView<const T>& u_in,
               int64_t ju, T b, const MatrixView<const T>& v_in, int64_t jv) {
  detail::axpy2(out.data + i * out.row_stride, out.col_stride, a,
                u_in.data + ju * u_in.row_stride, u_in.col_stride, b,
                v_in.data + jv * v_in.row_stride, v_in.col_stride, u_in.cols);
}

template <typename T>
double norm_row(const MatrixView<const T>& a, int64_t i) {
  return std::sqrt(detail::sumsq(a.data + i * a.row_stride, a.col_stride, a.cols));
}

template <typename T>
Status check_shapes(const MatrixView<const T>& x, const MatrixView<const T>& w, int64_t n_labels) {
  if (Status s = detail::check_weight_features(x.cols, w.cols); !s.ok()) return s;
  if (Status s = detail::check_label_count(n_labels, x.rows); !s.ok()) return s;
  if (w.rows < 1) return Status::InvalidArgument("weight must have at least one class (row)");
  return Status::Ok();
}

template <typename T, typename L>
Status check_all(const MatrixView<const T>& x, const MatrixView<const T>& w,
                 const LabelView<L>& labels, int64_t margin, double lambda) {
  Status s = validate_margin_params(margin, lambda);
  if (s.ok()) s = check_shapes(x, w, labels.size);
  if (s.ok()) s = check_label_range(labels, w.rows);
  return s;
}

template <typename T>
Status check_matrix(const char* name, const MatrixView<T>& m, int64_t rows, int64_t cols) {
  return detail::check_shape(name, m.rows, m.cols, rows, cols);
}

// cos(j pi/m), j = 1..m-1, computed once per call instead of once per row.
std::vector<double> segment_thresholds(int m) {
  std::vector<double> thr(static_cast<size_t>(m > 1 ? m - 1 : 0));
  fill_segment_thresholds(m, thr.data());
  return thr;
}

// With no more classes than rows, every class norm is computed once up front rather than once
// per row that targets it; otherwise (many classes, few rows) the rows compute their own.
template <typename T>
std::vector<T> target_class_norms(const MatrixView<const T>& w, int64_t rows) {
  std::vector<T> norms;
  if (w.rows > rows) return norms;
  norms.resize(static_cast<size_t>(w.rows));
  detail::parallel_for(w.rows, w.cols, [&](int64_t c) {
    norms[static_cast<size_t>(c)] = static_cast<T>(norm_row(w, c));
  });
  return norms;
}

}  // namespace

Status validate_margin_params(int64_t margin, double lambda) {
  MarginSpec spec;
  spec.kind = MarginKind::kLSoftmax;
  // Beyond +-2^53 a double would round the integer: any such margin is out of range anyway.
  spec.margin = margin > kMaxMargin ? static_cast<double>(kMaxMargin) + 1.0
                : margin < -kMaxMargin ? -1.0
                                       : static_cast<double>(margin);
  Status s = validate_margin_spec(spec, lambda);
  if (!s.ok() && (margin > kMaxMargin || margin < -kMaxMargin)) {
    return Status::InvalidArgument("margin must be an integer in [1, 2^20], got " +
                                   std::to_string(margin));
  }
  return s;
}

template <typename T, typename L>
Status margin_forward(MatrixView<const T> x, MatrixView<const T> w, LabelView<L> labels,
                      MatrixView<T> logits, int64_t margin, double lambda, RowStats<T> stats) {
  Status s = check_all(x, w, labels, margin, lambda);
  if (s.ok()) s = check_matrix("logits", logits, x.rows, w.rows);
  if (!s.ok()) return s;
  const bool want_stats = stats.norm_x || stats.norm_w || stats.cos_theta || stats.segment;
  if (margin == 1 && !want_stats) return s;
  const int m = static_cast<int>(margin);
  const T lam = static_cast<T>(lambda);
  const std::vector<double> thresholds = segment_thresholds(m);
  const std::vector<T> class_norms = target_class_norms(w, x.rows);
  // Blocks of rows, each taking its norms first and then the per-row math: the math is a chain
  // of dependent operations (square root, divisions, the recurrence) that then overlaps across
  // the rows of the block instead of waiting behind each row's pass over x.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (x.rows + kBlock - 1) / kBlock;
  detail::parallel_for(blocks, kBlock * (x.cols + 8 * m), [&](int64_t b) {
    const int64_t lo = b * kBlock, hi = std::min(x.rows, lo + kBlock);
    T nx_block[kBlock], nw_block[kBlock];
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = static_cast<int64_t>(labels[i]);
      nx_block[i - lo] = static_cast<T>(norm_row(x, i));
      nw_block[i - lo] = class_norms.empty() ? static_cast<T>(norm_row(w, t)) : class_norms[t];
    }
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = static_cast<int64_t>(labels[i]);
      const T nx = nx_block[i - lo], nw = nw_block[i - lo];
      T& f = logits(i, t);
      const bool degenerate = is_degenerate(nx, nw);
      const T c = degenerate ? T(0) : clamp_cos(f / (nx * nw));
      const int k = degenerate ? -1 : margin_segment(m, c, thresholds.data());
      if (stats.norm_x) stats.norm_x[i] = nx;
      if (stats.norm_w) stats.norm_w[i] = nw;
      if (stats.cos_theta) stats.cos_theta[i] = c;
      if (stats.segment) stats.segment[i] = k;
      if (m > 1 && !degenerate) f = margin_logit_at(f, nx * nw, c, k, m, lam);
    }
  });
  return Status::Ok();
}

namespace {

// Calls on_row(i, t, RowGrad) for every non-degenerate row (in parallel over rows; degenerate
// rows are left out, their terms being zero), for inputs the caller has checked. The forward's
// stats, when all four are given, replace recomputing the norms and cosines (their segments are
// checked here, since they index the math).
template <typename T, typename L, typename OnRow>
Status for_each_row_grad(MatrixView<const T> grad_logits, MatrixView<const T> x,
                         MatrixView<const T> w, LabelView<L> labels, int64_t margin,
                         double lambda, RowStats<T> forward_stats, int64_t row_cost,
                         OnRow&& on_row) {
  const int m = static_cast<int>(margin);
  const T lam = static_cast<T>(lambda);
  const int64_t n = x.rows, d = x.cols;
  const std::vector<double> thresholds = segment_thresholds(m);
  const bool reuse = forward_stats.norm_x && forward_stats.norm_w && forward_stats.cos_theta &&
                     forward_stats.segment;
  // Segments handed back by the caller index the math: only -1 (degenerate) and [0, m) are
  // ones the forward can have written.
  for (int64_t i = 0; reuse && i < n; ++i) {
    const int k = forward_stats.segment[i];
    if (k < -1 || k >= m) {
      return Status::InvalidArgument("stats segment[" + std::to_string(i) + "] = " +
                                     std::to_string(k) + " is outside [-1, " +
                                     std::to_string(m) + "): pass the stats the forward "
                                     "returned for the same inputs and margin");
    }
  }
  detail::parallel_for(n, (reuse ? 0 : 3) * d + row_cost + 8 * m, [&](int64_t i) {
    const int64_t t = static_cast<int64_t>(labels[i]);
    T nx, nw, c;
    int k;
    if (reuse) {
      nx = forward_stats.norm_x[i];
      nw = forward_stats.norm_w[i];
      c = forward_stats.cos_theta[i];
      k = forward_stats.segment[i];
    } else {
      const RowDots dots = row_dots(x, i, w, t);
      nx = static_cast<T>(std::sqrt(dots.xx));
      nw = static_cast<T>(std::sqrt(dots.ww));
      const bool degenerate = is_degenerate(nx, nw);
      c = degenerate ? T(0) : clamp_cos(static_cast<T>(dots.xw) / (nx * nw));
      k = degenerate ? -1 : margin_segment(m, c, thresholds.data());
    }
    if (k < 0) return;
    on_row(i, t, margin_row_grad_at(c, k, nx, nw, m, lam, grad_logits(i, t)));
  });
  return Status::Ok();
}

}  // namespace

template <typename T, typename L>
Status margin_backward(MatrixView<const T> grad_logits, MatrixView<const T> x,
                       MatrixView<const T> w, LabelView<L> labels, MatrixView<T> grad_x,
                       MatrixView<T> grad_w, int64_t margin, double lambda,
                       RowStats<T> forward_stats) {
  Status s = check_all(x, w, labels, margin, lambda);
  if (s.ok()) s = check_matrix("grad_logits", grad_logits, x.rows, w.rows);
  if (s.ok()) s = check_matrix("grad_x", grad_x, x.rows, x.cols);
  if (s.ok()) s = check_matrix("grad_weight", grad_w, w.rows, w.cols);
  if (!s.ok() || margin == 1) return s;
  const int64_t n = x.rows, d = x.cols;
  std::vector<RowGrad<T>> rows(static_cast<size_t>(n), RowGrad<T>{T(0), T(0), T(0)});
  s = for_each_row_grad(grad_logits, x, w, labels, margin, lambda, forward_stats, 2 * d,
                        [&](int64_t i, int64_t t, const RowGrad<T>& r) {
                          rows[static_cast<size_t>(i)] = r;
                          axpy2_row(grad_x, i, r.delta, w, t, r.coef_x, x, i);
                        });
  if (!s.ok()) return s;

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

template <typename T, typename L>
Status margin_backward_fold(MatrixView<T> grad_logits, MatrixView<const T> x,
                            MatrixView<const T> w, LabelView<L> labels, T* coef_x,
                            T* coef_w_by_class, int64_t margin, double lambda,
                            RowStats<T> forward_stats) {
  const MatrixView<const T> g = grad_logits.as_const();
  Status s = check_all(x, w, labels, margin, lambda);
  if (s.ok()) s = check_matrix("grad_logits", g, x.rows, w.rows);
  if (!s.ok()) return s;
  std::fill(coef_x, coef_x + x.rows, T(0));
  std::fill(coef_w_by_class, coef_w_by_class + w.rows, T(0));
  if (margin == 1) return s;
  std::vector<T> coef_w(static_cast<size_t>(x.rows), T(0));
  // Each row reads and then rewrites only its own target entry of grad_logits.
  s = for_each_row_grad(g, x, w, labels, margin, lambda, forward_stats, 0,
                        [&](int64_t i, int64_t t, const RowGrad<T>& r) {
                          grad_logits(i, t) += r.delta;
                          coef_x[i] = r.coef_x;
                          coef_w[static_cast<size_t>(i)] = r.coef_w;
                        });
  if (!s.ok()) return s;
  // Summed in sample order: the result does not depend on the thread count.
  for (int64_t i = 0; i < x.rows; ++i) {
    coef_w_by_class[static_cast<int64_t>(labels[i])] += coef_w[static_cast<size_t>(i)];
  }
  return Status::Ok();
}

template <typename T>
Status add_scaled_rows(MatrixView<T> y, const T* coef, MatrixView<const T> u) {
  if (Status s = check_matrix("y", y, u.rows, u.cols); !s.ok()) return s;
  detail::parallel_for(u.rows, u.cols, [&](int64_t i) {
    if (coef[i] != T(0)) axpy_row(y, i, coef[i], u, i);
  });
  return Status::Ok();
}

template Status add_scaled_rows<float>(MatrixView<float>, const float*, MatrixView<const float>);
template Status add_scaled_rows<double>(MatrixView<double>, const double*,
                                        MatrixView<const double>);

template <typename T, typename L>
Status margin_family_forward(const MarginSpec& spec, double lambda, MatrixView<const T> x,
                             MatrixView<const T> w, LabelView<L> labels, MatrixView<T> logits) {
  if (spec.kind == MarginKind::kLSoftmax) {
    Status s = validate_margin_spec(spec, lambda);
    if (!s.ok()) return s;
    return margin_forward(x, w, labels, logits, static_cast<int64_t>(spec.margin), lambda);
  }
  Status s = validate_margin_spec(spec, lambda);
  if (s.ok()) s = check_shapes(x, w, labels.size);
  if (s.ok()) s = check_label_range(labels, w.rows);
  if (s.ok()) s = check_matrix("logits", logits, x.rows, w.rows);
  if (!s.ok()) return s;
  const bool psi = kind_properties(spec.kind).uses_lambda;
  const int m = psi ? static_cast<int>(spec.margin) : 1;
  const std::vector<double> thresholds = segment_thresholds(m);
  const T lam = static_cast<T>(lambda);
  detail::parallel_for(x.rows, 3 * x.cols + 8 * m, [&](int64_t i) {
    const int64_t t = static_cast<int64_t>(labels[i]);
    const RowDots dots = row_dots(x, i, w, t);
    const T nx = static_cast<T>(std::sqrt(dots.xx));
    const T nw = static_cast<T>(std::sqrt(dots.ww));
    if (is_degenerate(nx, nw)) return;
    const T c = static_cast<T>(dots.xw / (std::sqrt(dots.xx) * std::sqrt(dots.ww)));
    const TargetTerms<T> r = margin_target(spec, c, lam, psi ? thresholds.data() : nullptr);
    logits(i, t) = margin_row_scale(spec, nx, nw) * r.phi;
  });
  return Status::Ok();
}

#define LSOFTMAX_INSTANTIATE(T, L)                                                              \
  template Status margin_forward<T, L>(MatrixView<const T>, MatrixView<const T>, LabelView<L>, \
                                       MatrixView<T>, int64_t, double, RowStats<T>);          \
  template Status margin_backward<T, L>(MatrixView<const T>, MatrixView<const T>,              \
                                        MatrixView<const T>, LabelView<L>, MatrixView<T>,      \
                                        MatrixView<T>, int64_t, double, RowStats<T>);         \
  template Status margin_backward_fold<T, L>(MatrixView<T>, MatrixView<const T>,               \
                                             MatrixView<const T>, LabelView<L>, T*, T*, int64_t, \
                                             double, RowStats<T>);                             \
  template Status margin_family_forward<T, L>(const MarginSpec&, double, MatrixView<const T>,  \
                                              MatrixView<const T>, LabelView<L>, MatrixView<T>);
LSOFTMAX_INSTANTIATE(float, int32_t)
LSOFTMAX_INSTANTIATE(float, int64_t)
LSOFTMAX_INSTANTIATE(double, int32_t)
LSOFTMAX_INSTANTIATE(double, int64_t)
#undef LSOFTMAX_INSTANTIATE

}  // namespace lsoftmax
