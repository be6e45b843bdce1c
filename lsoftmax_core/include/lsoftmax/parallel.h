// Where the core's parallel loops run: on the thread pool of whoever calls the core.
//
// The core creates no threads per call. Its caller installs a ParallelFor (a function pointer
// plus a context) for the calls it makes from one thread, with a ParallelScope:
//   - the torch extension installs torch's intra-op pool (at::parallel_for);
//   - the ONNX Runtime kernels install the session's intra-op pool (KernelContext_ParallelFor);
//   - with no scope (the numpy module) the core uses its own persistent pool, sized by
//     set_num_threads, started once and reused; it runs serially when its threads cannot be
//     started, and when it is busy with another caller's loop (no pool is oversubscribed).
// Every loop index is processed exactly once with no shared accumulators, so results do not
// depend on the executor or the thread count.
#pragma once

#include <cstdint>

namespace lsoftmax {

// Processes indices [begin, end) of a loop.
using RangeBody = void (*)(void* body_ctx, int64_t begin, int64_t end);

// Splits [0, n) into contiguous ranges of at least `grain` indices (except the last) and calls
// body on each, possibly concurrently; returns once every range ran. Returns false, having run
// nothing, when it cannot run the loop (the core then runs it serially on the calling thread).
using ParallelForFn = bool (*)(void* ctx, int64_t n, int64_t grain, RangeBody body,
                               void* body_ctx);

struct ParallelFor {
  ParallelForFn run = nullptr;  // null: serial
  void* ctx = nullptr;
};

// Installs `pf` for the core calls made on this thread while the scope lives (scopes nest).
class ParallelScope {
 public:
  explicit ParallelScope(ParallelFor pf) noexcept;
  ~ParallelScope();
  ParallelScope(const ParallelScope&) = delete;
  ParallelScope& operator=(const ParallelScope&) = delete;

 private:
  ParallelFor previous_;
  bool had_previous_;
};

// The executor the core uses on this thread now: the innermost scope's, else the core's pool.
ParallelFor current_parallel_for() noexcept;

// Runs serially on the calling thread.
ParallelFor serial_parallel_for() noexcept;

// Threads of the core's own pool, used only where no caller installed a ParallelFor (default:
// LSOFTMAX_NUM_THREADS, else the hardware concurrency). The pool (re)starts on its next use.
void set_num_threads(int n);
int get_num_threads();

}  // namespace lsoftmax
