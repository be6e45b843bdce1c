// CUDA-EP kernel of ai.lsoftmax::LGMLogits (same op, attributes, defaults and checks as the CPU
// kernel in lgm_logits_op.cc): the core's CUDA assembly (lsoftmax/lgm_cuda.h) around two GEMMs by
// cuBLAS with ONNX Runtime's handle, all on ORT's compute stream.
//
//   lgm_prepare -> offset, precision, scaled means, class terms
//   lgm_center  -> xc = X - offset (and xc^2 for diagonal variances)
//   cuBLAS      -> logits = xc @ scaled^T, sq = xc^2 @ precision^T (diagonal only)
//   lgm_forward -> logits and loglik in place
//
// Labels are a CPU input (OrtMemTypeCPUInput): checked on the host with the CPU kernel's message,
// then uploaded. Scratch space is one block from ORT's device allocator; nothing synchronizes.
// A non-finite log_var (which the CPU kernel rejects) cannot be reported without a sync here:
// it makes the affected outputs NaN instead.
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cublas_gemm_cuda.h"
#include "cuda_kernel_utils.h"
#include "lgm_logits_op.h"
#include "lsoftmax/lgm_cuda.h"
#include "ort_utils.h"

namespace lsoftmax_ort {
namespace {

// KernelContext_GetResource ids of the CUDA EP (see lsoftmax_linear_cuda.cc).
constexpr int kCudaResourceVersion = 1;
constexpr int kCudaResourceCublasHandle = 10002;

namespace lc = lsoftmax::cuda;

template <typename T>
class LGMLogitsCudaKernel {
 public:
  LGMLogitsCudaKernel(double alpha, bool include_logdet)
      : alpha_(alpha), include_logdet_(include_logdet) {}
  OrtStatus* ComputeV2(OrtKernelContext* context);

