// Linear attention kernels for sm80+ (see longattn/linear_attention.h for the math).
//
// Chunk kernel: one CTA per (sequence, head, tile of 64 value columns) walks the chunks of
// kChunk = 64 tokens in order with the R x 64 float32 state in shared memory. Per chunk,
// with b the within-chunk inclusive cumulative log-decays (Yang et al. 2023, GLA, sec. 3):
//   O  = diag(exp(b)) Q S + ((Q K^T) .* D) V,   D_ij = exp(b_i - b_j) for j <= i, else 0
//   S' = exp(b_L) S + (diag(exp(b_L - b)) K)^T V
// so every exponent is <= 0. The four products run on tensor cores (mma.sync m16n8k16,
// float32 accumulation) with operands rounded to T, as flash-linear-attention does; the
// state, the decays and the accumulators stay float32. Warp w owns chunk rows
// [16w, 16w + 16) for the outputs and state rows 16m (m = w, w + 4, ...) for the update.
// The normalizer is a ninth 8-column n-tile whose first column is a value column of ones,
// present in every value tile so each CTA can divide its own outputs.
//
// Operand pipeline: when q, k and v all qualify for 16-byte cp.async (dim % 8 == 0, 16-byte
// aligned base, strides multiples of 8 elements; LinearArgs::async_ok, set by chunk_launch)
// and two tile stages fit in shared memory (Kp = 64, 128; ChunkTraits::kStages), the q, k,
// v tiles are double buffered: while chunk c is computed from stage c % 2, chunk c + 1's raw
// rows are in flight into the other stage (one cp.async group per chunk, issued at the top
// of the iteration, after the previous iteration's trailing barrier released that stage;
// cp.async.wait_group 1 then a barrier before use). Rows past a partial last chunk are
// zero filled by cp.async; tile columns it never writes (padding, value columns past the
// value dim) are zeroed once per stage, and ones columns are rewritten with each chunk (1
// on rows < L, 0 below, as the synchronous loads do: the in-place key decay scales them).
// After a chunk lands, each thread applies the feature map and key / value multipliers to
// the 16-byte pieces it copied itself (rows < L, columns < dim), so no extra barrier is
// needed; the query multiplier goes to the output accumulators instead (O and the
// normalizer are linear in q) unless the query carries a ones column. The log-decays are
// read one chunk ahead into a register. The non-causal walk (K, V chunks, then Q chunks)
// is pipelined as one sequence of steps, across the seam too. Otherwise (e.g. an odd dim,
// Kp = 256) the tiles are loaded synchronously through registers, one stage.
//
// Operands are general (pointer, strides, dim, feature map, multiplier, optional column of
// ones) and the walk can run backwards in time, so the backward pass is three more walks of
// this kernel with the roles of q, k, v, dout permuted (linear_attention.cu):
//   dV  = walk_rev(query k~, key q~, value dO', state dS_T)
//   dK~ = walk_rev(query v', key dO', value q~, state dS_T^T)
//   dQ~ = walk(query dO', key v', value k~, state S_0^T)
// A reversed walk over a sequence of T tokens visits memory token T-1-r at step r and uses
// log-decay g'_r = g_{T-r} (g'_0 = 0): exactly the decays exp(b_i - b_j), i >= j, of the
// forward read from the other side. Its final state is then dS_0 / exp(g_0), so it is
// multiplied by exp(g_0) on store.
//
// Step kernel: the token recurrence S = exp(g) S + k~ v^T, o = S^T q~ on CUDA cores for
// decoding (a few tokens per sequence): one CTA per (sequence, head, 32 value columns),
// thread (column c, row group y) holds state rows y + 8i of column c in registers; with
// normalize a ninth warp carries z.
//
// These kernels, the pipeline included, have been checked in host emulation
// (tests/cuda_emulation) only; they have not run on a GPU yet.
#pragma once

#include <vector>

#include "flash_common.cuh"
#include "longattn/linear_attention.h"

