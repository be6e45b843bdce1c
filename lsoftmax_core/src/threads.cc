#include <atomic>
#include <cstdlib>
#include <thread>

#include "lsoftmax/lsoftmax.h"

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

}  // namespace

void set_num_threads(int n) { thread_setting().store(n > 0 ? n : default_threads()); }
int get_num_threads() { return thread_setting().load(); }

}  // namespace lsoftmax
