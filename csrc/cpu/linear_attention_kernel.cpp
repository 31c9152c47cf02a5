// Linear attention CPU kernels, chunked form (Yang et al. 2023, "Gated Linear Attention"),
// compiled once per ISA level like attention_kernel.cpp. One work item is one
// (sequence, head); the dispatcher in linear_attention.cpp runs items on the thread pool.
//
// Per chunk of L tokens with within-chunk inclusive cumulative log-decays b_i (b_i <= 0,
// b_i - b_j <= 0 for j <= i) and the state S entering the chunk (K x V', V' = V + 1 with
// the normalizer column):
//   A   = (Q K^T) .* D,  D_ij = exp(b_i - b_j) for j <= i, else 0
//   O   = A V + diag(exp(b)) Q S
//   S'  = exp(b_L) S + (diag(exp(b_L - b)) K)^T V
// Backward walks the chunks in reverse with the adjoint U of the state at the chunk end:
//   dA  = (dO V^T) .* D,  dQ = dA K + diag(exp(b)) dO S^T
//   dK  = dA^T Q + diag(exp(b_L - b)) V U^T,  dV = A^T dO + diag(exp(b_L - b)) K U
//   U'  = exp(b_L) U + (diag(exp(b)) Q)^T dO
// and the gradient of the cumulative log-decay of token i is q~_i.dq~_i - k~_i.dk~_i
// (plus <dS_T, S_T> at the last token), whose reverse cumulative sum is d log_decay.
// Operands are packed into zero-padded tiles so simd.h's gemm_acc runs without edges.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "convert.h"
#include "longattn/linear_attention.h"
#include "longattn/parallel.h"
#include "simd.h"

#ifndef LONGATTN_ISA_NS
#error "LONGATTN_ISA_NS must name the ISA level this unit is compiled for"
#endif

