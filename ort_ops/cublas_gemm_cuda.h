// Y = X W^T on the CUDA EP with ONNX Runtime's own cuBLAS handle, cuBLAS resolved at run time.
//
// No cuBLAS headers or libraries are needed to build: the few entry points used are declared here
// and looked up in the libcublas that onnxruntime's CUDA provider has already loaded (by soname,
// RTLD_NOLOAD), so they are the same library instance that created ORT's handle.
#pragma once

#include <cstdint>

#include "lsoftmax/status.h"

namespace lsoftmax_ort {

// Row-major Y (n x c) = X (n x d) W (c x d)^T on `stream` with `cublas_handle` (a
// cublasHandle_t). double_precision selects Dgemm over Sgemm. Pointers are device pointers.
lsoftmax::Status gemm_xwt(void* cublas_handle, void* stream, bool double_precision,
                          const void* x, const void* w, void* y, int64_t n, int64_t d, int64_t c);

}  // namespace lsoftmax_ort