namespace longattn {
namespace cuda {
namespace linear {

using flash::cp_async16;
using flash::cp_async_commit;
using flash::cp_async_wait;
using flash::from_f;
using flash::ldmatrix_x4;
using flash::ldmatrix_x4_trans;
using flash::mma16816;
using flash::pack2;
using flash::to_f;
#if defined(LONGATTN_FLASH_EMULATE)
using flash::__shfl_xor_sync;
using flash::atomicAdd;
using flash::__syncthreads;
using flash::min;
#endif

constexpr int kChunk = 64;       // tokens per chunk
constexpr int kVTile = 64;       // value columns per chunk-kernel CTA
constexpr int kChunkThreads = 128;
constexpr int kStepVTile = 32;   // value columns per step-kernel CTA
constexpr float kNormEps = 1e-10f;

// An input matrix over (batch row, token, head) with `dim` contiguous columns, read as
// mul * phi(x); `ones` appends a column of ones (index dim for query / key operands; the
// normalizer n-tile for value operands).
struct Operand {
  const void* ptr = nullptr;
  int64_t stride[3] = {};
  int dim = 0;
  int fmap = 0;  // FeatureMap
  float mul = 1.f;
  bool ones = false;
};

// A float32 R x C' state (C' = value columns plus the normalizer column C when present),
// stored as S (element (r, c) at s[r * rs + c * cs] for r < sr, c < sc) plus an optional
// line z for the row r == sr or the column c == sc (at z[r * zrs + c * zcs]); everything
// else is zero. Item i = sequence * heads + head is at s + i * ps, z + i * pz.
struct StateIO {
  float* s = nullptr;
  float* z = nullptr;
  int64_t rs = 0, cs = 0, ps = 0, zrs = 0, zcs = 0, pz = 0;
  int sr = 0, sc = 0;
};

struct LinearArgs {
  Operand q, k, v;  // R = q.dim + q.ones = k.dim + k.ones columns; C = v.dim value columns
  void* out = nullptr;  // (batch row, token, head, col), T or float32 (out_f32)
  int64_t out_stride[3] = {};
  int out_cols = 0;          // columns written: <= C, or C + 1 to write the normalizer column too
  bool out_f32 = false;
  bool out_normalize = false;  // divide by the normalizer column (needs v.ones)
  const float* g = nullptr;    // log-decay, strides over (batch row, token, head)
  int64_t g_stride[3] = {};
  StateIO s0, s1;              // initial (read), final (written when s1.s or s1.z)
  const int32_t* cu_seqlens = nullptr;
  int64_t seqlen = 0;
  int batch = 0, heads = 0, vtiles = 1;
  bool causal = true, reverse = false;
  // Set by chunk_launch(): q, k, v all qualify for 16-byte cp.async (dim % 8 == 0, base
  // 16-byte aligned, strides multiples of 8 elements) and the key bucket has two stages.
  bool async_ok = false;
};

// Dynamic shared memory (the emulation's is one host array).
#if defined(LONGATTN_FLASH_EMULATE)
#define LINEAR_SMEM(name) unsigned char* name = ::longattn::cuda::flash::smem_raw
#else
#define LINEAR_SMEM(name)                                 \
  extern __shared__ __align__(16) unsigned char smem_raw[]; \
  unsigned char* name = smem_raw
#endif

// ---- small device helpers ------------------------------------------------------------------
__device__ __forceinline__ float phi(int f, float x) {
  if (f == 1) return x > 0.f ? x + 1.f : expf(x);
  if (f == 2) return x > 0.f ? x : 0.f;
  return x;
}

struct Item {
  int n, h, T;
  int64_t tok0, brow;
};
__device__ __forceinline__ Item item_of(const LinearArgs& a, int n, int h) {
  Item it;
  it.n = n;
  it.h = h;
  if (a.cu_seqlens) {
    it.tok0 = a.cu_seqlens[n];
    it.T = int(a.cu_seqlens[n + 1] - it.tok0);
    it.brow = 0;
  } else {
    it.tok0 = 0;
    it.T = int(a.seqlen);
    it.brow = n;
  }
  return it;
}
// Memory token of walk step t.
__device__ __forceinline__ int64_t mem_tok(const LinearArgs& a, const Item& it, int t) {
  return it.tok0 + (a.reverse ? it.T - 1 - t : t);
}
// Log-decay of walk step t (reversed walks: g_{T-t}, and 0 at t = 0).
__device__ __forceinline__ float walk_decay(const LinearArgs& a, const Item& it, int t) {
  if (!a.g) return 0.f;
  int u = t;
  if (a.reverse) {
    if (t == 0) return 0.f;
    u = it.T - t;
  }
  return a.g[it.brow * a.g_stride[0] + (it.tok0 + u) * a.g_stride[1] + int64_t(it.h) * a.g_stride[2]];
}
template <typename U>
__device__ __forceinline__ U* row_ptr(const void* base, const int64_t (&st)[3], const Item& it, int64_t tok) {
  return const_cast<U*>(static_cast<const U*>(base)) + it.brow * st[0] + tok * st[1] + int64_t(it.h) * st[2];
}
__device__ __forceinline__ float state_get(const StateIO& s, int64_t item, int r, int c) {
  if (r < s.sr && c < s.sc) return s.s ? s.s[item * s.ps + r * s.rs + c * s.cs] : 0.f;
  if (s.z && ((r == s.sr && c < s.sc) || (c == s.sc && r < s.sr))) return s.z[item * s.pz + r * s.zrs + c * s.zcs];
  return 0.f;
}
__device__ __forceinline__ void state_put(const StateIO& s, int64_t item, int r, int c, float x) {
  if (r < s.sr && c < s.sc) {
    if (s.s) s.s[item * s.ps + r * s.rs + c * s.cs] = x;
  } else if (s.z && ((r == s.sr && c < s.sc) || (c == s.sc && r < s.sr))) {
    s.z[item * s.pz + r * s.zrs + c * s.zcs] = x;
  }
}
template <typename T>
__device__ __forceinline__ void store_out(const LinearArgs& a, const Item& it, int64_t tok, int c, float x) {
  if (a.out_f32) row_ptr<float>(a.out, a.out_stride, it, tok)[c] = x;
  else row_ptr<T>(a.out, a.out_stride, it, tok)[c] = from_f<T>(x);
}

// Rows [0, L) of walk steps t0.. of operand `op` into a ROWS x COLS tile (pitch LD) as T:
// tile column c < MEM reads memory column col0 + c (< op.dim); with `ones_at` >= 0 that
// tile column is 1; everything else 0.
template <typename T, int ROWS, int COLS, int MEM, int LD, int THREADS>
__device__ __forceinline__ void load_operand(T* dst, const Operand& op, const LinearArgs& a, const Item& it, int t0,
                                             int L, int col0, int ones_at) {
  constexpr int CH = COLS / 8;
  for (int c = threadIdx.x; c < ROWS * CH; c += THREADS) {
    const int r = c / CH, col = (c % CH) * 8;
    alignas(16) T tmp[8];
    const T* src = r < L ? row_ptr<T>(op.ptr, op.stride, it, mem_tok(a, it, t0 + r)) : nullptr;
    T* dst8 = dst + r * LD + col;
    if (src && col + 8 <= MEM && col0 + col + 8 <= op.dim &&
        (reinterpret_cast<uintptr_t>(src + col0 + col) & 15u) == 0 && (ones_at < col || ones_at >= col + 8)) {
      // Eight whole columns in one 16-byte load.
      const uint4 raw = *reinterpret_cast<const uint4*>(src + col0 + col);
      if (op.fmap == 0 && op.mul == 1.f) {
        *reinterpret_cast<uint4*>(dst8) = raw;
        continue;
      }
      const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < 8; ++e) tmp[e] = from_f<T>(op.mul * phi(op.fmap, to_f<T>(x[e])));
      *reinterpret_cast<uint4*>(dst8) = *reinterpret_cast<const uint4*>(tmp);
      continue;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int tc = col + e, mc = col0 + tc;
      float x = 0.f;
      if (src && mc < op.dim && tc < MEM) x = op.mul * phi(op.fmap, to_f<T>(src[mc]));
      if (r < L && tc == ones_at) x = 1.f;
      tmp[e] = from_f<T>(x);
    }
    *reinterpret_cast<uint4*>(dst8) = *reinterpret_cast<const uint4*>(tmp);
  }
}

// Rows [0, L) of walk steps t0.. of operand `op`, memory columns col0 + [0, ncols), into a
// tile (pitch LD) through 16-byte cp.async; rows [L, kChunk) of those columns are zero
// filled (src_bytes = 0, nothing read). ncols % 8 == 0 and the operand qualifies for
// cp.async (LinearArgs::async_ok). With ones_at >= 0 that column is set to 1 on rows < L
// and 0 below with plain stores (ones columns lie outside [0, ncols)). Nothing else of the
// tile is written.
template <typename T, int COLS, int LD, int THREADS>
__device__ __forceinline__ void issue_operand(T* dst, const Operand& op, const LinearArgs& a, const Item& it, int t0,
                                              int L, int col0, int ncols, int ones_at) {
  constexpr int CH = COLS / 8;
  for (int c = threadIdx.x; c < kChunk * CH; c += THREADS) {
    const int r = c / CH, col = (c % CH) * 8;
    if (col >= ncols) continue;
    const T* src = row_ptr<T>(op.ptr, op.stride, it, mem_tok(a, it, t0 + (r < L ? r : 0))) + col0 + col;
    cp_async16(dst + r * LD + col, src, r < L ? 16 : 0);
  }
  if (ones_at >= 0)
    for (int r = threadIdx.x; r < kChunk; r += THREADS) dst[r * LD + ones_at] = from_f<T>(r < L ? 1.f : 0.f);
}

// x -> mul * phi(x) on rows [0, L), columns [0, ncols) of a tile filled by issue_operand,
// eight elements at a time. Same loop as issue_operand, so each thread rewrites exactly the
// 16-byte pieces its own cp.async wrote: after its cp.async.wait_group they are visible to
// it without a barrier.
template <typename T, int COLS, int LD, int THREADS>
__device__ __forceinline__ void transform_operand(T* dst, int L, int ncols, int fmap, float mul) {
  constexpr int CH = COLS / 8;
  for (int c = threadIdx.x; c < kChunk * CH; c += THREADS) {
    const int r = c / CH, col = (c % CH) * 8;
    if (col >= ncols || r >= L) continue;
    uint4* p = reinterpret_cast<uint4*>(dst + r * LD + col);
    alignas(16) T x[8];
    *reinterpret_cast<uint4*>(x) = *p;
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = from_f<T>(mul * phi(fmap, to_f<T>(x[e])));
    *p = *reinterpret_cast<const uint4*>(x);
  }
}

// Zeroes columns [c_begin, COLS) except `skip` on all kChunk rows of a tile (plain stores):
// the columns issue_operand never writes.
template <typename T, int COLS, int LD, int THREADS>
__device__ __forceinline__ void zero_columns(T* dst, int c_begin, int skip) {
  const int w = COLS - c_begin;
  if (w <= 0) return;
  for (int e = threadIdx.x; e < kChunk * w; e += THREADS) {
    const int r = e / w, c = c_begin + e % w;
    if (c != skip) dst[r * LD + c] = from_f<T>(0.f);
  }
}

// ---- chunk kernel ----------------------------------------------------------------------------
template <int Kp>
struct ChunkTraits {
  static constexpr int LD = Kp + 8;   // q, k tiles (T), row pitch in elements
  static constexpr int VC = 80;       // value tile columns: 64 values, the normalizer n-tile, 8 zero
  static constexpr int VLD = VC + 8;
  static constexpr int SP = 76;       // float state pitch: B-fragment reads hit 32 distinct banks
  static constexpr int NT = kVTile / 8 + 1;  // value n-tiles incl. the normalizer
  static constexpr int kStageBytes = (2 * kChunk * LD + kChunk * VLD) * 2;  // one q, k, v tile set
  // Layout: stage 0 | state | b, exp(b), exp(b_L - b) | stage 1 (async path only).
  static constexpr int kStage1 = kStageBytes + Kp * SP * 4 + 3 * kChunk * 4;  // byte offset of stage 1
  static constexpr int smem_bytes(int stages) { return kStage1 + (stages - 1) * kStageBytes; }
  // Two stages (cp.async double buffering) where they fit in the 227 KB of an sm90 CTA:
  // Kp = 64 (79,616 B) and 128 (131,840 B); Kp = 256 (236,288 B) stays single buffered.
  static constexpr int kStages = smem_bytes(2) <= 227 * 1024 ? 2 : 1;
};

// At most two CTAs share an SM (shared memory: 79.6 KB at Kp = 64 with two stages, more
// elsewhere); saying so lets ptxas use up to 255 registers instead of aiming at three CTAs
// (168 registers, with spills).
template <typename T, int Kp>
__global__ void __launch_bounds__(kChunkThreads, 2) linear_chunk_kernel(const LinearArgs a) {
  using Tr = ChunkTraits<Kp>;
  constexpr int LD = Tr::LD, VLD = Tr::VLD, SP = Tr::SP, NT = Tr::NT, KS = Kp / 16;
  LINEAR_SMEM(smem);
  float* sS = reinterpret_cast<float*>(smem + Tr::kStageBytes);
  float* sb = sS + Kp * SP;  // cumulative log-decay b
  float* seb = sb + kChunk;  // exp(b)
  float* sebl = seb + kChunk;  // exp(b_L - b), 0 past the chunk
  // cp.async double buffering (see the header comment); the synchronous path uses stage 0.
  const bool async = Tr::kStages > 1 && a.async_ok;
  auto stage = [&](int buf) { return smem + (buf ? Tr::kStage1 : 0); };
  // The working tiles (stage `buf`), reassigned per chunk.
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kChunk * LD;
  T* sV = sK + kChunk * LD;
  auto use_stage = [&](int buf) {
    sQ = reinterpret_cast<T*>(stage(buf));
    sK = sQ + kChunk * LD;
    sV = sK + kChunk * LD;
  };

  const int vt = int(blockIdx.x % unsigned(a.vtiles));
  const int n = int(blockIdx.x / unsigned(a.vtiles));
  const int h = int(blockIdx.y);
  const Item it = item_of(a, n, h);
  const int64_t item = int64_t(n) * a.heads + h;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int R = a.q.dim + (a.q.ones ? 1 : 0), C = a.v.dim;
  const bool norm = a.v.ones;
  const int c0 = vt * kVTile;
  // Tile column of the state / value tile -> column of the kernel's value space (C = normalizer).
  auto vcol = [&](int c) { return c < kVTile ? (c0 + c < C ? c0 + c : -1) : (c == kVTile && norm ? C : -1); };

  for (int e = tid; e < Kp * SP; e += kChunkThreads) {
    const int r = e / SP, c = e % SP, vc = c < Tr::VC ? vcol(c) : -1;
    sS[e] = (r < R && vc >= 0) ? state_get(a.s0, item, r, vc) : 0.f;
  }
  const int qones = a.q.ones ? a.q.dim : -1, kones = a.k.ones ? a.k.dim : -1;
  // Async path without a query ones column: the query multiplier is applied to the output
  // accumulators (O and n are linear in q); with one (left at 1, unscaled) it stays in the tile.
  const bool qmul_out = async && !a.q.ones;
  const float qmul = qmul_out ? a.q.mul : 1.f;
  const int vones = norm ? kVTile : -1;
  float ebL = 1.f;

  // Log-decay of walk step t0 + tid of the chunk at t0 (0 past T), read one chunk ahead into
  // a register so the load's latency hides behind a chunk of work.
  auto decay_of = [&](int t0) { return a.g && tid < kChunk && t0 + tid < it.T ? walk_decay(a, it, t0 + tid) : 0.f; };
  // x: decay_of(t0).
  auto load_decays = [&](int L, float x) {
    if (!a.g) return;
    if (tid < kChunk) sb[tid] = x;
    __syncthreads();
    for (int off = 1; off < kChunk; off *= 2) {
      const float y = (tid < kChunk && tid >= off) ? sb[tid - off] : 0.f;
      __syncthreads();
      if (tid < kChunk) sb[tid] += y;
      __syncthreads();
    }
    if (tid < kChunk) {
      seb[tid] = expf(sb[tid]);
      sebl[tid] = tid < L ? expf(sb[L - 1] - sb[tid]) : 0.f;
    }
    ebL = expf(sb[L - 1]);  // read before the next barrier, written two barriers ago
  };

  // S = exp(b_L) S + (diag(exp(b_L - b)) K)^T V over tokens [0, L); sK already scaled.
  auto update_state = [&](int L) {
    const int ksteps = (L + 15) / 16;
    for (int mt = warp; mt < KS; mt += kChunkThreads / 32) {
      float c[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[j][e] = sS[(16 * mt + g + (e >= 2 ? 8 : 0)) * SP + 8 * j + 2 * t + (e & 1)] * ebL;
      for (int s = 0; s < ksteps; ++s) {
        uint32_t af[4];
        ldmatrix_x4_trans(af, sK + (16 * s + (lane % 8) + 8 * (lane / 16)) * LD + 16 * mt + 8 * ((lane / 8) % 2));
#pragma unroll
        for (int p = 0; p < (NT + 1) / 2; ++p) {
          if (2 * p + 1 > NT - 1 && !norm) break;
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, sV + (16 * s + (lane % 8) + 8 * ((lane / 8) % 2)) * VLD + 16 * p + 8 * (lane / 16));
          mma16816<T>(c[2 * p], af, bf[0], bf[1]);
          if (2 * p + 1 < NT) mma16816<T>(c[2 * p + 1], af, bf[2], bf[3]);
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) sS[(16 * mt + g + (e >= 2 ? 8 : 0)) * SP + 8 * j + 2 * t + (e & 1)] = c[j][e];
    }
  };

  // O = diag(exp(b)) Q S (+ ((Q K^T) .* D) V when intra) for this warp's 16 rows; stored.
  auto outputs = [&](int t0, int L, bool intra) {
    const int r0 = 16 * warp;
    if (r0 >= L) return;
    float o[NT][4];
    float sc[8][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[j][e] = 0.f;
    for (int kk = 0; kk < KS; ++kk) {
      uint32_t af[4];
      ldmatrix_x4(af, sQ + (r0 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + 16 * kk + 8 * (lane / 16));
      // Q S: B fragments straight from the float32 state, rounded to T.
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (j == NT - 1 && !norm) break;
        const float* col = sS + 16 * kk * SP + 8 * j + g;
        const uint32_t b0 = pack2<T>(col[(2 * t) * SP], col[(2 * t + 1) * SP]);
        const uint32_t b1 = pack2<T>(col[(2 * t + 8) * SP], col[(2 * t + 9) * SP]);
        mma16816<T>(o[j], af, b0, b1);
      }
      if (intra) {
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          if (p > warp) break;  // keys past this warp's rows are masked
          uint32_t bf[4];
          ldmatrix_x4(bf, sK + (16 * p + (lane % 8) + 8 * (lane / 16)) * LD + 16 * kk + 8 * ((lane / 8) % 2));
          mma16816<T>(sc[2 * p], af, bf[0], bf[1]);
          mma16816<T>(sc[2 * p + 1], af, bf[2], bf[3]);
        }
      }
    }
    const int rl = r0 + g, rh = rl + 8;
    if (a.g || qmul != 1.f) {
      const float el = (a.g ? seb[rl] : 1.f) * qmul, eh = (a.g ? seb[rh] : 1.f) * qmul;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        o[j][0] *= el;
        o[j][1] *= el;
        o[j][2] *= eh;
        o[j][3] *= eh;
      }
    }
    if (intra) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >= 2 ? rh : rl, jj = 8 * j + 2 * t + (e & 1);
          float f = jj <= i ? qmul : 0.f;
          if (a.g && jj <= i) f = qmul * expf(sb[i] - sb[jj]);
          sc[j][e] *= f;
        }
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        if (s > warp) break;
        uint32_t af[4];
        af[0] = pack2<T>(sc[2 * s][0], sc[2 * s][1]);
        af[1] = pack2<T>(sc[2 * s][2], sc[2 * s][3]);
        af[2] = pack2<T>(sc[2 * s + 1][0], sc[2 * s + 1][1]);
        af[3] = pack2<T>(sc[2 * s + 1][2], sc[2 * s + 1][3]);
#pragma unroll
        for (int p = 0; p < (NT + 1) / 2; ++p) {
          if (2 * p + 1 > NT - 1 && !norm) break;
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, sV + (16 * s + (lane % 8) + 8 * ((lane / 8) % 2)) * VLD + 16 * p + 8 * (lane / 16));
          mma16816<T>(o[2 * p], af, bf[0], bf[1]);
          if (2 * p + 1 < NT) mma16816<T>(o[2 * p + 1], af, bf[2], bf[3]);
        }
      }
    }
    // The normalizer n = q~ . z sits in column 0 of the last n-tile (lanes t == 0).
    float nl = 0.f, nh = 0.f;
    if (norm) {
      nl = t == 0 ? o[NT - 1][0] : 0.f;
      nh = t == 0 ? o[NT - 1][2] : 0.f;
      nl += __shfl_xor_sync(0xffffffffu, nl, 1);
      nl += __shfl_xor_sync(0xffffffffu, nl, 2);
      nh += __shfl_xor_sync(0xffffffffu, nh, 1);
      nh += __shfl_xor_sync(0xffffffffu, nh, 2);
    }
    const float il = a.out_normalize ? 1.f / (nl + kNormEps) : 1.f;
    const float ih = a.out_normalize ? 1.f / (nh + kNormEps) : 1.f;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >= 2 ? rh : rl;
        const int c = vcol(8 * j + 2 * t + (e & 1));
        if (i >= L || c < 0 || c >= a.out_cols || (j == NT - 1 && vt != 0)) continue;
        store_out<T>(a, it, mem_tok(a, it, t0 + i), c, o[j][e] * (e >= 2 ? ih : il));
      }
  };

  const int T_ = it.T, nch = (T_ + kChunk - 1) / kChunk;
  const int vcols = min(kVTile, C - c0);  // value columns of this CTA held in memory
  // Async path: the tiles hold the raw rows (cp.async); feature maps and multipliers are
  // applied in place once a chunk has landed (the query multiplier mostly to O: qmul).
  const float qtile_mul = qmul_out ? 1.f : a.q.mul;
  const bool qfix = a.q.fmap != 0 || qtile_mul != 1.f;
  const bool kfix = a.k.fmap != 0 || a.k.mul != 1.f, vfix = a.v.fmap != 0 || a.v.mul != 1.f;
  auto issue_q = [&](int buf, int t0, int L) {
    issue_operand<T, Kp, LD, kChunkThreads>(reinterpret_cast<T*>(stage(buf)), a.q, a, it, t0, L, 0, a.q.dim, qones);
  };
  auto issue_kv = [&](int buf, int t0, int L) {
    T* k = reinterpret_cast<T*>(stage(buf)) + kChunk * LD;
    issue_operand<T, Kp, LD, kChunkThreads>(k, a.k, a, it, t0, L, 0, a.k.dim, kones);
    issue_operand<T, Tr::VC, VLD, kChunkThreads>(k + kChunk * LD, a.v, a, it, t0, L, c0, vcols, vones);
  };
  if (async) {  // columns cp.async never writes: zero once in both stages (ones columns: per chunk)
    for (int buf = 0; buf < 2; ++buf) {
      T* q = reinterpret_cast<T*>(stage(buf));
      zero_columns<T, Kp, LD, kChunkThreads>(q, a.q.dim, qones);
      zero_columns<T, Kp, LD, kChunkThreads>(q + kChunk * LD, a.k.dim, kones);
      zero_columns<T, Tr::VC, VLD, kChunkThreads>(q + 2 * kChunk * LD, vcols, vones);
    }
  }

  if (a.causal) {
    if (async) {
      if (nch > 0) {
        if (a.out) issue_q(0, 0, min(kChunk, T_));
        issue_kv(0, 0, min(kChunk, T_));
      }
      cp_async_commit();
    }
    float gnext = decay_of(0);
    for (int c = 0; c < nch; ++c) {
      const int t0 = c * kChunk, L = min(kChunk, T_ - t0);
      const float gcur = gnext;
      gnext = decay_of(t0 + kChunk);
      if (async) {
        const int buf = c & 1;
        // Stage buf ^ 1 was last read by chunk c - 1, before its trailing barrier.
        if (c + 1 < nch) {
          const int Ln = min(kChunk, T_ - t0 - kChunk);
          if (a.out) issue_q(buf ^ 1, t0 + kChunk, Ln);
          issue_kv(buf ^ 1, t0 + kChunk, Ln);
        }
        cp_async_commit();
        load_decays(L, gcur);
        cp_async_wait<1>();  // this thread's copies of chunk c have landed
        use_stage(buf);
        if (qfix && a.out) transform_operand<T, Kp, LD, kChunkThreads>(sQ, L, a.q.dim, a.q.fmap, qtile_mul);
        if (kfix) transform_operand<T, Kp, LD, kChunkThreads>(sK, L, a.k.dim, a.k.fmap, a.k.mul);
        if (vfix) transform_operand<T, Tr::VC, VLD, kChunkThreads>(sV, L, vcols, a.v.fmap, a.v.mul);
      } else {
        load_operand<T, kChunk, Kp, Kp, LD, kChunkThreads>(sQ, a.q, a, it, t0, L, 0, qones);
        load_operand<T, kChunk, Kp, Kp, LD, kChunkThreads>(sK, a.k, a, it, t0, L, 0, kones);
        load_operand<T, kChunk, Tr::VC, kVTile, VLD, kChunkThreads>(sV, a.v, a, it, t0, L, c0, vones);
        load_decays(L, gcur);
      }
      __syncthreads();
      if (a.out) outputs(t0, L, true);
      __syncthreads();
      if (a.g) {  // K rows decayed to the chunk end (columns >= R are zero)
        constexpr int CH = Kp / 8;
        for (int e = tid; e < kChunk * CH; e += kChunkThreads) {
          const int r = e / CH, col = (e % CH) * 8;
          if (col >= R) continue;
          uint4* p = reinterpret_cast<uint4*>(sK + r * LD + col);
          alignas(16) T x[8];
          *reinterpret_cast<uint4*>(x) = *p;
          const float f = sebl[r];
#pragma unroll
          for (int j = 0; j < 8; ++j) x[j] = from_f<T>(to_f<T>(x[j]) * f);
          *p = *reinterpret_cast<const uint4*>(x);
        }
        __syncthreads();
      }
      update_state(L);
      __syncthreads();
    }
  } else {
    // Two walks as one sequence of steps: K, V chunks into the state, then (with outputs)
    // Q chunks against the final state; the async path prefetches across the seam.
    const int steps = nch + (a.out ? nch : 0);
    auto issue_step = [&](int s, int buf) {
      const int t0 = (s < nch ? s : s - nch) * kChunk, L = min(kChunk, T_ - t0);
      if (s < nch) issue_kv(buf, t0, L);
      else issue_q(buf, t0, L);
    };
    if (async) {
      if (steps > 0) issue_step(0, 0);
      cp_async_commit();
    }
    for (int s = 0; s < steps; ++s) {
      const bool kv = s < nch;
      const int t0 = (kv ? s : s - nch) * kChunk, L = min(kChunk, T_ - t0);
      if (async) {
        const int buf = s & 1;
        if (s + 1 < steps) issue_step(s + 1, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        use_stage(buf);
        if (kv) {
          if (kfix) transform_operand<T, Kp, LD, kChunkThreads>(sK, L, a.k.dim, a.k.fmap, a.k.mul);
          if (vfix) transform_operand<T, Tr::VC, VLD, kChunkThreads>(sV, L, vcols, a.v.fmap, a.v.mul);
        } else if (qfix) {
          transform_operand<T, Kp, LD, kChunkThreads>(sQ, L, a.q.dim, a.q.fmap, qtile_mul);
        }
      } else if (kv) {
        load_operand<T, kChunk, Kp, Kp, LD, kChunkThreads>(sK, a.k, a, it, t0, L, 0, kones);
        load_operand<T, kChunk, Tr::VC, kVTile, VLD, kChunkThreads>(sV, a.v, a, it, t0, L, c0, vones);
      } else {
        load_operand<T, kChunk, Kp, Kp, LD, kChunkThreads>(sQ, a.q, a, it, t0, L, 0, qones);
      }
      __syncthreads();
      if (kv) update_state(L);
      else outputs(t0, L, false);
      __syncthreads();
    }
  }
  if (a.s1.s || a.s1.z) {
    // A reversed walk ends one decay short of the adjoint of the initial state: exp(g_0).
    const float mul = a.reverse && a.g && T_ > 0 ? expf(*row_ptr<float>(a.g, a.g_stride, it, it.tok0)) : 1.f;
    for (int e = tid; e < Kp * SP; e += kChunkThreads) {
      const int r = e / SP, c = e % SP, vc = c < Tr::VC ? vcol(c) : -1;
      if (r >= R || vc < 0 || (c == kVTile && vt != 0)) continue;
      state_put(a.s1, item, r, vc, sS[e] * mul);
    }
  }
}

