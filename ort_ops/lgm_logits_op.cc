// CPU kernel of ai.lsoftmax::LGMLogits (see lgm_logits_op.h and lsoftmax_core's lgm.h).
#include "lgm_logits_op.h"

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "lsoftmax/lgm.h"

namespace lsoftmax_ort {
namespace {

template <typename T>
Ort::Value wrap(const Ort::MemoryInfo& mem, std::vector<T>& buf, int64_t rows, int64_t cols) {
  const int64_t shape[] = {rows, cols};
  return Ort::Value::CreateTensor<T>(mem, buf.data(), buf.size(), shape, 2);
}

}  // namespace

template <typename T>
OrtStatus* LGMLogitsKernel<T>::ComputeV2(OrtKernelContext* context) {
  return compute_guarded(kLGMLogits, context, [&](Ort::KernelContext& ctx) -> OrtStatus* {
    LGMLogitsInputs in;
    if (OrtStatus* bad = ReadLGMLogitsInputs(ctx, &in)) return bad;
    const Ort::ConstValue &x = in.x, &means = in.means, &log_var = in.log_var;
    const std::vector<int64_t> &xs = in.xs, &ms = in.ms, &ls = in.ls;
    const int64_t n = xs[0], d = xs[1], c = ms[0], dv = ls[1];
    const Ort::ConstValue labels = optional_input(ctx, 3);
    ONNXTensorElementDataType label_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    if (labels) {
      if (OrtStatus* bad = check_labels_input(kLGMLogits, labels, n, &label_type)) return bad;
    }

    using lsoftmax::MatrixView;
    const T* xp = x.GetTensorData<T>();
    const auto xv = MatrixView<const T>::contiguous(xp, n, d);
    const auto mv = MatrixView<const T>::contiguous(means.GetTensorData<T>(), c, ms[1]);
    const auto lv = MatrixView<const T>::contiguous(log_var.GetTensorData<T>(), ls[0], dv);
    std::vector<T> offset(static_cast<size_t>(ms[1])), precision(static_cast<size_t>(ls[0] * dv)),
        scaled(static_cast<size_t>(c * ms[1]));
    lsoftmax::Status s = lsoftmax::lgm_prepare<T>(
        mv, lv, offset.data(), MatrixView<T>::contiguous(precision.data(), ls[0], dv),
        MatrixView<T>::contiguous(scaled.data(), c, ms[1]));
    if (s.ok() && d != ms[1]) {
      s = lsoftmax::Status::InvalidArgument(features_mismatch(d, "means", ms[1]));
    }
    if (!s.ok()) return to_ort_status(kLGMLogits, s);

    Ort::UnownedValue logits = ctx.GetOutput(0, {n, c});
    Ort::UnownedValue loglik = ctx.GetOutput(1, {n});
    if (n == 0) return nullptr;
    T* zp = logits.GetTensorMutableData<T>();

    // The GEMM terms on the centred features (see lgm.h): B = xc @ scaled^T into the logits,
    // and for diagonal variances A = xc^2 @ precision^T.
    const Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<T> xc(static_cast<size_t>(n * d));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < d; ++j) {
        xc[static_cast<size_t>(i * d + j)] = xp[i * d + j] - offset[static_cast<size_t>(j)];
      }
    }
    Ort::Value xc_v = wrap(mem, xc, n, d);
    Ort::Value scaled_v = wrap(mem, scaled, c, d);
    {
      const OrtValue* in[] = {xc_v, scaled_v};
      OrtValue* out[] = {static_cast<OrtValue*>(logits)};
      gemm_.Invoke(context, in, 2, out, 1);
    }
    const bool diag = dv == d;
    std::vector<T> sq_term;
    MatrixView<const T> sq_view;
    if (diag) {
      for (T& v : xc) v = v * v;
      sq_term.resize(static_cast<size_t>(n * c));
      Ort::Value prec_v = wrap(mem, precision, c, d);
      Ort::Value sq_v = wrap(mem, sq_term, n, c);
      const OrtValue* in[] = {xc_v, prec_v};  // xc now holds xc^2
      OrtValue* out[] = {static_cast<OrtValue*>(sq_v)};
      gemm_.Invoke(context, in, 2, out, 1);
      sq_view = MatrixView<const T>::contiguous(sq_term.data(), n, c);
    }
    const auto zv = MatrixView<T>::contiguous(zp, n, c);
    T* llp = loglik.GetTensorMutableData<T>();
    if (label_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
      s = lsoftmax::lgm_forward<T, int64_t>(xv, mv, lv, offset.data(), sq_view,
                                            {labels.GetTensorData<int64_t>(), n, 1}, zv, llp,
                                            alpha_, include_logdet_);
    } else if (label_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
      s = lsoftmax::lgm_forward<T, int32_t>(xv, mv, lv, offset.data(), sq_view,
                                            {labels.GetTensorData<int32_t>(), n, 1}, zv, llp,
                                            alpha_, include_logdet_);
    } else {
      s = lsoftmax::lgm_forward<T, int64_t>(xv, mv, lv, offset.data(), sq_view, {}, zv, llp,
                                            alpha_, include_logdet_);
    }
    return to_ort_status(kLGMLogits, s);
  });
}

