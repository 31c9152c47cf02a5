// Linear attention on CUDA: runs the launch plans of linear_attention.cuh (forward: one
// chunk or step launch; backward: the recomputation, three permuted chunk walks and the
// per-token epilogues), dispatching dtype and key-dim bucket.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "linear_attention.cuh"

namespace longattn {
namespace cuda {

namespace {

using linear::KernelKind;
using linear::Launch;

template <typename T>
cudaError_t run(const Launch& l, cudaStream_t s) {
  if (l.gx == 0 || l.gy == 0) return cudaSuccess;
  if (l.gx > 0x7fffffffu || l.gy > 65535u) return cudaErrorInvalidConfiguration;
  switch (l.kind) {
    case KernelKind::Chunk:
      switch (l.kp) {
        case 64: return linear::launch_linear_chunk<T, 64>(l.a, l.gx, l.gy, l.threads, l.smem, s);
        case 128: return linear::launch_linear_chunk<T, 128>(l.a, l.gx, l.gy, l.threads, l.smem, s);
        case 256: return linear::launch_linear_chunk<T, 256>(l.a, l.gx, l.gy, l.threads, l.smem, s);
        default: return cudaErrorInvalidValue;
      }
    case KernelKind::Step:
      switch (l.kp) {
        case 64: return linear::launch_linear_step<T, 64>(l.a, l.gx, l.gy, l.threads, l.smem, s);
        case 128: return linear::launch_linear_step<T, 128>(l.a, l.gx, l.gy, l.threads, l.smem, s);
        case 256: return linear::launch_linear_step<T, 256>(l.a, l.gx, l.gy, l.threads, l.smem, s);
        default: return cudaErrorInvalidValue;
      }
    case KernelKind::PrepDout:
      linear::linear_prep_dout_kernel<T><<<l.gx, l.threads, 0, s>>>(l.x);
      return cudaGetLastError();
    case KernelKind::Finish:
      linear::linear_finish_kernel<T><<<l.gx, l.threads, 0, s>>>(l.x);
      return cudaGetLastError();
    case KernelKind::DecayScan:
      linear::linear_decay_scan_kernel<<<dim3(l.gx, l.gy, 1), l.threads, l.smem, s>>>(l.x);
      return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t run_plan(const std::vector<Launch>& plan, cudaStream_t s) {
  for (const Launch& l : plan) {
    const cudaError_t err = run<T>(l, s);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

int run_dtype(DType dtype, const std::vector<Launch>& plan, cudaStream_t s) {
  switch (dtype) {
    case DType::Float16: return int(run_plan<__half>(plan, s));
    case DType::BFloat16: return int(run_plan<__nv_bfloat16>(plan, s));
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace

int linear_attention_forward(const LinearAttentionParams& p, void* stream) {
  if (p.batch * p.heads == 0) return 0;
  return run_dtype(p.dtype, linear::plan_forward(p), static_cast<cudaStream_t>(stream));
}

int64_t linear_attention_backward_workspace(const LinearAttentionGradParams& g) {
  return linear::bwd_workspace(g).bytes;
}

int linear_attention_backward(const LinearAttentionGradParams& g, void* stream) {
  if (g.fwd.batch * g.fwd.heads == 0) return 0;
  if (g.workspace_bytes < linear::bwd_workspace(g).bytes) return int(cudaErrorInvalidValue);
  return run_dtype(g.fwd.dtype, linear::plan_backward(g, g.workspace), static_cast<cudaStream_t>(stream));
}

}  // namespace cuda
}  // namespace longattn
