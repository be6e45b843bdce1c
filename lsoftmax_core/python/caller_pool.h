// Which pool a binding's core call runs its loops on (issue 11: the caller's pool).
//
// From numpy the core uses its own persistent pool. lsoftmax.torch calls a few bindings with
// torch tensors' memory (the fused loss's block kernels, the L-GM steps); those take
// `torch_pool=True` and then run the call's loops on torch's intra-op pool, the one torch's
// GEMMs use, so a torch program never starts the core's pool. The torch pool's executor lives
// in the libtorch extension (lsoftmax/_torch_ops.so, which links against torch; this module
// does not): lsoftmax.torch registers it once with set_torch_parallel_for, passing the address
// that torch.ops.lsoftmax_cpu.parallel_for_address() returns.
#pragma once

#include <optional>

#include "lsoftmax/parallel.h"

namespace lsoftmax::python {

// Installs torch's pool for the core calls made on this thread while it lives, when
// `torch_pool` is true (throws if lsoftmax.torch registered none); otherwise does nothing.
// Construct it next to py::gil_scoped_release, around the core call only.
class CallerPool {
 public:
  explicit CallerPool(bool torch_pool);

 private:
  std::optional<ParallelScope> scope_;
};

// Throws std::runtime_error when torch_pool is requested but none is registered: checked
// before the GIL is released, so the error reaches Python as a RuntimeError.
void require_torch_pool(bool torch_pool);

}  // namespace lsoftmax::python
