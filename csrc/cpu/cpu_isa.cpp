#include "longattn/cpu_isa.h"

namespace longattn {

CpuIsa cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
#if defined(LONGATTN_HAVE_AVX512)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return CpuIsa::AVX512;
#endif
#if defined(LONGATTN_HAVE_AVX2)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return CpuIsa::AVX2;
#endif
    return CpuIsa::Baseline;
  }();
  return isa;
#else
  return CpuIsa::Baseline;
#endif
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::AVX512: return "avx512";
    case CpuIsa::AVX2: return "avx2";
    case CpuIsa::Baseline: return "baseline";
  }
  return "unknown";
}

}  // namespace longattn