OrtStatus* ReadLGMLogitsInputs(Ort::KernelContext& ctx, LGMLogitsInputs* in) {
  in->x = ctx.GetInput(0);
  in->means = ctx.GetInput(1);
  in->log_var = ctx.GetInput(2);
  in->xs = in->x.GetTensorTypeAndShapeInfo().GetShape();
  in->ms = in->means.GetTensorTypeAndShapeInfo().GetShape();
  in->ls = in->log_var.GetTensorTypeAndShapeInfo().GetShape();
  if (OrtStatus* bad = check_2d(kLGMLogits, "X", "(N, D)", in->xs)) return bad;
  if (OrtStatus* bad = check_2d(kLGMLogits, "means", "(C, D)", in->ms)) return bad;
  return check_2d(kLGMLogits, "log_var", "(C, D) or (C, 1)", in->ls);
}

OrtStatus* ReadLGMLogitsAttributes(const OrtKernelInfo* info, double* alpha_out,
                                   bool* include_logdet_out) {
  float alpha = kLGMLogitsDefaultAlpha;
  if (OrtStatus* bad = read_float_attribute(info, kLGMLogits, "alpha", &alpha)) return bad;
  float alpha_lo = 0.0f;
  if (OrtStatus* bad = read_float_attribute(info, kLGMLogits, "alpha_lo", &alpha_lo)) return bad;
  int64_t include_logdet = kLGMLogitsDefaultIncludeLogdet;
  if (OrtStatus* bad =
          read_int_attribute(info, kLGMLogits, "include_logdet", &include_logdet)) {
    return bad;
  }
  if (include_logdet != 0 && include_logdet != 1) {
    return invalid_argument(kLGMLogits, "attribute 'include_logdet' must be 0 or 1, got " +
                                            std::to_string(include_logdet));
  }
  // alpha + alpha_lo in double: a float64 alpha split in two float32 attributes (ONNX has no
  // float64 attribute) keeps ~48 bits.
  const double full = static_cast<double>(alpha) + static_cast<double>(alpha_lo);
  if (!std::isfinite(alpha_lo)) {
    return invalid_argument(kLGMLogits, "attribute alpha_lo must be finite, got " +
                                            std::to_string(alpha_lo));
  }
  const lsoftmax::Status s = lsoftmax::validate_lgm_alpha(full);
  if (!s.ok()) return invalid_argument(kLGMLogits, "attribute " + s.message());
  *alpha_out = full;
  *include_logdet_out = include_logdet == 1;
  return nullptr;
}

template <typename T>
OrtStatus* LGMLogitsOp<T>::CreateKernelV2(const OrtApi&, const OrtKernelInfo* info,
                                          void** kernel) const {
  return guarded(kLGMLogits, [&]() -> OrtStatus* {
    double alpha = 0.0;
    bool include_logdet = true;
    if (OrtStatus* bad = ReadLGMLogitsAttributes(info, &alpha, &include_logdet)) return bad;
    *kernel = new LGMLogitsKernel<T>(make_gemm<T>(info), alpha, include_logdet);
    return nullptr;
  });
}

std::vector<const OrtCustomOp*> LGMLogitsCpuOps() {
  static const LGMLogitsOp<float> op_f32;
  static const LGMLogitsOp<double> op_f64;
  return {&op_f32, &op_f64};
}

template class LGMLogitsKernel<float>;
template class LGMLogitsKernel<double>;
template struct LGMLogitsOp<float>;
template struct LGMLogitsOp<double>;

}  // namespace lsoftmax_ort
