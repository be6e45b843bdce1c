// CUDA implementation of the per-row L-Softmax work; the math itself is in margin_math.h.
//
// Layout of the work:
//   - per-row kernels: one warp per row (8 rows per 256-thread block, grid-stride over rows).
//     Lanes stride over the D columns, the sums (|x_i|^2, |w_t|^2, <x_i, w_t>) are reduced with
//     an xor butterfly, so every lane ends with the same bits and evaluates the same row
//     coefficients; control flow therefore stays uniform within a warp.
//   - grad_w scatter: atomics from the per-row kernel, or (deterministic / 16-bit dtypes) a
//     stable radix sort of the rows by class followed by one thread per (class, column) summing
//     the class's rows in sample order.
#include <algorithm>
#include <climits>
#include <string>
#include <type_traits>

#include "class_sort.cuh"
#include "cuda_common.cuh"
#include "lsoftmax/lsoftmax.h"
#include "lsoftmax/margin_math.h"

namespace lsoftmax::cuda {
namespace {

using detail::Acc;
using detail::from_acc;
using detail::kAlign;
using detail::kWarp;
using detail::Mat;
using detail::mat;
using detail::sort_storage_bytes;
using detail::Tag;
using detail::to_acc;
using detail::warp_sum;

constexpr int kRowsPerBlock = 8;
constexpr int kRowThreads = kWarp * kRowsPerBlock;
constexpr int kScatterThreads = 128;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops cover the rest

__device__ __forceinline__ void raise_flag(int32_t* flag, int32_t bit = kFlagBadLabel) {
  if (flag != nullptr) atomicOr(flag, bit);
}

// Lambda for this launch: the host value, or the device one (read once per thread; every thread
// reads the same address, which the cache serves). A bad device value cannot be refused before
// the launch, so it is flagged (once per launch) and turned into NaN: the outputs then show it.
template <typename A>
__device__ __forceinline__ A lambda_of(A by_value, const double* device_lambda, int32_t* flag) {
  if (device_lambda == nullptr) return by_value;
  const double v = *device_lambda;
  if (v >= 0.0) return static_cast<A>(v);  // as the host casts a by-value lambda
  if (blockIdx.x == 0 && threadIdx.x == 0) raise_flag(flag, kFlagBadLambda);
  return static_cast<A>(nan(""));
}

template <typename T, typename L>
__global__ void __launch_bounds__(kRowThreads)
    forward_rows(Mat<T> logits, Mat<const T> x, Mat<const T> w, const L* labels,
                 int64_t label_stride, int64_t n, int64_t c, int64_t d, int m, Acc<T> lam_value,
                 const double* device_lambda, int32_t* flag) {
  using A = Acc<T>;
  const A lam = lambda_of(lam_value, device_lambda, flag);
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; i < n;
       i += step) {
    const int64_t t = static_cast<int64_t>(labels[i * label_stride]);
    if (t < 0 || t >= c) {
      if (lane == 0) raise_flag(flag);
      continue;
    }
    if (m == 1) continue;  // plain logits; the launch only validated the labels
    A sx = A(0), sw = A(0);
    for (int64_t j = lane; j < d; j += kWarp) {
      const A a = to_acc(x.at(i, j));
      const A b = to_acc(w.at(t, j));
      sx += a * a;
      sw += b * b;
    }
    sx = warp_sum(sx);
    sw = warp_sum(sw);
    if (lane == 0) {
      T& f = logits.at(i, t);
      f = from_acc<T>(margin_logit<A>(to_acc(f), sqrt(sx), sqrt(sw), m, lam));
    }
  }
}

// Per-row backward: adds the margin terms to grad_x[i] and either scatters the grad_w terms with
// atomics (kAtomic) or records (class, row, delta, coef_w) for the segmented scatter (when
// `keys` is not null; with neither, as for margin 1, the kernel only checks the labels).
template <typename T, typename L, bool kAtomic>
__global__ void __launch_bounds__(kRowThreads)
    backward_rows(Mat<const T> grad, Mat<const T> x, Mat<const T> w, const L* labels,
                  int64_t label_stride, Mat<T> grad_x, Mat<T> grad_w, int64_t n, int64_t c,
                  int64_t d, int m, Acc<T> lam_value, const double* device_lambda,
                  int32_t* flag, uint32_t* keys, int32_t* rows, Acc<T>* delta_out,
                  Acc<T>* coef_w_out) {
  using A = Acc<T>;
  const A lam = lambda_of(lam_value, device_lambda, flag);
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; i < n;
       i += step) {
    const int64_t t = static_cast<int64_t>(labels[i * label_stride]);
    const bool valid = t >= 0 && t < c;
    if (!valid && lane == 0) raise_flag(flag);
    if (!valid || m == 1) {
      if (keys != nullptr && lane == 0) {
        keys[i] = static_cast<uint32_t>(c);  // sorts after every class and is skipped
        rows[i] = static_cast<int32_t>(i);
        delta_out[i] = A(0);
        coef_w_out[i] = A(0);
      }
      continue;
    }
    A sx = A(0), sw = A(0), sf = A(0);
    for (int64_t j = lane; j < d; j += kWarp) {
      const A a = to_acc(x.at(i, j));
      const A b = to_acc(w.at(t, j));
      sx += a * a;
      sw += b * b;
      sf += a * b;
    }
    sx = warp_sum(sx);
    sw = warp_sum(sw);
    sf = warp_sum(sf);
    const RowGrad<A> r = margin_row_grad<A>(sf, sqrt(sx), sqrt(sw), m, lam, to_acc(grad.at(i, t)));
    if (keys != nullptr && lane == 0) {
      keys[i] = static_cast<uint32_t>(t);
      rows[i] = static_cast<int32_t>(i);
      delta_out[i] = r.delta;
      coef_w_out[i] = r.coef_w;
    }
    if (r.delta == A(0) && r.coef_x == A(0) && r.coef_w == A(0)) continue;  // warp-uniform
    for (int64_t j = lane; j < d; j += kWarp) {
      const A a = to_acc(x.at(i, j));
      const A b = to_acc(w.at(t, j));
      T& gx = grad_x.at(i, j);
      gx = from_acc<T>(to_acc(gx) + (r.delta * b + r.coef_x * a));
      if constexpr (kAtomic) atomicAdd(&grad_w.at(t, j), r.delta * a + r.coef_w * b);
    }
  }
}

