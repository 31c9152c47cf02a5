// Flash attention CPU micro-kernels (FlashAttention-2, Dao 2023), compiled once per ISA
// level like rope_kernel.cpp. Work items:
//   forward:  one (sequence, head, block of kBlockQ queries); online softmax over key blocks.
//   backward: one (sequence, kv head); loops over the query heads of its group, so dK/dV
//             accumulate without races and every gradient is summed in a fixed order
//             (bitwise deterministic by construction).
// Operands are packed into zero-padded float (double for float64) tiles so the GEMM
// micro-kernel in simd.h runs without edge cases.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "longattn/cpu_isa.h"
#include "longattn/attention.h"
#include "longattn/host_buffer.h"
#include "longattn/parallel.h"
#include "simd.h"

#ifndef LONGATTN_ISA_NS
#error "LONGATTN_ISA_NS must name the ISA level this unit is compiled for"
#endif

namespace longattn {
namespace cpu {
namespace LONGATTN_ISA_NS {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;

template <typename C>
constexpr C neg_inf() {
  return -std::numeric_limits<C>::infinity();
}

// Copies rows [0, n) of a strided (token, dim) matrix into a packed tile of ld columns,
// converting to C and multiplying by `mul`; rows n..rows-1 and columns dim..ld-1 are zero.
template <typename T, typename C>
void pack_rows(const T* src, int64_t stride, int64_t n, int64_t dim, C mul, C* dst, int64_t rows, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    C* d = dst + r * ld;
    if (r < n) {
      load_row<T, C>(src + r * stride, d, dim);
      if (mul != C(1))
        for (int64_t c = 0; c < dim; ++c) d[c] *= mul;
      std::fill(d + dim, d + ld, C(0));
    } else {
      std::fill(d, d + ld, C(0));
    }
  }
}

// dst[c][r] = src[r][c] for a rows x cols tile (ld_src, ld_dst are row lengths).
template <typename C>
void transpose(const C* src, int64_t rows, int64_t cols, int64_t ld_src, C* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

struct SeqHead {
  int64_t b, sq, sk, tq, tk;
};

// Query rows per tile: kBlockQ, or the BlockMask's block_q when smaller, so a tile never
// straddles two mask rows.
inline int64_t query_tile(const AttentionParams& p) {
  return p.sparse ? std::min<int64_t>(kBlockQ, p.sparse->block_q) : kBlockQ;
}

// One packed key tile [j0, j0 + kBlockK) that a query tile visits. Dense schedules mark a
// tile `masked` when the causal/window mask cuts it; block-sparse schedules give each
// column a state: 0 not visited, 1 full block, 2 partial block (element mask applies).
struct Visit {
  int64_t j0;
  bool masked;
  const uint8_t* state;  // kBlockK entries, or null
  bool all_partial = false;  // every column of the tile (up to sk) is in a partial block
  const int32_t* tile = nullptr;  // kBlockK entries: the bit-tile pool index of partial columns (bit masks only)
};

struct Visits {
  std::vector<Visit> list;
  std::vector<uint8_t> states;
  std::vector<int32_t> tiles;  // pool indices, parallel to states
};

// Dense schedules visit only tiles starting in [j_begin, j_end) (a key range of a split
// decoding call; multiples of kBlockK).
inline void tile_visits(const AttentionParams& p, const SeqHead& s, int64_t h, int64_t i0, int64_t rows, Visits& v,
                        int64_t j_begin = 0, int64_t j_end = std::numeric_limits<int64_t>::max()) {
  v.list.clear();
  if (!p.sparse) {
    const KeyRange kr = key_range(i0, i0 + rows, s.sq, s.sk, p.window_left, p.window_right);
    const int64_t end = std::min(kr.end, j_end);
    for (int64_t j0 = std::max(kr.begin / kBlockK * kBlockK, j_begin); j0 < end; j0 += kBlockK) {
      const int64_t cols = std::min(kBlockK, s.sk - j0);
      v.list.push_back({j0, j0 < kr.full_begin || j0 + cols > kr.full_end, nullptr});
    }
    return;
  }
  const BlockSparseSchedule& bs = *p.sparse;
  const int64_t qb = i0 / bs.block_q;
  const int64_t noff = s.b * bs.num_stride[0] + h * bs.num_stride[1] + qb * bs.num_stride[2];
  const int64_t ioff = s.b * bs.idx_stride[0] + h * bs.idx_stride[1] + qb * bs.idx_stride[2];
  // Merge the two sorted lists into key-tile order, writing each block's column states.
  const int32_t* lists[2] = {bs.kv_idx + ioff, bs.full_idx + ioff};
  const int32_t* bit_ids = bs.bits ? bs.kv_bits + ioff : nullptr;  // aligned with the partial list
  const int64_t counts[2] = {bs.kv_num[noff], bs.full_num[noff]};
  int64_t pos[2] = {0, 0};
  v.states.clear();
  v.tiles.clear();
  std::vector<int64_t> tiles;
  while (pos[0] < counts[0] || pos[1] < counts[1]) {
    const bool take_full = pos[0] >= counts[0] || (pos[1] < counts[1] && lists[1][pos[1]] < lists[0][pos[0]]);
    const int l = take_full ? 1 : 0;
    const int32_t tile = bit_ids && !take_full ? bit_ids[pos[0]] : -1;
    const int64_t kb = lists[l][pos[l]++];
    const uint8_t state = take_full ? 1 : 2;
    const int64_t start = kb * bs.block_k, end = std::min(start + bs.block_k, s.sk);
    for (int64_t j = start; j < end; ++j) {
      const int64_t t = j / kBlockK;
      if (tiles.empty() || tiles.back() != t) {
        tiles.push_back(t);
        v.states.resize(tiles.size() * kBlockK, 0);
        if (bit_ids) v.tiles.resize(tiles.size() * kBlockK, -1);
      }
      v.states[(tiles.size() - 1) * kBlockK + (j - t * kBlockK)] = state;
      if (bit_ids) v.tiles[(tiles.size() - 1) * kBlockK + (j - t * kBlockK)] = tile;
    }
  }
  for (size_t i = 0; i < tiles.size(); ++i) {
    const uint8_t* st = v.states.data() + i * kBlockK;
    const int64_t j0 = tiles[i] * kBlockK, cols = std::min(kBlockK, s.sk - j0);
    // A tile made only of full blocks needs no per-column work: treat it as dense.
    const bool all_full = std::all_of(st, st + cols, [](uint8_t x) { return x == 1; });
    const bool all_partial = std::all_of(st, st + cols, [](uint8_t x) { return x == 2; });
    v.list.push_back({j0, !all_full, all_full ? nullptr : st, all_partial, bs.bits ? v.tiles.data() + i * kBlockK : nullptr});
  }
}

// Whether a tile's scores need nothing after Q K^T: every column a visible key (no mask, no
// block-sparse state, no column past the sequence) and neither softcap nor ALiBi. The
// forward and the backward take exp of such "plain" tiles inside the GEMM.
inline bool plain_tile(const AttentionParams& p, const SeqHead& s, const Visit& visit) {
  return !visit.masked && !visit.state && !(p.softcap > 0.f) && !p.alibi_slopes && visit.j0 + kBlockK <= s.sk;
}

// Sets row[c] = -inf for the columns c in [0, cols) outside [0, keep_end) and [lo, hi).
template <typename C>
inline void mask_outside(C* row, int64_t cols, int64_t keep_end, int64_t lo, int64_t hi) {
  if (hi < lo) hi = lo;
  const int64_t a = std::max(keep_end, int64_t(0));
  if (a < lo) std::fill(row + a, row + lo, neg_inf<C>());
  const int64_t b = std::max(hi, a);
  if (b < cols) std::fill(row + b, row + cols, neg_inf<C>());
}

// Scores of one (query block, key block) tile, after scale (folded into q), softcap,
// ALiBi and masking. `tanh_out` (optional) receives tanh(s / softcap) for the backward.
template <typename C>
void finish_scores(const AttentionParams& p, const SeqHead& s, float slope, int64_t i0, int64_t rows,
                   const Visit& visit, C* S, C* tanh_out) {
  const int64_t j0 = visit.j0, cols = std::min(kBlockK, s.sk - j0);
  const bool masked = visit.masked;
  const int64_t off = s.sk - s.sq;
  for (int64_t r = 0; r < rows; ++r) {  // rows past `rows` are left as they are: callers ignore them
    C* row = S + r * kBlockK;
    const int64_t i = i0 + r;
    if (p.softcap > 0.f) {
      const C cap = C(p.softcap), inv = C(1) / C(p.softcap);
      for (int64_t c = 0; c < cols; ++c) {
        const C t = std::tanh(row[c] * inv);
        if (tanh_out) tanh_out[r * kBlockK + c] = t;
        row[c] = cap * t;
      }
    }
    if (p.alibi_slopes) {
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t dist = i + off - (j0 + c);
        row[c] -= C(slope) * C(dist < 0 ? -dist : dist);
      }
    }
    if (visit.state) {
      // BlockSparseSchedule::visible as column ranges: a partial column c is visible iff
      // c < sink_end or win_lo <= c < win_hi (tile-local, each clamped to [0, cols]).
      const BlockSparseSchedule& bs = *p.sparse;
      const int64_t d = i + off;
      const int64_t causal_end = bs.causal ? d + 1 : s.sk;
      auto local = [&](int64_t j) { return j < j0 ? int64_t(0) : (j > j0 + cols ? cols : j - j0); };
      const int64_t sink_end = local(std::min(bs.sink_tokens, causal_end));
      const int64_t win_lo = local(bs.window_left < 0 ? 0 : d - bs.window_left);
      const int64_t win_hi = local(std::min(bs.window_right < 0 ? s.sk : d + bs.window_right + 1, causal_end));
      if (visit.all_partial) {
        mask_outside(row, cols, sink_end, win_lo, win_hi);
      } else {
        for (int64_t c = 0; c < cols; ++c) {
          const uint8_t st = visit.state[c];
          if (st == 0 || (st == 2 && c >= sink_end && (c < win_lo || c >= win_hi))) row[c] = neg_inf<C>();
        }
      }
      if (visit.tile) {  // bit tiles: a partial column also needs its bit (row i of its query block)
        const int64_t r_blk = i % bs.block_q;
        for (int64_t c = 0; c < cols;) {  // one run of columns per key block
          const int64_t jj = (j0 + c) % bs.block_k, run = std::min(cols - c, bs.block_k - jj);
          if (visit.state[c] == 2) {
            const int32_t* w = bs.bits + (visit.tile[c] * bs.block_q + r_blk) * bs.bits_words;
            for (int64_t x = 0; x < run; ++x) {
              const int64_t t = jj + x;
              if (!((uint32_t(w[t >> 5]) >> (t & 31)) & 1u)) row[c + x] = neg_inf<C>();
            }
          }
          c += run;
        }
      }
    } else if (masked) {
      const int64_t d = i + off;
      auto local = [&](int64_t j) { return j < j0 ? int64_t(0) : (j > j0 + cols ? cols : j - j0); };
      const int64_t lo = local(p.window_left < 0 ? 0 : d - p.window_left);
      const int64_t hi = local(p.window_right < 0 ? s.sk : d + p.window_right + 1);
      mask_outside(row, cols, 0, lo, hi);
    }
    std::fill(row + cols, row + kBlockK, neg_inf<C>());
  }
}

// Key/value blocks packed once per (sequence, kv head) and shared by every query block
// and every query head of the group: K^T tiles (dp x kBlockK) for S = Q K^T and V tiles
// (kBlockK x dvp) for O += P V. Blocks start at multiples of kBlockK.
template <typename C>
struct PackedKV {
  int64_t dp, dvp, kt_elems, v_elems;
  std::vector<int64_t> base;  // per sequence: index of its first block (kv head 0)
  HostBuffer data;              // every element is written by pack_kv: no zero fill
  // Each key tile is read by (query heads per kv head) x (query tiles) visits. At most
  // kStreamReuse of them (a decoding step, short queries) and packing every tile once into
  // a sequence-long buffer costs more than packing it at each visit into scratch that
  // stays in cache, so the forward does that instead and `data` stays empty.
  static constexpr int64_t kStreamReuse = 2;
  // Query tiles of at most kDirectRows rows (decoding) read K and V rows in place
  // (direct_scores, direct_pv) and use no packed tile at all; when every tile is that
  // short, nothing is packed.
  static constexpr int64_t kDirectRows = kGemmRows;
  bool streamed;
  bool all_direct;  // every query tile has at most kDirectRows rows
  // bfloat16 inputs on a CPU with AVX512_BF16 (cpu_bf16_dot): tiles hold bfloat16 pairs
  // for gemm_bf16_epilogue (pack_kv_tile_pairs) in the first half of each float tile.
  bool pairs = false;
  bool prefetch = false;  // direct tiles prefetch K / V rows (set by forward: kPrefetchMinBytes)

