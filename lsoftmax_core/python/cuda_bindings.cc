// lsoftmax._core's CUDA entry points. They take raw device pointers, shapes and strides as
// ints (any framework can supply them: lsoftmax/cuda.py reads __cuda_array_interface__ or
// DLPack, lsoftmax/torch/_kernels.py reads torch tensors) and a stream as an int.
//
// A matrix is passed as (ptr, rows, cols, row_stride, col_stride, dtype) and the labels as
// (ptr, size, stride, dtype), strides in elements, dtype a name ("float32", "int64", ...).
// Without CUDA compiled in, the same functions exist and raise a RuntimeError that says so.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "array_views.h"
#include "bindings.h"
#include "cuda_args.h"
#include "scalar_args.h"
#include "lsoftmax/labels.h"
#include "lsoftmax/lsoftmax.h"
#include "lsoftmax/lsoftmax_cuda.h"  // declarations only: the launchers exist with CUDA
#include "lsoftmax/schedules.h"

namespace py = pybind11;

namespace lsoftmax::python {
namespace {

using cuda_args::LabelSpec;
using cuda_args::MatrixSpec;

ScheduleSpec schedule_of(const std::string& kind, const std::vector<double>& params) {
  ScheduleSpec spec;
  raise_if_error(make_schedule(kind.c_str(), params.data(), params.size(), &spec));
  return spec;
}

#ifdef LSOFTMAX_WITH_CUDA

using cuda_args::matrix;

// Error path only: copies the labels to the host to name the first bad one, as the CPU core does.
std::string bad_label_message(const cuda::DeviceLabels& l, int64_t num_classes, void* stream) {
  const size_t item = l.type == cuda::LabelType::kInt32 ? 4 : 8;
  const int64_t span = l.size == 0 ? 0 : (l.size - 1) * l.stride + 1;
  std::vector<char> host(static_cast<size_t>(span) * item);
  const Status s = cuda::copy_to_host_sync(stream, host.data(), l.data, host.size());
  if (s.ok()) {
    auto host_view = [&](auto tag) {
      using L = decltype(tag);
      return LabelView<L>{reinterpret_cast<const L*>(host.data()), l.size, l.stride};
    };
    const Status range = item == 4 ? check_label_range(host_view(int32_t{}), num_classes)
                                   : check_label_range(host_view(int64_t{}), num_classes);
    if (!range.ok()) return range.message();
  }
  return "labels has entries out of range [0, " + std::to_string(num_classes) + ")";
}

// Runs `launch(flag)`. With a caller flag (or with check = false: no flag at all, bad rows are
// only skipped) nothing else happens (no sync); otherwise a scratch flag is read back after the
// launch (a stream sync) and a bad label raises ValueError.
template <typename F>
void with_label_check(bool check, uintptr_t caller_flag, const cuda::DeviceLabels& labels,
                      int64_t classes, void* stream, F&& launch) {
  if (caller_flag != 0 || !check) {
    Status s;
    {
      py::gil_scoped_release release;
      s = launch(check ? reinterpret_cast<int32_t*>(caller_flag) : nullptr);
    }
    raise_if_error(s);
    return;
  }
  int32_t flag_value = 0;
  Status s;
  {
    py::gil_scoped_release release;
    void* flag = nullptr;
    s = cuda::scratch_alloc(stream, sizeof(int32_t), true, &flag);
    if (s.ok()) {
      s = launch(static_cast<int32_t*>(flag));
      const Status r = cuda::copy_to_host_sync(stream, &flag_value, flag, sizeof(int32_t));
      const Status f = cuda::scratch_free(stream, flag);
      if (s.ok()) s = r.ok() ? f : r;
    }
  }
  raise_if_error(s);
  if (flag_value & cuda::kFlagBadLambda) {
    throw py::value_error("lambda must be >= 0 (and not NaN); the device value read is not");
  }
  if (flag_value != 0) throw py::value_error(bad_label_message(labels, classes, stream));
}

void forward_py(const MatrixSpec& logits, const MatrixSpec& x, const MatrixSpec& w,
                const LabelSpec& labels, const py::object& margin_obj, double lam,
                uintptr_t error_flag, uintptr_t stream, bool check_labels, uintptr_t lam_ptr) {
  const int64_t margin = margin_arg(margin_obj);
  const auto lv = matrix("logits", logits);
  const auto xv = matrix("x", x), wv = matrix("weight", w);
  const auto yv = cuda_args::labels(labels);
  const auto* dev_lam = reinterpret_cast<const double*>(lam_ptr);
  if (dev_lam != nullptr) lam = 0.0;  // the device value is the one used
  raise_if_error(cuda::check_forward_args(lv, xv, wv, yv, margin, lam));
  void* st = cuda_args::ptr(stream);
  with_label_check(check_labels, error_flag, yv, wv.rows, st, [&](int32_t* flag) {
    return cuda::margin_forward(lv, xv, wv, yv, margin, lam, flag, st, dev_lam);
  });
}

void backward_py(const MatrixSpec& grad, const MatrixSpec& x, const MatrixSpec& w,
                 const LabelSpec& labels, const MatrixSpec& grad_x, const MatrixSpec& grad_w,
                 const py::object& margin_obj, double lam, bool deterministic, uintptr_t workspace,
                 size_t workspace_bytes, uintptr_t error_flag, uintptr_t stream,
                 bool check_labels, uintptr_t lam_ptr) {
  const int64_t margin = margin_arg(margin_obj);
  const auto gv = matrix("grad_logits", grad), xv = matrix("x", x), wv = matrix("weight", w);
  const auto gxv = matrix("grad_x", grad_x), gwv = matrix("grad_weight", grad_w);
  const auto yv = cuda_args::labels(labels);
  const auto* dev_lam = reinterpret_cast<const double*>(lam_ptr);
  if (dev_lam != nullptr) lam = 0.0;  // the device value is the one used
  raise_if_error(cuda::check_backward_args(gv, xv, wv, yv, gxv, gwv, margin, lam));
  void* st = cuda_args::ptr(stream);
  // Without a caller workspace the segmented path borrows stream-ordered scratch memory.
  void* ws = reinterpret_cast<void*>(workspace);
  size_t ws_bytes = workspace_bytes;
  void* owned = nullptr;
  if (ws == nullptr && margin > 1 && cuda::uses_segmented_scatter(xv.dtype, deterministic)) {
    Status s = cuda::margin_backward_workspace_size(xv.rows, wv.rows, xv.dtype, deterministic,
                                                    &ws_bytes);
    if (s.ok() && ws_bytes > 0) s = cuda::scratch_alloc(st, ws_bytes, false, &owned);
    raise_if_error(s);
    ws = owned;
  }
  try {
    with_label_check(check_labels, error_flag, yv, wv.rows, st, [&](int32_t* flag) {
      return cuda::margin_backward(gv, xv, wv, yv, gxv, gwv, margin, lam, deterministic, ws,
                                   ws_bytes, flag, st, dev_lam);
    });
  } catch (...) {
    (void)cuda::scratch_free(st, owned);
    throw;
  }
  raise_if_error(cuda::scratch_free(st, owned));
}

void schedule_py(const std::string& kind, const std::vector<double>& params, uintptr_t step,
                 uintptr_t out, uintptr_t stream) {
  const ScheduleSpec spec = schedule_of(kind, params);
  Status s;
  {
    py::gil_scoped_release release;
    s = cuda::evaluate_schedule(spec, reinterpret_cast<const int64_t*>(step),
                                reinterpret_cast<double*>(out), cuda_args::ptr(stream));
  }
  raise_if_error(s);
}

size_t workspace_size_py(int64_t n, int64_t num_classes, const std::string& dtype,
                         bool deterministic) {
  size_t bytes = 0;
  raise_if_error(cuda::margin_backward_workspace_size(
      n, num_classes, cuda_args::dtype("dtype", dtype), deterministic, &bytes));
  return bytes;
}

// Plain device buffers for callers with no GPU array library (lsoftmax.cuda.DeviceArray):
// synchronous, on the legacy default stream.
uintptr_t malloc_py(size_t bytes) {
  void* p = nullptr;
  Status s;
  {
    py::gil_scoped_release release;
    s = cuda::scratch_alloc(nullptr, bytes, true, &p);
    if (s.ok()) s = cuda::stream_synchronize(nullptr);
  }
  raise_if_error(s);
  return reinterpret_cast<uintptr_t>(p);
}

void free_py(uintptr_t ptr) {
  Status s;
  {
    py::gil_scoped_release release;
    s = cuda::scratch_free(nullptr, reinterpret_cast<void*>(ptr));
    if (s.ok()) s = cuda::stream_synchronize(nullptr);
  }
  raise_if_error(s);
}

void memcpy_py(uintptr_t dst, uintptr_t src, size_t bytes) {
  Status s;
  {
    py::gil_scoped_release release;
    s = cuda::copy_async(nullptr, reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src),
                         bytes);
    if (s.ok()) s = cuda::stream_synchronize(nullptr);
  }
  raise_if_error(s);
}

#else  // no CUDA compiled in

[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "lsoftmax was built without CUDA (no CUDA compiler was found at build time, or "
      "LSOFTMAX_CUDA=OFF); rebuild with LSOFTMAX_CUDA=ON and nvcc on the PATH to use GPU arrays");
}

