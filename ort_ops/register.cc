// Registration of the ai.lsoftmax domain (opset version 1) with ONNX Runtime.
//
// Adding an op or an execution-provider kernel: put it in its own file (e.g.
// ort_ops/lgm_logits_op.cc, or ort_ops/lsoftmax_linear_cuda.cc + ort_ops/cuda/*.cu, which the
// CMake globs pick up) with a function `std::vector<const OrtCustomOp*> NameOps()` in namespace
// lsoftmax_ort returning its static op objects (OrtCustomOp::version = kMinOrtApiVersion), then
// add ONE line X(NameOps) to the list below (CUDA-EP ops to the CUDA list). Register every dtype a
// kernel supports: once the library is registered, its type constraints rule, and an op that
// exists only for the CUDA EP makes CPU sessions of that op fail.
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "ort_utils.h"

#define LSOFTMAX_ORT_CPU_OPS(X) X(LSoftmaxLinearCpuOps) X(LGMLogitsCpuOps) X(MarginLinearCpuOps)

#ifdef LSOFTMAX_WITH_CUDA
#define LSOFTMAX_ORT_CUDA_OPS(X) X(LSoftmaxLinearCudaOps) X(LGMLogitsCudaOps) X(MarginLinearCudaOps)
#else
#define LSOFTMAX_ORT_CUDA_OPS(X)
#endif

namespace lsoftmax_ort {

#define LSOFTMAX_ORT_DECLARE(name) std::vector<const OrtCustomOp*> name();
LSOFTMAX_ORT_CPU_OPS(LSOFTMAX_ORT_DECLARE)
LSOFTMAX_ORT_CUDA_OPS(LSOFTMAX_ORT_DECLARE)
#undef LSOFTMAX_ORT_DECLARE

namespace {

std::vector<const OrtCustomOp*> all_ops() {
  std::vector<const OrtCustomOp*> ops;
#define LSOFTMAX_ORT_APPEND(name) \
  for (const OrtCustomOp* op : name()) ops.push_back(op);
  LSOFTMAX_ORT_CPU_OPS(LSOFTMAX_ORT_APPEND)
  LSOFTMAX_ORT_CUDA_OPS(LSOFTMAX_ORT_APPEND)
#undef LSOFTMAX_ORT_APPEND
  return ops;
}

// A domain object must outlive every session registered with it; one is made per
// RegisterCustomOps call (a session's registry accepts a domain once) and kept until unload.
std::mutex g_domains_mutex;
std::deque<Ort::CustomOpDomain> g_domains;

}  // namespace
}  // namespace lsoftmax_ort

extern "C" LSOFTMAX_ORT_EXPORT OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace lsoftmax_ort;
  const OrtApi* api = api_base->GetApi(kMinOrtApiVersion);
  if (api == nullptr) {
    // Version 1 of the API exists in every runtime, so the error can still be reported.
    const std::string msg = std::string("liblsoftmax_ort needs ONNX Runtime API version ") +
                            std::to_string(kMinOrtApiVersion) + " (onnxruntime >= 1." +
                            std::to_string(kMinOrtApiVersion) + "); this runtime is " +
                            api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, msg.c_str());
  }
  Ort::InitApi(api);
  init_parallel_api(api_base);
  return guarded("RegisterCustomOps", [&]() -> OrtStatus* {
    Ort::CustomOpDomain domain(kDomain);
    for (const OrtCustomOp* op : all_ops()) domain.Add(op);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(g_domains_mutex);
    g_domains.push_back(std::move(domain));
    return nullptr;
  });
}