  PackedKV(const AttentionParams& p, int64_t q_tile)
      : dp(round_up(p.head_dim, gemm_col_align<C>())), dvp(round_up(p.head_dim_v, gemm_col_align<C>())),
        kt_elems(dp * kBlockK), v_elems(kBlockK * dvp), base(p.batch + 1, 0) {
    int64_t max_sq = 0;
    for (int64_t b = 0; b < p.batch; ++b) {
      base[b + 1] = base[b] + p.heads_kv * nkb(p.seq_k(b));
      max_sq = std::max(max_sq, p.seq_q(b));
    }
    const int64_t group = p.heads / p.heads_kv;
    all_direct = max_sq <= kDirectRows;
    streamed = group * ((max_sq + q_tile - 1) / q_tile) <= kStreamReuse || all_direct;
    if (!streamed) data = HostBuffer(size_t(base[p.batch] * (kt_elems + v_elems)) * sizeof(C));
  }
  static int64_t nkb(int64_t sk) { return (sk + kBlockK - 1) / kBlockK; }
  C* kt(int64_t b, int64_t hk, int64_t sk, int64_t kb) {
    return data.as<C>() + (base[b] + hk * nkb(sk) + kb) * (kt_elems + v_elems);
  }
  C* v(int64_t b, int64_t hk, int64_t sk, int64_t kb) { return kt(b, hk, sk, kb) + kt_elems; }
};

// Row j of (sequence s, kv head hk) of a (batch, token, head, dim) key or value array.
template <typename T>
inline const T* kv_row(const void* base, const int64_t (&stride)[3], const SeqHead& s, int64_t hk, int64_t j) {
  return static_cast<const T*>(base) + s.b * stride[0] + (s.tk + j) * stride[1] + hk * stride[2];
}

// Packs key block kb of (sequence s, kv head hk): K^T (dp x kBlockK) into kt, V (kBlockK x
// dvp) into v; `rows` is kBlockK x dp scratch.
template <typename T, typename C>
void pack_kv_tile(const AttentionParams& p, const SeqHead& s, int64_t hk, int64_t kb, int64_t dp, int64_t dvp, C* rows,
                  C* kt, C* v) {
  const int64_t j0 = kb * kBlockK, cols = std::min(kBlockK, s.sk - j0);
  const T* k = kv_row<T>(p.k, p.k_stride, s, hk, j0);
  const T* vs = kv_row<T>(p.v, p.v_stride, s, hk, j0);
  pack_rows<T, C>(k, p.k_stride[1], cols, p.head_dim, C(1), rows, kBlockK, dp);
  transpose<C>(rows, kBlockK, dp, dp, kt, kBlockK);
  pack_rows<T, C>(vs, p.v_stride[1], cols, p.head_dim_v, C(1), v, kBlockK, dvp);
}

// The bfloat16 pair layouts of gemm_bf16_epilogue (kHaveBf16Gemm), 32-bit lanes holding
// two bfloat16 values of the reduction dimension. Query rows: lane d of row r holds
// elements 2d, 2d + 1 of query r (its bfloat16 row as it lies); the softmax scale is
// applied to the product instead, so no rounding is added to q.
// The same memory as 32-bit pair lanes (const stays const).
template <typename X>
inline auto as_lanes(X* x) {
  using U = std::conditional_t<std::is_const_v<X>, const uint32_t, uint32_t>;
  return reinterpret_cast<U*>(x);
}
inline uint32_t bf16_pair(const bf16_t* row, int64_t i, int64_t n) {  // elements i, i + 1 (0 past n)
  return (i < n ? uint32_t(row[i].bits) : 0u) | (i + 1 < n ? uint32_t(row[i + 1].bits) << 16 : 0u);
}

// pack_rows for the pair layout: rows [0, n) of dim elements, zero padded to `rows` rows
// of ld2 lanes.
inline void pack_rows_pairs(const bf16_t* src, int64_t stride, int64_t n, int64_t dim, uint32_t* dst, int64_t rows,
                            int64_t ld2) {
  for (int64_t r = 0; r < rows; ++r) {
    uint32_t* d = dst + r * ld2;
    std::fill(d, d + ld2, 0u);
    if (r < n) std::memcpy(d, src + r * stride, size_t(dim) * sizeof(bf16_t));
  }
}

// Transposed pairs of rows [0, n) of a strided (token, dim) bfloat16 matrix x: lane (d, c)
// of out (dp / 2 x kBlockK lanes) holds x[c][2d], x[c][2d + 1], zero past n rows and dim
// columns (K^T for Q K^T, V^T for dO V^T).
inline void pack_t_pairs(const bf16_t* x, int64_t stride, int64_t n, int64_t dim, int64_t dp, uint32_t* out) {
  const int64_t full = dim / 2;
  for (int64_t c = 0; c < kBlockK; ++c) {
    if (c >= n) {
      for (int64_t d = 0; d < dp / 2; ++d) out[d * kBlockK + c] = 0u;
      continue;
    }
    const bf16_t* row = x + c * stride;
    for (int64_t d = 0; d < full; ++d) std::memcpy(out + d * kBlockK + c, row + 2 * d, 4);  // pairs as they lie
    for (int64_t d = full; d < dp / 2; ++d) out[d * kBlockK + c] = bf16_pair(row, 2 * d, dim);
  }
}

// Row pairs of rows [0, n) of a strided (token, dim) bfloat16 matrix x: lane (c, e) of out
// (npairs x ld lanes) holds x[2c][e], x[2c + 1][e], zero past n rows and dim columns (V for
// P V, K for dS K, Q and dO for the backward's dS^T Q and P^T dO).
inline void pack_interleaved_pairs(const bf16_t* x, int64_t stride, int64_t n, int64_t dim, int64_t ld, int64_t npairs,
                                   uint32_t* out) {
  for (int64_t c = 0; c < npairs; ++c) {
    uint32_t* o = out + c * ld;
    const uint16_t* r0 = 2 * c < n ? &x[2 * c * stride].bits : nullptr;
    const uint16_t* r1 = 2 * c + 1 < n ? &x[(2 * c + 1) * stride].bits : nullptr;
    if (r1)
      for (int64_t e = 0; e < dim; ++e) o[e] = uint32_t(r0[e]) | uint32_t(r1[e]) << 16;
    else if (r0)
      for (int64_t e = 0; e < dim; ++e) o[e] = r0[e];
    else
      std::fill(o, o + dim, 0u);
    std::fill(o + dim, o + ld, 0u);
  }
}

// pack_kv_tile for the pair layouts: K^T (pack_t_pairs) into kt and V (kBlockK / 2 x dvp
// lanes, pack_interleaved_pairs) into v.
template <typename T>
void pack_kv_tile_pairs(const AttentionParams& p, const SeqHead& s, int64_t hk, int64_t kb, int64_t dp, int64_t dvp,
                        uint32_t* kt, uint32_t* v) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    const int64_t j0 = kb * kBlockK, cols = std::min(kBlockK, s.sk - j0);
    pack_t_pairs(kv_row<T>(p.k, p.k_stride, s, hk, j0), p.k_stride[1], cols, p.head_dim, dp, kt);
    pack_interleaved_pairs(kv_row<T>(p.v, p.v_stride, s, hk, j0), p.v_stride[1], cols, p.head_dim_v, dvp, kBlockK / 2,
                           v);
  }
}

