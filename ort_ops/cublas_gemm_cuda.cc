// See cublas_gemm_cuda.h. Why run-time lookup instead of linking: this CUDA install has no
// cuBLAS, and the handle we get from ONNX Runtime belongs to the libcublas its CUDA provider
// loaded; resolving our calls in that very library (whatever its CUDA major) avoids both a build
// dependency and a second, mismatched cuBLAS in the process.
#include "cublas_gemm_cuda.h"

#include <dlfcn.h>

#include <climits>
#include <string>

namespace lsoftmax_ort {
namespace {

// From cublas_api.h (stable C ABI): enums are ints, handles and streams are pointers.
constexpr int kCublasSuccess = 0;
constexpr int kOpN = 0, kOpT = 1;
constexpr int kPointerModeHost = 0;

using SgemmFn = int (*)(void*, int, int, int, int, int, const float*, const float*, int,
                        const float*, int, const float*, float*, int);
using DgemmFn = int (*)(void*, int, int, int, int, int, const double*, const double*, int,
                        const double*, int, const double*, double*, int);
using SetStreamFn = int (*)(void*, void*);
using GetPointerModeFn = int (*)(void*, int*);
using SetPointerModeFn = int (*)(void*, int);

struct Cublas {
  SgemmFn sgemm = nullptr;
  DgemmFn dgemm = nullptr;
  SetStreamFn set_stream = nullptr;
  GetPointerModeFn get_pointer_mode = nullptr;
  SetPointerModeFn set_pointer_mode = nullptr;
  std::string error;
};

template <typename F>
F symbol(void* lib, const char* name) {
  return reinterpret_cast<F>(dlsym(lib, name));
}

Cublas load() {
  Cublas c;
  void* lib = nullptr;
  const char* names[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so"};
  for (const char* name : names) {  // the copy ONNX Runtime already loaded
    lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
    if (lib != nullptr) break;
  }
  if (lib == nullptr && dlsym(RTLD_DEFAULT, "cublasSgemm_v2") != nullptr) lib = RTLD_DEFAULT;
  for (const char* name : names) {
    if (lib != nullptr) break;
    lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
  }
  if (lib == nullptr) {
    c.error = "libcublas is not loaded and could not be opened (onnxruntime-gpu loads it for "
              "the CUDA execution provider)";
    return c;
  }
  c.sgemm = symbol<SgemmFn>(lib, "cublasSgemm_v2");
  c.dgemm = symbol<DgemmFn>(lib, "cublasDgemm_v2");
  c.set_stream = symbol<SetStreamFn>(lib, "cublasSetStream_v2");
  c.get_pointer_mode = symbol<GetPointerModeFn>(lib, "cublasGetPointerMode_v2");
  c.set_pointer_mode = symbol<SetPointerModeFn>(lib, "cublasSetPointerMode_v2");
  if (!c.sgemm || !c.dgemm || !c.set_stream || !c.get_pointer_mode || !c.set_pointer_mode) {
    c.error = "libcublas lacks one of cublasSgemm_v2, cublasDgemm_v2, cublasSetStream_v2, "
              "cublasGet/SetPointerMode_v2";
  }
  return c;
}

const Cublas& cublas() {
  static const Cublas lib = load();
  return lib;
}

lsoftmax::Status failed(const char* what, int status) {
  return lsoftmax::Status::RuntimeError(std::string(what) + " failed with cublasStatus_t " +
                                        std::to_string(status));
}

}  // namespace

lsoftmax::Status gemm_xwt(void* handle, void* stream, bool double_precision, const void* x,
                          const void* w, void* y, int64_t n, int64_t d, int64_t c) {
  const Cublas& lib = cublas();
  if (!lib.error.empty()) return lsoftmax::Status::RuntimeError(lib.error);
  if (n > INT_MAX || d > INT_MAX || c > INT_MAX) {
    return lsoftmax::Status::InvalidArgument("dimensions above 2^31 - 1 are not supported");
  }
  // The handle is ORT's; it is bound to ORT's compute stream already, and set again here so the
  // GEMM is ordered with the margin kernel whatever the handle's history. Alpha and beta live on
  // the host, so host pointer mode is ensured for the call and the previous mode restored.
  int st = lib.set_stream(handle, stream);
  if (st != kCublasSuccess) return failed("cublasSetStream_v2", st);
  int mode = kPointerModeHost;
  st = lib.get_pointer_mode(handle, &mode);
  if (st != kCublasSuccess) return failed("cublasGetPointerMode_v2", st);
  if (mode != kPointerModeHost) {
    st = lib.set_pointer_mode(handle, kPointerModeHost);
    if (st != kCublasSuccess) return failed("cublasSetPointerMode_v2", st);
  }
  // Column-major view: Y^T (c x n) = op(W^T as d x c)^T * (X^T as d x n), i.e. OP_T on W, OP_N
  // on X, both with leading dimension d; Y^T has leading dimension c.
  const int m_ = static_cast<int>(c), n_ = static_cast<int>(n), k_ = static_cast<int>(d);
  if (double_precision) {
    const double one = 1.0, zero = 0.0;
    st = lib.dgemm(handle, kOpT, kOpN, m_, n_, k_, &one, static_cast<const double*>(w), k_,
                   static_cast<const double*>(x), k_, &zero, static_cast<double*>(y), m_);
  } else {
    const float one = 1.0f, zero = 0.0f;
    st = lib.sgemm(handle, kOpT, kOpN, m_, n_, k_, &one, static_cast<const float*>(w), k_,
                   static_cast<const float*>(x), k_, &zero, static_cast<float*>(y), m_);
  }
  if (mode != kPointerModeHost) (void)lib.set_pointer_mode(handle, mode);
  if (st != kCublasSuccess) return failed(double_precision ? "cublasDgemm_v2" : "cublasSgemm_v2", st);
  return lsoftmax::Status::Ok();
}

}  // namespace lsoftmax_ort
