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

}  // namespace lsoftmax_ort
