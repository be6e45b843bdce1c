// ai.lsoftmax::MarginLinear (CPU): the margin family (L-Softmax, SphereFace, CosFace, ArcFace,
// combined) as one op; the kinds are the core's (parse_margin_kind), so a new kind needs nothing
// here. logits[N, C] are the kind's plain logits (x W^T; |x| cos theta_j for sphereface;
// s cos theta_j for the cosine kinds) and, with the optional labels[N], each row's target logit
// gets the kind's margin (lsoftmax::margin_family_forward from the core).
//
// Attributes: kind (string, required), margin (float, default 0), m1 (1), m2 (0), m3 (0),
// scale (1), easy_margin (int, 0), lambda (float, 0), and P_lo (float, 0) for each float P: the
// op uses P + P_lo in double (ONNX attributes are float32; a float64 parameter is split in two).
// The rules are the core's (validate_margin_spec), checked at session creation; the model-local
// function that exporters attach (exporters/margin_family.py) uses the same defaults.
#pragma once

#include <vector>

#include "lsoftmax/lsoftmax.h"
#include "lsoftmax_linear_op.h"
#include "ort_utils.h"

namespace lsoftmax_ort {

constexpr const char* kMarginLinear = "MarginLinear";

struct MarginLinearAttributes {
  lsoftmax::MarginSpec spec;
  double lambda = 0.0;
};

// Reads and checks the attributes for the CPU and CUDA-EP kernels.
OrtStatus* ReadMarginLinearAttributes(const OrtKernelInfo* info, MarginLinearAttributes* out);

template <typename T>
class MarginLinearKernel {
 public:
  MarginLinearKernel(const OrtKernelInfo* info, const MarginLinearAttributes& attrs);
  OrtStatus* ComputeV2(OrtKernelContext* context);

 private:
  Ort::Op gemm_{nullptr};  // Y = A B^T (transB = 1), A and B the (normalized) X and W
  MarginLinearAttributes attrs_;
};

template <typename T>
struct MarginLinearOp
    : LabelledOpBase<MarginLinearOp<T>, MarginLinearKernel<T>, T, /*kInputs=*/3,
                     /*kOutputs=*/1> {
  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kMarginLinear; }
};

// The CPU ops (float32 and float64), static objects that live as long as the library.
std::vector<const OrtCustomOp*> MarginLinearCpuOps();

}  // namespace lsoftmax_ort
