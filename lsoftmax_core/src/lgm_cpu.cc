// CPU implementation of the L-GM assembly; the layout of the work is described in lgm.h.
// Every sum runs in double whatever T is, and every output element is written by one thread
// (rows in the forward and for grad_x, classes for the column sums and parameter gradients).
#include "lsoftmax/lgm.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "lsoftmax/labels.h"
#include "parallel.h"

namespace lsoftmax {
namespace {

using detail::shape_str;

template <typename T>
Status check_shape(const char* name, const MatrixView<T>& m, int64_t rows, int64_t cols) {
  return detail::check_shape(name, m.rows, m.cols, rows, cols);
}

// log_var is (C, D) for diagonal variances or (C, 1) for isotropic ones; with D = 1 both read
// the same and the diagonal path is taken.
template <typename T>
Status check_params(const MatrixView<const T>& means, const MatrixView<const T>& log_var) {
  const Status s =
      detail::check_lgm_param_shapes(means.rows, means.cols, log_var.rows, log_var.cols);
  if (!s.ok()) return s;
  for (int64_t k = 0; k < log_var.rows; ++k) {
    for (int64_t j = 0; j < log_var.cols; ++j) {
      if (!std::isfinite(static_cast<double>(log_var(k, j)))) {
        return Status::InvalidArgument("log_var[" + std::to_string(k) + ", " + std::to_string(j) +
                                       "] is not finite");
      }
    }
  }
  return Status::Ok();
}

template <typename T>
Status check_x(const MatrixView<const T>& x, const MatrixView<const T>& means) {
  return detail::check_lgm_features(x.cols, means.cols);
}

template <typename L>
Status check_labels(const LabelView<L>& labels, int64_t n, int64_t num_classes) {
  if (labels.data == nullptr) return Status::Ok();
  const Status s = detail::check_label_count(labels.size, n);
  return s.ok() ? check_label_range(labels, num_classes) : s;
}

Status validate_nonneg(const char* name, double v) {
  if (v >= 0.0 && std::isfinite(v)) return Status::Ok();
  return Status::InvalidArgument(std::string(name) + " must be a finite number >= 0, got " +
                                 std::to_string(v));
}

bool is_diagonal(int64_t log_var_cols, int64_t feat_dim) { return log_var_cols == feat_dim; }

// h_k = 1/2 log|V_k| = 1/2 sum_j log_var_kj (isotropic: D/2 log_var_k). The forward and the
// backward both call this, so the argmax of a row without labels is the same in both.
template <typename T>
double half_logdet(const MatrixView<const T>& log_var, int64_t k, int64_t feat_dim) {
  if (!is_diagonal(log_var.cols, feat_dim)) {
    return lgm_half_logdet_isotropic(static_cast<double>(log_var(k, 0)), feat_dim);
  }
  double lsum = 0.0;
  for (int64_t j = 0; j < log_var.cols; ++j) lsum += static_cast<double>(log_var(k, j));
  return lgm_half_logdet_from_sum(lsum);
}

// Per-class quantities in double: precision p (C x Dv), c_k = sum_j muc_kj^2 p_kj and
// h_k = 1/2 sum_j log_var_kj (isotropic: D/2 log_var_k).
struct ClassTerms {
  std::vector<double> p, c, h;
  int64_t dv = 0;

