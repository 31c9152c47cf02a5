// CPU linear attention: one work item per (sequence, head) on the thread pool, running the
// best compiled ISA level of linear_attention_kernel.cpp.
#include "longattn/cpu_isa.h"
#include "longattn/linear_attention.h"
#include "longattn/parallel.h"

namespace longattn {
namespace cpu {

#define LONGATTN_DECLARE_ISA(ns)                                                                  \
  namespace ns {                                                                                  \
  void linear_attention_forward_items(const LinearAttentionParams& p, int64_t i0, int64_t i1);     \
  void linear_attention_backward_items(const LinearAttentionGradParams& g, int64_t i0, int64_t i1); \
  }
LONGATTN_DECLARE_ISA(baseline)
#if defined(LONGATTN_HAVE_AVX2)
LONGATTN_DECLARE_ISA(avx2)
LONGATTN_DECLARE_ISA(avx512)
#endif
#undef LONGATTN_DECLARE_ISA

void linear_attention_forward(const LinearAttentionParams& p) {
  auto fn = baseline::linear_attention_forward_items;
#if defined(LONGATTN_HAVE_AVX2)
  if (cpu_isa() == CpuIsa::AVX512) fn = avx512::linear_attention_forward_items;
  if (cpu_isa() == CpuIsa::AVX2) fn = avx2::linear_attention_forward_items;
#endif
  parallel_for(p.batch * p.heads, 1, [&](int64_t i0, int64_t i1) { fn(p, i0, i1); });
}

void linear_attention_backward(const LinearAttentionGradParams& g) {
  auto fn = baseline::linear_attention_backward_items;
#if defined(LONGATTN_HAVE_AVX2)
  if (cpu_isa() == CpuIsa::AVX512) fn = avx512::linear_attention_backward_items;
  if (cpu_isa() == CpuIsa::AVX2) fn = avx2::linear_attention_backward_items;
#endif
  parallel_for(g.fwd.batch * g.fwd.heads, 1, [&](int64_t i0, int64_t i1) { fn(g, i0, i1); });
}

}  // namespace cpu
}  // namespace longattn