// One block per sorted position; only the first position of each class (a segment head) works.
// Thread j of the head sums column j over the class's rows in sample order (the sort is stable),
// then adds the total to grad_w once: each grad_w entry has exactly one writer.
template <typename T>
__global__ void __launch_bounds__(kScatterThreads)
    scatter_segments(const uint32_t* keys, const int32_t* rows, const Acc<T>* delta,
                     const Acc<T>* coef_w, Mat<const T> x, Mat<const T> w, Mat<T> grad_w,
                     int64_t n, int64_t c, int64_t d) {
  using A = Acc<T>;
  const int64_t col_step = static_cast<int64_t>(gridDim.y) * kScatterThreads;
  for (int64_t k = blockIdx.x; k < n; k += gridDim.x) {
    const uint32_t t = keys[k];
    if (static_cast<int64_t>(t) >= c || (k > 0 && keys[k - 1] == t)) continue;  // block-uniform
    // The segment's end, by binary search in the sorted keys (same answer in every thread), so
    // that the row loop below has a known trip count and its loads can be issued ahead.
    int64_t lo = k + 1, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (keys[mid] <= t) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const int64_t end = lo;
    for (int64_t j = static_cast<int64_t>(blockIdx.y) * kScatterThreads + threadIdx.x; j < d;
         j += col_step) {
      A acc_x = A(0), acc_w = A(0);
#pragma unroll 4
      for (int64_t q = k; q < end; ++q) {  // sample order: the sort is stable
        const int64_t i = rows[q];
        acc_w += coef_w[i];
        acc_x += delta[i] * to_acc(x.at(i, j));
      }
      T& gw = grad_w.at(t, j);
      gw = from_acc<T>(to_acc(gw) + (acc_x + acc_w * to_acc(w.at(t, j))));
    }
  }
}

int grid_rows(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kRowsPerBlock - 1) / kRowsPerBlock, kMaxBlocks));
}

// Carves the segmented-scatter buffers out of one workspace.
struct SegmentWorkspace {
  uint32_t* keys_in = nullptr;
  uint32_t* keys_out = nullptr;
  int32_t* rows_in = nullptr;
  int32_t* rows_out = nullptr;
  void* delta = nullptr;
  void* coef_w = nullptr;
  void* sort_storage = nullptr;
  size_t sort_bytes = 0;
  size_t total = 0;

  SegmentWorkspace(char* base, int64_t n, size_t acc_size, size_t sort_storage_bytes) {
    const size_t n32 = static_cast<size_t>(n) * 4;
    const size_t nacc = static_cast<size_t>(n) * acc_size;
    detail::WorkspaceCarver w(base);
    keys_in = static_cast<uint32_t*>(w.take(n32));
    keys_out = static_cast<uint32_t*>(w.take(n32));
    rows_in = static_cast<int32_t*>(w.take(n32));
    rows_out = static_cast<int32_t*>(w.take(n32));
    delta = w.take(nacc);
    coef_w = w.take(nacc);
    sort_storage = w.take(sort_storage_bytes);
    sort_bytes = sort_storage_bytes;
    total = w.total();
  }
};

