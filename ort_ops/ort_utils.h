// Helpers shared by the ai.lsoftmax kernels: API version, status conversion, attributes, dtypes.
#pragma once

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT
#endif
#include <onnxruntime_cxx_api.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "lsoftmax/parallel.h"
#include "lsoftmax/status.h"

#define LSOFTMAX_ORT_EXPORT __attribute__((visibility("default")))

namespace lsoftmax_ort {

// The oldest ORT API this library uses: CreateKernelV2/KernelComputeV2 (errors returned as a
// status instead of thrown across the C boundary) arrived with API 16 (onnxruntime 1.16);
// CreateOp/InvokeOp (ORT's own Gemm from inside a kernel) with 12. Every op sets
// OrtCustomOp::version to this, so newer runtimes read only the fields that existed then.
constexpr uint32_t kMinOrtApiVersion = 16;

constexpr const char* kDomain = "ai.lsoftmax";
constexpr int kDomainVersion = 1;

// Kernel invocations since load (or the last reset), for tests that must prove which
// implementation of a node ran (our kernel, or a model-local function body).
std::atomic<int64_t>& kernel_calls();

inline OrtStatus* make_status(OrtErrorCode code, const std::string& message) {
  return Ort::GetApi().CreateStatus(code, message.c_str());
}

inline OrtStatus* invalid_argument(const std::string& op, const std::string& message) {
  return make_status(ORT_INVALID_ARGUMENT, op + ": " + message);
}

// The core's Status as an ORT status (nullptr when ok), prefixed with the op name.
inline OrtStatus* to_ort_status(const std::string& op, const lsoftmax::Status& s) {
  if (s.ok()) return nullptr;
  const OrtErrorCode code = s.code() == lsoftmax::Status::Code::kInvalidArgument
                                ? ORT_INVALID_ARGUMENT
                                : ORT_RUNTIME_EXCEPTION;
  return make_status(code, op + ": " + s.message());
}

// Reads an optional attribute: true when the node carries it (the caller then decides between a
// default and an error; ConstKernelInfo::GetAttribute would throw instead).
inline bool try_attribute(const OrtKernelInfo* info, const char* name, int64_t* value) {
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, value);
  if (st == nullptr) return true;
  Ort::GetApi().ReleaseStatus(st);
  return false;
}

inline bool try_attribute(const OrtKernelInfo* info, const char* name, float* value) {
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_float(info, name, value);
  if (st == nullptr) return true;
  Ort::GetApi().ReleaseStatus(st);
  return false;
}

// The type an attribute has on the node ("" when the node lacks it), found by asking ORT for
// each type in turn: the kernels' attributes have one type each, and any other one is a model
// error to report at session creation, never a silent default.
std::string attribute_type(const OrtKernelInfo* info, const char* name);

// Reads an optional float attribute into *value, which keeps its default when the node lacks it;
// one of any other type (int, string, list, tensor) is an error naming the attribute.
OrtStatus* read_float_attribute(const OrtKernelInfo* info, const char* op, const char* name,
                                float* value);

// The same for an int attribute; *present says whether the node carries it (may be null).
OrtStatus* read_int_attribute(const OrtKernelInfo* info, const char* op, const char* name,
                              int64_t* value, bool* present = nullptr);

// The same for a string attribute.
OrtStatus* read_string_attribute(const OrtKernelInfo* info, const char* op, const char* name,
                                 std::string* value, bool* present = nullptr);

// A float64 parameter carried as two float attributes, NAME (its float32 part, default
// `fallback`) and NAME_lo (the rest, default 0): *value = NAME + NAME_lo in double. A non-finite
// NAME_lo is an error naming it (NAME itself is checked by the op's rules).
OrtStatus* read_split_float_attribute(const OrtKernelInfo* info, const char* op,
                                      const std::string& name, float fallback, double* value);

template <typename T>
constexpr ONNXTensorElementDataType onnx_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> ||
                    std::is_same_v<T, int32_t> || std::is_same_v<T, int64_t>,
                "unsupported element type");
  if constexpr (std::is_same_v<T, float>) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if constexpr (std::is_same_v<T, double>) return ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
  if constexpr (std::is_same_v<T, int32_t>) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
}

const char* type_name(ONNXTensorElementDataType t);

std::string shape_string(const std::vector<int64_t>& shape);

// "input NAME must be 2-D DIMS, got shape ..." unless `shape` has two dimensions.
OrtStatus* check_2d(const char* op, const char* input, const char* dims,
                    const std::vector<int64_t>& shape);

