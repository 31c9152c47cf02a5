// Flash attention backward (FlashAttention-2, Dao 2023) for sm80+. Kernels, in launch order:
//
//  1. flash_bwd_preprocess_kernel: delta_i = rowsum(dO_i * O_i) - dlse_i (dlse only where
//     lse_i is finite, as the CPU), into the float32 `delta` workspace; zeroes the float32
//     `dq_accum` rows unless deterministic. One warp per (token, head).
//  2. flash_bwd_kernel: one CTA per (key block of kBlockN keys, kv head, batch). K and V of
//     the block stay in shared memory; the CTA loops over the query heads of its GQA group
//     and over the query blocks that can see the key block, and for each:
//        S^T = K Q^T, dP^T = V dO^T          (warp: one 16-key strip x a slice of queries)
//        P^T = exp(S'^T - lse), dS^T = P^T * (dP^T - delta) * (1 - tanh^2 if softcap)
//        P^T, dS^T -> shared memory (rounded to T, as FlashAttention-2)
//        dV += P^T dO, dK += dS^T Q           (registers; warp: 16 keys x a slice of dims)
//        dQ += dS K  -> atomicAdd into dq_accum (warp: 16 queries x a slice of dims)
//     dK is scaled by softmax_scale when stored (S = scale * Q K^T). dK and dV of a kv head
//     sum every query head of its group in a fixed order: no atomics.
//     The (head, query tile) pairs form one sequence over the whole group (BwdQueryTiles).
//     For Dp <= 128 Q, dO, lse and delta are double buffered as in FlashAttention-2: while
//     tile n is computed, tile n + 1's Q and dO are in flight by cp.async into the other
//     stage and its lse / delta rows by ordinary loads held in a register until the end of
//     tile n. At Dp = 192 and 256 two stages exceed sm80's 163 KiB of shared memory, so each
//     tile is loaded and waited for before it is computed. The double buffering has never
//     run on a GPU: it is checked in the host emulation only (tests/cuda_emulation).
//  3. flash_bwd_dq_convert_kernel: dq = scale * dq_accum, rounded to T.
// deterministic = true replaces the atomic dQ of (2) and the conversion (3) with
//  3'. flash_bwd_dq_kernel: one CTA per (query block, head, batch), shaped like the forward
//     (warp = 16 query rows), walking the forward's key blocks and recomputing S, P, dP, dS
//     to accumulate dQ = dS K in registers; writes dq directly. No atomics anywhere, so the
//     result is bitwise reproducible (at the cost of computing S and dP twice).
// Rows of a query block past seqlen_q and rows with lse = -inf (no visible key) use
// lse = +inf in the kernels, so their P (and dS) is exactly 0.
//
// Sparse = true (block-sparse attention) replaces the implicit schedules with the
// BlockSparseSchedule's lists (flash_common.cuh): the main kernel walks the query blocks
// listed for its key block (query-side lists; the state full / partial is uniform per
// CTA and query tile), the deterministic dQ kernel the forward's SparseKeyWalk. Partial
// tiles apply the BlockMask's element mask and, with token-granular bit masks
// (BlockSparseSchedule::bits), the element's bit: the main kernel copies a query tile's
// words with its Q and dO into its row statistics (so the atomic dQ, computed from the
// masked dS, needs nothing more), the dQ kernel as the forward (pad_bits, flash_common.cuh).
// The sparse variants have not yet run on a GPU; they are checked on the host through
// tests/cuda_emulation.
#pragma once

#include "flash_common.cuh"