namespace longattn {
namespace cpu {
namespace LONGATTN_ISA_NS {
namespace {

constexpr double kNormEps = 1e-10;
// Causal sequences this short run the token recurrence in the forward (decoding steps).
constexpr int64_t kRecurrentMaxTokens = 8;

template <typename C>
inline C phi(FeatureMap f, C x) {
  switch (f) {
    case FeatureMap::Elu1: return x > C(0) ? x + C(1) : std::exp(x);
    case FeatureMap::Relu: return x > C(0) ? x : C(0);
    default: return x;
  }
}

template <typename C>
inline C dphi(FeatureMap f, C x) {
  switch (f) {
    case FeatureMap::Elu1: return x > C(0) ? C(1) : std::exp(x);
    case FeatureMap::Relu: return x > C(0) ? C(1) : C(0);
    default: return C(1);
  }
}

// Rows [0, n) of a strided (token, dim) matrix into a zero-padded rows x ld tile, with the
// feature map and a multiplier applied; `deriv` (optional, same layout) receives
// mul * phi'(x).
template <typename T, typename C>
void load_tile(const T* src, int64_t stride, int64_t n, int64_t dim, FeatureMap f, C mul, C* dst, int64_t rows,
               int64_t ld, C* deriv = nullptr) {
  std::fill(dst, dst + rows * ld, C(0));
  if (deriv) std::fill(deriv, deriv + rows * ld, C(0));
  for (int64_t r = 0; r < n; ++r) {
    C* d = dst + r * ld;
    load_row<T, C>(src + r * stride, d, dim);
    if (deriv) {
      C* e = deriv + r * ld;
      for (int64_t c = 0; c < dim; ++c) e[c] = mul * dphi(f, d[c]);
    }
    if (f != FeatureMap::Identity)
      for (int64_t c = 0; c < dim; ++c) d[c] = phi(f, d[c]);
    if (mul != C(1))
      for (int64_t c = 0; c < dim; ++c) d[c] *= mul;
  }
}

template <typename C>
void transpose(const C* src, int64_t rows, int64_t cols, int64_t ld_src, C* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// C = A B (C zeroed first); M, N padded as gemm_acc requires.
template <typename C>
inline void mm(int64_t M, int64_t N, int64_t K, const C* A, int64_t lda, const C* B, int64_t ldb, C* Cm, int64_t ldc) {
  for (int64_t r = 0; r < M; ++r) std::fill(Cm + r * ldc, Cm + r * ldc + N, C(0));
  if (K > 0) gemm_acc<C>(M, N, K, A, lda, B, ldb, Cm, ldc);
}

// C = A B for a chunk-square A (rows and inner dim < L used) that is lower triangular
// (A_ij = 0 for j > i): each block of kGemmRows rows stops its inner loop at the diagonal.
template <typename C>
inline void mm_lower(int64_t M, int64_t N, int64_t L, const C* A, int64_t lda, const C* B, int64_t ldb, C* Cm,
                     int64_t ldc) {
  for (int64_t r = 0; r < M; ++r) std::fill(Cm + r * ldc, Cm + r * ldc + N, C(0));
  for (int64_t m0 = 0; m0 < std::min(M, L); m0 += kGemmRows)
    gemm_acc<C>(kGemmRows, N, std::min(L, m0 + kGemmRows), A + m0 * lda, lda, B, ldb, Cm + m0 * ldc, ldc);
}

// The same for an upper triangular A (A_ij = 0 for j < i): the inner loop starts at the
// diagonal block.
template <typename C>
inline void mm_upper(int64_t M, int64_t N, int64_t L, const C* A, int64_t lda, const C* B, int64_t ldb, C* Cm,
                     int64_t ldc) {
  for (int64_t r = 0; r < M; ++r) std::fill(Cm + r * ldc, Cm + r * ldc + N, C(0));
  for (int64_t m0 = 0; m0 < std::min(M, L); m0 += kGemmRows)
    gemm_acc<C>(kGemmRows, N, L - m0, A + m0 * lda + m0, lda, B + m0 * ldb, ldb, Cm + m0 * ldc, ldc);
}

template <typename C>
inline void scale_rows(const C* src, int64_t ld, int64_t n, const C* f, C* dst) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < ld; ++c) dst[r * ld + c] = src[r * ld + c] * f[r];
}

// One (sequence, head): addresses and sizes.
struct Item {
  int64_t n, h, T, tok0, brow;
};

template <typename C>
struct Scratch {
  int64_t P, Kp, Vp;  // padded chunk, key dim, value dim (V' = V + normalize)
  std::vector<C> q, k, kt, v, a, o, s, tmp, tmp2, b, eb, ebl, erow, dq, dk, dv, dout, u;
  std::vector<C> states;  // backward: the state entering each chunk, reused across items
  std::vector<C> zero;    // max(Kp, Vp) zeros: the recurrence's state row when there is no initial state
  // recurrent_only: every item runs the token recurrence (decoding), which needs one row of
  // q, k, v, o and the state; skipping the chunk buffers keeps a step's set-up small.
  Scratch(int64_t chunk, int64_t K, int64_t Vc, bool recurrent_only = false) {
    const int64_t al = gemm_col_align<C>();
    P = round_up(std::max<int64_t>(chunk, 1), al);
    Kp = round_up(std::max<int64_t>(K, 1), al);
    Vp = round_up(std::max<int64_t>(Vc, 1), al);
    zero.assign(size_t(std::max(Kp, Vp)), C(0));
    if (recurrent_only) {
      q.resize(size_t(Kp));
      k.resize(size_t(Kp));
      v.resize(size_t(Vp));
      o.resize(size_t(Vp));
      s.resize(size_t(Kp * Vp));
      return;
    }
    const int64_t mx = std::max(Kp, Vp);
    for (auto* x : {&q, &k, &dq, &dk}) x->assign(size_t(P * Kp), C(0));
    kt.assign(size_t(mx * P), C(0));
    for (auto* x : {&v, &o, &dv, &dout}) x->assign(size_t(P * Vp), C(0));
    a.assign(size_t(P * P), C(0));
    const int64_t big = std::max(P * std::max(P, mx), mx * mx);
    tmp.assign(size_t(big), C(0));
    tmp2.assign(size_t(big), C(0));
    s.assign(size_t(Kp * Vp), C(0));
    u.assign(size_t(Kp * Vp), C(0));
    b.assign(size_t(P), C(0));
    eb.assign(size_t(P), C(0));
    ebl.assign(size_t(P), C(0));
    erow.assign(size_t(P), C(0));
  }
};

template <typename T, typename C>
struct Kernel {
  const LinearAttentionParams& p;
  Scratch<C>& w;
  const Item& it;
  int64_t K, V, Vc;  // Vc = V + normalize

  Kernel(const LinearAttentionParams& p_, Scratch<C>& w_, const Item& it_)
      : p(p_), w(w_), it(it_), K(p_.head_dim), V(p_.head_dim_v), Vc(p_.head_dim_v + (p_.normalize ? 1 : 0)) {}