 private:
  double alpha_;
  bool include_logdet_;
};

template <typename T>
struct LGMLogitsCudaOp
    : Ort::CustomOpBase<LGMLogitsCudaOp<T>, LGMLogitsCudaKernel<T>, /*WithStatus=*/true> {
  LGMLogitsCudaOp() { OrtCustomOp::version = kMinOrtApiVersion; }
  OrtStatus* CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded(kLGMLogits, [&]() -> OrtStatus* {
      double alpha = 0.0;
      bool include_logdet = true;
      if (OrtStatus* bad = ReadLGMLogitsAttributes(info, &alpha, &include_logdet)) return bad;
      *kernel = new LGMLogitsCudaKernel<T>(alpha, include_logdet);
      return nullptr;
    });
  }
  const char* GetName() const { return kLGMLogits; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    // labels: any type here, so that a wrong one gets a run-time error naming the input.
    return index < 3 ? onnx_type<T>() : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 3 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                      : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  OrtMemType GetInputMemoryType(size_t index) const {
    return index == 3 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return onnx_type<T>(); }
};

template <typename T>
lc::DeviceMatrix dev_matrix(const void* p, int64_t rows, int64_t cols) {
  return lc::DeviceMatrix{const_cast<void*>(p), rows, cols, cols, 1,
                          std::is_same_v<T, double> ? lc::DType::kFloat64 : lc::DType::kFloat32};
}

template <typename T>
OrtStatus* LGMLogitsCudaKernel<T>::ComputeV2(OrtKernelContext* context) {
  return guarded(kLGMLogits, [&]() -> OrtStatus* {
    kernel_calls().fetch_add(1, std::memory_order_relaxed);
    Ort::KernelContext ctx(context);
    const Ort::ConstValue x = ctx.GetInput(0);
    const Ort::ConstValue means = ctx.GetInput(1);
    const Ort::ConstValue log_var = ctx.GetInput(2);
    const std::vector<int64_t> xs = x.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> ms = means.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> ls = log_var.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.size() != 2) {
      return invalid_argument(kLGMLogits,
                              "input X must be 2-D (N, D), got shape " + shape_string(xs));
    }
    if (ms.size() != 2) {
      return invalid_argument(kLGMLogits,
                              "input means must be 2-D (C, D), got shape " + shape_string(ms));
    }
    if (ls.size() != 2) {
      return invalid_argument(kLGMLogits, "input log_var must be 2-D (C, D) or (C, 1), got shape " +
                                              shape_string(ls));
    }
    const int64_t n = xs[0], d = xs[1], c = ms[0], dv = ls[1];
    if (ms[1] != d) {
      return invalid_argument(kLGMLogits, "input X has " + std::to_string(d) +
                                              " features per row but input means has " +
                                              std::to_string(ms[1]));
    }
    Ort::ConstValue labels{nullptr};
    if (ctx.GetInputCount() > 3) labels = ctx.GetInput(3);
    lc::DeviceLabels label_view;  // data == nullptr: no labels
    size_t label_bytes = 0;
    if (labels) {
      const Ort::TensorTypeAndShapeInfo li = labels.GetTensorTypeAndShapeInfo();
      const ONNXTensorElementDataType lt = li.GetElementType();
      if (lt != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 && lt != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
        return invalid_argument(kLGMLogits, std::string("input labels must be int64 or int32, got ") +
                                                type_name(lt));
      }
      const std::vector<int64_t> lbs = li.GetShape();
      if (lbs.size() != 1 || lbs[0] != n) {
        return invalid_argument(kLGMLogits, "input labels must have shape (" + std::to_string(n) +
                                                ",) to match X, got " + shape_string(lbs));
      }
      OrtStatus* bad =
          lt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
              ? check_labels_on_host(kLGMLogits, labels.GetTensorData<int64_t>(), n, c)
              : check_labels_on_host(kLGMLogits, labels.GetTensorData<int32_t>(), n, c);
      if (bad != nullptr) return bad;
      label_view.size = n;
      label_view.type =
          lt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? lc::LabelType::kInt64 : lc::LabelType::kInt32;
      label_bytes = static_cast<size_t>(n) * (lt == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? 8 : 4);
    }

    const T* xp = x.GetTensorData<T>();
    const lc::DeviceMatrix xm = dev_matrix<T>(xp, n, d);
    const lc::DeviceMatrix mm = dev_matrix<T>(means.GetTensorData<T>(), c, ms[1]);
    const lc::DeviceMatrix lm = dev_matrix<T>(log_var.GetTensorData<T>(), ls[0], dv);
    // The core's host-side checks of the parameters (shapes, C, D >= 1) before any output.
    const bool diag = dv == d;
    if (ls[0] != c || (dv != d && dv != 1) || c < 1 || d < 1) {
      return to_ort_status(kLGMLogits,
                           lc::lgm_prepare(mm, lm, nullptr, lc::DeviceMatrix{},
                                           lc::DeviceMatrix{}, nullptr, nullptr, nullptr));
    }

    Ort::UnownedValue logits = ctx.GetOutput(0, {n, c});
    Ort::UnownedValue loglik = ctx.GetOutput(1, {n});
    if (n == 0) return nullptr;
    void* stream = ctx.GetGPUComputeStream();
    void* handle = nullptr;
    Ort::ThrowOnError(Ort::GetApi().KernelContext_GetResource(
        context, kCudaResourceVersion, kCudaResourceCublasHandle, &handle));
    if (handle == nullptr) {
      return make_status(ORT_RUNTIME_EXCEPTION,
                         std::string(kLGMLogits) + ": the CUDA EP gave no cuBLAS handle");
    }

    // Scratch: offset, precision, scaled means, class terms, xc, xc^2 and A (diagonal), labels.
    const size_t t = sizeof(T);
    auto carve = [&](ScratchLayout& l) {
      struct {
        void *offset, *precision, *scaled, *terms, *xc, *xc_sq, *sq, *labels;
      } p{};
      p.offset = l.take(static_cast<size_t>(d) * t);
      p.precision = l.take(static_cast<size_t>(c * dv) * t);
      p.scaled = l.take(static_cast<size_t>(c * d) * t);
      p.terms = l.take(lc::lgm_class_terms_bytes(c));
      p.xc = l.take(static_cast<size_t>(n * d) * t);
      p.xc_sq = l.take(diag ? static_cast<size_t>(n * d) * t : 0);
      p.sq = l.take(diag ? static_cast<size_t>(n * c) * t : 0);
      p.labels = l.take(label_bytes);
      return p;
    };
    ScratchLayout sizing(nullptr);
    carve(sizing);
    OrtDeviceScratch scratch(ctx, static_cast<const OrtMemoryInfo*>(logits.GetTensorMemoryInfo()),
                             sizing.size());
    ScratchLayout layout(scratch.data());
    const auto buf = carve(layout);

    T* zp = logits.GetTensorMutableData<T>();
    const lc::DeviceMatrix precision = dev_matrix<T>(buf.precision, c, dv);
    const lc::DeviceMatrix scaled = dev_matrix<T>(buf.scaled, c, d);
    const lc::DeviceMatrix xc = dev_matrix<T>(buf.xc, n, d);
    const lc::DeviceMatrix xc_sq = diag ? dev_matrix<T>(buf.xc_sq, n, d) : lc::DeviceMatrix{};
    const lc::DeviceMatrix sq = diag ? dev_matrix<T>(buf.sq, n, c) : lc::DeviceMatrix{};
    auto* terms = static_cast<double*>(buf.terms);
    const bool dbl = std::is_same_v<T, double>;

    lsoftmax::Status s =
        lc::lgm_prepare(mm, lm, buf.offset, precision, scaled, terms, nullptr, stream);
    if (s.ok()) s = lc::lgm_center(xm, buf.offset, xc, xc_sq, stream);
    if (s.ok()) s = gemm_xwt(handle, stream, dbl, buf.xc, buf.scaled, zp, n, d, c);
    if (s.ok() && diag) s = gemm_xwt(handle, stream, dbl, buf.xc_sq, buf.precision, buf.sq, n, d, c);
    if (s.ok() && labels) {
      s = lc::copy_async(stream, buf.labels, labels.GetTensorRawData(), label_bytes);
      label_view.data = buf.labels;
    }
    if (s.ok()) {
      // Labels were checked on the host: no device flag.
      s = lc::lgm_forward(xm, mm, lm, buf.offset, terms, sq, label_view,
                          dev_matrix<T>(zp, n, c), loglik.GetTensorMutableData<T>(), alpha_,
                          include_logdet_, nullptr, nullptr, stream);
    }
    return to_ort_status(kLGMLogits, s);
  });
}

}  // namespace

std::vector<const OrtCustomOp*> LGMLogitsCudaOps() {
  static const LGMLogitsCudaOp<float> op_f32;
  static const LGMLogitsCudaOp<double> op_f64;
  return {&op_f32, &op_f64};
}

}  // namespace lsoftmax_ort