namespace longattn {
namespace cuda {
namespace flash {

struct BwdArgs {
  AttentionGradParams g;
  BlockSparseSchedule sparse;  // read by the Sparse variants only (a copy of *g.fwd.sparse)
  bool vec_q, vec_k, vec_v, vec_do;
};

// ---- 1. preprocess ------------------------------------------------------------------------
constexpr int kRowsPerCta = 32;  // pre/post-processing: 4 warps x 8 rows

template <typename T>
__global__ void __launch_bounds__(128) flash_bwd_preprocess_kernel(const AttentionGradParams g) {
  const AttentionParams& p = g.fwd;
  int b, rblk;
  grid_coords(p.seqlen_q, kRowsPerCta, b, rblk);
  const int h = blockIdx.y;
  const Seq s = seq_of(p, b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kRowsPerCta; r += 4) {
    const int i = rblk * kRowsPerCta + r;
    if (i >= s.sq) break;
    const int64_t tok = s.tq + i;
    const T* o = static_cast<const T*>(p.out) + b * p.out_stride[0] + tok * p.out_stride[1] + h * p.out_stride[2];
    const T* dO = static_cast<const T*>(g.dout) + b * g.dout_stride[0] + tok * g.dout_stride[1] + h * g.dout_stride[2];
    float acc = 0.f;
    for (int c = lane; c < p.head_dim_v; c += 32) acc += to_f(o[c]) * to_f(dO[c]);
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (lane == 0) {
      if (g.dlse) {
        const int64_t li = b * p.lse_stride[0] + h * p.lse_stride[1] + tok * p.lse_stride[2];
        if (p.lse[li] != -INFINITY) acc -= g.dlse[li];
      }
      g.delta[b * g.delta_stride[0] + h * g.delta_stride[1] + tok * g.delta_stride[2]] = acc;
    }
    if (!g.deterministic) {
      float* dqa = g.dq_accum + b * g.dq_accum_stride[0] + tok * g.dq_accum_stride[1] + h * g.dq_accum_stride[2];
      for (int c = lane; c < p.head_dim; c += 32) dqa[c] = 0.f;
    }
  }
}

// ---- 3. dq_accum -> dq ----------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(128) flash_bwd_dq_convert_kernel(const AttentionGradParams g) {
  const AttentionParams& p = g.fwd;
  int b, rblk;
  grid_coords(p.seqlen_q, kRowsPerCta, b, rblk);
  const int h = blockIdx.y;
  const Seq s = seq_of(p, b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale = float(p.scale);
  for (int r = warp; r < kRowsPerCta; r += 4) {
    const int i = rblk * kRowsPerCta + r;
    if (i >= s.sq) break;
    const int64_t tok = s.tq + i;
    const float* dqa = g.dq_accum + b * g.dq_accum_stride[0] + tok * g.dq_accum_stride[1] + h * g.dq_accum_stride[2];
    T* dq = static_cast<T*>(g.dq) + b * g.dq_stride[0] + tok * g.dq_stride[1] + h * g.dq_stride[2];
    for (int c = lane; c < p.head_dim; c += 32) dq[c] = from_f<T>(dqa[c] * scale);
  }
}

// Stores one C-fragment pair (columns c, c + 1 of a row) masked to `cols` columns.
template <typename T>
__device__ __forceinline__ void store_pair(T* row, int c, int cols, float x0, float x1, bool pair_ok) {
  if (c >= cols) return;
  if (c + 1 < cols && pair_ok) {
    *reinterpret_cast<uint32_t*>(row + c) = pack2<T>(x0, x1);
  } else {
    row[c] = from_f<T>(x0);
    if (c + 1 < cols) row[c + 1] = from_f<T>(x1);
  }
}
__host__ __device__ inline bool pair_ok(const void* ptr, const int64_t (&stride)[3]) {
  return (reinterpret_cast<uintptr_t>(ptr) & 3u) == 0 && stride[0] % 2 == 0 && stride[1] % 2 == 0 &&
         stride[2] % 2 == 0;
}

// ---- 2. main kernel -------------------------------------------------------------------------
// Row statistics per query row and stage: lse and delta, and in the sparse variant the
// kBlockN / 32 bit-mask words of the row over the CTA's keys.
template <int Dp>
__host__ __device__ constexpr int bwd_stat_words(bool sparse) {
  return 2 + (sparse ? BwdTraits<Dp>::kBlockN / 32 : 0);
}
// Shared memory of the main kernel with `stages` buffers of Q, dO and the row statistics.
template <int Dp>
__host__ __device__ constexpr int bwd_smem_bytes(int stages, bool sparse = false) {
  using Tr = BwdTraits<Dp>;
  return 2 * Tr::kBlockN * (Dp + kPad) * 2                // K, V
         + stages * 2 * Tr::kBlockM * (Dp + kPad) * 2     // Q, dO
         + 2 * Tr::kBlockN * (Tr::kBlockM + kPad) * 2     // P^T, dS^T
         + stages * bwd_stat_words<Dp>(sparse) * Tr::kBlockM * 4;  // lse, delta (bit masks)
}
// Query tiles in flight: two (the next tile's Q, dO, lse, delta load while the current one
// is computed, as FlashAttention-2) where that fits sm80's 163 KiB of shared memory, i.e.
// Dp <= 128; one at Dp = 192 and 256 (each tile's load is then waited for at once).
template <int Dp>
__host__ __device__ constexpr int bwd_stages() {
  return bwd_smem_bytes<Dp>(2) <= 163 * 1024 ? 2 : 1;
}
template <int Dp, bool Sparse = false>
constexpr int bwd_smem_bytes() {
  return bwd_smem_bytes<Dp>(bwd_stages<Dp>(), Sparse);
}
static_assert(bwd_stages<32>() == 2 && bwd_stages<64>() == 2 && bwd_stages<96>() == 2 && bwd_stages<128>() == 2 &&
                  bwd_stages<192>() == 1 && bwd_stages<256>() == 1,
              "bwd stages");
// The sparse variant's bit-mask words (0.5 KiB a stage) keep the same stages within the same limits.
static_assert(bwd_smem_bytes<128, true>() <= 163 * 1024 && bwd_smem_bytes<256, true>() <= 227 * 1024, "bwd smem");

// The query tiles a backward CTA visits, in order, over the query heads [h_begin, h_end)
// of its GQA group: per head, dense, the M-row tiles [qb_begin, qb_end) whose key_range()
// meets the CTA's keys [j0, j0 + ncols) (masked unless the keys lie inside its
// [full_begin, full_end)); sparse, the SparseQueryWalk of the key block (masked = partial,
// bid = the pool index of its bit mask). next() moves to the next tile (h, i0, masked, bid)
// and returns false when none is left, so the caller can look one tile ahead for the prefetch.
template <int M, int N, bool Sparse>
struct BwdQueryTiles {
  SparseQueryWalk<M> walk;
  int qb = 0, qb_begin = 0, qb_end = 0, h_end = 0, kbk = 0;
  int h = 0, i0 = 0, bid = 0;
  bool masked = false;

