// CPU flash attention: split work items across the thread pool and run the best compiled
// ISA level.
#include "longattn/attention.h"
#include "longattn/cpu_isa.h"
#include "longattn/parallel.h"

namespace longattn {
namespace cpu {

#define LONGATTN_DECLARE_ISA(ns)                                                  \
  namespace ns {                                                                  \
  void attention_forward(const AttentionParams& p);                               \
  void attention_backward_items(const AttentionGradParams& g, int64_t i0, int64_t i1); \
  }
LONGATTN_DECLARE_ISA(baseline)
#if defined(LONGATTN_HAVE_AVX2)
LONGATTN_DECLARE_ISA(avx2)
LONGATTN_DECLARE_ISA(avx512)
#endif
#undef LONGATTN_DECLARE_ISA

void attention_forward(const AttentionParams& p) {
  auto fn = baseline::attention_forward;
#if defined(LONGATTN_HAVE_AVX2)
  if (cpu_isa() == CpuIsa::AVX512) fn = avx512::attention_forward;
  if (cpu_isa() == CpuIsa::AVX2) fn = avx2::attention_forward;
#endif
  fn(p);  // packs K/V, then runs query blocks on the thread pool
}

void attention_backward(const AttentionGradParams& g) {
  auto fn = baseline::attention_backward_items;
#if defined(LONGATTN_HAVE_AVX2)
  if (cpu_isa() == CpuIsa::AVX512) fn = avx512::attention_backward_items;
  if (cpu_isa() == CpuIsa::AVX2) fn = avx2::attention_backward_items;
#endif
  parallel_for(g.fwd.batch * g.fwd.heads_kv, 1, [&](int64_t i0, int64_t i1) { fn(g, i0, i1); });
}

}  // namespace cpu
}  // namespace longattn
