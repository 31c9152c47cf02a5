// Flash attention forward (FlashAttention-2, Dao 2023) for sm80+: mma.sync m16n8k16 with
// fp32 accumulation, ldmatrix, cp.async double buffering of K/V tiles.
//
// One CTA per (query block of kBlockM rows, head, batch), or with GQA packing (decoding:
// FwdArgs::pack, fwd_pack) per (block of kBlockM packed rows of `pack` heads of one kv
// head, head group, batch); warp w owns kStrips strips of 16
// query rows, [16 kStrips w, 16 kStrips (w + 1)) of the block (two strips for Dp <= 128, as
// in FlashAttention-2, so each K / V fragment loaded from shared memory feeds two MMAs), so
// the whole softmax of a row lives in the 4 lanes of a quad (C fragment rows g and g + 8 of
// its strip) and row reductions are two shuffles. The CTA walks the key blocks
// [key_range().begin, end) in increasing order; blocks inside [full_begin, full_end) skip
// the element mask (the classification of attention.h). Per key block: S = Q K^T (Q
// fragments re-read from shared memory each block, which keeps the register budget at
// kStrips * (Dp/2 (O) + kBlockN/2 (S)) floats), score modification, online softmax (base-2 exponentials of scores pre-multiplied by log2 e), O += P V with P taken
// straight from the S accumulators (flash_common.cuh). The final O is divided by the row
// sum and stored directly from registers; lse = m + log(l) (or -inf for rows without a
// visible key, which also get O = 0).
//
// Sparse = true walks a BlockSparseSchedule instead (SparseKeyWalk, advanced in shared
// memory by thread 0: SharedKeyWalk, flash_common.cuh): the key tiles of the blocks listed
// for the CTA's query block(s), each warp applying its own block's state: not listed (the
// warp skips the tile: its scores are all -inf), full (no mask) or partial (the BlockMask's
// element mask, as one bit per element of a lane's rows, and with token-granular bit masks,
// BlockSparseSchedule::bits, the element's bit: the tile's words are copied with its K / V
// into Q's row padding, pad_bits in flash_common.cuh). Its layout (FwdLayout) is the dense
// one up to LONGATTN_SPARSE_FWD_2STRIP_DP and one strip per warp above. Both variants are
// instantiated by each launcher. The sparse variant has not yet run on a GPU; it is
// checked on the host through tests/cuda_emulation.
#pragma once

#include <cstdlib>

#include "flash_common.cuh"

