// A schedule's value at a step counter that lives on the device (a module's buffer), computed on
// the device so that training reads no step back to the host: no sync per step, and the step,
// the lambda and the margin kernels that read it can all be captured in a CUDA graph.
#include "cuda_common.cuh"
#include "lsoftmax/schedule_math.h"
#include "lsoftmax/schedules.h"

namespace lsoftmax::cuda {
namespace {

// One value: a single thread (a launch costs the same however small the work).
__global__ void schedule_kernel(ScheduleSpec spec, const int64_t* step, double* out) {
  *out = lsoftmax::schedule_value(spec, *step);
}

}  // namespace

Status evaluate_schedule(const ScheduleSpec& spec, const int64_t* step, double* out,
                         void* stream) {
  Status s = validate_schedule(spec);
  if (!s.ok()) return s;
  if (step == nullptr) return Status::InvalidArgument("step is a null pointer");
  if (out == nullptr) return Status::InvalidArgument("out is a null pointer");
  schedule_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(spec, step, out);
  return detail::launch_status("lsoftmax schedule kernel launch");
}

}  // namespace lsoftmax::cuda
