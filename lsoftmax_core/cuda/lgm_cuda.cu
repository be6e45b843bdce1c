// CUDA implementation of the L-GM assembly (see lgm_cuda.h for the contract, lgm.h for the
// layout of the work, lgm_math.h for the math, which this file only schedules).
//
// Layout of the work:
//   - prepare: one thread per feature for the offset (classes summed in order), one per (class,
//     feature) entry for precision and scaled means, one warp per class for c_k and h_k;
//   - forward and backward coefficients: one warp per row, lanes striding over the classes; the
//     predicted class (no labels) is a warp arg-max ordered by (score desc, class asc), which is
//     the first maximum a serial scan finds, whatever the reduction order;
//   - column sums (colsum, grad_h): fixed chunks of kChunkRows rows, each summed in row order by
//     a (32 classes x 8 rows) block, then the chunks summed in order by one thread per class;
//   - own-class sums of the parameter gradients: rows stably radix-sorted by class (CUB), then one
//     thread per (class, feature) sums its class's rows in sample order; isotropic brackets are
//     then summed over features by one warp per class.
// Every sum has an order fixed by the shapes alone, so results are bitwise reproducible.
#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "class_sort.cuh"
#include "cuda_common.cuh"
#include "lsoftmax/lgm.h"  // validate_lgm_alpha
#include "lsoftmax/lgm_cuda.h"
#include "lsoftmax/lgm_math.h"

namespace lsoftmax::cuda {
namespace {

using detail::align_up;
using detail::kAlign;
using detail::kFullMask;
using detail::kWarp;
using detail::Mat;
using detail::mat;
using detail::warp_sum;

constexpr int kWarpsPerBlock = 8;
constexpr int kBlockThreads = kWarp * kWarpsPerBlock;
constexpr int kColTile = 32;       // classes per column-sum block (x)
constexpr int kColRows = 8;        // row lanes per column-sum block (y)
constexpr int64_t kChunkRows = 256;  // rows per column-sum partial
constexpr int kFeatThreads = 128;  // features per class-gradient block
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// Warp arg-max of (score, class) pairs in the order lgm_prediction_better() defines.
__device__ __forceinline__ void warp_argmax(double* v, long long* k) {
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const double ov = __shfl_xor_sync(kFullMask, *v, off);
    const long long ok = __shfl_xor_sync(kFullMask, *k, off);
    if (lgm_prediction_better(ov, ok, *v, *k)) {
      *v = ov;
      *k = ok;
    }
  }
  // A serial scan that finds no score above -inf keeps class 0 (a NaN score has won already).
  if (*v == -INFINITY) *k = 0;
}

__device__ __forceinline__ void raise_flag(int32_t* flag, int32_t bit) {
  if (flag != nullptr) atomicOr(flag, bit);
}

template <typename L>
__device__ __forceinline__ int64_t read_label(const L* labels, int64_t stride, int64_t i) {
  return labels == nullptr ? -1 : static_cast<int64_t>(labels[i * stride]);
}

int blocks_for(int64_t items, int64_t per_block) {
  return static_cast<int>(std::max<int64_t>(
      std::min<int64_t>((items + per_block - 1) / per_block, kMaxBlocks), 1));
}

// --- prepare -------------------------------------------------------------------------------

template <typename T>
__global__ void prepare_offset(Mat<const T> means, T* offset, int64_t c, int64_t d) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double acc = 0.0;
    for (int64_t k = 0; k < c; ++k) acc += static_cast<double>(means.at(k, j));
    offset[j] = static_cast<T>(acc / static_cast<double>(c));
  }
}

template <typename T>
__global__ void prepare_params(Mat<const T> means, Mat<const T> log_var, const T* offset,
                               Mat<T> precision, Mat<T> scaled, int64_t c, int64_t d, int64_t dv) {
  const int64_t total = c * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = e / d, j = e % d;
    const double p = lgm_precision(static_cast<double>(log_var.at(k, dv == 1 ? 0 : j)));
    scaled.at(k, j) = static_cast<T>(
        (static_cast<double>(means.at(k, j)) - static_cast<double>(offset[j])) * p);
    if (j < dv) precision.at(k, j) = static_cast<T>(p);
  }
}

