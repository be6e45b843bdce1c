// lsoftmax/_torch_ops.so: the core on CPU torch tensors, registered with torch's dispatcher
// (namespace lsoftmax_cpu) and loaded by lsoftmax.torch when present.
//
// Two reasons to be in C++ rather than Python glue over the numpy module:
//   - the core's loops run on torch's own intra-op pool (at::parallel_for), the one torch's
//     GEMMs use, instead of a second pool competing with it for the cores;
//   - the eager layer (lsoftmax_cpu::margin_linear) is one dispatcher call with a C++ autograd
//     node: no Python runs in its forward glue or anywhere in its backward.
// The Python custom ops (lsoftmax::*, for torch.compile / export / CUDA) keep their Python
// definitions and use the in-place kernels below on CPU.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "lsoftmax/lsoftmax.h"
#include "lsoftmax/schedules.h"

namespace {

using lsoftmax::LabelView;
using lsoftmax::MatrixView;
using lsoftmax::Status;

bool torch_run(void*, int64_t n, int64_t grain, lsoftmax::RangeBody body, void* body_ctx) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { body(body_ctx, begin, end); });
  return true;
}

constexpr lsoftmax::ParallelFor kTorchPool{&torch_run, nullptr};

void raise_if_error(const Status& s) {
  if (s.ok()) return;
  TORCH_CHECK_VALUE(s.code() != Status::Code::kInvalidArgument, s.message());
  TORCH_CHECK(false, s.message());
}

void check_cpu_2d(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
}

template <typename T>
MatrixView<const T> cview(const char* name, const at::Tensor& t) {
  check_cpu_2d(name, t);
  return MatrixView<const T>{t.const_data_ptr<T>(), t.size(0), t.size(1), t.stride(0),
                             t.stride(1)};
}

