// The core's loops on the session's intra-op thread pool (see ort_utils.h).
#include <algorithm>
#include <atomic>
#include <cstdio>

#include "ort_utils.h"

namespace lsoftmax_ort {
namespace {

// KernelContext_ParallelFor appeared in ORT API 17; the library declares API 16, so the table
// that has it is asked for only when the runtime says it is new enough (GetApi(17) on 1.16
// would print an error).
std::atomic<const OrtApi*> g_api17{nullptr};

// More ranges than threads lets ORT balance them; each range still carries >= grain indices.
constexpr int64_t kMaxRanges = 64;

struct Loop {
  int64_t n, chunk;
  lsoftmax::RangeBody body;
  void* body_ctx;
};

void run_range(void* loop_ptr, size_t r) {
  const Loop& loop = *static_cast<const Loop*>(loop_ptr);
  const int64_t begin = static_cast<int64_t>(r) * loop.chunk;
  loop.body(loop.body_ctx, begin, std::min(loop.n, begin + loop.chunk));
}

bool ort_run(void* ctx, int64_t n, int64_t grain, lsoftmax::RangeBody body, void* body_ctx) {
  const OrtApi* api = g_api17.load(std::memory_order_acquire);
  if (api == nullptr) return false;
  const int64_t ranges = std::min<int64_t>(kMaxRanges, (n + grain - 1) / grain);
  if (ranges <= 1) return false;
  Loop loop{n, (n + ranges - 1) / ranges, body, body_ctx};
  // ORT checks its arguments before running anything, so a failure means nothing ran and the
  // core may run the loop itself.
  OrtStatus* st = api->KernelContext_ParallelFor(static_cast<const OrtKernelContext*>(ctx),
                                                 &run_range, static_cast<size_t>(ranges), 0,
                                                 &loop);
  if (st == nullptr) return true;
  api->ReleaseStatus(st);
  return false;
}

}  // namespace

void init_parallel_api(const OrtApiBase* base) {
  unsigned major = 0, minor = 0;
  const char* version = base->GetVersionString();
  if (version == nullptr || std::sscanf(version, "%u.%u", &major, &minor) != 2) return;
  if (major > 1 || (major == 1 && minor >= 17)) {
    g_api17.store(base->GetApi(17), std::memory_order_release);
  }
}

lsoftmax::ParallelFor ort_parallel_for(OrtKernelContext* context) {
  if (g_api17.load(std::memory_order_acquire) == nullptr) return lsoftmax::serial_parallel_for();
  return lsoftmax::ParallelFor{&ort_run, context};
}

}  // namespace lsoftmax_ort
