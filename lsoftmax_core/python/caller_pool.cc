// The torch pool registration of caller_pool.h and its binding.
#include "caller_pool.h"

#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>

#include "bindings.h"

namespace lsoftmax::python {
namespace {

std::atomic<ParallelForFn> g_torch_run{nullptr};

}  // namespace

void require_torch_pool(bool torch_pool) {
  if (torch_pool && g_torch_run.load() == nullptr) {
    throw std::runtime_error(
        "torch_pool=True but no torch pool is registered (lsoftmax.torch registers the one of "
        "lsoftmax/_torch_ops.so when it loads)");
  }
}

CallerPool::CallerPool(bool torch_pool) {
  if (!torch_pool) return;
  const ParallelForFn run = g_torch_run.load();
  if (run != nullptr) scope_.emplace(ParallelFor{run, nullptr});
}

void bind_caller_pool(pybind11::module_& m) {
  m.def(
      "set_torch_parallel_for",
      [](uintptr_t address) {
        if (address == 0) throw pybind11::value_error("address must not be 0");
        g_torch_run.store(reinterpret_cast<ParallelForFn>(address));
      },
      pybind11::arg("address"),
      "Registers torch's intra-op pool for the bindings' torch_pool=True calls: the address "
      "torch.ops.lsoftmax_cpu.parallel_for_address() returns (lsoftmax.torch does this).");
  m.def("torch_parallel_for_registered", [] { return g_torch_run.load() != nullptr; });
}

}  // namespace lsoftmax::python