// ---- step kernel ------------------------------------------------------------------------------
template <int Kp>
struct StepTraits {
  static constexpr int RG = 8;           // row groups (warps carrying state columns)
  static constexpr int KR = Kp / RG;     // state rows per thread
  static constexpr int ZR = Kp / 32;     // normalizer rows per lane of the z warp
  static constexpr int smem_bytes() { return (2 * Kp + kStepVTile + RG * kStepVTile + 4) * 4; }
};

template <typename T, int Kp>
__global__ void __launch_bounds__(9 * 32) linear_step_kernel(const LinearArgs a) {
  using Tr = StepTraits<Kp>;
  constexpr int RG = Tr::RG, KR = Tr::KR, ZR = Tr::ZR;
  LINEAR_SMEM(smem);
  float* sq = reinterpret_cast<float*>(smem);
  float* sk = sq + Kp;
  float* sv = sk + Kp;
  float* red = sv + kStepVTile;
  float* sn = red + RG * kStepVTile;  // [0] normalizer, [1] decay

  const bool norm = a.v.ones;
  const int threads = 32 * (RG + (norm ? 1 : 0));
  const int vt = int(blockIdx.x % unsigned(a.vtiles));
  const int n = int(blockIdx.x / unsigned(a.vtiles));
  const int h = int(blockIdx.y);
  const Item it = item_of(a, n, h);
  const int64_t item = int64_t(n) * a.heads + h;
  const int tid = threadIdx.x, y = tid / 32, lane = tid % 32;
  const int K = a.q.dim, C = a.v.dim, col = vt * kStepVTile + lane;

  float s[KR];
  float z[ZR];
  if (y < RG) {
#pragma unroll
    for (int i = 0; i < KR; ++i) {
      const int r = y + RG * i;
      s[i] = (r < K && col < C) ? state_get(a.s0, item, r, col) : 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < ZR; ++i) {
      const int r = lane + 32 * i;
      z[i] = r < K ? state_get(a.s0, item, r, C) : 0.f;
    }
  }
  for (int t = 0; t < it.T; ++t) {
    const int64_t tok = it.tok0 + t;
    for (int i = tid; i < Kp; i += threads) {
      sq[i] = i < K ? a.q.mul * phi(a.q.fmap, to_f<T>(row_ptr<T>(a.q.ptr, a.q.stride, it, tok)[i])) : 0.f;
      sk[i] = i < K ? a.k.mul * phi(a.k.fmap, to_f<T>(row_ptr<T>(a.k.ptr, a.k.stride, it, tok)[i])) : 0.f;
    }
    if (tid < kStepVTile)
      sv[tid] = col < C ? a.v.mul * phi(a.v.fmap, to_f<T>(row_ptr<T>(a.v.ptr, a.v.stride, it, tok)[col])) : 0.f;
    if (tid == 0) sn[1] = a.g ? expf(walk_decay(a, it, t)) : 1.f;
    __syncthreads();
    const float d = sn[1];
    if (y < RG) {
      float part = 0.f;
      const float vc = sv[lane];
#pragma unroll
      for (int i = 0; i < KR; ++i) {
        const int r = y + RG * i;
        s[i] = d * s[i] + sk[r] * vc;
        part += sq[r] * s[i];
      }
      red[y * kStepVTile + lane] = part;
    } else {
      float part = 0.f;
#pragma unroll
      for (int i = 0; i < ZR; ++i) {
        const int r = lane + 32 * i;
        z[i] = d * z[i] + sk[r];
        part += sq[r] * z[i];
      }
      for (int m = 16; m >= 1; m /= 2) part += __shfl_xor_sync(0xffffffffu, part, m);
      if (lane == 0) sn[0] = part;
    }
    __syncthreads();
    if (tid < kStepVTile && col < C && a.out) {
      float o = 0.f;
#pragma unroll
      for (int yy = 0; yy < RG; ++yy) o += red[yy * kStepVTile + tid];
      if (a.out_normalize) o /= sn[0] + kNormEps;
      store_out<T>(a, it, tok, col, o);
    }
  }
  if (y < RG) {
#pragma unroll
    for (int i = 0; i < KR; ++i) {
      const int r = y + RG * i;
      if (r < K && col < C) state_put(a.s1, item, r, col, s[i]);
    }
  } else if (vt == 0) {
#pragma unroll
    for (int i = 0; i < ZR; ++i) {
      const int r = lane + 32 * i;
      if (r < K) state_put(a.s1, item, r, C, z[i]);
    }
  }
}

