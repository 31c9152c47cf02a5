#include "longattn/cpu_isa.h"

#include <cstdlib>
#include <string>

namespace longattn {

namespace {

// LONGATTN_CPU_ISA=avx512, avx2 or baseline caps the level the kernels dispatch to (for
// testing the narrower kernels on a wider CPU; avx512 turns off the bfloat16 dot product);
// other values, and levels the CPU lacks, are ignored.
CpuIsa cap_from_env(CpuIsa detected) {
  const char* env = std::getenv("LONGATTN_CPU_ISA");
  if (!env) return detected;
  const std::string v(env);
  const CpuIsa cap = v == "baseline" ? CpuIsa::Baseline : v == "avx2" ? CpuIsa::AVX2 : CpuIsa::AVX512;
  return int(cap) < int(detected) ? cap : detected;
}

}  // namespace

CpuIsa cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const CpuIsa isa = cap_from_env([] {
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
  }());
  return isa;
#else
  return CpuIsa::Baseline;
#endif
}

bool cpu_bf16_dot() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(LONGATTN_HAVE_AVX512)
  static const bool yes = [] {
    const char* env = std::getenv("LONGATTN_CPU_ISA");
    if (env && (std::string(env) == "avx512" || std::string(env) == "avx2" || std::string(env) == "baseline"))
      return false;
    __builtin_cpu_init();
    return cpu_isa() == CpuIsa::AVX512 && __builtin_cpu_supports("avx512bf16");
  }();
  return yes;
#else
  return false;
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
