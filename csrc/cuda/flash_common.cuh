// Building blocks shared by the flash attention kernels (flash_fwd.cuh, flash_bwd.cuh):
// tile traits, cp.async / ldmatrix / mma.sync wrappers, tile loads with zero fill, and the
// score modification (scale, softcap, ALiBi, mask) of attention.h.
//
// Fragment layouts used throughout (PTX ISA 8.x, section 9.7.14.5.8 "Matrix Fragments for
// mma.m16n8k16 with floating point type", .f16/.bf16 inputs, .f32 accumulators). With
// lane = threadIdx.x % 32, g = lane / 4 ("groupID") and t = lane % 4 ("threadID_in_group"):
//   A (16x16, row major), 4 x .b32, each holding 2 consecutive-column elements:
//     a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//     a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B (16x8, K x N), 2 x .b32:  b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   C/D (16x8, f32), 4 floats:  c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// ldmatrix (PTX ISA 9.7.14.5.15, "ldmatrix"): .x4 loads four 8x8 b16 matrices; lanes
// 8m..8m+7 give the 16-byte row addresses of matrix m (rows 0..7 in order). Without .trans,
// lane receives in register m the pair (row g, columns 2t, 2t+1) of matrix m; with .trans
// it receives (rows 2t, 2t+1, column g), i.e. the same pair of the transposed matrix.
// So for a row-major smem tile X[r][c]:
//   * A operand (rows = M, cols = K), non-trans, matrices (r0-7,c0-7) (r8-15,c0-7)
//     (r0-7,c8-15) (r8-15,c8-15): lane address X[r + (lane%8) + 8*((lane/8)%2)][c + 8*(lane/16)].
//   * B operand when X is stored N x K (rows = n, e.g. K rows for S = Q K^T), non-trans,
//     matrices (n0-7,k0-7) (n0-7,k8-15) (n8-15,k0-7) (n8-15,k8-15): lane address
//     X[n + (lane%8) + 8*(lane/16)][k + 8*((lane/8)%2)]; regs {0,1} = B frag of n-tile n,
//     regs {2,3} = B frag of n-tile n+8.
//   * B operand when X is stored K x N (rows = k, e.g. V rows for O = P V), .trans,
//     matrices (k0-7,n0-7) (k8-15,n0-7) (k0-7,n8-15) (k8-15,n8-15): lane address
//     X[k + (lane%8) + 8*((lane/8)%2)][n + 8*(lane/16)]; regs {0,1} = n-tile n, {2,3} = n+8.
//   * A operand when X is stored K x M (the transpose of A, e.g. dS^T for dQ = dS K), .trans,
//     matrices (k0-7,m0-7) (k0-7,m8-15) (k8-15,m0-7) (k8-15,m8-15): lane address
//     X[k + (lane%8) + 8*(lane/16)][m + 8*((lane/8)%2)].
// Accumulators reused as A operands (P of O = P V): the C tiles of n-tiles 2s and 2s+1 of
// a 16-row strip are exactly the A fragment of k-step s after packing pairs to 16 bits:
//   a[0] = pack(C_{2s}[0,1]), a[1] = pack(C_{2s}[2,3]), a[2] = pack(C_{2s+1}[0,1]), a[3] = pack(C_{2s+1}[2,3]).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "longattn/attention.h"