  template <typename U>
  const U* row(const void* base, const int64_t* st, int64_t t) const {
    return static_cast<const U*>(base) + it.brow * st[0] + (it.tok0 + t) * st[1] + it.h * st[2];
  }
  template <typename U>
  U* wrow(void* base, const int64_t* st, int64_t t) const {
    return static_cast<U*>(base) + it.brow * st[0] + (it.tok0 + t) * st[1] + it.h * st[2];
  }

  // Q~ (scaled, feature-mapped) rows [t0, t0 + L); `deriv` gets scale * phi'.
  void load_q(int64_t t0, int64_t L, C* dst, C* deriv = nullptr) {
    load_tile<T, C>(row<T>(p.q, p.q_stride, t0), p.q_stride[1], L, K, p.feature_map, C(p.scale), dst, w.P, w.Kp, deriv);
  }
  void load_k(int64_t t0, int64_t L, C* dst, C* deriv = nullptr) {
    load_tile<T, C>(row<T>(p.k, p.k_stride, t0), p.k_stride[1], L, K, p.feature_map, C(1), dst, w.P, w.Kp, deriv);
  }
  void load_v(int64_t t0, int64_t L, C* dst) {
    load_tile<T, C>(row<T>(p.v, p.v_stride, t0), p.v_stride[1], L, V, FeatureMap::Identity, C(1), dst, w.P, w.Vp);
    if (p.normalize)
      for (int64_t r = 0; r < L; ++r) dst[r * w.Vp + V] = C(1);
  }

  // Cumulative log-decays of the chunk into w.b; exp(b) into w.eb, exp(b_L - b) into w.ebl.
  // Returns exp(b_L). Without decay every factor is 1.
  C decays(int64_t t0, int64_t L) {
    if (!p.log_decay) {
      std::fill(w.b.begin(), w.b.end(), C(0));
      std::fill(w.eb.begin(), w.eb.end(), C(1));
      std::fill(w.ebl.begin(), w.ebl.end(), C(1));
      return C(1);
    }
    C acc = 0;
    for (int64_t i = 0; i < L; ++i) {
      acc += *row<C>(p.log_decay, p.g_stride, t0 + i);
      w.b[i] = acc;
    }
    for (int64_t i = 0; i < L; ++i) {
      w.eb[i] = std::exp(w.b[i]);
      w.ebl[i] = std::exp(w.b[L - 1] - w.b[i]);
    }
    for (int64_t i = L; i < w.P; ++i) w.eb[i] = w.ebl[i] = C(0);
    return std::exp(w.b[L - 1]);
  }

  // A = (Q K^T) .* D over the chunk (w.kt holds K^T).
  void scores(int64_t L, const C* Q, C* A) {
    mm<C>(w.P, w.P, K, Q, w.Kp, w.kt.data(), w.P, A, w.P);
    apply_mask(L, A);
  }
  void apply_mask(int64_t L, C* A) {
    for (int64_t i = 0; i < w.P; ++i) {
      C* r = A + i * w.P;
      if (i >= L) {
        std::fill(r, r + w.P, C(0));
        continue;
      }
      if (p.log_decay) {
        // e_j = exp(b_i - b_j) <= 1 for j <= i (vectorized exp; 0 past the diagonal).
        C* e = w.erow.data();
        const int64_t n = round_up(i + 1, Vec<C>::N);
        for (int64_t j = 0; j <= i; ++j) e[j] = -w.b[j];
        std::fill(e + i + 1, e + n, -std::numeric_limits<C>::infinity());
        exp_shifted_sum(e, n, C(-w.b[i]));
        for (int64_t j = 0; j <= i; ++j) r[j] *= e[j];
      }
      std::fill(r + i + 1, r + w.P, C(0));
    }
  }

  void load_state(const void* S0, const void* z0) {
    std::fill(w.s.begin(), w.s.end(), C(0));
    const int64_t base = it.n * p.heads + it.h;
    if (S0) {
      const C* s = static_cast<const C*>(S0) + base * K * V;
      for (int64_t r = 0; r < K; ++r) std::copy(s + r * V, s + (r + 1) * V, w.s.data() + r * w.Vp);
    }
    if (p.normalize && z0) {
      const C* z = static_cast<const C*>(z0) + base * K;
      for (int64_t r = 0; r < K; ++r) w.s[r * w.Vp + V] = z[r];
    }
  }
  void store_state(const C* src, void* S, void* z) {
    const int64_t base = it.n * p.heads + it.h;
    if (S) {
      C* s = static_cast<C*>(S) + base * K * V;
      for (int64_t r = 0; r < K; ++r) std::copy(src + r * w.Vp, src + r * w.Vp + V, s + r * V);
    }
    if (p.normalize && z) {
      C* zz = static_cast<C*>(z) + base * K;
      for (int64_t r = 0; r < K; ++r) zz[r] = src[r * w.Vp + V];
    }
  }

