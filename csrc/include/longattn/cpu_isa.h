// Runtime CPU feature dispatch: kernels are compiled once per ISA level (separate
// translation units with their own -m flags) and the best one the CPU supports is chosen.
#pragma once

namespace longattn {

enum class CpuIsa { Baseline = 0, AVX2 = 1, AVX512 = 2 };

CpuIsa cpu_isa();  // best level supported by this CPU and compiled into this build
const char* cpu_isa_name(CpuIsa isa);
// Whether the AVX-512 kernels may use the AVX512_BF16 dot product (vdpbf16ps) for
// bfloat16 inputs: the level is AVX-512, the CPU has the instruction and LONGATTN_CPU_ISA
// does not cap the level (its value `avx512` means AVX-512 without it).
bool cpu_bf16_dot();

template <typename Fn>
Fn pick_isa(Fn baseline, Fn avx2, Fn avx512) {
  switch (cpu_isa()) {
    case CpuIsa::AVX512: return avx512;
    case CpuIsa::AVX2: return avx2;
    default: return baseline;
  }
}

}  // namespace longattn

// The best compiled level of kernel entry point `name`, declared in the namespaces
// baseline, avx2 and avx512 of the calling scope.
#if defined(LONGATTN_HAVE_AVX2)
#define LONGATTN_ISA_FN(name) ::longattn::pick_isa(baseline::name, avx2::name, avx512::name)
#else
#define LONGATTN_ISA_FN(name) (baseline::name)
#endif
