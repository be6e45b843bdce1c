// CUDA-EP kernel of ai.lsoftmax::LSoftmaxLinear (same op, attributes and checks as the CPU kernel
// in lsoftmax_linear_op.cc): Y = X W^T by cuBLAS with ONNX Runtime's handle on ORT's compute
// stream, then the core's margin kernel (lsoftmax::cuda::margin_forward) on the same stream.
//
// Labels are declared a CPU input (OrtMemTypeCPUInput): ORT hands them over on the host (graph
// inputs usually are there already), so they are validated on the host with the CPU kernel's
// message and no device sync, then uploaded into a buffer from ORT's own device allocator. X, W
// and Y stay on the device; nothing synchronizes, nothing is allocated outside ORT.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cublas_gemm_cuda.h"
#include "lsoftmax/lsoftmax.h"
#include "lsoftmax/lsoftmax_cuda.h"
#include "lsoftmax_linear_op.h"
#include "ort_utils.h"

namespace lsoftmax_ort {
namespace {

// KernelContext_GetResource ids of the CUDA EP (core/providers/cuda/cuda_resource.h, which the
// 1.21 headers lack): the compute stream and the cuBLAS handle bound to it.
constexpr int kCudaResourceVersion = 1;
constexpr int kCudaResourceCublasHandle = 10002;

template <typename T>
constexpr lsoftmax::cuda::DType cuda_dtype() {
  return std::is_same_v<T, double> ? lsoftmax::cuda::DType::kFloat64
                                   : lsoftmax::cuda::DType::kFloat32;
}

template <typename L>
OrtStatus* check_labels_host(const L* labels, int64_t n, int64_t c) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = static_cast<int64_t>(labels[i]);
    if (y < 0 || y >= c) {
      return invalid_argument(kLSoftmaxLinear, "labels[" + std::to_string(i) + "] = " +
                                                   std::to_string(y) + " is out of range [0, " +
                                                   std::to_string(c) + ")");
    }
  }
  return nullptr;
}

