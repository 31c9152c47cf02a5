// Dtype and layout dispatch for the RoPE launchers.
#include "longattn/rope.h"
#include "rope_launch.h"

namespace longattn {
namespace cuda {

template <typename T>
static cudaError_t dispatch_layout(const RopeParams& p, cudaStream_t stream) {
  return p.interleaved ? launch_rope<T, true>(p, stream) : launch_rope<T, false>(p, stream);
}

int rope(const RopeParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::Float32: return dispatch_layout<float>(p, s);
    case DType::Float16: return dispatch_layout<__half>(p, s);
    case DType::BFloat16: return dispatch_layout<__nv_bfloat16>(p, s);
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace cuda
}  // namespace longattn
