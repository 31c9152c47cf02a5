// Flash attention forward (FlashAttention-2, Dao 2023) for sm80+: mma.sync m16n8k16 with
// fp32 accumulation, ldmatrix, cp.async double buffering of K/V tiles.
//
// One CTA per (query block of kBlockM rows, head, batch); warp w owns query rows
// [16w, 16w + 16) of the block, so the whole softmax of a row lives in the 4 lanes of a
// quad (C fragment rows g and g + 8) and row reductions are two shuffles. The CTA walks
// the key blocks [key_range().begin, end) in increasing order; blocks inside
// [full_begin, full_end) skip the element mask (the classification of attention.h).
// Per key block: S = Q K^T (Q fragments re-read from shared memory each block, which keeps
// the register budget at Dp/2 (O) + kBlockN/2 (S) floats), score modification, online
// softmax (base-2 exponentials of scores pre-multiplied by log2 e), O += P V with P taken
// straight from the S accumulators (flash_common.cuh). The final O is divided by the row
// sum and stored directly from registers; lse = m + log(l) (or -inf for rows without a
// visible key, which also get O = 0).
//
// Sparse = true walks a BlockSparseSchedule instead (SparseKeyWalk, flash_common.cuh): the
// key tiles of the blocks listed for the CTA's query block(s), each warp applying its own
// block's state: not listed (the warp skips the tile: its scores are all -inf), full (no
// mask) or partial (the BlockMask's element mask). Both variants are instantiated by each
// launcher. The sparse variant has not yet run on a GPU; it is checked on the host through
// tests/cuda_emulation.
#pragma once

#include "flash_common.cuh"