namespace longattn {
namespace cuda {
namespace flash {

// ---- tile traits ------------------------------------------------------------------------
// Head dims are bucketed to Dp in {32, 64, 96, 128, 192, 256}; D and Dv are zero-filled up
// to Dp on load and masked on store (one bucket for max(D, Dv)). Each forward warp owns
// kStrips strips of 16 query rows, so kBlockM = 16 * kStrips * kWarps: with two strips per
// warp (FlashAttention-2's layout for Dp <= 128) every K / V fragment read from shared
// memory feeds two MMAs, halving the ldmatrix traffic per MMA of one strip per warp. Shared
// memory rows are padded by 8 elements (16 B): with a row pitch of 2 * (Dp + 8) bytes the
// eight 16-byte rows of an ldmatrix matrix fall in distinct bank quads for every Dp here,
// so ldmatrix and cp.async are conflict free.
// The build knob LONGATTN_FWD_STRIPS (1 or 2, default 2) picks the layout for Dp <= 128.
#ifndef LONGATTN_FWD_STRIPS
#define LONGATTN_FWD_STRIPS 2
#endif
static_assert(LONGATTN_FWD_STRIPS == 1 || LONGATTN_FWD_STRIPS == 2, "LONGATTN_FWD_STRIPS must be 1 or 2");
constexpr int kFwdStrips = LONGATTN_FWD_STRIPS;
template <int Dp> struct FwdTraits {  // Dp = 32, 64, 96, 128
  static constexpr int kBlockM = 128, kBlockN = 64, kWarps = 8 / kFwdStrips, kStrips = kFwdStrips;
};
template <> struct FwdTraits<192> { static constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4, kStrips = 1; };
template <> struct FwdTraits<256> { static constexpr int kBlockM = 64, kBlockN = 32, kWarps = 4, kStrips = 1; };
// Warps, strips per warp and key-tile size of a forward variant. The block-sparse forward
// takes the dense layout (two strips for Dp <= 128 unless LONGATTN_FWD_STRIPS=1) up to the
// head-dim bucket LONGATTN_SPARSE_FWD_2STRIP_DP (default 64), with 32-key tiles above 64 (two
// strips of 64-key score accumulators spill there); larger buckets keep one strip per warp.
// At Dp = 128 two strips with 32-key tiles still spill ~20 bytes (sm_90a), which is why they
// are the knob's choice (LONGATTN_SPARSE_FWD_2STRIP_DP=128) rather than the default until
// measured. One strip per warp at Dp = 64 fits in 128 registers: two CTAs of 8 warps per SM
// (kMinBlocks, a __launch_bounds__ argument).
#ifndef LONGATTN_SPARSE_FWD_2STRIP_DP
#define LONGATTN_SPARSE_FWD_2STRIP_DP 64
#endif
static_assert(LONGATTN_SPARSE_FWD_2STRIP_DP >= 0 && LONGATTN_SPARSE_FWD_2STRIP_DP <= 128,
              "LONGATTN_SPARSE_FWD_2STRIP_DP must be 0 (one strip everywhere), 32, 64, 96 or 128");
// Packed (the GQA-packing forward, dense): one strip above Dp = 64, where two strips and the
// packed rows' arithmetic spill (ptxas, sm_90a: 80-104 bytes at Dp 96 / 128); a decoding
// tile is mostly padding rows either way.
template <int Dp, bool Sparse, bool Packed = false>
struct FwdLayout {
  static constexpr bool kWide = Packed ? Dp <= 64 : !Sparse || Dp <= LONGATTN_SPARSE_FWD_2STRIP_DP;
  static constexpr int kStrips = kWide ? FwdTraits<Dp>::kStrips : 1;
  static constexpr int kBlockN = Sparse && kStrips == 2 && Dp > 64 ? 32 : FwdTraits<Dp>::kBlockN;
  static constexpr int kWarps = FwdTraits<Dp>::kBlockM / (16 * kStrips);
  static constexpr int kMinBlocks = kStrips == 1 && Dp == 64 ? 2 : 1;
};

// Deterministic dQ kernel (forward-shaped: one CTA per query block, warp w owns query rows
// [16w, 16w + 16)): kBlockM = 16 * kWarps.
template <int Dp> struct DqTraits;
template <> struct DqTraits<32> { static constexpr int kBlockM = 128, kBlockN = 64, kWarps = 8; };
template <> struct DqTraits<64> { static constexpr int kBlockM = 128, kBlockN = 64, kWarps = 8; };
template <> struct DqTraits<96> { static constexpr int kBlockM = 128, kBlockN = 64, kWarps = 8; };
template <> struct DqTraits<128> { static constexpr int kBlockM = 128, kBlockN = 64, kWarps = 8; };
template <> struct DqTraits<192> { static constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4; };
template <> struct DqTraits<256> { static constexpr int kBlockM = 64, kBlockN = 32, kWarps = 4; };

// Backward main kernel (one CTA per key block): kBlockN keys in 16-key strips, kWarps / (kBlockN
// / 16) warps share a strip, splitting the query columns of S^T and the head dim of dK / dV.
template <int Dp> struct BwdTraits { static constexpr int kBlockM = 64, kBlockN = 64, kWarps = 8; };

constexpr int kPad = 8;  // elements of row padding in shared memory

// ---- element types ------------------------------------------------------------------------
template <typename T> struct Pair;
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two floats rounded to T and packed (lo in the low 16 bits = the lower column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  typename Pair<T>::type v;
  v.x = from_f<T>(lo);
  v.y = from_f<T>(hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---- PTX wrappers -------------------------------------------------------------------------
// LONGATTN_FLASH_EMULATE compiles the kernels as host C++ for tests/cuda_emulation, with
// these wrappers (and warp shuffles, barriers, atomics) emulated lane by lane.
#if defined(LONGATTN_FLASH_EMULATE)
}  // namespace flash
}  // namespace cuda
}  // namespace longattn
#include "flash_emulate.h"
namespace longattn {
namespace cuda {
namespace flash {
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared (PTX 9.7.9.25.3 cp.async); bytes past
// src_bytes (0 or 16 here) are zero filled, and nothing is read when src_bytes is 0.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
// 4-byte asynchronous copy (cp-size 4 needs .ca and 4-byte aligned addresses): the bit-mask
// words of block-sparse tiles, which ride the K / V groups (pad_bits).
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// d += a * b, m16n8k16, fp32 accumulation (PTX 9.7.14.5.14 mma).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // LONGATTN_FLASH_EMULATE

// ---- warp products ---------------------------------------------------------------------------
// c (SP strips of 16 rows x 8 * DT columns) += A B, where A (SP strips of 16 x 16 * KT) is
// held as C-fragment accumulators (n-tiles 2s, 2s + 1 are k-step s, rounded to T; the reuse
// shown at the top of this file) and B (16 * KT x 8 * DT) a row-major shared-memory tile of
// pitch ld, read through ldmatrix.trans once for all SP strips. O += P V in the forward,
// dQ += dS K in the dQ kernel (one strip).
template <typename T, int KT, int DT, int SP>
__device__ __forceinline__ void mma_acc_x_tile(float (&c)[SP][DT][4], const float (&a)[SP][2 * KT][4], const T* b,
                                               int ld, int lane) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t af[SP][4];
#pragma unroll
    for (int s = 0; s < SP; ++s) {
      af[s][0] = pack2<T>(a[s][2 * kk][0], a[s][2 * kk][1]);
      af[s][1] = pack2<T>(a[s][2 * kk][2], a[s][2 * kk][3]);
      af[s][2] = pack2<T>(a[s][2 * kk + 1][0], a[s][2 * kk + 1][1]);
      af[s][3] = pack2<T>(a[s][2 * kk + 1][2], a[s][2 * kk + 1][3]);
    }
#pragma unroll
    for (int d = 0; d < DT; d += 2) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * ld + d * 8 + 8 * (lane / 16));
#pragma unroll
      for (int s = 0; s < SP; ++s) {
        mma16816<T>(c[s][d], af[s], bf[0], bf[1]);
        mma16816<T>(c[s][d + 1], af[s], bf[2], bf[3]);
      }
    }
  }
}
template <typename T, int KT, int DT>
__device__ __forceinline__ void mma_acc_x_tile(float (&c)[DT][4], const float (&a)[2 * KT][4], const T* b, int ld,
                                               int lane) {
  mma_acc_x_tile<T, KT, DT, 1>(reinterpret_cast<float(&)[1][DT][4]>(c),
                               reinterpret_cast<const float(&)[1][2 * KT][4]>(a), b, ld, lane);
}

// ---- tile loads ---------------------------------------------------------------------------
// Loads rows [0, ROWS) x columns [0, Dp) of a strided (token, dim) matrix into shared memory
// (pitch Dp + kPad): rows >= nrows and columns >= ncols become 0. With `vec` (base pointer
// 16-byte aligned and row stride a multiple of 8 elements) whole 8-column chunks go through
// cp.async; chunks that straddle ncols, or everything when !vec, are loaded element-wise
// with ordinary loads and stores (visible after the next __syncthreads).
// load_tile_rows: the same with row r at row_ptr(r) (rows that are not equally spaced).
template <typename T, int ROWS, int Dp, int THREADS, typename RowPtr>
__device__ __forceinline__ void load_tile_rows(T* smem, RowPtr row_ptr, int nrows, int ncols, bool vec) {
  constexpr int LD = Dp + kPad;
  constexpr int CHUNKS = Dp / 8;
  for (int c = threadIdx.x; c < ROWS * CHUNKS; c += THREADS) {
    const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
    T* dst = smem + r * LD + col;
    const T* src = r < nrows ? row_ptr(r) + col : nullptr;
    if (r < nrows && col + 8 <= ncols && vec) {
      cp_async16(dst, src, 16);
    } else if (r >= nrows || col >= ncols) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    } else {
      alignas(16) T tmp[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) tmp[e] = col + e < ncols ? src[e] : from_f<T>(0.f);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(tmp);
    }
  }
}
template <typename T, int ROWS, int Dp, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t row_stride, int nrows, int ncols, bool vec) {
  load_tile_rows<T, ROWS, Dp, THREADS>(smem, [&](int r) { return g + r * row_stride; }, nrows, ncols, vec);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline bool vec_ok(const void* p, const int64_t (&stride)[3]) {
  return aligned16(p) && stride[0] % 8 == 0 && stride[1] % 8 == 0 && stride[2] % 8 == 0;
}

// ---- sequences and scores -----------------------------------------------------------------
struct Seq {
  int sq, sk;      // lengths
  int64_t tq, tk;  // token offsets (varlen)
};
__device__ __forceinline__ Seq seq_of(const AttentionParams& p, int b) {
  Seq s;
  if (p.cu_seqlens_q) {
    s.tq = p.cu_seqlens_q[b];
    s.tk = p.cu_seqlens_k[b];
    s.sq = int(p.cu_seqlens_q[b + 1] - s.tq);
    s.sk = int(p.cu_seqlens_k[b + 1] - s.tk);
  } else {
    s.tq = s.tk = 0;
    s.sq = int(p.seqlen_q);
    s.sk = int(p.seqlen_k);
  }
  return s;
}

// key_range() of attention.h, on the device (same arithmetic, int64).
__device__ __forceinline__ KeyRange key_range_dev(int64_t i0, int64_t i1, int64_t sq, int64_t sk, int64_t left,
                                                  int64_t right) {
  const int64_t off = sk - sq;
  auto clamp = [&](int64_t x) { return x < 0 ? int64_t(0) : (x > sk ? sk : x); };
  auto lo = [&](int64_t i) { return left < 0 ? int64_t(0) : i + off - left; };
  auto hi = [&](int64_t i) { return right < 0 ? sk : i + off + right + 1; };
  KeyRange r;
  r.begin = clamp(lo(i0));
  r.end = clamp(hi(i1 - 1));
  r.full_begin = clamp(lo(i1 - 1));
  r.full_end = clamp(hi(i0));
  if (r.end < r.begin) r.end = r.begin;
  if (r.full_end < r.full_begin) r.full_end = r.full_begin;
  return r;
}

// Score modification for one (sequence, head): s = scale * acc, softcap, ALiBi, mask.
// Row i sees keys [lo(i), hi(i)) (already clamped to [0, sk]), which equals key_visible()
// for every key j in [0, sk) and excludes keys >= sk.
struct ScoreMod {
  float scale, cap, inv_cap, slope;
  bool softcap, alibi;
  int64_t off, left, right;
  int sk;

  __device__ __forceinline__ void init(const AttentionParams& p, const Seq& s, int b, int h) {
    scale = float(p.scale);
    softcap = p.softcap > 0.0;
    cap = float(p.softcap);
    inv_cap = softcap ? float(1.0 / p.softcap) : 0.f;
    alibi = p.alibi_slopes != nullptr;
    slope = alibi ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    off = int64_t(s.sk) - s.sq;
    left = p.window_left;
    right = p.window_right;
    sk = s.sk;
  }
  __device__ __forceinline__ int lo(int64_t i) const {
    if (left < 0) return 0;
    const int64_t x = i + off - left;
    return x < 0 ? 0 : (x > sk ? sk : int(x));
  }
  __device__ __forceinline__ int hi(int64_t i) const {
    if (right < 0) return sk;
    const int64_t x = i + off + right + 1;
    return x < 0 ? 0 : (x > sk ? sk : int(x));
  }
  // Final score of raw dot product `acc` for query i, key j; `t` receives tanh(s / cap)
  // (0 when softcap is off). `lo_i`, `hi_i` = lo(i), hi(i); used only when `masked`.
  __device__ __forceinline__ float apply(float acc, int64_t i, int j, bool masked, int lo_i, int hi_i,
                                         float& t) const {
    float s = acc * scale;
    t = 0.f;
    if (softcap) {
      t = tanhf(s * inv_cap);
      s = cap * t;
    }
    if (alibi) {
      int64_t d = i + off - j;
      s -= slope * float(d < 0 ? -d : d);
    }
    if (masked && (j < lo_i || j >= hi_i)) s = -INFINITY;
    return s;
  }
};

constexpr float kLog2e = 1.4426950408889634f;

// ---- block-sparse schedules ---------------------------------------------------------------
// The kernels walk a BlockSparseSchedule (attention.h) instead of the implicit key range
// when instantiated with Sparse = true. Every warp tile of 16 or 32 rows (forward, dQ)
// and every 64-row query tile of the backward lies inside one BlockMask block, because
// block sizes are 64 or 128; so the state of a (rows, keys) tile is uniform per warp:
enum SparseMode : int { kSkip = 0, kFull = 1, kPartial = 2 };  // not listed / no mask / element mask
constexpr int kNoBlock = 0x7fffffff;

// One sorted block list (partial or full) of a BlockMask row being merged. The count is
// clamped to [0, n] and entries to [0, n), so whatever the list holds, nothing outside its
// n slots is read and no block outside the sequence is visited.
struct ListCursor {
  const int32_t* idx;
  int num, pos, head, n;  // head: current entry, kNoBlock when exhausted

  __device__ __forceinline__ void init(const int32_t* num_ptr, const int32_t* idx_row, int slots) {
    n = slots;
    const int c = *num_ptr;
    num = c < 0 ? 0 : (c > n ? n : c);
    idx = idx_row;
    pos = 0;
    load();
  }
  __device__ __forceinline__ void init_empty() { num = pos = n = 0, idx = nullptr, head = kNoBlock; }
  __device__ __forceinline__ void load() {
    const int x = pos < num ? idx[pos] : kNoBlock;
    head = pos < num ? (x < 0 ? 0 : (x >= n ? n - 1 : x)) : kNoBlock;
  }
  // The raw pool index (bit_row clamps it) of the entry popped last, slot pos - 1 (in
  // [0, num)), from `ids`, the pool indices aligned slot for slot with the list array `base`
  // this row lies in (kv_bits with kv_idx, q_bits with q_idx). Read from there rather than
  // carried in the cursor: the sparse forward at Dp = 64 has no register to spare.
  __device__ __forceinline__ int popped_id(const int32_t* base, const int32_t* ids) const {
    return ids[(idx - base) + pos - 1];
  }
  __device__ __forceinline__ void pop_if(int blk) {
    if (head == blk) {
      ++pos;
      load();
    }
  }
};

// Bit masks of partial blocks (BlockSparseSchedule::bits): the words of query row i of pool
// tile `id`, from the word holding column j0 mod block_k on (block sizes are 64 or 128,
// powers of two, as the launchers check). Pool indices come from device lists the host
// cannot validate, so this, the one place the pool is addressed, clamps `id` to
// [0, num_bits) (num_bits >= 1 whenever bits is set): invalid contents can give wrong
// numbers but never an out-of-bounds read, as ListCursor for block indices.
__device__ __forceinline__ const uint32_t* bit_row(const BlockSparseSchedule& bs, int id, int i, int j0) {
  const int c = id < 0 ? 0 : (id >= bs.num_bits ? int(bs.num_bits - 1) : id);
  const int bq = int(bs.block_q), words = int(bs.bits_words);
  return reinterpret_cast<const uint32_t*>(bs.bits) + int64_t(c) * (bq * words) +
         ((i & (bq - 1)) * words + ((j0 & int(bs.block_k - 1)) >> 5));
}

// Forward-shaped kernels (forward, deterministic dQ) stage a key tile's bit-mask words in
// the kPad padding columns of their Q tile in shared memory, which ldmatrix and load_tile
// never touch (so no more shared memory is needed): words [2s, 2s + W) of the padding of Q
// row r hold the W = N / 32 words of query row r over the tile of K / V stage s (N = 32 or
// 64 keys inside one key block, starting on a word), copied by cp.async with that stage's
// K / V (KeyTiles::next_bits_src). Each thread reads its rows' words from there into one
// register (lane_bits) only once the tile's scores are computed. The staging is what fits:
// the sparse forward at Dp = 64 has at most one register to spare under its 128-register
// bound, so neither words held across the MMAs nor a load in flight across a tile do.
template <typename T, int Dp>
__device__ __forceinline__ uint32_t* pad_bits(T* q_row) {
  static_assert(kPad * sizeof(T) >= 2 * sizeof(uint32_t), "two bit-mask words per row padding");
  return reinterpret_cast<uint32_t*>(q_row + Dp);
}
template <typename T, int Dp>
__device__ __forceinline__ const uint32_t* pad_bits(const T* q_row) {
  return pad_bits<T, Dp>(const_cast<T*>(q_row));
}

// Lane t's bits over an N-key tile of a forward-shaped kernel, for its two query rows
// (x = 0, 1: C-fragment rows g and g + 8) from their staged words, in one register: its
// C-fragment column n * 8 + 2t + e (n < N / 8, e < 2) of row x is bit
// (n % 4) * 8 + (n / 4) * 2 + 4x + e. (Column c of the tile is bit c % 32 of word c / 32;
// 2t + e < 8 keeps n * 8 + 2t + e in word n / 4, at bit (n % 4) * 8 + 2t + e, which the
// shift by 2t moves to bit e of its byte.)
template <int N>
__device__ __forceinline__ uint32_t lane_bits(const uint32_t* row0, const uint32_t* row1, int t) {
  static_assert(N == 32 || N == 64, "bit-mask tile: one or two words per row");
  constexpr uint32_t kPairs = 0x03030303u;  // bits 0, 1 of each byte
  uint32_t b = 0;
#pragma unroll
  for (int k = 0; k < N / 32; ++k)
    b |= ((row0[k] >> (2 * t)) & kPairs) << (2 * k) | ((row1[k] >> (2 * t)) & kPairs) << (2 * k + 4);
  return b;
}
__device__ __forceinline__ bool lane_bit(uint32_t b, int x, int n, int e) {
  return (b >> ((n % 4) * 8 + (n / 4) * 2 + 4 * x + e)) & 1u;
}

// Key tiles of N keys visited by the rows [i0, i0 + rows_cta) of a forward-shaped CTA: the
// sorted union of the key blocks listed (partial or full) for the one or two query blocks
// those rows cover, merged on the fly, each key block cut into block_k / N tiles (those
// starting before sk). After next() returns true, j0() is the tile and mode[q] its state
// for the q-th query block of the CTA (where kPartial, its key block is the entry part[q]
// popped last).
template <int N>
struct SparseKeyWalk {
  ListCursor part[2], full[2];
  int block_k, sk, tiles, kb, sub;
  int mode[2];

  __device__ __forceinline__ void init(const BlockSparseSchedule& bs, int b, int h, int i0, int rows_cta, int sq,
                                       int sk_) {
    block_k = int(bs.block_k);
    sk = sk_;
    tiles = block_k / N;
    kb = -1;
    sub = 0;
    const int bq = int(bs.block_q), qb0 = i0 / bq;
    const int nq = min((i0 + rows_cta - 1) / bq, (sq - 1) / bq) - qb0 + 1;  // 1 or 2
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      if (q < nq) {
        const int64_t qb = qb0 + q;
        const int64_t no = b * bs.num_stride[0] + h * bs.num_stride[1] + qb * bs.num_stride[2];
        const int64_t io = b * bs.idx_stride[0] + h * bs.idx_stride[1] + qb * bs.idx_stride[2];
        part[q].init(bs.kv_num + no, bs.kv_idx + io, int(bs.num_k_blocks));
        full[q].init(bs.full_num + no, bs.full_idx + io, int(bs.num_k_blocks));
      } else {
        part[q].init_empty();
        full[q].init_empty();
      }
    }
  }
  __device__ __forceinline__ bool next() {
    if (kb >= 0 && ++sub < tiles && kb * block_k + sub * N < sk) return true;
    const int m = min(min(part[0].head, full[0].head), min(part[1].head, full[1].head));
    if (m == kNoBlock) return false;
    kb = m;
    sub = 0;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      mode[q] = part[q].head == m ? kPartial : (full[q].head == m ? kFull : kSkip);
      part[q].pop_if(m);
      full[q].pop_if(m);
    }
    return true;
  }
  __device__ __forceinline__ int j0() const { return kb * block_k + sub * N; }
};