// A device buffer from ORT's allocator for the kernel's inputs. Returned to the arena when the
// kernel returns: ORT runs the session's CUDA kernels on one compute stream, so any later user
// of the block is ordered after the margin kernel on that stream.
class DeviceBuffer {
 public:
  DeviceBuffer(Ort::KernelContext& ctx, const OrtMemoryInfo* info, size_t bytes)
      : allocator_(ctx.GetAllocator(*info)) {
    data_ = allocator_->Alloc(allocator_, bytes);
    if (data_ == nullptr) {
      Ort::GetApi().ReleaseAllocator(allocator_);
      throw std::runtime_error("ORT's device allocator returned no memory for the labels");
    }
  }
  ~DeviceBuffer() {
    if (data_ != nullptr) allocator_->Free(allocator_, data_);
    Ort::GetApi().ReleaseAllocator(allocator_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* data() const { return data_; }

 private:
  OrtAllocator* allocator_;
  void* data_ = nullptr;
};

template <typename T>
class LSoftmaxLinearCudaKernel {
 public:
  LSoftmaxLinearCudaKernel(int64_t margin, double lambda) : margin_(margin), lambda_(lambda) {}
  OrtStatus* ComputeV2(OrtKernelContext* context);

 private:
  int64_t margin_;
  double lambda_;
};

template <typename T>
struct LSoftmaxLinearCudaOp
    : Ort::CustomOpBase<LSoftmaxLinearCudaOp<T>, LSoftmaxLinearCudaKernel<T>, true> {
  LSoftmaxLinearCudaOp() { OrtCustomOp::version = kMinOrtApiVersion; }
  OrtStatus* CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kLSoftmaxLinear; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    // labels: any type here, so a wrong one gets a run-time error naming the input.
    return index < 2 ? onnx_type<T>() : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 2 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                      : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  OrtMemType GetInputMemoryType(size_t index) const {
    return index == 2 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return onnx_type<T>(); }
};

template <typename T>
OrtStatus* LSoftmaxLinearCudaOp<T>::CreateKernelV2(const OrtApi&, const OrtKernelInfo* info,
                                                   void** kernel) const {
  return guarded(kLSoftmaxLinear, [&]() -> OrtStatus* {
    int64_t margin = 0;
    if (!try_attribute(info, "margin", &margin)) {
      return invalid_argument(kLSoftmaxLinear,
                              "attribute 'margin' (an int >= 1) is required and must be an int");
    }
    float lambda = kLSoftmaxLinearDefaultLambda;
    if (!try_attribute(info, "lambda", &lambda)) {
      int64_t as_int = 0;
      if (try_attribute(info, "lambda", &as_int)) {
        return invalid_argument(kLSoftmaxLinear, "attribute 'lambda' must be a float, got an int");
      }
    }
    const lsoftmax::Status s = lsoftmax::validate_margin_params(margin, lambda);
    if (!s.ok()) return invalid_argument(kLSoftmaxLinear, "attribute " + s.message());
    *kernel = new LSoftmaxLinearCudaKernel<T>(margin, lambda);
    return nullptr;
  });
}

template <typename T>
OrtStatus* LSoftmaxLinearCudaKernel<T>::ComputeV2(OrtKernelContext* context) {
  return guarded(kLSoftmaxLinear, [&]() -> OrtStatus* {
    kernel_calls().fetch_add(1, std::memory_order_relaxed);
    Ort::KernelContext ctx(context);
    const Ort::ConstValue x = ctx.GetInput(0);
    const Ort::ConstValue w = ctx.GetInput(1);
    const std::vector<int64_t> xs = x.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> ws = w.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.size() != 2) {
      return invalid_argument(kLSoftmaxLinear,
                              "input X must be 2-D (N, D), got shape " + shape_string(xs));
    }
    if (ws.size() != 2) {
      return invalid_argument(kLSoftmaxLinear,
                              "input W must be 2-D (C, D), got shape " + shape_string(ws));
    }
    const int64_t n = xs[0], d = xs[1], c = ws[0];
    if (ws[1] != d) {
      return invalid_argument(kLSoftmaxLinear, "input X has " + std::to_string(d) +
                                                   " features per row but input W has " +
                                                   std::to_string(ws[1]) +
                                                   " (W must be (num_classes, in_features))");
    }
    Ort::ConstValue labels{nullptr};
    if (ctx.GetInputCount() > 2) labels = ctx.GetInput(2);
    lsoftmax::cuda::LabelType label_type = lsoftmax::cuda::LabelType::kInt64;
    if (labels) {
      const Ort::TensorTypeAndShapeInfo li = labels.GetTensorTypeAndShapeInfo();
      const ONNXTensorElementDataType lt = li.GetElementType();
      if (lt != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 && lt != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
        return invalid_argument(kLSoftmaxLinear,
                                std::string("input labels must be int64 or int32, got ") +
                                    type_name(lt));
      }
      const std::vector<int64_t> ls = li.GetShape();
      if (ls.size() != 1 || ls[0] != n) {
        return invalid_argument(kLSoftmaxLinear, "input labels must have shape (" +
                                                     std::to_string(n) + ",) to match X, got " +
                                                     shape_string(ls));
      }
      if (lt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) label_type = lsoftmax::cuda::LabelType::kInt32;
      OrtStatus* bad = lt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                           ? check_labels_host(labels.GetTensorData<int64_t>(), n, c)
                           : check_labels_host(labels.GetTensorData<int32_t>(), n, c);
      if (bad != nullptr) return bad;
    }

    Ort::UnownedValue y = ctx.GetOutput(0, {n, c});
    if (n == 0 || c == 0) return nullptr;
    void* stream = ctx.GetGPUComputeStream();
    T* out = y.GetTensorMutableData<T>();
    lsoftmax::Status s;
    if (d == 0) {
      s = lsoftmax::cuda::memset_async(stream, out, 0, static_cast<size_t>(n * c) * sizeof(T));
    } else {
      void* handle = nullptr;
      Ort::ThrowOnError(Ort::GetApi().KernelContext_GetResource(
          context, kCudaResourceVersion, kCudaResourceCublasHandle, &handle));
      if (handle == nullptr) {
        return make_status(ORT_RUNTIME_EXCEPTION,
                           std::string(kLSoftmaxLinear) + ": the CUDA EP gave no cuBLAS handle");
      }
      s = gemm_xwt(handle, stream, std::is_same_v<T, double>, x.GetTensorData<T>(),
                   w.GetTensorData<T>(), out, n, d, c);
    }
    // Margin 1 leaves the product as it is (the labels were still checked above).
    if (!s.ok() || !labels || margin_ == 1) return to_ort_status(kLSoftmaxLinear, s);

    const size_t label_bytes =
        static_cast<size_t>(n) * (label_type == lsoftmax::cuda::LabelType::kInt32 ? 4 : 8);
    DeviceBuffer device_labels(
        ctx, static_cast<const OrtMemoryInfo*>(y.GetTensorMemoryInfo()), label_bytes);
    s = lsoftmax::cuda::copy_async(stream, device_labels.data(), labels.GetTensorRawData(),
                                   label_bytes);
    if (!s.ok()) return to_ort_status(kLSoftmaxLinear, s);
    const lsoftmax::cuda::DType dt = cuda_dtype<T>();
    const lsoftmax::cuda::DeviceMatrix xm{const_cast<T*>(x.GetTensorData<T>()), n, d, d, 1, dt};
    const lsoftmax::cuda::DeviceMatrix wm{const_cast<T*>(w.GetTensorData<T>()), c, d, d, 1, dt};
    const lsoftmax::cuda::DeviceMatrix ym{out, n, c, c, 1, dt};
    const lsoftmax::cuda::DeviceLabels lm{device_labels.data(), n, 1, label_type};
    // Labels were checked on the host: no device flag is needed.
    s = lsoftmax::cuda::margin_forward(ym, xm, wm, lm, margin_, lambda_, nullptr, stream);
    return to_ort_status(kLSoftmaxLinear, s);
  });
}

}  // namespace

std::vector<const OrtCustomOp*> LSoftmaxLinearCudaOps() {
  static const LSoftmaxLinearCudaOp<float> op_f32;
  static const LSoftmaxLinearCudaOp<double> op_f64;
  return {&op_f32, &op_f64};
}

}  // namespace lsoftmax_ort