  // S = exp(b_L) S + (diag(exp(b_L - b)) K)^T V, with w.kt = K^T and V in w.v.
  void update_state(int64_t L, C ebL, C* S) {
    if (p.log_decay) {
      for (int64_t i = 0; i < w.Kp * w.Vp; ++i) S[i] *= ebL;
      for (int64_t r = 0; r < w.Kp; ++r)  // ebl is 0 past the chunk, kt is 0 past K
        for (int64_t j = 0; j < w.P; ++j) w.tmp[r * w.P + j] = w.kt[r * w.P + j] * w.ebl[j];
      gemm_acc<C>(w.Kp, w.Vp, L, w.tmp.data(), w.P, w.v.data(), w.Vp, S, w.Vp);
    } else {
      gemm_acc<C>(w.Kp, w.Vp, L, w.kt.data(), w.P, w.v.data(), w.Vp, S, w.Vp);
    }
  }

  // O = A V + diag(exp(b)) Q S into w.o (causal), or O = Q S (non-causal).
  void outputs(int64_t L, C* O) {
    if (p.causal) {
      scores(L, w.q.data(), w.a.data());
      mm_lower<C>(w.P, w.Vp, L, w.a.data(), w.P, w.v.data(), w.Vp, O, w.Vp);
      if (p.log_decay) {
        scale_rows<C>(w.q.data(), w.Kp, w.P, w.eb.data(), w.tmp.data());
        gemm_acc<C>(w.P, w.Vp, K, w.tmp.data(), w.Kp, w.s.data(), w.Vp, O, w.Vp);
      } else {
        gemm_acc<C>(w.P, w.Vp, K, w.q.data(), w.Kp, w.s.data(), w.Vp, O, w.Vp);
      }
    } else {
      mm<C>(w.P, w.Vp, K, w.q.data(), w.Kp, w.s.data(), w.Vp, O, w.Vp);
    }
  }

  void write_out(int64_t t0, int64_t L) {
    std::vector<C>& o = w.o;
    for (int64_t i = 0; i < L; ++i) {
      C* r = o.data() + i * w.Vp;
      if (p.normalize) {
        const C inv = C(1) / (r[V] + C(kNormEps));
        for (int64_t c = 0; c < V; ++c) r[c] *= inv;
      }
      store_row<T, C>(r, wrow<T>(p.out, p.out_stride, t0 + i), V);
    }
  }

  // Token-by-token recurrence (decoding a few tokens): O(K V) per token instead of the
  // padded chunk products. S = exp(g_t) S + k~_t v_t^T, o_t = S^T q~_t. It runs on the
  // caller's state buffers: it reads the initial state where it lies and writes the final
  // state in place (a copy through scratch, load_state / store_state, moved 3 x 16 KiB per
  // head of a K = V = 64 step, more than its arithmetic). Row r of the state is S[r, 0:V)
  // plus z[r] with normalize. The initial and final state are either one buffer (an
  // in-place step) or disjoint, so each element is read before it is written. Without a
  // final state (no caller does that today) the state lives in w.s.
  void recurrent() {
    using Vt = typename Vec<C>::type;
    constexpr int W = Vec<C>::N;
    C* q = w.q.data();
    C* k = w.k.data();
    C* v = w.v.data();
    C* o = w.o.data();
    const int64_t base = it.n * p.heads + it.h;
    const C* S0 = p.initial_state ? static_cast<const C*>(p.initial_state) + base * K * V : nullptr;
    const C* z0 = p.normalize && p.initial_z ? static_cast<const C*>(p.initial_z) + base * K : nullptr;
    C* S1 = p.final_state ? static_cast<C*>(p.final_state) + base * K * V : w.s.data();
    C* z1 = !p.normalize ? nullptr : p.final_z ? static_cast<C*>(p.final_z) + base * K : w.s.data() + K * V;
    const int64_t Vv = V / W * W;
    for (int64_t t = 0; t < it.T; ++t) {
      load_tile<T, C>(row<T>(p.q, p.q_stride, t), p.q_stride[1], 1, K, p.feature_map, C(p.scale), q, 1, w.Kp);
      load_tile<T, C>(row<T>(p.k, p.k_stride, t), p.k_stride[1], 1, K, p.feature_map, C(1), k, 1, w.Kp);
      load_tile<T, C>(row<T>(p.v, p.v_stride, t), p.v_stride[1], 1, V, FeatureMap::Identity, C(1), v, 1, w.Vp);
      // The first token reads the initial state, or w.zero without one (S1 may hold
      // anything then), with factor 1; later tokens the state the previous one wrote.
      const bool from_zero = t == 0 && !S0;
      const C g = p.log_decay ? std::exp(*row<C>(p.log_decay, p.g_stride, t)) : C(1);
      const C d = from_zero ? C(1) : g;  // the factor on the state row read
      const C* zsrc = t == 0 ? z0 : z1;
      std::fill(o, o + w.Vp, C(0));
      C on = 0;  // o[V]: q~ . z
      const Vt dv = Vt{} + d;
      for (int64_t r = 0; r < K; ++r) {
        const C* sr = from_zero ? w.zero.data() : (t == 0 ? S0 : S1) + r * V;
        C* dst = S1 + r * V;
        const C kr = k[r], qr = q[r];
        const Vt kv = Vt{} + kr, qv = Vt{} + qr;
        for (int64_t c = 0; c < Vv; c += W) {
          const Vt x = dv * vload(sr + c) + kv * vload(v + c);
          vstore(dst + c, x);
          vstore(o + c, vload(o + c) + qv * x);
        }
        for (int64_t c = Vv; c < V; ++c) {
          dst[c] = d * sr[c] + kr * v[c];
          o[c] += qr * dst[c];
        }
        if (z1) {
          z1[r] = (zsrc ? g * zsrc[r] : C(0)) + kr;
          on += qr * z1[r];
        }
      }
      if (p.out) {
        if (p.normalize) {
          const C inv = C(1) / (on + C(kNormEps));
          for (int64_t c = 0; c < V; ++c) o[c] *= inv;
        }
        store_row<T, C>(o, wrow<T>(p.out, p.out_stride, t), V);
      }
    }
  }

