// The label-range rule, worded once: every label in [0, num_classes), the first one outside named
// in the error. Header-only, so the adapters that check a host copy of the labels themselves (the
// CUDA-EP kernels of the ONNX Runtime library, the Python bindings' CUDA error path) report
// exactly what the CPU core reports.
#pragma once

#include <cstdint>
#include <string>

#include "lsoftmax/status.h"
#include "lsoftmax/views.h"

namespace lsoftmax {

template <typename L>
Status check_label_range(const LabelView<L>& labels, int64_t num_classes) {
  for (int64_t i = 0; i < labels.size; ++i) {
    const int64_t y = static_cast<int64_t>(labels[i]);
    if (y < 0 || y >= num_classes) {
      return Status::InvalidArgument("labels[" + std::to_string(i) + "] = " + std::to_string(y) +
                                     " is out of range [0, " + std::to_string(num_classes) + ")");
    }
  }
  return Status::Ok();
}

}  // namespace lsoftmax
