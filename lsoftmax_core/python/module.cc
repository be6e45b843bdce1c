// lsoftmax._core: the core's kernels on numpy arrays. The GEMMs are the caller's (numpy, torch);
// these functions do the per-row margin work in place, with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "array_views.h"
#include "bindings.h"
#include "scalar_args.h"
#include "lsoftmax/lsoftmax.h"
#include "lsoftmax/schedules.h"

namespace py = pybind11;
using namespace lsoftmax;
using namespace lsoftmax::python;

namespace {

// Dispatch on (float type, label type) once, so each entry point is written once.
template <typename F>
auto dispatch(FloatKind fk, LabelKind lk, F&& f) {
  if (fk == FloatKind::kFloat32) {
    if (lk == LabelKind::kInt32) return f(float{}, int32_t{});
    return f(float{}, int64_t{});
  }
  if (lk == LabelKind::kInt32) return f(double{}, int32_t{});
  return f(double{}, int64_t{});
}

py::object margin_forward_py(py::array logits, py::array x_in, py::array w_in, py::array labels_in,
                             py::object margin_obj, py::object lam_obj, bool return_stats) {
  const int64_t margin = margin_arg(margin_obj);
  const double lam = real_arg("lam", lam_obj);
  const FloatKind fk = float_kind("logits", logits);
  py::array x = as_strided_input(x_in), w = as_strided_input(w_in),
            labels = as_strided_input(labels_in);
  require_same_dtype("x", x, "logits", logits);
  require_same_dtype("weight", w, "logits", logits);
  const LabelKind lk = label_kind(labels);
  return dispatch(fk, lk, [&](auto t_tag, auto l_tag) -> py::object {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    auto xv = const_matrix<T>("x", x);
    auto wv = const_matrix<T>("weight", w);
    auto lv = label_view<L>(labels);
    auto out = mutable_matrix<T>("logits", logits);
    std::optional<py::array_t<T>> nx, nw, cs;
    std::optional<py::array_t<int32_t>> seg;
    RowStats<T> stats;
    if (return_stats) {
      nx.emplace(xv.rows);
      nw.emplace(xv.rows);
      cs.emplace(xv.rows);
      seg.emplace(xv.rows);
      stats = RowStats<T>{nx->mutable_data(), nw->mutable_data(), cs->mutable_data(),
                          seg->mutable_data()};
    }
    Status s;
    {
      py::gil_scoped_release release;
      s = margin_forward<T, L>(xv, wv, lv, out, margin, lam, stats);
    }
    raise_if_error(s);
    if (!return_stats) return py::none();
    py::dict d;
    d["norm_x"] = *nx;
    d["norm_w"] = *nw;
    d["cos_theta"] = *cs;
    d["segment"] = *seg;
    return d;
  });
}

// The forward's per-row stats dict, handed back to the backward: four 1-D contiguous arrays of
// length n (segment int32, the rest of the float type of the call).
template <typename E>
E* stats_array(const py::dict& stats, const char* key, int64_t n) {
  if (!stats.contains(key)) {
    throw py::value_error(std::string("stats is missing '") + key + "' (pass the dict that "
                          "margin_forward_(..., return_stats=True) returned)");
  }
  py::array a = stats[key].cast<py::array>();
  if (!a.dtype().is(py::dtype::of<E>())) {
    throw py::type_error(std::string("stats['") + key + "'] has dtype " + dtype_name(a) +
                         ", expected " + py::str(py::dtype::of<E>()).cast<std::string>());
  }
  if (a.ndim() != 1 || a.shape(0) != n || !(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string("stats['") + key + "'] must be a contiguous 1-D array of " +
                          std::to_string(n) + " entries");
  }
  return static_cast<E*>(a.mutable_data());
}

void margin_backward_py(py::array grad_in, py::array x_in, py::array w_in, py::array labels_in,
                        py::array grad_x, py::array grad_w, py::object margin_obj,
                        py::object lam_obj, py::object stats_obj) {
  const int64_t margin = margin_arg(margin_obj);
  const double lam = real_arg("lam", lam_obj);
  py::array grad = as_strided_input(grad_in), x = as_strided_input(x_in),
            w = as_strided_input(w_in), labels = as_strided_input(labels_in);
  const FloatKind fk = float_kind("grad_logits", grad);
  require_same_dtype("x", x, "grad_logits", grad);
  require_same_dtype("weight", w, "grad_logits", grad);
  require_same_dtype("grad_x", grad_x, "grad_logits", grad);
  require_same_dtype("grad_weight", grad_w, "grad_logits", grad);
  const LabelKind lk = label_kind(labels);
  dispatch(fk, lk, [&](auto t_tag, auto l_tag) {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    auto gv = const_matrix<T>("grad_logits", grad);
    auto xv = const_matrix<T>("x", x);
    auto wv = const_matrix<T>("weight", w);
    auto lv = label_view<L>(labels);
    auto gx = mutable_matrix<T>("grad_x", grad_x);
    auto gw = mutable_matrix<T>("grad_weight", grad_w);
    RowStats<T> stats;
    if (!stats_obj.is_none()) {
      const py::dict d = stats_obj.cast<py::dict>();
      stats = RowStats<T>{stats_array<T>(d, "norm_x", xv.rows), stats_array<T>(d, "norm_w", xv.rows),
                          stats_array<T>(d, "cos_theta", xv.rows),
                          stats_array<int32_t>(d, "segment", xv.rows)};
    }
    Status s;
    {
      py::gil_scoped_release release;
      s = margin_backward<T, L>(gv, xv, wv, lv, gx, gw, margin, lam, stats);
    }
    raise_if_error(s);
  });
}

void plain_logits_py(py::array logits, const py::array& x, const py::array& w) {
  const FloatKind fk = float_kind("x", x);
  require_same_dtype("weight", w, "x", x);
  require_same_dtype("logits", logits, "x", x);
  auto run = [&](auto t_tag) {
    using T = decltype(t_tag);
    auto xv = const_matrix<T>("x", x);
    auto wv = const_matrix<T>("weight", w);
    auto out = mutable_matrix<T>("logits", logits);
    Status s;
    {
      py::gil_scoped_release release;
      s = plain_logits<T>(xv, wv, out);
    }
    raise_if_error(s);
  };
  if (fk == FloatKind::kFloat32) return run(float{});
  return run(double{});
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lsoftmax core kernels (per-row margin work; GEMMs are the caller's)";

  m.def("margin_forward_", &margin_forward_py, py::arg("logits"), py::arg("x"), py::arg("weight"),
        py::arg("labels"), py::arg("margin"), py::arg("lam"), py::arg("return_stats") = false,
        "In place: logits holds x @ weight.T; the target logit of each row becomes the margin "
        "logit. With return_stats, returns a dict of per-row norm_x, norm_w, cos_theta, segment.");
  m.def("margin_backward_", &margin_backward_py, py::arg("grad_logits"), py::arg("x"),
        py::arg("weight"), py::arg("labels"), py::arg("grad_x"), py::arg("grad_weight"),
        py::arg("margin"), py::arg("lam"), py::arg("stats") = py::none(),
        "In place: grad_x holds grad_logits @ weight and grad_weight holds grad_logits.T @ x; "
        "adds the margin terms (only grad_logits[i, labels[i]] is read). `stats`, the dict that "
        "margin_forward_(..., return_stats=True) returned for the same inputs, saves "
        "recomputing the norms and cosines.");

  m.def("plain_logits_", &plain_logits_py, py::arg("logits"), py::arg("x"), py::arg("weight"),
        "In place: logits = x @ weight.T, the ORT kernel's product for a single row (any "
        "number of rows, strided arrays on the baseline lanes).");
  m.def("validate_margin_params", [](py::object margin, py::object lam) {
    raise_if_error(validate_margin_params(margin_arg(margin), real_arg("lam", lam)));
  }, py::arg("margin"), py::arg("lam"));

  m.attr("max_margin") = py::int_(kMaxMargin);
  m.def("check_margin", [](py::object margin) {
    const int64_t v = margin_arg(margin);
    raise_if_error(validate_margin_params(v, 0.0));
    return v;
  }, py::arg("margin"), "margin as an int after the core's checks (type, range [1, 2^20]).");

  m.def("exponential_lambda", [](double base, double gamma, double power, double lambda_min,
                                 int64_t iteration, int64_t it) {
    raise_if_error(validate_exponential(base, gamma, power, lambda_min, iteration));
    if (it < 0) throw py::value_error("step must be >= 0, got " + std::to_string(it));
    return exponential_lambda(base, gamma, power, lambda_min, iteration, it);
  }, py::arg("base"), py::arg("gamma"), py::arg("power"), py::arg("lambda_min"),
     py::arg("iteration"), py::arg("step"));
  m.def("scaled_lambda", [](double beta, double scale, double beta_min, int64_t it) {
    raise_if_error(validate_scaled(beta, scale, beta_min));
    if (it < 0) throw py::value_error("step must be >= 0, got " + std::to_string(it));
    return scaled_lambda(beta, scale, beta_min, it);
  }, py::arg("beta"), py::arg("scale"), py::arg("beta_min"), py::arg("step"));
  m.def("onset_lambda", [](int64_t total_steps, double reach, double at, double warmup,
                           double base, double lambda_min, int64_t it) {
    raise_if_error(validate_onset(total_steps, reach, at, warmup, base, lambda_min));
    if (it < 0) throw py::value_error("step must be >= 0, got " + std::to_string(it));
    return onset_lambda(total_steps, reach, at, warmup, base, lambda_min, it);
  }, py::arg("total_steps"), py::arg("reach"), py::arg("at"), py::arg("warmup"), py::arg("base"),
     py::arg("lambda_min"), py::arg("step"));
  m.def("validate_constant", [](double v) { raise_if_error(validate_constant(v)); }, py::arg("value"));

  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Threads for the per-row loops (n <= 0 restores the default).");
  m.def("get_num_threads", &get_num_threads);

#ifdef LSOFTMAX_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
  bind_lgm(m);
  bind_cuda(m);
  bind_fused(m);
  bind_caller_pool(m);
  bind_family(m);
}
