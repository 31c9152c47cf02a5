// Portable SIMD for the CPU kernels: GCC/Clang vector extensions sized for the ISA level a
// translation unit is compiled for (64 bytes with AVX-512, 32 with AVX2, 16 otherwise),
// a register-blocked GEMM micro-kernel and a vectorized exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#ifndef LONGATTN_ISA_NS
#error "include only from kernel sources compiled per ISA level (LONGATTN_ISA_NS)"
#endif

namespace longattn {
namespace cpu {
// Per ISA namespace: these inline templates differ between the ISA levels (vector width,
// F16C), so sharing one mangled name across the per-ISA objects would be an ODR violation
// and the linker would keep a single (e.g. the baseline SSE) copy for every level.
namespace LONGATTN_ISA_NS {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename C>
struct Vec {
  static constexpr int N = kVecBytes / int(sizeof(C));
  typedef C type __attribute__((vector_size(kVecBytes)));
};

template <typename C>
inline typename Vec<C>::type vload(const C* p) {
  typename Vec<C>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename C>
inline void vstore(C* p, typename Vec<C>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// GEMM tiles: rows of C by kGemmCols vectors held in registers. Callers pad M to a
// multiple of kGemmRows; the loops take kGemmTileRows rows at a time where they fit and
// kGemmRows at the end. The tile is as large as the vector registers allow with the B
// vectors and one broadcast A value beside it: AVX-512's 32 registers hold 4 x 4
// accumulators; AVX2's and SSE's 16 hold 6 x 2 (4 x 4 there would keep two accumulators
// on the stack, and each k step would then wait on a store and a reload).
constexpr int kGemmRows = 4;
constexpr int kGemmCols = kVecBytes == 64 ? 4 : 2;
constexpr int kGemmTileRows = kVecBytes == 64 ? 4 : 6;
template <typename C>
constexpr int64_t gemm_col_align() {
  return int64_t(kGemmCols) * Vec<C>::N;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A register tile of R rows (kGemmTileRows or kGemmRows) by kGemmCols vectors.
template <typename C, int R>
using GemmTile = typename Vec<C>::type[R][kGemmCols];

// The row count of a GemmTile (or a reference to one), for epilogues written for either:
// tile_rows<decltype(tile)>.
template <typename Tile>
constexpr int tile_rows = int(std::extent<std::remove_reference_t<Tile>>::value);

// Stores a register tile at out (rows ld apart).
template <typename C, int R>
inline void store_tile(const GemmTile<C, R>& acc, C* out, int64_t ld) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kGemmCols; ++c) vstore(out + r * ld + c * Vec<C>::N, acc[r][c]);
}

// Rows [0, gemm_wide_rows(M)) of an M-row product (M a multiple of kGemmRows) go in tiles
// of kGemmTileRows rows, the rest in tiles of kGemmRows.
inline int64_t gemm_wide_rows(int64_t M) {
  int64_t wide = M / kGemmTileRows * kGemmTileRows;
  while (wide > 0 && (M - wide) % kGemmRows != 0) wide -= kGemmTileRows;
  return wide;
}

// One register tile of gemm_epilogue: rows m0..m0 + R, columns n0..n0 + kGemmCols vectors.
// Not inlined, so the k loop gets the registers to itself whatever the caller (inlined into
// the attention forward, the 6-row tile kept a third of its accumulators on the stack).
template <typename C, int R, bool Accumulate, bool TransA, typename Epilogue>
__attribute__((noinline)) void gemm_tile(int64_t m0, int64_t n0, int64_t K, const C* A, int64_t lda, const C* B, int64_t ldb,
                      const C* Cm, int64_t ldc, Epilogue& epi) {
  using V = typename Vec<C>::type;
  constexpr int W = Vec<C>::N;
  constexpr int NC = kGemmCols;
  V acc[R][NC];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) acc[r][c] = Accumulate ? vload(Cm + (m0 + r) * ldc + n0 + c * W) : V{};
  const C* a = TransA ? A + m0 : A + m0 * lda;
  const C* b = B + n0;
  for (int64_t k = 0; k < K; ++k) {
    V bv[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) bv[c] = vload(b + k * ldb + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const C av = TransA ? a[k * lda + r] : a[r * lda + k];
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) acc[r][c] += av * bv[c];
    }
  }
  epi(m0, n0, acc);
}

// Cm[M x N] (+)= A[M x K] * B[K x N], all row-major packed buffers (Accumulate: add to Cm;
// otherwise overwrite it). M must be a multiple of kGemmRows and N of gemm_col_align<C>()
// (callers pad with zeros), so the tile loops need no edge handling. Every element is one
// k-ordered sum, so the result does not depend on the tiling.
// TransA: A is stored transposed, K x M row-major (lda = its row length), so C += A^T B
// needs no transposed copy.
// gemm_epilogue: the same, but each finished register tile (rows m0.., columns n0..) goes
// to epi(m0, n0, tile) instead of being stored, so a caller can transform it while it is
// still in registers (the attention forward takes exp of the scores there). The tile is a
// GemmTile<C, kGemmTileRows> or a GemmTile<C, kGemmRows>: epilogues take `auto& tile`.
template <typename C, bool Accumulate, bool TransA, typename Epilogue>
inline void gemm_epilogue(int64_t M, int64_t N, int64_t K, const C* A, int64_t lda, const C* B, int64_t ldb,
                          const C* Cm, int64_t ldc, Epilogue&& epi) {
  const int64_t wide = gemm_wide_rows(M);
  for (int64_t n0 = 0; n0 < N; n0 += kGemmCols * Vec<C>::N) {
    for (int64_t m0 = 0; m0 < wide; m0 += kGemmTileRows)
      gemm_tile<C, kGemmTileRows, Accumulate, TransA>(m0, n0, K, A, lda, B, ldb, Cm, ldc, epi);
    if constexpr (kGemmTileRows != kGemmRows)
      for (int64_t m0 = wide; m0 < M; m0 += kGemmRows)
        gemm_tile<C, kGemmRows, Accumulate, TransA>(m0, n0, K, A, lda, B, ldb, Cm, ldc, epi);
  }
}

// Not inlined: inlined into the large attention loops, its accumulators and their operands
// no longer fit the registers and get spilled (fma with a stack operand).
template <typename C, bool Accumulate = true, bool TransA = false>
__attribute__((noinline)) void gemm_acc(int64_t M, int64_t N, int64_t K, const C* A, int64_t lda, const C* B,
                                        int64_t ldb, C* Cm, int64_t ldc) {
  gemm_epilogue<C, Accumulate, TransA>(M, N, K, A, lda, B, ldb, Cm, ldc,
                                       [&](int64_t m0, int64_t n0, auto& acc) { store_tile(acc, Cm + m0 * ldc + n0, ldc); });
}

// Cm += A^T * B with A stored K x M (see gemm_acc).
template <typename C>
inline void gemm_tn_acc(int64_t M, int64_t N, int64_t K, const C* A, int64_t lda, const C* B, int64_t ldb, C* Cm,
                        int64_t ldc) {
  gemm_acc<C, true, true>(M, N, K, A, lda, B, ldb, Cm, ldc);
}

// Cm = A * B (see gemm_acc).
template <typename C>
inline void gemm(int64_t M, int64_t N, int64_t K, const C* A, int64_t lda, const C* B, int64_t ldb, C* Cm,
                 int64_t ldc) {
  gemm_acc<C, false>(M, N, K, A, lda, B, ldb, Cm, ldc);
}

// ---- bfloat16 pair GEMM (AVX512_BF16) ---------------------------------------------------
// vdpbf16ps multiplies the two bfloat16 halves of each 32-bit lane of a by those of b and
// adds both products to the float lane of the accumulator: twice the multiply-adds of a
// float FMA per instruction (measured on a Zen 5 core: ~410 against ~228 GFLOP/s). The
// products of two bfloat16 values are exact in float, so Q K^T computed this way matches a
// float GEMM on the widened inputs up to the order of the additions.
// Operands are "pair" matrices: A (M x K2) and B (K2 x N) of 32-bit lanes, each holding
// the elements 2 k and 2 k + 1 of the reduction dimension (low half first), so
// C[m][n] = sum_k A[m][k].lo B[k][n].lo + A[m][k].hi B[k][n].hi.
// TransA: A is stored transposed, K2 x M lanes (lane (k, m) holds A's elements (m, 2k) and
// (m, 2k + 1)), as two rows of a float matrix interleaved by bf16_interleave_rows give it.
// Compiled into the AVX-512 level only, with the instruction enabled per function: the
// caller checks cpu_bf16_dot() at run time.
#if defined(__AVX512F__)
constexpr bool kHaveBf16Gemm = true;

// One register tile (R rows x kGemmCols vectors) of gemm_bf16_epilogue; the finished tile,
// times `scale` unless Accumulate, goes to epi as a GemmTile<float, R>. The twin of
// gemm_tile with vdpbf16ps on pair lanes for the multiply-add; kept apart rather than
// parameterized so each k loop stays a plain sequence of loads and one instruction kind.
template <int R, bool Accumulate, bool TransA, typename Epilogue>
__attribute__((noinline, target("avx512bf16"))) void gemm_bf16_tile(int64_t m0, int64_t n0, int64_t K2,
                                                                     const uint32_t* A, int64_t lda, const uint32_t* B,
                                                                     int64_t ldb, const float* Cm, int64_t ldc,
                                                                     float scale, Epilogue& epi) {
  constexpr int NC = kGemmCols, W = Vec<float>::N;
  __m512 acc[R][NC];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c)
      acc[r][c] = Accumulate ? _mm512_loadu_ps(Cm + (m0 + r) * ldc + n0 + c * W) : _mm512_setzero_ps();
  const uint32_t* a = TransA ? A + m0 : A + m0 * lda;
  const uint32_t* b = B + n0;
  for (int64_t k = 0; k < K2; ++k) {
    __m512i bv[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) bv[c] = _mm512_loadu_si512(b + k * ldb + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32(int32_t(TransA ? a[k * lda + r] : a[r * lda + k]));
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)av, (__m512bh)bv[c]);
    }
  }
  GemmTile<float, R> out;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) out[r][c] = Accumulate ? Vec<float>::type(acc[r][c]) : Vec<float>::type(acc[r][c]) * scale;
  epi(m0, n0, out);
}

