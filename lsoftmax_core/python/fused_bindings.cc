// lsoftmax._core's entry points for the fused margin cross-entropy's per-block kernels: numpy
// arrays for the CPU (in place, GIL released), raw device pointers for CUDA (as in
// cuda_bindings.cc; without CUDA compiled in they raise a RuntimeError that says so).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "array_views.h"
#include "bindings.h"
#include "caller_pool.h"
#include "cuda_args.h"
#include "lsoftmax/fused.h"
#include "lsoftmax/fused_cuda.h"  // declarations only: the launchers exist with CUDA

namespace py = pybind11;

namespace lsoftmax::python {
namespace {

// A contiguous 1-D array of n entries of E (writeable when `out`), named in errors.
template <typename E>
E* vector_of(const char* name, const py::array& a, int64_t n, bool out) {
  if (!a.dtype().is(py::dtype::of<E>())) {
    throw py::type_error(std::string(name) + " has dtype " + dtype_name(a) + ", expected " +
                         py::str(py::dtype::of<E>()).cast<std::string>());
  }
  if (a.ndim() != 1 || a.shape(0) != n || !(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be a contiguous 1-D array of " +
                          std::to_string(n) + " entries");
  }
  if (out && !a.writeable()) throw py::value_error(std::string(name) + " must be writeable");
  return static_cast<E*>(const_cast<void*>(a.data()));
}

// Dispatch on (block dtype, label dtype).
template <typename F>
void dispatch(const py::array& block, const py::array& labels, F&& f) {
  const FloatKind fk = float_kind("block", block);
  const LabelKind lk = label_kind(labels);
  auto with_label = [&](auto t_tag) {
    if (lk == LabelKind::kInt32) return f(t_tag, int32_t{});
    return f(t_tag, int64_t{});
  };
  if (fk == FloatKind::kFloat32) return with_label(float{});
  return with_label(double{});
}

void lse_block_py(py::array block, py::array labels_in, int64_t class_begin,
                  py::array target_logit, py::array row_max, py::array row_sum,
                  bool torch_pool) {
  require_torch_pool(torch_pool);
  py::array labels = as_strided_input(labels_in);
  dispatch(block, labels, [&](auto t_tag, auto l_tag) {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    auto bv = mutable_matrix<T>("block", block);
    auto lv = label_view<L>(labels);
    const T* tl = vector_of<T>("target_logit", target_logit, bv.rows, false);
    double* mx = vector_of<double>("row_max", row_max, bv.rows, true);
    double* sm = vector_of<double>("row_sum", row_sum, bv.rows, true);
    Status s;
    {
      py::gil_scoped_release release;
      const CallerPool pool(torch_pool);
      s = fused_lse_block<T, L>(bv, lv, class_begin, tl, mx, sm);
    }
    raise_if_error(s);
  });
}

void grad_block_py(py::array block, py::array labels_in, int64_t class_begin,
                   py::array target_logit, py::array lse, py::array scale, bool torch_pool) {
  require_torch_pool(torch_pool);
  py::array labels = as_strided_input(labels_in);
  dispatch(block, labels, [&](auto t_tag, auto l_tag) {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    auto bv = mutable_matrix<T>("block", block);
    auto lv = label_view<L>(labels);
    const T* tl = vector_of<T>("target_logit", target_logit, bv.rows, false);
    const double* ls = vector_of<double>("lse", lse, bv.rows, false);
    const T* sc = vector_of<T>("scale", scale, bv.rows, false);
    Status s;
    {
      py::gil_scoped_release release;
      const CallerPool pool(torch_pool);
      s = fused_grad_block<T, L>(bv, lv, class_begin, tl, ls, sc);
    }
    raise_if_error(s);
  });
}

#ifdef LSOFTMAX_WITH_CUDA
void cuda_lse_block_py(const cuda_args::MatrixSpec& block, const cuda_args::LabelSpec& labels,
                       int64_t class_begin, uintptr_t target_logit, uintptr_t row_max,
                       uintptr_t row_sum, uintptr_t stream) {
  const auto bv = cuda_args::matrix("block", block);
  const auto lv = cuda_args::labels(labels);
  Status s;
  {
    py::gil_scoped_release release;
    s = cuda::fused_lse_block(bv, lv, class_begin, cuda_args::ptr(target_logit),
                              cuda_args::ptr<double>(row_max), cuda_args::ptr<double>(row_sum),
                              cuda_args::ptr(stream));
  }
  raise_if_error(s);
}

void cuda_grad_block_py(const cuda_args::MatrixSpec& block, const cuda_args::LabelSpec& labels,
                        int64_t class_begin, uintptr_t target_logit, uintptr_t lse,
                        uintptr_t scale, uintptr_t stream) {
  const auto bv = cuda_args::matrix("block", block);
  const auto lv = cuda_args::labels(labels);
  Status s;
  {
    py::gil_scoped_release release;
    s = cuda::fused_grad_block(bv, lv, class_begin, cuda_args::ptr(target_logit),
                               cuda_args::ptr<const double>(lse), cuda_args::ptr(scale),
                               cuda_args::ptr(stream));
  }
  raise_if_error(s);
}
#else
[[noreturn]] void no_cuda() {
  throw std::runtime_error("lsoftmax was built without CUDA (rebuild with LSOFTMAX_CUDA=ON)");
}
void cuda_lse_block_py(const cuda_args::MatrixSpec&, const cuda_args::LabelSpec&, int64_t,
                       uintptr_t, uintptr_t, uintptr_t, uintptr_t) {
  no_cuda();
}
void cuda_grad_block_py(const cuda_args::MatrixSpec&, const cuda_args::LabelSpec&, int64_t,
                        uintptr_t, uintptr_t, uintptr_t, uintptr_t) {
  no_cuda();
}
#endif

}  // namespace

void bind_fused(py::module_& m) {
  m.def("fused_lse_block_", &lse_block_py, py::arg("block"), py::arg("labels"),
        py::arg("class_begin"), py::arg("target_logit"), py::arg("row_max"), py::arg("row_sum"),
        py::arg("torch_pool") = false,
        "In place: block holds x @ W[class_begin:class_begin+B].T; the target entries become "
        "target_logit and row_max / row_sum (float64) absorb the block's log-sum-exp.");
  m.def("fused_grad_block_", &grad_block_py, py::arg("block"), py::arg("labels"),
        py::arg("class_begin"), py::arg("target_logit"), py::arg("lse"), py::arg("scale"),
        py::arg("torch_pool") = false,
        "In place: block holds x @ W[class_begin:class_begin+B].T; on return it holds "
        "scale * (softmax - onehot) of the margin logits, given each row's log-sum-exp.");
  m.def("cuda_fused_lse_block_", &cuda_lse_block_py, py::arg("block"), py::arg("labels"),
        py::arg("class_begin"), py::arg("target_logit"), py::arg("row_max"), py::arg("row_sum"),
        py::arg("stream") = 0);
  m.def("cuda_fused_grad_block_", &cuda_grad_block_py, py::arg("block"), py::arg("labels"),
        py::arg("class_begin"), py::arg("target_logit"), py::arg("lse"), py::arg("scale"),
        py::arg("stream") = 0);
}

}  // namespace lsoftmax::python