template <typename T, typename C>
void pack_kv(const AttentionParams& p, PackedKV<C>& kv, int64_t b, int64_t hk, std::vector<C>& rows) {
  const SeqHead s{b, p.seq_q(b), p.seq_k(b), p.tok_q(b), p.tok_k(b)};
  rows.resize(size_t(kBlockK * kv.dp));
  for (int64_t kb = 0; kb * kBlockK < s.sk; ++kb)
    if (kv.pairs)
      pack_kv_tile_pairs<T>(p, s, hk, kb, kv.dp, kv.dvp, as_lanes(kv.kt(b, hk, s.sk, kb)),
                            as_lanes(kv.v(b, hk, s.sk, kb)));
    else
      pack_kv_tile<T, C>(p, s, hk, kb, kv.dp, kv.dvp, rows.data(), kv.kt(b, hk, s.sk, kb), kv.v(b, hk, s.sk, kb));
}

// Direct tiles (decoding) handle keys in groups of kDirectGroup: the score pass takes W of
// them per transpose_sum, the P.V pass accumulates 32 keys per load and store of each
// output chunk (their V rows, at most 32 KiB, stay in L1).
constexpr int64_t kDirectGroup = 32;

// Per-thread forward scratch, kept across calls (thread_local): a decoding step is a few
// microseconds of work per head, and allocating and zeroing ~100 KiB of tiles per call cost
// as much. Nothing relies on its contents: every buffer is written before it is read, and
// `zero` is never written.
template <typename C>
struct ForwardScratch {
  std::vector<C> q, s, o, m, l;  // l: one vector of partial sums per row
  std::vector<int32_t> raw;       // plain tiles: per row, the first column the epilogue left raw
  // Packed per visit (PackedKV::streamed): one key tile. Direct tiles: the K and V rows of one
  // tile converted to C (kBlockK x dp / dvp), only for rows that cannot be read in place.
  std::vector<C> rows, kt, v;
  // Direct tiles: kBlockK row pointers per kv head of the item, to rows of the input dtype
  // (read in place) or of C (converted into kt / v).
  std::vector<const void*> krows, vrows;
  std::vector<C> zero;                 // direct tiles: a zero row (padding keys)
  std::vector<uint16_t> pb;            // pair tiles: P rounded to bfloat16 (kBlockQ x kBlockK)
  Visits visits;

  // nkv: kv heads per work item (direct tiles of a decoding call may stack several).
  static ForwardScratch& get(int64_t dp, int64_t dvp, bool packs, bool k_copy, bool v_copy, int64_t nkv,
                             bool pairs) {
    thread_local ForwardScratch w;
    if (pairs) grow(w.pb, kBlockQ * kBlockK);
    grow(w.q, kBlockQ * dp), grow(w.s, kBlockQ * kBlockK), grow(w.o, kBlockQ * dvp);
    grow(w.m, kBlockQ), grow(w.l, kBlockQ * Vec<C>::N), grow(w.raw, kBlockQ), grow(w.zero, std::max(dp, dvp));
    grow(w.krows, nkv * kBlockK), grow(w.vrows, nkv * kBlockK);
    if (packs) grow(w.rows, kBlockK * dp);
    grow(w.kt, std::max(packs ? dp * kBlockK : 0, k_copy ? nkv * kBlockK * dp : 0));
    grow(w.v, std::max(packs ? kBlockK * dvp : 0, v_copy ? nkv * kBlockK * dvp : 0));
    return w;
  }

 private:
  template <typename X>
  static void grow(std::vector<X>& x, int64_t n) {
    if (int64_t(x.size()) < n) x.resize(size_t(n));
  }
};

// Row pointers of keys [j0, j0 + cols) of (sequence s, kv heads hk .. hk + nkv) of a K or
// V array, rows of np elements: where they lie (rows of the input dtype T, read and
// converted by vload_as) when in_place (!row_copy), else their conversion to C with a
// zero tail in buf (head i's rows at buf + i kBlockK np; kBlockK x np each); head i's pointers at
// rows + i kBlockK. Pointers from cols up to the next multiple of kDirectGroup point at
// `zero` (zero bytes: a zero row of T or C). Conversions walk the keys outermost, so the
// rows of all nkv heads (adjacent in a (batch, seq, heads, dim) array) are read in memory
// order: one head at a time over the whole tile read each token's row in pieces a head
// apart (a bfloat16 decoding step over 4096 keys at B = 1, H = 8, D = 64 took 650 us,
// against 430 us for float32 rows read in place in this order).
template <typename T, typename C>
void direct_rows(const void* base, const int64_t (&stride)[3], const SeqHead& s, int64_t hk, int64_t nkv, int64_t j0,
                 int64_t n, int64_t np, bool in_place, C* buf, const C* zero, const void** rows) {
  const int64_t cols = std::min(kBlockK, s.sk - j0);
  const T* r0 = kv_row<T>(base, stride, s, hk, j0);
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t i = 0; i < nkv; ++i) {
      const T* r = r0 + c * stride[1] + i * stride[2];
      if (in_place) {
        rows[i * kBlockK + c] = r;
        continue;
      }
      C* d = buf + (i * kBlockK + c) * np;
      load_row<T, C>(r, d, n);
      std::fill(d + n, d + np, C(0));
      rows[i * kBlockK + c] = d;
    }
  for (int64_t i = 0; i < nkv; ++i)
    for (int64_t c = cols; c < round_up(cols, kDirectGroup); ++c) rows[i * kBlockK + c] = zero;
}

// Half-precision lanes of one float vector (namespace scope: GCC drops vector_size on
// typedefs that depend on a template parameter).
typedef uint16_t HalfBitsVec __attribute__((vector_size(kVecBytes / 2)));
typedef uint32_t FloatBitsVec __attribute__((vector_size(kVecBytes)));

// One vector of C from Vec<C>::N consecutive elements of R (a row read in place: the
// input dtype, or C itself), converted in registers (half formats: C is float).
template <typename R, typename C>
inline typename Vec<C>::type vload_as(const R* p) {
  using V = typename Vec<C>::type;
  if constexpr (std::is_same<R, C>::value) {
    return vload(p);
  } else if constexpr (std::is_same<R, bf16_t>::value) {
    static_assert(std::is_same<C, float>::value, "bfloat16 rows convert to float");
#if defined(__AVX512F__)
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
    HalfBitsVec h;
    std::memcpy(&h, p, sizeof(h));
    const FloatBitsVec w = __builtin_convertvector(h, FloatBitsVec) << 16;
#endif
    V v;
    std::memcpy(&v, &w, sizeof(v));
    return v;
  } else {
    static_assert(std::is_same<R, half_t>::value && std::is_same<C, float>::value, "float16 rows convert to float");
    // F16C (GCC converts a _Float16 vector one element at a time without AVX512-FP16).
#if defined(__AVX512F__)
    const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(__AVX__)
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    V f;
    for (int i = 0; i < Vec<C>::N; ++i) f[i] = float(p[i]);
#endif
    V v;
    std::memcpy(&v, &f, sizeof(v));
    return v;
  }
}

// Whether direct tiles read rows of T in place (vload_as): C rows, bfloat16 (widened by a
// shift at every ISA level) and float16 where F16C converts a vector at once; else they
// convert each row into scratch first.
template <typename T, typename C>
constexpr bool rows_in_place() {
#if defined(__F16C__)
  return true;
#else
  return !std::is_same<T, half_t>::value;
#endif
}

// Whether direct tiles convert rows of n elements of T into scratch C rows of np elements
// (else they read them in place).
template <typename T, typename C>
constexpr bool row_copy(int64_t n, int64_t np) {
  return !rows_in_place<T, C>() || n != np;
}

// When a work item reads a small part of each token's K / V rows (one head of many: rows
// of one head lie heads x D elements apart), the hardware prefetcher, which stops at page
// boundaries, does not follow, so the score pass asks for the key rows kPrefetchRows ahead,
// and for the value rows of the keys it scores (read by the P.V pass after the softmax),
// itself. Measured at B = 1, H = 8, D = 64 with one head per item: ~2.7x at S = 16384
// (64 MiB of K/V) on a 2-core AMD EPYC; on a 2-core Intel Xeon whose L2 holds 2 MiB the
// prefetches cost 10-20% while K/V fit in its caches (S <= 4096) and are neutral at
// S = 16384. Items that read whole token rows (all kv heads, or (B, H, S, D)-strided
// input) stream in memory order, and prefetching them cost ~15% at S = 16384 on the
// Xeon. So prefetches are issued only when the call's K/V exceed kPrefetchMinBytes and
// an item reads less than half of each token's row. A prefetch past the end of the array
// is harmless (no fault).
constexpr int64_t kPrefetchRows = 32;
constexpr double kPrefetchMinBytes = 16.0 * (1 << 20);
inline void prefetch_rows(const void* p, int64_t stride_bytes, int64_t count, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t r = 0; r < count; ++r, c += stride_bytes)
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}