// Cm[M x N] (+)= scale x A B for pair matrices A, B (see above), M a multiple of
// kGemmRows and N of gemm_col_align<float>(); each finished register tile goes to
// epi(m0, n0, tile) as in gemm_epilogue. (scale is not applied when accumulating.)
template <bool Accumulate, bool TransA = false, typename Epilogue>
inline void gemm_bf16_epilogue(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B,
                               int64_t ldb, const float* Cm, int64_t ldc, float scale, Epilogue&& epi) {
  for (int64_t n0 = 0; n0 < N; n0 += kGemmCols * Vec<float>::N)
    for (int64_t m0 = 0; m0 < M; m0 += kGemmTileRows)
      gemm_bf16_tile<kGemmTileRows, Accumulate, TransA>(m0, n0, K2, A, lda, B, ldb, Cm, ldc, scale, epi);
}

// Cm += A B for pair matrices, stored (see gemm_acc).
template <bool TransA = false>
inline void gemm_bf16_acc(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B,
                          int64_t ldb, float* Cm, int64_t ldc) {
  gemm_bf16_epilogue<true, TransA>(M, N, K2, A, lda, B, ldb, Cm, ldc, 1.0f, [&](int64_t m0, int64_t n0, auto& acc) {
    store_tile(acc, Cm + m0 * ldc + n0, ldc);
  });
}
static_assert(kGemmTileRows == kGemmRows, "the bfloat16 GEMM has no row tail");