// ---- backward helpers ---------------------------------------------------------------------------
// Per-token work over (batch row, token, head): `rows` = batch rows * tokens * heads.
struct AuxArgs {
  LinearArgs geo;  // cu_seqlens, seqlen, batch, heads, log-decay
  int64_t tokens = 0, rows = 0;
  int K = 0, V = 0;
  // prep: dO' = [dout / (n + eps), -(dout . o) / (n + eps)^2] with o' = [o, n] float32 (V + 1)
  const void* dout = nullptr;
  int64_t dout_stride[3] = {};
  const float* o = nullptr;
  void* dop = nullptr;  // T, (rows, V + 1)
  // finish: dq = dq~ * scale * phi'(q), dk = dk~ * phi'(k), db = q~.dq~ - k~.dk~
  const void* q = nullptr;
  const void* k = nullptr;
  int64_t q_stride[3] = {}, k_stride[3] = {};
  const float* dqt = nullptr;  // (rows, K)
  const float* dkt = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  int64_t dq_stride[3] = {}, dk_stride[3] = {};
  float scale = 1.f;
  int fmap = 0;
  float* dg = nullptr;  // d log-decay (batch row, token, head)
  int64_t dg_stride[3] = {};
  // decay scan: dg = reverse cumsum of db, started at <dS_T, S_T> + <dz_T, z_T>
  const float* dS = nullptr;
  const float* dz = nullptr;
  const float* S = nullptr;
  const float* z = nullptr;
};

