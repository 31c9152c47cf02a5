#include "longattn/cpu_isa.h"

#include <cstdlib>
#include <optional>
#include <string>

namespace longattn {

namespace {

// LONGATTN_CPU_ISA=avx512, avx2 or baseline caps the level the kernels dispatch to (for
// testing the narrower kernels on a wider CPU; avx512 turns off the bfloat16 dot product);
// other values, and levels the CPU lacks, are ignored.
std::optional<CpuIsa> env_cap() {
  const char* env = std::getenv("LONGATTN_CPU_ISA");
  if (!env) return std::nullopt;
  const std::string v(env);
  if (v == "baseline") return CpuIsa::Baseline;
  if (v == "avx2") return CpuIsa::AVX2;
  if (v == "avx512") return CpuIsa::AVX512;
  return std::nullopt;
}

CpuIsa cap_from_env(CpuIsa detected) {
  const std::optional<CpuIsa> cap = env_cap();
  return cap && int(*cap) < int(detected) ? *cap : detected;
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
    if (env_cap()) return false;
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
