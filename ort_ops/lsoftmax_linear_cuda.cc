// CUDA-EP kernel of ai.lsoftmax::LSoftmaxLinear (same op, attributes and checks as the CPU kernel
// in lsoftmax_linear_op.cc): Y = X W^T by cuBLAS with ONNX Runtime's handle on ORT's compute
// stream, then the core's margin kernel (lsoftmax::cuda::margin_forward) on the same stream.
//
// Labels are declared a CPU input (OrtMemTypeCPUInput): ORT hands them over on the host (graph
// inputs usually are there already), so they are validated on the host with the CPU kernel's
// message and no device sync, then uploaded into a buffer from ORT's own device allocator. X, W
// and Y stay on the device; nothing synchronizes, nothing is allocated outside ORT.
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cublas_gemm_cuda.h"
#include "cuda_kernel_utils.h"
#include "lsoftmax/lsoftmax.h"
#include "lsoftmax/lsoftmax_cuda.h"
#include "lsoftmax_linear_op.h"
#include "ort_utils.h"

namespace lsoftmax_ort {
namespace {

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
    : LabelledOpBase<LSoftmaxLinearCudaOp<T>, LSoftmaxLinearCudaKernel<T>, T, /*kInputs=*/3,
                     /*kOutputs=*/1, /*kCudaEp=*/true> {
  OrtStatus* CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded(kLSoftmaxLinear, [&]() -> OrtStatus* {
      int64_t margin = 0;
      double lambda = 0.0;
      if (OrtStatus* bad = ReadLSoftmaxLinearAttributes(info, &margin, &lambda)) return bad;
      *kernel = new LSoftmaxLinearCudaKernel<T>(margin, lambda);
      return nullptr;
    });
  }
  const char* GetName() const { return kLSoftmaxLinear; }
};

template <typename T>
OrtStatus* LSoftmaxLinearCudaKernel<T>::ComputeV2(OrtKernelContext* context) {
  return compute_guarded(kLSoftmaxLinear, context, [&](Ort::KernelContext& ctx) -> OrtStatus* {
    LSoftmaxLinearInputs in;
    if (OrtStatus* bad = ReadLSoftmaxLinearInputs(ctx, &in)) return bad;
    const Ort::ConstValue &x = in.x, &w = in.w, &labels = in.labels;
    const int64_t n = in.n, d = in.d, c = in.c;
    const ONNXTensorElementDataType label_type = in.label_type;
    if (labels) {
      if (OrtStatus* bad = check_labels_on_host(kLSoftmaxLinear, labels, label_type, n, c)) {
        return bad;
      }
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
      if (OrtStatus* bad = cublas_handle(context, kLSoftmaxLinear, &handle)) return bad;
      s = gemm_xwt(handle, stream, std::is_same_v<T, double>, x.GetTensorData<T>(),
                   w.GetTensorData<T>(), out, n, d, c);
    }
    // Margin 1 leaves the product as it is (the labels were still checked above).
    if (!s.ok() || !labels || margin_ == 1) return to_ort_status(kLSoftmaxLinear, s);

    const size_t bytes = label_bytes(label_type, n);
    OrtDeviceScratch uploaded(ctx, static_cast<const OrtMemoryInfo*>(y.GetTensorMemoryInfo()),
                              bytes);
    s = lsoftmax::cuda::copy_async(stream, uploaded.data(), labels.GetTensorRawData(), bytes);
    if (!s.ok()) return to_ort_status(kLSoftmaxLinear, s);
    // Labels were checked on the host: no device flag is needed.
    s = lsoftmax::cuda::margin_forward(device_matrix<T>(out, n, c),
                                       device_matrix<T>(x.GetTensorData<T>(), n, d),
                                       device_matrix<T>(w.GetTensorData<T>(), c, d),
                                       device_labels(uploaded.data(), label_type, n), margin_,
                                       lambda_, nullptr, stream);
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
