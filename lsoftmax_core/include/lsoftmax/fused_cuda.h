// The fused margin cross-entropy's per-block kernels on CUDA devices (see lsoftmax/fused.h for
// what they compute; same contract as lsoftmax_cuda.h: asynchronous on `stream`, no device
// allocation, host-side checks come back as InvalidArgument before any launch). float32 and
// float64 blocks; target_logit and scale have the block's dtype, row_max, row_sum and lse are
// float64. Defined only when the core is built with CUDA.
#pragma once

#include <cstdint>

#include "lsoftmax/lsoftmax_cuda.h"
#include "lsoftmax/status.h"

namespace lsoftmax::cuda {

Status fused_lse_block(const DeviceMatrix& block, const DeviceLabels& labels,
                       int64_t class_begin, const void* target_logit, double* row_max,
                       double* row_sum, void* stream);

Status fused_grad_block(const DeviceMatrix& block, const DeviceLabels& labels,
                        int64_t class_begin, const void* target_logit, const double* lse,
                        const void* scale, void* stream);

}  // namespace lsoftmax::cuda