constexpr int kAuxThreads = 128;  // 4 warps, one (token, head) row each
constexpr int kScanThreads = 256;

__device__ __forceinline__ float dphi(int f, float x) {
  if (f == 1) return x > 0.f ? 1.f : expf(x);
  if (f == 2) return x > 0.f ? 1.f : 0.f;
  return 1.f;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int m = 16; m >= 1; m /= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}
// (batch row, token, head) of a per-token row index.
__device__ __forceinline__ void row_coords(const AuxArgs& x, int64_t row, int64_t& b, int64_t& tok, int64_t& h) {
  h = row % x.geo.heads;
  tok = (row / x.geo.heads) % x.tokens;
  b = row / (x.geo.heads * x.tokens);
}

template <typename T>
__global__ void __launch_bounds__(kAuxThreads) linear_prep_dout_kernel(const AuxArgs x) {
  const int64_t row = int64_t(blockIdx.x) * (kAuxThreads / 32) + threadIdx.x / 32;
  if (row >= x.rows) return;
  const int lane = threadIdx.x % 32;
  int64_t b, tok, h;
  row_coords(x, row, b, tok, h);
  const T* d = static_cast<const T*>(x.dout) + b * x.dout_stride[0] + tok * x.dout_stride[1] + h * x.dout_stride[2];
  const float* o = x.o + row * (x.V + 1);
  T* dop = static_cast<T*>(x.dop) + row * (x.V + 1);
  const float inv = 1.f / (o[x.V] + kNormEps);
  float dot = 0.f;
  for (int c = lane; c < x.V; c += 32) {
    const float dd = to_f<T>(d[c]) * inv;
    dot += dd * o[c];
    dop[c] = from_f<T>(dd);
  }
  dot = warp_sum(dot);
  if (lane == 0) dop[x.V] = from_f<T>(-dot * inv);
}