  double prec(int64_t k, int64_t j) const {
    return p[static_cast<size_t>(k * dv + (dv == 1 ? 0 : j))];
  }
};

template <typename T>
ClassTerms class_terms(const MatrixView<const T>& means, const MatrixView<const T>& log_var,
                          const T* offset) {
  const int64_t C = means.rows, D = means.cols, dv = log_var.cols;
  ClassTerms t;
  t.dv = dv;
  t.p.resize(static_cast<size_t>(C * dv));
  t.c.resize(static_cast<size_t>(C));
  t.h.resize(static_cast<size_t>(C));
  detail::parallel_for(C, 4 * D, [&](int64_t k) {
    for (int64_t j = 0; j < dv; ++j) {
      t.p[static_cast<size_t>(k * dv + j)] = lgm_precision(static_cast<double>(log_var(k, j)));
    }
    t.h[static_cast<size_t>(k)] = half_logdet(log_var, k, D);
    double c = 0.0;
    for (int64_t j = 0; j < D; ++j) {
      c += lgm_direct_term(static_cast<double>(means(k, j)), static_cast<double>(offset[j]),
                           t.prec(k, j));
    }
    t.c[static_cast<size_t>(k)] = c;
  });
  return t;
}

// The predicted class of a row without labels: argmax_k (-d_ik - h_k), read back from the stored
// logits (z = -d - s h) so that the forward and the backward pick the same class bit for bit.
template <typename T>
int64_t predicted_class(const MatrixView<const T>& logits, int64_t i, const std::vector<double>& h,
                        bool include_logdet, double* best_value) {
  long long best = LLONG_MAX;
  double best_v = -INFINITY;
  for (int64_t k = 0; k < logits.cols; ++k) {
    const double v = lgm_prediction_score(static_cast<double>(logits(i, k)),
                                          h[static_cast<size_t>(k)], include_logdet);
    if (lgm_prediction_better(v, k, best_v, best)) {
      best_v = v;
      best = k;
    }
  }
  if (best == LLONG_MAX) best = 0;  // no columns: callers reject C = 0 before this
  if (best_value) *best_value = best_v;
  return best;
}

}  // namespace

Status validate_lgm_alpha(double alpha) { return validate_nonneg("alpha", alpha); }
Status validate_lgm_lambda(double lambda_lkd) { return validate_nonneg("lambda_lkd", lambda_lkd); }

template <typename T>
Status lgm_log_var_from_variances(MatrixView<const T> variances, MatrixView<T> log_var) {
  Status s = check_shape("log_var", log_var, variances.rows, variances.cols);
  if (!s.ok()) return s;
  for (int64_t k = 0; k < variances.rows; ++k) {
    for (int64_t j = 0; j < variances.cols; ++j) {
      const double v = static_cast<double>(variances(k, j));
      if (!(v > 0.0) || !std::isfinite(v)) {
        return Status::InvalidArgument("variances must be finite and > 0, got variances[" +
                                       std::to_string(k) + ", " + std::to_string(j) +
                                       "] = " + std::to_string(v));
      }
    }
  }
  for (int64_t k = 0; k < variances.rows; ++k) {
    for (int64_t j = 0; j < variances.cols; ++j) {
      log_var(k, j) = static_cast<T>(std::log(static_cast<double>(variances(k, j))));
    }
  }
  return Status::Ok();
}

template <typename T>
Status lgm_prepare(MatrixView<const T> means, MatrixView<const T> log_var, T* offset,
                   MatrixView<T> precision, MatrixView<T> scaled_means) {
  Status s = check_params(means, log_var);
  if (s.ok()) s = check_shape("precision", precision, log_var.rows, log_var.cols);
  if (s.ok()) s = check_shape("scaled_means", scaled_means, means.rows, means.cols);
  if (!s.ok()) return s;
  const int64_t C = means.rows, D = means.cols, dv = log_var.cols;
  // The mean of the class means: features far from the origin then enter the GEMMs as their
  // offsets from the class cloud, which is what keeps the expansion's cancellation small.
  detail::parallel_for(D, C, [&](int64_t j) {
    double acc = 0.0;
    for (int64_t k = 0; k < C; ++k) acc += static_cast<double>(means(k, j));
    offset[j] = static_cast<T>(acc / static_cast<double>(C));
  });
  detail::parallel_for(C, 4 * D, [&](int64_t k) {
    for (int64_t j = 0; j < dv; ++j) {
      precision(k, j) = static_cast<T>(lgm_precision(static_cast<double>(log_var(k, j))));
    }
    for (int64_t j = 0; j < D; ++j) {
      const double p = lgm_precision(static_cast<double>(log_var(k, dv == 1 ? 0 : j)));
      scaled_means(k, j) =
          static_cast<T>((static_cast<double>(means(k, j)) - static_cast<double>(offset[j])) * p);
    }
  });
  return Status::Ok();
}

template <typename T, typename L>
Status lgm_forward(MatrixView<const T> x, MatrixView<const T> means, MatrixView<const T> log_var,
                   const T* offset, MatrixView<const T> sq_term, LabelView<L> labels,
                   MatrixView<T> logits, T* loglik, double alpha, bool include_logdet,
                   int64_t* n_direct) {
  Status s = validate_lgm_alpha(alpha);
  if (s.ok()) s = check_params(means, log_var);
  if (s.ok()) s = check_x(x, means);
  const int64_t N = x.rows, C = means.rows, D = means.cols;
  const bool diag = is_diagonal(log_var.cols, D);
  if (s.ok()) s = check_shape("logits", logits, N, C);
  if (s.ok() && diag) s = check_shape("sq_term", sq_term, N, C);
  if (s.ok() && !diag && sq_term.rows != 0) {
    s = Status::InvalidArgument("sq_term must be empty for isotropic variances");
  }
  if (s.ok()) s = check_labels(labels, N, C);
  if (!s.ok()) return s;

  const ClassTerms ct = class_terms(means, log_var, offset);
  const bool has_labels = labels.data != nullptr;
  std::vector<int64_t> direct(static_cast<size_t>(N), 0);
  detail::parallel_for(N, 8 * C + D, [&](int64_t i) {
    double xsq = 0.0;  // |xc_i|^2, the isotropic A_ik / p_k
    if (!diag) {
      for (int64_t j = 0; j < D; ++j) {
        const double v = static_cast<double>(x(i, j)) - static_cast<double>(offset[j]);
        xsq += v * v;
      }
    }
    const int64_t y = has_labels ? static_cast<int64_t>(labels[i]) : -1;
    double d_target = 0.0;
    int64_t n_dir = 0;
    for (int64_t k = 0; k < C; ++k) {
      const double a = diag ? static_cast<double>(sq_term(i, k)) : ct.prec(k, 0) * xsq;
      bool needs_direct = false;
      double d2 = lgm_expansion_d2(a, static_cast<double>(logits(i, k)),
                                   ct.c[static_cast<size_t>(k)], &needs_direct);
      if (needs_direct) {
        double acc = 0.0;
        for (int64_t j = 0; j < D; ++j) {
          acc += lgm_direct_term(static_cast<double>(x(i, j)), static_cast<double>(means(k, j)),
                                 ct.prec(k, j));
        }
        d2 = acc;
        ++n_dir;
      }
      const double d = lgm_half_distance(d2);
      if (k == y) d_target = d;
      logits(i, k) =
          static_cast<T>(lgm_logit(d, k == y, alpha, include_logdet, ct.h[static_cast<size_t>(k)]));
    }
    direct[static_cast<size_t>(i)] = n_dir;
    if (has_labels) {
      loglik[i] = static_cast<T>(-(d_target + ct.h[static_cast<size_t>(y)]));
    } else {
      double best = 0.0;
      predicted_class(logits.as_const(), i, ct.h, include_logdet, &best);
      loglik[i] = static_cast<T>(best);
    }
  });
  if (n_direct) {
    int64_t total = 0;
    for (int64_t v : direct) total += v;
    *n_direct = total;
  }
  return Status::Ok();
}

template <typename T, typename L>
Status lgm_backward_coeffs(MatrixView<const T> grad_logits, const T* grad_loglik,
                           MatrixView<const T> logits, MatrixView<const T> log_var,
                           int64_t feat_dim, LabelView<L> labels, double alpha,
                           bool include_logdet, MatrixView<T> coeff, T* colsum, T* grad_h,
                           T* own, int64_t* cls) {
  Status s = validate_lgm_alpha(alpha);
  const int64_t N = grad_logits.rows, C = grad_logits.cols;
  // Every row has an own class c_i in [0, C): with no classes there is none to split off.
  if (s.ok() && (C < 1 || feat_dim < 1)) {
    s = Status::InvalidArgument("grad_logits must have >= 1 class and feat_dim must be >= 1, got " +
                                std::to_string(C) + " classes and feat_dim " +
                                std::to_string(feat_dim));
  }
  if (s.ok() && (log_var.rows != C || (log_var.cols != feat_dim && log_var.cols != 1))) {
    s = Status::InvalidArgument("log_var has shape " + shape_str(log_var.rows, log_var.cols) +
                                " but grad_logits has " + std::to_string(C) +
                                " classes and the features " + std::to_string(feat_dim) +
                                " dimensions");
  }
  if (s.ok()) s = check_shape("logits", logits, N, C);
  if (s.ok()) s = check_shape("coeff", coeff, N, C);
  if (s.ok()) s = check_labels(labels, N, C);
  if (!s.ok()) return s;

  const bool has_labels = labels.data != nullptr;
  std::vector<double> h(static_cast<size_t>(C));
  for (int64_t k = 0; k < C; ++k) h[static_cast<size_t>(k)] = half_logdet(log_var, k, feat_dim);

  // W_ik = -(1 + alpha [k = y_i]) G_ik - g_i [k = c_i], with c_i the label or the prediction;
  // W_ic goes to own[i] and its place in coeff is zeroed.
  detail::parallel_for(N, 4 * C, [&](int64_t i) {
    const int64_t y = has_labels ? static_cast<int64_t>(labels[i]) : -1;
    const int64_t c = has_labels ? y : predicted_class(logits, i, h, include_logdet, nullptr);
    cls[i] = c;
    for (int64_t k = 0; k < C; ++k) {
      coeff(i, k) = static_cast<T>(lgm_coeff(static_cast<double>(grad_logits(i, k)), k == y, alpha));
    }
    double w = static_cast<double>(coeff(i, c));
    if (grad_loglik) w -= static_cast<double>(grad_loglik[i]);
    own[i] = static_cast<T>(w);
    coeff(i, c) = T(0);
  });

  // dL/dh_k = -s sum_i G_ik - sum_{i: c_i = k} g_i; one thread per class, rows in order.
  detail::parallel_for(C, 2 * N, [&](int64_t k) {
    double cs = 0.0, gh = 0.0;
    for (int64_t i = 0; i < N; ++i) {
      cs += static_cast<double>(coeff(i, k));
      gh += lgm_grad_h_term(static_cast<double>(grad_logits(i, k)), include_logdet);
      if (grad_loglik && cls[i] == k) gh -= static_cast<double>(grad_loglik[i]);
    }
    colsum[k] = static_cast<T>(cs);
    grad_h[k] = static_cast<T>(gh);
  });
  return Status::Ok();
}

template <typename T>
Status lgm_backward_assemble(MatrixView<const T> x, MatrixView<const T> means,
                             MatrixView<const T> log_var, const T* offset, const T* colsum,
                             const T* grad_h, const T* own, const int64_t* cls,
                             MatrixView<const T> wp, MatrixView<const T> wmp,
                             MatrixView<const T> wtx, MatrixView<const T> wtx2,
                             MatrixView<T> grad_x, MatrixView<T> grad_means,
                             MatrixView<T> grad_log_var) {
  Status s = check_params(means, log_var);
  if (s.ok()) s = check_x(x, means);
  const int64_t N = x.rows, C = means.rows, D = means.cols, dv = log_var.cols;
  if (s.ok()) s = check_shape("wp", wp, N, dv);
  if (s.ok()) s = check_shape("wmp", wmp, N, D);
  if (s.ok()) s = check_shape("wtx", wtx, C, D);
  if (s.ok()) s = check_shape("wtx2", wtx2, C, dv);
  if (s.ok()) s = check_shape("grad_x", grad_x, N, D);
  if (s.ok()) s = check_shape("grad_means", grad_means, C, D);
  if (s.ok()) s = check_shape("grad_log_var", grad_log_var, C, dv);
  for (int64_t i = 0; s.ok() && i < N; ++i) {
    if (cls[i] < 0 || cls[i] >= C) {
      s = Status::InvalidArgument("cls[" + std::to_string(i) + "] is out of range");
    }
  }
  if (!s.ok()) return s;
  const bool diag = is_diagonal(dv, D);
  auto prec = [&](int64_t k, int64_t j) {
    return lgm_precision(static_cast<double>(log_var(k, diag ? j : 0)));
  };

  detail::parallel_for(N, 4 * D, [&](int64_t i) {
    const int64_t c = cls[i];
    const double w = static_cast<double>(own[i]);
    for (int64_t j = 0; j < D; ++j) {
      const double xc = static_cast<double>(x(i, j)) - static_cast<double>(offset[j]);
      const double diff = static_cast<double>(x(i, j)) - static_cast<double>(means(c, j));
      grad_x(i, j) = static_cast<T>(lgm_grad_x(xc, static_cast<double>(wp(i, diag ? j : 0)),
                                               static_cast<double>(wmp(i, j)), w, prec(c, j), diff));
    }
  });

  // Rows grouped by their own class (counting sort keeps row order inside a class), so each
  // class sums its direct terms in a fixed order on one thread.
  std::vector<int64_t> start(static_cast<size_t>(C + 1), 0), rows(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) ++start[static_cast<size_t>(cls[i] + 1)];
  for (size_t k = 0; k < static_cast<size_t>(C); ++k) start[k + 1] += start[k];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < N; ++i) {
      rows[static_cast<size_t>(fill[static_cast<size_t>(cls[i])]++)] = i;
    }
  }

  detail::parallel_for(C, 8 * D + 2 * D * N / std::max<int64_t>(C, 1), [&](int64_t k) {
    const double cs = static_cast<double>(colsum[k]);
    const double gh = static_cast<double>(grad_h[k]);
    // Direct sums over the rows whose own class is k: sum w (x - mu_k) and sum w (x - mu_k)^2.
    std::vector<double> s1(static_cast<size_t>(D), 0.0), s2(static_cast<size_t>(D), 0.0);
    for (int64_t r = start[static_cast<size_t>(k)]; r < start[static_cast<size_t>(k + 1)]; ++r) {
      const int64_t i = rows[static_cast<size_t>(r)];
      const double w = static_cast<double>(own[i]);
      for (int64_t j = 0; j < D; ++j) {
        const double diff = static_cast<double>(x(i, j)) - static_cast<double>(means(k, j));
        s1[static_cast<size_t>(j)] += w * diff;
        s2[static_cast<size_t>(j)] += w * diff * diff;
      }
    }
    double iso_sum = 0.0;  // isotropic: the j-sum of the bracket below
    for (int64_t j = 0; j < D; ++j) {
      const double muc = static_cast<double>(means(k, j)) - static_cast<double>(offset[j]);
      const double p = prec(k, j);
      const double tx = static_cast<double>(wtx(k, j));
      grad_means(k, j) = static_cast<T>(lgm_grad_mean(p, tx, muc, cs, s1[static_cast<size_t>(j)]));
      const double bracket = lgm_log_var_bracket(tx, muc, cs, s2[static_cast<size_t>(j)]);
      if (diag) {
        grad_log_var(k, j) =
            static_cast<T>(lgm_grad_log_var(p, static_cast<double>(wtx2(k, j)), bracket, 1.0, gh));
      } else {
        iso_sum += bracket;
      }
    }
    if (!diag) {
      grad_log_var(k, 0) = static_cast<T>(lgm_grad_log_var(
          prec(k, 0), static_cast<double>(wtx2(k, 0)), iso_sum, static_cast<double>(D), gh));
    }
  });
  return Status::Ok();
}

