// RoPE CPU micro-kernel, compiled once per ISA level (LONGATTN_ISA_NS names the level;
// CMake gives each copy its own -m flags). The dispatcher in rope.cpp splits tokens
// across threads and calls the best compiled level.
//
// Per token: cos/sin of the float32 angle position * inv_freq are computed once (accurate
// libm sincos, no fast-math) and reused for every q and k head. Rows are converted into
// a float buffer, rotated, and converted back, so in-place calls vectorize as well as
// out-of-place ones (no aliasing between the buffers and the arrays).
#include <cmath>
#include <cstring>

#include "convert.h"
#include "longattn/rope.h"

#ifndef LONGATTN_ISA_NS
#error "LONGATTN_ISA_NS must name the ISA level this unit is compiled for"
#endif

namespace longattn {
namespace cpu {
namespace LONGATTN_ISA_NS {
namespace {

template <typename C>
struct Angles {
  alignas(64) C cos[kRopeMaxHalf];
  alignas(64) C sin[kRopeMaxHalf];
};

template <typename C>
inline void compute_angles(const RopeParams& p, int64_t position, Angles<C>& a) {
  const float fpos = float(position);
  const C af = C(p.attention_factor), sign = C(p.sin_sign);
  for (int64_t i = 0; i < p.rotary_half; ++i) {
    const float angle = fpos * p.inv_freq[i];  // float32 product, as transformers
    if constexpr (sizeof(C) == 8) {
      a.cos[i] = std::cos(double(angle)) * af;
      a.sin[i] = std::sin(double(angle)) * af * sign;
    } else {
      float s, c;
      ::sincosf(angle, &s, &c);
      a.cos[i] = c * af;
      a.sin[i] = s * af * sign;
    }
  }
}

template <typename T, typename C, bool Interleaved>
inline void rotate_row(const T* x, T* y, const Angles<C>& a, int64_t half, int64_t head_dim) {
  alignas(64) C buf[2 * kRopeMaxHalf];
  alignas(64) C out[2 * kRopeMaxHalf];
  const int64_t rot = 2 * half;
  load_row<T, C>(x, buf, rot);
  if constexpr (Interleaved) {
    for (int64_t i = 0; i < half; ++i) {
      const C x1 = buf[2 * i], x2 = buf[2 * i + 1];
      out[2 * i] = x1 * a.cos[i] - x2 * a.sin[i];
      out[2 * i + 1] = x2 * a.cos[i] + x1 * a.sin[i];
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const C x1 = buf[i], x2 = buf[i + half];
      out[i] = x1 * a.cos[i] - x2 * a.sin[i];
      out[i + half] = x2 * a.cos[i] + x1 * a.sin[i];
    }
  }
  store_row<T, C>(out, y, rot);
  if (y != x && head_dim > rot) std::memcpy(y + rot, x + rot, sizeof(T) * (head_dim - rot));
}

template <typename T, typename C, bool Interleaved>
void rope_range(const RopeParams& p, int64_t t0, int64_t t1) {
  Angles<C> a;
  const T* q = static_cast<const T*>(p.q);
  T* qo = static_cast<T*>(p.q_out);
  const T* k = static_cast<const T*>(p.k);
  T* ko = static_cast<T*>(p.k_out);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / p.seqlen, s = t % p.seqlen;
    int64_t pos = s;
    if (p.positions) {
      const int64_t off = b * p.pos_stride[0] + s * p.pos_stride[1];
      pos = p.pos_dtype == DType::Int32 ? int64_t(static_cast<const int32_t*>(p.positions)[off])
                                        : static_cast<const int64_t*>(p.positions)[off];
    }
    compute_angles<C>(p, pos, a);
    for (int64_t h = 0; h < p.hq; ++h)
      rotate_row<T, C, Interleaved>(q + b * p.q_stride[0] + s * p.q_stride[1] + h * p.q_stride[2],
                                    qo + b * p.q_out_stride[0] + s * p.q_out_stride[1] + h * p.q_out_stride[2],
                                    a, p.rotary_half, p.head_dim);
    if (k)
      for (int64_t h = 0; h < p.hk; ++h)
        rotate_row<T, C, Interleaved>(k + b * p.k_stride[0] + s * p.k_stride[1] + h * p.k_stride[2],
                                      ko + b * p.k_out_stride[0] + s * p.k_out_stride[1] + h * p.k_out_stride[2],
                                      a, p.rotary_half, p.head_dim);
  }
}

template <typename T, typename C>
void rope_range_layout(const RopeParams& p, int64_t t0, int64_t t1) {
  if (p.interleaved)
    rope_range<T, C, true>(p, t0, t1);
  else
    rope_range<T, C, false>(p, t0, t1);
}

}  // namespace

void rope_tokens(const RopeParams& p, int64_t t0, int64_t t1) {
  switch (p.dtype) {
    case DType::Float32: return rope_range_layout<float, float>(p, t0, t1);
    case DType::Float64: return rope_range_layout<double, double>(p, t0, t1);
    case DType::Float16: return rope_range_layout<half_t, float>(p, t0, t1);
    case DType::BFloat16: return rope_range_layout<bf16_t, float>(p, t0, t1);
    default: break;  // the binding layer rejects other dtypes before dispatch
  }
}

}  // namespace LONGATTN_ISA_NS
}  // namespace cpu
}  // namespace longattn