  __device__ __forceinline__ void init(const BlockSparseSchedule& bs, const Seq& s, int b, int h_begin, int h_end_,
                                       int j0, int qb_begin_, int qb_end_) {
    h_end = h_end_;
    if constexpr (Sparse) {
      h = h_begin;
      kbk = j0 / int(bs.block_k);
      walk.init(bs, b, h, kbk, s.sq);
    } else {
      h = h_begin - 1;
      qb_begin = qb_begin_;
      qb_end = qb = qb_end_;  // the first next() starts head h_begin
    }
  }
  __device__ __forceinline__ bool next(const AttentionParams& p, const BlockSparseSchedule& bs, const Seq& s, int b,
                                       int j0, int ncols) {
    if constexpr (Sparse) {
      while (!walk.next(bs)) {
        if (++h >= h_end) return false;
        walk.init(bs, b, h, kbk, s.sq);
      }
      i0 = walk.i0();
      masked = walk.mode == kPartial;
      bid = walk.bid;
      return true;
    } else {
      for (;;) {
        if (qb >= qb_end) {
          if (++h >= h_end) return false;
          qb = qb_begin;
          if (qb >= qb_end) continue;
        }
        const int i = qb++ * M;
        const KeyRange kr = key_range_dev(i, min(i + M, s.sq), s.sq, s.sk, p.window_left, p.window_right);
        if (j0 >= kr.end || j0 + ncols <= kr.begin) continue;  // uniform over the CTA
        i0 = i;
        masked = j0 < kr.full_begin || j0 + N > kr.full_end;
        return true;
      }
    }
  }
};

template <typename T, int Dp, bool Sparse>
__global__ void __launch_bounds__(BwdTraits<Dp>::kWarps * 32) flash_bwd_kernel(const BwdArgs args) {
  using Tr = BwdTraits<Dp>;
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN, W = Tr::kWarps, THREADS = W * 32;
  constexpr int LD = Dp + kPad, LDP = M + kPad;
  constexpr int KT = N / 16;        // 16-key strips
  constexpr int QS = W / KT;        // warps sharing a strip
  constexpr int QW = M / QS;        // query columns of S^T per warp
  constexpr int QNT = QW / 8;
  constexpr int DW = Dp / QS;       // dK / dV columns per warp
  constexpr int DNT = DW / 8;
  constexpr int QT = M / 16;        // 16-query strips for dQ
  constexpr int DS = W / QT;        // warps sharing a query strip
  constexpr int DQW = Dp / DS;      // dQ columns per warp, in chunks of 16
  constexpr int STAGES = bwd_stages<Dp>();
  constexpr int BW = N / 32;        // bit-mask words of a query row over the CTA's keys
  constexpr int SW = bwd_stat_words<Dp>(Sparse);  // row statistics per row and stage
  static_assert(W % KT == 0 && M % QS == 0 && QNT % 2 == 0 && Dp % QS == 0 && DNT % 2 == 0, "bwd tiles");
  static_assert(W % QT == 0 && Dp % DS == 0 && DQW % 16 == 0 && M % 16 == 0 && N % 16 == 0, "bwd dq tiles");
  static_assert(THREADS >= 2 * M, "bwd row statistics: one thread per lse / delta");
  static_assert(!Sparse || THREADS >= BW * M, "bwd bit masks: one thread per word");

  // Stage st: Q at sQ + st * M * LD, dO at sdO + st * M * LD, lse at sStat + st * SW * M and
  // delta right after it (sStat + st * SW * M + M); sparse, word w of the bit mask of query
  // row r at sStat + st * SW * M + (2 + w) * M + r (beside that row's lse and delta: a
  // thread's reads share their address arithmetic, and rows r, r + 1 are one 64-bit load).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + N * LD;
  T* sQ = sV + N * LD;
  T* sdO = sQ + STAGES * M * LD;
  T* sP = sdO + STAGES * M * LD;  // P^T: [key][query]
  T* sdS = sP + N * LDP;          // dS^T: [key][query]
  float* sStat = reinterpret_cast<float*>(sdS + N * LDP);  // lse * log2(e) (+inf for rows without P), delta

  const AttentionGradParams& g = args.g;
  const AttentionParams& p = g.fwd;
  int b, kblk;
  grid_coords(p.seqlen_k, N, b, kblk);
  const int hk = blockIdx.y;
  const Seq s = seq_of(p, b);
  const int j0 = kblk * N;
  if (j0 >= s.sk) return;
  const int ncols = min(N, s.sk - j0);
  const int D = int(p.head_dim), Dv = int(p.head_dim_v);
  const int group = int(p.heads / p.heads_kv);

  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + (s.tk + j0) * p.k_stride[1] + hk * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + (s.tk + j0) * p.v_stride[1] + hk * p.v_stride[2];
  load_tile<T, N, Dp, THREADS>(sK, k, p.k_stride[1], ncols, D, args.vec_k);
  load_tile<T, N, Dp, THREADS>(sV, v, p.v_stride[1], ncols, Dv, args.vec_v);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
  const int kt = warp % KT, qs = warp / KT;  // S^T, dK, dV partition
  const int qt = warp % QT, ds = warp / QT;  // dQ partition

  float dk[DNT][4], dv[DNT][4];
#pragma unroll
  for (int d = 0; d < DNT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[d][e] = dv[d][e] = 0.f;

  // Queries that may see a key of [j0, j0 + ncols): i + off - left <= j_last, i + off + right >= j0.
  const int64_t off = int64_t(s.sk) - s.sq;
  int64_t q_begin = p.window_right < 0 ? 0 : j0 - off - p.window_right;
  int64_t q_end = p.window_left < 0 ? s.sq : j0 + ncols - 1 - off + p.window_left + 1;
  q_begin = q_begin < 0 ? 0 : q_begin;
  q_end = q_end > s.sq ? s.sq : q_end;
  const int qb_begin = int(q_begin / M);
  const int qb_end = q_begin < q_end ? int((q_end + M - 1) / M) : qb_begin;
  const int jl_lo = kt * 16 + gq, jl_hi = jl_lo + 8;  // this thread's key rows (block-local)

  // Q and dO of query tile (h, i0) into stage st through cp.async (the caller commits).
  auto load_qdo = [&](int h, int i0, int st) {
    const int rows = min(M, s.sq - i0);
    const int64_t tok = s.tq + i0;
    const T* qh = static_cast<const T*>(p.q) + b * p.q_stride[0] + tok * p.q_stride[1] + h * p.q_stride[2];
    const T* doh = static_cast<const T*>(g.dout) + b * g.dout_stride[0] + tok * g.dout_stride[1] + h * g.dout_stride[2];
    load_tile<T, M, Dp, THREADS>(sQ + st * M * LD, qh, p.q_stride[1], rows, D, args.vec_q);
    load_tile<T, M, Dp, THREADS>(sdO + st * M * LD, doh, g.dout_stride[1], rows, Dv, args.vec_do);
  };
  // Row statistics of tile (h, i0) in two steps, so that the global load can be issued a
  // whole tile before its shared-memory store: threads [0, M) read lse of row threadIdx.x,
  // threads [M, 2M) delta of row threadIdx.x - M (rows past seqlen_q: lse -inf, delta 0);
  // store_stat writes lse * log2(e), or +inf for lse = -inf (the row sees no key), and delta.
  // Sparse with bit masks, copy_bits has the words of a partial tile (pool index bid) copied
  // by cp.async with its Q and dO (threads [0, BW * M): word w = u / M of row r = u % M, from
  // the CTA's first key j0 on; the CTA's 64 keys lie in one key block, the M rows in one
  // query block): nothing is held in registers across a tile.
  auto load_stat = [&](int h, int i0) {
    const int r = threadIdx.x % M, rows = min(M, s.sq - i0);
    float x = threadIdx.x < M ? -INFINITY : 0.f;
    if (threadIdx.x < 2 * M && r < rows) {
      const int64_t tok = s.tq + i0 + r;
      x = threadIdx.x < M ? p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + tok * p.lse_stride[2]]
                          : g.delta[b * g.delta_stride[0] + h * g.delta_stride[1] + tok * g.delta_stride[2]];
    }
    return x;
  };
  auto store_stat = [&](float x, int st) {
    if (threadIdx.x < M)
      sStat[st * SW * M + threadIdx.x] = x == -INFINITY ? INFINITY : x * kLog2e;
    else if (threadIdx.x < 2 * M)
      sStat[st * SW * M + threadIdx.x] = x;
  };
  auto copy_bits = [&](int bid, int i0, bool masked, int st) {
    if constexpr (Sparse) {
      if (masked && args.sparse.bits && threadIdx.x < BW * M)  // uniform but for the thread bound
        cp_async4(sStat + st * SW * M + 2 * M + threadIdx.x,
                  bit_row(args.sparse, bid, i0 + threadIdx.x % M, j0) + threadIdx.x / M);
    }
  };

  BwdQueryTiles<M, N, Sparse> tiles;
  tiles.init(args.sparse, s, b, hk * group, (hk + 1) * group, j0, qb_begin, qb_end);
  bool more = tiles.next(p, args.sparse, s, b, j0, ncols);
  if constexpr (STAGES == 2) {  // the first tile into stage 0
    if (more) {
      load_qdo(tiles.h, tiles.i0, 0);
      copy_bits(tiles.bid, tiles.i0, tiles.masked, 0);
      store_stat(load_stat(tiles.h, tiles.i0), 0);
    }
    cp_async_commit();
  }
  int st = 0;  // stage of the current tile
  while (more) {
    const int h = tiles.h, i0 = tiles.i0, bid = tiles.bid;
    const bool masked = tiles.masked;
    const int rows = min(M, s.sq - i0);
    float stat_next = 0.f;
    if constexpr (STAGES == 2) {
      // Prefetch the next tile into stage st ^ 1: every warp finished reading it (tile n - 1)
      // before the trailing __syncthreads() of the previous iteration. One group per
      // iteration (empty after the last tile), so wait<1> retires exactly this tile's.
      more = tiles.next(p, args.sparse, s, b, j0, ncols);
      if (more) {
        load_qdo(tiles.h, tiles.i0, st ^ 1);
        copy_bits(tiles.bid, tiles.i0, tiles.masked, st ^ 1);
        stat_next = load_stat(tiles.h, tiles.i0);  // stored to stage st ^ 1 at the end of this tile
      }
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      load_qdo(h, i0, 0);
      copy_bits(bid, i0, masked, 0);
      cp_async_commit();
      store_stat(load_stat(h, i0), 0);
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* cQ = sQ + st * M * LD;
    const T* cdO = sdO + st * M * LD;
    const float* sLse = sStat + st * SW * M;
    const float* sDelta = sLse + M;
    // Sparse, partial tile with bit masks (uniform over the CTA): strip kt's 16 keys are bits
    // [bsh, bsh + 16) of word kt / 2 of a row, key jl_lo bit bsh and jl_hi bit bsh + 8.
    const bool bitmask = Sparse && masked && args.sparse.bits;
    const int bsh = (kt % 2) * 16 + gq;
    ScoreMod mod;  // only the ALiBi slope depends on the head
    mod.init(p, s, b, h);

    // S^T = K Q^T and dP^T = V dO^T: rows = keys of strip kt, columns = queries [qs*QW, +QW).
    float sacc[QNT][4], pacc[QNT][4];
#pragma unroll
    for (int n = 0; n < QNT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) sacc[n][e] = pacc[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < Dp / 16; ++kk) {
      uint32_t ak[4], av[4];
      const int arow = kt * 16 + (lane % 8) + 8 * ((lane / 8) % 2), acol = kk * 16 + 8 * (lane / 16);
      ldmatrix_x4(ak, sK + arow * LD + acol);
      ldmatrix_x4(av, sV + arow * LD + acol);
#pragma unroll
      for (int n = 0; n < QNT; n += 2) {
        const int brow = qs * QW + n * 8 + (lane % 8) + 8 * (lane / 16), bcol = kk * 16 + 8 * ((lane / 8) % 2);
        uint32_t bq[4], bo[4];
        ldmatrix_x4(bq, cQ + brow * LD + bcol);
        ldmatrix_x4(bo, cdO + brow * LD + bcol);
        mma16816<T>(sacc[n], ak, bq[0], bq[1]);
        mma16816<T>(sacc[n + 1], ak, bq[2], bq[3]);
        mma16816<T>(pacc[n], av, bo[0], bo[1]);
        mma16816<T>(pacc[n + 1], av, bo[2], bo[3]);
      }
    }

    // P^T and dS^T, element-wise; written to shared memory as T pairs (columns 2t, 2t+1).
#pragma unroll
    for (int n = 0; n < QNT; ++n) {
      const int ql = qs * QW + n * 8 + 2 * t;
      const int64_t i = int64_t(i0) + ql;
      const int lo0 = masked ? mod.lo(i) : 0, hi0 = masked ? mod.hi(i) : 0;
      const int lo1 = masked ? mod.lo(i + 1) : 0, hi1 = masked ? mod.hi(i + 1) : 0;
      SparseRowMask rm0, rm1;
      if constexpr (Sparse) {
        if (masked) {
          rm0.init(args.sparse, i, s.sq, s.sk);
          rm1.init(args.sparse, i + 1, s.sq, s.sk);
        }
      }
      const float L0 = sLse[ql], L1 = sLse[ql + 1], d0 = sDelta[ql], d1 = sDelta[ql + 1];
      uint32_t w0 = 0, w1 = 0;  // the bits of rows i, i + 1 over strip kt, from bit 0
      if (bitmask) {
        const uint2 w = *reinterpret_cast<const uint2*>(sLse + (2 + kt / 2) * M + ql);  // ql is even
        w0 = w.x >> bsh;
        w1 = w.y >> bsh;
      }
      float pv[4], dsv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = j0 + (e < 2 ? jl_lo : jl_hi);
        const bool c1 = e & 1;
        float tt;
        float sc;
        if constexpr (Sparse) {
          sc = mod.apply(sacc[n][e], c1 ? i + 1 : i, j, false, 0, 0, tt);
          if (masked && !(c1 ? rm1 : rm0).visible(j)) sc = -INFINITY;
          if (bitmask && !(((c1 ? w1 : w0) >> (e < 2 ? 0 : 8)) & 1u)) sc = -INFINITY;
        } else {
          sc = mod.apply(sacc[n][e], c1 ? i + 1 : i, j, masked, c1 ? lo1 : lo0, c1 ? hi1 : hi0, tt);
        }
        const float pr = exp2f(fmaf(sc, kLog2e, -(c1 ? L1 : L0)));
        float dsc = pr * (pacc[n][e] - (c1 ? d1 : d0));
        if (mod.softcap) dsc *= 1.f - tt * tt;
        pv[e] = pr;
        dsv[e] = dsc;
      }
      *reinterpret_cast<uint32_t*>(sP + jl_lo * LDP + ql) = pack2<T>(pv[0], pv[1]);
      *reinterpret_cast<uint32_t*>(sP + jl_hi * LDP + ql) = pack2<T>(pv[2], pv[3]);
      *reinterpret_cast<uint32_t*>(sdS + jl_lo * LDP + ql) = pack2<T>(dsv[0], dsv[1]);
      *reinterpret_cast<uint32_t*>(sdS + jl_hi * LDP + ql) = pack2<T>(dsv[2], dsv[3]);
    }
    __syncthreads();

    // dV += P^T dO and dK += dS^T Q: rows = keys of strip kt, columns [qs*DW, +DW); k = queries.
#pragma unroll
    for (int kk = 0; kk < M / 16; ++kk) {
      uint32_t ap[4], as[4];
      const int arow = kt * 16 + (lane % 8) + 8 * ((lane / 8) % 2), acol = kk * 16 + 8 * (lane / 16);
      ldmatrix_x4(ap, sP + arow * LDP + acol);
      ldmatrix_x4(as, sdS + arow * LDP + acol);
#pragma unroll
      for (int d = 0; d < DNT; d += 2) {
        const int brow = kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2), bcol = qs * DW + d * 8 + 8 * (lane / 16);
        uint32_t bo[4], bq[4];
        ldmatrix_x4_trans(bo, cdO + brow * LD + bcol);
        ldmatrix_x4_trans(bq, cQ + brow * LD + bcol);
        mma16816<T>(dv[d], ap, bo[0], bo[1]);
        mma16816<T>(dv[d + 1], ap, bo[2], bo[3]);
        mma16816<T>(dk[d], as, bq[0], bq[1]);
        mma16816<T>(dk[d + 1], as, bq[2], bq[3]);
      }
    }

    // dQ partial = dS K over this block's keys: rows = queries of strip qt, columns
    // [ds*DQW, +DQW) in 16-column chunks; A = dS from dS^T (ldmatrix.trans), B = K (.trans).
    if (!g.deterministic) {
      uint32_t a[N / 16][4];
#pragma unroll
      for (int kk = 0; kk < N / 16; ++kk)
        ldmatrix_x4_trans(a[kk], sdS + (kk * 16 + (lane % 8) + 8 * (lane / 16)) * LDP + qt * 16 + 8 * ((lane / 8) % 2));
      float* dqa = g.dq_accum + b * g.dq_accum_stride[0] + (s.tq + i0) * g.dq_accum_stride[1] +
                   h * g.dq_accum_stride[2];
      const int qr_lo = qt * 16 + gq, qr_hi = qr_lo + 8;
#pragma unroll
      for (int c = 0; c < DQW / 16; ++c) {
        const int c0 = ds * DQW + c * 16;
        if (c0 >= D) break;
        float acc[2][4] = {};
#pragma unroll
        for (int kk = 0; kk < N / 16; ++kk) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, sK + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + c0 + 8 * (lane / 16));
          mma16816<T>(acc[0], a[kk], bk[0], bk[1]);
          mma16816<T>(acc[1], a[kk], bk[2], bk[3]);
        }
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const int col = c0 + n * 8 + 2 * t;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e < 2 ? qr_lo : qr_hi, cc = col + (e & 1);
            if (r < rows && cc < D) atomicAdd(dqa + int64_t(r) * g.dq_accum_stride[1] + cc, acc[n][e]);
          }
        }
      }
    }

    if constexpr (STAGES == 2) {
      if (more) store_stat(stat_next, st ^ 1);  // stage st ^ 1 is read from the next iteration on
      st ^= 1;
    } else {
      more = tiles.next(p, args.sparse, s, b, j0, ncols);
    }
    __syncthreads();  // every warp is done with stage st, sP and sdS: they are refilled next
  }
  cp_async_wait<0>();  // nothing in flight at exit (the K/V group when no query tile was visited)

  // Store dK (times scale) and dV for keys [j0, j0 + ncols).
  const float scale = float(p.scale);
  T* dkp = static_cast<T*>(g.dk) + b * g.dk_stride[0] + (s.tk + j0) * g.dk_stride[1] + hk * g.dk_stride[2];
  T* dvp = static_cast<T*>(g.dv) + b * g.dv_stride[0] + (s.tk + j0) * g.dv_stride[1] + hk * g.dv_stride[2];
  const bool pk = pair_ok(g.dk, g.dk_stride), pv = pair_ok(g.dv, g.dv_stride);
