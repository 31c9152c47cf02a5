// Declarations of the explicit linear attention launcher instantiations; each lives in its
// own generated .cu file (see CMakeLists.txt), so they compile in parallel.
#pragma once

#include <cuda_runtime.h>

namespace longattn {
namespace cuda {
namespace linear {

struct LinearArgs;

// T is __half or __nv_bfloat16; Kp the key-dim bucket (64, 128, 256).
template <typename T, int Kp>
cudaError_t launch_linear_chunk(const LinearArgs& a, unsigned gx, unsigned gy, int threads, int smem,
                                cudaStream_t stream);
template <typename T, int Kp>
cudaError_t launch_linear_step(const LinearArgs& a, unsigned gx, unsigned gy, int threads, int smem,
                               cudaStream_t stream);

}  // namespace linear
}  // namespace cuda
}  // namespace longattn
