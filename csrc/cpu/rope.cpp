// CPU RoPE: split tokens across the thread pool and run the best compiled ISA level.
#include <algorithm>

#include "longattn/cpu_isa.h"
#include "longattn/parallel.h"
#include "longattn/rope.h"

namespace longattn {
namespace cpu {

namespace baseline { void rope_tokens(const RopeParams& p, int64_t t0, int64_t t1); }
#if defined(LONGATTN_HAVE_AVX2)
namespace avx2 { void rope_tokens(const RopeParams& p, int64_t t0, int64_t t1); }
#endif
#if defined(LONGATTN_HAVE_AVX2)
namespace avx512 { void rope_tokens(const RopeParams& p, int64_t t0, int64_t t1); }
#endif

void rope(const RopeParams& p) {
  auto fn = LONGATTN_ISA_FN(rope_tokens);
  const int64_t tokens = p.batch * p.seqlen;
  const int64_t row_elems = std::max<int64_t>(1, (p.hq + (p.k ? p.hk : 0)) * p.head_dim);
  // About 32K elements per chunk keeps thread start-up small against the work.
  const int64_t grain = std::max<int64_t>(1, 32768 / row_elems);
  parallel_for(tokens, grain, [&](int64_t t0, int64_t t1) { fn(p, t0, t1); });
}

}  // namespace cpu
}  // namespace longattn
