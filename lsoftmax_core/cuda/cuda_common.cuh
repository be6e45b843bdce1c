// Shared pieces of the CUDA core: error conversion, dtype dispatch, element access, warp sums,
// workspace alignment and the host-side checks of device matrices.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "../src/checks.h"
#include "lsoftmax/lsoftmax_cuda.h"

namespace lsoftmax::cuda::detail {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Alignment of every piece carved out of a caller's workspace.
constexpr size_t kAlign = 256;

inline size_t align_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// Hands out kAlign-aligned pieces of one workspace in order. With base == nullptr it only adds
// up the size (total()), so sizing a workspace and carving it run the same code.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(char* base) : base_(base) {}
  void* take(size_t bytes) {
    void* p = base_ != nullptr ? base_ + offset_ : nullptr;
    offset_ += align_up(bytes);
    return p;
  }
  size_t total() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

// Sum over the warp. Butterfly: lanes l and l^off add the same two values (commutative), so
// every lane ends with the same bits and control flow that depends on the sum stays uniform.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

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

// `name` must be rows x cols of `dtype` (the dtype of what `reference` names), with
// non-negative strides and data unless it is empty.
inline Status check_matrix(const char* name, const DeviceMatrix& m, int64_t rows, int64_t cols,
                           DType dtype, const char* reference) {
  const Status s = lsoftmax::detail::check_shape(name, m.rows, m.cols, rows, cols);
  if (!s.ok()) return s;
  if (m.dtype != dtype) {
    return Status::InvalidArgument(std::string(name) + " is " + dtype_name(m.dtype) + " but " +
                                   reference + " is " + dtype_name(dtype) + "; they must match");
  }
  if (m.row_stride < 0 || m.col_stride < 0) {
    return Status::InvalidArgument(std::string(name) + " has a negative stride");
  }
  if (m.data == nullptr && rows * cols > 0) {
    return Status::InvalidArgument(std::string(name) + " is a null pointer");
  }
  return Status::Ok();
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
