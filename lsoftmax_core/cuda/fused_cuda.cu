// CUDA per-block kernels of the fused margin cross-entropy: one thread block per row of the
// N x B block of logits (see lsoftmax/fused.h and lsoftmax/fused_cuda.h).
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <string>
#include <type_traits>

#include "cuda_common.cuh"
#include "lsoftmax/fused_cuda.h"

namespace lsoftmax::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T device_exp(T v);
template <>
__device__ __forceinline__ float device_exp<float>(float v) {
  return expf(v);
}
template <>
__device__ __forceinline__ double device_exp<double>(double v) {
  return exp(v);
}

// Block-wide reduction of one double per thread; every thread gets the result.
template <bool kMax>
__device__ double block_reduce(double v, double* shared) {
  for (int off = detail::kWarp / 2; off > 0; off /= 2) {
    const double o = __shfl_xor_sync(detail::kFullMask, v, off);
    v = kMax ? (o > v ? o : v) : v + o;
  }
  const int lane = threadIdx.x % detail::kWarp, warp = threadIdx.x / detail::kWarp;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double r = shared[0];
  for (int w = 1; w < kThreads / detail::kWarp; ++w) {
    r = kMax ? (shared[w] > r ? shared[w] : r) : r + shared[w];
  }
  __syncthreads();  // shared is reused by the next reduction
  return r;
}

template <typename L>
__device__ __forceinline__ int64_t target_column(const L* labels, int64_t stride, int64_t i,
                                                 int64_t class_begin, int64_t cols) {
  const int64_t j = static_cast<int64_t>(labels[i * stride]) - class_begin;
  return (j >= 0 && j < cols) ? j : -1;
}

template <typename T, typename L>
__global__ void __launch_bounds__(kThreads)
    lse_rows(detail::Mat<T> block, int64_t cols, const L* labels, int64_t label_stride,
             int64_t class_begin, const T* target, double* row_max, double* row_sum) {
  __shared__ double shared[kThreads / detail::kWarp];
  const int64_t i = blockIdx.x;
  const int64_t jt = target_column(labels, label_stride, i, class_begin, cols);
  if (jt >= 0 && threadIdx.x == 0) block.at(i, jt) = target[i];
  __syncthreads();
  double m = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const double v = static_cast<double>(block.at(i, j));
    m = v > m ? v : m;
  }
  const double old_max = row_max[i];
  double new_max = block_reduce<true>(m, shared);
  new_max = old_max > new_max ? old_max : new_max;
  const T shift = static_cast<T>(new_max);
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    sum += static_cast<double>(device_exp<T>(block.at(i, j) - shift));
  }
  sum = block_reduce<false>(sum, shared);
  if (threadIdx.x == 0) {
    const double carried = old_max == new_max ? row_sum[i] : row_sum[i] * exp(old_max - new_max);
    row_sum[i] = carried + sum;
    row_max[i] = new_max;
  }
}

template <typename T, typename L>
__global__ void __launch_bounds__(kThreads)
    grad_rows(detail::Mat<T> block, int64_t cols, const L* labels, int64_t label_stride,
              int64_t class_begin, const T* target, const double* lse, const T* scale) {
  const int64_t i = blockIdx.x;
  const int64_t jt = target_column(labels, label_stride, i, class_begin, cols);
  const double l = lse[i];
  const T s = scale[i];
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const T v = j == jt ? target[i] : block.at(i, j);
    const T p = s * device_exp<T>(static_cast<T>(static_cast<double>(v) - l));
    block.at(i, j) = j == jt ? p - s : p;
  }
}

Status check_args(const DeviceMatrix& block, const DeviceLabels& labels, int64_t class_begin,
                  const void* a, const void* b, const void* c) {
  Status s = detail::check_matrix("block", block, block.rows, block.cols, block.dtype, "block");
  if (s.ok() && block.dtype != DType::kFloat32 && block.dtype != DType::kFloat64) {
    s = Status::InvalidArgument(std::string("the fused loss takes float32 or float64 blocks, got ") +
                                dtype_name(block.dtype));
  }
  if (s.ok()) s = lsoftmax::detail::check_label_count(labels.size, block.rows);
  if (s.ok() && block.rows > INT_MAX) {
    s = Status::InvalidArgument("block has more rows than one launch covers (2^31 - 1)");
  }
  if (s.ok() && class_begin < 0) {
    s = Status::InvalidArgument("class_begin must be >= 0, got " + std::to_string(class_begin));
  }
  if (s.ok() && block.rows > 0 && (a == nullptr || b == nullptr || c == nullptr ||
                                   labels.data == nullptr)) {
    s = Status::InvalidArgument("the per-row arrays must not be null");
  }
  return s;
}

template <typename F>
Status dispatch_block(const DeviceMatrix& block, const DeviceLabels& labels, F&& f) {
  return detail::dispatch(block.dtype, labels.type, [&](auto tt, auto lt) -> Status {
    using T = typename decltype(tt)::type;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      return f(tt, lt);
    } else {
      return Status::InvalidArgument("the fused loss takes float32 or float64 blocks");
    }
  });
}

}  // namespace

Status fused_lse_block(const DeviceMatrix& block, const DeviceLabels& labels,
                       int64_t class_begin, const void* target_logit, double* row_max,
                       double* row_sum, void* stream) {
  Status s = check_args(block, labels, class_begin, target_logit, row_max, row_sum);
  if (!s.ok() || block.rows == 0 || block.cols == 0) return s;
  return dispatch_block(block, labels, [&](auto tt, auto lt) -> Status {
    using T = typename decltype(tt)::type;
    using L = typename decltype(lt)::type;
    lse_rows<T, L><<<static_cast<unsigned>(block.rows), kThreads, 0,
                     static_cast<cudaStream_t>(stream)>>>(
        detail::mat<T>(block), block.cols, static_cast<const L*>(labels.data), labels.stride,
        class_begin, static_cast<const T*>(target_logit), row_max, row_sum);
    return detail::launch_status("lsoftmax fused log-sum-exp kernel launch");
  });
}

Status fused_grad_block(const DeviceMatrix& block, const DeviceLabels& labels,
                        int64_t class_begin, const void* target_logit, const double* lse,
                        const void* scale, void* stream) {
  Status s = check_args(block, labels, class_begin, target_logit, lse, scale);
  if (!s.ok() || block.rows == 0 || block.cols == 0) return s;
  return dispatch_block(block, labels, [&](auto tt, auto lt) -> Status {
    using T = typename decltype(tt)::type;
    using L = typename decltype(lt)::type;
    grad_rows<T, L><<<static_cast<unsigned>(block.rows), kThreads, 0,
                      static_cast<cudaStream_t>(stream)>>>(
        detail::mat<T>(block), block.cols, static_cast<const L*>(labels.data), labels.stride,
        class_begin, static_cast<const T*>(target_logit), lse, static_cast<const T*>(scale));
    return detail::launch_status("lsoftmax fused gradient kernel launch");
  });
}

}  // namespace lsoftmax::cuda