// One key tile of a forward-shaped CTA's walk as published in shared memory: its first key,
// modes (bits 0-1: the CTA's first query block, 2-3: its second; bit 4: the entry is a
// tile, clear past the end) and, with bit masks, the raw pool index (ListCursor::popped_id)
// of each query block's bit mask where that block has the tile partial.
struct TileEntry {
  int j0, modes, id[2];
};
constexpr int kTileValid = 16;

// The sparse walk of a forward-shaped CTA lives in shared memory, past the kernel's tiles
// (walk_smem_bytes more): thread 0 advances it one tile ahead of the consumers into a
// three-entry ring. Held in registers by every thread it cost ~30 registers for the whole
// loop, which kept the sparse forward at one strip of 16 query rows per warp.
template <int N>
struct SharedKeyWalk {
  SparseKeyWalk<N> walk;  // next() keeps returning false once the walk has ended
  TileEntry ring[3];
};
template <bool Sparse>
__host__ __device__ constexpr int walk_smem_bytes() {
  return Sparse ? int((sizeof(SharedKeyWalk<64>) + 15) / 16 * 16) : 0;
}

// The key tiles of N keys that a forward-shaped CTA (query rows [i0, i0 + rows)) visits, in
// order. Dense: the tiles covering key_range(), classified full / partial by it. Sparse:
// the SparseKeyWalk of the CTA's query block(s), advanced by thread 0 in shared memory
// (SharedKeyWalk at `shared`). `more` says a tile remains and `next_j0` is its first key
// (for the prefetch); take() moves to it. All threads of the CTA call init() (a barrier)
// and take() in step, once per iteration of a loop whose body has a __syncthreads after
// take() (before any warp can be two tiles ahead): the ring entry thread 0 overwrites in
// take() of iteration it, tile it + 2, was last read in iteration it - 1.
template <int N, bool Sparse>
struct KeyTiles {
  int full_begin = 0, full_end = 0;  // dense: keys [full_begin, full_end) need no mask
  int end_j0 = 0;
  bool more = false;
  int next_j0 = 0;

