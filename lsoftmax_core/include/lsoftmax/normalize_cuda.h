// Row normalization on the device: the CUDA side of lsoftmax::normalize_rows (lsoftmax.h), for
// hosts that compute the margin family's plain logits with their own GEMM (the ONNX Runtime
// CUDA EP). Separate from lsoftmax_cuda.h so that it can be included without the rest.
#pragma once

#include "lsoftmax/lsoftmax_cuda.h"

namespace lsoftmax::cuda {

// out[i] = scale * in[i] / max(|in[i]|, eps) with eps = degenerate_norm of the dtype (float32 or
// float64; the norm accumulates in double), as the CPU normalize_rows (there scale = 1). `out`
// has in's shape and may be `in`. One warp per row, on `stream`.
Status normalize_rows(const DeviceMatrix& in, const DeviceMatrix& out, double scale, void* stream);

}  // namespace lsoftmax::cuda
