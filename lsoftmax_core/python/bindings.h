// Each part of lsoftmax._core binds itself in its own file; module.cc calls them all.
#pragma once

#include <pybind11/pybind11.h>

namespace lsoftmax::python {

void bind_lgm(pybind11::module_& m);   // lgm_bindings.cc
void bind_cuda(pybind11::module_& m);  // cuda_bindings.cc
void bind_fused(pybind11::module_& m);  // fused_bindings.cc
void bind_caller_pool(pybind11::module_& m);  // caller_pool.cc
void bind_family(pybind11::module_& m);  // family_bindings.cc

}  // namespace lsoftmax::python