  __device__ __forceinline__ void init(const AttentionParams& p, const BlockSparseSchedule&, const Seq& s, int, int,
                                       int i0, int, int rows, void*) {
    const KeyRange kr = key_range_dev(i0, i0 + rows, s.sq, s.sk, p.window_left, p.window_right);
    full_begin = int(kr.full_begin);  // in [0, sk]
    full_end = int(kr.full_end);
    const int kb_begin = int(kr.begin / N), kb_end = int((kr.end + N - 1) / N);
    more = kb_begin < kb_end;
    next_j0 = kb_begin * N;
    end_j0 = kb_end * N;
  }
  // Split-KV: keep this CTA's share of the tiles, range `split` of `splits` near-equal
  // ranges (possibly empty: then nothing is walked and the partial row is empty).
  __device__ __forceinline__ void keep_split(int split, int splits) {
    if (!more) return;
    const int tiles = (end_j0 - next_j0) / N, per = (tiles + splits - 1) / splits;
    const int b = next_j0 + min(tiles, split * per) * N, e = min(end_j0, b + per * N);
    next_j0 = b;
    end_j0 = e;
    more = b < e;
  }
  // Takes the next tile: returns its first key, its mode (always kFull here) and whether
  // the element mask applies to it.
  __device__ __forceinline__ int take(const BlockSparseSchedule&, int, int& mode, bool& masked) {
    const int j0 = next_j0;
    mode = kFull;
    masked = j0 < full_begin || j0 + N > full_end;
    next_j0 = j0 + N;
    more = next_j0 < end_j0;
    return j0;
  }
};