namespace longattn {
namespace cuda {
namespace flash {

struct FwdArgs {
  AttentionParams p;
  BlockSparseSchedule sparse;  // read by the Sparse variant only (a copy: p.sparse is a host pointer)
  bool vec_q, vec_k, vec_v;    // cp.async allowed (see load_tile)
  // Split-KV (dense schedules only): gridDim.z = splits key ranges per query block, each
  // writing its normalized float32 O and its lse to the partials, which
  // flash_fwd_merge_kernel combines into out / lse. Partial row (split, head, token) lies at
  // (split * heads + head) * part_rows + token, token = b * seqlen_q + i (dense) or the
  // packed index (varlen); O rows hold head_dim_v floats.
  int splits = 1;
  int64_t part_rows = 0;
  float* part_o = nullptr;
  float* part_lse = nullptr;
  // GQA packing (dense schedules without ALiBi; fwd_pack): `pack` query heads of one kv
  // head share each query tile, packed row u of a sequence being query u / pack of head
  // h0 + u % pack (h0 = blockIdx.y * pack), so every K / V tile loaded serves all of them.
  // The grid then has ceil(seqlen_q * pack / kBlockM) row blocks per sequence and
  // heads / pack columns. 1: one head per CTA.
  int pack = 1;
};

// The partials' query token of row i of sequence b (see FwdArgs).
__host__ __device__ inline int64_t part_token(const AttentionParams& p, int b, int64_t tq, int64_t i) {
  return (p.cu_seqlens_q ? tq : int64_t(b) * p.seqlen_q) + i;
}

template <int Dp, bool Sparse>
__host__ __device__ constexpr int fwd_tile_bytes() {
  return (FwdTraits<Dp>::kBlockM + 4 * FwdLayout<Dp, Sparse>::kBlockN) * (Dp + kPad) * 2;  // Q, 2 stages of K and V
}
template <int Dp, bool Sparse>
__host__ __device__ constexpr int fwd_smem_bytes() {
  return fwd_tile_bytes<Dp, Sparse>() + walk_smem_bytes<Sparse>();  // + the sparse walk (SharedKeyWalk)
}

// Packed: the GQA-packing variant (args.pack > 1; dense only). A separate instantiation so
// the unpacked kernel, with pack the constant 1, keeps its registers (at D = 128 the
// packed row arithmetic cost it ~120 bytes of spills), with its own layout (FwdLayout).
template <typename T, int Dp, bool Sparse, bool Packed = false>
__global__ void __launch_bounds__(FwdLayout<Dp, Sparse, Packed>::kWarps * 32, FwdLayout<Dp, Sparse, Packed>::kMinBlocks)
    flash_fwd_kernel(const FwdArgs args) {
  static_assert(!(Sparse && Packed), "GQA packing is for dense schedules");
  using Tr = FwdTraits<Dp>;
  using Ly = FwdLayout<Dp, Sparse, Packed>;
  static_assert(Ly::kBlockN == FwdLayout<Dp, Sparse>::kBlockN, "fwd_tile_bytes");
  constexpr int M = Tr::kBlockM, N = Ly::kBlockN, SP = Ly::kStrips, THREADS = Ly::kWarps * 32, LD = Dp + kPad;
  constexpr int NT = N / 8;    // n-tiles of S per strip
  constexpr int DT = Dp / 8;   // n-tiles of O per strip
  constexpr int R = 2 * SP;    // query rows per thread
  static_assert(M == 16 * SP * Ly::kWarps && N % 16 == 0 && Dp % 16 == 0, "tile shape");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + M * LD;      // stage s at sK + s * N * LD
  T* sV = sK + 2 * N * LD;  // stage s at sV + s * N * LD

  const AttentionParams& p = args.p;
  const int pack = Packed ? args.pack : 1;
  int b, qblk;
  grid_coords(p.seqlen_q * pack, M, b, qblk);
  const int h = blockIdx.y * pack;  // the first (with pack = 1 the only) query head of the CTA
  const Seq s = seq_of(p, b);
  const int u0 = qblk * M;  // first packed row (see FwdArgs::pack); = first query when pack = 1
  if (u0 >= s.sq * pack) return;
  const int rows = min(M, s.sq * pack - u0);
  const int i0 = u0 / pack;                     // first query of the CTA's rows
  const int nq = (u0 + rows - 1) / pack - i0 + 1;  // queries the rows cover (= rows when pack = 1)
  const int hk = int(h / (p.heads / p.heads_kv));
  const int D = int(p.head_dim), Dv = int(p.head_dim_v);

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + s.tq * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + s.tk * p.k_stride[1] + hk * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + s.tk * p.v_stride[1] + hk * p.v_stride[2];

  KeyTiles<N, Sparse> tiles;
  tiles.init(p, args.sparse, s, b, h, i0, M, nq, smem_raw + fwd_tile_bytes<Dp, Sparse>());
  if constexpr (!Sparse) {
    if (args.splits > 1) tiles.keep_split(int(blockIdx.z), args.splits);  // uniform
  }
  // K / V of the next tile (tiles.next_j0, so the walk is at that tile) into `stage`, and
  // with bit masks its words into that stage's words of Q's row padding (pad_bits).
  auto load_kv = [&](int j0, int stage) {
    const int n = min(N, s.sk - j0);
    load_tile<T, N, Dp, THREADS>(sK + stage * N * LD, k + j0 * p.k_stride[1], p.k_stride[1], n, D, args.vec_k);
    load_tile<T, N, Dp, THREADS>(sV + stage * N * LD, v + j0 * p.v_stride[1], p.v_stride[1], n, Dv, args.vec_v);
    if constexpr (Sparse) {
      if (args.sparse.bits) {  // uniform
        constexpr int W = N / 32;
#pragma unroll
        for (int u = threadIdx.x; u < M * W; u += THREADS)
          if (const uint32_t* src = tiles.template next_bits_src<M>(args.sparse, i0, u))
            cp_async4(pad_bits<T, Dp>(sQ + u / W * LD) + 2 * stage + u % W, src);
      }
    }
  };

  load_tile_rows<T, M, Dp, THREADS>(sQ, [&](int r) {  // pack = 1: query u0 + r of head h
    const int u = u0 + r;
    return q + ((u / pack) * p.q_stride[1] + (h + u % pack) * p.q_stride[2]);
  }, rows, D, args.vec_q);
  if (tiles.more) load_kv(tiles.next_j0, 0);
  cp_async_commit();  // group: Q + first K/V block

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int r0 = warp * 16 * SP;  // first row of this warp in the block; strip s starts at r0 + 16 s
  // This thread's 2 * SP query rows: row x lies in strip x / 2, C-fragment half x % 2
  // (accumulator elements 2 (x % 2) and 2 (x % 2) + 1). Their mask bounds are recomputed
  // in each masked tile rather than held in registers (the D = 128 budget is tight).
  // trow: the row in the tile; qrow, qhead: its query and head (packed rows: FwdArgs::pack).
  auto trow = [&](int x) { return r0 + 16 * (x / 2) + g + 8 * (x % 2); };
  int qi[Packed ? R : 1];  // Packed: each row's query, divided out once
  if constexpr (Packed) {
#pragma unroll
    for (int x = 0; x < R; ++x) qi[x] = (u0 + trow(x)) / pack;
  }
  auto qrow = [&](int x) {
    if constexpr (Packed) return qi[x];
    else return i0 + trow(x);
  };
  auto qhead = [&](int x) {
    if constexpr (Packed) return h + (u0 + trow(x) - qi[x] * pack);
    else return h;
  };

  ScoreMod mod;
  mod.init(p, s, b, h);  // h's ALiBi slope: never packed with ALiBi
  // Sparse: which of the CTA's query blocks holds this warp's rows (16 * SP rows, which
  // divides the block size).
  const int wq = Sparse ? (i0 + r0) / int(args.sparse.block_q) - i0 / int(args.sparse.block_q) : 0;

  float o[SP][DT][4];
#pragma unroll
  for (int st = 0; st < SP; ++st)
#pragma unroll
    for (int d = 0; d < DT; ++d) o[st][d][0] = o[st][d][1] = o[st][d][2] = o[st][d][3] = 0.f;
  float m[R], l[R];  // running max (natural units), this thread's part of the running sum
#pragma unroll
  for (int x = 0; x < R; ++x) m[x] = -INFINITY, l[x] = 0.f;

  for (int it = 0; tiles.more; ++it) {
    const int stage = it & 1;
    int mode;
    bool masked;
    const int j0 = tiles.take(args.sparse, wq, mode, masked);
    if (tiles.more) load_kv(tiles.next_j0, stage ^ 1);
    cp_async_commit();  // possibly empty group, keeps the wait count uniform
    cp_async_wait<1>();
    __syncthreads();

    const T* cK = sK + stage * N * LD;
    const T* cV = sV + stage * N * LD;
    if (!Sparse || mode != kSkip) {  // warp-uniform: a skipped tile leaves m, l and O unchanged
      const bool bitmask = Sparse && masked && args.sparse.bits;  // partial with bit masks: warp-uniform
      // S = Q K^T for this warp's SP strips x N keys; each K fragment feeds SP MMAs.
      float acc[SP][NT][4];
#pragma unroll
      for (int st = 0; st < SP; ++st)
#pragma unroll
        for (int n = 0; n < NT; ++n) acc[st][n][0] = acc[st][n][1] = acc[st][n][2] = acc[st][n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < Dp / 16; ++kk) {
        uint32_t a[SP][4];
#pragma unroll
        for (int st = 0; st < SP; ++st)
          ldmatrix_x4(a[st], sQ + (r0 + 16 * st + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + kk * 16 + 8 * (lane / 16));
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
          uint32_t bf[4];
          ldmatrix_x4(bf, cK + (n * 8 + (lane % 8) + 8 * (lane / 16)) * LD + kk * 16 + 8 * ((lane / 8) % 2));
#pragma unroll
          for (int st = 0; st < SP; ++st) {
            mma16816<T>(acc[st][n], a[st], bf[0], bf[1]);
            mma16816<T>(acc[st][n + 1], a[st], bf[2], bf[3]);
          }
        }
      }

      // Sparse, partial tile: this lane's visible elements of its rows, one register per
      // strip in lane_bits' layout: the BlockMask's element mask (SparseRowMask, relative to
      // the tile) and, with token-granular bit masks, the staged words (read only now that
      // S is done; registers: see pad_bits).
      uint32_t tb[SP];
#pragma unroll
      for (int st = 0; st < SP; ++st) {
        tb[st] = ~0u;
        if constexpr (Sparse) {
          if (masked) {
            const int n = min(N, s.sk - j0);
            const int i = i0 + r0 + 16 * st + g;
            uint32_t w0[N / 32], w1[N / 32];
            SparseRowMask rm;
            rm.init_tile(args.sparse, i, s.sq, s.sk, j0, n);
            rm.tile_words<N>(w0);
            rm.init_tile(args.sparse, i + 8, s.sq, s.sk, j0, n);
            rm.tile_words<N>(w1);
            tb[st] = lane_bits<N>(w0, w1, t);
            if (bitmask)
              tb[st] &= lane_bits<N>(pad_bits<T, Dp>(sQ + (r0 + 16 * st + g) * LD) + 2 * stage,
                                     pad_bits<T, Dp>(sQ + (r0 + 16 * st + g + 8) * LD) + 2 * stage, t);
          }
        }
      }

      // Scores, row maxima.
      float mx[R];
#pragma unroll
      for (int x = 0; x < R; ++x) {
        const int i = qrow(x);
        const int st = x / 2, e0 = 2 * (x % 2);
        int lo = 0, hi = 0;
        if (!Sparse && masked) lo = mod.lo(i), hi = mod.hi(i);
        mx[x] = m[x];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = e0; e < e0 + 2; ++e) {
            const int j = j0 + n * 8 + 2 * t + (e & 1);
            float tt;
            float& sc = acc[st][n][e];
            if constexpr (Sparse) {
              sc = mod.apply(sc, i, j, false, 0, 0, tt);
              if (masked && !lane_bit(tb[st], x % 2, n, e & 1)) sc = -INFINITY;
            } else {
              sc = mod.apply(sc, i, j, masked, lo, hi, tt);
            }
            mx[x] = fmaxf(mx[x], sc);
          }
      }
      // Online softmax: rescale by exp(m_old - m_new); a row still at -inf keeps P = 0.
      float alpha[R], base[R], sum[R];
#pragma unroll
      for (int x = 0; x < R; ++x) {
        mx[x] = fmaxf(mx[x], __shfl_xor_sync(0xffffffffu, mx[x], 1));
        mx[x] = fmaxf(mx[x], __shfl_xor_sync(0xffffffffu, mx[x], 2));
        alpha[x] = mx[x] == -INFINITY ? 1.f : exp2f((m[x] - mx[x]) * kLog2e);
        base[x] = mx[x] == -INFINITY ? 0.f : mx[x] * kLog2e;
        m[x] = mx[x];
        sum[x] = 0.f;
      }
#pragma unroll
      for (int st = 0; st < SP; ++st)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int x = 2 * st + e / 2;
            acc[st][n][e] = exp2f(fmaf(acc[st][n][e], kLog2e, -base[x]));  // exp2(-inf) = 0
            sum[x] += acc[st][n][e];
          }
#pragma unroll
      for (int x = 0; x < R; ++x) l[x] = l[x] * alpha[x] + sum[x];
#pragma unroll
      for (int st = 0; st < SP; ++st)
#pragma unroll
        for (int d = 0; d < DT; ++d)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[st][d][e] *= alpha[2 * st + e / 2];

      // O += P V: P from the accumulators, V via ldmatrix.trans (each V fragment feeds SP MMAs).
      mma_acc_x_tile<T, N / 16, DT, SP>(o, acc, cV, LD, lane);
    }  // mode != kSkip
    __syncthreads();  // this stage is overwritten by the prefetch of the next iteration
  }
  cp_async_wait<0>();

