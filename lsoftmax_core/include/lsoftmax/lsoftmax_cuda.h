// The L-Softmax core on CUDA devices: the per-row margin work around host-computed GEMMs, on the
// caller's stream. Defined only when the core is built with CUDA (LSOFTMAX_WITH_CUDA); the
// header itself has no CUDA includes (the stream is a void*), so g++-compiled adapters (the
// Python binding, the ONNX Runtime glue) can include it.
//
// Contract of every launcher:
//   - runs asynchronously on `stream` (a cudaStream_t; nullptr = the legacy default stream);
//     never synchronizes the device or the stream, never allocates device memory;
//   - device pointers only (the matrices and labels must live on the current device);
//   - host-side checks (margin, lambda, shapes, dtypes) come back as InvalidArgument before
//     anything is launched; CUDA failures (no driver, no device, launch errors) come back as
//     RuntimeError with the CUDA error name — never an abort;
//   - labels are checked on the device: a row whose label is outside [0, C) is left untouched
//     and sets kFlagBadLabel in *error_flag (a caller-owned device int32, zeroed by the caller;
//     may be null when the caller has validated the labels itself). Reading the flag is the
//     caller's choice of when to pay for a host sync.
//   - lambda is a host value, or (device_lambda not null) a device double read when the kernel
//     runs, so that a schedule evaluated on the device (evaluate_schedule) feeds the margin
//     kernels without a host sync. A device lambda that is negative or NaN cannot be refused
//     before the launch: it sets kFlagBadLambda in *error_flag and makes the margin logits and
//     gradients NaN, so it never passes silently.
//
// Dtypes: float32, float64, float16 and bfloat16 matrices; all the matrices of one call share
// one dtype (logits and gradients are in the input dtype, as torch keeps them). The per-row math
// (norms, margin, coefficients) runs in float32 for float32/float16/bfloat16 and in float64 for
// float64. Labels are int32 or int64.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lsoftmax/margin_family.h"
#include "lsoftmax/schedule_math.h"
#include "lsoftmax/status.h"