#pragma unroll
  for (int d = 0; d < DNT; ++d) {
    const int c = qs * DW + d * 8 + 2 * t;
    if (jl_lo < ncols) {
      store_pair<T>(dkp + int64_t(jl_lo) * g.dk_stride[1], c, D, dk[d][0] * scale, dk[d][1] * scale, pk);
      store_pair<T>(dvp + int64_t(jl_lo) * g.dv_stride[1], c, Dv, dv[d][0], dv[d][1], pv);
    }
    if (jl_hi < ncols) {
      store_pair<T>(dkp + int64_t(jl_hi) * g.dk_stride[1], c, D, dk[d][2] * scale, dk[d][3] * scale, pk);
      store_pair<T>(dvp + int64_t(jl_hi) * g.dv_stride[1], c, Dv, dv[d][2], dv[d][3], pv);
    }
  }
}

// ---- 3'. deterministic dQ ---------------------------------------------------------------------
template <int Dp>
__host__ __device__ constexpr int bwd_dq_tile_bytes() {
  using Tr = DqTraits<Dp>;
  return (2 * Tr::kBlockM + 4 * Tr::kBlockN) * (Dp + kPad) * 2;  // Q, dO, 2 stages of K and V
}
template <int Dp, bool Sparse>
__host__ __device__ constexpr int bwd_dq_smem_bytes() {
  return bwd_dq_tile_bytes<Dp>() + walk_smem_bytes<Sparse>();  // + the sparse walk (SharedKeyWalk)
}

