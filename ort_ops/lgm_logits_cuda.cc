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
// then uploaded. Scratch space is one block from ORT's device allocator. A non-finite log_var,
// which the CPU kernel rejects, is flagged on the device by lgm_prepare; the flag is read back
// after the launches (one stream sync per run) so that the CUDA EP raises the same error
// instead of returning NaN outputs.
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
    : LabelledOpBase<LGMLogitsCudaOp<T>, LGMLogitsCudaKernel<T>, T, /*kInputs=*/4,
                     /*kOutputs=*/2, /*kCudaEp=*/true> {
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
};

template <typename T>
OrtStatus* LGMLogitsCudaKernel<T>::ComputeV2(OrtKernelContext* context) {
  return compute_guarded(kLGMLogits, context, [&](Ort::KernelContext& ctx) -> OrtStatus* {
    LGMLogitsInputs in;
    if (OrtStatus* bad = ReadLGMLogitsInputs(ctx, &in)) return bad;
    const Ort::ConstValue &x = in.x, &means = in.means, &log_var = in.log_var;
    const std::vector<int64_t> &xs = in.xs, &ms = in.ms, &ls = in.ls;
    const int64_t n = xs[0], d = xs[1], c = ms[0], dv = ls[1];
    if (ms[1] != d) return invalid_argument(kLGMLogits, features_mismatch(d, "means", ms[1]));
    const Ort::ConstValue labels = optional_input(ctx, 3);
    ONNXTensorElementDataType label_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    size_t labels_size = 0;
    if (labels) {
      if (OrtStatus* bad = check_labels_input(kLGMLogits, labels, n, &label_type)) return bad;
      if (OrtStatus* bad = check_labels_on_host(kLGMLogits, labels, label_type, n, c)) return bad;
      labels_size = label_bytes(label_type, n);
    }

    const T* xp = x.GetTensorData<T>();
    const lc::DeviceMatrix xm = device_matrix<T>(xp, n, d);
    const lc::DeviceMatrix mm = device_matrix<T>(means.GetTensorData<T>(), c, ms[1]);
    const lc::DeviceMatrix lm = device_matrix<T>(log_var.GetTensorData<T>(), ls[0], dv);
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
    if (OrtStatus* bad = cublas_handle(context, kLGMLogits, &handle)) return bad;

    // Scratch: offset, precision, scaled means, class terms, xc, xc^2 and A (diagonal), labels.
    const size_t t = sizeof(T);
    auto carve = [&](ScratchLayout& l) {
      struct {
        void *flag, *offset, *precision, *scaled, *terms, *xc, *xc_sq, *sq, *labels;
      } p{};
      p.flag = l.take(sizeof(int32_t));
      p.offset = l.take(static_cast<size_t>(d) * t);
      p.precision = l.take(static_cast<size_t>(c * dv) * t);
      p.scaled = l.take(static_cast<size_t>(c * d) * t);
      p.terms = l.take(lc::lgm_class_terms_bytes(c));
      p.xc = l.take(static_cast<size_t>(n * d) * t);
      p.xc_sq = l.take(diag ? static_cast<size_t>(n * d) * t : 0);
      p.sq = l.take(diag ? static_cast<size_t>(n * c) * t : 0);
      p.labels = l.take(labels_size);
      return p;
    };
    ScratchLayout sizing(nullptr);
    carve(sizing);
    OrtDeviceScratch scratch(ctx, static_cast<const OrtMemoryInfo*>(logits.GetTensorMemoryInfo()),
                             sizing.size());
    ScratchLayout layout(scratch.data());
    const auto buf = carve(layout);

    T* zp = logits.GetTensorMutableData<T>();
    const lc::DeviceMatrix precision = device_matrix<T>(buf.precision, c, dv);
    const lc::DeviceMatrix scaled = device_matrix<T>(buf.scaled, c, d);
    const lc::DeviceMatrix xc = device_matrix<T>(buf.xc, n, d);
    const lc::DeviceMatrix xc_sq = diag ? device_matrix<T>(buf.xc_sq, n, d) : lc::DeviceMatrix{};
    const lc::DeviceMatrix sq = diag ? device_matrix<T>(buf.sq, n, c) : lc::DeviceMatrix{};
    auto* terms = static_cast<double*>(buf.terms);
    const bool dbl = std::is_same_v<T, double>;

    auto* flag = static_cast<int32_t*>(buf.flag);
    lsoftmax::Status s = lc::memset_async(stream, flag, 0, sizeof(int32_t));
    if (s.ok()) s = lc::lgm_prepare(mm, lm, buf.offset, precision, scaled, terms, flag, stream);
    if (s.ok()) s = lc::lgm_center(xm, buf.offset, xc, xc_sq, stream);
    if (s.ok()) s = gemm_xwt(handle, stream, dbl, buf.xc, buf.scaled, zp, n, d, c);
    if (s.ok() && diag) s = gemm_xwt(handle, stream, dbl, buf.xc_sq, buf.precision, buf.sq, n, d, c);
    if (s.ok() && labels) {
      s = lc::copy_async(stream, buf.labels, labels.GetTensorRawData(), labels_size);
    }
    // data == nullptr: no labels.
    const lc::DeviceLabels label_view =
        labels ? device_labels(buf.labels, label_type, n) : lc::DeviceLabels{};
    if (s.ok()) {
      // Labels were checked on the host: no device flag.
      s = lc::lgm_forward(xm, mm, lm, buf.offset, terms, sq, label_view,
                          device_matrix<T>(zp, n, c), loglik.GetTensorMutableData<T>(), alpha_,
                          include_logdet_, nullptr, nullptr, stream);
    }
    int32_t flag_value = 0;
    if (s.ok()) s = lc::copy_to_host_sync(stream, &flag_value, flag, sizeof(int32_t));
    if (s.ok() && (flag_value & lc::kLgmBadLogVar)) {
      return invalid_argument(kLGMLogits, "log_var has a non-finite entry");
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
