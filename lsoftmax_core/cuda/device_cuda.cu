// Device queries and small helpers of the CUDA core. Every CUDA failure becomes a Status: with
// the static cudart the library loads on a machine with no driver, and the first CUDA call then
// reports cudaErrorInsufficientDriver / cudaErrorNoDevice, which must not abort the process.
#include <string>

#include "cuda_common.cuh"

namespace lsoftmax::cuda {
namespace detail {

Status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  std::string msg = std::string("lsoftmax CUDA: ") + what + " failed: " + cudaGetErrorName(err) +
                    " (" + cudaGetErrorString(err) + ")";
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice) {
    msg += "; lsoftmax's CUDA kernels need an NVIDIA GPU and a driver that supports CUDA 13";
  }
  return Status::RuntimeError(msg);
}

}  // namespace detail

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no error behind for the next caller to trip on
    return 0;
  }
  return n;
}

Status device_status() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return detail::cuda_status(err, "cudaGetDeviceCount");
  }
  if (n == 0) return Status::RuntimeError("lsoftmax CUDA: no CUDA device is visible");
  return Status::Ok();
}

Status scratch_alloc(void* stream, size_t bytes, bool zero, void** ptr) {
  auto s = static_cast<cudaStream_t>(stream);
  void* p = nullptr;
  Status st = detail::cuda_status(cudaMallocAsync(&p, bytes, s), "cudaMallocAsync");
  if (!st.ok()) return st;
  if (zero) {
    st = detail::cuda_status(cudaMemsetAsync(p, 0, bytes, s), "cudaMemsetAsync");
    if (!st.ok()) {
      (void)cudaFreeAsync(p, s);
      return st;
    }
  }
  *ptr = p;
  return Status::Ok();
}

Status scratch_free(void* stream, void* ptr) {
  if (ptr == nullptr) return Status::Ok();
  return detail::cuda_status(cudaFreeAsync(ptr, static_cast<cudaStream_t>(stream)),
                             "cudaFreeAsync");
}

Status copy_async(void* stream, void* dst, const void* src, size_t bytes) {
  return detail::cuda_status(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, static_cast<cudaStream_t>(stream)),
      "cudaMemcpyAsync");
}

Status memset_async(void* stream, void* dst, int value, size_t bytes) {
  return detail::cuda_status(cudaMemsetAsync(dst, value, bytes, static_cast<cudaStream_t>(stream)),
                             "cudaMemsetAsync");
}

Status stream_synchronize(void* stream) {
  return detail::cuda_status(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)),
                             "cudaStreamSynchronize");
}

Status copy_to_host_sync(void* stream, void* dst, const void* src, size_t bytes) {
  auto s = static_cast<cudaStream_t>(stream);
  Status st = detail::cuda_status(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s),
                                  "cudaMemcpyAsync");
  if (!st.ok()) return st;
  return detail::cuda_status(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

}  // namespace lsoftmax::cuda