// Rounds floats to bfloat16 (nearest even, NaN kept), n a multiple of 32.
__attribute__((target("avx512bf16"))) inline void floats_to_bf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 32) {
    const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(out + i, (__m512i)h);
  }
}

// out[c] = bfloat16(r0[c]) | bfloat16(r1[c]) << 16 (nearest even), n a multiple of 16: two
// rows of a float matrix as one row of the transposed pair layout (TransA above).
__attribute__((target("avx512bf16"))) inline void bf16_interleave_rows(const float* r0, const float* r1, int64_t n,
                                                                        uint32_t* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + i)));
    const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r1 + i)));
    _mm512_storeu_si512(out + i, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}
#else
constexpr bool kHaveBf16Gemm = false;
// Declared for code behind `if constexpr (kHaveBf16Gemm)`; never defined or called here.
template <bool Accumulate, bool TransA = false, typename Epilogue>
void gemm_bf16_epilogue(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B,
                        int64_t ldb, const float* Cm, int64_t ldc, float scale, Epilogue&& epi);
template <bool TransA = false>
void gemm_bf16_acc(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                   float* Cm, int64_t ldc);
void floats_to_bf16(const float* x, int64_t n, uint16_t* out);
void bf16_interleave_rows(const float* r0, const float* r1, int64_t n, uint32_t* out);
#endif

