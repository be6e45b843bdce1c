// Pieces shared by CUDA-EP kernels (g++-compiled glue): scratch memory from ORT's own device
// allocator and the host-side label check of labels declared as CPU inputs.
// (lsoftmax_linear_cuda.cc has its own copies of both, which can move here.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ort_utils.h"

namespace lsoftmax_ort {

// One device block from ORT's allocator for a kernel's scratch buffers. Returned to the arena
// when the kernel returns: ORT runs a session's CUDA kernels on one compute stream, so any later
// user of the block is ordered after this kernel's launches on that stream.
class OrtDeviceScratch {
 public:
  OrtDeviceScratch(Ort::KernelContext& ctx, const OrtMemoryInfo* info, size_t bytes)
      : allocator_(ctx.GetAllocator(*info)) {
    if (bytes == 0) return;
    data_ = allocator_->Alloc(allocator_, bytes);
    if (data_ == nullptr) {
      Ort::GetApi().ReleaseAllocator(allocator_);
      throw std::runtime_error("ORT's device allocator returned no memory for " +
                               std::to_string(bytes) + " bytes of scratch space");
    }
  }
  ~OrtDeviceScratch() {
    if (data_ != nullptr) allocator_->Free(allocator_, data_);
    Ort::GetApi().ReleaseAllocator(allocator_);
  }
  OrtDeviceScratch(const OrtDeviceScratch&) = delete;
  OrtDeviceScratch& operator=(const OrtDeviceScratch&) = delete;
  char* data() const { return static_cast<char*>(data_); }

 private:
  OrtAllocator* allocator_;
  void* data_ = nullptr;
};

// Carves aligned pieces out of one scratch block: first pass (base == nullptr) to size it, second
// to hand out pointers at the same offsets.
class ScratchLayout {
 public:
  explicit ScratchLayout(char* base) : base_(base) {}
  void* take(size_t bytes) {
    void* p = base_ == nullptr ? nullptr : base_ + offset_;
    offset_ += (bytes + kAlign - 1) / kAlign * kAlign;
    return p;
  }
  size_t size() const { return offset_; }

 private:
  static constexpr size_t kAlign = 256;
  char* base_;
  size_t offset_ = 0;
};

// Labels on the host: the CPU core's message for the first one outside [0, c).
template <typename L>
OrtStatus* check_labels_on_host(const char* op, const L* labels, int64_t n, int64_t c) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = static_cast<int64_t>(labels[i]);
    if (y < 0 || y >= c) {
      return invalid_argument(op, "labels[" + std::to_string(i) + "] = " + std::to_string(y) +
                                      " is out of range [0, " + std::to_string(c) + ")");
    }
  }
  return nullptr;
}

}  // namespace lsoftmax_ort
