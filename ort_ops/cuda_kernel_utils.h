// Pieces shared by CUDA-EP kernels (g++-compiled glue): the EP's cuBLAS handle, scratch memory
// from ORT's own device allocator, device matrix views and the host-side check of labels
// declared as CPU inputs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "lsoftmax/labels.h"
#include "lsoftmax/lsoftmax_cuda.h"
#include "ort_utils.h"

namespace lsoftmax_ort {

// KernelContext_GetResource ids of the CUDA EP (core/providers/cuda/cuda_resource.h, which the
// 1.21 headers lack): the cuBLAS handle bound to the compute stream.
constexpr int kCudaResourceVersion = 1;
constexpr int kCudaResourceCublasHandle = 10002;

// The cuBLAS handle the CUDA EP bound to its compute stream.
inline OrtStatus* cublas_handle(OrtKernelContext* context, const char* op, void** handle) {
  *handle = nullptr;
  Ort::ThrowOnError(Ort::GetApi().KernelContext_GetResource(
      context, kCudaResourceVersion, kCudaResourceCublasHandle, handle));
  if (*handle == nullptr) {
    return make_status(ORT_RUNTIME_EXCEPTION,
                       std::string(op) + ": the CUDA EP gave no cuBLAS handle");
  }
  return nullptr;
}

// A contiguous rows x cols device matrix of T (float or double) for the core's CUDA calls.
template <typename T>
lsoftmax::cuda::DeviceMatrix device_matrix(const void* p, int64_t rows, int64_t cols) {
  using lsoftmax::cuda::DType;
  const DType dtype = std::is_same_v<T, double> ? DType::kFloat64 : DType::kFloat32;
  return lsoftmax::cuda::DeviceMatrix{const_cast<void*>(p), rows, cols, cols, 1, dtype};
}

// One device block from ORT's allocator for a kernel's scratch buffers. Returned to the arena
// when the kernel returns: ORT runs a session's CUDA kernels on one compute stream, so any later
// user of the block is ordered after this kernel's launches on that stream.
class OrtDeviceScratch {
 public:
  OrtDeviceScratch(Ort::KernelContext& ctx, const OrtMemoryInfo* info, size_t bytes)
      : allocator_(ctx.GetAllocator(*info)) {
    if (bytes == 0) return;
    data_ = allocator_->Alloc(allocator_, bytes);
    if (data_ == nullptr) {
      Ort::GetApi().ReleaseAllocator(allocator_);
      throw std::runtime_error("ORT's device allocator returned no memory for " +
                               std::to_string(bytes) + " bytes of scratch space");
    }
  }
  ~OrtDeviceScratch() {
    if (data_ != nullptr) allocator_->Free(allocator_, data_);
    Ort::GetApi().ReleaseAllocator(allocator_);
  }
  OrtDeviceScratch(const OrtDeviceScratch&) = delete;
  OrtDeviceScratch& operator=(const OrtDeviceScratch&) = delete;
  char* data() const { return static_cast<char*>(data_); }

 private:
  OrtAllocator* allocator_;
  void* data_ = nullptr;
};

// Carves aligned pieces out of one scratch block: first pass (base == nullptr) to size it, second
// to hand out pointers at the same offsets.
class ScratchLayout {
 public:
  explicit ScratchLayout(char* base) : base_(base) {}
  void* take(size_t bytes) {
    void* p = base_ == nullptr ? nullptr : base_ + offset_;
    offset_ += (bytes + kAlign - 1) / kAlign * kAlign;
    return p;
  }
  size_t size() const { return offset_; }

 private:
  static constexpr size_t kAlign = 256;
  char* base_;
  size_t offset_ = 0;
};

// Labels on the host: the CPU core's message for the first one outside [0, c).
template <typename L>
OrtStatus* check_labels_on_host(const char* op, const L* labels, int64_t n, int64_t c) {
  const lsoftmax::Status s = lsoftmax::check_label_range(lsoftmax::LabelView<L>{labels, n, 1}, c);
  return s.ok() ? nullptr : invalid_argument(op, s.message());
}

// The same for a labels input that check_labels_input accepted (int64 or int32).
inline OrtStatus* check_labels_on_host(const char* op, const Ort::ConstValue& labels,
                                       ONNXTensorElementDataType type, int64_t n, int64_t c) {
  return type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
             ? check_labels_on_host(op, labels.GetTensorData<int64_t>(), n, c)
             : check_labels_on_host(op, labels.GetTensorData<int32_t>(), n, c);
}

// The core's view of such labels once uploaded to `data`, and their size in bytes.
inline lsoftmax::cuda::DeviceLabels device_labels(const void* data, ONNXTensorElementDataType type,
                                                  int64_t n) {
  return lsoftmax::cuda::DeviceLabels{data, n, 1,
                                      type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                                          ? lsoftmax::cuda::LabelType::kInt64
                                          : lsoftmax::cuda::LabelType::kInt32};
}

inline size_t label_bytes(ONNXTensorElementDataType type, int64_t n) {
  return static_cast<size_t>(n) * (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? 8 : 4);
}

}  // namespace lsoftmax_ort
