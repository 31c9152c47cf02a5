// RoPE CUDA kernel. One thread block per token (batch, seq): the block computes cos/sin of
// the float32 angle position * inv_freq once into shared memory (accurate sincosf, no
// fast-math), then its threads rotate every q and k head of that token with 16-byte
// vector loads when alignment allows. Memory-bound: each element is read and written once.
// Checked on the host by tests/cuda_emulation (run.sh rope); not yet run on a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "longattn/rope.h"
#if defined(LONGATTN_FLASH_EMULATE)  // host emulation (tests/cuda_emulation)
#include "flash_emulate.h"
#endif

namespace longattn {
namespace cuda {
#if defined(LONGATTN_FLASH_EMULATE)
using flash::__syncthreads;
#endif

constexpr int kRopeThreads = 128;
constexpr int64_t kMaxGrid = 1 << 30;

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Elements moved by one work unit: V for vector paths; the scalar interleaved path moves
// one (even, odd) pair.
template <bool Interleaved, int V>
struct Unit {
  static constexpr int kElems = (Interleaved && V == 1) ? 2 : V;
};

// Rotates every q and k head of token (b, s) with the block's threads, given its cos/sin.
template <typename T, bool Interleaved, int V>
__device__ __forceinline__ void rotate_token(const RopeParams& p, int64_t b, int64_t s, const float* cs,
                                             const float* sn) {
  constexpr int E = Unit<Interleaved, V>::kElems;
  const int half = int(p.rotary_half);
  const int rot = 2 * half;
  const int rot_units = Interleaved ? rot / E : half / E;
  const bool copy_rest = p.q_out != p.q;  // in place: pass-through channels stay as they are
  const int rest_units = copy_rest ? int(p.head_dim - rot) / V : 0;
  const int units = rot_units + rest_units;
  const int heads = int(p.hq) + (p.k ? int(p.hk) : 0);

  for (int u = threadIdx.x; u < heads * units; u += blockDim.x) {
    const int h = u / units, r = u % units;
    const T* x;
    T* y;
    if (h < p.hq) {
      x = static_cast<const T*>(p.q) + b * p.q_stride[0] + s * p.q_stride[1] + h * p.q_stride[2];
      y = static_cast<T*>(p.q_out) + b * p.q_out_stride[0] + s * p.q_out_stride[1] + h * p.q_out_stride[2];
    } else {
      const int hk = h - int(p.hq);
      x = static_cast<const T*>(p.k) + b * p.k_stride[0] + s * p.k_stride[1] + hk * p.k_stride[2];
      y = static_cast<T*>(p.k_out) + b * p.k_out_stride[0] + s * p.k_out_stride[1] + hk * p.k_out_stride[2];
    }
    if (r >= rot_units) {  // pass-through channels
      const int j = rot + (r - rot_units) * V;
      *reinterpret_cast<Pack<T, V>*>(y + j) = *reinterpret_cast<const Pack<T, V>*>(x + j);
      continue;
    }
    if constexpr (Interleaved) {
      const int j = r * E;  // even element index
      Pack<T, E> in, out;
      if constexpr (V == 1) {
        in.v[0] = x[j];
        in.v[1] = x[j + 1];
      } else {
        in = *reinterpret_cast<const Pack<T, E>*>(x + j);
      }
#pragma unroll
      for (int e = 0; e < E; e += 2) {
        const int i = (j + e) / 2;
        const float x1 = to_float(in.v[e]), x2 = to_float(in.v[e + 1]);
        out.v[e] = from_float<T>(x1 * cs[i] - x2 * sn[i]);
        out.v[e + 1] = from_float<T>(x2 * cs[i] + x1 * sn[i]);
      }
      if constexpr (V == 1) {
        y[j] = out.v[0];
        y[j + 1] = out.v[1];
      } else {
        *reinterpret_cast<Pack<T, E>*>(y + j) = out;
      }
    } else {
      const int i0 = r * E;
      Pack<T, E> a = *reinterpret_cast<const Pack<T, E>*>(x + i0);
      Pack<T, E> c = *reinterpret_cast<const Pack<T, E>*>(x + half + i0);
      Pack<T, E> oa, oc;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float x1 = to_float(a.v[e]), x2 = to_float(c.v[e]);
        oa.v[e] = from_float<T>(x1 * cs[i0 + e] - x2 * sn[i0 + e]);
        oc.v[e] = from_float<T>(x2 * cs[i0 + e] + x1 * sn[i0 + e]);
      }
      *reinterpret_cast<Pack<T, E>*>(y + i0) = oa;
      *reinterpret_cast<Pack<T, E>*>(y + half + i0) = oc;
    }
  }
}

template <typename T, bool Interleaved, int V>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeParams p) {
#if defined(LONGATTN_FLASH_EMULATE)
  static float cs[kRopeMaxHalf], sn[kRopeMaxHalf];  // the emulation runs one CTA at a time
#else
  __shared__ float cs[kRopeMaxHalf];
  __shared__ float sn[kRopeMaxHalf];
#endif
  const int half = int(p.rotary_half);
  const int64_t tokens = p.batch * p.seqlen;
  for (int64_t token = blockIdx.x; token < tokens; token += gridDim.x) {
    const int64_t b = token / p.seqlen, s = token % p.seqlen;
    int64_t pos = s;
    if (p.positions) {
      const int64_t off = b * p.pos_stride[0] + s * p.pos_stride[1];
      pos = p.pos_dtype == DType::Int32 ? int64_t(static_cast<const int32_t*>(p.positions)[off])
                                        : static_cast<const int64_t*>(p.positions)[off];
    }
    __syncthreads();  // the previous token's rotation is done with cs/sn
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      float sv, cv;
      sincosf(float(pos) * p.inv_freq[i], &sv, &cv);  // float32 angle, as transformers
      cs[i] = cv * float(p.attention_factor);
      sn[i] = sv * float(p.attention_factor) * p.sin_sign;
    }
    __syncthreads();
    rotate_token<T, Interleaved, V>(p, b, s, cs, sn);
  }
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Widest vector the arguments allow: 16 bytes when every pointer, stride and channel
// split is a multiple of it; scalar otherwise.
template <typename T>
inline bool rope_vectorizable(const RopeParams& p) {
  constexpr int64_t V = 16 / sizeof(T);
  const int64_t rot = 2 * p.rotary_half;
  bool ok = aligned16(p.q) && aligned16(p.q_out) && (p.interleaved ? rot % V == 0 : p.rotary_half % V == 0) &&
            (p.head_dim - rot) % V == 0;
  for (int i = 0; i < 3; ++i) ok = ok && p.q_stride[i] % V == 0 && p.q_out_stride[i] % V == 0;
  if (p.k) {
    ok = ok && aligned16(p.k) && aligned16(p.k_out);
    for (int i = 0; i < 3; ++i) ok = ok && p.k_stride[i] % V == 0 && p.k_out_stride[i] % V == 0;
  }
  return ok;
}

#if !defined(LONGATTN_FLASH_EMULATE)
template <typename T, bool Interleaved>
cudaError_t launch_rope(const RopeParams& p, cudaStream_t stream) {
  const int64_t tokens = p.batch * p.seqlen;
  if (tokens == 0) return cudaSuccess;
  const dim3 grid(unsigned(tokens < kMaxGrid ? tokens : kMaxGrid));  // the kernel strides over the rest
  if (rope_vectorizable<T>(p))
    rope_kernel<T, Interleaved, 16 / sizeof(T)><<<grid, kRopeThreads, 0, stream>>>(p);
  else
    rope_kernel<T, Interleaved, 1><<<grid, kRopeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif  // !LONGATTN_FLASH_EMULATE

}  // namespace cuda
}  // namespace longattn