// transpose_sum: lane c of the result is the sum of the lanes of v[c], for W = Vec<C>::N
// vectors, in log2(W) levels of W / 2, W / 4, ... shuffle-and-add pairs (W - 1 pairs in all
// instead of W horizontal sums). Level S folds each S-lane block of a pair (a, b) into its
// halves: the block's first half becomes a's two halves summed, the second half b's. After
// the last level the lanes hold the inputs in bit-reversed order, so the inputs are taken in
// that order.
constexpr int bit_reverse(int i, int w) {
  int r = 0;
  for (int b = 1; b < w; b <<= 1, i >>= 1) r = (r << 1) | (i & 1);
  return r;
}

// Index into the concatenation (a, b) of lane i of one fold operand (upper: the halves that
// are added to the lower ones).
constexpr int fold_index(int i, int w, int s, bool upper) {
  const int h = s / 2, o = i / s * s, t = i % s;
  if (t < h) return upper ? o + h + t : o + t;
  return upper ? w + o + t : w + o + t - h;
}

template <typename V, int W, int S, std::size_t... I>
inline V fold_pair(V a, V b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, fold_index(int(I), W, S, false)...) +
         __builtin_shufflevector(a, b, fold_index(int(I), W, S, true)...);
}

template <typename V, int W, int S>
inline void fold_level(V* x) {  // S vectors in x[0..S) -> S / 2 in x[0..S / 2)
  for (int i = 0; i < S / 2; ++i) x[i] = fold_pair<V, W, S>(x[2 * i], x[2 * i + 1], std::make_index_sequence<W>{});
  if constexpr (S > 2) fold_level<V, W, S / 2>(x);
}

template <typename C>
inline typename Vec<C>::type transpose_sum(const typename Vec<C>::type* v) {
  using V = typename Vec<C>::type;
  constexpr int W = Vec<C>::N;
  V x[W];
  for (int i = 0; i < W; ++i) x[i] = v[bit_reverse(i, W)];
  fold_level<V, W, W>(x);
  return x[0];
}

// Horizontal reductions of one vector by halving: log2(W) shuffle-and-op steps, so the
// dependency chain is 4 operations deep for 16 lanes, not 15 as with a lane-by-lane loop.
template <typename V, int W, int H, std::size_t... I>
inline V upper_half(V v, std::index_sequence<I...>) {  // lane i < H gets lane i + H (the rest: don't care)
  return __builtin_shufflevector(v, v, int((I + H) % W)...);
}

template <typename C, typename Op>
inline C reduce_lanes(typename Vec<C>::type v, Op op) {
  using V = typename Vec<C>::type;
  constexpr int W = Vec<C>::N;
  if constexpr (W >= 16) v = op(v, upper_half<V, W, 8>(v, std::make_index_sequence<W>{}));
  if constexpr (W >= 8) v = op(v, upper_half<V, W, 4>(v, std::make_index_sequence<W>{}));
  if constexpr (W >= 4) v = op(v, upper_half<V, W, 2>(v, std::make_index_sequence<W>{}));
  if constexpr (W >= 2) v = op(v, upper_half<V, W, 1>(v, std::make_index_sequence<W>{}));
  return v[0];
}

template <typename C>
inline C hsum(typename Vec<C>::type v) {
  return reduce_lanes<C>(v, [](auto a, auto b) { return a + b; });
}

template <typename C>
inline C hmax(typename Vec<C>::type v) {
  return reduce_lanes<C>(v, [](auto a, auto b) { return a > b ? a : b; });
}

