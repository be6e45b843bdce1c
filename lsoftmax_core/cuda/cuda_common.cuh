// Shared pieces of the CUDA core: error conversion, dtype dispatch, element access.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "lsoftmax/lsoftmax_cuda.h"

namespace lsoftmax::cuda::detail {

// cudaSuccess -> Ok; anything else -> RuntimeError naming the step and the CUDA error.
Status cuda_status(cudaError_t err, const char* what);

// Checks the launch that was just enqueued (configuration errors, no driver, no device).
inline Status launch_status(const char* kernel) { return cuda_status(cudaGetLastError(), kernel); }

template <typename T>
struct Tag {
  using type = T;
};

// The per-row math runs in float for every dtype narrower than double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// A strided device matrix, strides in elements.
template <typename T>
struct Mat {
  T* p;
  int64_t rs;
  int64_t cs;
  __device__ __forceinline__ T& at(int64_t i, int64_t j) const { return p[i * rs + j * cs]; }
};

template <typename T>
Mat<T> mat(const DeviceMatrix& m) {
  return Mat<T>{static_cast<T*>(m.data), m.row_stride, m.col_stride};
}

// Calls f(Tag<T>{}, Tag<L>{}) for the (element, label) types named at run time.
template <typename F>
Status dispatch(DType dt, LabelType lt, F&& f) {
  auto with_label = [&](auto tt) -> Status {
    if (lt == LabelType::kInt32) return f(tt, Tag<int32_t>{});
    return f(tt, Tag<int64_t>{});
  };
  switch (dt) {
    case DType::kFloat32:
      return with_label(Tag<float>{});
    case DType::kFloat64:
      return with_label(Tag<double>{});
    case DType::kFloat16:
      return with_label(Tag<__half>{});
    case DType::kBFloat16:
      return with_label(Tag<__nv_bfloat16>{});
  }
  return Status::InvalidArgument("unknown dtype code " + std::to_string(static_cast<int>(dt)));
}

}  // namespace lsoftmax::cuda::detail
