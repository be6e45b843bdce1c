// Parsing of the CUDA entry points' raw arguments: a matrix is (ptr, rows, cols, row_stride,
// col_stride, dtype) and labels (ptr, size, stride, dtype), pointers as ints, strides in
// elements, dtypes by name. Shared by the bindings of the CUDA launchers (L-Softmax in
// cuda_bindings.cc, L-GM in lgm_bindings.cc). The spec types exist without CUDA too, for the
// stand-ins that raise.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

namespace lsoftmax::python::cuda_args {

using MatrixSpec = std::tuple<uintptr_t, int64_t, int64_t, int64_t, int64_t, std::string>;
using LabelSpec = std::tuple<uintptr_t, int64_t, int64_t, std::string>;

}  // namespace lsoftmax::python::cuda_args

#ifdef LSOFTMAX_WITH_CUDA

#include <pybind11/pybind11.h>

#include "lsoftmax/lsoftmax_cuda.h"

namespace lsoftmax::python::cuda_args {

inline cuda::DType dtype(const char* name, const std::string& s) {
  if (s == "float32") return cuda::DType::kFloat32;
  if (s == "float64") return cuda::DType::kFloat64;
  if (s == "float16") return cuda::DType::kFloat16;
  if (s == "bfloat16") return cuda::DType::kBFloat16;
  throw pybind11::type_error(std::string(name) +
                             " must be float32, float64, float16 or bfloat16, got " + s);
}

inline cuda::DeviceMatrix matrix(const char* name, const MatrixSpec& spec) {
  cuda::DeviceMatrix m;
  m.data = reinterpret_cast<void*>(std::get<0>(spec));
  m.rows = std::get<1>(spec);
  m.cols = std::get<2>(spec);
  m.row_stride = std::get<3>(spec);
  m.col_stride = std::get<4>(spec);
  m.dtype = dtype(name, std::get<5>(spec));
  if (m.rows < 0 || m.cols < 0) {
    throw pybind11::value_error(std::string(name) + " has a negative size");
  }
  return m;
}

inline cuda::DeviceLabels labels(const LabelSpec& spec) {
  cuda::DeviceLabels l;
  l.data = reinterpret_cast<const void*>(std::get<0>(spec));
  l.size = std::get<1>(spec);
  l.stride = std::get<2>(spec);
  const std::string& dt = std::get<3>(spec);
  if (dt == "int32") {
    l.type = cuda::LabelType::kInt32;
  } else if (dt == "int64") {
    l.type = cuda::LabelType::kInt64;
  } else {
    throw pybind11::type_error("labels must be int32 or int64, got " + dt);
  }
  return l;
}

// None -> no labels (a null view).
inline cuda::DeviceLabels optional_labels(const pybind11::object& spec) {
  if (spec.is_none()) return cuda::DeviceLabels{};
  return labels(spec.cast<LabelSpec>());
}

// None -> an empty matrix (rows = 0).
inline cuda::DeviceMatrix optional_matrix(const char* name, const pybind11::object& spec) {
  if (spec.is_none()) return cuda::DeviceMatrix{};
  return matrix(name, spec.cast<MatrixSpec>());
}

template <typename P = void>
P* ptr(uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

}  // namespace lsoftmax::python::cuda_args

#endif  // LSOFTMAX_WITH_CUDA
