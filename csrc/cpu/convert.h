// Row conversions between storage dtypes and the float32/float64 compute type of the CPU
// kernels. Included by ISA-specific translation units, so the loops vectorize for each
// ISA level (F16C intrinsics where the unit is compiled with them).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
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

using half_t = _Float16;
struct bf16_t {
  uint16_t bits;
};

inline float bf16_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN (quiet).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

template <typename T, typename C>
inline void load_row(const T* src, C* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = C(src[i]);
}

template <typename T, typename C>
inline void store_row(const C* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = T(src[i]);
}

template <>
inline void load_row<bf16_t, float>(const bf16_t* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = uint32_t(s[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

template <>
inline void store_row<bf16_t, float>(const float* src, bf16_t* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
}

#if defined(__F16C__)
template <>
inline void load_row<half_t, float>(const half_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = float(src[i]);
}

template <>
inline void store_row<half_t, float>(const float* src, half_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = half_t(src[i]);
}
#endif

}  // namespace LONGATTN_ISA_NS
}  // namespace cpu
}  // namespace longattn
