// Python scalars handed to the core (margin, lambda, alpha): one place that decides what is
// accepted, so that every binding rejects the same inputs with the same message naming the
// argument (instead of pybind11's "incompatible function arguments").
#pragma once

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "lsoftmax/lsoftmax.h"

namespace lsoftmax::python {

// numpy.bool_ is no int subclass but converts like one; a flag is never a number here.
inline bool is_bool_like(const pybind11::handle& h) {
  if (PyBool_Check(h.ptr())) return true;
  const char* tp = Py_TYPE(h.ptr())->tp_name;
  return std::strcmp(tp, "numpy.bool") == 0 || std::strcmp(tp, "numpy.bool_") == 0;
}

inline std::string type_of(const pybind11::handle& h) { return Py_TYPE(h.ptr())->tp_name; }

// An integer margin: a Python int or anything with __index__ (numpy integers), not a bool or a
// float. Values beyond int64 are reported with the core's range message.
inline int64_t margin_arg(const pybind11::handle& margin) {
  if (is_bool_like(margin) || !PyIndex_Check(margin.ptr())) {
    throw pybind11::type_error("margin must be an int, got " + type_of(margin));
  }
  pybind11::object as_int =
      pybind11::reinterpret_steal<pybind11::object>(PyNumber_Index(margin.ptr()));
  if (!as_int) throw pybind11::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(as_int.ptr(), &overflow);
  if (overflow != 0) {  // the core's range message, with the value as a double
    MarginSpec spec;
    spec.margin = PyLong_AsDouble(as_int.ptr());
    if (spec.margin == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      spec.margin = overflow > 0 ? HUGE_VAL : -HUGE_VAL;
    }
    throw pybind11::value_error(validate_margin_spec(spec, 0.0).message());
  }
  if (v == -1 && PyErr_Occurred()) throw pybind11::error_already_set();
  return static_cast<int64_t>(v);
}

// A real number (int, float, numpy scalar): not a bool, a string or a complex. The range is
// the core's to check.
inline double real_arg(const char* name, const pybind11::handle& value) {
  if (is_bool_like(value) || PyComplex_Check(value.ptr()) ||
      !(PyFloat_Check(value.ptr()) || PyIndex_Check(value.ptr()) ||
        PyObject_HasAttrString(value.ptr(), "__float__"))) {
    throw pybind11::type_error(std::string(name) + " must be a real number, got " +
                               type_of(value));
  }
  const double v = PyFloat_AsDouble(value.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw pybind11::value_error(std::string(name) + " must be a real number representable as a "
                                "float64, got " + pybind11::repr(value).cast<std::string>());
  }
  return v;
}

}  // namespace lsoftmax::python