template <typename T>
__global__ void __launch_bounds__(kAuxThreads) linear_finish_kernel(const AuxArgs x) {
  const int64_t row = int64_t(blockIdx.x) * (kAuxThreads / 32) + threadIdx.x / 32;
  if (row >= x.rows) return;
  const int lane = threadIdx.x % 32;
  int64_t b, tok, h;
  row_coords(x, row, b, tok, h);
  const T* q = static_cast<const T*>(x.q) + b * x.q_stride[0] + tok * x.q_stride[1] + h * x.q_stride[2];
  const T* k = static_cast<const T*>(x.k) + b * x.k_stride[0] + tok * x.k_stride[1] + h * x.k_stride[2];
  T* dq = static_cast<T*>(x.dq) + b * x.dq_stride[0] + tok * x.dq_stride[1] + h * x.dq_stride[2];
  T* dk = static_cast<T*>(x.dk) + b * x.dk_stride[0] + tok * x.dk_stride[1] + h * x.dk_stride[2];
  const float* dqt = x.dqt + row * x.K;
  const float* dkt = x.dkt + row * x.K;
  float db = 0.f;
  for (int c = lane; c < x.K; c += 32) {
    const float qv = to_f<T>(q[c]), kv = to_f<T>(k[c]);
    db += x.scale * phi(x.fmap, qv) * dqt[c] - phi(x.fmap, kv) * dkt[c];
    dq[c] = from_f<T>(dqt[c] * x.scale * dphi(x.fmap, qv));
    dk[c] = from_f<T>(dkt[c] * dphi(x.fmap, kv));
  }
  if (x.dg) {
    db = warp_sum(db);
    if (lane == 0) x.dg[b * x.dg_stride[0] + tok * x.dg_stride[1] + h * x.dg_stride[2]] = db;
  }
}

// One CTA per (sequence, head): d log-decay = reverse cumulative sum of db (in place),
// starting from the final-state term <dS_T, S_T> (+ <dz_T, z_T>).
static __global__ void __launch_bounds__(kScanThreads) linear_decay_scan_kernel(const AuxArgs x) {
  LINEAR_SMEM(smem);
  float* part = reinterpret_cast<float*>(smem);  // kScanThreads + 1
  const int n = int(blockIdx.x), h = int(blockIdx.y), tid = threadIdx.x;
  const Item it = item_of(x.geo, n, h);
  const int64_t item = int64_t(n) * x.geo.heads + h;
  float init = 0.f;
  if (x.dS && x.S)
    for (int64_t e = tid; e < int64_t(x.K) * x.V; e += kScanThreads)
      init += x.dS[item * x.K * x.V + e] * x.S[item * x.K * x.V + e];
  if (x.dz && x.z)
    for (int e = tid; e < x.K; e += kScanThreads) init += x.dz[item * x.K + e] * x.z[item * x.K + e];
  const int seg = (it.T + kScanThreads - 1) / kScanThreads;
  const int i0 = min(it.T, tid * seg), i1 = min(it.T, i0 + seg);
  auto at = [&](int i) -> float& {
    return x.dg[it.brow * x.dg_stride[0] + (it.tok0 + i) * x.dg_stride[1] + int64_t(h) * x.dg_stride[2]];
  };
  float sum = 0.f;
  for (int i = i0; i < i1; ++i) sum += at(i);
  part[tid] = sum;
  __syncthreads();
  if (tid == 0) {  // suffix sums over the segments, and the final-state term
    float run = 0.f;
    for (int j = kScanThreads - 1; j >= 0; --j) {
      const float pj = part[j];
      part[j] = run;  // sum of the later segments
      run += pj;
    }
  }
  // every thread's share of the final-state term, reduced through part[kScanThreads]
  if (tid == 0) part[kScanThreads] = 0.f;
  __syncthreads();
  atomicAdd(&part[kScanThreads], init);
  __syncthreads();
  float run = part[tid] + part[kScanThreads];
  for (int i = i1 - 1; i >= i0; --i) {
    run += at(i);
    at(i) = run;
  }
}