// terms[k] = c_k, terms[C + k] = h_k, terms[2C + k] = p_k (isotropic precision; diagonal: unused).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    prepare_class_terms(Mat<const T> means, Mat<const T> log_var, const T* offset, double* terms,
                        int64_t c, int64_t d, int64_t dv, int32_t* flag) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const bool diag = dv == d;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; k < c;
       k += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    double ck = 0.0, lsum = 0.0;
    bool bad = false;
    for (int64_t j = lane; j < d; j += kWarp) {
      const double lv = static_cast<double>(log_var.at(k, diag ? j : 0));
      if (j < dv) {
        lsum += lv;
        bad = bad || !isfinite(lv);
      }
      ck += lgm_direct_term(static_cast<double>(means.at(k, j)), static_cast<double>(offset[j]),
                            lgm_precision(lv));
    }
    if (bad) raise_flag(flag, kLgmBadLogVar);
    ck = warp_sum(ck);
    lsum = warp_sum(lsum);
    if (lane == 0) {
      const double lv0 = static_cast<double>(log_var.at(k, 0));
      terms[k] = ck;
      terms[c + k] =
          diag ? lgm_half_logdet_from_sum(lsum) : lgm_half_logdet_isotropic(lv0, d);
      terms[2 * c + k] = lgm_precision(lv0);
    }
  }
}

template <typename T>
__global__ void center_features(Mat<const T> x, const T* offset, Mat<T> xc, Mat<T> xc_sq,
                                bool squares, int64_t n, int64_t d) {
  const int64_t total = n * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / d, j = e % d;
    const T v = x.at(i, j) - offset[j];  // in T, as the host's own subtraction would be
    xc.at(i, j) = v;
    if (squares) xc_sq.at(i, j) = v * v;
  }
}

// --- forward -------------------------------------------------------------------------------

template <typename T, typename L>
__global__ void __launch_bounds__(kBlockThreads)
    forward_rows(Mat<const T> x, Mat<const T> means, Mat<const T> log_var, const T* offset,
                 const double* terms, Mat<const T> sq, const L* labels, int64_t label_stride,
                 Mat<T> logits, T* loglik, int64_t n, int64_t c, int64_t d, int64_t dv,
                 double alpha, bool include_logdet, unsigned long long* n_direct, int32_t* flag) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const bool diag = dv == d;
  const double* ck = terms;
  const double* hk = terms + c;
  const double* pk = terms + 2 * c;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; i < n;
       i += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    int64_t y = read_label(labels, label_stride, i);
    const bool bad = labels != nullptr && (y < 0 || y >= c);
    if (bad) {
      if (lane == 0) raise_flag(flag, kLgmBadLabel);
      y = -1;  // no margin on this row
    }
    double xsq = 0.0;  // |xc_i|^2, the isotropic A_ik / p_k
    if (!diag) {
      for (int64_t j = lane; j < d; j += kWarp) {
        const double v = static_cast<double>(x.at(i, j)) - static_cast<double>(offset[j]);
        xsq += v * v;
      }
      xsq = warp_sum(xsq);
    }
    double d_target = 0.0, best_v = -INFINITY;
    long long best_k = LLONG_MAX;
    unsigned long long n_dir = 0;
    for (int64_t k = lane; k < c; k += kWarp) {
      const double a = diag ? static_cast<double>(sq.at(i, k)) : pk[k] * xsq;
      bool needs_direct = false;
      double d2 = lgm_expansion_d2(a, static_cast<double>(logits.at(i, k)), ck[k], &needs_direct);
      if (needs_direct) {
        double acc = 0.0;
        for (int64_t j = 0; j < d; ++j) {
          acc += lgm_direct_term(static_cast<double>(x.at(i, j)),
                                 static_cast<double>(means.at(k, j)),
                                 lgm_precision(static_cast<double>(log_var.at(k, diag ? j : 0))));
        }
        d2 = acc;
        ++n_dir;
      }
      const double dist = lgm_half_distance(d2);
      if (k == y) d_target = dist;
      const T z = static_cast<T>(lgm_logit(dist, k == y, alpha, include_logdet, hk[k]));
      logits.at(i, k) = z;
      const double score = lgm_prediction_score(static_cast<double>(z), hk[k], include_logdet);
      if (lgm_prediction_better(score, k, best_v, best_k)) {
        best_v = score;
        best_k = k;
      }
    }
    // Every lane but the label's holds 0, and adding zeros is exact.
    d_target = warp_sum(d_target);
    warp_argmax(&best_v, &best_k);
    n_dir = warp_sum(n_dir);
    if (lane == 0) {
      double ll = best_v;
      if (bad) {
        ll = NAN;
      } else if (labels != nullptr) {
        ll = -(d_target + hk[y]);
      }
      loglik[i] = static_cast<T>(ll);
      if (n_direct != nullptr && n_dir > 0) atomicAdd(n_direct, n_dir);
    }
  }
}

// --- backward coefficients -----------------------------------------------------------------

