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
  auto fn = LONGATTN_ISA_FN(attention_forward);
  fn(p);  // packs K/V, then runs query blocks on the thread pool
}

void attention_backward(const AttentionGradParams& g) {
  auto fn = LONGATTN_ISA_FN(attention_backward_items);
  parallel_for(g.fwd.batch * g.fwd.heads_kv, 1, [&](int64_t i0, int64_t i1) { fn(g, i0, i1); });
}

}  // namespace cpu
}  // namespace longattn
