// Out-of-line parts of ort_utils.h and the debug counter's C entry points.
#include "ort_utils.h"

#include <cmath>
#include <string>
#include <vector>

namespace lsoftmax_ort {

std::atomic<int64_t>& kernel_calls() {
  static std::atomic<int64_t> calls{0};
  return calls;
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "uint32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "uint64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "string";
    default: return "an unsupported type";
  }
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

std::string attribute_type(const OrtKernelInfo* info, const char* name) {
  const OrtApi& api = Ort::GetApi();
  auto ok = [&](OrtStatus* st) {
    if (st == nullptr) return true;
    api.ReleaseStatus(st);
    return false;
  };
  float f = 0.0f;
  int64_t i = 0;
  size_t size = 0;
  if (ok(api.KernelInfoGetAttribute_float(info, name, &f))) return "float";
  if (ok(api.KernelInfoGetAttribute_int64(info, name, &i))) return "int";
  if (ok(api.KernelInfoGetAttribute_string(info, name, nullptr, &size))) return "string";
  OrtAllocator* alloc = nullptr;
  if (ok(api.GetAllocatorWithDefaultOptions(&alloc))) {
    OrtValue* tensor = nullptr;
    if (ok(api.KernelInfoGetAttribute_tensor(info, name, alloc, &tensor))) {
      api.ReleaseValue(tensor);
      return "tensor";
    }
  }
  // A size query (null buffer) does not check the element type (a list of the other type can
  // answer with size 0): fetch the values to tell.
  bool is_list = false;
  if (ok(api.KernelInfoGetAttributeArray_float(info, name, nullptr, &size))) {
    is_list = true;
    std::vector<float> values(size);
    if (size > 0 && ok(api.KernelInfoGetAttributeArray_float(info, name, values.data(), &size))) {
      return "list of floats";
    }
  }
  if (ok(api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size))) {
    is_list = true;
    std::vector<int64_t> values(size);
    if (size > 0 && ok(api.KernelInfoGetAttributeArray_int64(info, name, values.data(), &size))) {
      return "list of ints";
    }
  }
  if (is_list) return "list";
  return "";
}

namespace {

OrtStatus* wrong_type(const char* op, const char* name, const char* want, const std::string& got) {
  return invalid_argument(op, std::string("attribute '") + name + "' must be " + want +
                                  ", got " + (got == "int" ? "an int" : "a " + got));
}

}  // namespace

OrtStatus* read_float_attribute(const OrtKernelInfo* info, const char* op, const char* name,
                                float* value) {
  if (try_attribute(info, name, value)) return nullptr;
  const std::string type = attribute_type(info, name);
  return type.empty() ? nullptr : wrong_type(op, name, "a float", type);
}

OrtStatus* read_int_attribute(const OrtKernelInfo* info, const char* op, const char* name,
                              int64_t* value, bool* present) {
  const bool found = try_attribute(info, name, value);
  if (present) *present = found;
  if (found) return nullptr;
  const std::string type = attribute_type(info, name);
  return type.empty() ? nullptr : wrong_type(op, name, "an int", type);
}

OrtStatus* read_string_attribute(const OrtKernelInfo* info, const char* op, const char* name,
                                 std::string* value, bool* present) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (st == nullptr) {
    std::string buf(size, '\0');
    Ort::ThrowOnError(api.KernelInfoGetAttribute_string(info, name, buf.data(), &size));
    if (!buf.empty() && buf.back() == '\0') buf.pop_back();  // size counts the terminator
    *value = buf;
    if (present) *present = true;
    return nullptr;
  }
  api.ReleaseStatus(st);
  if (present) *present = false;
  const std::string type = attribute_type(info, name);
  return type.empty() ? nullptr : wrong_type(op, name, "a string", type);
}

OrtStatus* read_split_float_attribute(const OrtKernelInfo* info, const char* op,
                                      const std::string& name, float fallback, double* value) {
  float hi = fallback, lo = 0.0f;
  if (OrtStatus* bad = read_float_attribute(info, op, name.c_str(), &hi)) return bad;
  const std::string lo_name = name + "_lo";
  if (OrtStatus* bad = read_float_attribute(info, op, lo_name.c_str(), &lo)) return bad;
  if (!std::isfinite(lo)) {
    return invalid_argument(op, "attribute " + lo_name + " must be finite, got " +
                                    std::to_string(lo));
  }
  *value = static_cast<double>(hi) + static_cast<double>(lo);
  return nullptr;
}

OrtStatus* check_2d(const char* op, const char* input, const char* dims,
                    const std::vector<int64_t>& shape) {
  if (shape.size() == 2) return nullptr;
  return invalid_argument(op, std::string("input ") + input + " must be 2-D " + dims +
                                  ", got shape " + shape_string(shape));
}

std::string features_mismatch(int64_t d, const char* input, int64_t got) {
  return "input X has " + std::to_string(d) + " features per row but input " + input + " has " +
         std::to_string(got);
}

Ort::ConstValue optional_input(Ort::KernelContext& ctx, size_t index) {
  if (ctx.GetInputCount() > index) return ctx.GetInput(index);
  return Ort::ConstValue{nullptr};
}

OrtStatus* check_labels_input(const char* op, const Ort::ConstValue& labels, int64_t n,
                              ONNXTensorElementDataType* type) {
  const Ort::TensorTypeAndShapeInfo info = labels.GetTensorTypeAndShapeInfo();
  *type = info.GetElementType();
  if (*type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 &&
      *type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
    return invalid_argument(op, std::string("input labels must be int64 or int32, got ") +
                                    type_name(*type));
  }
  const std::vector<int64_t> shape = info.GetShape();
  if (shape.size() != 1 || shape[0] != n) {
    return invalid_argument(op, "input labels must have shape (" + std::to_string(n) +
                                    ",) to match X, got " + shape_string(shape));
  }
  return nullptr;
}

}  // namespace lsoftmax_ort

extern "C" {

// Read from Python with ctypes on the same .so path the session loaded.
LSOFTMAX_ORT_EXPORT int64_t lsoftmax_ort_kernel_calls(void) {
  return lsoftmax_ort::kernel_calls().load();
}

LSOFTMAX_ORT_EXPORT void lsoftmax_ort_reset_kernel_calls(void) {
  lsoftmax_ort::kernel_calls().store(0);
}

}  // extern "C"