template <typename T, typename L>
__global__ void __launch_bounds__(kBlockThreads)
    coeff_rows(Mat<const T> grad, const T* grad_loglik, Mat<const T> logits, const double* terms,
               const L* labels, int64_t label_stride, Mat<T> coeff, T* own, int64_t* cls,
               int64_t n, int64_t c, double alpha, bool include_logdet, int32_t* flag) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const double* hk = terms + c;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; i < n;
       i += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t y = read_label(labels, label_stride, i);
    if (labels != nullptr && (y < 0 || y >= c)) {  // no gradient from this row
      for (int64_t k = lane; k < c; k += kWarp) coeff.at(i, k) = T(0);
      if (lane == 0) {
        raise_flag(flag, kLgmBadLabel);
        own[i] = T(0);
        cls[i] = -1;
      }
      continue;
    }
    int64_t own_class = y;
    if (labels == nullptr) {
      double best_v = -INFINITY;
      long long best_k = LLONG_MAX;
      for (int64_t k = lane; k < c; k += kWarp) {
        const double score =
            lgm_prediction_score(static_cast<double>(logits.at(i, k)), hk[k], include_logdet);
        if (lgm_prediction_better(score, k, best_v, best_k)) {
          best_v = score;
          best_k = k;
        }
      }
      warp_argmax(&best_v, &best_k);
      own_class = static_cast<int64_t>(best_k);
    }
    for (int64_t k = lane; k < c; k += kWarp) {
      const T w = static_cast<T>(lgm_coeff(static_cast<double>(grad.at(i, k)), k == y, alpha));
      if (k == own_class) {
        double wo = static_cast<double>(w);
        if (grad_loglik != nullptr) wo -= static_cast<double>(grad_loglik[i]);
        own[i] = static_cast<T>(wo);
        coeff.at(i, k) = T(0);
      } else {
        coeff.at(i, k) = w;
      }
    }
    if (lane == 0) cls[i] = own_class;
  }
}

// partial[chunk * C + k] = sum over the chunk's rows (in order) of coeff(i, k); likewise dL/dh_k
// in partial[(nchunks + chunk) * C + k]. Rows with cls < 0 (bad labels) add nothing.
template <typename T>
__global__ void __launch_bounds__(kColTile* kColRows)
    column_partials(Mat<const T> coeff, Mat<const T> grad, const T* grad_loglik,
                    const int64_t* cls, double* partial, int64_t n, int64_t c, int64_t nchunks,
                    bool include_logdet) {
  __shared__ double s_cs[kColRows][kColTile];
  __shared__ double s_gh[kColRows][kColTile];
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  for (int64_t chunk = blockIdx.y; chunk < nchunks; chunk += gridDim.y) {
    const int64_t chunk_end = (chunk + 1) * kChunkRows;
    const int64_t end = chunk_end < n ? chunk_end : n;
    double cs = 0.0, gh = 0.0;
    if (k < c) {
      for (int64_t i = chunk * kChunkRows + ty; i < end; i += kColRows) {
        const int64_t ci = cls[i];
        if (ci < 0) continue;
        cs += static_cast<double>(coeff.at(i, k));
        gh += lgm_grad_h_term(static_cast<double>(grad.at(i, k)), include_logdet);
        if (grad_loglik != nullptr && ci == k) gh -= static_cast<double>(grad_loglik[i]);
      }
    }
    s_cs[ty][tx] = cs;
    s_gh[ty][tx] = gh;
    __syncthreads();
    if (ty == 0 && k < c) {
      double tcs = 0.0, tgh = 0.0;
      for (int r = 0; r < kColRows; ++r) {
        tcs += s_cs[r][tx];
        tgh += s_gh[r][tx];
      }
      partial[chunk * c + k] = tcs;
      partial[(nchunks + chunk) * c + k] = tgh;
    }
    __syncthreads();  // the shared buffers are reused by the next chunk
  }
}

template <typename T>
__global__ void column_finish(const double* partial, T* colsum, T* grad_h, int64_t c,
                              int64_t nchunks) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < c;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double cs = 0.0, gh = 0.0;
    for (int64_t q = 0; q < nchunks; ++q) {
      cs += partial[q * c + k];
      gh += partial[(nchunks + q) * c + k];
    }
    colsum[k] = static_cast<T>(cs);
    grad_h[k] = static_cast<T>(gh);
  }
}

// --- backward assembly ---------------------------------------------------------------------

template <typename T>
__global__ void grad_x_elems(Mat<const T> x, Mat<const T> means, Mat<const T> log_var,
                             const T* offset, const T* own, const int64_t* cls, Mat<const T> wp,
                             Mat<const T> wmp, Mat<T> grad_x, int64_t n, int64_t c, int64_t d,
                             int64_t dv, int32_t* flag) {
  const bool diag = dv == d;
  const int64_t total = n * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / d, j = e % d;
    const int64_t ci = cls[i];
    const double xv = static_cast<double>(x.at(i, j));
    const double xc = xv - static_cast<double>(offset[j]);
    double w = 0.0, p_own = 0.0, diff = 0.0;
    if (ci >= 0 && ci < c) {
      w = static_cast<double>(own[i]);
      p_own = lgm_precision(static_cast<double>(log_var.at(ci, diag ? j : 0)));
      diff = xv - static_cast<double>(means.at(ci, j));
    } else if (j == 0) {
      raise_flag(flag, kLgmBadLabel);
    }
    grad_x.at(i, j) = static_cast<T>(lgm_grad_x(xc, static_cast<double>(wp.at(i, diag ? j : 0)),
                                                static_cast<double>(wmp.at(i, j)), w, p_own, diff));
  }
}

