// The L-GM part of lsoftmax._core: the core's assembly steps on numpy arrays. The caller (the
// numpy API in lsoftmax/lgm_core.py, the torch ops) runs the GEMMs between them; see lgm.h.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "array_views.h"
#include "bindings.h"
#include "caller_pool.h"
#include "cuda_args.h"
#include "scalar_args.h"
#include "lsoftmax/lgm.h"
#include "lsoftmax/schedules.h"
#ifdef LSOFTMAX_WITH_CUDA
#include "lsoftmax/lgm_cuda.h"
#endif

namespace lsoftmax::python {
namespace {

namespace py = pybind11;

template <typename F>
auto dispatch_float(FloatKind fk, F&& f) {
  if (fk == FloatKind::kFloat32) return f(float{});
  return f(double{});
}

// Labels are optional (None): the dispatch then uses int64 with a null view.
template <typename F>
auto dispatch_labels(const py::object& labels, F&& f) {
  if (labels.is_none()) return f(LabelView<int64_t>{});
  py::array arr = as_strided_input(py::array::ensure(labels));
  if (!arr) throw py::type_error("labels must be an integer array");
  const LabelKind lk = label_kind(arr);
  if (lk == LabelKind::kInt32) return f(label_view<int32_t>(arr));
  return f(label_view<int64_t>(arr));
}

// 1-D arrays: an input of the right dtype is made contiguous if it is not; an output must be.
template <typename T>
py::array_t<T> vector_in(const char* name, const py::array& a, int64_t size,
                         const py::array& ref, const char* ref_name) {
  require_ndim(name, a, 1);
  require_same_dtype(name, a, ref_name, ref);
  if (a.shape(0) != size) {
    throw py::value_error(std::string(name) + " has " + std::to_string(a.shape(0)) +
                          " entries, expected " + std::to_string(size));
  }
  return py::array_t<T, py::array::c_style>::ensure(a);
}

template <typename T>
T* vector_out(const char* name, py::array& a, int64_t size, const py::array& ref,
              const char* ref_name) {
  require_ndim(name, a, 1);
  require_same_dtype(name, a, ref_name, ref);
  if (a.shape(0) != size) {
    throw py::value_error(std::string(name) + " has " + std::to_string(a.shape(0)) +
                          " entries, expected " + std::to_string(size));
  }
  if (!a.writeable()) throw py::value_error(std::string(name) + " must be writeable");
  if (a.shape(0) > 1 && a.strides(0) != static_cast<py::ssize_t>(sizeof(T))) {
    throw py::value_error(std::string(name) + " must be contiguous");
  }
  return static_cast<T*>(a.mutable_data());
}

template <typename T>
py::array_t<T> new_matrix(int64_t rows, int64_t cols) {
  return py::array_t<T>({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(cols)});
}

py::object log_var_from_variances_py(py::array v_in) {
  py::array v = as_strided_input(v_in);
  return dispatch_float(float_kind("variances", v), [&](auto tag) -> py::object {
    using T = decltype(tag);
    auto vv = const_matrix<T>("variances", v);
    py::array out = new_matrix<T>(vv.rows, vv.cols);
    auto ov = mutable_matrix<T>("log_var", out);
    raise_if_error(lgm_log_var_from_variances<T>(vv, ov));
    return out;
  });
}

py::tuple prepare_py(py::array means_in, py::array lv_in, bool torch_pool) {
  require_torch_pool(torch_pool);
  py::array means = as_strided_input(means_in), lv = as_strided_input(lv_in);
  const FloatKind fk = float_kind("means", means);
  require_same_dtype("log_var", lv, "means", means);
  return dispatch_float(fk, [&](auto tag) -> py::tuple {
    using T = decltype(tag);
    auto mv = const_matrix<T>("means", means);
    auto lvv = const_matrix<T>("log_var", lv);
    py::array_t<T> offset(static_cast<py::ssize_t>(mv.cols));
    py::array prec = new_matrix<T>(lvv.rows, lvv.cols);
    py::array scaled = new_matrix<T>(mv.rows, mv.cols);
    auto pv = mutable_matrix<T>("precision", prec);
    auto sv = mutable_matrix<T>("scaled_means", scaled);
    Status s;
    {
      py::gil_scoped_release release;
      const CallerPool pool(torch_pool);
      s = lgm_prepare<T>(mv, lvv, offset.mutable_data(), pv, sv);
    }
    raise_if_error(s);
    return py::make_tuple(offset, prec, scaled);
  });
}

int64_t forward_py(py::array logits, py::array loglik, py::array x_in, py::array means_in,
                   py::array lv_in, py::array offset_in, py::object sq_obj, py::object labels,
                   py::object alpha_obj, bool include_logdet, bool torch_pool) {
  require_torch_pool(torch_pool);
  const double alpha = real_arg("alpha", alpha_obj);
  py::array x = as_strided_input(x_in), means = as_strided_input(means_in),
            lv = as_strided_input(lv_in);
  const FloatKind fk = float_kind("logits", logits);
  require_same_dtype("x", x, "logits", logits);
  require_same_dtype("means", means, "logits", logits);
  require_same_dtype("log_var", lv, "logits", logits);
  const bool has_sq = !sq_obj.is_none();
  py::array sq;
  if (has_sq) {
    sq = as_strided_input(py::array::ensure(sq_obj));
    if (!sq) throw py::type_error("sq_term must be an array or None");
    require_same_dtype("sq_term", sq, "logits", logits);
  }
  return dispatch_float(fk, [&](auto tag) -> int64_t {
    using T = decltype(tag);
    auto xv = const_matrix<T>("x", x);
    auto mv = const_matrix<T>("means", means);
    auto lvv = const_matrix<T>("log_var", lv);
    auto out = mutable_matrix<T>("logits", logits);
    auto off = vector_in<T>("offset", offset_in, mv.cols, logits, "logits");
    T* ll = vector_out<T>("loglik", loglik, xv.rows, logits, "logits");
    MatrixView<const T> sqv;
    if (has_sq) sqv = const_matrix<T>("sq_term", sq);
    return dispatch_labels(labels, [&](auto lview) -> int64_t {
      using L = std::remove_const_t<std::remove_pointer_t<decltype(lview.data)>>;
      int64_t n_direct = 0;
      Status s;
      {
        py::gil_scoped_release release;
        const CallerPool pool(torch_pool);
        s = lgm_forward<T, L>(xv, mv, lvv, off.data(), sqv, lview, out, ll, alpha,
                              include_logdet, &n_direct);
      }
      raise_if_error(s);
      return n_direct;
    });
  });
}

py::tuple backward_coeffs_py(py::array grad_in, py::object grad_ll_obj, py::array logits_in,
                             py::array lv_in, int64_t feat_dim, py::object labels,
                             py::object alpha_obj, bool include_logdet, bool torch_pool) {
  require_torch_pool(torch_pool);
  const double alpha = real_arg("alpha", alpha_obj);
  py::array grad = as_strided_input(grad_in), logits = as_strided_input(logits_in),
            lv = as_strided_input(lv_in);
  const FloatKind fk = float_kind("grad_logits", grad);
  require_same_dtype("logits", logits, "grad_logits", grad);
  require_same_dtype("log_var", lv, "grad_logits", grad);
  return dispatch_float(fk, [&](auto tag) -> py::tuple {
    using T = decltype(tag);
    auto gv = const_matrix<T>("grad_logits", grad);
    auto zv = const_matrix<T>("logits", logits);
    auto lvv = const_matrix<T>("log_var", lv);
    py::array_t<T> gll;
    if (!grad_ll_obj.is_none()) {
      gll = vector_in<T>("grad_loglik", py::array::ensure(grad_ll_obj), gv.rows, grad,
                         "grad_logits");
    }
    py::array coeff = new_matrix<T>(gv.rows, gv.cols);
    const auto c = static_cast<py::ssize_t>(gv.cols);
    py::array_t<T> colsum(c), grad_h(c);
    py::array_t<T> own(static_cast<py::ssize_t>(gv.rows));
    py::array_t<int64_t> cls(static_cast<py::ssize_t>(gv.rows));
    auto cv = mutable_matrix<T>("coeff", coeff);
    const T* gll_ptr = grad_ll_obj.is_none() ? nullptr : gll.data();
    dispatch_labels(labels, [&](auto lview) {
      using L = std::remove_const_t<std::remove_pointer_t<decltype(lview.data)>>;
      Status s;
      {
        py::gil_scoped_release release;
        const CallerPool pool(torch_pool);
        s = lgm_backward_coeffs<T, L>(gv, gll_ptr, zv, lvv, feat_dim, lview, alpha,
                                      include_logdet, cv, colsum.mutable_data(),
                                      grad_h.mutable_data(), own.mutable_data(),
                                      cls.mutable_data());
      }
      raise_if_error(s);
      return 0;
    });
    return py::make_tuple(coeff, colsum, grad_h, own, cls);
  });
}

py::tuple backward_assemble_py(py::array x_in, py::array means_in, py::array lv_in,
                               py::array offset_in, py::array colsum_in, py::array grad_h_in,
                               py::array own_in, py::array cls_in, py::array wp_in,
                               py::array wmp_in, py::array wtx_in, py::array wtx2_in,
                               bool torch_pool) {
  require_torch_pool(torch_pool);
  py::array x = as_strided_input(x_in), means = as_strided_input(means_in),
            lv = as_strided_input(lv_in), wp = as_strided_input(wp_in),
            wmp = as_strided_input(wmp_in), wtx = as_strided_input(wtx_in),
            wtx2 = as_strided_input(wtx2_in);
  const FloatKind fk = float_kind("x", x);
  for (const auto& [name, a] : {std::pair<const char*, py::array*>{"means", &means},
                                {"log_var", &lv},
                                {"wp", &wp},
                                {"wmp", &wmp},
                                {"wtx", &wtx},
                                {"wtx2", &wtx2}}) {
    require_same_dtype(name, *a, "x", x);
  }
  return dispatch_float(fk, [&](auto tag) -> py::tuple {
    using T = decltype(tag);
    auto xv = const_matrix<T>("x", x);
    auto mv = const_matrix<T>("means", means);
    auto lvv = const_matrix<T>("log_var", lv);
    auto off = vector_in<T>("offset", offset_in, mv.cols, x, "x");
    auto cs = vector_in<T>("colsum", colsum_in, mv.rows, x, "x");
    auto gh = vector_in<T>("grad_h", grad_h_in, mv.rows, x, "x");
    auto own = vector_in<T>("own", own_in, xv.rows, x, "x");
    require_ndim("cls", cls_in, 1);
    if (!cls_in.dtype().is(py::dtype::of<int64_t>()) || cls_in.shape(0) != xv.rows) {
      throw py::type_error("cls must be an int64 array of " + std::to_string(xv.rows) +
                           " entries");
    }
    auto cls = py::array_t<int64_t, py::array::c_style>::ensure(cls_in);
    auto wpv = const_matrix<T>("wp", wp);
    auto wmpv = const_matrix<T>("wmp", wmp);
    auto wtxv = const_matrix<T>("wtx", wtx);
    auto wtx2v = const_matrix<T>("wtx2", wtx2);
    py::array gx = new_matrix<T>(xv.rows, xv.cols);
    py::array gm = new_matrix<T>(mv.rows, mv.cols);
    py::array glv = new_matrix<T>(lvv.rows, lvv.cols);
    auto gxv = mutable_matrix<T>("grad_x", gx);
    auto gmv = mutable_matrix<T>("grad_means", gm);
    auto glvv = mutable_matrix<T>("grad_log_var", glv);
    Status s;
    {
      py::gil_scoped_release release;
      const CallerPool pool(torch_pool);
      s = lgm_backward_assemble<T>(xv, mv, lvv, off.data(), cs.data(), gh.data(), own.data(),
                                   cls.data(), wpv, wmpv, wtxv, wtx2v, gxv, gmv, glvv);
    }
    raise_if_error(s);
    return py::make_tuple(gx, gm, glv);
  });
}


// --- CUDA: device pointers, shapes and strides as ints (see cuda_args.h), a stream as an int.
// Vectors (offset, loglik, colsum, grad_h, own) are contiguous device buffers in the matrices'
// dtype, cls is int64, class_terms float64 (cuda_lgm_class_terms_bytes). No launcher syncs or
// allocates: the caller passes the error flag (a zeroed device int32; 0 = none) and workspace.

#ifdef LSOFTMAX_WITH_CUDA

namespace ca = cuda_args;

// Runs a launcher without the GIL and turns its Status into a Python exception.
template <typename F>
void launch(F&& f) {
  Status s;
  {
    py::gil_scoped_release release;
    s = f();
  }
  raise_if_error(s);
}

void cuda_prepare_py(const py::object& means, const py::object& log_var, uintptr_t offset,
                     const py::object& precision, const py::object& scaled_means,
                     uintptr_t class_terms, uintptr_t error_flag, uintptr_t stream) {
  const auto mv = ca::optional_matrix("means", means), lv = ca::optional_matrix("log_var", log_var);
  const auto pv = ca::optional_matrix("precision", precision);
  const auto sv = ca::optional_matrix("scaled_means", scaled_means);
  launch([&] {
    return cuda::lgm_prepare(mv, lv, ca::ptr(offset), pv, sv, ca::ptr<double>(class_terms),
                             ca::ptr<int32_t>(error_flag), ca::ptr(stream));
  });
}

void cuda_forward_py(const py::object& x, const py::object& means, const py::object& log_var,
                     uintptr_t offset, uintptr_t class_terms, const py::object& sq_term,
                     const py::object& labels, const py::object& logits, uintptr_t loglik,
                     double alpha, bool include_logdet, uintptr_t n_direct, uintptr_t error_flag,
                     uintptr_t stream) {
  const auto xv = ca::optional_matrix("x", x), mv = ca::optional_matrix("means", means);
  const auto lv = ca::optional_matrix("log_var", log_var);
  const auto sq = ca::optional_matrix("sq_term", sq_term);
  const auto zv = ca::optional_matrix("logits", logits);
  const auto yv = ca::optional_labels(labels);
  launch([&] {
    return cuda::lgm_forward(xv, mv, lv, ca::ptr<const void>(offset),
                             ca::ptr<const double>(class_terms), sq, yv, zv, ca::ptr(loglik),
                             alpha, include_logdet, ca::ptr<unsigned long long>(n_direct),
                             ca::ptr<int32_t>(error_flag), ca::ptr(stream));
  });
}

void cuda_backward_coeffs_py(const py::object& grad_logits, uintptr_t grad_loglik,
                             const py::object& logits, uintptr_t class_terms,
                             const py::object& labels, double alpha, bool include_logdet,
                             const py::object& coeff, uintptr_t colsum, uintptr_t grad_h,
                             uintptr_t own, uintptr_t cls, uintptr_t workspace,
                             size_t workspace_bytes, uintptr_t error_flag, uintptr_t stream) {
  const auto gv = ca::optional_matrix("grad_logits", grad_logits);
  const auto zv = ca::optional_matrix("logits", logits);
  const auto cv = ca::optional_matrix("coeff", coeff);
  const auto yv = ca::optional_labels(labels);
  launch([&] {
    return cuda::lgm_backward_coeffs(gv, ca::ptr<const void>(grad_loglik), zv,
                                     ca::ptr<const double>(class_terms), yv, alpha,
                                     include_logdet, cv, ca::ptr(colsum), ca::ptr(grad_h),
                                     ca::ptr(own), ca::ptr<int64_t>(cls), ca::ptr(workspace),
                                     workspace_bytes, ca::ptr<int32_t>(error_flag),
                                     ca::ptr(stream));
  });
}

void cuda_backward_assemble_py(const py::object& x, const py::object& means,
                               const py::object& log_var, uintptr_t offset, uintptr_t colsum,
                               uintptr_t grad_h, uintptr_t own, uintptr_t cls,
                               const py::object& wp, const py::object& wmp, const py::object& wtx,
                               const py::object& wtx2, const py::object& grad_x,
                               const py::object& grad_means, const py::object& grad_log_var,
                               uintptr_t workspace, size_t workspace_bytes, uintptr_t error_flag,
                               uintptr_t stream) {
  const auto xv = ca::optional_matrix("x", x), mv = ca::optional_matrix("means", means);
  const auto lv = ca::optional_matrix("log_var", log_var);
  const auto wpv = ca::optional_matrix("wp", wp), wmpv = ca::optional_matrix("wmp", wmp);
  const auto wtxv = ca::optional_matrix("wtx", wtx), wtx2v = ca::optional_matrix("wtx2", wtx2);
  const auto gx = ca::optional_matrix("grad_x", grad_x);
  const auto gm = ca::optional_matrix("grad_means", grad_means);
  const auto glv = ca::optional_matrix("grad_log_var", grad_log_var);
  launch([&] {
    return cuda::lgm_backward_assemble(
        xv, mv, lv, ca::ptr<const void>(offset), ca::ptr<const void>(colsum),
        ca::ptr<const void>(grad_h), ca::ptr<const void>(own), ca::ptr<const int64_t>(cls), wpv,
        wmpv, wtxv, wtx2v, gx, gm, glv, ca::ptr(workspace), workspace_bytes,
        ca::ptr<int32_t>(error_flag), ca::ptr(stream));
  });
}

size_t cuda_workspace_size_py(int64_t n, int64_t c, int64_t d, int64_t dv) {
  size_t bytes = 0;
  launch([&] { return cuda::lgm_backward_workspace_size(n, c, d, dv, &bytes); });
  return bytes;
}

size_t cuda_class_terms_bytes_py(int64_t c) { return cuda::lgm_class_terms_bytes(c); }

void bind_lgm_cuda(py::module_& m) {
  m.def("cuda_lgm_prepare", &cuda_prepare_py, py::arg("means"), py::arg("log_var"),
        py::arg("offset"), py::arg("precision"), py::arg("scaled_means"), py::arg("class_terms"),
        py::arg("error_flag") = 0, py::arg("stream") = 0,
        "On the device: offset (D), precision, scaled_means and the per-class terms, as "
        "lgm_prepare; a non-finite log_var ORs 2 into *error_flag.");
  m.def("cuda_lgm_forward_", &cuda_forward_py, py::arg("x"), py::arg("means"),
        py::arg("log_var"), py::arg("offset"), py::arg("class_terms"), py::arg("sq_term"),
        py::arg("labels"), py::arg("logits"), py::arg("loglik"), py::arg("alpha"),
        py::arg("include_logdet"), py::arg("n_direct") = 0, py::arg("error_flag") = 0,
        py::arg("stream") = 0,
        "In place on the device, as lgm_forward_: logits holds (x - offset) @ scaled_means.T. "
        "sq_term/labels may be None; a bad label ORs 1 into *error_flag; n_direct (a device "
        "uint64 or 0) counts the directly recomputed entries.");
  m.def("cuda_lgm_backward_coeffs", &cuda_backward_coeffs_py, py::arg("grad_logits"),
        py::arg("grad_loglik"), py::arg("logits"), py::arg("class_terms"), py::arg("labels"),
        py::arg("alpha"), py::arg("include_logdet"), py::arg("coeff"), py::arg("colsum"),
        py::arg("grad_h"), py::arg("own"), py::arg("cls"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("error_flag") = 0, py::arg("stream") = 0,
        "On the device, as lgm_backward_coeffs, into caller buffers.");
  m.def("cuda_lgm_backward_assemble", &cuda_backward_assemble_py, py::arg("x"), py::arg("means"),
        py::arg("log_var"), py::arg("offset"), py::arg("colsum"), py::arg("grad_h"),
        py::arg("own"), py::arg("cls"), py::arg("wp"), py::arg("wmp"), py::arg("wtx"),
        py::arg("wtx2"), py::arg("grad_x"), py::arg("grad_means"), py::arg("grad_log_var"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("error_flag") = 0,
        py::arg("stream") = 0, "On the device, as lgm_backward_assemble, into caller buffers.");
  m.def("cuda_lgm_backward_workspace_size", &cuda_workspace_size_py, py::arg("n"),
        py::arg("num_classes"), py::arg("feat_dim"), py::arg("log_var_cols"),
        "Bytes of device workspace the two L-GM backward launchers need (256-byte aligned).");
  m.def("cuda_lgm_class_terms_bytes", &cuda_class_terms_bytes_py, py::arg("num_classes"),
        "Bytes of the float64 class_terms buffer.");
}

#else  // no CUDA compiled in

void bind_lgm_cuda(py::module_& m) {
  for (const char* name :
       {"cuda_lgm_prepare", "cuda_lgm_forward_", "cuda_lgm_backward_coeffs",
        "cuda_lgm_backward_assemble", "cuda_lgm_backward_workspace_size",
        "cuda_lgm_class_terms_bytes"}) {
    m.def(name, [](const py::args&, const py::kwargs&) -> py::object {
      throw std::runtime_error(
          "lsoftmax was built without CUDA (no CUDA compiler was found at build time, or "
          "LSOFTMAX_CUDA=OFF); rebuild with LSOFTMAX_CUDA=ON and nvcc on the PATH to run the "
          "L-GM kernels on GPU tensors");
    });
  }
}

#endif

}  // namespace

void bind_lgm(pybind11::module_& m) {
  m.def("lgm_log_var_from_variances", &log_var_from_variances_py, py::arg("variances"),
        "log(variances), after checking every variance is finite and > 0.");
  m.def("lgm_prepare", &prepare_py, py::arg("means"), py::arg("log_var"),
        py::arg("torch_pool") = false,
        "(offset, precision, scaled_means): the common offset (mean of the class means), "
        "exp(-log_var) and (means - offset) * precision, for the host's GEMMs.");
  m.def("lgm_forward_", &forward_py, py::arg("logits"), py::arg("loglik"), py::arg("x"),
        py::arg("means"), py::arg("log_var"), py::arg("offset"), py::arg("sq_term"),
        py::arg("labels"), py::arg("alpha"), py::arg("include_logdet"),
        py::arg("torch_pool") = false,
        "In place: logits holds (x - offset) @ scaled_means.T and becomes the L-GM logits; "
        "loglik (N,) receives the log-likelihood of the label (or of the predicted class without "
        "labels). sq_term is (x - offset)**2 @ precision.T for diagonal variances, None for "
        "isotropic ones. Returns how many entries were recomputed from direct differences.");
  m.def("lgm_backward_coeffs", &backward_coeffs_py, py::arg("grad_logits"),
        py::arg("grad_loglik"), py::arg("logits"), py::arg("log_var"), py::arg("feat_dim"),
        py::arg("labels"), py::arg("alpha"), py::arg("include_logdet"),
        py::arg("torch_pool") = false,
        "(coeff, colsum, grad_h, own, cls): W = dL/dd (N, C) with each row's own-class entry "
        "moved to own (N,) (cls: that class), the column sums of the rest and dL/dh (C,).");
  m.def("lgm_backward_assemble", &backward_assemble_py, py::arg("x"), py::arg("means"),
        py::arg("log_var"), py::arg("offset"), py::arg("colsum"), py::arg("grad_h"),
        py::arg("own"), py::arg("cls"), py::arg("wp"), py::arg("wmp"), py::arg("wtx"),
        py::arg("wtx2"), py::arg("torch_pool") = false,
        "(grad_x, grad_means, grad_log_var) from coeff @ precision, coeff @ scaled_means, "
        "coeff.T @ (x - offset) and coeff.T @ (x - offset)**2 (isotropic: its row sums), plus "
        "the own-class terms from direct differences.");
  m.def("validate_lgm_alpha",
        [](py::object a) { raise_if_error(validate_lgm_alpha(real_arg("alpha", a))); },
        py::arg("alpha"));
  m.def("validate_lgm_lambda", [](double l) { raise_if_error(validate_lgm_lambda(l)); },
        py::arg("lambda_lkd"));
  m.def("stepup_value", [](double value, double gamma, int64_t step, double max_value,
                           int64_t it) {
    raise_if_error(validate_stepup(value, gamma, step, max_value));
    if (it < 0) throw py::value_error("it must be >= 0, got " + std::to_string(it));
    return stepup_value(value, gamma, step, max_value, it);
  }, py::arg("value"), py::arg("gamma"), py::arg("step"), py::arg("max_value"), py::arg("it"));
  bind_lgm_cuda(m);
}

}  // namespace lsoftmax::python
