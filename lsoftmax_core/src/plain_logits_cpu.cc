// logits = x W^T for a few rows (lsoftmax::plain_logits, see lsoftmax.h).
#include <algorithm>
#include <cstring>

#include "checks.h"
#include "isa_clones.h"
#include "lsoftmax/lsoftmax.h"
#include "parallel.h"

namespace lsoftmax {
namespace {

// 16 partial sums per class in two vectors of 8 lanes (element j goes to lane j % 16), four
// classes per pass: eight independent accumulators keep a core's multiply and add units busy,
// each load of the row of x serves four classes, and the eight vectors fit the sixteen
// registers of AVX2. The lanes are folded as v0 + v1 and then pairwise to one value (lane k +
// lane k + 4, then k + 2, ...). The fixed order makes every build round alike. The product is
// bound by reading W (2 MB at 1000 x 512 floats, beyond L2), so the pass prefetches the rows
// of the next one.
constexpr int kWidth = 8;
constexpr int kVectors = 2;
constexpr int kClassesPerPass = 4;
constexpr int kLanes = kWidth * kVectors;
template <typename T, int N>
using Vec = typename detail::VectorOf<T, N>::type;
template <typename T>
using Lanes = Vec<T, kWidth>;
template <typename T>
using Accumulators = Lanes<T>[kVectors];

template <typename T>
T pairwise_total(T (&s)[kWidth]) {
  for (int width = kWidth / 2; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) s[k] += s[k + width];
  }
  return s[0];
}

// pairwise_total on a vector, by halves: the same adds in the same order, without a trip
// through memory.
template <typename T>
inline __attribute__((always_inline)) T fold(const Accumulators<T>& acc) {
  static_assert(kWidth == 8 && kVectors == 2, "fold and dot_strided_lanes assume 2 x 8 lanes");
  const Lanes<T> v = acc[0] + acc[1];
  const Vec<T, 4> h4 =
      __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const Vec<T, 2> h2 =
      __builtin_shufflevector(h4, h4, 0, 1) + __builtin_shufflevector(h4, h4, 2, 3);
  return h2[0] + h2[1];
}

template <typename T>
inline __attribute__((always_inline)) void multiply_add(Lanes<T>& acc, const Lanes<T>& u,
                                                        const T* v_src) {
  Lanes<T> v;
  std::memcpy(&v, v_src, sizeof(v));
  acc += u * v;
}

// out[q * out_stride] = <a, b_q> for the kClasses rows b_q = b + q * b_stride; `next`, the
// first of the rows that follow, or b itself where none follow.
template <int kClasses, typename T>
inline __attribute__((always_inline)) void dots_pass(const T* a, const T* a_tail, const T* b,
                                                     const T* next, int64_t b_stride,
                                                     int64_t body, int64_t n, T* out,
                                                     int64_t out_stride) {
  Accumulators<T> acc[kClasses] = {};
  for (int64_t j = 0; j < body; j += kLanes) {
    for (int q = 0; q < kClasses; ++q) __builtin_prefetch(next + q * b_stride + j);
    for (int k = 0; k < kVectors; ++k) {
      Lanes<T> u;
      std::memcpy(&u, a + j + k * kWidth, sizeof(u));
      for (int q = 0; q < kClasses; ++q) {
        multiply_add(acc[q][k], u, b + q * b_stride + j + k * kWidth);
      }
    }
  }
  if (body < n) {
    for (int q = 0; q < kClasses; ++q) {
      T b_tail[kLanes] = {};
      std::memcpy(b_tail, b + q * b_stride + body, sizeof(T) * static_cast<size_t>(n - body));
      for (int k = 0; k < kVectors; ++k) {
        Lanes<T> u;
        std::memcpy(&u, a_tail + k * kWidth, sizeof(u));
        multiply_add(acc[q][k], u, b_tail + k * kWidth);
      }
    }
  }
  for (int q = 0; q < kClasses; ++q) out[q * out_stride] = fold<T>(acc[q]);
}

// out[c * out_stride] = <a, b_c> for c < count, the rows b_c = b + c * b_stride of which
// `rows` exist from b on (count <= rows; the passes prefetch up to kClassesPerPass rows ahead).
template <typename T>
inline __attribute__((always_inline)) void dots_unit_lanes(const T* a, const T* b,
                                                           int64_t b_stride, int64_t n,
                                                           int64_t count, int64_t rows, T* out,
                                                           int64_t out_stride) {
  const int64_t body = n - n % kLanes;
  // The tail, zero-padded: a padded lane adds +0, which changes no sum.
  T a_tail[kLanes] = {};
  std::memcpy(a_tail, a + body, sizeof(T) * static_cast<size_t>(n - body));
  int64_t c = 0;
  for (; c + kClassesPerPass <= count; c += kClassesPerPass) {
    const T* rows_c = b + c * b_stride;
    const T* next = c + 2 * kClassesPerPass <= rows ? rows_c + kClassesPerPass * b_stride : rows_c;
    dots_pass<kClassesPerPass>(a, a_tail, rows_c, next, b_stride, body, n, out + c * out_stride,
                               out_stride);
  }
  for (; c < count; ++c) {
    const T* row = b + c * b_stride;
    dots_pass<1>(a, a_tail, row, row, b_stride, body, n, out + c * out_stride, out_stride);
  }
}

LSOFTMAX_ISA_CLONES void dots_lanes(const float* a, const float* b, int64_t b_stride, int64_t n,
                                    int64_t count, int64_t rows, float* out, int64_t out_stride) {
  dots_unit_lanes(a, b, b_stride, n, count, rows, out, out_stride);
}
LSOFTMAX_ISA_CLONES void dots_lanes(const double* a, const double* b, int64_t b_stride,
                                    int64_t n, int64_t count, int64_t rows, double* out,
                                    int64_t out_stride) {
  dots_unit_lanes(a, b, b_stride, n, count, rows, out, out_stride);
}

// The same sums over strided rows (no vector lanes), in the same order.
template <typename T>
T dot_strided_lanes(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
  T lanes[kLanes] = {};
  for (int64_t j = 0; j < n; ++j) lanes[j % kLanes] += a[j * sa] * b[j * sb];
  T s[kWidth];
  for (int l = 0; l < kWidth; ++l) s[l] = lanes[l] + lanes[kWidth + l];
  return pairwise_total(s);
}

}  // namespace