#define LSOFTMAX_LGM_INSTANTIATE_T(T)                                                            \
  template Status lgm_log_var_from_variances<T>(MatrixView<const T>, MatrixView<T>);           \
  template Status lgm_prepare<T>(MatrixView<const T>, MatrixView<const T>, T*, MatrixView<T>,  \
                                 MatrixView<T>);                                               \
  template Status lgm_backward_assemble<T>(                                                    \
      MatrixView<const T>, MatrixView<const T>, MatrixView<const T>, const T*, const T*,       \
      const T*, const T*, const int64_t*, MatrixView<const T>, MatrixView<const T>,            \
      MatrixView<const T>, MatrixView<const T>, MatrixView<T>, MatrixView<T>, MatrixView<T>);
#define LSOFTMAX_LGM_INSTANTIATE(T, L)                                                           \
  template Status lgm_forward<T, L>(MatrixView<const T>, MatrixView<const T>,                  \
                                    MatrixView<const T>, const T*, MatrixView<const T>,        \
                                    LabelView<L>, MatrixView<T>, T*, double, bool, int64_t*);  \
  template Status lgm_backward_coeffs<T, L>(MatrixView<const T>, const T*,                     \
                                            MatrixView<const T>, MatrixView<const T>, int64_t, \
                                            LabelView<L>, double, bool, MatrixView<T>, T*, T*, \
                                            T*, int64_t*);
LSOFTMAX_LGM_INSTANTIATE_T(float)
LSOFTMAX_LGM_INSTANTIATE_T(double)
LSOFTMAX_LGM_INSTANTIATE(float, int32_t)
LSOFTMAX_LGM_INSTANTIATE(float, int64_t)
LSOFTMAX_LGM_INSTANTIATE(double, int32_t)
LSOFTMAX_LGM_INSTANTIATE(double, int64_t)
#undef LSOFTMAX_LGM_INSTANTIATE
#undef LSOFTMAX_LGM_INSTANTIATE_T

}  // namespace lsoftmax
