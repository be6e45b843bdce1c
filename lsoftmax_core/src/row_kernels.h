// The margin passes' row kernels: dot products accumulated in double and row updates. The
// unit-stride ones, where the passes spend their time, are built for AVX-512, AVX2 and baseline
// x86-64 (row_kernels.cc) and chosen when the library loads: baseline SSE2 does two doubles per
// instruction. None of the builds contracts into FMAs and every build sums the same sixteen lanes
// in the same order (row_kernels.cc is compiled with -ffp-contract=off), so all give
// bit-identical results.
#pragma once

#include <cstdint>

namespace lsoftmax {
namespace detail {

// Sixteen partial sums in a fixed order: one running sum is a chain of dependent adds that costs
// the full add latency per element, and with eight the AVX2 build still waited on its two
// accumulator registers' adds. The fixed order keeps results independent of the thread count
// and of the instruction set.
constexpr int kLanes = 16;

inline double lane_sum(const double (&acc)[kLanes]) {
  double s[kLanes / 2];
  for (int k = 0; k < kLanes / 2; ++k) s[k] = acc[k] + acc[k + kLanes / 2];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

template <bool kUnit, typename T>
inline __attribute__((always_inline)) double dot_strided(const T* a, int64_t sa, const T* b,
                                                         int64_t sb, int64_t n) {
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

// |a|^2 as dot_strided(a, a) sums it. Inlined with both operands the same pointer, the compiler
// loads and converts each element once where the dot of two rows does it twice: the forward's
// pass over x for the row norms is bound by the conversions to double.
template <bool kUnit, typename T>
inline __attribute__((always_inline)) double sumsq_strided(const T* a, int64_t sa, int64_t n) {
  return dot_strided<kUnit>(a, sa, a, sa, n);
}

struct RowDots {
  double xx, ww, xw;
};

// |a|^2, |b|^2 and <a, b> in one pass, each summed exactly as dot_strided sums it.
template <bool kUnit, typename T>
inline __attribute__((always_inline)) RowDots row_dots_strided(const T* a, int64_t sa,
                                                               const T* b, int64_t sb,
                                                               int64_t n) {
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

// y += a u (+ b v). __restrict__: the gradient being updated never overlaps x or weight (an
// exactly aliased element would still be read before it is written).
template <bool kUnit, typename T>
inline __attribute__((always_inline)) void axpy_strided(T* __restrict__ y, int64_t sy, T a,
                                                        const T* __restrict__ u, int64_t su,
                                                        int64_t n) {
  if (kUnit) sy = su = 1;
  for (int64_t j = 0; j < n; ++j) y[j * sy] += a * u[j * su];
}

template <bool kUnit, typename T>
inline __attribute__((always_inline)) void axpy2_strided(T* __restrict__ y, int64_t sy, T a,
                                                         const T* __restrict__ u, int64_t su,
                                                         T b, const T* __restrict__ v,
                                                         int64_t sv, int64_t n) {
  if (kUnit) sy = su = sv = 1;
  for (int64_t j = 0; j < n; ++j) y[j * sy] += a * u[j * su] + b * v[j * sv];
}

// The unit-stride instances, one build per instruction set (row_kernels.cc).
double dot_unit(const float* a, const float* b, int64_t n);
double dot_unit(const double* a, const double* b, int64_t n);
double sumsq_unit(const float* a, int64_t n);
double sumsq_unit(const double* a, int64_t n);
RowDots row_dots_unit(const float* a, const float* b, int64_t n);
RowDots row_dots_unit(const double* a, const double* b, int64_t n);
void axpy_unit(float* y, float a, const float* u, int64_t n);
void axpy_unit(double* y, double a, const double* u, int64_t n);
void axpy2_unit(float* y, float a, const float* u, float b, const float* v, int64_t n);
void axpy2_unit(double* y, double a, const double* u, double b, const double* v, int64_t n);

template <typename T>
double dot(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
  if (sa == 1 && sb == 1) return dot_unit(a, b, n);
  return dot_strided<false>(a, sa, b, sb, n);
}

template <typename T>
double sumsq(const T* a, int64_t sa, int64_t n) {
  if (sa == 1) return sumsq_unit(a, n);
  return sumsq_strided<false>(a, sa, n);
}

template <typename T>
RowDots row_dots(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
  if (sa == 1 && sb == 1) return row_dots_unit(a, b, n);
  return row_dots_strided<false>(a, sa, b, sb, n);
}

template <typename T>
void axpy(T* y, int64_t sy, T a, const T* u, int64_t su, int64_t n) {
  if (sy == 1 && su == 1) return axpy_unit(y, a, u, n);
  axpy_strided<false>(y, sy, a, u, su, n);
}

template <typename T>
void axpy2(T* y, int64_t sy, T a, const T* u, int64_t su, T b, const T* v, int64_t sv,
           int64_t n) {
  if (sy == 1 && su == 1 && sv == 1) return axpy2_unit(y, a, u, b, v, n);
  axpy2_strided<false>(y, sy, a, u, su, b, v, sv, n);
}

}  // namespace detail
}  // namespace lsoftmax