size_t acc_size(DType dt) { return dt == DType::kFloat64 ? sizeof(double) : sizeof(float); }

Status check_matrix(const char* name, const DeviceMatrix& m, int64_t rows, int64_t cols,
                    DType dtype) {
  return detail::check_matrix(name, m, rows, cols, dtype, "x");
}

Status check_common(const DeviceMatrix& x, const DeviceMatrix& w, const DeviceLabels& labels,
                    int64_t margin, double lambda) {
  Status s = validate_margin_params(margin, lambda);
  if (!s.ok()) return s;
  s = lsoftmax::detail::check_weight_features(x.cols, w.cols);
  if (!s.ok()) return s;
  s = lsoftmax::detail::check_label_count(labels.size, x.rows);
  if (!s.ok()) return s;
  if (w.rows < 1) return Status::InvalidArgument("weight must have at least one class (row)");
  if (labels.stride < 0) return Status::InvalidArgument("labels has a negative stride");
  if (labels.data == nullptr && labels.size > 0) {
    return Status::InvalidArgument("labels is a null pointer");
  }
  s = check_matrix("x", x, x.rows, x.cols, x.dtype);
  if (s.ok()) s = check_matrix("weight", w, w.rows, w.cols, x.dtype);
  return s;
}

}  // namespace

bool uses_segmented_scatter(DType dtype, bool deterministic) {
  return deterministic || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

Status margin_backward_workspace_size(int64_t n, int64_t num_classes, DType dtype,
                                      bool deterministic, size_t* bytes) {
  *bytes = 0;
  if (!uses_segmented_scatter(dtype, deterministic) || n == 0) return Status::Ok();
  if (n > INT_MAX || num_classes >= INT_MAX) {
    return Status::InvalidArgument(
        "the deterministic backward supports at most 2^31 - 1 rows and classes");
  }
  size_t sort_bytes = 0;
  const Status s = sort_storage_bytes(n, num_classes, &sort_bytes);
  if (!s.ok()) return s;
  *bytes = SegmentWorkspace(nullptr, n, acc_size(dtype), sort_bytes).total;
  return Status::Ok();
}

Status check_forward_args(const DeviceMatrix& logits, const DeviceMatrix& x,
                          const DeviceMatrix& w, const DeviceLabels& labels, int64_t margin,
                          double lambda) {
  Status s = check_common(x, w, labels, margin, lambda);
  if (s.ok()) s = check_matrix("logits", logits, x.rows, w.rows, x.dtype);
  return s;
}

Status check_backward_args(const DeviceMatrix& grad_logits, const DeviceMatrix& x,
                           const DeviceMatrix& w, const DeviceLabels& labels,
                           const DeviceMatrix& grad_x, const DeviceMatrix& grad_w,
                           int64_t margin, double lambda) {
  Status s = check_common(x, w, labels, margin, lambda);
  if (s.ok()) s = check_matrix("grad_logits", grad_logits, x.rows, w.rows, x.dtype);
  if (s.ok()) s = check_matrix("grad_x", grad_x, x.rows, x.cols, x.dtype);
  if (s.ok()) s = check_matrix("grad_weight", grad_w, w.rows, w.cols, x.dtype);
  return s;
}

Status margin_forward(const DeviceMatrix& logits, const DeviceMatrix& x, const DeviceMatrix& w,
                      const DeviceLabels& labels, int64_t margin, double lambda,
                      int32_t* error_flag, void* stream, const double* device_lambda) {
  if (device_lambda != nullptr) lambda = 0.0;  // read on the device; checked there
  Status s = check_forward_args(logits, x, w, labels, margin, lambda);
  if (!s.ok()) return s;
  const int64_t n = x.rows;
  // Margin 1 leaves the logits as they are: a launch would only check the labels.
  if (n == 0 || (margin == 1 && error_flag == nullptr)) return Status::Ok();
  return detail::dispatch(x.dtype, labels.type, [&](auto tt, auto lt) -> Status {
    using T = typename decltype(tt)::type;
    using L = typename decltype(lt)::type;
    forward_rows<T, L><<<grid_rows(n), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        mat<T>(logits), mat<const T>(x), mat<const T>(w), static_cast<const L*>(labels.data),
        labels.stride, n, w.rows, x.cols, static_cast<int>(margin), static_cast<Acc<T>>(lambda),
        device_lambda, error_flag);
    return detail::launch_status("lsoftmax forward kernel launch");
  });
}

