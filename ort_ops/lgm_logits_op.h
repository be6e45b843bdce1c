// ai.lsoftmax::LGMLogits (CPU): the L-GM logits and log-likelihoods.
//
//   LGMLogits(X[N, D], means[C, D], log_var[C, D] or [C, 1], labels[N]?) -> (logits[N, C],
//   loglik[N])
//
// logits[i, k] = -(1 + alpha [k = labels_i]) d_ik - include_logdet * 1/2 log|V_k| with
// d_ik = 1/2 sum_j (x_ij - mu_kj)^2 / exp(log_var_kj); loglik[i] = -(d_ic + 1/2 log|V_c|) for c
// the label, or the predicted class when labels are absent. Isotropic variances are read from the
// shape of log_var ((C, 1) with D > 1).
//
// Attributes: alpha (float, default 0.0), alpha_lo (float, default 0.0: the op's margin is
// alpha + alpha_lo in double, >= 0, so that a float64 alpha survives ONNX's float32 attributes),
// include_logdet (int, default 1, 0 or 1); the model-local function the exporters attach uses
// the same defaults. The N x D x C products are
// ORT's own Gemm (created once per kernel); the assembly is lsoftmax::lgm_forward from the core.
#pragma once

#include <utility>
#include <vector>

#include "ort_utils.h"

namespace lsoftmax_ort {

constexpr const char* kLGMLogits = "LGMLogits";
constexpr float kLGMLogitsDefaultAlpha = 0.0f;
constexpr int64_t kLGMLogitsDefaultIncludeLogdet = 1;

template <typename T>
class LGMLogitsKernel {
 public:
  LGMLogitsKernel(Ort::Op gemm, double alpha, bool include_logdet)
      : gemm_(std::move(gemm)), alpha_(alpha), include_logdet_(include_logdet) {}
  OrtStatus* ComputeV2(OrtKernelContext* context);

 private:
  Ort::Op gemm_;
  double alpha_;
  bool include_logdet_;
};

template <typename T>
struct LGMLogitsOp
    : LabelledOpBase<LGMLogitsOp<T>, LGMLogitsKernel<T>, T, /*kInputs=*/4, /*kOutputs=*/2> {
  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kLGMLogits; }
};

// One call's tensor inputs with the first checks both kernels (CPU and CUDA EP) make: X, means
// and log_var 2-D. Their shapes are xs, ms, ls.
struct LGMLogitsInputs {
  Ort::ConstValue x{nullptr}, means{nullptr}, log_var{nullptr};
  std::vector<int64_t> xs, ms, ls;
};
OrtStatus* ReadLGMLogitsInputs(Ort::KernelContext& ctx, LGMLogitsInputs* in);

// Reads and checks the attributes (alpha, include_logdet) for the CPU and CUDA-EP kernels.
OrtStatus* ReadLGMLogitsAttributes(const OrtKernelInfo* info, double* alpha, bool* include_logdet);

// The CPU ops (float32 and float64), static objects that live as long as the library.
std::vector<const OrtCustomOp*> LGMLogitsCpuOps();

}  // namespace lsoftmax_ort