namespace lsoftmax::cuda {

// Bits of *error_flag.
constexpr int32_t kFlagBadLabel = 1;
constexpr int32_t kFlagBadLambda = 2;

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum class LabelType : int { kInt32 = 0, kInt64 = 1 };

const char* dtype_name(DType t);

// A strided matrix in device memory; strides in elements (may be any non-negative values).
struct DeviceMatrix {
  void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 1;
  DType dtype = DType::kFloat32;
};

struct DeviceLabels {
  const void* data = nullptr;
  int64_t size = 0;
  int64_t stride = 1;  // in elements
  LabelType type = LabelType::kInt64;
};

// Number of visible CUDA devices; 0 when there is no driver or no device (never an error).
int device_count();

// Ok when at least one device is usable; otherwise why not (no driver, driver too old, ...).
Status device_status();

// logits (N x C) holds x W^T on entry; on return logits[i, labels[i]] is the margin logit.
// One warp per row: the norms of x_i and w_{y_i} are warp-reduced, lane 0 rewrites the logit.
// With device_lambda, `lambda` is not used (nor checked).
Status margin_forward(const DeviceMatrix& logits, const DeviceMatrix& x, const DeviceMatrix& w,
                      const DeviceLabels& labels, int64_t margin, double lambda,
                      int32_t* error_flag, void* stream, const double* device_lambda = nullptr);

// grad_x (N x D) holds G W and grad_w (C x D) holds G^T x on entry; the margin terms are added
// (only G[i, y_i] is read). grad_w rows that several samples share are summed either
//   - by atomics (deterministic = false; float32/float64): no workspace, order not fixed; or
//   - by a segmented sum (deterministic = true, and always for float16/bfloat16, whose sums
//     then accumulate in float32 and round once): rows are radix-sorted by class (stable, so
//     sample order within a class) in the caller's workspace, and each (class, column) entry is
//     summed by one thread in that order, so results are bitwise reproducible.
// The workspace must be at least margin_backward_workspace_size() bytes (0 for the atomic
// path; `workspace` may then be null).
Status margin_backward(const DeviceMatrix& grad_logits, const DeviceMatrix& x,
                       const DeviceMatrix& w, const DeviceLabels& labels,
                       const DeviceMatrix& grad_x, const DeviceMatrix& grad_w, int64_t margin,
                       double lambda, bool deterministic, void* workspace,
                       size_t workspace_bytes, int32_t* error_flag, void* stream,
                       const double* device_lambda = nullptr);

// *out = schedule_value(spec, *step): a schedule's value at a device int64 step counter, written
// to a device double, by one thread on `stream` (no sync). The spec is validated first
// (validate_schedule in schedules.h: InvalidArgument, nothing launched).
Status evaluate_schedule(const ScheduleSpec& spec, const int64_t* step, double* out,
                         void* stream);

// The host-side checks the launchers start with (margin, lambda, shapes, dtypes, strides), for
// adapters that want to fail before doing anything else on the device.
Status check_forward_args(const DeviceMatrix& logits, const DeviceMatrix& x,
                          const DeviceMatrix& w, const DeviceLabels& labels, int64_t margin,
                          double lambda);
Status check_backward_args(const DeviceMatrix& grad_logits, const DeviceMatrix& x,
                           const DeviceMatrix& w, const DeviceLabels& labels,
                           const DeviceMatrix& grad_x, const DeviceMatrix& grad_w,
                           int64_t margin, double lambda);

// Workspace bytes margin_backward needs for n rows, num_classes classes and this dtype/mode.
// The deterministic path asks CUB for its sort storage, which needs a usable device.
Status margin_backward_workspace_size(int64_t n, int64_t num_classes, DType dtype,
                                      bool deterministic, size_t* bytes);

// Whether margin_backward takes the segmented (workspace) path for this dtype and mode.
bool uses_segmented_scatter(DType dtype, bool deterministic);

// Stream-ordered scratch memory (cudaMallocAsync / cudaFreeAsync) for callers that own no
// allocator (the Python binding when no error flag or workspace is passed). Not for hot paths:
// adapters with an allocator (torch, ONNX Runtime) pass their own buffers.
Status scratch_alloc(void* stream, size_t bytes, bool zero, void** ptr);
Status scratch_free(void* stream, void* ptr);

// Asynchronous copy on `stream` (any direction: cudaMemcpyDefault). From pageable host memory
// it returns once the source has been staged, so the source may be released right after.
Status copy_async(void* stream, void* dst, const void* src, size_t bytes);

// Asynchronous memset on `stream`.
Status memset_async(void* stream, void* dst, int value, size_t bytes);

// Waits for all work on `stream`.
Status stream_synchronize(void* stream);

// Device-to-host copy on `stream` followed by a wait for that stream (small reads only).
Status copy_to_host_sync(void* stream, void* dst, const void* src, size_t bytes);

// --- The margin family (margin_family.h; cuda/margin_family_cuda.cu) -------------------------

// phi[i], dphi[i] (dphi may be null) of the spec's kind at the n cosines cos_theta[i] (float32
// or float64, device arrays of `dtype`). Lambda by value or, with device_lambda, read on the
// device (a bad one sets kFlagBadLambda and gives NaN).
Status margin_family_targets(const MarginSpec& spec, double lambda, const void* cos_theta,
                             int64_t n, DType dtype, void* phi, void* dphi, int32_t* error_flag,
                             void* stream, const double* device_lambda = nullptr);

// The family's forward (lsoftmax.h's margin_family_forward on the device): logits holds the
// kind's plain logits of the RAW x and w; each row's target logit becomes a_i phi(c_i). Rows with
// bad labels are left untouched and set kFlagBadLabel. lsoftmax runs margin_forward.
Status margin_family_forward(const MarginSpec& spec, double lambda, const DeviceMatrix& logits,
                             const DeviceMatrix& x, const DeviceMatrix& w,
                             const DeviceLabels& labels, int32_t* error_flag, void* stream,
                             const double* device_lambda = nullptr);

}  // namespace lsoftmax::cuda