  // Finish: full row sums over the quad, normalize, store O (masked to Dv and valid rows) and lse.
  float inv[R];
#pragma unroll
  for (int x = 0; x < R; ++x) {
    l[x] += __shfl_xor_sync(0xffffffffu, l[x], 1);
    l[x] += __shfl_xor_sync(0xffffffffu, l[x], 2);
    inv[x] = l[x] > 0.f ? 1.f / l[x] : 0.f;
  }

  if (args.splits > 1) {  // uniform: this key range's normalized O and lse into the partials
#pragma unroll
    for (int x = 0; x < R; ++x) {
      const int st = x / 2, half = x % 2;
      if (trow(x) >= rows) continue;
      const int64_t row = (int64_t(blockIdx.z) * p.heads + qhead(x)) * args.part_rows + part_token(p, b, s.tq, qrow(x));
      float* dst = args.part_o + row * Dv;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        const int c = d * 8 + 2 * t;
        if (c < Dv) dst[c] = o[st][d][2 * half] * inv[x];
        if (c + 1 < Dv) dst[c + 1] = o[st][d][2 * half + 1] * inv[x];
      }
      if (t == 0) args.part_lse[row] = l[x] > 0.f ? m[x] + logf(l[x]) : -INFINITY;
    }
    return;
  }

  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + s.tq * p.out_stride[1];
  const bool pair_ok = (reinterpret_cast<uintptr_t>(p.out) & 3u) == 0 && p.out_stride[0] % 2 == 0 &&
                       p.out_stride[1] % 2 == 0 && p.out_stride[2] % 2 == 0;
#pragma unroll
  for (int x = 0; x < R; ++x) {
    const int st = x / 2, half = x % 2;
    if (trow(x) >= rows) continue;
    const int i = qrow(x), hh = qhead(x);
    T* orow = out + int64_t(i) * p.out_stride[1] + int64_t(hh) * p.out_stride[2];
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      const int c = d * 8 + 2 * t;
      if (c >= Dv) continue;
      const float x0 = o[st][d][2 * half] * inv[x], x1 = o[st][d][2 * half + 1] * inv[x];
      T* dst = orow + c;
      if (c + 1 < Dv && pair_ok) {
        *reinterpret_cast<uint32_t*>(dst) = pack2<T>(x0, x1);
      } else {
        dst[0] = from_f<T>(x0);
        if (c + 1 < Dv) dst[1] = from_f<T>(x1);
      }
    }
    if (t == 0 && p.lse) {
      float* lse = p.lse + b * p.lse_stride[0] + hh * p.lse_stride[1];
      lse[(s.tq + i) * p.lse_stride[2]] = l[x] > 0.f ? m[x] + logf(l[x]) : -INFINITY;
    }
  }
}