template <int N>
struct KeyTiles<N, true> {
  static_assert(sizeof(SharedKeyWalk<N>) <= walk_smem_bytes<true>(), "walk_smem_bytes");
  SharedKeyWalk<N>* sh;
  int nslot;  // ring slot of the next tile
  bool more = false;
  int next_j0 = 0;

  // Thread 0: the walk's next tile into ring slot `slot`.
  __device__ __forceinline__ void produce(const BlockSparseSchedule& bs, int slot) {
    SparseKeyWalk<N>& w = sh->walk;
    TileEntry e{0, 0, {0, 0}};
    if (w.next()) {
      e.j0 = w.j0();
      e.modes = w.mode[0] | w.mode[1] << 2 | kTileValid;
      if (bs.bits) {
        if (w.mode[0] == kPartial) e.id[0] = w.part[0].popped_id(bs.kv_idx, bs.kv_bits);
        if (w.mode[1] == kPartial) e.id[1] = w.part[1].popped_id(bs.kv_idx, bs.kv_bits);
      }
    }
    sh->ring[slot] = e;
  }
  __device__ __forceinline__ void init(const AttentionParams&, const BlockSparseSchedule& bs, const Seq& s, int b,
                                       int h, int i0, int rows_cta, int, void* shared) {
    sh = static_cast<SharedKeyWalk<N>*>(shared);
    if (threadIdx.x == 0) {
      sh->walk.init(bs, b, h, i0, rows_cta, s.sq, s.sk);
      produce(bs, 0);
      produce(bs, 1);
    }
    __syncthreads();
    nslot = 0;
    const TileEntry e = sh->ring[0];
    more = (e.modes & kTileValid) != 0;
    next_j0 = e.j0;
  }
  // Takes the next tile: returns its first key, its mode for a warp whose rows lie in the
  // CTA's query block `wq` (0 or 1; kFull, kPartial or kSkip) and whether the element
  // mask applies to it.
  __device__ __forceinline__ int take(const BlockSparseSchedule& bs, int wq, int& mode, bool& masked) {
    const TileEntry c = sh->ring[nslot];
    mode = (c.modes >> (2 * wq)) & 3;
    masked = mode == kPartial;
    nslot = nslot == 2 ? 0 : nslot + 1;
    const TileEntry nx = sh->ring[nslot];
    more = (nx.modes & kTileValid) != 0;
    next_j0 = nx.j0;
    if (threadIdx.x == 0) produce(bs, nslot == 2 ? 0 : nslot + 1);
    return c.j0;
  }
  // With bit masks: the pool word that thread u stages for the next tile (pad_bits): word
  // u % W of CTA row u / W (W = N / 32), or null where there is none (u >= M * W) or that
  // row's query block does not have the tile partial.
  template <int M>
  __device__ __forceinline__ const uint32_t* next_bits_src(const BlockSparseSchedule& bs, int i0, int u) const {
    constexpr int W = N / 32;
    const int r = u / W;
    if (u >= M * W) return nullptr;
    const int q1 = (i0 & int(bs.block_q - 1)) + r >= bs.block_q;  // the CTA's second query block
    const TileEntry& e = sh->ring[nslot];
    if (((e.modes >> (2 * q1)) & 3) != kPartial) return nullptr;
    return bit_row(bs, e.id[q1], i0 + r, next_j0) + u % W;
  }
};