// S[r][c] = q_r . k_c for the R (<= kBlockQ) query rows of a direct tile and its keys:
// rows [i rpk, (i + 1) rpk) belong to kv head hk + i, whose row pointers (direct_rows) are
// krows[i kBlockK ...]. W keys at a time, W vector accumulators summed by one
// transpose_sum; the keys of a group are scored for every row (every head of the item)
// before the next group, so a decoding step over all heads reads K in memory order.
// Entries past `cols` (up to the group) are scores against zero rows; finish_scores masks
// them.
template <typename T, typename C, typename Row>
void direct_scores(const AttentionParams& p, const SeqHead& s, int64_t hk, int64_t nkv, int64_t j0, int64_t R,
                   int64_t rpk, const C* qs, int64_t dp, const void* const* krows, C* S, bool prefetch) {
  using V = typename Vec<C>::type;
  constexpr int W = Vec<C>::N;
  const int64_t cols = std::min(kBlockK, s.sk - j0);
  const char* kraw = reinterpret_cast<const char*>(kv_row<T>(p.k, p.k_stride, s, hk, j0));
  const char* vraw = reinterpret_cast<const char*>(kv_row<T>(p.v, p.v_stride, s, hk, j0));
  const int64_t ks = p.k_stride[1] * int64_t(sizeof(T)), vs = p.v_stride[1] * int64_t(sizeof(T));
  const int64_t khs = p.k_stride[2] * int64_t(sizeof(T)), vhs = p.v_stride[2] * int64_t(sizeof(T));
  for (int64_t c0 = 0; c0 < cols; c0 += W) {
    if (prefetch)
      for (int64_t i = 0; i < nkv; ++i) {
        prefetch_rows(kraw + i * khs + (c0 + kPrefetchRows) * ks, ks, W, p.head_dim * int64_t(sizeof(T)));
        prefetch_rows(vraw + i * vhs + c0 * vs, vs, std::min<int64_t>(W, cols - c0),
                      p.head_dim_v * int64_t(sizeof(T)));
      }
    for (int64_t r = 0; r < R; ++r) {
      const C* q = qs + r * dp;
      const void* const* kr = krows + (r / rpk) * kBlockK + c0;
      V acc[W];
      for (int c = 0; c < W; ++c) acc[c] = V{};
      for (int64_t d = 0; d < dp; d += W) {
        const V qv = vload(q + d);
#pragma GCC unroll 16
        for (int c = 0; c < W; ++c) acc[c] += qv * vload_as<Row, C>(static_cast<const Row*>(kr[c]) + d);
      }
      vstore(S + r * kBlockK + c0, transpose_sum<C>(acc));
    }
  }
}

// o[d0, d0 + NV W) += sum_c p[c] v_c[...] over n keys (n even), with two sets of
// accumulators (even and odd keys) so 2 NV multiply-adds are independent.
template <typename C, typename Row, int NV>
inline void pv_chunk(const void* const* vrows, const C* pr, int64_t n, int64_t d0, C* o) {
  using V = typename Vec<C>::type;
  constexpr int W = Vec<C>::N;
  V a[NV], b[NV];
  for (int i = 0; i < NV; ++i) a[i] = vload(o + d0 + i * W), b[i] = V{};
  for (int64_t c = 0; c < n; c += 2) {
    const V p0 = V{} + pr[c], p1 = V{} + pr[c + 1];
    const Row* v0 = static_cast<const Row*>(vrows[c]) + d0;
    const Row* v1 = static_cast<const Row*>(vrows[c + 1]) + d0;
    for (int i = 0; i < NV; ++i) {
      a[i] += p0 * vload_as<Row, C>(v0 + i * W);
      b[i] += p1 * vload_as<Row, C>(v1 + i * W);
    }
  }
  for (int i = 0; i < NV; ++i) vstore(o + d0 + i * W, a[i] + b[i]);
}

// O[r] += sum_c P[r][c] v_c for the R rows of a direct tile (rows grouped by kv head as in
// direct_scores, vrows from direct_rows, dvp a multiple of gemm_col_align), kDirectGroup keys
// per pass over each output row, 4 vectors of it at a time and the rest (AVX2's column
// alignment is 2 vectors) 2 at a time; a row whose probabilities in a group are all 0
// (masked) skips it.
template <typename C, typename Row>
void direct_pv(int64_t cols, int64_t R, int64_t rpk, const C* P, int64_t dvp, const void* const* vrows, C* O) {
  constexpr int W = Vec<C>::N;
  for (int64_t c0 = 0; c0 < cols; c0 += kDirectGroup) {
    for (int64_t r = 0; r < R; ++r) {
      const C* pr = P + r * kBlockK + c0;
      bool any = false;
      for (int64_t c = 0; c < kDirectGroup; ++c) any |= pr[c] != C(0);
      if (!any) continue;
      C* o = O + r * dvp;
      const void* const* vr = vrows + (r / rpk) * kBlockK + c0;
      int64_t d0 = 0;
      for (; d0 + 4 * W <= dvp; d0 += 4 * W) pv_chunk<C, Row, 4>(vr, pr, kDirectGroup, d0, o);
      static_assert(kGemmCols % 2 == 0, "dvp must be a multiple of 2 vectors");
      for (; d0 < dvp; d0 += 2 * W) pv_chunk<C, Row, 2>(vr, pr, kDirectGroup, d0, o);
    }
  }
}

// KV heads whose query heads one work item of nh query heads covers (nh > group only for
// decoding items that stack whole GQA groups).
inline int64_t item_kv_heads(const AttentionParams& p, int64_t nh) {
  return std::max<int64_t>(1, nh / (p.heads / p.heads_kv));
}

// A key range [begin, end) (multiples of kBlockK) of a decoding call split over its keys:
// forward_block then leaves the unnormalized output rows and their running max and sum in
// o (R rows of dvp), m and l (R each), for merge_splits.
template <typename C>
struct KeySplit {
  int64_t begin, end;
  C *o, *m, *l;
};

// One query tile [i0, i0 + rows) of `nh` query heads h0, h0 + 1, .... nh > 1 only for
// decoding calls (every tile direct) with a dense mask: the heads' rows are stacked (row
// g * rows + r is query i0 + r of head h0 + g), nh either a divisor of the GQA group (each
// K / V row is read once for the group) or a multiple of it (the item spans nh / group kv
// heads and reads their rows together, in memory order). Each row's arithmetic is that of
// its head alone. `split` (decoding calls over many keys) restricts the keys and leaves
// partial results for merge_splits.
// Scores of a plain tile may exceed their row's running maximum m by up to kLazyMax
// before m is raised: up to that margin the epilogue takes P = exp(S - m) with the old m
// (P <= e^8, so l and O stay far from overflow) and the row needs no rescaling. Softmax is
// shift invariant, so out = O / l and lse = m + log l are exact with any such m
// (FlashAttention-4 rescales lazily the same way).
template <typename C>
constexpr C kLazyMax = C(8);

// Epilogue of the Q K^T GEMM of a plain tile, on register tile rows m0.., columns n0..
// (column blocks of a row come in increasing n0): while a row's scores stay within
// m + kLazyMax, P = exp(S - m) is stored and summed into the row's vector l; from the
// first column block with a larger score the row's scores are stored raw and raw[row]
// holds that block's first column, for the general online-softmax step after the GEMM.
// raw[row] = kBlockK: no raw column. A row with no key seen yet (m = -inf) takes the max
// of its first block as m, so a query block's first tile is exponentiated here too.
template <typename C, int R>
inline void scores_exp_epilogue(int64_t m0, int64_t n0, GemmTile<C, R>& acc, C* m, C* l, int32_t* raw, C* S) {
  using V = typename Vec<C>::type;
  constexpr int W = Vec<C>::N;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int64_t row = m0 + r;
    if (n0 == 0) raw[row] = int32_t(kBlockK);
    C* out = S + row * kBlockK + n0;
    V mx = acc[r][0];
#pragma GCC unroll 4
    for (int c = 1; c < kGemmCols; ++c) mx = acc[r][c] > mx ? acc[r][c] : mx;
    if (raw[row] == kBlockK && m[row] == neg_inf<C>()) m[row] = hmax<C>(mx);
    if (raw[row] < kBlockK || m[row] == neg_inf<C>() || any_greater<C>(mx, m[row] + kLazyMax<C>)) {
      if (raw[row] == kBlockK) raw[row] = int32_t(n0);
#pragma GCC unroll 4
      for (int c = 0; c < kGemmCols; ++c) vstore(out + c * W, acc[r][c]);
      continue;
    }
    V sum = V{};
#pragma GCC unroll 4
    for (int c = 0; c < kGemmCols; ++c) {
      const V e = exp_vec(acc[r][c] - m[row]);
      vstore(out + c * W, e);
      sum += e;
    }
    vstore(l + row * W, vload(l + row * W) + sum);
  }
}