template <typename T, int Dp, bool Sparse>
__global__ void __launch_bounds__(DqTraits<Dp>::kWarps * 32) flash_bwd_dq_kernel(const BwdArgs args) {
  using Tr = DqTraits<Dp>;
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN, THREADS = Tr::kWarps * 32, LD = Dp + kPad;
  constexpr int NT = N / 8, DT = Dp / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + M * LD;
  T* sK = sdO + M * LD;     // stage s at sK + s * N * LD
  T* sV = sK + 2 * N * LD;  // stage s at sV + s * N * LD

  const AttentionGradParams& g = args.g;
  const AttentionParams& p = g.fwd;
  int b, qblk;
  grid_coords(p.seqlen_q, M, b, qblk);
  const int h = blockIdx.y;
  const Seq s = seq_of(p, b);
  const int i0 = qblk * M;
  if (i0 >= s.sq) return;
  const int rows = min(M, s.sq - i0);
  const int hk = int(h / (p.heads / p.heads_kv));
  const int D = int(p.head_dim), Dv = int(p.head_dim_v);

  const int64_t tq0 = s.tq + i0;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + tq0 * p.q_stride[1] + h * p.q_stride[2];
  const T* dO = static_cast<const T*>(g.dout) + b * g.dout_stride[0] + tq0 * g.dout_stride[1] + h * g.dout_stride[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + s.tk * p.k_stride[1] + hk * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + s.tk * p.v_stride[1] + hk * p.v_stride[2];

  // The key tiles in visiting order, as the forward, with their K / V and bit-mask words
  // loaded as there.
  KeyTiles<N, Sparse> tiles;
  tiles.init(p, args.sparse, s, b, h, i0, M, rows, smem_raw + bwd_dq_tile_bytes<Dp>());
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
  load_tile<T, M, Dp, THREADS>(sQ, q, p.q_stride[1], rows, D, args.vec_q);
  load_tile<T, M, Dp, THREADS>(sdO, dO, g.dout_stride[1], rows, Dv, args.vec_do);
  if (tiles.more) load_kv(tiles.next_j0, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
  const int r0 = warp * 16;
  const int rl = r0 + gq, rh = rl + 8;
  const int64_t i_lo = int64_t(i0) + rl, i_hi = int64_t(i0) + rh;
  ScoreMod mod;
  mod.init(p, s, b, h);
  const int lo_lo = mod.lo(i_lo), hi_lo = mod.hi(i_lo), lo_hi = mod.lo(i_hi), hi_hi = mod.hi(i_hi);
  const int wq = Sparse ? (i0 + r0) / int(args.sparse.block_q) - i0 / int(args.sparse.block_q) : 0;
  SparseRowMask rm_lo, rm_hi;
  if constexpr (Sparse) {
    rm_lo.init(args.sparse, i_lo, s.sq, s.sk);
    rm_hi.init(args.sparse, i_hi, s.sq, s.sk);
  }
  auto row_stats = [&](int r, float& L, float& dl) {
    L = INFINITY;
    dl = 0.f;
    if (r < rows) {
      const int64_t tok = tq0 + r;
      const float l = p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + tok * p.lse_stride[2]];
      L = l == -INFINITY ? INFINITY : l * kLog2e;
      dl = g.delta[b * g.delta_stride[0] + h * g.delta_stride[1] + tok * g.delta_stride[2]];
    }
  };
  float L_lo, L_hi, d_lo, d_hi;
  row_stats(rl, L_lo, d_lo);
  row_stats(rh, L_hi, d_hi);

  float dq[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;

  for (int it = 0; tiles.more; ++it) {
    const int stage = it & 1;
    int mode;
    bool masked;
    const int j0 = tiles.take(args.sparse, wq, mode, masked);
    if (tiles.more) load_kv(tiles.next_j0, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* cK = sK + stage * N * LD;
    const T* cV = sV + stage * N * LD;
    if (!Sparse || mode != kSkip) {  // warp-uniform: a skipped tile adds nothing to dQ
      const bool bitmask = Sparse && masked && args.sparse.bits;  // partial with bit masks: warp-uniform

      // S = Q K^T and dP = dO V^T (both B operands: rows = keys, non-trans).
      float sacc[NT][4], pacc[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) sacc[n][e] = pacc[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < Dp / 16; ++kk) {
        uint32_t aq[4], ao[4];
        const int arow = r0 + (lane % 8) + 8 * ((lane / 8) % 2), acol = kk * 16 + 8 * (lane / 16);
        ldmatrix_x4(aq, sQ + arow * LD + acol);
        ldmatrix_x4(ao, sdO + arow * LD + acol);
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
          const int brow = n * 8 + (lane % 8) + 8 * (lane / 16), bcol = kk * 16 + 8 * ((lane / 8) % 2);
          uint32_t bk[4], bv[4];
          ldmatrix_x4(bk, cK + brow * LD + bcol);
          ldmatrix_x4(bv, cV + brow * LD + bcol);
          mma16816<T>(sacc[n], aq, bk[0], bk[1]);
          mma16816<T>(sacc[n + 1], aq, bk[2], bk[3]);
          mma16816<T>(pacc[n], ao, bv[0], bv[1]);
          mma16816<T>(pacc[n + 1], ao, bv[2], bv[3]);
        }
      }
      // dS = P * (dP - delta) * (1 - tanh^2), in place of sacc.
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int j = j0 + n * 8 + 2 * t;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool hi = e >= 2;
          float tt;
          float sc;
          if constexpr (Sparse) {
            sc = mod.apply(sacc[n][e], hi ? i_hi : i_lo, j + (e & 1), false, 0, 0, tt);
            if (masked && !(hi ? rm_hi : rm_lo).visible(j + (e & 1))) sc = -INFINITY;
          } else {
            sc = mod.apply(sacc[n][e], hi ? i_hi : i_lo, j + (e & 1), masked, hi ? lo_hi : lo_lo, hi ? hi_hi : hi_lo,
                           tt);
          }
          const float pr = exp2f(fmaf(sc, kLog2e, -(hi ? L_hi : L_lo)));
          float dsc = pr * (pacc[n][e] - (hi ? d_hi : d_lo));
          if (mod.softcap) dsc *= 1.f - tt * tt;
          sacc[n][e] = dsc;
        }
      }
      // Bit masks: an element whose bit is clear has P = 0, so dS = 0. A pass of its own
      // (exact: a select, whatever dS was computed from the unmasked score) rather than in
      // the loop above, whose registers are full at Dp >= 192.
      if constexpr (Sparse) {
        if (bitmask) {
          const uint32_t tb =
              lane_bits<N>(pad_bits<T, Dp>(sQ + rl * LD) + 2 * stage, pad_bits<T, Dp>(sQ + rh * LD) + 2 * stage, t);
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (!lane_bit(tb, e >= 2, n, e & 1)) sacc[n][e] = 0.f;
        }
      }
      // dQ += dS K: A = dS from the accumulators, B = K rows (k = keys) via ldmatrix.trans.
      mma_acc_x_tile<T, N / 16, DT>(dq, sacc, cK, LD, lane);
    }  // mode != kSkip
    __syncthreads();
  }
  cp_async_wait<0>();

  const float scale = float(p.scale);
  T* dqp = static_cast<T*>(g.dq) + b * g.dq_stride[0] + tq0 * g.dq_stride[1] + h * g.dq_stride[2];
  const bool pq = pair_ok(g.dq, g.dq_stride);
#pragma unroll
  for (int d = 0; d < DT; ++d) {
    const int c = d * 8 + 2 * t;
    if (rl < rows) store_pair<T>(dqp + int64_t(rl) * g.dq_stride[1], c, D, dq[d][0] * scale, dq[d][1] * scale, pq);
    if (rh < rows) store_pair<T>(dqp + int64_t(rh) * g.dq_stride[1], c, D, dq[d][2] * scale, dq[d][3] * scale, pq);
  }
}

