// Dtype and head-dim dispatch for the flash attention launchers (flash_fwd.cuh,
// flash_bwd.cuh). D and Dv share one bucket: the smallest compiled size >= max(D, Dv);
// loads zero-fill the columns past D (q, k) or Dv (v, out, dout) and stores are masked,
// so e.g. D = 80 runs the 96 kernels and D = 64, Dv = 128 the 128 kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "flash_launch.h"
#include "longattn/attention.h"

namespace longattn {
namespace cuda {

namespace {

int bucket(int64_t d) {
  for (int b : {32, 64, 96, 128, 192, 256})
    if (d <= b) return b;
  return 0;
}

template <typename T>
cudaError_t forward_dim(const AttentionParams& p, cudaStream_t s) {
  switch (bucket(std::max(p.head_dim, p.head_dim_v))) {
    case 32: return flash::launch_flash_fwd<T, 32>(p, s);
    case 64: return flash::launch_flash_fwd<T, 64>(p, s);
    case 96: return flash::launch_flash_fwd<T, 96>(p, s);
    case 128: return flash::launch_flash_fwd<T, 128>(p, s);
    case 192: return flash::launch_flash_fwd<T, 192>(p, s);
    case 256: return flash::launch_flash_fwd<T, 256>(p, s);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t backward_dim(const AttentionGradParams& g, cudaStream_t s) {
  switch (bucket(std::max(g.fwd.head_dim, g.fwd.head_dim_v))) {
    case 32: return flash::launch_flash_bwd<T, 32>(g, s);
    case 64: return flash::launch_flash_bwd<T, 64>(g, s);
    case 96: return flash::launch_flash_bwd<T, 96>(g, s);
    case 128: return flash::launch_flash_bwd<T, 128>(g, s);
    case 192: return flash::launch_flash_bwd<T, 192>(g, s);
    case 256: return flash::launch_flash_bwd<T, 256>(g, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int attention_forward(const AttentionParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::Float16: return forward_dim<__half>(p, s);
    case DType::BFloat16: return forward_dim<__nv_bfloat16>(p, s);
    default: return int(cudaErrorInvalidValue);
  }
}

int attention_backward(const AttentionGradParams& g, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (g.fwd.dtype) {
    case DType::Float16: return backward_dim<__half>(g, s);
    case DType::BFloat16: return backward_dim<__nv_bfloat16>(g, s);
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace cuda
}  // namespace longattn