template <typename T, typename C>
void forward_block(const AttentionParams& p, PackedKV<C>& kv, const SeqHead& s, int64_t h0, int64_t nh, int64_t qb,
                   ForwardScratch<C>& w, const KeySplit<C>* split = nullptr) {
  using V = typename Vec<C>::type;
  constexpr int W = Vec<C>::N;
  const int64_t D = p.head_dim, Dv = p.head_dim_v, dp = kv.dp, dvp = kv.dvp;
  const int64_t group = p.heads / p.heads_kv, hk = h0 / group, nkv = item_kv_heads(p, nh);
  const int64_t tq = query_tile(p), i0 = qb * tq, rows = std::min(tq, s.sq - i0), R = nh * rows;
  auto slope = [&](int64_t g) { return p.alibi_slopes ? p.alibi_slopes[s.b * p.alibi_batch_stride + h0 + g] : 0.f; };
  // Rows past `rows` are zero padding: the products skip them, down to the GEMM's row
  // granularity (a decoding step with one query computes 4 rows, not kBlockQ); direct
  // tiles compute their rows alone.
  const int64_t mrows = round_up(rows, kGemmRows);
  // Decided by the tile alone, so a sequence gets the same bits in a varlen batch as alone.
  const bool direct = rows <= PackedKV<C>::kDirectRows;
  // Direct tiles read K / V rows of T in place (else they convert them into scratch).
  const bool k_in_place = !row_copy<T, C>(D, dp), v_in_place = !row_copy<T, C>(Dv, dvp);
  const int64_t qrows = direct ? rows : mrows, R_pad = direct ? R : mrows;
  const int64_t rpk = std::min(nh, group) * rows;  // stacked rows per kv head
  const bool prefetch = kv.prefetch && p.k_stride[1] > 2 * nkv * D;  // (kPrefetchMinBytes)
  // Packed tiles of bfloat16 pairs (kv.pairs): Q K^T and P V run on gemm_bf16_epilogue, with
  // P rounded to bfloat16 for P V as FlashAttention's GPU kernels do; direct tiles keep
  // reading rows in place. q rows and K / V tiles then hold pairs (qp, reinterpreted).
  constexpr bool kPairs = kHaveBf16Gemm && std::is_same_v<T, bf16_t> && std::is_same_v<C, float>;
  const bool pairs = kPairs && kv.pairs && !direct;
  uint32_t* qp = as_lanes(w.q.data());
  for (int64_t g = 0; g < nh; ++g) {
    const T* q = static_cast<const T*>(p.q) + s.b * p.q_stride[0] + (s.tq + i0) * p.q_stride[1] +
                 (h0 + g) * p.q_stride[2];
    if constexpr (kPairs)
      if (pairs) {
        pack_rows_pairs(q, p.q_stride[1], rows, D, qp + g * rows * (dp / 2), qrows, dp / 2);
        continue;
      }
    pack_rows<T, C>(q, p.q_stride[1], rows, D, C(p.scale), w.q.data() + g * rows * dp, qrows, dp);
  }
  std::fill(w.o.begin(), w.o.begin() + R_pad * dvp, C(0));
  std::fill(w.m.begin(), w.m.begin() + R_pad, neg_inf<C>());
  std::fill(w.l.begin(), w.l.begin() + R_pad * W, C(0));

  if (split)
    tile_visits(p, s, h0, i0, rows, w.visits, split->begin, split->end);
  else
    tile_visits(p, s, h0, i0, rows, w.visits);
  for (const Visit& visit : w.visits.list) {
    const int64_t kb = visit.j0 / kBlockK;
    const C* kt = kv.streamed ? w.kt.data() : kv.kt(s.b, hk, s.sk, kb);
    const C* vt = kv.streamed ? w.v.data() : kv.v(s.b, hk, s.sk, kb);
    if (direct) {
      direct_rows<T, C>(p.k, p.k_stride, s, hk, nkv, visit.j0, D, dp, k_in_place, w.kt.data(), w.zero.data(),
                        w.krows.data());
      direct_rows<T, C>(p.v, p.v_stride, s, hk, nkv, visit.j0, Dv, dvp, v_in_place, w.v.data(), w.zero.data(),
                        w.vrows.data());
      if (k_in_place)
        direct_scores<T, C, T>(p, s, hk, nkv, visit.j0, R, rpk, w.q.data(), dp, w.krows.data(), w.s.data(), prefetch);
      else
        direct_scores<T, C, C>(p, s, hk, nkv, visit.j0, R, rpk, w.q.data(), dp, w.krows.data(), w.s.data(), prefetch);
    } else if (kv.streamed) {
      if (pairs)
        pack_kv_tile_pairs<T>(p, s, hk, kb, dp, dvp, as_lanes(w.kt.data()),
                              as_lanes(w.v.data()));
      else
        pack_kv_tile<T, C>(p, s, hk, kb, dp, dvp, w.rows.data(), w.kt.data(), w.v.data());
    }
    // Plain tiles (every column a visible key, scores needing nothing after Q K^T) take
    // exp inside the GEMM (scores_exp_epilogue); rows it leaves raw are flagged in w.raw.
    const bool plain = !direct && plain_tile(p, s, visit);
    C* S = w.s.data();
    auto exp_epi = [&](int64_t m0, int64_t n0, auto& acc) {
      scores_exp_epilogue(m0, n0, acc, w.m.data(), w.l.data(), w.raw.data(), S);
    };
    if (pairs) {
      if constexpr (kPairs) {
        const uint32_t* ktp = as_lanes(kt);
        if (plain)
          gemm_bf16_epilogue<false>(mrows, kBlockK, (D + 1) / 2, qp, dp / 2, ktp, kBlockK, nullptr, 0, float(p.scale),
                                    exp_epi);
        else
          gemm_bf16_epilogue<false>(mrows, kBlockK, (D + 1) / 2, qp, dp / 2, ktp, kBlockK, nullptr, 0, float(p.scale),
                                    [&](int64_t m0, int64_t n0, auto& acc) { store_tile(acc, S + m0 * kBlockK + n0, kBlockK); });
      }
    } else if (plain) {
      gemm_epilogue<C, false, false>(mrows, kBlockK, D, w.q.data(), dp, kt, kBlockK, S, kBlockK, exp_epi);
    } else if (!direct) {
      gemm<C>(mrows, kBlockK, D, w.q.data(), dp, kt, kBlockK, S, kBlockK);
    }
    if (!plain)
      for (int64_t g = 0; g < nh; ++g)
        finish_scores<C>(p, s, slope(g), i0, rows, visit, w.s.data() + g * rows * kBlockK, nullptr);

    // Online softmax (Milakov & Gimelshein 2018): rescale the running sum and output by
    // exp(m_old - m_new) whenever the row maximum grows. Row sums are kept as vectors of
    // partial sums (w.l: one vector per row), reduced once at the end.
    for (int64_t r = 0; r < R; ++r) {
      // Columns [0, f) hold P = exp(S - m) already summed into l (a plain tile's epilogue);
      // [f, kBlockK) hold scores.
      const int64_t f = plain ? w.raw[r] : 0;
      if (f == kBlockK) continue;
      C* row = w.s.data() + r * kBlockK;
      const C mx = row_max<C>(row + f, kBlockK - f, w.m[r]);
      if (mx == neg_inf<C>()) {  // nothing visible yet in this row (so f = 0)
        std::fill(row, row + kBlockK, C(0));
        continue;
      }
      const C alpha = w.m[r] == neg_inf<C>() ? C(0) : std::exp(w.m[r] - mx);
      if (alpha != C(1))
        for (int64_t c = 0; c < f; ++c) row[c] *= alpha;
      const V sum = exp_shifted<C>(row + f, kBlockK - f, mx);
      C* lr = w.l.data() + r * W;
      vstore(lr, vload(lr) * alpha + sum);
      w.m[r] = mx;
      if (alpha != C(1)) {
        C* orow = w.o.data() + r * dvp;
        for (int64_t d = 0; d < Dv; ++d) orow[d] *= alpha;
      }
    }
    if (direct) {
      const int64_t cols = std::min(kBlockK, s.sk - visit.j0);
      if (v_in_place)
        direct_pv<C, T>(cols, R, rpk, w.s.data(), dvp, w.vrows.data(), w.o.data());
      else
        direct_pv<C, C>(cols, R, rpk, w.s.data(), dvp, w.vrows.data(), w.o.data());
    } else {
      for (int64_t r = rows; r < mrows; ++r) std::fill(w.s.data() + r * kBlockK, w.s.data() + (r + 1) * kBlockK, C(0));
      if (pairs) {
        if constexpr (kPairs) {
          floats_to_bf16(w.s.data(), mrows * kBlockK, w.pb.data());
          gemm_bf16_acc(mrows, dvp, kBlockK / 2, as_lanes(w.pb.data()), kBlockK / 2,
                        as_lanes(vt), dvp, w.o.data(), dvp);
        }
      } else {
        gemm_acc<C>(mrows, dvp, kBlockK, w.s.data(), kBlockK, vt, dvp, w.o.data(), dvp);
      }
    }
  }

  for (int64_t r = 0; r < R; ++r) w.l[r] = hsum<C>(vload(w.l.data() + r * W));  // in place: row r's vector is at r * W >= r
  if (split) {
    std::copy(w.o.begin(), w.o.begin() + R * dvp, split->o);
    std::copy(w.m.begin(), w.m.begin() + R, split->m);
    std::copy(w.l.begin(), w.l.begin() + R, split->l);
    return;
  }
  for (int64_t g = 0; g < nh; ++g) {
    const int64_t h = h0 + g;
    T* out = static_cast<T*>(p.out) + s.b * p.out_stride[0] + (s.tq + i0) * p.out_stride[1] + h * p.out_stride[2];
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t x = g * rows + r;
      C* orow = w.o.data() + x * dvp;
      const C inv = w.l[x] > C(0) ? C(1) / w.l[x] : C(0);
      for (int64_t d = 0; d < Dv; ++d) orow[d] *= inv;
      store_row<T, C>(orow, out + r * p.out_stride[1], Dv);
      if (p.lse)
        p.lse[s.b * p.lse_stride[0] + h * p.lse_stride[1] + (s.tq + i0 + r) * p.lse_stride[2]] =
            w.l[x] > C(0) ? float(w.m[x] + std::log(w.l[x])) : -std::numeric_limits<float>::infinity();
    }
  }
}