template <typename T>
MatrixView<T> mview(const char* name, const at::Tensor& t) {
  check_cpu_2d(name, t);
  return MatrixView<T>{t.mutable_data_ptr<T>(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

template <typename L>
LabelView<L> lview(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1, "labels must be a 1-D CPU tensor");
  return LabelView<L>{t.const_data_ptr<L>(), t.size(0), t.stride(0)};
}

// Calls f(T{}, L{}) for the (float, label) types of the call.
template <typename F>
void dispatch(const at::Tensor& x, const at::Tensor& labels, F&& f) {
  const auto ft = x.scalar_type(), lt = labels.scalar_type();
  TORCH_CHECK_TYPE(ft == at::kFloat || ft == at::kDouble, "x must be float32 or float64, got ",
                   ft);
  TORCH_CHECK_TYPE(lt == at::kInt || lt == at::kLong, "labels must be int32 or int64, got ", lt);
  if (ft == at::kFloat) {
    if (lt == at::kInt) return f(float{}, int32_t{});
    return f(float{}, int64_t{});
  }
  if (lt == at::kInt) return f(double{}, int32_t{});
  return f(double{}, int64_t{});
}

// Runs core(T{}, L{}) -> Status for the call's types, its loops on torch's pool, and raises
// the core's error as a torch error.
template <typename F>
void run_core(const at::Tensor& x, const at::Tensor& labels, F&& core) {
  dispatch(x, labels, [&](auto t_tag, auto l_tag) {
    Status s;
    {
      const lsoftmax::ParallelScope pool(kTorchPool);
      s = core(t_tag, l_tag);
    }
    raise_if_error(s);
  });
}

void check_same_dtype(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " is ", t.scalar_type(),
                   " but x is ", x.scalar_type(), "; they must match");
}

// The forward's per-row stats, handed to the backward: norm_x, norm_w and cos_theta (n values of
// the float type each) and segment (n int32), carved from one byte buffer so that the node
// allocates and saves one tensor for them rather than four. An undefined buffer: no stats.
at::Tensor allocate_stats(int64_t n, const at::Tensor& x) {
  return at::empty({n * (3 * static_cast<int64_t>(x.element_size()) + 4)},
                   x.options().dtype(at::kByte));
}

template <typename T>
lsoftmax::RowStats<T> row_stats(const at::Tensor& stats, int64_t n) {
  if (!stats.defined()) return {};
  T* f = reinterpret_cast<T*>(stats.mutable_data_ptr<uint8_t>());
  return {f, f + n, f + 2 * n, reinterpret_cast<int32_t*>(f + 3 * n)};
}

void forward_inplace(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& w,
                     const at::Tensor& labels, int64_t margin, double lam,
                     const at::Tensor& stats) {
  check_same_dtype("weight", w, x);
  check_same_dtype("logits", logits, x);
  run_core(x, labels, [&](auto t_tag, auto l_tag) {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    return lsoftmax::margin_forward<T, L>(cview<T>("x", x), cview<T>("weight", w),
                                          lview<L>(labels), mview<T>("logits", logits), margin,
                                          lam, row_stats<T>(stats, x.size(0)));
  });
}

void backward_inplace(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& labels, const at::Tensor& grad_x,
                      const at::Tensor& grad_w, int64_t margin, double lam,
                      const at::Tensor& stats) {
  check_same_dtype("weight", w, x);
  check_same_dtype("grad_logits", grad, x);
  check_same_dtype("grad_x", grad_x, x);
  check_same_dtype("grad_weight", grad_w, x);
  run_core(x, labels, [&](auto t_tag, auto l_tag) {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    return lsoftmax::margin_backward<T, L>(
        cview<T>("grad_logits", grad), cview<T>("x", x), cview<T>("weight", w), lview<L>(labels),
        mview<T>("grad_x", grad_x), mview<T>("grad_weight", grad_w), margin, lam,
        row_stats<T>(stats, x.size(0)));
  });
}

// Folding the margin into the backward GEMMs costs a copy of G (N x C) and one pass over the
// weight (C x D) and saves the class-grouped pass over x (N x D): it pays for fewer classes than
// N D / (N + D) (170 at N = 256, D = 512), a cost model in elements touched, not a tuned constant.
bool fold_pays(int64_t n, int64_t c, int64_t d) { return c * (n + d) <= n * d; }

// grad_x = G' W + coef_x x and grad_w = G'^T x + coef_w w, where G' is G with each row's
// w-direction margin term added to its target entry (lsoftmax::margin_backward_fold).
std::pair<at::Tensor, at::Tensor> backward_folded(const at::Tensor& grad, const at::Tensor& x,
                                                  const at::Tensor& w, const at::Tensor& labels,
                                                  int64_t margin, double lam,
                                                  const at::Tensor& stats) {
  check_same_dtype("grad_logits", grad, x);
  at::Tensor g = grad.clone(at::MemoryFormat::Contiguous);  // G may be shared in the graph
  at::Tensor grad_x, grad_w;
  run_core(x, labels, [&](auto t_tag, auto l_tag) {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    std::vector<T> coef_x(static_cast<size_t>(x.size(0)));
    std::vector<T> coef_w(static_cast<size_t>(w.size(0)));
    Status s = lsoftmax::margin_backward_fold<T, L>(
        mview<T>("grad_logits", g), cview<T>("x", x), cview<T>("weight", w), lview<L>(labels),
        coef_x.data(), coef_w.data(), margin, lam, row_stats<T>(stats, x.size(0)));
    if (!s.ok()) return s;
    // The rank-one terms by the core, which skips the rows whose coefficient is zero (classes
    // no sample targets): a broadcast addcmul_ costs more than the GEMMs at small C.
    grad_x = at::mm(g, w);
    s = lsoftmax::add_scaled_rows<T>(mview<T>("grad_x", grad_x), coef_x.data(),
                                     cview<T>("x", x));
    if (!s.ok()) return s;
    grad_w = at::mm(g.t(), x);
    return lsoftmax::add_scaled_rows<T>(mview<T>("grad_weight", grad_w), coef_w.data(),
                                        cview<T>("weight", w));
  });
  return {grad_x, grad_w};
}

// --- ops ------------------------------------------------------------------------------------

void margin_forward_op(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& w,
                       const at::Tensor& labels, int64_t margin, double lam) {
  forward_inplace(logits, x, w, labels, margin, lam, at::Tensor());
}

void margin_backward_op(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
                        const at::Tensor& labels, const at::Tensor& grad_x,
                        const at::Tensor& grad_w, int64_t margin, double lam) {
  backward_inplace(grad, x, w, labels, grad_x, grad_w, margin, lam, at::Tensor());
}

// x W^T. With fewer than 16 classes torch's CPU GEMM (MKL) takes a slow path for that shape and
// (W x^T)^T is the faster product: 51 against 88 us at N = 256, D = 512, C = 10 on one thread,
// 44 against 48 on two; from C = 16 on, x W^T is the faster (benchmarks/bench_gemm_shapes.py,
// docs/benchmarks.md).
// The transposed product is made contiguous (N x C values, a few us) so that the logits are laid
// out as nn.Linear's. lsoftmax.torch.ops.plain_logits applies the same rule, so that the
// layer's Python paths round their logits as this one does.
constexpr int64_t kTransposedGemmBelow = 16;

at::Tensor plain_logits(const at::Tensor& x, const at::Tensor& w) {
  if (w.size(0) < kTransposedGemmBelow) return at::mm(w, x.t()).t().contiguous();
  return at::mm(x, w.t());
}

// The eager layer: logits = x W^T with the margin, and its backward, as one autograd node.
class MarginLinear : public torch::autograd::Function<MarginLinear> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w, const at::Tensor& labels, int64_t margin,
                            double lam) {
    check_cpu_2d("x", x);
    check_cpu_2d("weight", w);
    const at::Tensor logits = plain_logits(x, w);
    const at::Tensor stats = allocate_stats(x.size(0), x);
    forward_inplace(logits, x, w, labels, margin, lam, stats);
    ctx->save_for_backward({x, w, labels, stats});
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["lam"] = lam;
    return logits;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The kernels write the margin terms into the gradients in place, which autograd cannot
    // see: a graph of this backward would give a silently wrong second derivative.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "lsoftmax: the L-Softmax margin logits do not support double backward "
                "(create_graph=True / second derivatives)");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &labels = saved[2];
    const at::Tensor& stats = saved[3];
    const int64_t margin = ctx->saved_data["margin"].toInt();
    const double lam = ctx->saved_data["lam"].toDouble();
    at::Tensor grad_x, grad_w;
    if (margin > 1 && fold_pays(x.size(0), w.size(0), x.size(1))) {
      std::tie(grad_x, grad_w) = backward_folded(grads[0], x, w, labels, margin, lam, stats);
    } else {
      const at::Tensor grad = grads[0].contiguous();
      grad_x = at::mm(grad, w);
      grad_w = at::mm(grad.t(), x);
      backward_inplace(grad, x, w, labels, grad_x, grad_w, margin, lam, stats);
    }
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    return {need_x ? grad_x : at::Tensor(), need_w ? grad_w : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// The address of torch_run, for the pybind11 module's bindings that lsoftmax.torch calls with
// torch_pool=True (lsoftmax_core/python/caller_pool.h): that module does not link against torch,
// so it borrows this executor to run its loops on torch's pool.
int64_t parallel_for_address_op() {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(&torch_run));
}

