// ai.lsoftmax::LSoftmaxLinear (CPU): logits[N, C] = X[N, D] W[C, D]^T, and with the optional
// labels[N] the L-Softmax margin on each row's target logit.
//
// Attributes: margin (int, required, >= 1) and lambda (float, default 0.0, >= 0). The model-local
// function that exporters attach to this op uses the same defaults.
// The N x D x C product is ORT's own Gemm (created once per kernel, invoked from Compute), or the
// core's lsoftmax::plain_logits for a single row (plain_logits_into); the per-row margin work is
// lsoftmax::margin_forward from the core.
#pragma once

#include <vector>

#include "ort_utils.h"

namespace lsoftmax_ort {

constexpr const char* kLSoftmaxLinear = "LSoftmaxLinear";
constexpr float kLSoftmaxLinearDefaultLambda = 0.0f;

template <typename T>
class LSoftmaxLinearKernel {
 public:
  LSoftmaxLinearKernel(const OrtKernelInfo* info, int64_t margin, double lambda);
  OrtStatus* ComputeV2(OrtKernelContext* context);

 private:
  Ort::Op gemm_{nullptr};  // Y = X W^T (transB = 1), for batches of more than one row
  int64_t margin_;
  double lambda_;
};

template <typename T>
struct LSoftmaxLinearOp
    : LabelledOpBase<LSoftmaxLinearOp<T>, LSoftmaxLinearKernel<T>, T, /*kInputs=*/3,
                     /*kOutputs=*/1> {
  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kLSoftmaxLinear; }
};

// One call's inputs after the checks both kernels (CPU and CUDA EP) make, in their order: X
// (N, D), W (C, D) and the optional labels, int64 or int32 of shape (N,). MarginLinear's
// kernels read the same inputs (messages prefixed with `op`).
struct LSoftmaxLinearInputs {
  Ort::ConstValue x{nullptr}, w{nullptr}, labels{nullptr};
  int64_t n = 0, d = 0, c = 0;
  ONNXTensorElementDataType label_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
};
OrtStatus* ReadLSoftmaxLinearInputs(Ort::KernelContext& ctx, LSoftmaxLinearInputs* in,
                                     const char* op = kLSoftmaxLinear);

// Reads and checks the attributes (margin, lambda) for the CPU and CUDA-EP kernels.
OrtStatus* ReadLSoftmaxLinearAttributes(const OrtKernelInfo* info, int64_t* margin,
                                        double* lambda);

// The CPU ops (float32 and float64), static objects that live as long as the library.
std::vector<const OrtCustomOp*> LSoftmaxLinearCpuOps();

}  // namespace lsoftmax_ort