Status margin_backward(const DeviceMatrix& grad_logits, const DeviceMatrix& x,
                       const DeviceMatrix& w, const DeviceLabels& labels,
                       const DeviceMatrix& grad_x, const DeviceMatrix& grad_w, int64_t margin,
                       double lambda, bool deterministic, void* workspace,
                       size_t workspace_bytes, int32_t* error_flag, void* stream,
                       const double* device_lambda) {
  if (device_lambda != nullptr) lambda = 0.0;  // read on the device; checked there
  Status s = check_backward_args(grad_logits, x, w, labels, grad_x, grad_w, margin, lambda);
  if (!s.ok()) return s;
  const int64_t n = x.rows, c = w.rows, d = x.cols;
  if (n == 0 || (margin == 1 && error_flag == nullptr)) return Status::Ok();
  const bool segmented = uses_segmented_scatter(x.dtype, deterministic) && margin > 1;
  auto cu_stream = static_cast<cudaStream_t>(stream);

  size_t sort_bytes = 0;
  if (segmented) {
    if (n > INT_MAX || c >= INT_MAX) {
      return Status::InvalidArgument(
          "the deterministic backward supports at most 2^31 - 1 rows and classes");
    }
    s = sort_storage_bytes(n, c, &sort_bytes);
    if (!s.ok()) return s;
    const size_t need = SegmentWorkspace(nullptr, n, acc_size(x.dtype), sort_bytes).total;
    if (workspace == nullptr || workspace_bytes < need) {
      return Status::InvalidArgument("workspace has " + std::to_string(workspace_bytes) +
                                     " bytes, the deterministic backward needs " +
                                     std::to_string(need) +
                                     " (margin_backward_workspace_size)");
    }
    if (reinterpret_cast<uintptr_t>(workspace) % kAlign != 0) {
      return Status::InvalidArgument("workspace must be 256-byte aligned");
    }
  }

  return detail::dispatch(x.dtype, labels.type, [&](auto tt, auto lt) -> Status {
    using T = typename decltype(tt)::type;
    using L = typename decltype(lt)::type;
    using A = Acc<T>;
    const auto* lab = static_cast<const L*>(labels.data);
    const int m = static_cast<int>(margin);
    const A lam = static_cast<A>(lambda);
    if (!segmented) {
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        backward_rows<T, L, true><<<grid_rows(n), kRowThreads, 0, cu_stream>>>(
            mat<const T>(grad_logits), mat<const T>(x), mat<const T>(w), lab, labels.stride,
            mat<T>(grad_x), mat<T>(grad_w), n, c, d, m, lam, device_lambda, error_flag, nullptr,
            nullptr, nullptr, nullptr);
        return detail::launch_status("lsoftmax backward kernel launch");
      } else {
        // Only reached with margin == 1 (no scatter at all): the rows kernel then only checks
        // the labels, so the segmented instantiation serves with no buffers.
        backward_rows<T, L, false><<<grid_rows(n), kRowThreads, 0, cu_stream>>>(
            mat<const T>(grad_logits), mat<const T>(x), mat<const T>(w), lab, labels.stride,
            mat<T>(grad_x), mat<T>(grad_w), n, c, d, m, lam, device_lambda, error_flag, nullptr,
            nullptr, nullptr, nullptr);
        return detail::launch_status("lsoftmax backward kernel launch");
      }
    }
    SegmentWorkspace ws(static_cast<char*>(workspace), n, sizeof(A), sort_bytes);
    auto* delta = static_cast<A*>(ws.delta);
    auto* coef_w = static_cast<A*>(ws.coef_w);
    backward_rows<T, L, false><<<grid_rows(n), kRowThreads, 0, cu_stream>>>(
        mat<const T>(grad_logits), mat<const T>(x), mat<const T>(w), lab, labels.stride,
        mat<T>(grad_x), mat<T>(grad_w), n, c, d, m, lam, device_lambda, error_flag, ws.keys_in,
        ws.rows_in, delta, coef_w);
    Status st = detail::launch_status("lsoftmax backward kernel launch");
    if (!st.ok()) return st;
    size_t bytes = ws.sort_bytes;
    st = detail::cuda_status(
        detail::sort_rows_by_class(ws.sort_storage, bytes, ws.keys_in, ws.keys_out, ws.rows_in,
                                   ws.rows_out, n, c, cu_stream),
        "cub::DeviceRadixSort");
    if (!st.ok()) return st;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(n, kMaxBlocks)),
                    static_cast<unsigned>(std::min<int64_t>(
                        std::max<int64_t>((d + kScatterThreads - 1) / kScatterThreads, 1), 65535)));
    scatter_segments<T><<<grid, kScatterThreads, 0, cu_stream>>>(
        ws.keys_out, ws.rows_out, delta, coef_w, mat<const T>(x), mat<const T>(w),
        mat<T>(grad_w), n, c, d);
    return detail::launch_status("lsoftmax grad_weight scatter kernel launch");
  });
}

}  // namespace lsoftmax::cuda
