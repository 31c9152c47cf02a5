// CPU linear attention: one work item per (sequence, head) on the thread pool, running the
// best compiled ISA level of linear_attention_kernel.cpp.
#include <algorithm>

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

namespace {
// Items per thread-pool task: about 128K state-sized multiply-adds at least, so decoding
// steps (a token or a few per sequence) run on the calling thread without waking the pool.
int64_t grain(const LinearAttentionParams& p) {
  const int64_t tokens = p.cu_seqlens ? (p.batch ? p.cu_seqlens[p.batch] / p.batch : 0) : p.seqlen;
  const int64_t work = std::max<int64_t>(1, tokens) * std::max<int64_t>(1, p.head_dim * p.head_dim_v);
  return std::max<int64_t>(1, (int64_t(1) << 17) / work);
}
}  // namespace

void linear_attention_forward(const LinearAttentionParams& p) {
  auto fn = LONGATTN_ISA_FN(linear_attention_forward_items);
  parallel_for(p.batch * p.heads, grain(p), [&](int64_t i0, int64_t i1) { fn(p, i0, i1); });
}

void linear_attention_backward(const LinearAttentionGradParams& g) {
  auto fn = LONGATTN_ISA_FN(linear_attention_backward_items);
  parallel_for(g.fwd.batch * g.fwd.heads, grain(g.fwd), [&](int64_t i0, int64_t i1) { fn(g, i0, i1); });
}

}  // namespace cpu
}  // namespace longattn
