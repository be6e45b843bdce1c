// logits = x W^T for a few rows (lsoftmax::plain_logits, see lsoftmax.h).
#include <algorithm>
#include <cstring>
#include <string>

#include "checks.h"
#include "isa_clones.h"
#include "lsoftmax/lsoftmax.h"
#include "parallel.h"

namespace lsoftmax {
namespace {

// 64 partial sums in four vectors of 16 lanes (element j goes to lane j % 64): enough
// independent adds to keep a core's multiply and add units busy. The lanes are folded as
// vectors, (v0 + v1) + (v2 + v3), and then pairwise to one value: a sum per class of a few
// vector adds and fifteen scalar ones. The fixed order makes every build round alike.
constexpr int kWidth = 16;
constexpr int kVectors = 4;
constexpr int kLanes = kWidth * kVectors;
template <typename T>
using Lanes = typename detail::VectorOf<T, kWidth>::type;

template <typename T>
T pairwise_total(T (&s)[kWidth]) {
  for (int width = kWidth / 2; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) s[k] += s[k + width];
  }
  return s[0];
}

template <typename T>
inline __attribute__((always_inline)) T dot_unit_lanes(const T* a, const T* b, int64_t n) {
  Lanes<T> acc[kVectors] = {};
  auto add = [&](const T* u_src, const T* v_src) {
    for (int k = 0; k < kVectors; ++k) {
      Lanes<T> u, v;
      std::memcpy(&u, u_src + k * kWidth, sizeof(u));
      std::memcpy(&v, v_src + k * kWidth, sizeof(v));
      acc[k] += u * v;
    }
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) add(a + j, b + j);
  if (j < n) {  // the tail, zero-padded: a padded lane adds +0, which changes no sum
    T ta[kLanes] = {}, tb[kLanes] = {};
    std::memcpy(ta, a + j, sizeof(T) * static_cast<size_t>(n - j));
    std::memcpy(tb, b + j, sizeof(T) * static_cast<size_t>(n - j));
    add(ta, tb);
  }
  const Lanes<T> folded = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  T s[kWidth];
  std::memcpy(s, &folded, sizeof(s));
  return pairwise_total(s);
}

LSOFTMAX_ISA_CLONES float dot_lanes(const float* a, const float* b, int64_t n) {
  return dot_unit_lanes(a, b, n);
}
LSOFTMAX_ISA_CLONES double dot_lanes(const double* a, const double* b, int64_t n) {
  return dot_unit_lanes(a, b, n);
}

// The same sums over strided rows (no vector lanes), in the same order.
template <typename T>
T dot_strided_lanes(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
  T lanes[kLanes] = {};
  for (int64_t j = 0; j < n; ++j) lanes[j % kLanes] += a[j * sa] * b[j * sb];
  T s[kWidth];
  for (int l = 0; l < kWidth; ++l) {
    s[l] = (lanes[l] + lanes[kWidth + l]) + (lanes[2 * kWidth + l] + lanes[3 * kWidth + l]);
  }
  return pairwise_total(s);
}

}  // namespace

template <typename T>
Status plain_logits(MatrixView<const T> x, MatrixView<const T> w, MatrixView<T> logits) {
  if (x.cols != w.cols) {
    return Status::InvalidArgument("x has " + std::to_string(x.cols) +
                                   " features per row but weight has " + std::to_string(w.cols) +
                                   " (weight must be (num_classes, in_features))");
  }
  if (Status s = detail::check_shape("logits", logits.rows, logits.cols, x.rows, w.rows);
      !s.ok()) {
    return s;
  }
  const bool unit = x.col_stride == 1 && w.col_stride == 1;
  // Parallel only from about 2^20 multiply-adds per thread (cost per class d / 32 against
  // kMinWorkPerThread = 2^15): below that, waking a sleeping pool thread costs more than the
  // product, which is bound by reading W.
  detail::parallel_for(w.rows, std::max<int64_t>(1, x.rows * x.cols / 32), [&](int64_t c) {
    const T* wc = w.data + c * w.row_stride;
    for (int64_t i = 0; i < x.rows; ++i) {
      const T* xi = x.data + i * x.row_stride;
      logits(i, c) = unit ? dot_lanes(xi, wc, x.cols)
                          : dot_strided_lanes(xi, x.col_stride, wc, w.col_stride, x.cols);
    }
  });
  return Status::Ok();
}

template Status plain_logits<float>(MatrixView<const float>, MatrixView<const float>,
                                    MatrixView<float>);
template Status plain_logits<double>(MatrixView<const double>, MatrixView<const double>,
                                     MatrixView<double>);

}  // namespace lsoftmax
