#include "torch_view.h"

#include <string>

#include "checks.h"
#include "longattn/errors.h"

namespace py = pybind11;

namespace longattn {
namespace {

// Leaked on purpose: py::objects must not be released after the interpreter has finalized.
std::vector<py::object>& torch_dtypes() {
  static auto* table = new std::vector<py::object>();
  return *table;
}

// A new reference from a CPython call, or the pending Python exception rethrown.
py::object checked(PyObject* o) {
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

int64_t tuple_int(PyObject* tuple, Py_ssize_t i) {
  const long long x = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple, i));
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  return x;
}

}  // namespace

void set_torch_dtypes(const std::vector<py::object>& dtypes) {
  LONGATTN_CHECK_VALUE(dtypes.size() == size_t(DType::Int64) + 1,
                       "set_torch_dtypes: pass float32, float64, float16, bfloat16, int32, int64");
  torch_dtypes() = dtypes;
}

// Raw CPython calls with interned names: pybind's attr("...") makes and hashes a new string
// on every lookup, which made describing a tensor cost ~0.5 us instead of ~0.15.
TensorView torch_cpu_view(py::handle t, const char* op, const char* name, DType first, DType last,
                          const char* expected) {
  using checks::cat;
  static PyObject* const s_dtype = PyUnicode_InternFromString("dtype");
  static PyObject* const s_is_cpu = PyUnicode_InternFromString("is_cpu");
  static PyObject* const s_shape = PyUnicode_InternFromString("shape");
  static PyObject* const s_stride = PyUnicode_InternFromString("stride");
  static PyObject* const s_data_ptr = PyUnicode_InternFromString("data_ptr");
  py::object dt = checked(PyObject_GetAttr(t.ptr(), s_dtype));
  const auto& table = torch_dtypes();
  int code = -1;
  for (size_t i = 0; i < table.size(); ++i)
    if (dt.is(table[i])) code = int(i);
  if (code < int(first) || code > int(last)) {
    std::string got = py::str(dt);
    if (got.rfind("torch.", 0) == 0) got = got.substr(6);
    raise(ErrorKind::Type, cat(op, ": ", name, " must be ", expected, ", got ", got));
  }
  LONGATTN_CHECK_VALUE(checked(PyObject_GetAttr(t.ptr(), s_is_cpu)).ptr() == Py_True,
                       cat(op, ": ", name, " is not a CPU tensor"));
  py::object shape = checked(PyObject_GetAttr(t.ptr(), s_shape));
  py::object stride = checked(PyObject_CallMethodNoArgs(t.ptr(), s_stride));
  py::object ptr = checked(PyObject_CallMethodNoArgs(t.ptr(), s_data_ptr));
  LONGATTN_CHECK_VALUE(PyTuple_Check(shape.ptr()) && PyTuple_Check(stride.ptr()) &&
                           PyTuple_GET_SIZE(shape.ptr()) == PyTuple_GET_SIZE(stride.ptr()) &&
                           PyTuple_GET_SIZE(shape.ptr()) <= kMaxDims,
                       cat(op, ": ", name, " must have at most ", kMaxDims, " dims"));
  TensorView v;
  v.data = reinterpret_cast<void*>(static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(ptr.ptr())));
  if (PyErr_Occurred()) throw py::error_already_set();
  v.dtype = DType(code);
  v.device = DeviceType::CPU;
  v.device_id = 0;
  v.ndim = int(PyTuple_GET_SIZE(shape.ptr()));
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = tuple_int(shape.ptr(), i);
    v.stride[i] = tuple_int(stride.ptr(), i);
  }
  return v;
}

TensorView torch_cpu_float_view(py::handle t, const char* op, const char* name) {
  return torch_cpu_view(t, op, name, DType::Float32, DType::BFloat16, "float16, bfloat16, float32 or float64");
}

bool torch_cpu_view_opt(py::handle t, const char* op, const char* name, DType first, DType last,
                        const char* expected, TensorView& view) {
  if (t.is_none()) return false;
  view = torch_cpu_view(t, op, name, first, last, expected);
  return true;
}

}  // namespace longattn
