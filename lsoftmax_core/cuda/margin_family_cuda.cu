// CUDA launchers of the margin family's per-row work; the math is in margin_family.h, the same
// functions the CPU loops call. L-Softmax itself keeps its own kernels (margin_cuda.cu).
//
//   - margin_family_targets: one thread per cosine, phi(c) and phi'(c) (torch's backward and
//     forward, which compute the cosines with torch ops);
//   - margin_family_forward: one warp per row over the RAW x and w (the ONNX Runtime CUDA EP,
//     whose Gemm produced the kind's plain logits), as margin_cuda.cu's forward_rows.
#include <string>

#include "cuda_common.cuh"
#include "lsoftmax/lsoftmax.h"
#include "lsoftmax/margin_family.h"

namespace lsoftmax::cuda {
namespace {

using detail::Acc;
using detail::kWarp;
using detail::Mat;
using detail::mat;
using detail::to_acc;
using detail::warp_sum;

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarp;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops cover the rest

__device__ __forceinline__ void flag_bit(int32_t* flag, int32_t bit) {
  if (flag != nullptr) atomicOr(flag, bit);
}

// The host lambda, or the device one (a schedule's value); a bad device value is flagged and
// turns the outputs into NaN, as margin_cuda.cu does.
template <typename A>
__device__ __forceinline__ A family_lambda(A by_value, const double* device_lambda,
                                           int32_t* flag) {
  if (device_lambda == nullptr) return by_value;
  const double v = *device_lambda;
  if (v >= 0.0) return static_cast<A>(v);
  if (blockIdx.x == 0 && threadIdx.x == 0) flag_bit(flag, kFlagBadLambda);
  return static_cast<A>(nan(""));
}

int blocks_for(int64_t items, int64_t per_block) {
  const int64_t b = (items + per_block - 1) / per_block;
  return static_cast<int>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    targets_kernel(MarginSpec spec, T lam_value, const double* device_lambda, const T* c,
                   int64_t n, T* phi, T* dphi, int32_t* flag) {
  const T lam = family_lambda(lam_value, device_lambda, flag);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += step) {
    const TargetTerms<T> r = margin_target(spec, c[i], lam);
    phi[i] = r.phi;
    if (dphi != nullptr) dphi[i] = r.dphi;
  }
}

template <typename T, typename L>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(MarginSpec spec, Mat<T> logits, Mat<const T> x, Mat<const T> w,
                   const L* labels, int64_t label_stride, int64_t n, int64_t c, int64_t d,
                   Acc<T> lam_value, const double* device_lambda, int32_t* flag) {
  using A = Acc<T>;
  const A lam = family_lambda(lam_value, device_lambda, flag);
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; i < n;
       i += step) {
    const int64_t t = static_cast<int64_t>(labels[i * label_stride]);
    if (t < 0 || t >= c) {
      if (lane == 0) flag_bit(flag, kFlagBadLabel);
      continue;
    }
    A sx = A(0), sw = A(0), sxw = A(0);
    for (int64_t j = lane; j < d; j += kWarp) {
      const A a = to_acc(x.at(i, j));
      const A b = to_acc(w.at(t, j));
      sx += a * a;
      sw += b * b;
      sxw += a * b;
    }
    sx = warp_sum(sx);
    sw = warp_sum(sw);
    sxw = warp_sum(sxw);
    if (lane != 0) continue;
    const A nx = sqrt(sx), nw = sqrt(sw);
    if (is_degenerate(nx, nw)) continue;
    const TargetTerms<A> r = margin_target(spec, sxw / (nx * nw), lam);
    logits.at(i, t) = detail::from_acc<T>(margin_row_scale(spec, nx, nw) * r.phi);
  }
}

}  // namespace

Status margin_family_targets(const MarginSpec& spec, double lambda, const void* cos_theta,
                             int64_t n, DType dtype, void* phi, void* dphi, int32_t* error_flag,
                             void* stream, const double* device_lambda) {
  Status s = validate_margin_spec(spec, device_lambda != nullptr ? 0.0 : lambda);
  if (!s.ok()) return s;
  if (dtype != DType::kFloat32 && dtype != DType::kFloat64) {
    return Status::InvalidArgument(std::string("cos_theta must be float32 or float64, got ") +
                                   dtype_name(dtype));
  }
  if (n < 0) return Status::InvalidArgument("n must be >= 0, got " + std::to_string(n));
  if (n == 0) return Status::Ok();
  if (cos_theta == nullptr || phi == nullptr) {
    return Status::InvalidArgument("cos_theta and phi must not be null");
  }
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    targets_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        spec, static_cast<T>(lambda), device_lambda, static_cast<const T*>(cos_theta), n,
        static_cast<T*>(phi), static_cast<T*>(dphi), error_flag);
    return detail::launch_status("lsoftmax margin family targets kernel launch");
  };
  if (dtype == DType::kFloat64) return launch(double{});
  return launch(float{});
}

Status margin_family_forward(const MarginSpec& spec, double lambda, const DeviceMatrix& logits,
                             const DeviceMatrix& x, const DeviceMatrix& w,
                             const DeviceLabels& labels, int32_t* error_flag, void* stream,
                             const double* device_lambda) {
  if (spec.kind == MarginKind::kLSoftmax) {
    Status s = validate_margin_spec(spec, device_lambda != nullptr ? 0.0 : lambda);
    if (!s.ok()) return s;
    return margin_forward(logits, x, w, labels, static_cast<int64_t>(spec.margin), lambda,
                          error_flag, stream, device_lambda);
  }
  Status s = validate_margin_spec(spec, device_lambda != nullptr ? 0.0 : lambda);
  if (s.ok()) s = lsoftmax::detail::check_weight_features(x.cols, w.cols);
  if (s.ok()) s = lsoftmax::detail::check_label_count(labels.size, x.rows);
  if (s.ok() && w.rows < 1) s = Status::InvalidArgument("weight must have at least one class (row)");
  if (s.ok()) s = detail::check_matrix("x", x, x.rows, x.cols, x.dtype, "x");
  if (s.ok()) s = detail::check_matrix("weight", w, w.rows, w.cols, x.dtype, "x");
  if (s.ok()) s = detail::check_matrix("logits", logits, x.rows, w.rows, x.dtype, "x");
  if (s.ok() && labels.data == nullptr && labels.size > 0) {
    s = Status::InvalidArgument("labels is a null pointer");
  }
  if (!s.ok() || x.rows == 0) return s;
  const int64_t n = x.rows;
  return detail::dispatch(x.dtype, labels.type, [&](auto tt, auto lt) -> Status {
    using T = typename decltype(tt)::type;
    using L = typename decltype(lt)::type;
    forward_kernel<T, L><<<blocks_for(n, kRowsPerBlock), kThreads, 0,
                           static_cast<cudaStream_t>(stream)>>>(
        spec, mat<T>(logits), mat<const T>(x), mat<const T>(w),
        static_cast<const L*>(labels.data), labels.stride, n, w.rows, x.cols,
        static_cast<Acc<T>>(lambda), device_lambda, error_flag);
    return detail::launch_status("lsoftmax margin family forward kernel launch");
  });
}

}  // namespace lsoftmax::cuda
