// A small fork-join thread pool for the CPU kernels. One pool per process; the calling
// thread takes part in the work. LONGATTN_NUM_THREADS overrides the default, which is the
// number of CPUs this process may run on.
#pragma once

#include <cstdint>
#include <functional>

namespace longattn {

int num_threads();
void set_num_threads(int n);

// Calls fn(begin, end) over disjoint ranges covering [0, n). Ranges hold at least `grain`
// items, so small problems run on the calling thread alone. fn must not throw.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace longattn