// ---- launcher ---------------------------------------------------------------------------------
#if !defined(LONGATTN_FLASH_EMULATE)
template <typename T, int Dp>
cudaError_t launch_flash_bwd(const AttentionGradParams& g, cudaStream_t stream) {
  const AttentionParams& p = g.fwd;
  if (p.batch <= 0 || p.heads <= 0) return cudaSuccess;
  if (!g.delta || (!g.deterministic && !g.dq_accum)) return cudaErrorInvalidValue;
  BwdArgs a;
  a.g = g;
  if (p.sparse) {
    // Block sizes 64 or 128: query tiles (64 rows), warps (16 rows) and key tiles then lie in
    // one block. The query-side lists drive the main kernel.
    const BlockSparseSchedule& bs = *p.sparse;
    if ((bs.block_q != 64 && bs.block_q != 128) || (bs.block_k != 64 && bs.block_k != 128) || p.cu_seqlens_q ||
        !bs.q_num || !bs.q_idx || !bs.full_q_num || !bs.full_q_idx)
      return cudaErrorInvalidValue;
    a.sparse = bs;
  }
  a.vec_q = vec_ok(p.q, p.q_stride);
  a.vec_k = vec_ok(p.k, p.k_stride);
  a.vec_v = vec_ok(p.v, p.v_stride);
  a.vec_do = vec_ok(g.dout, g.dout_stride);
  cudaError_t err;
  if (!grid_fits(p.seqlen_q, kRowsPerCta, p.heads, p.batch) || !grid_fits(p.seqlen_k, BwdTraits<Dp>::kBlockN, p.heads_kv, p.batch))
    return cudaErrorInvalidConfiguration;

  if (p.seqlen_q > 0) {
    const dim3 grid = make_grid(p.seqlen_q, kRowsPerCta, p.heads, p.batch);
    flash_bwd_preprocess_kernel<T><<<grid, 128, 0, stream>>>(g);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (p.seqlen_k > 0) {
    using Tr = BwdTraits<Dp>;
    const int smem = p.sparse ? bwd_smem_bytes<Dp, true>() : bwd_smem_bytes<Dp, false>();
    auto kernel = p.sparse ? flash_bwd_kernel<T, Dp, true> : flash_bwd_kernel<T, Dp, false>;
    if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) != cudaSuccess)
      return err;
    const dim3 grid = make_grid(p.seqlen_k, Tr::kBlockN, p.heads_kv, p.batch);
    kernel<<<grid, Tr::kWarps * 32, smem, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (p.seqlen_q > 0) {
    if (g.deterministic) {
      using Tr = DqTraits<Dp>;
      const int smem = p.sparse ? bwd_dq_smem_bytes<Dp, true>() : bwd_dq_smem_bytes<Dp, false>();
      auto kernel = p.sparse ? flash_bwd_dq_kernel<T, Dp, true> : flash_bwd_dq_kernel<T, Dp, false>;
      if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) != cudaSuccess)
        return err;
      const dim3 grid = make_grid(p.seqlen_q, Tr::kBlockM, p.heads, p.batch);
      kernel<<<grid, Tr::kWarps * 32, smem, stream>>>(a);
    } else {
      const dim3 grid = make_grid(p.seqlen_q, kRowsPerCta, p.heads, p.batch);
      flash_bwd_dq_convert_kernel<T><<<grid, 128, 0, stream>>>(g);
    }
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#endif  // !LONGATTN_FLASH_EMULATE

}  // namespace flash
}  // namespace cuda
}  // namespace longattn