// Decoding calls (every query tile direct) with a dense mask split the keys of each
// sequence of 2 kSplitKeys keys or more into ranges of at least kSplitKeys keys (multiples
// of kBlockK, at most kMaxSplits ranges), computed as separate work items and merged
// (merge_splits): one sequence then runs on several threads, whatever its batch and head
// counts. The ranges depend on the sequence's length alone, so a sequence gets the same
// bits in any batch and with any thread count.
constexpr int64_t kSplitKeys = 512;
constexpr int64_t kMaxSplits = 64;
inline int64_t split_len(int64_t sk) {
  if (sk <= kSplitKeys) return std::max<int64_t>(sk, 1);
  const int64_t n = std::min(kMaxSplits, sk / kSplitKeys);
  return round_up((sk + n - 1) / n, kBlockK);
}
inline int64_t num_splits(int64_t sk) { return (std::max<int64_t>(sk, 1) + split_len(sk) - 1) / split_len(sk); }

// At most this many kv heads per decoding work item (bounds the per-thread scratch of
// converted rows: kBlockK x dp per kv head).
constexpr int64_t kMaxItemKvHeads = 16;

// Query heads per forward work item: 1, or for decoding calls with a dense mask (every tile
// direct) the largest divisor d of heads with d x max_sq <= kBlockQ rows that is a divisor
// or a multiple (of at most kMaxItemKvHeads kv heads) of the GQA group, halved while there
// are fewer items than threads. `units`: work items per head-item (sequences x key splits).
inline int64_t heads_per_item(const AttentionParams& p, int64_t max_sq, bool all_direct, int64_t units) {
  if (p.sparse || !all_direct) return 1;
  const int64_t group = p.heads / p.heads_kv, cap = kBlockQ / std::max<int64_t>(max_sq, 1);
  auto ok = [&](int64_t d) {
    return p.heads % d == 0 && d <= cap &&
           (group % d == 0 || (d % group == 0 && d / group <= kMaxItemKvHeads));
  };
  int64_t nh = 1;
  for (int64_t d = 1; d <= std::min(p.heads, cap); ++d)
    if (ok(d)) nh = d;
  while (nh % 2 == 0 && ok(nh / 2) && units * (p.heads / nh) < num_threads()) nh /= 2;
  return nh;
}

// Partial results of a split decoding call: per (key range, head item) a slot of R rows
// (row g * sq + r: query r of head h0 + g), o of dvp entries per row, m and l.
template <typename C>
struct SplitParts {
  std::vector<int64_t> base;  // per sequence: its first key range (global index)
  int64_t slot_rows = 0, nhi = 0, dvp = 0;
  HostBuffer o, ml;
  C* o_at(int64_t range, int64_t hi) { return o.as<C>() + (range * nhi + hi) * slot_rows * dvp; }
  C* m_at(int64_t range, int64_t hi) { return ml.as<C>() + (range * nhi + hi) * slot_rows * 2; }
  C* l_at(int64_t range, int64_t hi) { return m_at(range, hi) + slot_rows; }
};

// out / lse of (sequence s, head h) from its key ranges' partial results:
// m = max_r m_r, l = sum_r l_r exp(m_r - m), out = sum_r o_r exp(m_r - m) / l.
template <typename T, typename C>
void merge_splits(const AttentionParams& p, SplitParts<C>& parts, const SeqHead& s, int64_t h, int64_t nh,
                  std::vector<C>& acc) {
  const int64_t Dv = p.head_dim_v, n = num_splits(s.sk), hi = h / nh, g = h % nh;
  acc.resize(size_t(Dv));
  for (int64_t r = 0; r < s.sq; ++r) {
    const int64_t x = g * s.sq + r;
    C mx = neg_inf<C>();
    for (int64_t k = 0; k < n; ++k) mx = std::max(mx, parts.m_at(parts.base[s.b] + k, hi)[x]);
    std::fill(acc.begin(), acc.end(), C(0));
    C l = 0;
    if (mx != neg_inf<C>()) {
      for (int64_t k = 0; k < n; ++k) {
        const int64_t range = parts.base[s.b] + k;
        const C m = parts.m_at(range, hi)[x];
        if (m == neg_inf<C>()) continue;
        const C f = std::exp(m - mx);
        l += parts.l_at(range, hi)[x] * f;
        const C* o = parts.o_at(range, hi) + x * parts.dvp;
        for (int64_t d = 0; d < Dv; ++d) acc[size_t(d)] += f * o[d];
      }
    }
    const C inv = l > C(0) ? C(1) / l : C(0);
    for (int64_t d = 0; d < Dv; ++d) acc[size_t(d)] *= inv;
    T* out = static_cast<T*>(p.out) + s.b * p.out_stride[0] + (s.tq + r) * p.out_stride[1] + h * p.out_stride[2];
    store_row<T, C>(acc.data(), out, Dv);
    if (p.lse)
      p.lse[s.b * p.lse_stride[0] + h * p.lse_stride[1] + (s.tq + r) * p.lse_stride[2]] =
          l > C(0) ? float(mx + std::log(l)) : -std::numeric_limits<float>::infinity();
  }
}

template <typename T, typename C>
void forward(const AttentionParams& p) {
  const int64_t tq = query_tile(p), nqb = (p.seqlen_q + tq - 1) / tq;
  PackedKV<C> kv(p, tq);
  kv.pairs = kHaveBf16Gemm && std::is_same_v<T, bf16_t> && cpu_bf16_dot();
  double kv_bytes = 0;
  for (int64_t b = 0; b < p.batch; ++b)
    kv_bytes += double(p.seq_k(b)) * double(p.heads_kv) * double(p.head_dim + p.head_dim_v) * double(sizeof(T));
  kv.prefetch = kv_bytes > kPrefetchMinBytes;
  if (!kv.streamed)
    parallel_for(p.batch * p.heads_kv, 1, [&](int64_t i0, int64_t i1) {
      std::vector<C> rows;
      for (int64_t i = i0; i < i1; ++i) pack_kv<T, C>(p, kv, i / p.heads_kv, i % p.heads_kv, rows);
    });
  int64_t max_sq = 0;
  for (int64_t b = 0; b < p.batch; ++b) max_sq = std::max(max_sq, p.seq_q(b));
  // A call of less than kSerialMacs multiply-adds (at most: masks only remove work) runs on
  // the calling thread: even with the pool's workers awake (polling after their last job),
  // handing out chunks cost more than the arithmetic of a decoding step over 256 keys x 8
  // heads (2.6e5 multiply-adds: 23 us alone, 34 us on 2 threads; at 5.2e5, 70 / 44 us).
  constexpr double kSerialMacs = 4e5;
  const double macs = double(p.batch) * double(p.heads) * double(max_sq) * double(p.seqlen_k) *
                      double(p.head_dim + p.head_dim_v);
  const bool serial = macs < kSerialMacs;
  auto scratch = [&](int64_t nh) -> ForwardScratch<C>& {
    return ForwardScratch<C>::get(kv.dp, kv.dvp, kv.streamed && !kv.all_direct, row_copy<T, C>(p.head_dim, kv.dp),
                                  row_copy<T, C>(p.head_dim_v, kv.dvp),
                                  item_kv_heads(p, nh), kv.pairs && !kv.all_direct);
  };

  if (kv.all_direct && !p.sparse) {  // decoding: work items (sequence, head item, key range)
    SplitParts<C> parts;
    parts.base.assign(size_t(p.batch + 1), 0);
    for (int64_t b = 0; b < p.batch; ++b) parts.base[b + 1] = parts.base[b] + num_splits(p.seq_k(b));
    const int64_t ranges = parts.base[p.batch];
    const int64_t nh = heads_per_item(p, max_sq, true, ranges), nhi = p.heads / nh;
    const bool split = ranges > p.batch;
    if (split) {
      parts.slot_rows = nh * max_sq, parts.nhi = nhi, parts.dvp = kv.dvp;
      parts.o = HostBuffer(size_t(ranges * nhi * parts.slot_rows * kv.dvp) * sizeof(C));
      parts.ml = HostBuffer(size_t(ranges * nhi * parts.slot_rows * 2) * sizeof(C));
    }
    const int64_t items = ranges * nhi;
    parallel_for(items, serial ? items : 1, [&](int64_t item0, int64_t item1) {
      ForwardScratch<C>& w = scratch(nh);
      for (int64_t item = item0; item < item1; ++item) {
        const int64_t range = item / nhi, hi = item % nhi;
        const int64_t b = std::upper_bound(parts.base.begin(), parts.base.end(), range) - parts.base.begin() - 1;
        const SeqHead s{b, p.seq_q(b), p.seq_k(b), p.tok_q(b), p.tok_k(b)};
        if (s.sq == 0) continue;
        if (!split) {
          forward_block<T, C>(p, kv, s, hi * nh, nh, 0, w);
          continue;
        }
        const int64_t len = split_len(s.sk), k = range - parts.base[b];
        const KeySplit<C> ks{k * len, (k + 1) * len, parts.o_at(range, hi), parts.m_at(range, hi),
                             parts.l_at(range, hi)};
        forward_block<T, C>(p, kv, s, hi * nh, nh, 0, w, &ks);
      }
    });
    // The merge reads ranges x heads x max_sq rows of dvp: a few microseconds, on this
    // thread, unless the batch is large.
    const bool merge_serial = double(ranges) * double(p.heads) * double(max_sq) * double(kv.dvp) < 1e6;
    if (split)
      parallel_for(p.batch * p.heads, merge_serial ? p.batch * p.heads : 1, [&](int64_t i0, int64_t i1) {
        std::vector<C> acc;
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = i / p.heads, h = i % p.heads;
          const SeqHead s{b, p.seq_q(b), p.seq_k(b), p.tok_q(b), p.tok_k(b)};
          merge_splits<T, C>(p, parts, s, h, nh, acc);
        }
      });
    return;
  }

  const int64_t items = p.batch * p.heads * nqb;
  parallel_for(items, serial ? items : 1, [&](int64_t item0, int64_t item1) {
    ForwardScratch<C>& w = scratch(1);
    for (int64_t item = item0; item < item1; ++item) {
      const int64_t qb = item % nqb, h = (item / nqb) % p.heads, b = item / (nqb * p.heads);
      const SeqHead s{b, p.seq_q(b), p.seq_k(b), p.tok_q(b), p.tok_k(b)};
      if (qb * tq >= s.sq) continue;
      forward_block<T, C>(p, kv, s, h, 1, qb, w);
    }
  });
}

