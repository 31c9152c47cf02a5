// pybind11 module longattn._C: the only code that knows about Python. It receives
// framework-free TensorViews built by python/longattn/_arrays.py, checks them, fills the
// kernels' parameter structs, releases the GIL and dispatches to the CPU or CUDA backend.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

#include "checks.h"
#include "longattn/cpu_isa.h"
#include "longattn/errors.h"
#include "longattn/parallel.h"
#include "longattn/rope.h"
#include "longattn/tensor.h"
#include "nvtx.h"

#if defined(LONGATTN_WITH_CUDA)
#include "longattn/cuda_runtime_info.h"
#endif

namespace py = pybind11;
using namespace longattn;

namespace {

TensorView make_view(uintptr_t ptr, int dtype, int device, int device_id, const std::vector<int64_t>& shape,
                     const std::vector<int64_t>& strides) {
  LONGATTN_CHECK_VALUE(shape.size() == strides.size() && shape.size() <= size_t(kMaxDims),
                       "TensorView: shape and strides must have the same length (at most 8)");
  LONGATTN_CHECK_VALUE(dtype >= 0 && dtype <= int(DType::Int64), "TensorView: unknown dtype code");
  LONGATTN_CHECK_VALUE(device == 0 || device == 1, "TensorView: unknown device code");
  TensorView t;
  t.data = reinterpret_cast<void*>(ptr);
  t.dtype = DType(dtype);
  t.device = DeviceType(device);
  t.device_id = device_id;
  t.ndim = int(shape.size());
  for (int i = 0; i < t.ndim; ++i) {
    LONGATTN_CHECK_VALUE(shape[i] >= 0, "TensorView: negative size");
    t.shape[i] = shape[i];
    t.stride[i] = strides[i];
  }
  return t;
}

// Runs a kernel on its backend, turning a CUDA status into a RuntimeError naming it.
template <typename CpuFn, typename CudaFn>
void run_on_backend(const char* kernel, const TensorView& ref, uintptr_t stream, CpuFn cpu_fn, CudaFn cuda_fn) {
  if (ref.device == DeviceType::CPU) {
    py::gil_scoped_release nogil;
    cpu_fn();
    return;
  }
#if defined(LONGATTN_WITH_CUDA)
  int status;
  {
    py::gil_scoped_release nogil;
    cuda::DeviceGuard guard(ref.device_id);
    status = cuda_fn(reinterpret_cast<void*>(stream));
  }
  if (status != 0) raise(ErrorKind::Runtime, checks::cat(kernel, " failed: ", cuda::error_string(status)));
#else
  (void)kernel;
  (void)stream;
  (void)cuda_fn;
  raise(ErrorKind::Runtime, "this build of longattn has no CUDA backend (built with LONGATTN_CUDA=0 or without nvcc)");
#endif
}

void rope(const TensorView& q, const TensorView& q_out, const TensorView* k, const TensorView* k_out,
          const TensorView* positions, const std::vector<float>& inv_freq, double attention_factor,
          bool interleaved, bool conjugate, uintptr_t stream) {
  const char* op = "apply_rope";
  using namespace checks;
  const bool cuda = q.device == DeviceType::CUDA;
  ndim(op, "q", q, 4, "(batch, seq, heads, head_dim)");
  float_dtype(op, "q", q, cuda);
  last_dim_contiguous(op, "q", q);
  const int64_t B = q.shape[0], S = q.shape[1], D = q.shape[3];
  const int64_t half = int64_t(inv_freq.size());
  LONGATTN_CHECK_VALUE(half >= 1 && half <= kRopeMaxHalf,
                       cat(op, ": inv_freq must have 1 to ", kRopeMaxHalf, " entries, got ", half));
  LONGATTN_CHECK_VALUE(2 * half <= D, cat(op, ": rotary dim 2*len(inv_freq) = ", 2 * half,
                                          " exceeds q's head_dim ", D));
  auto check_out = [&](const char* name, const TensorView& out, const TensorView& in) {
    ndim(op, name, out, 4, "(batch, seq, heads, head_dim)");
    for (int d = 0; d < 4; ++d)
      LONGATTN_CHECK_VALUE(out.shape[d] == in.shape[d], cat(op, ": ", name, " has shape ", shape_str(out),
                                                            ", expected ", shape_str(in)));
    same_dtype(op, name, out, "q", q);
    same_device(op, name, out, "q", q);
    last_dim_contiguous(op, name, out);
    no_broadcast(op, name, out);
  };
  // In place, the outputs are q and k themselves: name them so.
  const bool inplace = q_out.data == q.data;
  check_out(inplace ? "q" : "q_out", q_out, q);
  if (k) {
    ndim(op, "k", *k, 4, "(batch, seq, heads, head_dim)");
    dim_equals(op, "k", *k, 0, B, "batch");
    dim_equals(op, "k", *k, 1, S, "seq");
    dim_equals(op, "k", *k, 3, D, "head_dim");
    same_dtype(op, "k", *k, "q", q);
    same_device(op, "k", *k, "q", q);
    last_dim_contiguous(op, "k", *k);
    LONGATTN_CHECK_VALUE(k_out != nullptr, cat(op, ": k_out is required with k"));
    check_out(inplace ? "k" : "k_out", *k_out, *k);
  }
  RopeParams p;
  if (positions) {
    const TensorView& pv = *positions;
    LONGATTN_CHECK_TYPE(pv.dtype == DType::Int32 || pv.dtype == DType::Int64,
                        cat(op, ": positions must be int32 or int64 here, got ", dtype_name(pv.dtype)));
    same_device(op, "positions", pv, "q", q);
    if (pv.ndim == 1) {
      dim_equals(op, "positions", pv, 0, S, "seq");
      p.pos_stride[0] = 0;
      p.pos_stride[1] = pv.stride[0];
    } else {
      LONGATTN_CHECK_VALUE(pv.ndim == 2, cat(op, ": positions must have shape (seq,) or (batch, seq), got ",
                                             shape_str(pv)));
      dim_equals(op, "positions", pv, 0, B, "batch");
      dim_equals(op, "positions", pv, 1, S, "seq");
      p.pos_stride[0] = pv.stride[0];
      p.pos_stride[1] = pv.stride[1];
    }
    p.positions = pv.data;
    p.pos_dtype = pv.dtype;
  }
  p.q = q.data;
  p.q_out = q_out.data;
  p.k = k ? k->data : nullptr;
  p.k_out = k ? k_out->data : nullptr;
  p.dtype = q.dtype;
  p.batch = B;
  p.seqlen = S;
  p.hq = q.shape[2];
  p.hk = k ? k->shape[2] : 0;
  p.head_dim = D;
  p.rotary_half = half;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride[i];
    p.q_out_stride[i] = q_out.stride[i];
    p.k_stride[i] = k ? k->stride[i] : 0;
    p.k_out_stride[i] = k ? k_out->stride[i] : 0;
  }
  p.attention_factor = attention_factor;
  p.sin_sign = conjugate ? -1.f : 1.f;
  p.interleaved = interleaved;
  std::memcpy(p.inv_freq, inv_freq.data(), sizeof(float) * half);
  if (B * S == 0 || p.hq + p.hk == 0 || D == 0) return;

