// Argument checks shared by every op's binding: each failure names the op, the argument,
// what was expected and what came.
#pragma once

#include <sstream>
#include <string>

#include "longattn/errors.h"
#include "longattn/tensor.h"

namespace longattn {
namespace checks {

inline std::string shape_str(const TensorView& t) {
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < t.ndim; ++i) os << (i ? ", " : "") << t.shape[i];
  os << (t.ndim == 1 ? ",)" : ")");
  return os.str();
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

inline void ndim(const char* op, const char* name, const TensorView& t, int expected, const char* layout) {
  LONGATTN_CHECK_VALUE(t.ndim == expected, cat(op, ": ", name, " must have ", expected, " dims ", layout, ", got shape ",
                                               shape_str(t)));
}

inline void dim_equals(const char* op, const char* name, const TensorView& t, int dim, int64_t expected,
                       const char* what) {
  LONGATTN_CHECK_VALUE(t.shape[dim] == expected, cat(op, ": ", name, " must have ", what, " = ", expected,
                                                     " (dim ", dim, "), got shape ", shape_str(t)));
}

inline void last_dim_contiguous(const char* op, const char* name, const TensorView& t) {
  // Empty arrays are exempt: NumPy reports all-zero strides for them.
  LONGATTN_CHECK_VALUE(t.ndim == 0 || t.numel() == 0 || t.shape[t.ndim - 1] <= 1 || t.stride[t.ndim - 1] == 1,
                       cat(op, ": ", name, " must be contiguous in its last dim (stride 1), got stride ",
                           t.stride[t.ndim - 1]));
}

// An output whose elements overlap (a broadcast, stride-0 view) would be written by
// several threads at once.
inline void no_broadcast(const char* op, const char* name, const TensorView& t) {
  if (t.numel() == 0) return;
  for (int d = 0; d < t.ndim; ++d)
    LONGATTN_CHECK_VALUE(t.shape[d] <= 1 || t.stride[d] != 0,
                         cat(op, ": ", name, " is written but has stride 0 in dim ", d,
                             " (a broadcast view); pass an array that owns its elements"));
}

inline void same_dtype(const char* op, const char* name, const TensorView& t, const char* ref_name,
                       const TensorView& ref);
inline void same_device(const char* op, const char* name, const TensorView& t, const char* ref_name,
                        const TensorView& ref);
inline void last_dim_contiguous(const char* op, const char* name, const TensorView& t);

// A gradient argument: the shape of `ref`, q's dtype and device, contiguous last dim.
inline void grad_like(const char* op, const char* name, const TensorView& t, const TensorView& ref,
                      const char* ref_name, const TensorView& q) {
  LONGATTN_CHECK_VALUE(t.ndim == ref.ndim, cat(op, ": ", name, " must have the shape of ", ref_name));
  for (int d = 0; d < t.ndim; ++d)
    LONGATTN_CHECK_VALUE(t.shape[d] == ref.shape[d],
                         cat(op, ": ", name, " has shape ", shape_str(t), ", expected ", shape_str(ref)));
  same_dtype(op, name, t, "q", q);
  same_device(op, name, t, "q", q);
  last_dim_contiguous(op, name, t);
}

inline void same_dtype(const char* op, const char* name, const TensorView& t, const char* ref_name,
                       const TensorView& ref) {
  LONGATTN_CHECK_TYPE(t.dtype == ref.dtype, cat(op, ": ", name, " must have the dtype of ", ref_name, " (",
                                                dtype_name(ref.dtype), "), got ", dtype_name(t.dtype)));
}

inline void same_device(const char* op, const char* name, const TensorView& t, const char* ref_name,
                        const TensorView& ref) {
  LONGATTN_CHECK_VALUE(t.device == ref.device && t.device_id == ref.device_id,
                       cat(op, ": ", name, " must be on the device of ", ref_name, ", got ",
                           t.device == DeviceType::CUDA ? "cuda:" : "cpu:", t.device_id, " vs ",
                           ref.device == DeviceType::CUDA ? "cuda:" : "cpu:", ref.device_id));
}

inline void float_dtype(const char* op, const char* name, const TensorView& t, bool cuda) {
  const bool ok = t.dtype == DType::Float32 || t.dtype == DType::Float16 || t.dtype == DType::BFloat16 ||
                  (!cuda && t.dtype == DType::Float64);
  LONGATTN_CHECK_TYPE(ok, cat(op, ": ", name, " must be ",
                              cuda ? "float16, bfloat16 or float32 on CUDA" : "float16, bfloat16, float32 or float64",
                              ", got ", dtype_name(t.dtype)));
}

}  // namespace checks
}  // namespace longattn
