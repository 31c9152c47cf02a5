// Running a kernel on the backend of its arrays, shared by every op's binding.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "checks.h"
#include "longattn/errors.h"
#include "longattn/tensor.h"

#if defined(LONGATTN_WITH_CUDA)
#include "longattn/cuda_runtime_info.h"
#endif

// The CUDA half of a run_on_backend() call: a lambda taking the stream `s` and returning
// the status of `call` (an expression that uses `s`); builds without CUDA never compile
// `call`, so it may name cuda:: entry points that only exist with the CUDA backend.
#if defined(LONGATTN_WITH_CUDA)
#define LONGATTN_CUDA_FN(call) [&](void* s) -> int { return call; }
#else
#define LONGATTN_CUDA_FN(call) [](void*) -> int { return 0; }
#endif

namespace longattn {

// Runs `cpu_fn()` for CPU arrays or, for CUDA arrays, `cuda_fn(stream)` on the device of
// `ref` with the GIL released, turning a CUDA status into a RuntimeError naming `kernel`.
template <typename CpuFn, typename CudaFn>
void run_on_backend(const char* kernel, const TensorView& ref, uintptr_t stream, CpuFn cpu_fn, CudaFn cuda_fn) {
  if (ref.device == DeviceType::CPU) {
    pybind11::gil_scoped_release nogil;
    cpu_fn();
    return;
  }
#if defined(LONGATTN_WITH_CUDA)
  int status;
  {
    pybind11::gil_scoped_release nogil;
    cuda::DeviceGuard guard(ref.device_id);
    status = cuda_fn(reinterpret_cast<void*>(stream));
  }
  if (status != 0) raise(ErrorKind::Runtime, checks::cat(kernel, " failed: ", cuda::error_string(status)));
#else
  (void)stream;
  (void)cuda_fn;
  raise(ErrorKind::Runtime, checks::cat(kernel, ": this build of longattn has no CUDA backend (built with "
                                                "LONGATTN_CUDA=0 or without nvcc)"));
#endif
}

}  // namespace longattn