// Combines the splits' partials of each (token, head) row, one warp per row (lanes over the
// head_dim_v columns): out = sum_s w_s O_s / sum_s w_s with w_s = exp(lse_s - max lse), lse =
// max + log sum_s w_s (merge_states' math). Splits that saw no visible key have lse = -inf
// and weight 0; a row with none gets O = 0 and lse = -inf, as without splits.
constexpr int kMergeRowsPerCta = 4;

template <typename T>
__global__ void __launch_bounds__(kMergeRowsPerCta * 32) flash_fwd_merge_kernel(const FwdArgs args) {
  const AttentionParams& p = args.p;
  const int lane = threadIdx.x % 32;
  const int64_t idx = int64_t(blockIdx.x) * kMergeRowsPerCta + threadIdx.x / 32;
  if (idx >= args.part_rows * p.heads) return;
  const int h = int(idx % p.heads);
  const int64_t tok = idx / p.heads;
  // dense: token = b * seqlen_q + i; varlen: b = 0 (batch strides are 0), i = the packed token
  const int64_t b = p.cu_seqlens_q ? 0 : tok / p.seqlen_q, i = p.cu_seqlens_q ? tok : tok % p.seqlen_q;
  const int64_t split_stride = p.heads * args.part_rows;
  const int64_t row0 = int64_t(h) * args.part_rows + tok;  // split 0
  float mx = -INFINITY, total = 0.f;
  for (int sp = 0; sp < args.splits; ++sp) mx = fmaxf(mx, args.part_lse[row0 + sp * split_stride]);
  if (mx != -INFINITY)
    for (int sp = 0; sp < args.splits; ++sp)
      total += exp2f((args.part_lse[row0 + sp * split_stride] - mx) * kLog2e);  // exp2(-inf) = 0
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const int Dv = int(p.head_dim_v);
  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + i * p.out_stride[1] + h * p.out_stride[2];
  for (int c = lane; c < Dv; c += 32) {
    float acc = 0.f;
    if (total > 0.f)
      for (int sp = 0; sp < args.splits; ++sp) {
        const int64_t row = row0 + sp * split_stride;
        acc += exp2f((args.part_lse[row] - mx) * kLog2e) * args.part_o[row * Dv + c];
      }
    out[c] = from_f<T>(acc * inv);
  }
  if (lane == 0 && p.lse)
    p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + i * p.lse_stride[2]] =
        total > 0.f ? mx + logf(total) : -INFINITY;
}

