// The L-GM core on CUDA devices: the same four assembly steps as the CPU core (lgm.h), around
// host-computed GEMMs, on the caller's stream. Defined only when the core is built with CUDA
// (LSOFTMAX_WITH_CUDA); no CUDA includes here, so g++-compiled adapters can include it.
//
// Contract (as for the L-Softmax launchers in lsoftmax_cuda.h):
//   - asynchronous on `stream` (a cudaStream_t; nullptr = the legacy default stream); never
//     synchronizes, never allocates: scratch space comes from the caller (workspace);
//   - device pointers only; matrices may be strided (DeviceMatrix), vectors are contiguous and
//     in the matrices' dtype unless stated otherwise;
//   - host-side checks (alpha, shapes, dtypes, workspace size) come back as InvalidArgument before
//     anything is launched; CUDA failures as RuntimeError naming the CUDA error;
//   - data checks happen on the device and OR bits into *error_flag (a caller-owned device int32,
//     zeroed by the caller; may be null): kLgmBadLabel for a label outside [0, C),
//     kLgmBadLogVar for a non-finite log-variance. Rows with a bad label get logits without
//     margin and a NaN log-likelihood, and no gradient; reading the flag (a sync) is the caller's
//     choice.
//
// Dtypes: float32 and float64 (all matrices and vectors of one call share one); every scalar
// computation runs in double, as on the CPU (lgm_math.h). Labels int32 or int64, or none
// (DeviceLabels::data == nullptr). Parameter-gradient sums have a fixed order (no atomics): the
// results are bitwise reproducible run to run on one device.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lsoftmax/lsoftmax_cuda.h"
#include "lsoftmax/status.h"

namespace lsoftmax::cuda {

constexpr int32_t kLgmBadLabel = 1;
constexpr int32_t kLgmBadLogVar = 2;

// Bytes of the per-class terms lgm_prepare() writes and the later steps read: 3 C doubles
// (c_k = sum_j muc_kj^2 p_kj, h_k = 1/2 log|V_k| and, for isotropic variances, p_k).
size_t lgm_class_terms_bytes(int64_t num_classes);

// offset (D) = mean of the class means; precision (C x Dv) = exp(-log_var); scaled_means (C x D)
// = (means - offset) * precision; class_terms as above. A non-finite log_var entry sets
// kLgmBadLogVar.
Status lgm_prepare(const DeviceMatrix& means, const DeviceMatrix& log_var, void* offset,
                   const DeviceMatrix& precision, const DeviceMatrix& scaled_means,
                   double* class_terms, int32_t* error_flag, void* stream);

// The GEMM operands on the features for hosts without elementwise kernels of their own (the ONNX
// Runtime op): xc = x - offset and, unless xc_sq is empty (rows = 0), xc_sq = xc^2, both N x D.
Status lgm_center(const DeviceMatrix& x, const void* offset, const DeviceMatrix& xc,
                  const DeviceMatrix& xc_sq, void* stream);

// logits holds B = (x - offset) @ scaled_means^T on entry and the L-GM logits on return; sq_term
// is A = (x - offset)^2 @ precision^T (N x C) for diagonal variances and must be empty (rows = 0)
// for isotropic ones. loglik (N) as in lgm.h. offset and class_terms are lgm_prepare()'s for
// these means and log_var. n_direct (a device counter, may be null) is increased by the number of
// entries recomputed from direct differences.
Status lgm_forward(const DeviceMatrix& x, const DeviceMatrix& means, const DeviceMatrix& log_var,
                   const void* offset, const double* class_terms, const DeviceMatrix& sq_term,
                   const DeviceLabels& labels, const DeviceMatrix& logits, void* loglik,
                   double alpha, bool include_logdet, unsigned long long* n_direct,
                   int32_t* error_flag, void* stream);

// Workspace bytes lgm_backward_coeffs() and lgm_backward_assemble() need (one buffer serves
// both, they run one after the other). Asks CUB for its sort storage: needs a usable device.
Status lgm_backward_workspace_size(int64_t n, int64_t num_classes, int64_t feat_dim,
                                   int64_t log_var_cols, size_t* bytes);

// As lgm_backward_coeffs() in lgm.h: coeff (N x C), colsum (C), grad_h (C), own (N) in the
// dtype of grad_logits, cls (N) int64. grad_loglik (N) may be null; class_terms is
// lgm_prepare()'s (its h_k decide the predicted class exactly as the forward did).
Status lgm_backward_coeffs(const DeviceMatrix& grad_logits, const void* grad_loglik,
                           const DeviceMatrix& logits, const double* class_terms,
                           const DeviceLabels& labels, double alpha, bool include_logdet,
                           const DeviceMatrix& coeff, void* colsum, void* grad_h, void* own,
                           int64_t* cls, void* workspace, size_t workspace_bytes,
                           int32_t* error_flag, void* stream);

// As lgm_backward_assemble() in lgm.h. A cls entry outside [0, C) sets kLgmBadLabel and its row
// gets no own-class terms.
Status lgm_backward_assemble(const DeviceMatrix& x, const DeviceMatrix& means,
                             const DeviceMatrix& log_var, const void* offset, const void* colsum,
                             const void* grad_h, const void* own, const int64_t* cls,
                             const DeviceMatrix& wp, const DeviceMatrix& wmp,
                             const DeviceMatrix& wtx, const DeviceMatrix& wtx2,
                             const DeviceMatrix& grad_x, const DeviceMatrix& grad_means,
                             const DeviceMatrix& grad_log_var, void* workspace,
                             size_t workspace_bytes, int32_t* error_flag, void* stream);

}  // namespace lsoftmax::cuda