__global__ void fill_sort_keys(const int64_t* cls, uint32_t* keys, int32_t* rows, int64_t n,
                               int64_t c) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ci = cls[i];
    keys[i] = static_cast<uint32_t>(ci >= 0 && ci < c ? ci : c);  // c: after every class
    rows[i] = static_cast<int32_t>(i);
  }
}

// First position q in the sorted keys with keys[q] >= v.
__device__ __forceinline__ int64_t lower_bound(const uint32_t* keys, int64_t n, uint32_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// One thread per (class, feature): the class's rows in sample order (the sort is stable) give
// the direct own-class sums, which with the GEMM terms give grad_means and (diagonal)
// grad_log_var; isotropic brackets go to `bracket` (C x D) for iso_log_var.
template <typename T>
__global__ void __launch_bounds__(kFeatThreads)
    class_grads(Mat<const T> x, Mat<const T> means, Mat<const T> log_var, const T* offset,
                const T* colsum, const T* grad_h, const T* own, const uint32_t* keys,
                const int32_t* rows, Mat<const T> wtx, Mat<const T> wtx2, Mat<T> grad_means,
                Mat<T> grad_log_var, double* bracket, int64_t n, int64_t c, int64_t d,
                int64_t dv) {
  const bool diag = dv == d;
  for (int64_t k = blockIdx.x; k < c; k += gridDim.x) {
    const int64_t lo = lower_bound(keys, n, static_cast<uint32_t>(k));
    const int64_t hi = lower_bound(keys, n, static_cast<uint32_t>(k + 1));
    const double cs = static_cast<double>(colsum[k]);
    const double gh = static_cast<double>(grad_h[k]);
    for (int64_t j = static_cast<int64_t>(blockIdx.y) * kFeatThreads + threadIdx.x; j < d;
         j += static_cast<int64_t>(gridDim.y) * kFeatThreads) {
      const double mu = static_cast<double>(means.at(k, j));
      double s1 = 0.0, s2 = 0.0;
      for (int64_t q = lo; q < hi; ++q) {
        const int64_t i = rows[q];
        const double w = static_cast<double>(own[i]);
        const double diff = static_cast<double>(x.at(i, j)) - mu;
        s1 += w * diff;
        s2 += w * diff * diff;
      }
      const double muc = mu - static_cast<double>(offset[j]);
      const double p = lgm_precision(static_cast<double>(log_var.at(k, diag ? j : 0)));
      const double tx = static_cast<double>(wtx.at(k, j));
      grad_means.at(k, j) = static_cast<T>(lgm_grad_mean(p, tx, muc, cs, s1));
      const double br = lgm_log_var_bracket(tx, muc, cs, s2);
      if (diag) {
        grad_log_var.at(k, j) =
            static_cast<T>(lgm_grad_log_var(p, static_cast<double>(wtx2.at(k, j)), br, 1.0, gh));
      } else {
        bracket[k * d + j] = br;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    iso_log_var(Mat<const T> log_var, const T* grad_h, Mat<const T> wtx2, const double* bracket,
                Mat<T> grad_log_var, int64_t c, int64_t d) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; k < c;
       k += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    double sum = 0.0;
    for (int64_t j = lane; j < d; j += kWarp) sum += bracket[k * d + j];
    sum = warp_sum(sum);
    if (lane == 0) {
      grad_log_var.at(k, 0) = static_cast<T>(
          lgm_grad_log_var(lgm_precision(static_cast<double>(log_var.at(k, 0))),
                           static_cast<double>(wtx2.at(k, 0)), sum, static_cast<double>(d),
                           static_cast<double>(grad_h[k])));
    }
  }
}

// --- host side -----------------------------------------------------------------------------

int64_t chunk_count(int64_t n) { return (n + kChunkRows - 1) / kChunkRows; }

// The backward workspace: the coefficient step's column partials, then (reusing the same bytes)
// the assembly step's sort buffers and isotropic brackets.
struct AssembleWorkspace {
  uint32_t* keys_in = nullptr;
  uint32_t* keys_out = nullptr;
  int32_t* rows_in = nullptr;
  int32_t* rows_out = nullptr;
  double* bracket = nullptr;
  void* sort_storage = nullptr;
  size_t total = 0;

  AssembleWorkspace(char* base, int64_t n, int64_t c, int64_t d, bool iso, size_t sort_bytes) {
    const size_t n32 = static_cast<size_t>(n) * 4;
    detail::WorkspaceCarver w(base);
    keys_in = static_cast<uint32_t*>(w.take(n32));
    keys_out = static_cast<uint32_t*>(w.take(n32));
    rows_in = static_cast<int32_t*>(w.take(n32));
    rows_out = static_cast<int32_t*>(w.take(n32));
    bracket = static_cast<double*>(w.take(iso ? static_cast<size_t>(c * d) * sizeof(double) : 0));
    sort_storage = w.take(sort_bytes);
    total = w.total();
  }
};

size_t coeff_workspace_bytes(int64_t n, int64_t c) {
  return align_up(static_cast<size_t>(2 * chunk_count(n) * c) * sizeof(double));
}

Status sort_storage_bytes(int64_t n, int64_t c, size_t* bytes) {
  *bytes = 0;
  if (n == 0) return Status::Ok();
  return detail::sort_storage_bytes(n, c, bytes);
}

Status check_matrix(const char* name, const DeviceMatrix& m, int64_t rows, int64_t cols,
                    DType dtype) {
  return detail::check_matrix(name, m, rows, cols, dtype, "the call's dtype");
}

Status check_vector(const char* name, const void* p, int64_t size) {
  if (p == nullptr && size > 0) return Status::InvalidArgument(std::string(name) + " is a null pointer");
  return Status::Ok();
}

Status check_dtype(const DeviceMatrix& ref) {
  if (ref.dtype == DType::kFloat32 || ref.dtype == DType::kFloat64) return Status::Ok();
  return Status::InvalidArgument(std::string("the L-GM CUDA kernels take float32 or float64, got ") +
                                 dtype_name(ref.dtype));
}

// means (C x D, C, D >= 1) and log_var (C x D or C x 1), one float dtype.
Status check_params(const DeviceMatrix& means, const DeviceMatrix& log_var) {
  Status s = check_dtype(means);
  if (!s.ok()) return s;
  s = lsoftmax::detail::check_lgm_param_shapes(means.rows, means.cols, log_var.rows,
                                               log_var.cols);
  if (!s.ok()) return s;
  s = check_matrix("means", means, means.rows, means.cols, means.dtype);
  if (s.ok()) s = check_matrix("log_var", log_var, log_var.rows, log_var.cols, means.dtype);
  return s;
}

Status check_x(const DeviceMatrix& x, const DeviceMatrix& means) {
  const Status s = lsoftmax::detail::check_lgm_features(x.cols, means.cols);
  return s.ok() ? check_matrix("x", x, x.rows, x.cols, means.dtype) : s;
}

Status check_labels(const DeviceLabels& labels, int64_t n) {
  if (labels.data == nullptr) return Status::Ok();  // no labels
  const Status s = lsoftmax::detail::check_label_count(labels.size, n);
  if (!s.ok()) return s;
  if (labels.stride < 0) return Status::InvalidArgument("labels has a negative stride");
  return Status::Ok();
}

// Calls f(T{}, L{}) for the element type and the label type (int64 when there are no labels).
template <typename F>
Status dispatch(DType dt, const DeviceLabels& labels, F&& f) {
  auto with_label = [&](auto t) -> Status {
    if (labels.data != nullptr && labels.type == LabelType::kInt32) return f(t, int32_t{});
    return f(t, int64_t{});
  };
  if (dt == DType::kFloat64) return with_label(double{});
  return with_label(float{});
}

}  // namespace

size_t lgm_class_terms_bytes(int64_t num_classes) {
  return static_cast<size_t>(3 * std::max<int64_t>(num_classes, 0)) * sizeof(double);
}

Status lgm_prepare(const DeviceMatrix& means, const DeviceMatrix& log_var, void* offset,
                   const DeviceMatrix& precision, const DeviceMatrix& scaled_means,
                   double* class_terms, int32_t* error_flag, void* stream) {
  Status s = check_params(means, log_var);
  if (s.ok()) s = check_matrix("precision", precision, log_var.rows, log_var.cols, means.dtype);
  if (s.ok()) s = check_matrix("scaled_means", scaled_means, means.rows, means.cols, means.dtype);
  if (s.ok()) s = check_vector("offset", offset, means.cols);
  if (s.ok()) s = check_vector("class_terms", class_terms, means.rows);
  if (!s.ok()) return s;
  const int64_t c = means.rows, d = means.cols, dv = log_var.cols;
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch(means.dtype, DeviceLabels{}, [&](auto tag, auto) -> Status {
    using T = decltype(tag);
    T* off = static_cast<T*>(offset);
    prepare_offset<T><<<blocks_for(d, kBlockThreads), kBlockThreads, 0, st>>>(mat<const T>(means),
                                                                              off, c, d);
    Status r = detail::launch_status("lsoftmax L-GM prepare (offset) kernel launch");
    if (!r.ok()) return r;
    prepare_params<T><<<blocks_for(c * d, kBlockThreads), kBlockThreads, 0, st>>>(
        mat<const T>(means), mat<const T>(log_var), off, mat<T>(precision), mat<T>(scaled_means),
        c, d, dv);
    r = detail::launch_status("lsoftmax L-GM prepare (parameters) kernel launch");
    if (!r.ok()) return r;
    prepare_class_terms<T><<<blocks_for(c, kWarpsPerBlock), kBlockThreads, 0, st>>>(
        mat<const T>(means), mat<const T>(log_var), off, class_terms, c, d, dv, error_flag);
    return detail::launch_status("lsoftmax L-GM prepare (class terms) kernel launch");
  });
}

Status lgm_center(const DeviceMatrix& x, const void* offset, const DeviceMatrix& xc,
                  const DeviceMatrix& xc_sq, void* stream) {
  Status s = check_dtype(x);
  if (s.ok()) s = check_matrix("x", x, x.rows, x.cols, x.dtype);
  if (s.ok()) s = check_matrix("xc", xc, x.rows, x.cols, x.dtype);
  const bool squares = xc_sq.rows != 0;
  if (s.ok() && squares) s = check_matrix("xc_sq", xc_sq, x.rows, x.cols, x.dtype);
  if (s.ok()) s = check_vector("offset", offset, x.cols);
  if (!s.ok()) return s;
  const int64_t n = x.rows, d = x.cols;
  if (n * d == 0) return Status::Ok();
  return dispatch(x.dtype, DeviceLabels{}, [&](auto tag, auto) -> Status {
    using T = decltype(tag);
    const DeviceMatrix sq = squares ? xc_sq : xc;  // not written without squares
    center_features<T><<<blocks_for(n * d, kBlockThreads), kBlockThreads, 0,
                         static_cast<cudaStream_t>(stream)>>>(
        mat<const T>(x), static_cast<const T*>(offset), mat<T>(xc), mat<T>(sq), squares, n, d);
    return detail::launch_status("lsoftmax L-GM centring kernel launch");
  });
}

Status lgm_forward(const DeviceMatrix& x, const DeviceMatrix& means, const DeviceMatrix& log_var,
                   const void* offset, const double* class_terms, const DeviceMatrix& sq_term,
                   const DeviceLabels& labels, const DeviceMatrix& logits, void* loglik,
                   double alpha, bool include_logdet, unsigned long long* n_direct,
                   int32_t* error_flag, void* stream) {
  Status s = validate_lgm_alpha(alpha);
  if (s.ok()) s = check_params(means, log_var);
  if (s.ok()) s = check_x(x, means);
  const int64_t n = x.rows, c = means.rows, d = means.cols, dv = log_var.cols;
  const bool diag = dv == d;
  if (s.ok()) s = check_matrix("logits", logits, n, c, means.dtype);
  if (s.ok() && diag) s = check_matrix("sq_term", sq_term, n, c, means.dtype);
  if (s.ok() && !diag && sq_term.rows != 0) {
    s = Status::InvalidArgument("sq_term must be empty for isotropic variances");
  }
  if (s.ok()) s = check_labels(labels, n);
  if (s.ok()) s = check_vector("offset", offset, d);
  if (s.ok()) s = check_vector("class_terms", class_terms, c);
  if (s.ok()) s = check_vector("loglik", loglik, n);
  if (!s.ok()) return s;
  if (n == 0) return Status::Ok();
  return dispatch(means.dtype, labels, [&](auto tag, auto ltag) -> Status {
    using T = decltype(tag);
    using L = decltype(ltag);
    const DeviceMatrix sq = diag ? sq_term : logits;  // isotropic: never read
    forward_rows<T, L><<<blocks_for(n, kWarpsPerBlock), kBlockThreads, 0,
                         static_cast<cudaStream_t>(stream)>>>(
        mat<const T>(x), mat<const T>(means), mat<const T>(log_var),
        static_cast<const T*>(offset), class_terms, mat<const T>(sq),
        static_cast<const L*>(labels.data), labels.stride, mat<T>(logits),
        static_cast<T*>(loglik), n, c, d, dv, alpha, include_logdet, n_direct, error_flag);
    return detail::launch_status("lsoftmax L-GM forward kernel launch");
  });
}

Status lgm_backward_workspace_size(int64_t n, int64_t num_classes, int64_t feat_dim,
                                   int64_t log_var_cols, size_t* bytes) {
  *bytes = 0;
  if (n < 0 || num_classes < 1 || feat_dim < 1) {
    return Status::InvalidArgument("lgm_backward_workspace_size: n must be >= 0 and "
                                   "num_classes, feat_dim >= 1");
  }
  if (n > INT_MAX || num_classes >= INT_MAX) {
    return Status::InvalidArgument(
        "the L-GM CUDA backward supports at most 2^31 - 1 rows and classes");
  }
  size_t sort_bytes = 0;
  const Status s = sort_storage_bytes(n, num_classes, &sort_bytes);
  if (!s.ok()) {
    const Status dev = device_status();  // "no driver" says more than CUB's "invalid device"
    return dev.ok() ? s : dev;
  }
  const bool iso = log_var_cols != feat_dim;
  *bytes = std::max(coeff_workspace_bytes(n, num_classes),
                    AssembleWorkspace(nullptr, n, num_classes, feat_dim, iso, sort_bytes).total);
  return Status::Ok();
}

Status lgm_backward_coeffs(const DeviceMatrix& grad_logits, const void* grad_loglik,
                           const DeviceMatrix& logits, const double* class_terms,
                           const DeviceLabels& labels, double alpha, bool include_logdet,
                           const DeviceMatrix& coeff, void* colsum, void* grad_h, void* own,
                           int64_t* cls, void* workspace, size_t workspace_bytes,
                           int32_t* error_flag, void* stream) {
  Status s = validate_lgm_alpha(alpha);
  if (s.ok()) s = check_dtype(grad_logits);
  const int64_t n = grad_logits.rows, c = grad_logits.cols;
  if (s.ok() && c < 1) s = Status::InvalidArgument("grad_logits must have at least one class");
  if (s.ok()) s = check_matrix("grad_logits", grad_logits, n, c, grad_logits.dtype);
  if (s.ok()) s = check_matrix("logits", logits, n, c, grad_logits.dtype);
  if (s.ok()) s = check_matrix("coeff", coeff, n, c, grad_logits.dtype);
  if (s.ok()) s = check_labels(labels, n);
  if (s.ok()) s = check_vector("class_terms", class_terms, c);
  if (s.ok()) s = check_vector("colsum", colsum, c);
  if (s.ok()) s = check_vector("grad_h", grad_h, c);
  if (s.ok()) s = check_vector("own", own, n);
  if (s.ok()) s = check_vector("cls", cls, n);
  const size_t need = coeff_workspace_bytes(n, c);
  if (s.ok() && n > 0 && (workspace == nullptr || workspace_bytes < need)) {
    s = Status::InvalidArgument("workspace has " + std::to_string(workspace_bytes) +
                                " bytes, the L-GM backward needs " + std::to_string(need) +
                                " (lgm_backward_workspace_size)");
  }
  if (s.ok() && reinterpret_cast<uintptr_t>(workspace) % kAlign != 0) {
    s = Status::InvalidArgument("workspace must be 256-byte aligned");
  }
  if (!s.ok()) return s;
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t nchunks = chunk_count(n);
  return dispatch(grad_logits.dtype, labels, [&](auto tag, auto ltag) -> Status {
    using T = decltype(tag);
    using L = decltype(ltag);
    auto* partial = static_cast<double*>(workspace);
    if (n > 0) {
      coeff_rows<T, L><<<blocks_for(n, kWarpsPerBlock), kBlockThreads, 0, st>>>(
          mat<const T>(grad_logits), static_cast<const T*>(grad_loglik), mat<const T>(logits),
          class_terms, static_cast<const L*>(labels.data), labels.stride, mat<T>(coeff),
          static_cast<T*>(own), cls, n, c, alpha, include_logdet, error_flag);
      Status r = detail::launch_status("lsoftmax L-GM backward coefficients kernel launch");
      if (!r.ok()) return r;
      const dim3 grid(static_cast<unsigned>((c + kColTile - 1) / kColTile),
                      static_cast<unsigned>(std::min<int64_t>(nchunks, 65535)));
      column_partials<T><<<grid, dim3(kColTile, kColRows), 0, st>>>(
          mat<const T>(coeff), mat<const T>(grad_logits), static_cast<const T*>(grad_loglik), cls,
          partial, n, c, nchunks, include_logdet);
      r = detail::launch_status("lsoftmax L-GM column sums kernel launch");
      if (!r.ok()) return r;
    }
    column_finish<T><<<blocks_for(c, kBlockThreads), kBlockThreads, 0, st>>>(
        partial, static_cast<T*>(colsum), static_cast<T*>(grad_h), c, nchunks);
    return detail::launch_status("lsoftmax L-GM column totals kernel launch");
  });
}

Status lgm_backward_assemble(const DeviceMatrix& x, const DeviceMatrix& means,
                             const DeviceMatrix& log_var, const void* offset, const void* colsum,
                             const void* grad_h, const void* own, const int64_t* cls,
                             const DeviceMatrix& wp, const DeviceMatrix& wmp,
                             const DeviceMatrix& wtx, const DeviceMatrix& wtx2,
                             const DeviceMatrix& grad_x, const DeviceMatrix& grad_means,
                             const DeviceMatrix& grad_log_var, void* workspace,
                             size_t workspace_bytes, int32_t* error_flag, void* stream) {
  Status s = check_params(means, log_var);
  if (s.ok()) s = check_x(x, means);
  const int64_t n = x.rows, c = means.rows, d = means.cols, dv = log_var.cols;
  const DType dt = means.dtype;
  if (s.ok()) s = check_matrix("wp", wp, n, dv, dt);
  if (s.ok()) s = check_matrix("wmp", wmp, n, d, dt);
  if (s.ok()) s = check_matrix("wtx", wtx, c, d, dt);
  if (s.ok()) s = check_matrix("wtx2", wtx2, c, dv, dt);
  if (s.ok()) s = check_matrix("grad_x", grad_x, n, d, dt);
  if (s.ok()) s = check_matrix("grad_means", grad_means, c, d, dt);
  if (s.ok()) s = check_matrix("grad_log_var", grad_log_var, c, dv, dt);
  if (s.ok()) s = check_vector("offset", offset, d);
  if (s.ok()) s = check_vector("colsum", colsum, c);
  if (s.ok()) s = check_vector("grad_h", grad_h, c);
  if (s.ok()) s = check_vector("own", own, n);
  if (s.ok()) s = check_vector("cls", cls, n);
  if (!s.ok()) return s;
  if (n > INT_MAX || c >= INT_MAX) {
    return Status::InvalidArgument(
        "the L-GM CUDA backward supports at most 2^31 - 1 rows and classes");
  }
  const bool diag = dv == d;
  size_t sort_bytes = 0;
  s = sort_storage_bytes(n, c, &sort_bytes);
  if (!s.ok()) return s;
  const size_t need = AssembleWorkspace(nullptr, n, c, d, !diag, sort_bytes).total;
  if (workspace_bytes < need || (need > 0 && workspace == nullptr)) {
    return Status::InvalidArgument("workspace has " + std::to_string(workspace_bytes) +
                                   " bytes, the L-GM backward needs " + std::to_string(need) +
                                   " (lgm_backward_workspace_size)");
  }
  if (reinterpret_cast<uintptr_t>(workspace) % kAlign != 0) {
    return Status::InvalidArgument("workspace must be 256-byte aligned");
  }
  AssembleWorkspace ws(static_cast<char*>(workspace), n, c, d, !diag, sort_bytes);
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch(dt, DeviceLabels{}, [&](auto tag, auto) -> Status {
    using T = decltype(tag);
    const T* off = static_cast<const T*>(offset);
    const T* own_t = static_cast<const T*>(own);
    if (n > 0) {
      grad_x_elems<T><<<blocks_for(n * d, kBlockThreads), kBlockThreads, 0, st>>>(
          mat<const T>(x), mat<const T>(means), mat<const T>(log_var), off, own_t, cls,
          mat<const T>(wp), mat<const T>(wmp), mat<T>(grad_x), n, c, d, dv, error_flag);
      Status r = detail::launch_status("lsoftmax L-GM grad_x kernel launch");
      if (!r.ok()) return r;
      fill_sort_keys<<<blocks_for(n, kBlockThreads), kBlockThreads, 0, st>>>(cls, ws.keys_in,
                                                                              ws.rows_in, n, c);
      r = detail::launch_status("lsoftmax L-GM sort keys kernel launch");
      if (!r.ok()) return r;
      size_t bytes = sort_bytes;
      r = detail::cuda_status(
          detail::sort_rows_by_class(ws.sort_storage, bytes, ws.keys_in, ws.keys_out,
                                     ws.rows_in, ws.rows_out, n, c, st),
          "cub::DeviceRadixSort");
      if (!r.ok()) return r;
    }
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(c, kMaxBlocks)),
                    static_cast<unsigned>(
                        std::min<int64_t>((d + kFeatThreads - 1) / kFeatThreads, 65535)));
    class_grads<T><<<grid, kFeatThreads, 0, st>>>(
        mat<const T>(x), mat<const T>(means), mat<const T>(log_var), off,
        static_cast<const T*>(colsum), static_cast<const T*>(grad_h), own_t, ws.keys_out,
        ws.rows_out, mat<const T>(wtx), mat<const T>(wtx2), mat<T>(grad_means),
        mat<T>(grad_log_var), ws.bracket, n, c, d, dv);
    Status r = detail::launch_status("lsoftmax L-GM class gradients kernel launch");
    if (!r.ok() || diag) return r;
    iso_log_var<T><<<blocks_for(c, kWarpsPerBlock), kBlockThreads, 0, st>>>(
        mat<const T>(log_var), static_cast<const T*>(grad_h), mat<const T>(wtx2), ws.bracket,
        mat<T>(grad_log_var), c, d);
    return detail::launch_status("lsoftmax L-GM isotropic log_var kernel launch");
  });
}

}  // namespace lsoftmax::cuda