  void forward() {
    const int64_t ch = p.chunk_size;
    if (p.causal && it.T <= kRecurrentMaxTokens && it.T > 0) {
      recurrent();
      return;
    }
    load_state(p.initial_state, p.initial_z);
    if (p.causal) {
      for (int64_t t0 = 0; t0 < it.T; t0 += ch) {
        const int64_t L = std::min(ch, it.T - t0);
        const C ebL = decays(t0, L);
        load_q(t0, L, w.q.data());
        load_k(t0, L, w.k.data());
        transpose<C>(w.k.data(), w.P, w.Kp, w.Kp, w.kt.data(), w.P);
        load_v(t0, L, w.v.data());
        if (p.out) {
          outputs(L, w.o.data());
          write_out(t0, L);
        }
        update_state(L, ebL, w.s.data());
      }
    } else {
      for (int64_t t0 = 0; t0 < it.T; t0 += ch) {
        const int64_t L = std::min(ch, it.T - t0);
        load_k(t0, L, w.k.data());
        transpose<C>(w.k.data(), w.P, w.Kp, w.Kp, w.kt.data(), w.P);
        load_v(t0, L, w.v.data());
        update_state(L, C(1), w.s.data());
      }
      if (p.out)
        for (int64_t t0 = 0; t0 < it.T; t0 += ch) {
          const int64_t L = std::min(ch, it.T - t0);
          load_q(t0, L, w.q.data());
          outputs(L, w.o.data());
          write_out(t0, L);
        }
    }
    store_state(w.s.data(), p.final_state, p.final_z);
  }
};

template <typename T, typename C>
void forward_items(const LinearAttentionParams& p, int64_t i0, int64_t i1) {
  bool recurrent_only = p.causal;
  for (int64_t i = i0; i < i1 && recurrent_only; ++i) recurrent_only = p.seq_len(i / p.heads) <= kRecurrentMaxTokens;
  Scratch<C> w(p.chunk_size, p.head_dim, p.head_dim_v + (p.normalize ? 1 : 0), recurrent_only);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t n = i / p.heads, h = i % p.heads;
    const Item it{n, h, p.seq_len(n), p.tok0(n), p.brow(n)};
    Kernel<T, C>(p, w, it).forward();
  }
}

// ---- backward ---------------------------------------------------------------------------

template <typename T, typename C>
struct GradKernel : Kernel<T, C> {
  using B = Kernel<T, C>;
  using B::it;
  using B::K;
  using B::p;
  using B::V;
  using B::Vc;
  using B::w;
  const LinearAttentionGradParams& g;
  std::vector<C>& states;  // state entering each chunk (causal)
  std::vector<C> qd, kd;  // scale * phi'(q), phi'(k)

