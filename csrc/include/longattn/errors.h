// Errors crossing the kernel boundary. Kernels and launchers return status values;
// the binding layer (csrc/python) turns longattn::Error into the matching Python exception.
#pragma once

#include <stdexcept>
#include <string>

namespace longattn {

enum class ErrorKind { Value, Type, Runtime, NotImplemented };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& msg) : std::runtime_error(msg), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

[[noreturn]] inline void raise(ErrorKind kind, const std::string& msg) { throw Error(kind, msg); }

}  // namespace longattn

#define LONGATTN_CHECK_VALUE(cond, msg)                              \
  do {                                                               \
    if (!(cond)) ::longattn::raise(::longattn::ErrorKind::Value, msg); \
  } while (0)

#define LONGATTN_CHECK_TYPE(cond, msg)                              \
  do {                                                              \
    if (!(cond)) ::longattn::raise(::longattn::ErrorKind::Type, msg); \
  } while (0)