// Query tiles of M rows visited by the backward CTA of the key block kbk: the sorted union
// of the query blocks listed for it (query-side lists), each cut into block_q / M tiles
// (those starting before sq); mode is the state of the current tile and, when kPartial
// with bits set, bid the (unclamped) pool index of its bit mask (read once per block).
template <int M>
struct SparseQueryWalk {
  ListCursor part, full;
  int block_q, sq, tiles, qb, sub, mode, bid;

  __device__ __forceinline__ void init(const BlockSparseSchedule& bs, int b, int h, int kbk, int sq_) {
    block_q = int(bs.block_q);
    sq = sq_;
    tiles = block_q / M;
    qb = -1;
    sub = 0;
    mode = kSkip;
    bid = 0;
    const int64_t no = b * bs.q_num_stride[0] + h * bs.q_num_stride[1] + int64_t(kbk) * bs.q_num_stride[2];
    const int64_t io = b * bs.q_idx_stride[0] + h * bs.q_idx_stride[1] + int64_t(kbk) * bs.q_idx_stride[2];
    part.init(bs.q_num + no, bs.q_idx + io, int(bs.num_q_blocks));
    full.init(bs.full_q_num + no, bs.full_q_idx + io, int(bs.num_q_blocks));
  }
  __device__ __forceinline__ bool next(const BlockSparseSchedule& bs) {
    if (qb >= 0 && ++sub < tiles && qb * block_q + sub * M < sq) return true;
    const int m = min(part.head, full.head);
    if (m == kNoBlock) return false;
    qb = m;
    sub = 0;
    mode = part.head == m ? kPartial : kFull;
    part.pop_if(m);
    full.pop_if(m);
    bid = mode == kPartial && bs.bits ? part.popped_id(bs.q_idx, bs.q_bits) : 0;
    return true;
  }
  __device__ __forceinline__ int i0() const { return qb * block_q + sub * M; }
};