  GradKernel(const LinearAttentionGradParams& g_, Scratch<C>& w_, const Item& it_)
      : B(g_.fwd, w_, it_), g(g_), states(w_.states), qd(w_.P * w_.Kp), kd(w_.P * w_.Kp) {}

  // dO' (augmented with the normalizer's gradient) for rows [t0, t0+L) into w.dout.
  // Needs w.o = the unnormalized O' of the chunk when normalizing.
  void load_dout(int64_t t0, int64_t L) {
    load_tile<T, C>(B::template row<T>(g.dout, g.dout_stride, t0), g.dout_stride[1], L, V, FeatureMap::Identity,
                    C(1), w.dout.data(), w.P, w.Vp);
    if (!p.normalize) return;
    for (int64_t i = 0; i < L; ++i) {
      C* d = w.dout.data() + i * w.Vp;
      const C* o = w.o.data() + i * w.Vp;
      const C inv = C(1) / (o[V] + C(kNormEps));
      C dot = 0;
      for (int64_t c = 0; c < V; ++c) {
        d[c] *= inv;
        dot += d[c] * o[c];
      }
      d[V] = -dot * inv;  // d/dn of o / (n + eps) = -(dout . o) / (n + eps)^2
    }
  }

  void store_grads(int64_t t0, int64_t L) {
    for (int64_t i = 0; i < L; ++i) {
      C* dq = w.dq.data() + i * w.Kp;
      C* dk = w.dk.data() + i * w.Kp;
      const C* eq = qd.data() + i * w.Kp;
      const C* ek = kd.data() + i * w.Kp;
      for (int64_t c = 0; c < K; ++c) {
        dq[c] *= eq[c];
        dk[c] *= ek[c];
      }
      store_row<T, C>(dq, B::template wrow<T>(g.dq, g.dq_stride, t0 + i), K);
      store_row<T, C>(dk, B::template wrow<T>(g.dk, g.dk_stride, t0 + i), K);
      store_row<T, C>(w.dv.data() + i * w.Vp, B::template wrow<T>(g.dv, g.dv_stride, t0 + i), V);
    }
  }

  void load_d_final() {
    std::fill(w.u.begin(), w.u.end(), C(0));
    const int64_t base = it.n * p.heads + it.h;
    if (g.d_final_state) {
      const C* s = static_cast<const C*>(g.d_final_state) + base * K * V;
      for (int64_t r = 0; r < K; ++r) std::copy(s + r * V, s + (r + 1) * V, w.u.data() + r * w.Vp);
    }
    if (p.normalize && g.d_final_z) {
      const C* z = static_cast<const C*>(g.d_final_z) + base * K;
      for (int64_t r = 0; r < K; ++r) w.u[r * w.Vp + V] = z[r];
    }
  }