// "input X has D features per row but input NAME has GOT": the start of the message for
// inputs whose feature counts disagree.
std::string features_mismatch(int64_t d, const char* input, int64_t got);

// Input `index` of the node, or an empty value when that optional input is absent.
Ort::ConstValue optional_input(Ort::KernelContext& ctx, size_t index);

// The optional labels input: int64 or int32, shape (n,) to match X. Stores the element type.
OrtStatus* check_labels_input(const char* op, const Ort::ConstValue& labels, int64_t n,
                              ONNXTensorElementDataType* type);

// ORT's Gemm computing Y = X B^T, for CPU kernels. Op::Create applies no schema defaults, so
// every attribute is given explicitly.
template <typename T>
Ort::Op make_gemm(const OrtKernelInfo* info) {
  const char* type_names[] = {"T"};
  const ONNXTensorElementDataType types[] = {onnx_type<T>()};
  const float alpha = 1.0f, beta = 0.0f;
  const int64_t trans_a = 0, trans_b = 1;
  Ort::OpAttr attrs[] = {
      Ort::OpAttr("alpha", &alpha, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT),
      Ort::OpAttr("beta", &beta, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT),
      Ort::OpAttr("transA", &trans_a, 1, OrtOpAttrType::ORT_OP_ATTR_INT),
      Ort::OpAttr("transB", &trans_b, 1, OrtOpAttrType::ORT_OP_ATTR_INT),
  };
  return Ort::Op::Create(info, "Gemm", "", 13, type_names, types, 1, attrs, 4, /*inputs=*/2,
                         /*outputs=*/1);
}

// What the ai.lsoftmax ops declare alike: kInputs inputs of type T except the last, the optional
// labels, which take any type here so that a wrong one gets a run-time error naming the input
// rather than a graph error about a missing kernel; kOutputs outputs of type T. A CUDA-EP op
// takes its labels as a CPU input, so they are checked on the host with no device sync.
template <typename Op, typename Kernel, typename T, size_t kInputs, size_t kOutputs,
          bool kCudaEp = false>
struct LabelledOpBase : Ort::CustomOpBase<Op, Kernel, /*WithStatus=*/true> {
  // Declare the oldest API whose OrtCustomOp fields we fill, so every runtime from that version
  // on reads the op the same way (CustomOpBase would claim the headers' version).
  LabelledOpBase() { OrtCustomOp::version = kMinOrtApiVersion; }
  const char* GetExecutionProviderType() const {
    return kCudaEp ? "CUDAExecutionProvider" : nullptr;
  }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index + 1 < kInputs ? onnx_type<T>() : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index + 1 == kInputs ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                                : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  OrtMemType GetInputMemoryType(size_t index) const {
    return kCudaEp && index + 1 == kInputs ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  size_t GetOutputTypeCount() const { return kOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return onnx_type<T>(); }
};

// Runs `fn` (returning OrtStatus*) and turns any exception into a status, so nothing thrown
// ever crosses the C boundary into the runtime.
template <typename F>
OrtStatus* guarded(const char* op, F&& fn) noexcept {
  try {
    return fn();
  } catch (const Ort::Exception& e) {
    return make_status(e.GetOrtErrorCode(), std::string(op) + ": " + e.what());
  } catch (const std::exception& e) {
    return make_status(ORT_RUNTIME_EXCEPTION, std::string(op) + ": " + e.what());
  } catch (...) {
    return make_status(ORT_RUNTIME_EXCEPTION, std::string(op) + ": unknown error");
  }
}

// The core's loops inside a kernel run on the session's intra-op pool through
// KernelContext_ParallelFor (ORT API 17, onnxruntime 1.17); on older runtimes, serially on the
// calling thread (never on threads of our own). init_parallel_api runs at registration.
void init_parallel_api(const OrtApiBase* base);
lsoftmax::ParallelFor ort_parallel_for(OrtKernelContext* context);

// A kernel's Compute: counts the call (kernel_calls) and runs `body(ctx)` guarded, with the
// core's loops on ORT's pool.
template <typename F>
OrtStatus* compute_guarded(const char* op, OrtKernelContext* context, F&& body) noexcept {
  return guarded(op, [&]() -> OrtStatus* {
    kernel_calls().fetch_add(1, std::memory_order_relaxed);
    const lsoftmax::ParallelScope pool(ort_parallel_for(context));
    Ort::KernelContext ctx(context);
    return body(ctx);
  });
}

}  // namespace lsoftmax_ort