// The element mask of partial blocks for one query row i, as key bounds: key j < sk is
// visible iff j < causal_end and (wlo <= j < whi or j < sink), which is
// BlockSparseSchedule::visible(i, j, sq, sk); keys >= sk are never visible. With bit masks
// the kernels also test the element's bit (lane_bits; the backward's are staged with its
// row statistics).
struct SparseRowMask {
  int causal_end, wlo, whi, sink;

  __device__ __forceinline__ void init(const BlockSparseSchedule& bs, int64_t i, int sq, int sk) {
    init_tile(bs, i, sq, sk, 0, sk);
  }
  __device__ __forceinline__ bool visible(int j) const {
    return j < causal_end && ((j >= wlo && j < whi) || j < sink);
  }
  // The same bounds relative to the tile of n keys from j0 (visible(j - j0) for j in
  // [j0, j0 + n)), clamped to [0, n]. Computed from j0 in each masked tile, so that the
  // compiler cannot hoist four bounds per row out of the key loop into registers (which is
  // what spilled the two-strip sparse forward).
  __device__ __forceinline__ void init_tile(const BlockSparseSchedule& bs, int64_t i, int sq, int sk, int j0, int n) {
    const int64_t d = i + sk - sq - j0;  // the diagonal, relative to the tile
    auto clamp = [&](int64_t x) { return x < 0 ? 0 : (x > n ? n : int(x)); };
    causal_end = bs.causal ? clamp(d + 1) : n;
    wlo = bs.window_left < 0 ? 0 : clamp(d - bs.window_left);
    whi = bs.window_right < 0 ? n : clamp(d + bs.window_right + 1);
    sink = clamp(int64_t(bs.sink_tokens) - j0);
  }
  // After init_tile: the visible columns of the tile as N / 32 words (column c is bit c % 32
  // of word c / 32), the layout of the bit masks (lane_bits).
  template <int N>
  __device__ __forceinline__ void tile_words(uint32_t (&w)[N / 32]) const {
#pragma unroll
    for (int k = 0; k < N / 32; ++k) w[k] = span_word(0, causal_end, k) & (span_word(wlo, whi, k) | span_word(0, sink, k));
  }
  // Bits [a, b) of the columns 32k .. 32k + 31 (0 <= a, b).
  __device__ __forceinline__ static uint32_t span_word(int a, int b, int k) {
    const int lo = a - 32 * k < 0 ? 0 : a - 32 * k, hi = b - 32 * k > 32 ? 32 : b - 32 * k;
    if (hi <= lo) return 0u;  // then also lo < 32 below
    return (hi == 32 ? ~0u : (1u << hi) - 1u) & ~((1u << lo) - 1u);
  }
};

// Grids are (row blocks x batch, heads, 1): the batch is folded into x (up to 2^31 - 1
// CTAs) because a packed varlen batch can hold more sequences than gridDim.z's 65535.
inline dim3 make_grid(int64_t seqlen, int block, int64_t heads, int64_t batch) {
  return dim3(unsigned(((seqlen + block - 1) / block) * batch), unsigned(heads), 1u);
}
inline bool grid_fits(int64_t seqlen, int block, int64_t heads, int64_t batch) {
  return ((seqlen + block - 1) / block) * batch <= 0x7fffffff && heads <= 65535;
}
// This CTA's (batch, row block) for a grid from make_grid(seqlen, block, ...).
__device__ __forceinline__ void grid_coords(int64_t seqlen, int block, int& b, int& blk) {
  const unsigned n = (unsigned(seqlen) + unsigned(block) - 1u) / unsigned(block);  // seqlen < 2^31
  b = int(blockIdx.x / n);
  blk = int(blockIdx.x % n);
}

}  // namespace flash
}  // namespace cuda
}  // namespace longattn
