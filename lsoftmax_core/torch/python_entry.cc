// lsoftmax/_torch_entry: the scheduled heads' eager training forward as one CPython call.
//
// At small class counts the step's own cost is a few hundred microseconds, and the Python in
// front of lsoftmax_cpu::scheduled_margin_linear was a measurable part of it: the module's
// checks that the native path applies (about twenty attribute reads and comparisons) and
// torch.ops' boxing of eight arguments, a string and a float list among them
// (docs/benchmarks.md, the split's "module's Python"). Here both are C++: the checks read the
// tensors directly, and the op is called unboxed through the dispatcher.
//
// A separate module, not part of _torch_ops.so: that library keeps no Python ABI (libtorch_python
// is not linked), so that its ops stay loadable without Python.
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <string_view>
#include <vector>

namespace {

using ScheduledOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                               const at::Tensor&, c10::string_view, c10::ArrayRef<double>,
                               bool);

const c10::TypedOperatorHandle<ScheduledOp>& scheduled_op() {
  // Resolved on first use: _torch_ops.so registers the op when lsoftmax.torch loads it.
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lsoftmax_cpu::scheduled_margin_linear", "")
                             .typed<ScheduledOp>();
  return op;
}

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }
bool is_label(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

// A plain tensor (Tensor or Parameter, not a subclass that could redefine the ops) on the CPU.
const at::Tensor* plain_cpu_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return t.defined() && t.device().is_cpu() ? &t : nullptr;
}

// scheduled_margin_linear(x, weight, labels, margin, step, kind, params, count) -> Tensor | None
//
// None: the call is not one the native path takes (not 2-D float CPU inputs with matching
// dtypes and shapes, CPU int labels and counter, autocast off); the caller then takes the
// general path, which checks everything and words the errors. The caller checks what is global
// to the process and cheap in Python (torch.compile tracing, functorch transforms).
PyObject* scheduled_margin_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8) {
    PyErr_Format(PyExc_TypeError, "scheduled_margin_linear takes 8 arguments, got %zd", nargs);
    return nullptr;
  }
  const at::Tensor* x = plain_cpu_tensor(args[0]);
  const at::Tensor* w = plain_cpu_tensor(args[1]);
  const at::Tensor* labels = plain_cpu_tensor(args[2]);
  const at::Tensor* step = plain_cpu_tensor(args[4]);
  if (!x || !w || !labels || !step || !PyLong_CheckExact(args[3]) || !PyUnicode_Check(args[5]) ||
      !PyBool_Check(args[7])) {
    Py_RETURN_NONE;
  }
  if (x->dim() != 2 || w->dim() != 2 || labels->dim() != 1 || step->dim() != 0 ||
      x->scalar_type() != w->scalar_type() || !is_float(x->scalar_type()) ||
      !is_label(labels->scalar_type()) || step->scalar_type() != at::kLong ||
      x->size(1) != w->size(1) || labels->size(0) != x->size(0) ||
      at::autocast::is_autocast_enabled(at::kCPU)) {
    Py_RETURN_NONE;
  }
  const long margin = PyLong_AsLong(args[3]);
  if (margin == -1 && PyErr_Occurred()) return nullptr;
  Py_ssize_t kind_len = 0;
  const char* kind = PyUnicode_AsUTF8AndSize(args[5], &kind_len);
  if (!kind) return nullptr;
  PyObject* seq = PySequence_Fast(args[6], "params must be a sequence of floats");
  if (!seq) return nullptr;
  std::vector<double> params(static_cast<size_t>(PySequence_Fast_GET_SIZE(seq)));
  for (size_t i = 0; i < params.size(); ++i) {
    params[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, static_cast<Py_ssize_t>(i)));
  }
  Py_DECREF(seq);
  if (PyErr_Occurred()) return nullptr;
  const bool count = args[7] == Py_True;
  at::Tensor out;
  {
    // As torch.ops does: the GIL is released while the op runs.
    const pybind11::gil_scoped_release no_gil;
    out = scheduled_op().call(*x, *w, *labels, margin, *step,
                              c10::string_view(kind, static_cast<size_t>(kind_len)), params,
                              count);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"scheduled_margin_linear", reinterpret_cast<PyCFunction>(
                                    reinterpret_cast<void (*)()>(scheduled_margin_linear)),
     METH_FASTCALL,
     "The scheduled L-Softmax head's eager CPU training forward, or None where it does not "
     "apply."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_torch_entry",
                       "The scheduled heads' eager training forward in one call.", -1, kMethods,
                       nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__torch_entry() { return PyModule_Create(&kModule); }
