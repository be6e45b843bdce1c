// numpy arrays -> core views, with errors that name the argument.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "lsoftmax/status.h"
#include "lsoftmax/views.h"

namespace lsoftmax::python {

namespace py = pybind11;

enum class FloatKind { kFloat32, kFloat64 };
enum class LabelKind { kInt32, kInt64 };

inline std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

inline FloatKind float_kind(const char* name, const py::array& a) {
  if (a.dtype().is(py::dtype::of<float>())) return FloatKind::kFloat32;
  if (a.dtype().is(py::dtype::of<double>())) return FloatKind::kFloat64;
  throw py::type_error(std::string(name) + " must be float32 or float64, got " + dtype_name(a));
}

inline LabelKind label_kind(const py::array& a) {
  if (a.dtype().is(py::dtype::of<int32_t>())) return LabelKind::kInt32;
  if (a.dtype().is(py::dtype::of<int64_t>())) return LabelKind::kInt64;
  throw py::type_error("labels must be int32 or int64, got " + dtype_name(a));
}

inline void require_ndim(const char* name, const py::array& a, py::ssize_t ndim) {
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got " +
                          std::to_string(a.ndim()) + "-D");
  }
}

inline void require_same_dtype(const char* name, const py::array& a, const char* ref_name,
                               const py::array& ref) {
  if (!a.dtype().is(ref.dtype())) {
    throw py::type_error(std::string(name) + " has dtype " + dtype_name(a) + " but " + ref_name +
                         " has " + dtype_name(ref) + "; they must match");
  }
}

inline int64_t element_stride(const char* name, const py::array& a, int axis) {
  const py::ssize_t bytes = a.strides(axis);
  if (bytes % a.itemsize() != 0) {
    throw py::value_error(std::string(name) + " has a stride that is not a multiple of its item size");
  }
  return static_cast<int64_t>(bytes / a.itemsize());
}

template <typename T>
MatrixView<const T> const_matrix(const char* name, const py::array& a) {
  require_ndim(name, a, 2);
  return MatrixView<const T>{static_cast<const T*>(a.data()), a.shape(0), a.shape(1),
                             element_stride(name, a, 0), element_stride(name, a, 1)};
}

template <typename T>
MatrixView<T> mutable_matrix(const char* name, py::array& a) {
  require_ndim(name, a, 2);
  if (!a.writeable()) throw py::value_error(std::string(name) + " must be writeable");
  return MatrixView<T>{static_cast<T*>(a.mutable_data()), a.shape(0), a.shape(1),
                       element_stride(name, a, 0), element_stride(name, a, 1)};
}

template <typename L>
LabelView<L> label_view(const py::array& a) {
  require_ndim("labels", a, 1);
  return LabelView<L>{static_cast<const L*>(a.data()), a.shape(0), element_stride("labels", a, 0)};
}

// Strides that are not whole elements (rare views of structured arrays) are copied away;
// every ordinary strided view is used as it is.
inline py::array as_strided_input(const py::array& a) {
  for (py::ssize_t k = 0; k < a.ndim(); ++k) {
    if (a.strides(k) % a.itemsize() != 0) return py::array::ensure(a, py::array::c_style);
  }
  return a;
}

inline void raise_if_error(const Status& s) {
  if (s.ok()) return;
  if (s.code() == Status::Code::kInvalidArgument) throw py::value_error(s.message());
  throw std::runtime_error(s.message());
}

}  // namespace lsoftmax::python