// Key ranges per query block for a dense schedule: 1 unless the grid's CTAs (query blocks x
// heads x batch) fill fewer than all `sms` multiprocessors; then about 2 CTAs per SM, each
// range at least 2 key tiles, at most 64 ranges (FlashAttention-2's split-KV decoding idea).
// The split depends on the shapes and the GPU, so results (not their accuracy) can differ
// in the last bits between GPUs with different SM counts.
inline int fwd_splits(int64_t ctas, int64_t seqlen_k, int block_n, int sms) {
  if (ctas <= 0 || ctas >= sms) return 1;
  const int64_t tiles = (seqlen_k + block_n - 1) / block_n;
  const int64_t want = (2 * int64_t(sms) + ctas - 1) / ctas;
  const int64_t n = std::min<int64_t>(std::min<int64_t>(want, tiles / 2), 64);
  return n >= 2 ? int(n) : 1;
}

// Query heads per CTA (FwdArgs::pack) for a dense schedule without ALiBi: the largest
// divisor d of the GQA group with seqlen_q * d <= block_m, so a decoding step (or a short
// chunk) of a group fills one query tile instead of one mostly padded tile per head, and
// each K / V tile is read once for the group instead of once per head. 1 when the group is
// 1 or a query tile is already more than half full.
inline int fwd_pack(const AttentionParams& p, int block_m) {
  if (p.sparse || p.alibi_slopes || p.heads_kv <= 0 || p.seqlen_q <= 0) return 1;
  const int64_t group = p.heads / p.heads_kv;
  int pack = 1;
  for (int64_t d = 2; d <= group && p.seqlen_q * d <= block_m; ++d)
    if (group % d == 0) pack = int(d);
  return pack;
}

