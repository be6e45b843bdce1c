// Error reporting shared by every entry point of the core. Adapters turn a failed Status into
// their own error kind (a Python ValueError, an ONNX Runtime INVALID_ARGUMENT status).
#pragma once

#include <string>
#include <utility>

namespace lsoftmax {

class Status {
 public:
  enum class Code { kOk, kInvalidArgument, kRuntimeError };

  Status() = default;
  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string message) {
    return Status(Code::kInvalidArgument, std::move(message));
  }
  static Status RuntimeError(std::string message) {
    return Status(Code::kRuntimeError, std::move(message));
  }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}
  Code code_ = Code::kOk;
  std::string message_;
};

}  // namespace lsoftmax
