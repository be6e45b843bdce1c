// lsoftmax._core's entry points for the margin family: the one validation rule of a margin spec,
// the per-row target math on numpy arrays and the row normalization (GIL released).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "array_views.h"
#include "bindings.h"
#include "caller_pool.h"
#include "cuda_args.h"
#include "scalar_args.h"
#include "../src/checks.h"
#include "lsoftmax/labels.h"
#include "lsoftmax/lsoftmax.h"
#include "lsoftmax/lsoftmax_cuda.h"  // declarations only: the launchers exist with CUDA

namespace py = pybind11;

namespace lsoftmax::python {

MarginSpec margin_spec_of(const std::string& kind, const std::vector<double>& params) {
  MarginSpec spec;
  raise_if_error(make_margin_spec(kind.c_str(), params.data(),
                                  static_cast<int64_t>(params.size()), &spec));
  return spec;
}

namespace {

// The spec from Python values of any type: the psi kinds' margin must be an int (margin_arg),
// the other numbers real (real_arg), easy_margin a bool; then the core's range rule.
std::vector<double> margin_params_py(const std::string& kind, py::object margin, py::object m1,
                                     py::object m2, py::object m3, py::object scale,
                                     py::object easy_margin, py::object lam) {
  MarginKind k;
  raise_if_error(parse_margin_kind(kind.c_str(), &k));
  const double margin_v = kind_properties(k).uses_lambda
                              ? static_cast<double>(margin_arg(margin))
                              : real_arg("m", margin);
  if (!PyBool_Check(easy_margin.ptr()) && !is_bool_like(easy_margin)) {
    throw py::type_error("easy_margin must be a bool, got " + type_of(easy_margin));
  }
  std::vector<double> params = {margin_v,
                                real_arg("m1", m1),
                                real_arg("m2", m2),
                                real_arg("m3", m3),
                                real_arg("s", scale),
                                easy_margin.cast<bool>() ? 1.0 : 0.0};
  const MarginSpec spec = margin_spec_of(kind, params);
  raise_if_error(validate_margin_spec(spec, real_arg("lam", lam)));
  return params;
}

py::tuple targets_py(const std::string& kind, const std::vector<double>& params,
                     py::object lam_obj, py::array cos_in, bool torch_pool) {
  require_torch_pool(torch_pool);
  const MarginSpec spec = margin_spec_of(kind, params);
  const double lam = real_arg("lam", lam_obj);
  const FloatKind fk = float_kind("cos_theta", cos_in);
  require_ndim("cos_theta", cos_in, 1);
  auto run = [&](auto tag) -> py::tuple {
    using T = decltype(tag);
    py::array_t<T, py::array::c_style | py::array::forcecast> c(cos_in);
    const int64_t n = c.shape(0);
    py::array_t<T> phi(n), dphi(n);
    Status s;
    {
      py::gil_scoped_release release;
      const CallerPool pool(torch_pool);
      s = margin_family_targets<T>(spec, lam, c.data(), n, phi.mutable_data(),
                                   dphi.mutable_data());
    }
    raise_if_error(s);
    return py::make_tuple(phi, dphi);
  };
  if (fk == FloatKind::kFloat32) return run(float{});
  return run(double{});
}

void family_forward_py(py::array logits, py::array x_in, py::array w_in, py::array labels_in,
                       const std::string& kind, const std::vector<double>& params,
                       py::object lam_obj) {
  const MarginSpec spec = margin_spec_of(kind, params);
  const double lam = real_arg("lam", lam_obj);
  const FloatKind fk = float_kind("logits", logits);
  py::array x = as_strided_input(x_in), w = as_strided_input(w_in),
            labels = as_strided_input(labels_in);
  require_same_dtype("x", x, "logits", logits);
  require_same_dtype("weight", w, "logits", logits);
  const LabelKind lk = label_kind(labels);
  auto run = [&](auto t_tag, auto l_tag) {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    auto xv = const_matrix<T>("x", x);
    auto wv = const_matrix<T>("weight", w);
    auto lv = label_view<L>(labels);
    auto out = mutable_matrix<T>("logits", logits);
    Status s;
    {
      py::gil_scoped_release release;
      s = margin_family_forward<T, L>(spec, lam, xv, wv, lv, out);
    }
    raise_if_error(s);
  };
  if (fk == FloatKind::kFloat32) {
    if (lk == LabelKind::kInt32) return run(float{}, int32_t{});
    return run(float{}, int64_t{});
  }
  if (lk == LabelKind::kInt32) return run(double{}, int32_t{});
  run(double{}, int64_t{});
}

Status detail_check_labels(const py::array& labels, LabelKind lk, int64_t rows,
                           int64_t num_classes) {
  if (Status s = detail::check_label_count(labels.shape(0), rows); !s.ok()) return s;
  if (lk == LabelKind::kInt32) return check_label_range(label_view<int32_t>(labels), num_classes);
  return check_label_range(label_view<int64_t>(labels), num_classes);
}

py::tuple normalize_py(py::array in_arr) {
  py::array a = as_strided_input(in_arr);
  const FloatKind fk = float_kind("a", a);
  auto run = [&](auto tag) -> py::tuple {
    using T = decltype(tag);
    auto v = const_matrix<T>("a", a);
    py::array_t<T> out({v.rows, v.cols}), norms(v.rows);
    auto ov = MatrixView<T>::contiguous(out.mutable_data(), v.rows, v.cols);
    Status s;
    {
      py::gil_scoped_release release;
      s = normalize_rows<T>(v, ov, norms.mutable_data());
    }
    raise_if_error(s);
    return py::make_tuple(out, norms);
  };
  if (fk == FloatKind::kFloat32) return run(float{});
  return run(double{});
}

// The CUDA launchers: raw device pointers and a stream as ints (see cuda_bindings.cc).
void cuda_targets_py(const std::string& kind, const std::vector<double>& params, double lam,
                     uintptr_t cos_theta, int64_t n, const std::string& dtype, uintptr_t phi,
                     uintptr_t dphi, uintptr_t stream, uintptr_t lam_ptr, uintptr_t error_flag) {
  const MarginSpec spec = margin_spec_of(kind, params);
#ifdef LSOFTMAX_WITH_CUDA
  Status s;
  {
    py::gil_scoped_release release;
    s = cuda::margin_family_targets(spec, lam, cuda_args::ptr<const void>(cos_theta), n,
                                    cuda_args::dtype("cos_theta", dtype), cuda_args::ptr(phi),
                                    cuda_args::ptr(dphi), cuda_args::ptr<int32_t>(error_flag),
                                    cuda_args::ptr(stream), cuda_args::ptr<const double>(lam_ptr));
  }
  raise_if_error(s);
#else
  (void)spec, (void)lam, (void)cos_theta, (void)n, (void)dtype, (void)phi, (void)dphi;
  (void)stream, (void)lam_ptr, (void)error_flag;
  throw std::runtime_error("lsoftmax was built without CUDA (LSOFTMAX_CUDA=OFF or no nvcc)");
#endif
}

void cuda_forward_py(const cuda_args::MatrixSpec& logits, const cuda_args::MatrixSpec& x,
                     const cuda_args::MatrixSpec& w, const cuda_args::LabelSpec& labels,
                     const std::string& kind, const std::vector<double>& params, double lam,
                     uintptr_t error_flag, uintptr_t stream, uintptr_t lam_ptr) {
  const MarginSpec spec = margin_spec_of(kind, params);
#ifdef LSOFTMAX_WITH_CUDA
  const cuda::DeviceMatrix lv = cuda_args::matrix("logits", logits);
  const cuda::DeviceMatrix xv = cuda_args::matrix("x", x);
  const cuda::DeviceMatrix wv = cuda_args::matrix("weight", w);
  const cuda::DeviceLabels yv = cuda_args::labels(labels);
  Status s;
  {
    py::gil_scoped_release release;
    s = cuda::margin_family_forward(spec, lam, lv, xv, wv, yv,
                                    cuda_args::ptr<int32_t>(error_flag), cuda_args::ptr(stream),
                                    cuda_args::ptr<const double>(lam_ptr));
  }
  raise_if_error(s);
#else
  (void)spec, (void)logits, (void)x, (void)w, (void)labels, (void)lam, (void)error_flag;
  (void)stream, (void)lam_ptr;
  throw std::runtime_error("lsoftmax was built without CUDA (LSOFTMAX_CUDA=OFF or no nvcc)");
#endif
}

}  // namespace

void bind_family(py::module_& m) {
  m.def("cuda_margin_family_targets_", &cuda_targets_py, py::arg("kind"), py::arg("params"),
        py::arg("lam"), py::arg("cos_theta"), py::arg("n"), py::arg("dtype"), py::arg("phi"),
        py::arg("dphi"), py::arg("stream") = 0, py::arg("lam_ptr") = 0,
        py::arg("error_flag") = 0,
        "On the device, no sync: phi/dphi (device arrays of n float32/float64) = the kind's "
        "target function and derivative at cos_theta. lam_ptr: a device float64 lambda.");
  m.def("cuda_margin_family_forward_", &cuda_forward_py, py::arg("logits"), py::arg("x"),
        py::arg("weight"), py::arg("labels"), py::arg("kind"), py::arg("params"), py::arg("lam"),
        py::arg("error_flag") = 0, py::arg("stream") = 0, py::arg("lam_ptr") = 0,
        "In place on the device: logits holds the kind's plain logits of the RAW x and weight; "
        "rewrites each row's target logit (matrices and labels as cuda_margin_forward_).");
  m.def("margin_params", &margin_params_py, py::arg("kind"), py::arg("margin"), py::arg("m1"),
        py::arg("m2"), py::arg("m3"), py::arg("scale"), py::arg("easy_margin"),
        py::arg("lam") = 0.0,
        "The flat parameters [margin, m1, m2, m3, scale, easy_margin] of a margin spec after the "
        "core's checks (types, ranges); raises TypeError/ValueError naming the argument.");
  m.def("validate_margin_spec", [](const std::string& kind, const std::vector<double>& params,
                                   py::object lam) {
    raise_if_error(validate_margin_spec(margin_spec_of(kind, params), real_arg("lam", lam)));
  }, py::arg("kind"), py::arg("params"), py::arg("lam") = 0.0,
     "The core's rule for a spec given as its kind and flat params (ValueError naming it).");
  m.def("margin_family_targets", &targets_py, py::arg("kind"), py::arg("params"), py::arg("lam"),
        py::arg("cos_theta"), py::arg("torch_pool") = false,
        "(phi, dphi): the kind's target function phi(c) and its derivative at each cosine c "
        "(clamped to [-1, 1]); the margin target logit of a row is a_i * phi(c_i). "
        "torch_pool: run the loop on torch's intra-op pool (lsoftmax.torch's calls).");
  m.def("margin_family_forward_", &family_forward_py, py::arg("logits"), py::arg("x"),
        py::arg("weight"), py::arg("labels"), py::arg("kind"), py::arg("params"), py::arg("lam"),
        "In place: logits holds the kind's plain logits of the RAW x and weight; the target "
        "logit of each row becomes the margin logit.");
  m.def("normalize_rows", &normalize_py, py::arg("a"),
        "(a / max(|a_i|, eps) row by row, |a_i|) with eps the core's degenerate-norm threshold.");
  m.def("check_labels", [](py::array labels_in, int64_t rows, int64_t num_classes) {
    py::array labels = as_strided_input(labels_in);
    const LabelKind lk = label_kind(labels);
    require_ndim("labels", labels, 1);
    raise_if_error(detail_check_labels(labels, lk, rows, num_classes));
  }, py::arg("labels"), py::arg("rows"), py::arg("num_classes"),
     "The core's label rules: one label per row of x, each in [0, num_classes).");
  m.def("degenerate_norm", [](const std::string& dtype) {
    if (dtype == "float32") return static_cast<double>(degenerate_norm<float>());
    if (dtype == "float64") return degenerate_norm<double>();
    throw py::value_error("dtype must be 'float32' or 'float64', got '" + dtype + "'");
  }, py::arg("dtype"), "Norms below this count as zero (no margin) for the dtype.");
}

}  // namespace lsoftmax::python