  void causal() {
    const int64_t ch = p.chunk_size, P = w.P, Kp = w.Kp, Vp = w.Vp;
    const int64_t nch = (it.T + ch - 1) / ch;
    const size_t SE = size_t(Kp * Vp);
    if (states.size() < size_t(nch + 1) * SE) states.resize(size_t(nch + 1) * SE);
    // Pass 1: the state entering every chunk, and the final state.
    B::load_state(p.initial_state, p.initial_z);
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t t0 = c * ch, L = std::min(ch, it.T - t0);
      std::copy(w.s.begin(), w.s.end(), states.begin() + c * SE);
      const C ebL = B::decays(t0, L);
      B::load_k(t0, L, w.k.data());
      transpose<C>(w.k.data(), P, Kp, Kp, w.kt.data(), P);
      B::load_v(t0, L, w.v.data());
      B::update_state(L, ebL, w.s.data());
    }
    std::copy(w.s.begin(), w.s.end(), states.begin() + nch * SE);
    load_d_final();
    C run = 0;  // reverse cumulative sum of d b
    if (g.d_log_decay) {
      const C* sf = states.data() + nch * SE;
      for (size_t i = 0; i < SE; ++i) run += w.u[i] * sf[i];
    }
    for (int64_t c = nch - 1; c >= 0; --c) {
      const int64_t t0 = c * ch, L = std::min(ch, it.T - t0);
      std::copy(states.begin() + c * SE, states.begin() + (c + 1) * SE, w.s.begin());
      const C ebL = B::decays(t0, L);
      B::load_q(t0, L, w.q.data(), qd.data());
      B::load_k(t0, L, w.k.data(), kd.data());
      transpose<C>(w.k.data(), P, Kp, Kp, w.kt.data(), P);
      B::load_v(t0, L, w.v.data());
      if (p.normalize) B::outputs(L, w.o.data());  // also leaves A in w.a
      else B::scores(L, w.q.data(), w.a.data());
      load_dout(t0, L);
      // dA = (dO V^T) .* D   (tmp2 = V^T)
      transpose<C>(w.v.data(), P, Vp, Vp, w.tmp2.data(), P);
      std::vector<C>& dA = w.tmp;
      mm<C>(P, P, Vc, w.dout.data(), Vp, w.tmp2.data(), P, dA.data(), P);
      B::apply_mask(L, dA.data());
      // dQ = dA K + diag(exp b) dO S^T
      mm_lower<C>(P, Kp, L, dA.data(), P, w.k.data(), Kp, w.dq.data(), Kp);
      // dK = dA^T Q + diag(exp(bL - b)) V U^T
      transpose<C>(dA.data(), P, P, P, w.tmp2.data(), P);
      mm_upper<C>(P, Kp, L, w.tmp2.data(), P, w.q.data(), Kp, w.dk.data(), Kp);
      // dV = A^T dO + diag(exp(bL - b)) K U
      transpose<C>(w.a.data(), P, P, P, w.tmp2.data(), P);
      mm_upper<C>(P, Vp, L, w.tmp2.data(), P, w.dout.data(), Vp, w.dv.data(), Vp);
      std::vector<C>& T2 = w.tmp2;
      // dQ += diag(exp b) dO S^T   (tmp = diag(exp b) dO, tmp2 = S^T)
      scale_rows<C>(w.dout.data(), Vp, P, w.eb.data(), w.tmp.data());
      transpose<C>(w.s.data(), Kp, Vp, Vp, T2.data(), Kp);  // S^T: Vp x Kp
      gemm_acc<C>(P, Kp, Vc, w.tmp.data(), Vp, T2.data(), Kp, w.dq.data(), Kp);
      scale_rows<C>(w.v.data(), Vp, P, w.ebl.data(), w.tmp.data());
      transpose<C>(w.u.data(), Kp, Vp, Vp, T2.data(), Kp);  // U^T: Vp x Kp
      gemm_acc<C>(P, Kp, Vc, w.tmp.data(), Vp, T2.data(), Kp, w.dk.data(), Kp);
      scale_rows<C>(w.k.data(), Kp, P, w.ebl.data(), w.tmp.data());
      gemm_acc<C>(P, Vp, K, w.tmp.data(), Kp, w.u.data(), Vp, w.dv.data(), Vp);
      // d log-decay: d b_i = q~_i.dq~_i - k~_i.dk~_i, reverse-cumulated.
      if (g.d_log_decay) {
        for (int64_t i = L - 1; i >= 0; --i) {
          C db = 0;
          const C *q = w.q.data() + i * Kp, *dq = w.dq.data() + i * Kp, *k = w.k.data() + i * Kp,
                  *dk = w.dk.data() + i * Kp;
          for (int64_t c2 = 0; c2 < K; ++c2) db += q[c2] * dq[c2] - k[c2] * dk[c2];
          run += db;
          *B::template wrow<C>(g.d_log_decay, g.dg_stride, t0 + i) = run;
        }
      }
      // U = exp(bL) U + (diag(exp b) Q)^T dO
      if (p.log_decay) {
        for (size_t i = 0; i < SE; ++i) w.u[i] *= ebL;
        for (int64_t i = 0; i < L; ++i)
          for (int64_t c2 = 0; c2 < K; ++c2) T2[c2 * P + i] = w.q[i * Kp + c2] * w.eb[i];
        for (int64_t c2 = 0; c2 < K; ++c2) std::fill(T2.data() + c2 * P + L, T2.data() + (c2 + 1) * P, C(0));
        for (int64_t c2 = K; c2 < Kp; ++c2) std::fill(T2.data() + c2 * P, T2.data() + (c2 + 1) * P, C(0));
      } else {
        transpose<C>(w.q.data(), P, Kp, Kp, T2.data(), P);
      }
      gemm_acc<C>(Kp, Vp, L, T2.data(), P, w.dout.data(), Vp, w.u.data(), Vp);
      store_grads(t0, L);
    }
    B::store_state(w.u.data(), g.d_initial_state, g.d_initial_z);
  }

