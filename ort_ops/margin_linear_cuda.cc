// CUDA-EP kernel of ai.lsoftmax::MarginLinear (same op, attributes and checks as the CPU kernel
// in margin_linear_op.cc): the normalizing kinds' rows normalized on the device by the core
// (lsoftmax::cuda::normalize_rows, the scale s folded into X's rows), Y = X W^T by cuBLAS with
// ONNX Runtime's handle on ORT's compute stream, then the core's margin kernel
// (lsoftmax::cuda::margin_family_forward) on the same stream. Labels are a CPU input, checked on
// the host and uploaded, as in lsoftmax_linear_cuda.cc; scratch comes from ORT's allocator.
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cublas_gemm_cuda.h"
#include "cuda_kernel_utils.h"
#include "lsoftmax/lsoftmax_cuda.h"
#include "lsoftmax/normalize_cuda.h"
#include "margin_linear_op.h"
#include "ort_utils.h"

namespace lsoftmax_ort {
namespace {

template <typename T>
class MarginLinearCudaKernel {
 public:
  explicit MarginLinearCudaKernel(const MarginLinearAttributes& attrs) : attrs_(attrs) {}
  OrtStatus* ComputeV2(OrtKernelContext* context);

 private:
  MarginLinearAttributes attrs_;
};

template <typename T>
struct MarginLinearCudaOp
    : LabelledOpBase<MarginLinearCudaOp<T>, MarginLinearCudaKernel<T>, T, /*kInputs=*/3,
                     /*kOutputs=*/1, /*kCudaEp=*/true> {
  OrtStatus* CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded(kMarginLinear, [&]() -> OrtStatus* {
      MarginLinearAttributes attrs;
      if (OrtStatus* bad = ReadMarginLinearAttributes(info, &attrs)) return bad;
      *kernel = new MarginLinearCudaKernel<T>(attrs);
      return nullptr;
    });
  }
  const char* GetName() const { return kMarginLinear; }
};

template <typename T>
OrtStatus* MarginLinearCudaKernel<T>::ComputeV2(OrtKernelContext* context) {
  return compute_guarded(kMarginLinear, context, [&](Ort::KernelContext& ctx) -> OrtStatus* {
    LSoftmaxLinearInputs in;
    if (OrtStatus* bad = ReadLSoftmaxLinearInputs(ctx, &in, kMarginLinear)) return bad;
    const Ort::ConstValue &x = in.x, &w = in.w, &labels = in.labels;
    const int64_t n = in.n, d = in.d, c = in.c;
    if (labels) {
      if (OrtStatus* bad = check_labels_on_host(kMarginLinear, labels, in.label_type, n, c)) {
        return bad;
      }
    }
    Ort::UnownedValue y = ctx.GetOutput(0, {n, c});
    if (n == 0 || c == 0) return nullptr;
    void* stream = ctx.GetGPUComputeStream();
    T* out = y.GetTensorMutableData<T>();
    const auto* mem = static_cast<const OrtMemoryInfo*>(y.GetTensorMemoryInfo());
    const lsoftmax::KindProperties props = lsoftmax::kind_properties(attrs_.spec.kind);
    const size_t elem = sizeof(T);
    // One scratch block: normalized X (cosine kinds), normalized W, the uploaded labels.
    ScratchLayout sizing(nullptr);
    if (props.normalizes_features) sizing.take(static_cast<size_t>(n * d) * elem);
    if (props.normalizes_weights) sizing.take(static_cast<size_t>(c * d) * elem);
    if (labels) sizing.take(label_bytes(in.label_type, n));
    OrtDeviceScratch scratch(ctx, mem, sizing.size());
    ScratchLayout layout(scratch.data());
    const T* xa = x.GetTensorData<T>();
    const T* wa = w.GetTensorData<T>();
    lsoftmax::Status s;
    if (props.normalizes_features) {
      T* xn = static_cast<T*>(layout.take(static_cast<size_t>(n * d) * elem));
      const double scale = props.scaled ? attrs_.spec.scale : 1.0;
      s = lsoftmax::cuda::normalize_rows(device_matrix<T>(xa, n, d), device_matrix<T>(xn, n, d),
                                         scale, stream);
      xa = xn;
    }
    if (s.ok() && props.normalizes_weights) {
      T* wn = static_cast<T*>(layout.take(static_cast<size_t>(c * d) * elem));
      s = lsoftmax::cuda::normalize_rows(device_matrix<T>(wa, c, d), device_matrix<T>(wn, c, d),
                                         1.0, stream);
      wa = wn;
    }
    if (!s.ok()) return to_ort_status(kMarginLinear, s);
    if (d == 0) {
      s = lsoftmax::cuda::memset_async(stream, out, 0, static_cast<size_t>(n * c) * elem);
    } else {
      void* handle = nullptr;
      if (OrtStatus* bad = cublas_handle(context, kMarginLinear, &handle)) return bad;
      s = gemm_xwt(handle, stream, std::is_same_v<T, double>, xa, wa, out, n, d, c);
    }
    if (!s.ok() || !labels) return to_ort_status(kMarginLinear, s);
    const size_t bytes = label_bytes(in.label_type, n);
    void* uploaded = layout.take(bytes);
    s = lsoftmax::cuda::copy_async(stream, uploaded, labels.GetTensorRawData(), bytes);
    if (!s.ok()) return to_ort_status(kMarginLinear, s);
    // Labels were checked on the host: no device flag is needed.
    s = lsoftmax::cuda::margin_family_forward(
        attrs_.spec, attrs_.lambda, device_matrix<T>(out, n, c),
        device_matrix<T>(x.GetTensorData<T>(), n, d), device_matrix<T>(w.GetTensorData<T>(), c, d),
        device_labels(uploaded, in.label_type, n), nullptr, stream);
    return to_ort_status(kMarginLinear, s);
  });
}

}  // namespace

std::vector<const OrtCustomOp*> MarginLinearCudaOps() {
  static const MarginLinearCudaOp<float> op_f32;
  static const MarginLinearCudaOp<double> op_f64;
  return {&op_f32, &op_f64};
}

}  // namespace lsoftmax_ort