// ---- launch plans -------------------------------------------------------------------------------
// The forward and backward as lists of launches, shared by the CUDA launcher
// (linear_attention.cu) and the host emulation test.
enum class KernelKind { Chunk, Step, PrepDout, Finish, DecayScan };
struct Launch {
  KernelKind kind;
  int kp = 0;  // key-dim bucket (Chunk, Step)
  LinearArgs a;
  AuxArgs x;
  unsigned gx = 1, gy = 1;
  int threads = 0, smem = 0;
};

inline int key_bucket(int r) { return r <= 64 ? 64 : r <= 128 ? 128 : r <= 256 ? 256 : 0; }
// A grid extent, saturated so that one past the launch limit stays out of range (the
// launcher rejects x > 2^31 - 1) instead of wrapping to a small grid that skips work.
inline unsigned grid_dim(int64_t n) { return n > int64_t(0xffffffff) ? 0xffffffffu : unsigned(n); }

constexpr int64_t kStepMaxTokens = 8;  // causal sequences this short use the step kernel

inline void copy3(int64_t* d, const int64_t* s) {
  d[0] = s[0];
  d[1] = s[1];
  d[2] = s[2];
}
inline Operand operand(const void* ptr, const int64_t* st, int dim, int fmap, float mul, bool ones) {
  Operand o;
  o.ptr = ptr;
  copy3(o.stride, st);
  o.dim = dim;
  o.fmap = fmap;
  o.mul = mul;
  o.ones = ones;
  return o;
}
// S (K x V) and z (K) as the state (transposed: V x K with z as row V).
inline StateIO state_io(const void* s, const void* z, int64_t K, int64_t V, bool transposed) {
  StateIO io;
  io.s = const_cast<float*>(static_cast<const float*>(s));
  io.z = const_cast<float*>(static_cast<const float*>(z));
  io.ps = K * V;
  io.pz = K;
  if (!transposed) {
    io.rs = V, io.cs = 1, io.sr = int(K), io.sc = int(V), io.zrs = 1, io.zcs = 0;
  } else {
    io.rs = 1, io.cs = V, io.sr = int(V), io.sc = int(K), io.zrs = 0, io.zcs = 1;
  }
  return io;
}
inline LinearArgs geometry(const LinearAttentionParams& p) {
  LinearArgs a;
  a.cu_seqlens = p.cu_seqlens;
  a.seqlen = p.seqlen;
  a.batch = int(p.batch);
  a.heads = int(p.heads);
  a.causal = p.causal;
  if (p.log_decay) {
    a.g = static_cast<const float*>(p.log_decay);
    copy3(a.g_stride, p.g_stride);
  }
  return a;
}
inline Launch chunk_launch(const LinearArgs& a) {
  Launch l;
  l.kind = KernelKind::Chunk;
  l.a = a;
  l.kp = key_bucket(a.q.dim + (a.q.ones ? 1 : 0));
  l.a.vtiles = int((a.v.dim + kVTile - 1) / kVTile);
  if (l.a.vtiles < 1) l.a.vtiles = 1;
  l.gx = grid_dim(int64_t(a.batch) * l.a.vtiles);
  l.gy = unsigned(a.heads);
  l.threads = kChunkThreads;
  const int stages = l.kp == 64 ? ChunkTraits<64>::kStages : l.kp == 128 ? ChunkTraits<128>::kStages
                                                                         : ChunkTraits<256>::kStages;
  auto cp_async_ok = [](const Operand& o) { return o.dim % 8 == 0 && flash::vec_ok(o.ptr, o.stride); };
  l.a.async_ok = stages > 1 && cp_async_ok(a.q) && cp_async_ok(a.k) && cp_async_ok(a.v);
  const int used = l.a.async_ok ? stages : 1;
  l.smem = l.kp == 64 ? ChunkTraits<64>::smem_bytes(used) : l.kp == 128 ? ChunkTraits<128>::smem_bytes(used)
                                                                         : ChunkTraits<256>::smem_bytes(used);
  return l;
}

// Whether the step kernel runs this forward (decoding: every causal sequence short).
inline bool use_step(const LinearAttentionParams& p) {
  if (!p.causal) return false;
  return p.cu_seqlens ? p.max_seqlen > 0 && p.max_seqlen <= kStepMaxTokens : p.seqlen <= kStepMaxTokens;
}

// force: 0 picks by use_step, 1 the chunk kernel, 2 the step kernel (tests).
inline std::vector<Launch> plan_forward(const LinearAttentionParams& p, int force = 0) {
  LinearArgs a = geometry(p);
  const int K = int(p.head_dim), V = int(p.head_dim_v), f = int(p.feature_map);
  a.q = operand(p.q, p.q_stride, K, f, float(p.scale), false);
  a.k = operand(p.k, p.k_stride, K, f, 1.f, false);
  a.v = operand(p.v, p.v_stride, V, 0, 1.f, p.normalize);
  a.out = p.out;
  copy3(a.out_stride, p.out_stride);
  a.out_cols = V;
  a.out_normalize = p.normalize;
  a.s0 = state_io(p.initial_state, p.normalize ? p.initial_z : nullptr, K, V, false);
  a.s1 = state_io(p.final_state, p.normalize ? p.final_z : nullptr, K, V, false);
  if (force == 1 || (force == 0 && !use_step(p))) return {chunk_launch(a)};
  Launch l;
  l.kind = KernelKind::Step;
  l.a = a;
  l.kp = key_bucket(K);
  l.a.vtiles = (V + kStepVTile - 1) / kStepVTile;
  l.gx = grid_dim(p.batch * l.a.vtiles);
  l.gy = unsigned(p.heads);
  l.threads = 32 * (StepTraits<64>::RG + (p.normalize ? 1 : 0));
  l.smem = l.kp == 64 ? StepTraits<64>::smem_bytes() : l.kp == 128 ? StepTraits<128>::smem_bytes()
                                                                    : StepTraits<256>::smem_bytes();
  return {l};
}

// Float32 workspace of the backward: dq~, dk~ (rows x K), with normalize o' (rows x (V+1))
// and dO' (rows x (V+1) elements of 2 bytes), and with d_log_decay and a final-state
// gradient the final state S_T, z_T.
struct BwdWorkspace {
  int64_t dqt = 0, dkt = 0, o = 0, dop = 0, st = 0, sz = 0, bytes = 0;
};
inline bool needs_final_state(const LinearAttentionGradParams& g) {
  return g.d_log_decay && (g.d_final_state || (g.fwd.normalize && g.d_final_z));
}
inline BwdWorkspace bwd_workspace(const LinearAttentionGradParams& g) {
  const LinearAttentionParams& p = g.fwd;
  const int64_t brows = p.cu_seqlens ? 1 : p.batch;
  const int64_t rows = brows * p.seqlen * p.heads, K = p.head_dim, V = p.head_dim_v;
  BwdWorkspace w;
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off += (bytes + 255) / 256 * 256;
    return at;
  };
  w.dqt = take(rows * K * 4);
  w.dkt = take(rows * K * 4);
  if (p.normalize) {
    w.o = take(rows * (V + 1) * 4);
    w.dop = take(rows * (V + 1) * 2);
  }
  if (needs_final_state(g)) {
    w.st = take(p.batch * p.heads * K * V * 4);
    w.sz = take(p.batch * p.heads * K * 4);
  }
  w.bytes = off;
  return w;
}

