// Executors for the core's loops: the caller's scope, or the core's own persistent pool.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "lsoftmax/parallel.h"

namespace lsoftmax {
namespace {

int default_threads() {
  if (const char* env = std::getenv("LSOFTMAX_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

std::atomic<int>& thread_setting() {
  static std::atomic<int> n{default_threads()};
  return n;
}

// A fixed set of workers started on first use and kept. One loop runs on it at a time: a caller
// that finds it busy (another thread's loop, or a loop nested inside one) runs serially, so the
// pool never holds more runnable threads than it was sized for.
class Pool {
 public:
  bool run(int64_t n, int64_t grain, RangeBody body, void* body_ctx) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    const int want = std::max(1, thread_setting().load());
    if (!ensure_workers(want - 1)) return false;
    const int64_t ranges = std::min<int64_t>(want, (n + grain - 1) / grain);
    if (ranges <= 1) return false;
    {
      std::lock_guard<std::mutex> lock(m_);
      job_ = Job{n, (n + ranges - 1) / ranges, ranges, body, body_ctx};
      next_.store(0);
      active_ = static_cast<int>(workers_->size());
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [&] { return active_ == 0; });
    return true;
  }

 private:
  struct Job {
    int64_t n = 0, chunk = 0, ranges = 0;
    RangeBody body = nullptr;
    void* ctx = nullptr;
  };

  // Starts or restarts the workers for `count` helpers. False when none could be had: threads
  // that fail to start (resource limits) leave the pool smaller, or empty (serial), never abort.
  bool ensure_workers(int count) {
    if (owner_ != getpid()) {
      // A forked child has our memory but not our threads: forget them (never join) and restart.
      workers_ = new std::vector<std::thread>();
      owner_ = getpid();
      failed_for_ = -1;
    }
    if (static_cast<int>(workers_->size()) == count || failed_for_ == count) {
      return !workers_->empty();
    }
    stop_workers();
    for (int i = 0; i < count; ++i) {
      try {
        // The worker starts from the current generation: a job posted before it first takes the
        // lock is still seen as new.
        workers_->emplace_back([this, seen = generation_] { worker(seen); });
      } catch (const std::system_error&) {
        failed_for_ = count;  // do not retry every call until the setting changes
        break;
      }
    }
    return !workers_->empty();
  }

  void stop_workers() {
    if (workers_->empty()) return;
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (std::thread& t : *workers_) t.join();
    workers_->clear();
    std::lock_guard<std::mutex> lock(m_);
    stop_ = false;
  }

  void worker(uint64_t seen) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(m_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
      }
      work();
      std::lock_guard<std::mutex> lock(m_);
      if (--active_ == 0) done_.notify_one();
    }
  }

  // Claims ranges until none is left; the caller and every worker run this.
  void work() {
    for (int64_t r = next_.fetch_add(1); r < job_.ranges; r = next_.fetch_add(1)) {
      const int64_t begin = r * job_.chunk;
      job_.body(job_.ctx, begin, std::min(job_.n, begin + job_.chunk));
    }
  }

  std::mutex busy_;
  std::mutex m_;
  std::condition_variable wake_, done_;
  std::vector<std::thread>* workers_ = new std::vector<std::thread>();  // leaked with the pool
  pid_t owner_ = getpid();
  int failed_for_ = -1;
  uint64_t generation_ = 0;
  bool stop_ = false;
  int active_ = 0;
  Job job_;
  std::atomic<int64_t> next_{0};
};

Pool& pool() {
  // Never destroyed: workers blocked at exit must not be joined by a static destructor.
  static Pool* p = new Pool();
  return *p;
}

bool pool_run(void*, int64_t n, int64_t grain, RangeBody body, void* body_ctx) {
  return pool().run(n, grain, body, body_ctx);
}

thread_local ParallelFor t_current{};
thread_local bool t_has_current = false;

}  // namespace

ParallelScope::ParallelScope(ParallelFor pf) noexcept
    : previous_(t_current), had_previous_(t_has_current) {
  t_current = pf;
  t_has_current = true;
}

ParallelScope::~ParallelScope() {
  t_current = previous_;
  t_has_current = had_previous_;
}

ParallelFor current_parallel_for() noexcept {
  return t_has_current ? t_current : ParallelFor{&pool_run, nullptr};
}

ParallelFor serial_parallel_for() noexcept { return ParallelFor{}; }

void set_num_threads(int n) { thread_setting().store(n > 0 ? n : default_threads()); }
int get_num_threads() { return thread_setting().load(); }

}  // namespace lsoftmax
