// Declarations of the explicit flash attention launcher instantiations; each lives in its
// own generated .cu file (see CMakeLists.txt), so they compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include "longattn/attention.h"

namespace longattn {
namespace cuda {
namespace flash {

// T is __half or __nv_bfloat16; Dp the head-dim bucket (32, 64, 96, 128, 192, 256) that
// holds max(head_dim, head_dim_v).
template <typename T, int Dp>
cudaError_t launch_flash_fwd(const AttentionParams& p, cudaStream_t stream);
template <typename T, int Dp>
cudaError_t launch_flash_bwd(const AttentionGradParams& g, cudaStream_t stream);

}  // namespace flash
}  // namespace cuda
}  // namespace longattn
