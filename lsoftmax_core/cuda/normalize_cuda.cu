// lsoftmax::cuda::normalize_rows (normalize_cuda.h).
#include "cuda_common.cuh"
#include "lsoftmax/margin_math.h"
#include "lsoftmax/normalize_cuda.h"

namespace lsoftmax::cuda {
namespace {

template <typename T>
__global__ void normalize_rows_kernel(const T* in, T* out, int64_t rows, int64_t cols,
                                      int64_t in_stride, int64_t in_col, int64_t out_stride,
                                      int64_t out_col, double scale, double eps) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / detail::kWarp;
  const int lane = threadIdx.x % detail::kWarp;
  if (row >= rows) return;  // whole warps leave together: rows are per warp
  const T* src = in + row * in_stride;
  double ss = 0.0;
  for (int64_t j = lane; j < cols; j += detail::kWarp) {
    const double v = static_cast<double>(src[j * in_col]);
    ss += v * v;
  }
  ss = detail::warp_sum(ss);
  const double norm = sqrt(ss);
  const double factor = scale / (norm > eps ? norm : eps);
  T* dst = out + row * out_stride;
  for (int64_t j = lane; j < cols; j += detail::kWarp) {
    dst[j * out_col] = static_cast<T>(static_cast<double>(src[j * in_col]) * factor);
  }
}

template <typename T>
Status launch(const DeviceMatrix& in, const DeviceMatrix& out, double scale, void* stream) {
  constexpr int kThreads = 256;
  const int64_t warps_per_block = kThreads / detail::kWarp;
  const int64_t blocks = (in.rows + warps_per_block - 1) / warps_per_block;
  const double eps = static_cast<double>(degenerate_norm<T>());
  normalize_rows_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0,
                             static_cast<cudaStream_t>(stream)>>>(
      static_cast<const T*>(in.data), static_cast<T*>(out.data), in.rows, in.cols, in.row_stride,
      in.col_stride, out.row_stride, out.col_stride, scale, eps);
  return detail::launch_status("normalize_rows");
}

}  // namespace

Status normalize_rows(const DeviceMatrix& in, const DeviceMatrix& out, double scale,
                      void* stream) {
  if (in.rows != out.rows || in.cols != out.cols || in.dtype != out.dtype) {
    return Status::InvalidArgument("normalize_rows: out must have in's shape and dtype");
  }
  if (in.rows == 0 || in.cols == 0) return Status::Ok();
  if (in.dtype == DType::kFloat64) return launch<double>(in, out, scale, stream);
  if (in.dtype == DType::kFloat32) return launch<float>(in, out, scale, stream);
  return Status::InvalidArgument("normalize_rows: float32 or float64 only");
}

}  // namespace lsoftmax::cuda
