// Host-side argument checks shared by the CPU (src/) and CUDA (cuda/) cores, so that every path
// words the same error the same way. Internal: not part of the installed headers.
#pragma once

#include <cstdint>
#include <string>

#include "lsoftmax/status.h"

namespace lsoftmax::detail {

inline std::string shape_str(int64_t rows, int64_t cols) {
  return "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
}

// `name` (rows x cols) must be want_rows x want_cols.
inline Status check_shape(const char* name, int64_t rows, int64_t cols, int64_t want_rows,
                          int64_t want_cols) {
  if (rows == want_rows && cols == want_cols) return Status::Ok();
  return Status::InvalidArgument(std::string(name) + " has shape " + shape_str(rows, cols) +
                                 ", expected " + shape_str(want_rows, want_cols));
}

inline Status check_label_count(int64_t labels, int64_t rows) {
  if (labels == rows) return Status::Ok();
  return Status::InvalidArgument("labels has " + std::to_string(labels) + " entries but x has " +
                                 std::to_string(rows) + " rows");
}

// L-GM parameters: means (C x D) with C, D >= 1 and log_var (C x D) or (C x 1).
inline Status check_lgm_param_shapes(int64_t c, int64_t d, int64_t log_var_rows,
                                     int64_t log_var_cols) {
  if (c < 1 || d < 1) {
    return Status::InvalidArgument("means must be (num_classes, feat_dim) with both >= 1, got " +
                                   shape_str(c, d));
  }
  if (log_var_rows != c || (log_var_cols != d && log_var_cols != 1)) {
    return Status::InvalidArgument("log_var has shape " + shape_str(log_var_rows, log_var_cols) +
                                   " but means has " + shape_str(c, d) +
                                   "; log_var must be (C, D) or (C, 1)");
  }
  return Status::Ok();
}

inline Status check_weight_features(int64_t x_cols, int64_t w_cols) {
  if (x_cols == w_cols) return Status::Ok();
  return Status::InvalidArgument("x has " + std::to_string(x_cols) +
                                 " features per row but weight has " + std::to_string(w_cols) +
                                 " (weight must be (num_classes, in_features))");
}

inline Status check_lgm_features(int64_t x_cols, int64_t means_cols) {
  if (x_cols == means_cols) return Status::Ok();
  return Status::InvalidArgument("x has " + std::to_string(x_cols) +
                                 " features per row but means has " + std::to_string(means_cols) +
                                 " (means must be (num_classes, feat_dim))");
}

}  // namespace lsoftmax::detail