namespace longattn {
namespace cuda {
namespace flash {

struct FwdArgs {
  AttentionParams p;
  BlockSparseSchedule sparse;  // read by the Sparse variant only (a copy: p.sparse is a host pointer)
  bool vec_q, vec_k, vec_v;    // cp.async allowed (see load_tile)
};

template <int Dp>
constexpr int fwd_smem_bytes() {
  using Tr = FwdTraits<Dp>;
  return (Tr::kBlockM + 4 * Tr::kBlockN) * (Dp + kPad) * 2;  // Q, 2 stages of K and V
}

template <typename T, int Dp, bool Sparse>
__global__ void __launch_bounds__(FwdTraits<Dp>::kWarps * 32) flash_fwd_kernel(const FwdArgs args) {
  using Tr = FwdTraits<Dp>;
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN, THREADS = Tr::kWarps * 32, LD = Dp + kPad;
  constexpr int NT = N / 8;    // n-tiles of S per warp
  constexpr int DT = Dp / 8;   // n-tiles of O per warp
  static_assert(M == 16 * Tr::kWarps && N % 16 == 0 && Dp % 16 == 0, "tile shape");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + M * LD;      // stage s at sK + s * N * LD
  T* sV = sK + 2 * N * LD;  // stage s at sV + s * N * LD

  const AttentionParams& p = args.p;
  int b, qblk;
  grid_coords(p.seqlen_q, M, b, qblk);
  const int h = blockIdx.y;
  const Seq s = seq_of(p, b);
  const int i0 = qblk * M;
  if (i0 >= s.sq) return;
  const int rows = min(M, s.sq - i0);
  const int hk = int(h / (p.heads / p.heads_kv));
  const int D = int(p.head_dim), Dv = int(p.head_dim_v);

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + (s.tq + i0) * p.q_stride[1] + h * p.q_stride[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + s.tk * p.k_stride[1] + hk * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + s.tk * p.v_stride[1] + hk * p.v_stride[2];

  auto load_kv = [&](int j0, int stage) {
    const int n = min(N, s.sk - j0);
    load_tile<T, N, Dp, THREADS>(sK + stage * N * LD, k + j0 * p.k_stride[1], p.k_stride[1], n, D, args.vec_k);
    load_tile<T, N, Dp, THREADS>(sV + stage * N * LD, v + j0 * p.v_stride[1], p.v_stride[1], n, Dv, args.vec_v);
  };

  KeyTiles<N, Sparse> tiles;
  tiles.init(p, args.sparse, s, b, h, i0, M, rows);

  load_tile<T, M, Dp, THREADS>(sQ, q, p.q_stride[1], rows, D, args.vec_q);
  if (tiles.more) load_kv(tiles.next_j0, 0);
  cp_async_commit();  // group: Q + first K/V block

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r0 = warp * 16;  // first row of this warp in the block
  const int64_t i_lo = int64_t(i0) + r0 + g, i_hi = i_lo + 8;  // this thread's two query rows

  ScoreMod mod;
  mod.init(p, s, b, h);
  const int lo_lo = mod.lo(i_lo), hi_lo = mod.hi(i_lo), lo_hi = mod.lo(i_hi), hi_hi = mod.hi(i_hi);
  // Sparse: which of the CTA's query blocks holds this warp's rows, and their element masks.
  const int wq = Sparse ? (i0 + r0) / int(args.sparse.block_q) - i0 / int(args.sparse.block_q) : 0;
  SparseRowMask rm_lo, rm_hi;
  if constexpr (Sparse) {
    rm_lo.init(args.sparse, i_lo, s.sq, s.sk);
    rm_hi.init(args.sparse, i_hi, s.sq, s.sk);
  }

  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY;  // running max (natural units)
  float l_lo = 0.f, l_hi = 0.f;              // this thread's part of the running sum

  for (int it = 0; tiles.more; ++it) {
    const int stage = it & 1;
    int mode;
    bool masked;
    const int j0 = tiles.take(wq, mode, masked);
    if (tiles.more) load_kv(tiles.next_j0, stage ^ 1);
    cp_async_commit();  // possibly empty group, keeps the wait count uniform
    cp_async_wait<1>();
    __syncthreads();

    const T* cK = sK + stage * N * LD;
    const T* cV = sV + stage * N * LD;
    if (!Sparse || mode != kSkip) {  // warp-uniform: a skipped tile leaves m, l and O unchanged
      // S = Q K^T for this warp's 16 rows x N keys.
      float acc[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < Dp / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4(a, sQ + (r0 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + kk * 16 + 8 * (lane / 16));
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
          uint32_t bf[4];
          ldmatrix_x4(bf, cK + (n * 8 + (lane % 8) + 8 * (lane / 16)) * LD + kk * 16 + 8 * ((lane / 8) % 2));
          mma16816<T>(acc[n], a, bf[0], bf[1]);
          mma16816<T>(acc[n + 1], a, bf[2], bf[3]);
        }
      }

      // Scores, row maxima.
      float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int j = j0 + n * 8 + 2 * t;
        float tt;
        if constexpr (Sparse) {
          acc[n][0] = mod.apply(acc[n][0], i_lo, j, false, 0, 0, tt);
          acc[n][1] = mod.apply(acc[n][1], i_lo, j + 1, false, 0, 0, tt);
          acc[n][2] = mod.apply(acc[n][2], i_hi, j, false, 0, 0, tt);
          acc[n][3] = mod.apply(acc[n][3], i_hi, j + 1, false, 0, 0, tt);
          if (masked) {
            if (!rm_lo.visible(j)) acc[n][0] = -INFINITY;
            if (!rm_lo.visible(j + 1)) acc[n][1] = -INFINITY;
            if (!rm_hi.visible(j)) acc[n][2] = -INFINITY;
            if (!rm_hi.visible(j + 1)) acc[n][3] = -INFINITY;
          }
        } else {
          acc[n][0] = mod.apply(acc[n][0], i_lo, j, masked, lo_lo, hi_lo, tt);
          acc[n][1] = mod.apply(acc[n][1], i_lo, j + 1, masked, lo_lo, hi_lo, tt);
          acc[n][2] = mod.apply(acc[n][2], i_hi, j, masked, lo_hi, hi_hi, tt);
          acc[n][3] = mod.apply(acc[n][3], i_hi, j + 1, masked, lo_hi, hi_hi, tt);
        }
        mx_lo = fmaxf(mx_lo, fmaxf(acc[n][0], acc[n][1]));
        mx_hi = fmaxf(mx_hi, fmaxf(acc[n][2], acc[n][3]));
      }
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));

      // Online softmax: rescale by exp(m_old - m_new); a row still at -inf keeps P = 0.
      const float alpha_lo = mx_lo == -INFINITY ? 1.f : exp2f((m_lo - mx_lo) * kLog2e);
      const float alpha_hi = mx_hi == -INFINITY ? 1.f : exp2f((m_hi - mx_hi) * kLog2e);
      const float base_lo = mx_lo == -INFINITY ? 0.f : mx_lo * kLog2e;
      const float base_hi = mx_hi == -INFINITY ? 0.f : mx_hi * kLog2e;
      m_lo = mx_lo;
      m_hi = mx_hi;
      float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        acc[n][0] = exp2f(fmaf(acc[n][0], kLog2e, -base_lo));  // exp2(-inf) = 0
        acc[n][1] = exp2f(fmaf(acc[n][1], kLog2e, -base_lo));
        acc[n][2] = exp2f(fmaf(acc[n][2], kLog2e, -base_hi));
        acc[n][3] = exp2f(fmaf(acc[n][3], kLog2e, -base_hi));
        sum_lo += acc[n][0] + acc[n][1];
        sum_hi += acc[n][2] + acc[n][3];
      }
      l_lo = l_lo * alpha_lo + sum_lo;
      l_hi = l_hi * alpha_hi + sum_hi;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        o[d][0] *= alpha_lo;
        o[d][1] *= alpha_lo;
        o[d][2] *= alpha_hi;
        o[d][3] *= alpha_hi;
      }