  void noncausal() {
    const int64_t ch = p.chunk_size, P = w.P, Kp = w.Kp, Vp = w.Vp;
    // The final state S.
    B::load_state(p.initial_state, p.initial_z);
    for (int64_t t0 = 0; t0 < it.T; t0 += ch) {
      const int64_t L = std::min(ch, it.T - t0);
      B::load_k(t0, L, w.k.data());
      transpose<C>(w.k.data(), P, Kp, Kp, w.kt.data(), P);
      B::load_v(t0, L, w.v.data());
      B::update_state(L, C(1), w.s.data());
    }
    load_d_final();
    std::vector<C>& T2 = w.tmp2;
    transpose<C>(w.s.data(), Kp, Vp, Vp, T2.data(), Kp);  // S^T (Vp x Kp), kept through pass 1
    std::vector<C> st(T2.begin(), T2.begin() + Vp * Kp);
    // Pass 1: dQ = dO S^T; U = dS_T + Q^T dO.
    for (int64_t t0 = 0; t0 < it.T; t0 += ch) {
      const int64_t L = std::min(ch, it.T - t0);
      B::load_q(t0, L, w.q.data(), qd.data());
      if (p.normalize) B::outputs(L, w.o.data());
      load_dout(t0, L);
      mm<C>(P, Kp, Vc, w.dout.data(), Vp, st.data(), Kp, w.dq.data(), Kp);
      transpose<C>(w.q.data(), P, Kp, Kp, T2.data(), P);
      gemm_acc<C>(Kp, Vp, L, T2.data(), P, w.dout.data(), Vp, w.u.data(), Vp);
      for (int64_t i = 0; i < L; ++i) {
        C* dq = w.dq.data() + i * Kp;
        for (int64_t c = 0; c < K; ++c) dq[c] *= qd[i * Kp + c];
        store_row<T, C>(dq, B::template wrow<T>(g.dq, g.dq_stride, t0 + i), K);
      }
    }
    // Pass 2: dK = V U^T, dV = K U.
    transpose<C>(w.u.data(), Kp, Vp, Vp, st.data(), Kp);
    for (int64_t t0 = 0; t0 < it.T; t0 += ch) {
      const int64_t L = std::min(ch, it.T - t0);
      B::load_k(t0, L, w.k.data(), kd.data());
      B::load_v(t0, L, w.v.data());
      mm<C>(P, Kp, Vc, w.v.data(), Vp, st.data(), Kp, w.dk.data(), Kp);
      mm<C>(P, Vp, K, w.k.data(), Kp, w.u.data(), Vp, w.dv.data(), Vp);
      for (int64_t i = 0; i < L; ++i) {
        C* dk = w.dk.data() + i * Kp;
        for (int64_t c = 0; c < K; ++c) dk[c] *= kd[i * Kp + c];
        store_row<T, C>(dk, B::template wrow<T>(g.dk, g.dk_stride, t0 + i), K);
        store_row<T, C>(w.dv.data() + i * Vp, B::template wrow<T>(g.dv, g.dv_stride, t0 + i), V);
      }
    }
    B::store_state(w.u.data(), g.d_initial_state, g.d_initial_z);
  }
};

template <typename T, typename C>
void backward_items(const LinearAttentionGradParams& g, int64_t i0, int64_t i1) {
  const LinearAttentionParams& p = g.fwd;
  Scratch<C> w(p.chunk_size, p.head_dim, p.head_dim_v + (p.normalize ? 1 : 0));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t n = i / p.heads, h = i % p.heads;
    const Item it{n, h, p.seq_len(n), p.tok0(n), p.brow(n)};
    GradKernel<T, C> k(g, w, it);
    if (p.causal) k.causal();
    else k.noncausal();
  }
}

}  // namespace

void linear_attention_forward_items(const LinearAttentionParams& p, int64_t i0, int64_t i1) {
  switch (p.dtype) {
    case DType::Float32: return forward_items<float, float>(p, i0, i1);
    case DType::Float64: return forward_items<double, double>(p, i0, i1);
    case DType::Float16: return forward_items<half_t, float>(p, i0, i1);
    case DType::BFloat16: return forward_items<bf16_t, float>(p, i0, i1);
    default: break;
  }
}

void linear_attention_backward_items(const LinearAttentionGradParams& g, int64_t i0, int64_t i1) {
  switch (g.fwd.dtype) {
    case DType::Float32: return backward_items<float, float>(g, i0, i1);
    case DType::Float64: return backward_items<double, double>(g, i0, i1);
    case DType::Float16: return backward_items<half_t, float>(g, i0, i1);
    case DType::BFloat16: return backward_items<bf16_t, float>(g, i0, i1);
    default: break;
  }
}

}  // namespace LONGATTN_ISA_NS
}  // namespace cpu
}  // namespace longattn