// How many threads torch's pool gave one core loop of n items (at most n): a check of the build,
// since an extension compiled without torch's OpenMP flags runs every loop on the calling thread
// without any error (tests/test_threads.py).
int64_t pool_threads_op(int64_t n) {
  TORCH_CHECK_VALUE(n >= 1 && n <= 4096, "n must be in [1, 4096], got ", n);
  std::mutex mu;
  std::set<std::thread::id> ids;
  struct Ctx {
    std::mutex* mu;
    std::set<std::thread::id>* ids;
  } ctx{&mu, &ids};
  const lsoftmax::RangeBody body = [](void* c, int64_t, int64_t) {
    Ctx& k = *static_cast<Ctx*>(c);
    const std::lock_guard<std::mutex> lock(*k.mu);
    k.ids->insert(std::this_thread::get_id());
  };
  torch_run(nullptr, n, 1, body, &ctx);
  return static_cast<int64_t>(ids.size());
}

at::Tensor margin_linear_op(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                            int64_t margin, double lam) {
  return MarginLinear::apply(x, w, labels, margin, lam);
}

// The scheduled head's eager training forward in one call: lambda from the schedule at the step
// counter, the counter advanced when this forward counts, then margin_linear. In Python these
// were a host read of the counter, a schedule evaluation and an in-place add: about a third of
// the layer's overhead at small class counts.
at::Tensor scheduled_margin_linear_op(const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& labels, int64_t margin,
                                      const at::Tensor& step, c10::string_view kind,
                                      c10::ArrayRef<double> params, bool count) {
  TORCH_CHECK_VALUE(step.device().is_cpu() && step.dim() == 0 && step.scalar_type() == at::kLong,
                    "step must be a 0-d int64 CPU tensor, got ", step.scalar_type(), " of shape ",
                    step.sizes(), " on ", step.device());
  lsoftmax::ScheduleSpec spec;
  raise_if_error(lsoftmax::make_schedule(std::string(kind).c_str(), params.data(), params.size(),
                                         &spec));
  // The counter by its data pointer: item() and add_() are each a dispatch (and add_ a
  // TensorIterator) for one integer. The version bump is what add_ would have done, so autograd
  // still sees the write.
  const double lam = lsoftmax::schedule_value(spec, *step.const_data_ptr<int64_t>());
  at::Tensor logits = MarginLinear::apply(x, w, labels, margin, lam);
  if (count) {  // after the layer: a forward that raised does not count
    ++*step.mutable_data_ptr<int64_t>();
    step.unsafeGetTensorImpl()->bump_version();
  }
  return logits;
}

}  // namespace

TORCH_LIBRARY(lsoftmax_cpu, m) {
  m.def("margin_forward_(Tensor(a!) logits, Tensor x, Tensor weight, Tensor labels, int margin, "
        "float lam) -> ()");
  m.def("margin_backward_(Tensor grad_logits, Tensor x, Tensor weight, Tensor labels, "
        "Tensor(a!) grad_x, Tensor(b!) grad_weight, int margin, float lam) -> ()");
  m.def("margin_linear(Tensor x, Tensor weight, Tensor labels, int margin, float lam) -> Tensor");
  m.def("scheduled_margin_linear(Tensor x, Tensor weight, Tensor labels, int margin, "
        "Tensor(a!) step, str kind, float[] params, bool count) -> Tensor");
  m.def("parallel_for_address() -> int", TORCH_FN(parallel_for_address_op));
  m.def("pool_threads(int n) -> int", TORCH_FN(pool_threads_op));
  m.impl("margin_forward_", c10::DispatchKey::CPU, TORCH_FN(margin_forward_op));
  m.impl("margin_backward_", c10::DispatchKey::CPU, TORCH_FN(margin_backward_op));
  // Autograd lives inside (MarginLinear), so the op is registered as composite: eager only;
  // torch.compile and export see the Python lsoftmax:: ops instead.
  m.impl("margin_linear", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(margin_linear_op));
  m.impl("scheduled_margin_linear", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(scheduled_margin_linear_op));
}