#if !defined(LONGATTN_FLASH_EMULATE)
inline int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();  // clear: no split then
    return 0;
  }
  return n;
}

template <typename T, int Dp>
cudaError_t launch_flash_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<Dp>;
  if (p.seqlen_q <= 0 || p.batch <= 0 || p.heads <= 0) return cudaSuccess;
  FwdArgs a;
  a.p = p;
  if (p.sparse) {
    // Block sizes 64 or 128: a warp's 16 or 32 rows and a key tile of N keys then lie in one block.
    const BlockSparseSchedule& bs = *p.sparse;
    if ((bs.block_q != 64 && bs.block_q != 128) || (bs.block_k != 64 && bs.block_k != 128) || p.cu_seqlens_q)
      return cudaErrorInvalidValue;
    a.sparse = bs;
  }
  a.vec_q = vec_ok(p.q, p.q_stride);
  a.vec_k = vec_ok(p.k, p.k_stride);
  a.vec_v = vec_ok(p.v, p.v_stride);
  const int smem = p.sparse ? fwd_smem_bytes<Dp, true>() : fwd_smem_bytes<Dp, false>();
  static const bool pack_off = [] {  // LONGATTN_CUDA_GQA_PACK=0: one head per CTA (for A/B runs)
    const char* e = std::getenv("LONGATTN_CUDA_GQA_PACK");
    return e != nullptr && e[0] == '0' && e[1] == 0;
  }();
  a.pack = pack_off ? 1 : fwd_pack(p, Tr::kBlockM);
  // The variant and its layout's thread count: block-sparse, GQA-packed or plain dense.
  void (*kernel)(FwdArgs) = flash_fwd_kernel<T, Dp, false>;
  int threads = FwdLayout<Dp, false>::kWarps * 32;
  if (p.sparse)
    kernel = flash_fwd_kernel<T, Dp, true>, threads = FwdLayout<Dp, true>::kWarps * 32;
  else if (a.pack > 1)
    kernel = flash_fwd_kernel<T, Dp, false, true>, threads = FwdLayout<Dp, false, true>::kWarps * 32;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  if (!grid_fits(p.seqlen_q * a.pack, Tr::kBlockM, p.heads / a.pack, p.batch)) return cudaErrorInvalidConfiguration;
  dim3 grid = make_grid(p.seqlen_q * a.pack, Tr::kBlockM, p.heads / a.pack, p.batch);
  if (!p.sparse) {
    a.splits = fwd_splits(int64_t(grid.x) * grid.y, p.seqlen_k, FwdLayout<Dp, false>::kBlockN, sm_count());
    if (a.splits > 1) {
      // Partials from the stream-ordered pool (cudaMallocAsync), freed after the merge; if
      // the pool cannot serve them, the call runs unsplit.
      a.part_rows = p.cu_seqlens_q ? p.total_q : p.batch * p.seqlen_q;
      const size_t n = size_t(a.splits) * size_t(p.heads) * size_t(a.part_rows);
      void* ws = nullptr;
      if (cudaMallocAsync(&ws, n * (size_t(p.head_dim_v) + 1) * sizeof(float), stream) != cudaSuccess) {
        cudaGetLastError();
        a.splits = 1;
      } else {
        a.part_lse = static_cast<float*>(ws);
        a.part_o = a.part_lse + n;
        grid.z = unsigned(a.splits);
        kernel<<<grid, threads, smem, stream>>>(a);
        cudaError_t e = cudaGetLastError();
        if (e == cudaSuccess) {
          const int64_t rows = a.part_rows * p.heads;
          flash_fwd_merge_kernel<T><<<unsigned((rows + kMergeRowsPerCta - 1) / kMergeRowsPerCta),
                                      kMergeRowsPerCta * 32, 0, stream>>>(a);
          e = cudaGetLastError();
        }
        const cudaError_t f = cudaFreeAsync(ws, stream);
        return e != cudaSuccess ? e : f;
      }
    }
  }
  kernel<<<grid, threads, smem, stream>>>(a);
  return cudaGetLastError();
}

#endif  // !LONGATTN_FLASH_EMULATE

}  // namespace flash
}  // namespace cuda
}  // namespace longattn
