#include "row_kernels.h"

#include "isa_clones.h"

namespace lsoftmax {
namespace detail {

LSOFTMAX_ISA_CLONES double dot_unit(const float* a, const float* b, int64_t n) {
  return dot_strided<true>(a, 1, b, 1, n);
}
LSOFTMAX_ISA_CLONES double dot_unit(const double* a, const double* b, int64_t n) {
  return dot_strided<true>(a, 1, b, 1, n);
}
LSOFTMAX_ISA_CLONES double sumsq_unit(const float* a, int64_t n) {
  return sumsq_strided<true>(a, 1, n);
}
LSOFTMAX_ISA_CLONES double sumsq_unit(const double* a, int64_t n) {
  return sumsq_strided<true>(a, 1, n);
}
LSOFTMAX_ISA_CLONES RowDots row_dots_unit(const float* a, const float* b, int64_t n) {
  return row_dots_strided<true>(a, 1, b, 1, n);
}
LSOFTMAX_ISA_CLONES RowDots row_dots_unit(const double* a, const double* b, int64_t n) {
  return row_dots_strided<true>(a, 1, b, 1, n);
}
LSOFTMAX_ISA_CLONES void axpy_unit(float* y, float a, const float* u, int64_t n) {
  axpy_strided<true>(y, 1, a, u, 1, n);
}
LSOFTMAX_ISA_CLONES void axpy_unit(double* y, double a, const double* u, int64_t n) {
  axpy_strided<true>(y, 1, a, u, 1, n);
}
LSOFTMAX_ISA_CLONES void axpy2_unit(float* y, float a, const float* u, float b, const float* v,
                                    int64_t n) {
  axpy2_strided<true>(y, 1, a, u, 1, b, v, 1, n);
}
LSOFTMAX_ISA_CLONES void axpy2_unit(double* y, double a, const double* u, double b,
                                    const double* v, int64_t n) {
  axpy2_strided<true>(y, 1, a, u, 1, b, v, 1, n);
}

}  // namespace detail
}  // namespace lsoftmax