void forward_py(const MatrixSpec&, const MatrixSpec&, const MatrixSpec&, const LabelSpec&,
                const py::object& margin_obj, double, uintptr_t, uintptr_t, bool, uintptr_t) {
  (void)margin_arg(margin_obj);
  no_cuda();
}

void backward_py(const MatrixSpec&, const MatrixSpec&, const MatrixSpec&, const LabelSpec&,
                 const MatrixSpec&, const MatrixSpec&, const py::object& margin_obj, double, bool,
                 uintptr_t, size_t, uintptr_t, uintptr_t, bool, uintptr_t) {
  (void)margin_arg(margin_obj);
  no_cuda();
}

void schedule_py(const std::string& kind, const std::vector<double>& params, uintptr_t,
                 uintptr_t, uintptr_t) {
  (void)schedule_of(kind, params);
  no_cuda();
}
size_t workspace_size_py(int64_t, int64_t, const std::string&, bool) { no_cuda(); }
uintptr_t malloc_py(size_t) { no_cuda(); }
void free_py(uintptr_t) { no_cuda(); }
void memcpy_py(uintptr_t, uintptr_t, size_t) { no_cuda(); }

#endif

int device_count_py() {
#ifdef LSOFTMAX_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.def("cuda_device_count", &device_count_py,
        "Number of visible CUDA devices (0 without a driver, a device or CUDA support).");
  m.def(
      "cuda_available", []() { return device_count_py() > 0; },
      "True when lsoftmax was built with CUDA and a CUDA device is usable (a lazy query).");
  m.def(
      "cuda_unavailable_reason",
      []() -> std::string {
#ifdef LSOFTMAX_WITH_CUDA
        const Status s = cuda::device_status();
        return s.ok() ? std::string() : s.message();
#else
        return "lsoftmax was built without CUDA";
#endif
      },
      "Why CUDA cannot be used ('' when it can).");

  m.def("cuda_margin_forward_", &forward_py, py::arg("logits"), py::arg("x"), py::arg("weight"),
        py::arg("labels"), py::arg("margin"), py::arg("lam"), py::arg("error_flag") = 0,
        py::arg("stream") = 0, py::arg("check_labels") = true, py::arg("lam_ptr") = 0,
        "In place on the device: logits holds x @ weight.T; rewrites each row's target logit. "
        "Matrices are (ptr, rows, cols, row_stride, col_stride, dtype); labels (ptr, size, "
        "stride, dtype). error_flag = 0 checks the labels synchronously (ValueError); a device "
        "int32 pointer instead receives 1 on a bad label, with no sync; check_labels=False passes "
        "no flag (bad rows are skipped, unreported). lam_ptr: the address of a device float64 "
        "lambda to use instead of lam (read by the kernel: no sync); a negative or NaN value there "
        "sets bit cuda_flag_bad_lambda of the flag and makes the margin logits NaN.");
  m.def("cuda_margin_backward_", &backward_py, py::arg("grad_logits"), py::arg("x"),
        py::arg("weight"), py::arg("labels"), py::arg("grad_x"), py::arg("grad_weight"),
        py::arg("margin"), py::arg("lam"), py::arg("deterministic") = false,
        py::arg("workspace") = 0, py::arg("workspace_bytes") = 0, py::arg("error_flag") = 0,
        py::arg("stream") = 0, py::arg("check_labels") = true, py::arg("lam_ptr") = 0,
        "In place on the device: grad_x holds grad_logits @ weight, grad_weight holds "
        "grad_logits.T @ x; adds the margin terms. lam_ptr as for cuda_margin_forward_.");
  m.def("cuda_schedule_value_", &schedule_py, py::arg("kind"), py::arg("params"),
        py::arg("step"), py::arg("out"), py::arg("stream") = 0,
        "On the device, no sync: *out (a device float64) = the schedule's value at *step (a "
        "device int64). kind and params as lsoftmax.schedules.Schedule.kind / .params(); they "
        "are validated (ValueError) before the launch.");
  m.def(
      "schedule_value",
      [](const std::string& kind, const std::vector<double>& params, int64_t it) {
        const ScheduleSpec spec = schedule_of(kind, params);
        if (it < 0) throw py::value_error("step must be >= 0, got " + std::to_string(it));
        return lsoftmax::schedule_value(spec, it);
      },
      py::arg("kind"), py::arg("params"), py::arg("it"),
      "The schedule's value at step it, on the host, through the same spec and formulas the "
      "CUDA schedule kernel evaluates (cuda_schedule_value_).");
  m.attr("cuda_flag_bad_lambda") = cuda::kFlagBadLambda;
  m.def("cuda_malloc", &malloc_py, py::arg("nbytes"),
        "A zeroed device buffer (synchronous); returns its address. Free with cuda_free.");
  m.def("cuda_free", &free_py, py::arg("ptr"));
  m.def("cuda_memcpy", &memcpy_py, py::arg("dst"), py::arg("src"), py::arg("nbytes"),
        "Synchronous copy between host and device addresses (any direction).");
  m.def("cuda_backward_workspace_size", &workspace_size_py, py::arg("n"), py::arg("num_classes"),
        py::arg("dtype"), py::arg("deterministic"),
        "Bytes of device workspace cuda_margin_backward_ needs (0 for the atomic path).");
}

}  // namespace lsoftmax::python
