// torch CPU tensors described in C++ (for the bindings' CPU fast entries).
//
// A decoding step's kernel takes a few microseconds, about as long as describing its five
// or so tensors in Python (_arrays.wrap + TensorView). The fast entries read torch tensors
// through their public Python attributes instead (dtype, is_cpu, shape, stride(),
// data_ptr()); the module still never links libtorch. torch_ops hands over torch's dtype
// objects at import (set_torch_dtypes).
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

#include "longattn/tensor.h"

namespace longattn {

// torch's dtype objects in DType order: float32, float64, float16, bfloat16, int32, int64.
void set_torch_dtypes(const std::vector<pybind11::object>& dtypes);

// `t` (argument `name` of `op`, a torch CPU tensor) as a TensorView. A dtype outside
// [first, last] (DType codes) raises TypeError "`op`: `name` must be `expected`, got ...";
// a tensor not on the CPU raises ValueError.
TensorView torch_cpu_view(pybind11::handle t, const char* op, const char* name, DType first, DType last,
                          const char* expected);

// torch_cpu_view for q, k, v-like inputs: float16, bfloat16, float32 or float64.
TensorView torch_cpu_float_view(pybind11::handle t, const char* op, const char* name);

// torch_cpu_view of an optional argument: false for None, else fills `view`.
bool torch_cpu_view_opt(pybind11::handle t, const char* op, const char* name, DType first, DType last,
                        const char* expected, TensorView& view);

}  // namespace longattn