inline std::vector<Launch> plan_backward(const LinearAttentionGradParams& g, void* workspace) {
  const LinearAttentionParams& p = g.fwd;
  const BwdWorkspace w = bwd_workspace(g);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  const int K = int(p.head_dim), V = int(p.head_dim_v), f = int(p.feature_map);
  const bool norm = p.normalize;
  const int64_t brows = p.cu_seqlens ? 1 : p.batch, H = p.heads, tokens = p.seqlen;
  const float scale = float(p.scale);
  auto dense = [&](int64_t width, int64_t* st) {
    st[0] = tokens * H * width;
    st[1] = H * width;
    st[2] = width;
  };
  float* dqt = reinterpret_cast<float*>(ws + w.dqt);
  float* dkt = reinterpret_cast<float*>(ws + w.dkt);
  float* o = norm ? reinterpret_cast<float*>(ws + w.o) : nullptr;
  void* dop = norm ? ws + w.dop : nullptr;
  float* st = needs_final_state(g) ? reinterpret_cast<float*>(ws + w.st) : nullptr;
  float* sz = needs_final_state(g) && norm ? reinterpret_cast<float*>(ws + w.sz) : nullptr;
  const void* dz_final = norm ? g.d_final_z : nullptr;
  std::vector<Launch> plan;
  AuxArgs x;
  x.geo = geometry(p);
  x.tokens = tokens;
  x.rows = brows * tokens * H;
  x.K = K;
  x.V = V;
  const unsigned aux_blocks = grid_dim((x.rows + kAuxThreads / 32 - 1) / (kAuxThreads / 32));

  // 1. Recompute o' = [o, n] (normalize) and the final state (d log-decay).
  if (norm || st) {
    LinearArgs a = geometry(p);
    a.q = operand(p.q, p.q_stride, K, f, scale, false);
    a.k = operand(p.k, p.k_stride, K, f, 1.f, false);
    a.v = operand(p.v, p.v_stride, V, 0, 1.f, norm);
    a.out = o;
    dense(V + 1, a.out_stride);
    a.out_cols = V + 1;
    a.out_f32 = true;
    a.s0 = state_io(p.initial_state, norm ? p.initial_z : nullptr, K, V, false);
    a.s1 = state_io(st, sz, K, V, false);
    plan.push_back(chunk_launch(a));
  }
  // 2. dO' with the normalizer's gradient column.
  Operand dout = operand(g.dout, g.dout_stride, V, 0, 1.f, false);
  if (norm) {
    AuxArgs y = x;
    y.dout = g.dout;
    copy3(y.dout_stride, g.dout_stride);
    y.o = o;
    y.dop = dop;
    Launch l;
    l.kind = KernelKind::PrepDout;
    l.x = y;
    l.gx = aux_blocks;
    l.threads = kAuxThreads;
    plan.push_back(l);
    int64_t s[3];
    dense(V + 1, s);
    dout = operand(dop, s, V + 1, 0, 1.f, false);
  }
  const Operand qop = operand(p.q, p.q_stride, K, f, scale, false);
  const Operand kop = operand(p.k, p.k_stride, K, f, 1.f, false);
  const Operand vop = operand(p.v, p.v_stride, V, 0, 1.f, norm);  // v' = [v, 1] as a key / query
  // 3. dV (and dS_0, dz_0): reversed walk, query k~, key q~, value dO', state dS_T.
  {
    LinearArgs a = geometry(p);
    a.reverse = p.causal;
    a.q = kop;
    a.k = qop;
    a.v = dout;
    a.out = g.dv;
    copy3(a.out_stride, g.dv_stride);
    a.out_cols = V;
    a.s0 = state_io(g.d_final_state, dz_final, K, V, false);
    a.s1 = state_io(g.d_initial_state, norm ? g.d_initial_z : nullptr, K, V, false);
    plan.push_back(chunk_launch(a));
  }
  // 4. dK~: reversed walk, query v', key dO', value q~, state dS_T^T.
  {
    LinearArgs a = geometry(p);
    a.reverse = p.causal;
    a.q = vop;
    a.q.ones = norm;
    a.k = dout;
    a.v = qop;
    a.out = dkt;
    dense(K, a.out_stride);
    a.out_cols = K;
    a.out_f32 = true;
    a.s0 = state_io(g.d_final_state, dz_final, K, V, true);
    plan.push_back(chunk_launch(a));
  }
  // 5. dQ~: forward walk, query dO', key v', value k~, state S_0^T.
  {
    LinearArgs a = geometry(p);
    a.q = dout;
    a.k = vop;
    a.v = kop;
    a.out = dqt;
    dense(K, a.out_stride);
    a.out_cols = K;
    a.out_f32 = true;
    a.s0 = state_io(p.initial_state, norm ? p.initial_z : nullptr, K, V, true);
    plan.push_back(chunk_launch(a));
  }
  // 6. dq, dk through the feature map; per-token db.
  {
    AuxArgs y = x;
    y.q = p.q;
    y.k = p.k;
    copy3(y.q_stride, p.q_stride);
    copy3(y.k_stride, p.k_stride);
    y.dqt = dqt;
    y.dkt = dkt;
    y.dq = g.dq;
    y.dk = g.dk;
    copy3(y.dq_stride, g.dq_stride);
    copy3(y.dk_stride, g.dk_stride);
    y.scale = scale;
    y.fmap = f;
    y.dg = static_cast<float*>(g.d_log_decay);
    copy3(y.dg_stride, g.dg_stride);
    Launch l;
    l.kind = KernelKind::Finish;
    l.x = y;
    l.gx = aux_blocks;
    l.threads = kAuxThreads;
    plan.push_back(l);
    // 7. d log-decay: reverse cumulative sum per (sequence, head).
    if (g.d_log_decay) {
      y.dS = static_cast<const float*>(g.d_final_state);
      y.dz = static_cast<const float*>(dz_final);
      y.S = st;
      y.z = sz;
      Launch s;
      s.kind = KernelKind::DecayScan;
      s.x = y;
      s.gx = grid_dim(p.batch);
      s.gy = unsigned(H);
      s.threads = kScanThreads;
      s.smem = (kScanThreads + 1) * 4;
      plan.push_back(s);
    }
  }
  return plan;
}

}  // namespace linear
}  // namespace cuda
}  // namespace longattn

#if !defined(LONGATTN_FLASH_EMULATE)
#include "linear_launch.h"

namespace longattn {
namespace cuda {
namespace linear {

template <typename T, int Kp>
cudaError_t launch_linear_chunk(const LinearArgs& a, unsigned gx, unsigned gy, int threads, int smem,
                                cudaStream_t stream) {
  auto kernel = linear_chunk_kernel<T, Kp>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(gx, gy, 1), threads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int Kp>
cudaError_t launch_linear_step(const LinearArgs& a, unsigned gx, unsigned gy, int threads, int smem,
                               cudaStream_t stream) {
  linear_step_kernel<T, Kp><<<dim3(gx, gy, 1), threads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace linear
}  // namespace cuda
}  // namespace longattn
#endif  // !LONGATTN_FLASH_EMULATE