  NvtxRange range("apply_rope");
  run_on_backend(
      "rope_kernel", q, stream, [&] { cpu::rope(p); },
      [&](void* s) {
#if defined(LONGATTN_WITH_CUDA)
        return cuda::rope(p, s);
#else
        (void)s;
        return 0;
#endif
      });
}

py::dict build_info() {
  py::dict d;
  d["cpu_isa"] = cpu_isa_name(cpu_isa());
  d["num_threads"] = num_threads();
#if defined(LONGATTN_WITH_CUDA)
  d["cuda_compiled"] = true;
  d["cuda_archs"] = std::string(LONGATTN_CUDA_ARCHS);
  d["cuda_device_count"] = cuda::device_count();
  d["cuda_devices"] = cuda::device_names();
  int v = cuda::runtime_version();
  d["cuda_runtime_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
#else
  d["cuda_compiled"] = false;
  d["cuda_archs"] = std::string();
  d["cuda_device_count"] = 0;
  d["cuda_devices"] = std::vector<std::string>();
  d["cuda_runtime_version"] = py::none();
#endif
  d["nvtx"] = bool(LONGATTN_HAVE_NVTX);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "longattn compiled kernels (CPU and CUDA); use the longattn package, not this module";

  py::register_exception_translator([](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const Error& err) {
      switch (err.kind()) {
        case ErrorKind::Value: PyErr_SetString(PyExc_ValueError, err.what()); return;
        case ErrorKind::Type: PyErr_SetString(PyExc_TypeError, err.what()); return;
        case ErrorKind::NotImplemented: PyErr_SetString(PyExc_NotImplementedError, err.what()); return;
        case ErrorKind::Runtime: PyErr_SetString(PyExc_RuntimeError, err.what()); return;
      }
    }
  });

  py::class_<TensorView>(m, "TensorView")
      .def(py::init(&make_view), py::arg("ptr"), py::arg("dtype"), py::arg("device"), py::arg("device_id"),
           py::arg("shape"), py::arg("strides"))
      .def_property_readonly("shape", [](const TensorView& t) { return std::vector<int64_t>(t.shape, t.shape + t.ndim); })
      .def_property_readonly("strides", [](const TensorView& t) { return std::vector<int64_t>(t.stride, t.stride + t.ndim); })
      .def_property_readonly("dtype", [](const TensorView& t) { return std::string(dtype_name(t.dtype)); });

  m.def("rope", &rope, py::arg("q"), py::arg("q_out"), py::arg("k").none(true), py::arg("k_out").none(true),
        py::arg("positions").none(true), py::arg("inv_freq"), py::arg("attention_factor"), py::arg("interleaved"),
        py::arg("conjugate"), py::arg("stream"));
  m.def("build_info", &build_info);
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", [](int n) {
    LONGATTN_CHECK_VALUE(n >= 1, checks::cat("set_num_threads: n must be >= 1, got ", n));
    set_num_threads(n);
  });
}