// Row log-sum-exps of the scores of query rows [i0, i0 + rows), by an online pass over the
// packed K^T blocks (kt: all blocks of the sequence). Rows with no visible key get -inf.
template <typename C>
void exact_lse(const AttentionParams& p, const SeqHead& s, float slope, int64_t i0, int64_t rows, const Visits& visits,
               const C* qs, int64_t dp, const C* kt, C* S, C* lse) {
  C m[kBlockQ], l[kBlockQ];
  std::fill(m, m + kBlockQ, neg_inf<C>());
  std::fill(l, l + kBlockQ, C(0));
  for (const Visit& visit : visits.list) {
    gemm<C>(kBlockQ, kBlockK, p.head_dim, qs, dp, kt + (visit.j0 / kBlockK) * dp * kBlockK, kBlockK, S, kBlockK);
    finish_scores<C>(p, s, slope, i0, rows, visit, S, nullptr);
    for (int64_t r = 0; r < rows; ++r) {
      C* row = S + r * kBlockK;
      const C mx = row_max<C>(row, kBlockK, m[r]);
      if (mx == neg_inf<C>()) continue;
      const C alpha = m[r] == neg_inf<C>() ? C(0) : std::exp(m[r] - mx);
      l[r] = l[r] * alpha + exp_shifted_sum(row, kBlockK, mx);
      m[r] = mx;
    }
  }
  for (int64_t r = 0; r < rows; ++r) lse[r] = l[r] > C(0) ? m[r] + std::log(l[r]) : neg_inf<C>();
}

// P = exp(S - lse) for a plain tile (see forward_block) of the backward, taken on each
// register tile of the Q K^T GEMM; rows with lse = -inf (no visible key, or padding) get 0.
template <typename C>
struct ProbsEpilogue {
  const C* lse;
  C* P;
  template <typename Tile>
  void operator()(int64_t m0, int64_t n0, Tile& acc) const {
    using V = typename Vec<C>::type;
    constexpr int W = Vec<C>::N;
#pragma GCC unroll 8
    for (int r = 0; r < tile_rows<Tile>; ++r) {
      C* out = P + (m0 + r) * kBlockK + n0;
      const C shift = lse[m0 + r];
#pragma GCC unroll 4
      for (int c = 0; c < kGemmCols; ++c) vstore(out + c * W, shift == neg_inf<C>() ? V{} : exp_vec(acc[r][c] - shift));
    }
  }
};

// dS = P * (dO V^T - delta), the softmax backward taken on each register tile of the dP
// GEMM (no softcap: its factor 1 - tanh^2 needs the tile's tanh values).
template <typename C>
struct DScoresEpilogue {
  const C* P;
  const C* delta;
  C* dS;
  template <typename Tile>
  void operator()(int64_t m0, int64_t n0, Tile& acc) const {
    constexpr int W = Vec<C>::N;
#pragma GCC unroll 8
    for (int r = 0; r < tile_rows<Tile>; ++r) {
      const int64_t at = (m0 + r) * kBlockK + n0;
      const C dl = delta[m0 + r];
#pragma GCC unroll 4
      for (int c = 0; c < kGemmCols; ++c) vstore(dS + at + c * W, vload(P + at + c * W) * (acc[r][c] - dl));
    }
  }
};

template <typename C>
__attribute__((noinline)) void probs_gemm(int64_t D, const C* qs, int64_t dp, const C* kt, const C* lse, C* P) {
  gemm_epilogue<C, false, false>(kBlockQ, kBlockK, D, qs, dp, kt, kBlockK, P, kBlockK, ProbsEpilogue<C>{lse, P});
}

template <typename C>
__attribute__((noinline)) void dscores_gemm(int64_t Dv, const C* dout, int64_t dvp, const C* vt, const C* P,
                                            const C* delta, C* dS) {
  gemm_epilogue<C, false, false>(kBlockQ, kBlockK, Dv, dout, dvp, vt, kBlockK, dS, kBlockK,
                                 DScoresEpilogue<C>{P, delta, dS});
}

