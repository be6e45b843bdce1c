// CPU kernel of ai.lsoftmax::LSoftmaxLinear (see lsoftmax_linear_op.h).
#include "lsoftmax_linear_op.h"

#include <algorithm>
#include <string>
#include <utility>

#include "lsoftmax/lsoftmax.h"

namespace lsoftmax_ort {
namespace {

template <typename T, typename L>
OrtStatus* apply_margin(const T* x, const T* w, const L* labels, T* y, int64_t n, int64_t d,
                        int64_t c, int64_t margin, double lambda) {
  using lsoftmax::MatrixView;
  const lsoftmax::Status s = lsoftmax::margin_forward<T, L>(
      MatrixView<const T>::contiguous(x, n, d), MatrixView<const T>::contiguous(w, c, d),
      lsoftmax::LabelView<L>{labels, n, 1}, MatrixView<T>::contiguous(y, n, c), margin, lambda);
  return to_ort_status(kLSoftmaxLinear, s);
}

// Y = X W^T into y. One row: the core's plain_logits on W as it is, since ORT's Gemm would pack
// the unpacked W on every call and for a single row that copy costs more than the product (the
// standard graph's MatMul pre-packs its constant weight once); the core splits its classes over
// the session's intra-op pool from a few hundred classes on. More rows: ORT's Gemm.
template <typename T>
OrtStatus* plain_logits_into(OrtKernelContext* context, Ort::Op& gemm, const Ort::ConstValue& x,
                             const Ort::ConstValue& w, Ort::UnownedValue& y, int64_t n, int64_t d,
                             int64_t c) {
  using lsoftmax::MatrixView;
  if (n == 1) {
    return to_ort_status(
        kLSoftmaxLinear,
        lsoftmax::plain_logits<T>(MatrixView<const T>::contiguous(x.GetTensorData<T>(), n, d),
                                  MatrixView<const T>::contiguous(w.GetTensorData<T>(), c, d),
                                  MatrixView<T>::contiguous(y.GetTensorMutableData<T>(), n, c)));
  }
  const OrtValue* inputs[] = {static_cast<const OrtValue*>(x), static_cast<const OrtValue*>(w)};
  OrtValue* outputs[] = {static_cast<OrtValue*>(y)};
  gemm.Invoke(context, inputs, 2, outputs, 1);
  return nullptr;
}

}  // namespace

template <typename T>
LSoftmaxLinearKernel<T>::LSoftmaxLinearKernel(const OrtKernelInfo* info, int64_t margin,
                                              double lambda)
    : margin_(margin), lambda_(lambda) {
  gemm_ = make_gemm<T>(info);
}

template <typename T>
OrtStatus* LSoftmaxLinearKernel<T>::ComputeV2(OrtKernelContext* context) {
  return compute_guarded(kLSoftmaxLinear, context, [&](Ort::KernelContext& ctx) -> OrtStatus* {
    LSoftmaxLinearInputs in;
    if (OrtStatus* bad = ReadLSoftmaxLinearInputs(ctx, &in)) return bad;
    const Ort::ConstValue &x = in.x, &w = in.w, &labels = in.labels;
    const int64_t n = in.n, d = in.d, c = in.c;
    const ONNXTensorElementDataType label_type = in.label_type;

    Ort::UnownedValue y = ctx.GetOutput(0, {n, c});
    if (n == 0 || (c == 0 && !labels)) return nullptr;
    T* out = y.GetTensorMutableData<T>();
    if (c == 0) {  // no class a label could name: the core reports the first label
      return labels.GetTensorTypeAndShapeInfo().GetElementType() ==
                     ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                 ? apply_margin<T, int64_t>(x.GetTensorData<T>(), w.GetTensorData<T>(),
                                            labels.GetTensorData<int64_t>(), out, n, d, c,
                                            margin_, lambda_)
                 : apply_margin<T, int32_t>(x.GetTensorData<T>(), w.GetTensorData<T>(),
                                            labels.GetTensorData<int32_t>(), out, n, d, c,
                                            margin_, lambda_);
    }
    if (d == 0) {
      std::fill(out, out + n * c, T(0));
    } else {
      if (OrtStatus* bad = plain_logits_into<T>(context, gemm_, x, w, y, n, d, c)) return bad;
    }
    if (!labels) return nullptr;
    const T* xp = x.GetTensorData<T>();
    const T* wp = w.GetTensorData<T>();
    if (label_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
      return apply_margin<T, int64_t>(xp, wp, labels.GetTensorData<int64_t>(), out, n, d, c,
                                      margin_, lambda_);
    }
    return apply_margin<T, int32_t>(xp, wp, labels.GetTensorData<int32_t>(), out, n, d, c,
                                    margin_, lambda_);
  });
}

OrtStatus* ReadLSoftmaxLinearInputs(Ort::KernelContext& ctx, LSoftmaxLinearInputs* in,
                                     const char* op) {
  in->x = ctx.GetInput(0);
  in->w = ctx.GetInput(1);
  const std::vector<int64_t> xs = in->x.GetTensorTypeAndShapeInfo().GetShape();
  const std::vector<int64_t> ws = in->w.GetTensorTypeAndShapeInfo().GetShape();
  if (OrtStatus* bad = check_2d(op, "X", "(N, D)", xs)) return bad;
  if (OrtStatus* bad = check_2d(op, "W", "(C, D)", ws)) return bad;
  in->n = xs[0];
  in->d = xs[1];
  in->c = ws[0];
  if (ws[1] != in->d) {
    return invalid_argument(
        op, features_mismatch(in->d, "W", ws[1]) + " (W must be (num_classes, in_features))");
  }
  in->labels = optional_input(ctx, 2);
  if (!in->labels) return nullptr;
  return check_labels_input(op, in->labels, in->n, &in->label_type);
}

OrtStatus* ReadLSoftmaxLinearAttributes(const OrtKernelInfo* info, int64_t* margin_out,
                                        double* lambda_out) {
  int64_t margin = 0;
  bool has_margin = false;
  if (OrtStatus* bad = read_int_attribute(info, kLSoftmaxLinear, "margin", &margin, &has_margin)) {
    return bad;
  }
  if (!has_margin) {
    return invalid_argument(kLSoftmaxLinear, "attribute 'margin' (an int >= 1) is required");
  }
  float lambda = kLSoftmaxLinearDefaultLambda;
  if (OrtStatus* bad = read_float_attribute(info, kLSoftmaxLinear, "lambda", &lambda)) return bad;
  const lsoftmax::Status s = lsoftmax::validate_margin_params(margin, lambda);
  if (!s.ok()) return invalid_argument(kLSoftmaxLinear, "attribute " + s.message());
  *margin_out = margin;
  *lambda_out = lambda;
  return nullptr;
}

template <typename T>
OrtStatus* LSoftmaxLinearOp<T>::CreateKernelV2(const OrtApi&, const OrtKernelInfo* info,
                                               void** kernel) const {
  return guarded(kLSoftmaxLinear, [&]() -> OrtStatus* {
    int64_t margin = 0;
    double lambda = 0.0;
    if (OrtStatus* bad = ReadLSoftmaxLinearAttributes(info, &margin, &lambda)) return bad;
    *kernel = new LSoftmaxLinearKernel<T>(info, margin, lambda);
    return nullptr;
  });
}

std::vector<const OrtCustomOp*> LSoftmaxLinearCpuOps() {
  static const LSoftmaxLinearOp<float> op_f32;
  static const LSoftmaxLinearOp<double> op_f64;
  return {&op_f32, &op_f64};
}

template class LSoftmaxLinearKernel<float>;
template class LSoftmaxLinearKernel<double>;
template struct LSoftmaxLinearOp<float>;
template struct LSoftmaxLinearOp<double>;

}  // namespace lsoftmax_ort
