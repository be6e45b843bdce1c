// The core's parallel loop: runs on the caller's executor (see lsoftmax/parallel.h). Every index
// is processed by exactly one thread with no shared accumulators, so results are identical for
// every executor and thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "lsoftmax/parallel.h"

namespace lsoftmax {
namespace detail {

// Below this much work (items x cost) per range, handing a range to another thread costs more
// than it saves.
constexpr int64_t kMinWorkPerThread = 1 << 15;

template <typename F>
void parallel_for(int64_t n, int64_t cost_per_item, F&& fn) {
  if (n <= 0) return;
  using Fn = std::remove_reference_t<F>;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(cost_per_item, 1));
  if (n > grain) {
    const ParallelFor pf = current_parallel_for();
    const RangeBody body = [](void* ctx, int64_t begin, int64_t end) {
      Fn& f = *static_cast<Fn*>(ctx);
      for (int64_t i = begin; i < end; ++i) f(i);
    };
    void* ctx = const_cast<void*>(static_cast<const void*>(std::addressof(fn)));
    if (pf.run != nullptr && pf.run(pf.ctx, n, grain, body, ctx)) return;
  }
  for (int64_t i = 0; i < n; ++i) fn(i);
}

}  // namespace detail
}  // namespace lsoftmax