      // O += P V: P from the accumulators, V via ldmatrix.trans.
      mma_acc_x_tile<T, N / 16, DT>(o, acc, cV, LD, lane);
    }  // mode != kSkip
    __syncthreads();  // this stage is overwritten by the prefetch of the next iteration
  }
  cp_async_wait<0>();

  // Finish: full row sums over the quad, normalize, store O (masked to Dv and valid rows) and lse.
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f;
  const float inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;

  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + (s.tq + i0) * p.out_stride[1] + h * p.out_stride[2];
  const bool pair_ok = (reinterpret_cast<uintptr_t>(p.out) & 3u) == 0 && p.out_stride[0] % 2 == 0 &&
                       p.out_stride[1] % 2 == 0 && p.out_stride[2] % 2 == 0;
  const int rl = r0 + g, rh = rl + 8;
#pragma unroll
  for (int d = 0; d < DT; ++d) {
    const int c = d * 8 + 2 * t;
    if (c >= Dv) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = half ? rh : rl;
      if (r >= rows) continue;
      const float inv = half ? inv_hi : inv_lo;
      const float x0 = o[d][2 * half] * inv, x1 = o[d][2 * half + 1] * inv;
      T* dst = out + int64_t(r) * p.out_stride[1] + c;
      if (c + 1 < Dv && pair_ok) {
        *reinterpret_cast<uint32_t*>(dst) = pack2<T>(x0, x1);
      } else {
        dst[0] = from_f<T>(x0);
        if (c + 1 < Dv) dst[1] = from_f<T>(x1);
      }
    }
  }
  if (t == 0 && p.lse) {
    float* lse = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1];
    if (rl < rows) lse[(s.tq + i0 + rl) * p.lse_stride[2]] = l_lo > 0.f ? m_lo + logf(l_lo) : -INFINITY;
    if (rh < rows) lse[(s.tq + i0 + rh) * p.lse_stride[2]] = l_hi > 0.f ? m_hi + logf(l_hi) : -INFINITY;
  }
}

#if !defined(LONGATTN_FLASH_EMULATE)
template <typename T, int Dp>
cudaError_t launch_flash_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<Dp>;
  if (p.seqlen_q <= 0 || p.batch <= 0 || p.heads <= 0) return cudaSuccess;
  FwdArgs a;
  a.p = p;
  if (p.sparse) {
    // Block sizes 64 or 128: a warp's 16 rows and a key tile of N keys then lie in one block.
    const BlockSparseSchedule& bs = *p.sparse;
    if ((bs.block_q != 64 && bs.block_q != 128) || (bs.block_k != 64 && bs.block_k != 128) || p.cu_seqlens_q)
      return cudaErrorInvalidValue;
    a.sparse = bs;
  }
  a.vec_q = vec_ok(p.q, p.q_stride);
  a.vec_k = vec_ok(p.k, p.k_stride);
  a.vec_v = vec_ok(p.v, p.v_stride);
  constexpr int smem = fwd_smem_bytes<Dp>();
  auto kernel = p.sparse ? flash_fwd_kernel<T, Dp, true> : flash_fwd_kernel<T, Dp, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  if (!grid_fits(p.seqlen_q, Tr::kBlockM, p.heads, p.batch)) return cudaErrorInvalidConfiguration;
  const dim3 grid = make_grid(p.seqlen_q, Tr::kBlockM, p.heads, p.batch);
  kernel<<<grid, Tr::kWarps * 32, smem, stream>>>(a);
  return cudaGetLastError();
}

#endif  // !LONGATTN_FLASH_EMULATE

}  // namespace flash
}  // namespace cuda
}  // namespace longattn
