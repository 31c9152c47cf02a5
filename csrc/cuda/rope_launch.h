// Declarations of the explicit RoPE launch instantiations; each lives in its own
// generated .cu file (see CMakeLists.txt), so they compile in parallel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "longattn/rope.h"

namespace longattn {
namespace cuda {

template <typename T, bool Interleaved>
cudaError_t launch_rope(const RopeParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace longattn