template <typename T>
Status plain_logits(MatrixView<const T> x, MatrixView<const T> w, MatrixView<T> logits) {
  if (Status s = detail::check_weight_features(x.cols, w.cols); !s.ok()) return s;
  if (Status s = detail::check_shape("logits", logits.rows, logits.cols, x.rows, w.rows);
      !s.ok()) {
    return s;
  }
  const bool unit = x.col_stride == 1 && w.col_stride == 1;
  // Classes in blocks (one call into the instruction-set build per block and row), parallel
  // from about 2^17 multiply-adds per range (cost per class d / 4 against kMinWorkPerThread =
  // 2^15; 256 classes at d = 512). Measured in ONNX Runtime at batch 1 behind a first layer
  // (docs/benchmarks.md): with two intra-op threads the product split in two ran the model
  // faster than on the calling thread alone.
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (w.rows + kBlock - 1) / kBlock;
  const int64_t cost = kBlock * std::max<int64_t>(1, x.rows * x.cols / 4);
  detail::parallel_for(blocks, cost, [&](int64_t block) {
    const int64_t c0 = block * kBlock;
    const int64_t count = std::min(kBlock, w.rows - c0);
    for (int64_t i = 0; i < x.rows; ++i) {
      const T* xi = x.data + i * x.row_stride;
      if (unit) {
        dots_lanes(xi, w.data + c0 * w.row_stride, w.row_stride, x.cols, count, w.rows - c0,
                   &logits(i, c0), logits.col_stride);
        continue;
      }
      for (int64_t c = c0; c < c0 + count; ++c) {
        logits(i, c) =
            dot_strided_lanes(xi, x.col_stride, w.data + c * w.row_stride, w.col_stride, x.cols);
      }
    }
  });
  return Status::Ok();
}

template Status plain_logits<float>(MatrixView<const float>, MatrixView<const float>,
                                    MatrixView<float>);
template Status plain_logits<double>(MatrixView<const double>, MatrixView<const double>,
                                     MatrixView<double>);

}  // namespace lsoftmax