template <typename T, typename C>
void backward_item(const AttentionGradParams& g, int64_t b, int64_t hk) {
  const AttentionParams& p = g.fwd;
  const SeqHead s{b, p.seq_q(b), p.seq_k(b), p.tok_q(b), p.tok_k(b)};
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  const int64_t dp = round_up(D, gemm_col_align<C>()), dvp = round_up(Dv, gemm_col_align<C>());
  const int64_t group = p.heads / p.heads_kv;
  const int64_t skp = round_up(s.sk, kBlockK) + kBlockK;
  // The per-sequence buffers come from the host cache (long sequences: several MiB each).
  HostBuffer dk_buf(size_t(skp * dp) * sizeof(C)), dv_buf(size_t(skp * dvp) * sizeof(C));
  C* const dk_acc = dk_buf.as<C>();
  C* const dv_acc = dv_buf.as<C>();
  std::fill(dk_acc, dk_acc + skp * dp, C(0));
  std::fill(dv_acc, dv_acc + skp * dvp, C(0));
  std::vector<C> qs(kBlockQ * dp), dout(kBlockQ * dvp), dq_acc(kBlockQ * dp);
  Visits visits;
  std::vector<C> S(kBlockQ * kBlockK), T_(kBlockQ * kBlockK), dP(kBlockQ * kBlockK), orow(dvp), lse(kBlockQ),
      delta(kBlockQ), vrows(kBlockK * dvp);
  // bfloat16 inputs on a CPU with AVX512_BF16 (see forward_block): the five products run on
  // gemm_bf16_epilogue over pair layouts, P and dS rounded to bfloat16 where they are
  // operands, as FlashAttention's GPU backward does. K / V tiles and qs then hold pairs; qi
  // and douti hold q and dO as pairs of rows (for dS^T Q and P^T dO), doutp dO's rows as
  // pairs (for dO V^T), pi P or dS as pairs of rows, dsb dS rounded (for dS K). The scale
  // multiplies the Q K^T tile and dK at the end instead of q.
  constexpr bool kPairs = kHaveBf16Gemm && std::is_same_v<T, bf16_t> && std::is_same_v<C, float>;
  const bool pairs = kPairs && cpu_bf16_dot();
  std::vector<uint32_t> qi(pairs ? kBlockQ / 2 * dp : 0), doutp(pairs ? kBlockQ * dvp / 2 : 0),
      douti(pairs ? kBlockQ / 2 * dvp : 0), pi(pairs ? kBlockQ / 2 * kBlockK : 0);
  std::vector<uint16_t> dsb(pairs ? kBlockQ * kBlockK : 0);
  // Rows 2i and 2i + 1 of a kBlockQ x kBlockK float tile as row i of pi.
  auto interleave_rows = [&](const C* x) {
    if constexpr (kPairs)
      for (int64_t i = 0; i < kBlockQ / 2; ++i)
        bf16_interleave_rows(x + 2 * i * kBlockK, x + (2 * i + 1) * kBlockK, kBlockK, pi.data() + i * kBlockK);
  };
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + s.tk * p.k_stride[1] + hk * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + s.tk * p.v_stride[1] + hk * p.v_stride[2];
  // Every key block of this kv head, packed once for all query heads and blocks: K rows
  // (for dQ = dS K), K^T (for S = Q K^T) and V^T (for dP = dO V^T).
  const int64_t nkb = (s.sk + kBlockK - 1) / kBlockK;
  HostBuffer kp_buf(size_t(nkb * kBlockK * dp) * sizeof(C)), kt_buf(size_t(nkb * dp * kBlockK) * sizeof(C)),
      vt_buf(size_t(nkb * dvp * kBlockK) * sizeof(C));
  C* const kp = kp_buf.as<C>();
  C* const kt = kt_buf.as<C>();
  C* const vt = vt_buf.as<C>();
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t j0 = kb * kBlockK, cols = std::min(kBlockK, s.sk - j0);
    C* kpb = kp + kb * kBlockK * dp;
    if (pairs) {
      if constexpr (kPairs) {
        pack_t_pairs(k + j0 * p.k_stride[1], p.k_stride[1], cols, D, dp, as_lanes(kt + kb * dp * kBlockK));
        pack_interleaved_pairs(k + j0 * p.k_stride[1], p.k_stride[1], cols, D, dp, kBlockK / 2, as_lanes(kpb));
        pack_t_pairs(v + j0 * p.v_stride[1], p.v_stride[1], cols, Dv, dvp, as_lanes(vt + kb * dvp * kBlockK));
      }
      continue;
    }
    pack_rows<T, C>(k + j0 * p.k_stride[1], p.k_stride[1], cols, D, C(1), kpb, kBlockK, dp);
    transpose<C>(kpb, kBlockK, dp, dp, kt + kb * dp * kBlockK, kBlockK);
    pack_rows<T, C>(v + j0 * p.v_stride[1], p.v_stride[1], cols, Dv, C(1), vrows.data(),
                    kBlockK, dvp);
    transpose<C>(vrows.data(), kBlockK, dvp, dvp, vt + kb * dvp * kBlockK, kBlockK);
  }

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    const int64_t tq = query_tile(p);
    for (int64_t i0 = 0; i0 < s.sq; i0 += tq) {
      const int64_t rows = std::min(tq, s.sq - i0);
      tile_visits(p, s, h, i0, rows, visits);
      const bool any = !visits.list.empty();
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + (s.tq + i0) * p.q_stride[1] + h * p.q_stride[2];
      const T* o = static_cast<const T*>(p.out) + b * p.out_stride[0] + (s.tq + i0) * p.out_stride[1] + h * p.out_stride[2];
      const T* dO = static_cast<const T*>(g.dout) + b * g.dout_stride[0] + (s.tq + i0) * g.dout_stride[1] +
                    h * g.dout_stride[2];
      T* dq = static_cast<T*>(g.dq) + b * g.dq_stride[0] + (s.tq + i0) * g.dq_stride[1] + h * g.dq_stride[2];
      std::fill(dq_acc.begin(), dq_acc.end(), C(0));
      if (any) {
        if (pairs) {
          if constexpr (kPairs) {
            pack_rows_pairs(q, p.q_stride[1], rows, D, as_lanes(qs.data()), kBlockQ, dp / 2);
            pack_interleaved_pairs(q, p.q_stride[1], rows, D, dp, kBlockQ / 2, qi.data());
            pack_rows_pairs(dO, g.dout_stride[1], rows, Dv, doutp.data(), kBlockQ, dvp / 2);
            pack_interleaved_pairs(dO, g.dout_stride[1], rows, Dv, dvp, kBlockQ / 2, douti.data());
          }
        } else {
          pack_rows<T, C>(q, p.q_stride[1], rows, D, C(p.scale), qs.data(), kBlockQ, dp);
        }
        pack_rows<T, C>(dO, g.dout_stride[1], rows, Dv, C(1), dout.data(), kBlockQ, dvp);
        for (int64_t r = 0; r < kBlockQ; ++r) {
          if (r >= rows) {
            lse[r] = neg_inf<C>();
            delta[r] = 0;
            continue;
          }
          // delta_i = rowsum(dO_i * O_i), the softmax-backward correction term.
          load_row<T, C>(o + r * p.out_stride[1], orow.data(), Dv);
          C acc = 0;
          for (int64_t d = 0; d < Dv; ++d) acc += orow[d] * dout[r * dvp + d];
          const int64_t li = b * p.lse_stride[0] + h * p.lse_stride[1] + (s.tq + i0 + r) * p.lse_stride[2];
          if constexpr (!std::is_same<C, double>::value) lse[r] = C(p.lse[li]);
          // d lse_i / d s_ij = P_ij, so an lse gradient enters as dS += P * dlse.
          // (Rows with lse = -inf have P = 0, so their delta never matters.)
          delta[r] = g.dlse ? acc - C(g.dlse[li]) : acc;
        }
      }
      if constexpr (std::is_same<C, double>::value) {
        // The saved lse is float32 (the public format); float64 gradients need it exact, so
        // recompute it here with one extra pass over the scores.
        if (any) exact_lse<C>(p, s, slope, i0, rows, visits, qs.data(), dp, kt, S.data(), lse.data());
      }
      for (const Visit& visit : visits.list) {
        const int64_t j0 = visit.j0, cols = std::min(kBlockK, s.sk - j0);
        const int64_t kb = j0 / kBlockK;
        const C* ktb = kt + kb * dp * kBlockK;
        const C* kpb = kp + kb * kBlockK * dp;
        const C* vtb = vt + kb * dvp * kBlockK;
        // S = Q K^T on the pair layouts, each register tile going to epi.
        auto pair_scores = [&](auto&& epi) {
          if constexpr (kPairs)
            gemm_bf16_epilogue<false>(kBlockQ, kBlockK, (D + 1) / 2, as_lanes(qs.data()), dp / 2, as_lanes(ktb), kBlockK,
                                      nullptr, 0, float(p.scale), epi);
        };
        // P = exp(S - lse); rows with lse = -inf are 0. Plain tiles take exp inside the GEMM.
        if (plain_tile(p, s, visit)) {
          if (pairs)
            pair_scores(ProbsEpilogue<C>{lse.data(), S.data()});
          else
            probs_gemm<C>(D, qs.data(), dp, ktb, lse.data(), S.data());
        } else {
          if (pairs)
            pair_scores([&](int64_t m0, int64_t n0, auto& acc) { store_tile(acc, S.data() + m0 * kBlockK + n0, kBlockK); });
          else
            gemm<C>(kBlockQ, kBlockK, D, qs.data(), dp, ktb, kBlockK, S.data(), kBlockK);
          finish_scores<C>(p, s, slope, i0, rows, visit, S.data(), p.softcap > 0.f ? T_.data() : nullptr);
          for (int64_t r = 0; r < kBlockQ; ++r) {
            C* row = S.data() + r * kBlockK;
            if (lse[r] == neg_inf<C>()) {
              std::fill(row, row + kBlockK, C(0));
              continue;
            }
            exp_shifted_sum(row, kBlockK, lse[r]);
          }
        }
        // dV += P^T dO (P read transposed in place)
        if (pairs) {
          if constexpr (kPairs) {
            interleave_rows(S.data());
            gemm_bf16_acc<true>(kBlockK, dvp, kBlockQ / 2, pi.data(), kBlockK, douti.data(), dvp, dv_acc + j0 * dvp,
                                dvp);
          }
        } else {
          gemm_tn_acc<C>(kBlockK, dvp, kBlockQ, S.data(), kBlockK, dout.data(), dvp, dv_acc + j0 * dvp, dvp);
        }
        // dP = dO V^T; dS = P * (dP - delta), times d(softcap)/ds = 1 - tanh^2
        auto pair_dp = [&](auto&& epi) {
          if constexpr (kPairs)
            gemm_bf16_epilogue<false>(kBlockQ, kBlockK, (Dv + 1) / 2, doutp.data(), dvp / 2, as_lanes(vtb), kBlockK,
                                      nullptr, 0, 1.0f, epi);
        };
        if (!(p.softcap > 0.f)) {
          if (pairs)
            pair_dp(DScoresEpilogue<C>{S.data(), delta.data(), dP.data()});
          else
            dscores_gemm<C>(Dv, dout.data(), dvp, vtb, S.data(), delta.data(), dP.data());
        } else {
          if (pairs)
            pair_dp([&](int64_t m0, int64_t n0, auto& acc) { store_tile(acc, dP.data() + m0 * kBlockK + n0, kBlockK); });
          else
            gemm<C>(kBlockQ, kBlockK, Dv, dout.data(), dvp, vtb, kBlockK, dP.data(), kBlockK);
          for (int64_t r = 0; r < kBlockQ; ++r)
            for (int64_t c = 0; c < kBlockK; ++c) {
              const C t = c < cols && r < rows ? T_[r * kBlockK + c] : C(0);
              dP[r * kBlockK + c] = S[r * kBlockK + c] * (dP[r * kBlockK + c] - delta[r]) * (C(1) - t * t);
            }
        }
        // dQ += dS K (scale applied at the end); dK += dS^T (scale * Q) (pairs: dS^T Q, scaled
        // at the end)
        if (pairs) {
          if constexpr (kPairs) {
            floats_to_bf16(dP.data(), kBlockQ * kBlockK, dsb.data());
            gemm_bf16_acc(kBlockQ, dp, kBlockK / 2, as_lanes(dsb.data()), kBlockK / 2, as_lanes(kpb), dp, dq_acc.data(), dp);
            interleave_rows(dP.data());
            gemm_bf16_acc<true>(kBlockK, dp, kBlockQ / 2, pi.data(), kBlockK, qi.data(), dp, dk_acc + j0 * dp, dp);
          }
        } else {
          gemm_acc<C>(kBlockQ, dp, kBlockK, dP.data(), kBlockK, kpb, dp, dq_acc.data(), dp);
          gemm_tn_acc<C>(kBlockK, dp, kBlockQ, dP.data(), kBlockK, qs.data(), dp, dk_acc + j0 * dp, dp);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        C* row = dq_acc.data() + r * dp;
        for (int64_t d = 0; d < D; ++d) row[d] *= C(p.scale);
        store_row<T, C>(row, dq + r * g.dq_stride[1], D);
      }
    }
  }
  T* dk = static_cast<T*>(g.dk) + b * g.dk_stride[0] + s.tk * g.dk_stride[1] + hk * g.dk_stride[2];
  T* dv = static_cast<T*>(g.dv) + b * g.dv_stride[0] + s.tk * g.dv_stride[1] + hk * g.dv_stride[2];
  for (int64_t j = 0; j < s.sk; ++j) {
    if (pairs)
      for (int64_t d = 0; d < D; ++d) dk_acc[j * dp + d] *= C(p.scale);
    store_row<T, C>(dk_acc + j * dp, dk + j * g.dk_stride[1], D);
    store_row<T, C>(dv_acc + j * dvp, dv + j * g.dv_stride[1], Dv);
  }
}

template <typename T, typename C>
void backward(const AttentionGradParams& g, int64_t item0, int64_t item1) {
  for (int64_t item = item0; item < item1; ++item)
    backward_item<T, C>(g, item / g.fwd.heads_kv, item % g.fwd.heads_kv);
}

}  // namespace

void attention_forward(const AttentionParams& p) {
  switch (p.dtype) {
    case DType::Float32: return forward<float, float>(p);
    case DType::Float64: return forward<double, double>(p);
    case DType::Float16: return forward<half_t, float>(p);
    case DType::BFloat16: return forward<bf16_t, float>(p);
    default: break;
  }
}

void attention_backward_items(const AttentionGradParams& g, int64_t i0, int64_t i1) {
  switch (g.fwd.dtype) {
    case DType::Float32: return backward<float, float>(g, i0, i1);
    case DType::Float64: return backward<double, double>(g, i0, i1);
    case DType::Float16: return backward<half_t, float>(g, i0, i1);
    case DType::BFloat16: return backward<bf16_t, float>(g, i0, i1);
    default: break;
  }
}

}  // namespace LONGATTN_ISA_NS
}  // namespace cpu
}  // namespace longattn
