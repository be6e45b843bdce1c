// CPU kernel of ai.lsoftmax::MarginLinear (see margin_linear_op.h).
#include "margin_linear_op.h"

#include <algorithm>
#include <string>
#include <utility>

namespace lsoftmax_ort {
namespace {

using lsoftmax::MatrixView;

// The kinds' float parameters, in the core's MarginSpec order, with the attribute defaults
// (kept equal to exporters/margin_family.py's MARGIN_LINEAR_DEFAULTS).
struct FloatParam {
  const char* name;
  float fallback;
  double lsoftmax::MarginSpec::*field;
};
constexpr FloatParam kFloatParams[] = {
    {"margin", 0.0f, &lsoftmax::MarginSpec::margin}, {"m1", 1.0f, &lsoftmax::MarginSpec::m1},
    {"m2", 0.0f, &lsoftmax::MarginSpec::m2},         {"m3", 0.0f, &lsoftmax::MarginSpec::m3},
    {"scale", 1.0f, &lsoftmax::MarginSpec::scale},
};

template <typename T, typename L>
OrtStatus* apply_margin(const MarginLinearAttributes& a, const T* x, const T* w, const L* labels,
                        T* y, int64_t n, int64_t d, int64_t c) {
  const lsoftmax::Status s = lsoftmax::margin_family_forward<T, L>(
      a.spec, a.lambda, MatrixView<const T>::contiguous(x, n, d),
      MatrixView<const T>::contiguous(w, c, d), lsoftmax::LabelView<L>{labels, n, 1},
      MatrixView<T>::contiguous(y, n, c));
  return to_ort_status(kMarginLinear, s);
}

template <typename T>
OrtStatus* apply_margin(const MarginLinearAttributes& a, const LSoftmaxLinearInputs& in, T* y) {
  const T* x = in.x.GetTensorData<T>();
  const T* w = in.w.GetTensorData<T>();
  if (in.label_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
    return apply_margin<T, int64_t>(a, x, w, in.labels.GetTensorData<int64_t>(), y, in.n, in.d,
                                    in.c);
  }
  return apply_margin<T, int32_t>(a, x, w, in.labels.GetTensorData<int32_t>(), y, in.n, in.d,
                                  in.c);
}

// rows x cols of `src` normalized by the core (x / max(|x|, eps)) into `dst`.
template <typename T>
OrtStatus* normalized(const T* src, int64_t rows, int64_t cols, std::vector<T>* dst) {
  dst->resize(static_cast<size_t>(rows * cols));
  const lsoftmax::Status s =
      lsoftmax::normalize_rows<T>(MatrixView<const T>::contiguous(src, rows, cols),
                                  MatrixView<T>::contiguous(dst->data(), rows, cols));
  return to_ort_status(kMarginLinear, s);
}

}  // namespace

OrtStatus* ReadMarginLinearAttributes(const OrtKernelInfo* info, MarginLinearAttributes* out) {
  std::string kind;
  bool has_kind = false;
  if (OrtStatus* bad = read_string_attribute(info, kMarginLinear, "kind", &kind, &has_kind)) {
    return bad;
  }
  if (!has_kind) {
    return invalid_argument(kMarginLinear,
                            "attribute 'kind' (a string: lsoftmax, sphereface, cosface, "
                            "arcface, combined) is required");
  }
  MarginLinearAttributes a;
  lsoftmax::Status s = lsoftmax::parse_margin_kind(kind.c_str(), &a.spec.kind);
  if (!s.ok()) return invalid_argument(kMarginLinear, "attribute 'kind': " + s.message());
  for (const FloatParam& p : kFloatParams) {
    if (OrtStatus* bad =
            read_split_float_attribute(info, kMarginLinear, p.name, p.fallback, &(a.spec.*p.field))) {
      return bad;
    }
  }
  int64_t easy = 0;
  if (OrtStatus* bad = read_int_attribute(info, kMarginLinear, "easy_margin", &easy)) return bad;
  if (easy != 0 && easy != 1) {
    return invalid_argument(kMarginLinear,
                            "attribute easy_margin must be 0 or 1, got " + std::to_string(easy));
  }
  a.spec.easy_margin = easy == 1;
  if (OrtStatus* bad = read_split_float_attribute(info, kMarginLinear, "lambda", 0.0f, &a.lambda)) {
    return bad;
  }
  s = lsoftmax::validate_margin_spec(a.spec, a.lambda);
  if (!s.ok()) return invalid_argument(kMarginLinear, "invalid attributes: " + s.message());
  *out = a;
  return nullptr;
}

template <typename T>
MarginLinearKernel<T>::MarginLinearKernel(const OrtKernelInfo* info,
                                          const MarginLinearAttributes& attrs)
    : attrs_(attrs) {
  gemm_ = make_gemm<T>(info);
}

template <typename T>
OrtStatus* MarginLinearKernel<T>::ComputeV2(OrtKernelContext* context) {
  return compute_guarded(kMarginLinear, context, [&](Ort::KernelContext& ctx) -> OrtStatus* {
    LSoftmaxLinearInputs in;
    if (OrtStatus* bad = ReadLSoftmaxLinearInputs(ctx, &in, kMarginLinear)) return bad;
    const int64_t n = in.n, d = in.d, c = in.c;
    Ort::UnownedValue y = ctx.GetOutput(0, {n, c});
    if (n == 0 || (c == 0 && !in.labels)) return nullptr;
    T* out = y.GetTensorMutableData<T>();
    // No class a label could name: the core reports the first label.
    if (c == 0) return apply_margin<T>(attrs_, in, out);
    if (d == 0) {
      std::fill(out, out + n * c, T(0));
    } else {
      const lsoftmax::KindProperties props = lsoftmax::kind_properties(attrs_.spec.kind);
      std::vector<T> xn, wn;
      const T* xa = in.x.GetTensorData<T>();
      const T* wa = in.w.GetTensorData<T>();
      if (props.normalizes_features) {
        if (OrtStatus* bad = normalized(xa, n, d, &xn)) return bad;
        xa = xn.data();
      }
      if (props.normalizes_weights) {
        if (OrtStatus* bad = normalized(wa, c, d, &wn)) return bad;
        wa = wn.data();
      }
      const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
      const int64_t xs[] = {n, d}, ws[] = {c, d};
      // The tensors only wrap the buffers for ORT's Gemm, which reads them.
      Ort::Value a = Ort::Value::CreateTensor<T>(cpu, const_cast<T*>(xa),
                                                 static_cast<size_t>(n * d), xs, 2);
      Ort::Value b = Ort::Value::CreateTensor<T>(cpu, const_cast<T*>(wa),
                                                 static_cast<size_t>(c * d), ws, 2);
      const OrtValue* inputs[] = {static_cast<const OrtValue*>(a), static_cast<const OrtValue*>(b)};
      OrtValue* outputs[] = {static_cast<OrtValue*>(y)};
      gemm_.Invoke(context, inputs, 2, outputs, 1);
      if (props.scaled) {
        const T s = static_cast<T>(attrs_.spec.scale);
        for (int64_t i = 0; i < n * c; ++i) out[i] *= s;
      }
    }
    if (!in.labels) return nullptr;
    return apply_margin<T>(attrs_, in, out);
  });
}

template <typename T>
OrtStatus* MarginLinearOp<T>::CreateKernelV2(const OrtApi&, const OrtKernelInfo* info,
                                             void** kernel) const {
  return guarded(kMarginLinear, [&]() -> OrtStatus* {
    MarginLinearAttributes attrs;
    if (OrtStatus* bad = ReadMarginLinearAttributes(info, &attrs)) return bad;
    *kernel = new MarginLinearKernel<T>(info, attrs);
    return nullptr;
  });
}

std::vector<const OrtCustomOp*> MarginLinearCpuOps() {
  static const MarginLinearOp<float> op_f32;
  static const MarginLinearOp<double> op_f64;
  return {&op_f32, &op_f64};
}

template class MarginLinearKernel<float>;
template class MarginLinearKernel<double>;
template struct MarginLinearOp<float>;
template struct MarginLinearOp<double>;

}  // namespace lsoftmax_ort
