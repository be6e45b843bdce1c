// A minimal static-partition parallel loop. Every index is processed by exactly one thread with
// no shared accumulators, so results are identical for every thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "lsoftmax/lsoftmax.h"

namespace lsoftmax {
namespace detail {

// Below this much work (items x cost) a thread start costs more than it saves.
constexpr int64_t kMinWorkPerThread = 1 << 15;

template <typename F>
void parallel_for(int64_t n, int64_t cost_per_item, F&& fn) {
  if (n <= 0) return;
  const int64_t by_work = std::max<int64_t>(1, n * std::max<int64_t>(cost_per_item, 1) / kMinWorkPerThread);
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(get_num_threads()), by_work, n});
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t lo = t * chunk, hi = std::min(n, lo + chunk);
    pool.emplace_back([lo, hi, &fn] {
      for (int64_t i = lo; i < hi; ++i) fn(i);
    });
  }
  for (int64_t i = 0; i < std::min(n, chunk); ++i) fn(i);
  for (auto& th : pool) th.join();
}

}  // namespace detail
}  // namespace lsoftmax