// max(init, x[0..n)) for n a multiple of the vector width.
template <typename C>
inline C row_max(const C* x, int64_t n, C init) {
  using V = typename Vec<C>::type;
  constexpr int W = Vec<C>::N;
  V m = V{} + init;
  for (int64_t i = 0; i < n; i += W) {
    const V v = vload(x + i);
    m = v > m ? v : m;
  }
  return hmax<C>(m);
}

// Whether some lane of a exceeds t.
template <typename C>
inline bool any_greater(typename Vec<C>::type a, C t) {
#if defined(__AVX512F__)
  if constexpr (sizeof(C) == 4)
    return _mm512_cmp_ps_mask(__m512(a), _mm512_set1_ps(t), _CMP_GT_OQ) != 0;
  else
    return _mm512_cmp_pd_mask(__m512d(a), _mm512_set1_pd(t), _CMP_GT_OQ) != 0;
#elif defined(__AVX__)
  if constexpr (sizeof(C) == 4)
    return _mm256_movemask_ps(_mm256_cmp_ps(__m256(a), _mm256_set1_ps(t), _CMP_GT_OQ)) != 0;
  else
    return _mm256_movemask_pd(_mm256_cmp_pd(__m256d(a), _mm256_set1_pd(t), _CMP_GT_OQ)) != 0;
#else
  bool any = false;
  for (int i = 0; i < Vec<C>::N; ++i) any |= a[i] > t;
  return any;
#endif
}

// min(max(v, lo), hi) lane by lane with NaN lanes left NaN, in two instructions: x86's
// max / min return their second operand when either is NaN (a compare and a blend per
// bound otherwise, which is what the portable form below compiles to).
inline Vec<float>::type clamp_keep_nan(Vec<float>::type v, float lo, float hi) {
#if defined(__AVX512F__)
  return Vec<float>::type(_mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), __m512(v))));
#elif defined(__AVX__)
  return Vec<float>::type(_mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), __m256(v))));
#elif defined(__SSE2__)
  return Vec<float>::type(_mm_min_ps(_mm_set1_ps(hi), _mm_max_ps(_mm_set1_ps(lo), __m128(v))));
#else
  v = v < lo ? Vec<float>::type{} + lo : v;
  return v > hi ? Vec<float>::type{} + hi : v;
#endif
}

// exp(v) lane by lane for float arguments v <= 88 (the softmax's are <= 0): Cody-Waite
// reduction v = k ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial (relative error below
// 2e-7), times 2^k. Arguments are clamped below at -88: k = round(-88 log2 e) = -127, and
// 2^k built in the exponent field is then 0, so -inf (and anything below about -87.7, where
// expf underflows anyway) comes out exactly 0 without a compare and select. (AVX-512's
// vscalefps would build 2^k in one instruction, but its results below 2^-126 are
// denormals, which cost microcode assists.)
inline Vec<float>::type exp_vec(Vec<float>::type v) {
  using V = Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(kVecBytes)));
  v = clamp_keep_nan(v, -88.0f, 88.0f);
  const V t = v * 1.44269504088896341f;
  const V kf = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  const V r = (v - kf * 0.693145751953125f) - kf * 1.42860682030941723212e-6f;
  V p = V{} + (1.0f / 5040);
  p = p * r + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI ki = __builtin_convertvector(kf, VI);
  const VI bits = (ki + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline Vec<double>::type exp_vec(Vec<double>::type v) {  // libm, lane by lane
  for (int i = 0; i < Vec<double>::N; ++i) v[i] = std::exp(v[i]);
  return v;
}

// x[i] = exp(x[i] - shift) for n entries (n a multiple of the vector width), -inf entries
// exactly 0; returns their sum as a vector of partial sums (hsum gives the total).
template <typename C>
inline typename Vec<C>::type exp_shifted(C* x, int64_t n, C shift) {
  using V = typename Vec<C>::type;
  constexpr int W = Vec<C>::N;
  V total = V{};
  for (int64_t i = 0; i < n; i += W) {
    const V res = exp_vec(vload(x + i) - shift);
    vstore(x + i, res);
    total += res;
  }
  return total;
}

// exp_shifted, returning the sum.
template <typename C>
inline C exp_shifted_sum(C* x, int64_t n, C shift) {
  return hsum<C>(exp_shifted<C>(x, n, shift));
}

}  // namespace LONGATTN_ISA_NS
}  // namespace cpu
}  // namespace longattn
